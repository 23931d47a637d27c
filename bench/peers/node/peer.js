// The matrix-appservice-node peer: a minimal appservice on matrix-appservice's `AppService`
// with the bot's logic. The library authenticates hs_token and parses the body; this
// subclass dedupes txnIds in memory (the library only remembers the last one), classifies
// each event as grok-appservice does (mentions by user id, pills, a name prefix; own echoes,
// other namespace users, notices and edits ignored) and dedupes the ids of addressed events.
// Events are handled synchronously, before the transaction is acknowledged.
//
//   node peer.js PORT HS_TOKEN      (GET /bench/stats -> {"txns": N, "addressed": M})
"use strict";
const { AppService } = require("matrix-appservice");

const BOT = "@grok:example.org";
const SERVER = "example.org";
const NAMESPACE = /^@grok:example\.org$/;
const PILLS = [`matrix.to/#/${BOT}`, `matrix:u/${BOT.slice(1)}`];
const NAMES = [BOT.slice(1), "grok", "Grok"].map((n) => n.toLowerCase());

const claimed = new Set();
const txns = new Set();
let addressedCount = 0;

function namePrefix(body) {
  let text = body.trimStart();
  if (text.startsWith("@")) text = text.slice(1);
  const low = text.slice(0, 64).toLowerCase();
  return NAMES.some((n) => low.startsWith(n) && [":", ","].includes(low[n.length]));
}

function addressed(event) {
  if (event.sender === BOT || NAMESPACE.test(event.sender)) return false;
  if (event.type !== "m.room.message" || event.state_key !== undefined) return false;
  const content = event.content || {};
  if (content["m.relates_to"] && content["m.relates_to"].rel_type === "m.replace") return false;
  if (content.msgtype !== "m.text" && content.msgtype !== "m.emote") return false;
  const mentions = content["m.mentions"] || {};
  if ((mentions.user_ids || []).includes(BOT)) return true;
  const html = typeof content.formatted_body === "string" ? content.formatted_body : "";
  if (PILLS.some((p) => html.includes(p))) return true;
  return typeof content.body === "string" && namePrefix(content.body);
}

class Peer extends AppService {
  onTransaction(req, res) {
    const txnId = req.params.txnId;
    if (txns.has(txnId)) {
      if (!this.isInvalidToken(req, res)) res.send({});
      return;
    }
    super.onTransaction(req, res);
    if (res.statusCode === 200) txns.add(txnId);
  }
}

const [port, token] = process.argv.slice(2);
const as = new Peer({ homeserverToken: token, httpMaxSizeBytes: 64 * 1024 * 1024 });
as.on("event", (event) => {
  if (addressed(event) && event.sender.split(":")[1] === SERVER && !claimed.has(event.event_id)) {
    claimed.add(event.event_id);
    addressedCount += 1;
  }
});
as.expressApp.get("/bench/stats", (req, res) => res.send({ txns: txns.size, addressed: addressedCount }));
as.listen(Number(port), "127.0.0.1").then(() => console.log("ready"));
