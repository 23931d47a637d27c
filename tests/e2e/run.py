#!/usr/bin/env python3
"""End-to-end test: a real Synapse, the real grok-appservice binary, the offline fake xAI, and
two users (alice, bob) talking through the client-server API.

    python3 tests/e2e/run.py

GROK_APPSERVICE_BIN=path uses that binary instead of `cargo build`. KEEP=1 keeps the temp dir
(it is also kept when a check fails). RUST_LOG is passed to the bot (default info).
The last line is `e2e: N passed, M failed`; the exit code is non-zero if any check failed.
"""

import base64
import json
import os
import struct
import sys
import time
import traceback
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
import e2e_lib as L  # noqa: E402

BOT = L.BOT_ID
API_KEY = "e2e-dummy-key"
# How long to wait for an answer, and how long silence counts as "no reply".
REPLY_TIMEOUT = 30
QUIET_WAIT = 4

results = []  # (name, ok, detail)


def report(name, problems, info=""):
    """Records a check: it passes when `problems` is empty."""
    ok = not problems
    detail = "; ".join(problems) if problems else info
    results.append((name, ok, detail))
    L.log(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""))


class Ctx:
    """What the scenarios share: the stack, users, rooms and the events later checks look at."""

    def __init__(self, stack, synapse, bot, fake):
        self.stack, self.synapse, self.bot, self.fake = stack, synapse, bot, fake
        self.alice = synapse.register("alice")
        self.bob = synapse.register("bob")
        self.dm = self.group = None
        self.dm_question = self.group_question = self.thread_question = None
        self.media_event = self.chatter = None

    def provider_calls(self):
        """Requests the fake provider received at POST /v1/responses."""
        return [r for r in self.fake.snapshot() if r["path"].rstrip("/") == "/v1/responses"]


# ---------------------------------------------------------------------------------------------
# Scenarios


def scenario_direct(ctx):
    """a. A direct chat: the bot joins and answers, with one provider call."""
    alice = ctx.alice
    before = len(ctx.provider_calls())
    ctx.dm = alice.create_room(invite=[BOT], is_direct=True)
    if not alice.wait_joined(ctx.dm, BOT, 20):
        return report("a. direct chat", [f"bot did not join the DM {ctx.dm} within 20s "
                                          f"(membership: {alice.membership(ctx.dm, BOT)})"])
    question = "What is the tallest mountain in Europe?"
    ctx.dm_question = alice.say(ctx.dm, question)
    reply = L.wait_reply(alice, ctx.dm, ctx.dm_question, REPLY_TIMEOUT)
    if not reply:
        return report("a. direct chat", [f"no bot reply to {ctx.dm_question} within {REPLY_TIMEOUT}s"])
    problems = L.reply_problems(reply, alice.user_id)
    body = reply["content"].get("body", "")
    if "[offline fake xAI]" not in body:
        problems.append(f"reply body does not carry the fake's answer: {body!r}")
    calls = ctx.provider_calls()[before:]
    if len(calls) != 1:
        problems.append(f"provider got {len(calls)} requests, want 1")
    else:
        call = calls[0]
        sent = call["body"] if isinstance(call["body"], dict) else {}
        if question not in json.dumps(sent.get("input"), ensure_ascii=False):
            problems.append(f"provider input lacks the question: {sent.get('input')!r}")
        if call["authorization"] != f"Bearer {API_KEY}":
            problems.append("provider request lacks 'Authorization: Bearer $XAI_API_KEY'")
        if sent.get("store") is not False:
            problems.append(f"provider request has store={sent.get('store')!r}, want false")
    report("a. direct chat", problems, f"reply {reply['event_id']}: {body!r}")


def scenario_group(ctx):
    """b. A group room: chatter is ignored, a mention is answered."""
    alice, bob = ctx.alice, ctx.bob
    ctx.group = alice.create_room(invite=[bob.user_id, BOT], name="e2e group")
    bob.join(ctx.group)
    if not alice.wait_joined(ctx.group, BOT, 20):
        report("b1. group chatter ignored", [f"bot did not join the group room within 20s"])
        return report("b2. group mention answered", ["skipped: the bot is not in the room"])
    alice.wait_joined(ctx.group, bob.user_id, 10)

    before = len(ctx.provider_calls())
    ctx.chatter = bob.say(ctx.group, "lunch at noon?")
    time.sleep(QUIET_WAIT)
    problems = []
    if L.replies_to(alice, ctx.group, ctx.chatter):
        problems.append("the bot replied to chatter not addressed to it")
    if len(ctx.provider_calls()) != before:
        problems.append(f"provider got {len(ctx.provider_calls()) - before} requests for chatter")
    report("b1. group chatter ignored", problems, f"no reply within {QUIET_WAIT}s, no provider call")

    before = len(ctx.provider_calls())
    # A plain factual question: the router sends it to grok_direct, one provider call (arithmetic
    # such as "2+2" would go to the two-stage reasoning route, see g3).
    ctx.group_question = alice.send(ctx.group, {
        "msgtype": "m.text", "body": "grok: what is the capital of France?", "m.mentions": {"user_ids": [BOT]},
    })
    reply = L.wait_reply(alice, ctx.group, ctx.group_question, REPLY_TIMEOUT)
    if not reply:
        return report("b2. group mention answered", [f"no bot reply within {REPLY_TIMEOUT}s"])
    problems = L.reply_problems(reply, alice.user_id)
    time.sleep(1)  # a duplicate would show up right behind the first reply
    n_replies = len(L.replies_to(alice, ctx.group, ctx.group_question))
    if n_replies != 1:
        problems.append(f"{n_replies} bot replies, want 1")
    if len(ctx.provider_calls()) - before != 1:
        problems.append(f"provider got {len(ctx.provider_calls()) - before} requests, want 1")
    # Events are handled in order, so by now the chatter was surely seen; still unanswered?
    if L.replies_to(alice, ctx.group, ctx.chatter):
        problems.append("the bot replied to the earlier chatter")
    report("b2. group mention answered", problems, f"reply {reply['event_id']}: {reply['content'].get('body')!r}")


def scenario_media(ctx):
    """c. Addressed media other than an image gets a short notice and no provider call."""
    if not ctx.dm:
        return report("c. addressed media", ["skipped: no direct chat (a. failed)"])
    alice = ctx.alice
    before = len(ctx.provider_calls())
    ctx.media_event = alice.send(ctx.dm, {
        "msgtype": "m.file", "body": "report.pdf", "url": "mxc://localhost/fake",
        "info": {"mimetype": "application/pdf", "size": 1234},
    })
    reply = L.wait_reply(alice, ctx.dm, ctx.media_event, REPLY_TIMEOUT)
    if not reply:
        return report("c. addressed media", [f"no bot notice within {REPLY_TIMEOUT}s"])
    problems = L.reply_problems(reply, alice.user_id)
    time.sleep(1)
    if len(ctx.provider_calls()) != before:
        problems.append(f"provider got {len(ctx.provider_calls()) - before} requests for a file, want 0")
    report("c. addressed media", problems, f"notice: {reply['content'].get('body')!r}")


def tiny_png():
    """A valid 2x2 RGB PNG, built here so the test needs no image library."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    rows = b"".join(b"\x00" + b"\xff\x00\x00" * 2 for _ in range(2))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def image_parts(call):
    """The decoded `input_image` parts of the last user turn a provider call carried."""
    user_turns = [m for m in sent_body(call).get("input") or [] if isinstance(m, dict) and m.get("role") == "user"]
    content = user_turns[-1].get("content") if user_turns else None
    parts = [p for p in content if isinstance(p, dict) and p.get("type") == "input_image"] \
        if isinstance(content, list) else []
    return [base64.b64decode(p["image_url"].split(";base64,", 1)[1]) for p in parts]


def scenario_image(ctx):
    """f2. A captioned PNG in the direct chat: downloaded as the bot through authenticated media,
    sent to the model once as an image part with the same bytes, answered once."""
    name = "f2. image question"
    if not ctx.dm:
        return report(name, ["skipped: no direct chat (a. failed)"])
    alice = ctx.alice
    png = tiny_png()
    mxc = alice.upload(png, "image/png", "pixels.png")
    before = len(ctx.provider_calls())
    caption = "What colour are these pixels?"
    event_id = alice.send(ctx.dm, {
        "msgtype": "m.image", "body": caption, "filename": "pixels.png", "url": mxc,
        "info": {"mimetype": "image/png", "size": len(png), "w": 2, "h": 2},
    })
    reply = L.wait_reply(alice, ctx.dm, event_id, REPLY_TIMEOUT)
    if not reply:
        return report(name, [f"no bot reply to the image within {REPLY_TIMEOUT}s"])
    problems = L.reply_problems(reply, alice.user_id)
    time.sleep(1)
    calls = ctx.provider_calls()[before:]
    if len(calls) != 1:
        problems.append(f"provider got {len(calls)} requests, want 1")
    else:
        parts = image_parts(calls[0])
        if len(parts) != 1 or parts[0] != png:
            problems.append(f"provider got {len(parts)} image parts (bytes equal: "
                            f"{[p == png for p in parts]}), want 1 equal to the upload")
        if caption not in sent_input(calls[0]):
            problems.append("provider input lacks the caption")
    replies = L.replies_to(alice, ctx.dm, event_id)
    if len(replies) != 1:
        problems.append(f"{len(replies)} bot replies to the image, want 1")
    rows = L.wait_until(lambda: ctx.bot.request_log(event_id), 10, 0.25) or []
    if len(rows) != 1 or rows[0]["images"] != 1 or rows[0]["route"] != "grok_direct":
        problems.append(f"request_log rows {[(r['route'], r['images']) for r in rows]}, "
                        "want one grok_direct row with images=1")
    report(name, problems, f"reply {reply['event_id']}: {reply['content'].get('body')!r}")


def scenario_redelivery(ctx):
    """d. The same event PUT again in a new transaction is not answered twice."""
    if not ctx.dm_question:
        return report("d. redelivery deduped", ["skipped: no direct-chat question (a. failed)"])
    alice = ctx.alice
    before = len(ctx.provider_calls())
    event = alice.get_event(ctx.dm, ctx.dm_question)
    problems = []
    try:
        status, body = ctx.bot.put_transaction([event])
        if status != 200 or body != {}:
            problems.append(f"transaction answered {status} {body!r}, want 200 {{}}")
    except L.HttpError as e:
        problems.append(f"transaction answered {e.status} {e.body!r}, want 200 {{}}")
    time.sleep(QUIET_WAIT)
    n_replies = len(L.replies_to(alice, ctx.dm, ctx.dm_question))
    if n_replies != 1:
        problems.append(f"{n_replies} bot replies to the question, want 1")
    if len(ctx.provider_calls()) != before:
        problems.append(f"provider got {len(ctx.provider_calls()) - before} requests, want 0")
    report("d. redelivery deduped", problems, "200 {}, still one reply, no provider call")


def scenario_thread(ctx):
    """e. A question in a thread is answered in the same thread."""
    if not ctx.group:
        return report("e. thread reply", ["skipped: no group room (b. failed)"])
    alice = ctx.alice
    root = alice.say(ctx.group, "Thread: planning the trip")
    ctx.thread_question = alice.send(ctx.group, {
        "msgtype": "m.text", "body": "grok: how long is the train from Paris to Berlin?",
        "m.mentions": {"user_ids": [BOT]},
        "m.relates_to": {"rel_type": "m.thread", "event_id": root, "is_falling_back": True,
                         "m.in_reply_to": {"event_id": root}},
    })

    def answer():
        # Either a rich reply to the question, or any bot message in the thread (root is not
        # addressed to the bot, so the only bot message there is the answer).
        for e in alice.messages(ctx.group):
            rel = L.relates_to(e)
            if e.get("sender") == BOT and (L.in_reply_to(e) == ctx.thread_question
                                           or (rel.get("rel_type") == "m.thread" and rel.get("event_id") == root)):
                return e
        return None

    reply = L.wait_until(answer, REPLY_TIMEOUT, 0.5)
    if not reply:
        return report("e. thread reply", [f"no bot reply within {REPLY_TIMEOUT}s"])
    rel = L.relates_to(reply)
    problems = L.reply_problems(reply, alice.user_id)
    if rel.get("rel_type") != "m.thread" or rel.get("event_id") != root:
        problems.append(f"m.relates_to is {rel!r}, want rel_type m.thread with event_id {root}")
    report("e. thread reply", problems, f"m.relates_to {json.dumps(rel)}")


def scenario_request_log(ctx):
    """f. request_log has one row per engaged event with the right route."""
    answered = [e for e in (ctx.dm_question, ctx.group_question, ctx.thread_question) if e]
    expected = answered + ([ctx.media_event] if ctx.media_event else [])
    # Telemetry is written off the answer path, so give it a moment.
    L.wait_until(lambda: all(ctx.bot.request_log(e) for e in expected), 10, 0.5)
    problems = []
    for event_id in answered:
        rows = ctx.bot.request_log(event_id)
        if len(rows) != 1:
            problems.append(f"{len(rows)} rows for {event_id}, want 1")
            continue
        r = rows[0]
        if r["ok"] != 1 or r["route"] != "grok_direct":
            problems.append(f"row {event_id}: ok={r['ok']} route={r['route']!r}, want ok=1 route='grok_direct'")
        if r["query_text"]:
            problems.append(f"row {event_id}: query_text stored although telemetry.store_text is false")
    if ctx.media_event:
        rows = ctx.bot.request_log(ctx.media_event)
        if len(rows) != 1:
            problems.append(f"{len(rows)} rows for the media event, want 1")
        elif rows[0]["route"] != "none" or rows[0]["degraded"] != "media":
            problems.append(f"media row: route={rows[0]['route']!r} degraded={rows[0]['degraded']!r}, "
                            "want route='none' degraded='media'")
    if ctx.chatter and ctx.bot.request_log(ctx.chatter):
        problems.append("a row was stored for chatter not addressed to the bot")
    # Money: the recorded cost is exactly what the provider reported (integer ticks).
    reported = sum(c["response"]["usage"]["cost_in_usd_ticks"] for c in ctx.provider_calls() if c.get("status") == 200)
    recorded = sum(r["cost_total_ticks"] for e in answered for r in ctx.bot.request_log(e))
    if not problems and recorded != reported:
        problems.append(f"sum of cost_total_ticks is {recorded}, the provider reported {reported}")
    all_rows = ctx.bot.request_log()
    report("f. request_log", problems,
           f"{len(all_rows)} rows; routes {sorted(r['route'] for r in all_rows)}; cost {recorded} ticks")


# ---------------------------------------------------------------------------------------------
# Routes, cache and spend limits

TRIVIAL_MODEL, FINAL_MODEL, REASON_MODEL = "grok-4.20-non-reasoning", "grok-4.3", "grok-4.5"
TICKS_PER_USD = 10_000_000_000


def sent_body(call):
    return call["body"] if isinstance(call.get("body"), dict) else {}


def sent_input(call):
    return json.dumps(sent_body(call).get("input"), ensure_ascii=False)


def answer_text(call):
    """The output_text the fake answered a call with."""
    for item in (call.get("response") or {}).get("output", []):
        if item.get("type") == "message":
            return "".join(p.get("text", "") for p in item.get("content", []) if p.get("type") == "output_text")
    return ""


def reported_cost(calls):
    return sum(c["response"]["usage"]["cost_in_usd_ticks"] for c in calls if c.get("status") == 200)


def has_web_search(call):
    return any(isinstance(t, dict) and t.get("type") == "web_search" for t in sent_body(call).get("tools") or [])


def exchange(ctx, client, room, text, timeout=REPLY_TIMEOUT):
    """Sends `text`, waits for the bot's reply; returns (event_id, reply or None, the provider
    calls made meanwhile, the request_log row or None)."""
    before = len(ctx.provider_calls())
    event_id = client.say(room, text)
    reply = L.wait_reply(client, room, event_id, timeout)
    calls = ctx.provider_calls()[before:]
    # The row is written off the answer path: give it a moment.
    rows = L.wait_until(lambda: ctx.bot.request_log(event_id), 10, 0.25) or []
    return event_id, reply, calls, (rows[0] if len(rows) == 1 else None)


def row_problems(row, route, source, cost=None):
    """What is wrong with a request_log row's route, router_source, ok and cost."""
    if row is None:
        return ["no (single) request_log row"]
    problems = []
    if (row["route"], row["router_source"]) != (route, source):
        problems.append(f"row route/router_source {row['route']!r}/{row['router_source']!r}, "
                        f"want {route!r}/{source!r}")
    if row["ok"] != 1:
        problems.append(f"row ok={row['ok']} degraded={row['degraded']!r} err={row['err']!r}")
    if cost is not None and row["cost_total_ticks"] != cost:
        problems.append(f"row cost_total_ticks {row['cost_total_ticks']}, the provider reported {cost}")
    return problems


def scenario_routes(ctx):
    """g. The route cascade through Synapse: trivial, web, reasoning and a forced route."""
    names = ["g1. trivial route", "g2. web route", "g3. reasoning route", "g4. forced !web"]
    if not ctx.dm:
        for n in names:
            report(n, ["skipped: no direct chat (a. failed)"])
        return
    alice, dm = ctx.alice, ctx.dm

    # g1. "thanks!" goes to the cheap trivial model.
    event, reply, calls, row = exchange(ctx, alice, dm, "thanks!")
    if not reply:
        report(names[0], [f"no bot reply to 'thanks!' within {REPLY_TIMEOUT}s"])
    else:
        problems = L.reply_problems(reply, alice.user_id)
        models = [sent_body(c).get("model") for c in calls]
        if models != [TRIVIAL_MODEL]:
            problems.append(f"provider saw models {models}, want [{TRIVIAL_MODEL!r}]")
        elif has_web_search(calls[0]) or sent_body(calls[0]).get("reasoning"):
            problems.append("the trivial request carries tools or reasoning")
        problems += row_problems(row, "trivial_direct", "heuristic", reported_cost(calls))
        if row and json.loads(row["models"] or "{}").get("trivial") != TRIVIAL_MODEL:
            problems.append(f"row models {row['models']}, want trivial={TRIVIAL_MODEL}")
        report(names[0], problems, f"{models}; reply {reply['content'].get('body')!r}")

    # g2. A question about today's weather: one web_search request, sources in the reply.
    question = "what's the weather in Paris today?"
    event, reply, calls, row = exchange(ctx, alice, dm, question)
    if not reply:
        report(names[1], [f"no bot reply within {REPLY_TIMEOUT}s"])
    else:
        problems = L.reply_problems(reply, alice.user_id)
        body = reply["content"].get("body", "")
        if len(calls) != 1:
            problems.append(f"provider got {len(calls)} requests, want 1")
        else:
            sent = sent_body(calls[0])
            if sent.get("model") != FINAL_MODEL or not has_web_search(calls[0]):
                problems.append(f"request model={sent.get('model')!r} tools={sent.get('tools')!r}, "
                                f"want {FINAL_MODEL!r} with a web_search tool")
            if not isinstance(sent.get("max_turns"), int) or sent["max_turns"] < 1:
                problems.append(f"request max_turns={sent.get('max_turns')!r}, want a positive integer")
            if question not in sent_input(calls[0]):
                problems.append("request input lacks the question")
            url = calls[0]["response"]["citations"][0]
            if "Sources:" not in body or url not in body:
                problems.append(f"reply does not list the source {url}: {body!r}")
            html = reply["content"].get("formatted_body", "")
            if f'href="{url}"' not in html:
                problems.append(f"formatted_body has no link to {url}: {html!r}")
            if answer_text(calls[0]) not in body:
                problems.append("reply lacks the model's answer")
        problems += row_problems(row, "web_then_grok", "heuristic", reported_cost(calls))
        if row and row["cost_web_ticks"] != reported_cost(calls):
            problems.append(f"row cost_web_ticks {row['cost_web_ticks']}, want {reported_cost(calls)}")
        report(names[1], problems, f"reply {body!r}")

    # g3. A step-by-step solve: the reasoning model, then the final model writes the reply.
    question = "solve 3x + 5 = 20 step by step"
    event, reply, calls, row = exchange(ctx, alice, dm, question)
    if not reply:
        report(names[2], [f"no bot reply within {REPLY_TIMEOUT}s"])
    else:
        problems = L.reply_problems(reply, alice.user_id)
        body = reply["content"].get("body", "")
        models = [sent_body(c).get("model") for c in calls]
        if models != [REASON_MODEL, FINAL_MODEL]:
            problems.append(f"provider saw models {models}, want [{REASON_MODEL!r}, {FINAL_MODEL!r}]")
        else:
            first, second = sent_body(calls[0]), sent_body(calls[1])
            if (first.get("reasoning") or {}).get("effort") != "medium":
                problems.append(f"reasoning request has reasoning={first.get('reasoning')!r}, want effort medium")
            if second.get("reasoning"):
                problems.append(f"final request has reasoning={second.get('reasoning')!r}")
            if question not in sent_input(calls[0]) or question not in sent_input(calls[1]):
                problems.append("a request's input lacks the question")
            analysis = answer_text(calls[0])
            if json.dumps(analysis, ensure_ascii=False)[1:-1] not in sent_input(calls[1]):
                problems.append("the final request's input lacks the reasoning model's analysis")
            if answer_text(calls[1]).strip() not in body:
                problems.append(f"reply is not the final model's answer: {body!r}")
            if row:
                want = [("cost_reason_ticks", reported_cost(calls[:1])), ("cost_final_ticks", reported_cost(calls[1:])),
                        ("reasoning_tokens", calls[0]["response"]["usage"]["output_tokens_details"]["reasoning_tokens"])]
                problems += [f"row {k}={row[k]}, want {v}" for k, v in want if row[k] != v]
        problems += row_problems(row, "reason_then_grok", "heuristic", reported_cost(calls))
        report(names[2], problems, f"{models}; reply {body[:80]!r}")

    # g4. `!web` forces the web route for a question the router would answer directly.
    question = "who wrote the novel Middlemarch?"
    event, reply, calls, row = exchange(ctx, alice, dm, "!web " + question)
    if not reply:
        report(names[3], [f"no bot reply within {REPLY_TIMEOUT}s"])
    else:
        problems = L.reply_problems(reply, alice.user_id)
        body = reply["content"].get("body", "")
        if len(calls) != 1 or not has_web_search(calls[0]):
            problems.append(f"provider got {len(calls)} requests ({[sent_body(c).get('tools') for c in calls]}), "
                            "want 1 with a web_search tool")
        else:
            sent = sent_input(calls[0])
            if question not in sent or "!web" in sent:
                problems.append(f"request input should be the question without the prefix: {sent}")
            if calls[0]["response"]["citations"][0] not in body:
                problems.append(f"reply does not list the source: {body!r}")
        problems += row_problems(row, "web_then_grok", "forced", reported_cost(calls))
        report(names[3], problems, f"reply {body!r}")


def scenario_cache(ctx):
    """h. The same question twice in the group room (no reply, so no context): two replies, one
    provider request, a cache hit. (In a direct chat the second would carry the first as
    context, and answers with context are never shared; j4 checks that.)"""
    name = "h. response cache"
    if not ctx.group:
        return report(name, ["skipped: no group room (b. failed)"])
    alice, room = ctx.alice, ctx.group
    question = "grok: What is the chemical symbol for gold?"
    e1, r1, calls1, row1 = exchange(ctx, alice, room, question)
    e2, r2, calls2, row2 = exchange(ctx, alice, room, question)
    if not r1 or not r2:
        return report(name, [f"no bot reply to the {'first' if not r1 else 'second'} question within {REPLY_TIMEOUT}s"])
    problems = L.reply_problems(r2, alice.user_id)
    b1, b2 = r1["content"].get("body"), r2["content"].get("body")
    if b1 != b2:
        problems.append(f"the cached reply differs: {b1!r} then {b2!r}")
    if len(calls1) != 1 or len(calls2) != 0:
        problems.append(f"provider got {len(calls1)} then {len(calls2)} requests, want 1 then 0")
    problems += row_problems(row1, "grok_direct", "default", reported_cost(calls1))
    if row1 and row1["cache_hit"] != 0:
        problems.append("the first row has cache_hit=1")
    if row2 is None:
        problems.append("no request_log row for the second question")
    elif (row2["cache_hit"], row2["cost_total_ticks"], row2["ok"]) != (1, 0, 1):
        problems.append(f"second row cache_hit={row2['cache_hit']} cost_total_ticks={row2['cost_total_ticks']} "
                        f"ok={row2['ok']}, want 1, 0, 1")
    report(name, problems, f"1 provider request for 2 replies; second row cache_hit={row2 and row2['cache_hit']}")


def budget_counter(bot, scope):
    """Today's budget counter row of `scope` ('global' or 'user:@x:y'), or None. 'Today' is the
    newest day in the table: the bot's UTC day."""
    rows = bot.query("SELECT * FROM budget_counters WHERE scope = ? ORDER BY day DESC LIMIT 1", (scope,))
    return rows[0] if rows else None


def fmt_usd(ticks):
    """Dollars to the cent, rounded half up, as the bot writes them."""
    cents = (max(ticks, 0) + TICKS_PER_USD // 200) // (TICKS_PER_USD // 100)
    return f"${cents // 100}.{cents % 100:02d}"


def scenario_budget_books(ctx):
    """h2. The spend books: every answer so far is settled at the cost the provider reported,
    nothing is left reserved."""
    name = "h2. budget and grounding books"
    reported = reported_cost(ctx.provider_calls())
    counter = L.wait_until(lambda: (c := budget_counter(ctx.bot, "global")) and c["reserved_ticks"] == 0 and c,
                           5, 0.25) or budget_counter(ctx.bot, "global")
    if not counter:
        return report(name, ["no global budget counter for today"])
    problems = []
    if counter["settled_ticks"] != reported:
        problems.append(f"global settled_ticks {counter['settled_ticks']}, the provider reported {reported}")
    if counter["reserved_ticks"] != 0:
        problems.append(f"global reserved_ticks {counter['reserved_ticks']} with nothing in flight, want 0")
    # The daily grounding counter ends at the searches the provider reported, not the turns
    # reserved for them.
    searches = sum(c["response"]["usage"]["server_side_tool_usage_details"]["web_search_calls"]
                   for c in ctx.provider_calls() if c.get("status") == 200)
    grounding = sum(r["calls"] for r in ctx.bot.query("SELECT calls FROM grounding_usage"))
    if grounding != searches:
        problems.append(f"grounding_usage counts {grounding} searches, the provider reported {searches}")
    report(name, problems, f"settled {counter['settled_ticks']} ticks over {counter['requests']} reservations; "
                           f"{grounding} web searches counted")


# The bot's default appservice.claim_lease (this test does not set it). Only used to size how
# long "no re-answer" is watched for: long enough for the claim's lease to run out and recovery
# to take it over a few times, if it wrongly would.
DEFAULT_CLAIM_LEASE = 10
NO_POST_WATCH = 3 * DEFAULT_CLAIM_LEASE + 10


def scenario_no_post(ctx):
    """h3. A room where the bot is joined but may not post m.room.message: the question is paid
    once, no reply appears, the request_log row says send_failed, and the claim ends failed
    (a permanent send error: no retry loop, no re-answer)."""
    name = "h3. bot may not post"
    alice, bob = ctx.alice, ctx.bob
    room = alice.create_room(invite=[bob.user_id, BOT], name="e2e read-only for the bot")
    bob.join(room)
    if not alice.wait_joined(room, BOT, 20):
        return report(name, [f"bot did not join the room within 20s (membership: {alice.membership(room, BOT)})"])
    alice.wait_joined(room, bob.user_id, 10)
    # Only after the bot joined: m.room.message needs power 50; the bot (and bob) have 0.
    pl_path = f"/rooms/{L.q(room)}/state/m.room.power_levels"
    pl = alice.call("GET", pl_path)
    pl.setdefault("events", {})["m.room.message"] = 50
    # alice keeps her power (in room v12 the creator is not listed in `users` at all).
    pl.get("users", {}).pop(BOT, None)
    alice.call("PUT", pl_path, pl)
    problems = []
    # The room really refuses a level-0 member's message (bob stands in for the bot).
    try:
        bob.say(room, "can I still post here?")
        problems.append("bob (power 0) could still post m.room.message: the power levels did not take effect")
    except L.HttpError as e:
        if e.status != 403:
            problems.append(f"bob's post answered {e.status}, want 403")
    question = "grok: what is the capital of Portugal?"
    needle = "capital of Portugal"
    before = len(ctx.provider_calls())
    t0 = time.monotonic()
    event = alice.send(room, {"msgtype": "m.text", "body": question, "m.mentions": {"user_ids": [BOT]}})

    def claim():
        rows = ctx.bot.query("SELECT state, attempts, lease_owner FROM processed_events WHERE event_id = ?", (event,))
        return rows[0] if rows else None

    # First the outcome (the claim final and its row written), then keep watching until
    # NO_POST_WATCH s have passed, so a wrong re-answer after the lease runs out shows up.
    settled = L.wait_until(lambda: (c := claim()) and c["state"] in ("answered", "done", "failed")
                           and ctx.bot.request_log(event), NO_POST_WATCH, 0.5)
    settled_after = time.monotonic() - t0
    time.sleep(max(0.0, NO_POST_WATCH - (time.monotonic() - t0)))
    calls = [c for c in ctx.provider_calls()[before:] if needle in sent_input(c)]
    others = len(ctx.provider_calls()) - before - len(calls)
    if len(calls) != 1:
        problems.append(f"the provider got {len(calls)} requests for the question in {NO_POST_WATCH}s, want exactly 1")
    if others:
        problems.append(f"the provider got {others} other requests meanwhile")
    bot_posts = [e for e in alice.messages(room) if e.get("sender") == BOT and e.get("type") == "m.room.message"]
    if bot_posts:
        problems.append(f"{len(bot_posts)} bot messages appeared in the room although it may not post: "
                        f"{[e['event_id'] for e in bot_posts[:3]]}")
    rows = ctx.bot.request_log(event)
    if len(rows) != 1:
        problems.append(f"{len(rows)} request_log rows for the question, want 1")
    else:
        r = rows[0]
        if (r["degraded"], r["ok"]) != ("send_failed", 0):
            problems.append(f"request_log row degraded={r['degraded']!r} ok={r['ok']} err={r['err']!r}, "
                            f"want degraded='send_failed' ok=0")
        elif calls and r["cost_total_ticks"] != reported_cost(calls):
            problems.append(f"request_log row cost_total_ticks {r['cost_total_ticks']}, "
                            f"the provider reported {reported_cost(calls)} (the answer was paid)")
    c = claim()
    if not c:
        problems.append("no processed_events claim for the question")
    elif c["state"] != "failed":
        problems.append(f"claim state {c['state']!r} (attempts {c['attempts']}), want 'failed'")
    if not settled:
        problems.append(f"the claim was not final with a request_log row within {NO_POST_WATCH}s")
    report(name, problems,
           f"1 provider call, no reply, row degraded=send_failed ok=0, claim failed after {settled_after:.1f}s; "
           f"watched {NO_POST_WATCH}s for a re-answer")


CEILING_HEADROOM_TICKS = 120_000_000   # $0.012 above what the day has already spent
ANSWER_COST_TICKS = 50_000_000         # the fake charges $0.005 per answer
REFUSAL_CEILING = "I've reached today's spending limit for everyone"


def scenario_ceiling(ctx):
    """i. The daily ceiling: restart the bot with a ceiling just above today's spend, make each
    answer cost half a cent, and let bob ask until he is refused. Must run last: the bot keeps
    the tiny ceiling."""
    names = ["i1. spend ceiling refuses", "i2. !usage"]
    bob, bot = ctx.bob, ctx.bot
    spent = (budget_counter(bot, "global") or {}).get("settled_ticks", 0)
    # What bob asked earlier today (j1 has him reply to the bot): !usage counts it too.
    bob_before = budget_counter(bot, f"user:{bob.user_id}") or {}
    ceiling_ticks = spent + CEILING_HEADROOM_TICKS
    ceiling_usd = ceiling_ticks / TICKS_PER_USD
    ctx.fake.cost_ticks = ANSWER_COST_TICKS
    # dm_mode chain: the checks below compare reservation sizes across bob's questions, which
    # only holds when none of them carries the earlier ones as context.
    code = bot.restart(API_KEY, {"limits": {"daily_ceiling_usd": ceiling_usd},
                                 "context": {"dm_mode": "chain"}})
    L.log(f"e2e: bot restarted (old process exited {code}) with limits.daily_ceiling_usd={ceiling_usd} "
          f"(today's spend {spent} ticks + {CEILING_HEADROOM_TICKS}); answers cost {ANSWER_COST_TICKS} ticks")

    dm = bob.create_room(invite=[BOT], is_direct=True)
    if not bob.wait_joined(dm, BOT, 20):
        for n in names:
            report(n, [f"bot did not join bob's DM within 20s (membership: {bob.membership(dm, BOT)})"])
        return
    countries = ["Peru", "Chile", "Norway", "Kenya", "Japan", "Canada", "Egypt", "Poland"]
    answered, refused, unanswered = [], None, None  # (event, reply, calls, row)
    for country in countries:
        calls_before = len(ctx.provider_calls())
        ex = exchange(ctx, bob, dm, f"What is the capital of {country}?")
        if not ex[1]:
            unanswered = ex
            break
        if REFUSAL_CEILING in ex[1]["content"].get("body", ""):
            refused = ex
            break
        answered.append(ex)

    problems = []
    if not answered:
        problems.append("bob's first question was not answered (the ceiling left room for it)")
    if unanswered:
        problems.append(f"no bot reply to {unanswered[0]} within {REPLY_TIMEOUT}s")
    elif not refused:
        problems.append(f"never refused after {len(answered)} answers at {ANSWER_COST_TICKS} ticks each "
                        f"under a ceiling of {ceiling_ticks} ticks")
    shrunk = 0
    for event, reply, calls, row in answered:
        if len(calls) != 1:
            problems.append(f"{event}: provider got {len(calls)} requests, want 1")
        elif sent_body(calls[0]).get("max_output_tokens", 0) < 2048:
            # A shrunk plan: a short direct answer, marked degraded.
            shrunk += 1
            if row and (row["route"], row["router_source"]) != ("grok_direct", "degraded"):
                problems.append(f"{event}: shrunk request (max_output_tokens "
                                f"{sent_body(calls[0]).get('max_output_tokens')}) but row route/source "
                                f"{row['route']}/{row['router_source']}, want grok_direct/degraded")
        if row is None or row["cost_total_ticks"] != ANSWER_COST_TICKS or row["ok"] != 1:
            problems.append(f"{event}: row {row and {k: row[k] for k in ('ok', 'cost_total_ticks')}}, "
                            f"want ok=1 cost_total_ticks={ANSWER_COST_TICKS}")
    detail = f"{len(answered)} answered ({shrunk} with a shrunk output cap)"
    if refused:
        event, reply, calls, row = refused
        body = reply["content"].get("body", "")
        detail += f", then refused: {body!r}"
        problems += L.reply_problems(reply, bob.user_id)
        if "\n" in body.strip() or "00:00 UTC" not in body:
            problems.append(f"the refusal should be one line naming the 00:00 UTC reset: {body!r}")
        time.sleep(QUIET_WAIT)
        after = ctx.provider_calls()[calls_before:]
        if after:
            problems.append(f"provider got {len(after)} requests after the refused question was sent, want 0")
        if row is None:
            problems.append("no request_log row for the refused question")
        else:
            want = {"route": "none", "ceiling_hit": 1, "per_user_cap_hit": 0, "cost_total_ticks": 0}
            got = {k: row[k] for k in want}
            if got != want:
                problems.append(f"refused row {got}, want {want}")
        counter = budget_counter(bot, "global") or {}
        smallest = min((r["amount_ticks"] for r in bot.query(
            "SELECT amount_ticks FROM budget_reservations WHERE user_id = ?", (bob.user_id,))), default=0)
        if counter and counter["settled_ticks"] + counter["reserved_ticks"] + smallest <= counter["cap_ticks"]:
            problems.append(f"refused although {counter['cap_ticks'] - counter['settled_ticks']} ticks were left "
                            f"and a {smallest}-tick plan fitted before")
        if counter and counter["cap_ticks"] != ceiling_ticks:
            problems.append(f"global cap_ticks {counter['cap_ticks']}, want the new ceiling {ceiling_ticks}")
    report(names[0], problems, detail)

    # i2. `!usage` answers with bob's spend and request count today, and costs nothing.
    before = len(ctx.provider_calls())
    event = bob.say(dm, "!usage")
    reply = L.wait_reply(bob, dm, event, REPLY_TIMEOUT)
    if not reply:
        return report(names[1], [f"no bot reply to !usage within {REPLY_TIMEOUT}s"])
    body = reply["content"].get("body", "")
    bob_spent = bob_before.get("settled_ticks", 0) + reported_cost([c for ex in answered for c in ex[2]])
    problems = L.reply_problems(reply, bob.user_id)
    want = f"{fmt_usd(bob_spent)} over {len(answered) + bob_before.get('requests', 0)} request"
    if want not in body:
        problems.append(f"!usage reply lacks {want!r}: {body!r}")
    if len(ctx.provider_calls()) != before:
        problems.append(f"provider got {len(ctx.provider_calls()) - before} requests for !usage, want 0")
    report(names[1], problems, f"{body!r}")


# ---------------------------------------------------------------------------------------------
# Conversation context

# grok-4.3's default input price ($1.25 per 1M tokens) in ticks per token: what a reservation
# grows by, at least, per estimated context token.
FINAL_INPUT_TICKS_PER_TOKEN = 12_500
# The bot's default context.max_tokens (this test does not set it).
CONTEXT_MAX_TOKENS = 6000


def est_tokens(text):
    """The bot's offline estimate: 3 UTF-8 bytes a token, rounded up."""
    return (len(text.encode("utf-8")) + 2) // 3


def display_name(client, user_id):
    return client.call("GET", f"/profile/{L.q(user_id)}/displayname").get("displayname") or user_id


def turns_of(call):
    """The (role, content) pairs of a Responses API request's input, oldest first."""
    inp = sent_body(call).get("input")
    if not isinstance(inp, list):
        return []
    return [(m.get("role"), m.get("content")) for m in inp if isinstance(m, dict)]


def call_for(calls, text):
    """The last provider call whose final input turn holds `text`."""
    found = [c for c in calls if turns_of(c) and text in str(turns_of(c)[-1][1])]
    return found[-1] if found else None


def reply_content(text, reply_to, mention=True, thread_root=None):
    content = {"msgtype": "m.text", "body": text}
    if mention:
        content["m.mentions"] = {"user_ids": [BOT]}
    if thread_root:
        content["m.relates_to"] = {"rel_type": "m.thread", "event_id": thread_root, "is_falling_back": True,
                                   "m.in_reply_to": {"event_id": reply_to}}
    elif reply_to:
        content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
    return content


def with_fallback(quoted_sender, quoted_body, text):
    """A body with the pre-v1.13 rich-reply fallback: the quoted message, a blank line, the text."""
    quoted = "\n".join(f"> {line}" for line in f"<{quoted_sender}> {quoted_body}".splitlines())
    return f"{quoted}\n\n{text}"


def scenario_reply_chain(ctx):
    """j1. A three-turn reply chain in a group room: the third request carries the earlier turns
    in order, the bot's as assistant turns, reply fallbacks stripped, user turns labelled."""
    name = "j1. reply-chain context"
    if not ctx.group:
        return report(name, ["skipped: no group room (b. failed)"])
    alice, bob, room = ctx.alice, ctx.bob, ctx.group
    a_name, b_name = display_name(alice, alice.user_id), display_name(bob, bob.user_id)
    first, second, third = ("my favourite colour is teal, please remember it", "and mine is orange",
                            "which colours did we name?")
    q1 = alice.send(room, reply_content(f"grok: {first}", None))
    r1 = L.wait_reply(alice, room, q1, REPLY_TIMEOUT)
    if not r1:
        return report(name, [f"no bot reply to the first message within {REPLY_TIMEOUT}s"])
    b1 = r1["content"]["body"]
    q2 = bob.send(room, reply_content(with_fallback(BOT, b1, second), r1["event_id"], mention=False))
    r2 = L.wait_reply(alice, room, q2, REPLY_TIMEOUT)
    if not r2:
        return report(name, [f"no bot reply to bob's reply to the bot within {REPLY_TIMEOUT}s"])
    b2 = r2["content"]["body"]
    before = len(ctx.provider_calls())
    q3 = alice.send(room, reply_content(with_fallback(BOT, b2, third), r2["event_id"], mention=False))
    r3 = L.wait_reply(alice, room, q3, REPLY_TIMEOUT)
    if not r3:
        return report(name, [f"no bot reply to the third message within {REPLY_TIMEOUT}s"])
    call = call_for(ctx.provider_calls()[before:], third)
    if not call:
        return report(name, ["no provider request carried the third message as its last turn"])
    got = turns_of(call)
    want = [("user", f"{a_name}: {first}"), ("assistant", b1.strip()), ("user", f"{b_name}: {second}"),
            ("assistant", b2.strip()), ("user", f"{a_name}: {third}")]
    problems = []
    if got != want:
        problems.append(f"request input {got!r}, want {want!r}")
    if any("> <" in str(c) for _, c in got):
        problems.append("a reply fallback reached the model")
    if sent_body(call).get("prompt_cache_key") != room:
        problems.append(f"prompt_cache_key {sent_body(call).get('prompt_cache_key')!r}, want the room id")
    report(name, problems, f"{len(got)} turns: {[r for r, _ in got]}")


def scenario_thread_context(ctx):
    """j2. A question inside a thread sees the root and the earlier thread messages and is
    answered in the thread."""
    name = "j2. thread context"
    if not ctx.group:
        return report(name, ["skipped: no group room (b. failed)"])
    alice, bob, room = ctx.alice, ctx.bob, ctx.group
    a_name, b_name = display_name(alice, alice.user_id), display_name(bob, bob.user_id)
    root_text, earlier, question = ("Trip plan: Lisbon in May, by train", "I can only do the second week",
                                    "which city and month did we pick?")
    root = alice.say(room, root_text)
    t1 = bob.send(room, reply_content(earlier, root, mention=False, thread_root=root))
    # Main-timeline chatter after the root: not part of the thread, so not in its context.
    bob.say(room, "unrelated: the coffee machine is fixed")
    before = len(ctx.provider_calls())
    q = alice.send(room, reply_content(f"grok: {question}", t1, thread_root=root))
    reply = L.wait_reply(alice, room, q, REPLY_TIMEOUT)
    if not reply:
        return report(name, [f"no bot reply within {REPLY_TIMEOUT}s"])
    problems = L.reply_problems(reply, alice.user_id)
    rel = L.relates_to(reply)
    want_rel = {"rel_type": "m.thread", "event_id": root, "is_falling_back": True, "m.in_reply_to": {"event_id": q}}
    if rel != want_rel:
        problems.append(f"reply m.relates_to {rel!r}, want {want_rel!r}")
    call = call_for(ctx.provider_calls()[before:], question)
    if not call:
        problems.append("no provider request carried the question as its last turn")
    else:
        got = turns_of(call)
        want = [("user", f"{a_name}: {root_text}"), ("user", f"{b_name}: {earlier}"), ("user", f"{a_name}: {question}")]
        if got != want:
            problems.append(f"request input {got!r}, want {want!r}")
        key = sent_body(call).get("prompt_cache_key") or ""
        if room not in key or root not in key:
            problems.append(f"prompt_cache_key {key!r} should name the room and the thread root")
    report(name, problems, f"m.relates_to {json.dumps(rel)}")


def scenario_dm_followup(ctx):
    """j3. In a direct chat a follow-up without any reply relation sees the previous question
    and answer."""
    name = "j3. direct-chat follow-up"
    if not ctx.dm:
        return report(name, ["skipped: no direct chat (a. failed)"])
    alice, dm = ctx.alice, ctx.dm
    a_name = display_name(alice, alice.user_id)
    told, asked = "my cat is called Zorblax", "what is my cat called?"
    e1, r1, _, _ = exchange(ctx, alice, dm, told)
    if not r1:
        return report(name, [f"no bot reply to the first message within {REPLY_TIMEOUT}s"])
    e2, r2, calls, row = exchange(ctx, alice, dm, asked)
    if not r2:
        return report(name, [f"no bot reply to the follow-up within {REPLY_TIMEOUT}s"])
    problems = []
    call = call_for(calls, asked)
    if not call:
        return report(name, ["no provider request carried the follow-up as its last turn"])
    got = turns_of(call)
    want = [("user", f"{a_name}: {told}"), ("assistant", r1["content"]["body"].strip()), ("user", f"{a_name}: {asked}")]
    if got[-3:] != want:
        problems.append(f"the request's last turns are {got[-3:]!r}, want {want!r}")
    roles = [r for r, _ in got]
    if len(got) > 21:
        problems.append(f"{len(got)} turns sent, more than context.max_messages (20) plus the message")
    if row and row["cache_hit"]:
        problems.append("a follow-up with context was served from the response cache")
    report(name, problems, f"{len(got)} turns, last roles {roles[-3:]}")


def scenario_context_bounds(ctx):
    """j4. context.max_tokens cuts a long reply chain from its oldest end, and the reservation
    grows with the context; the same question without context was cached, with context it is
    not served from the cache."""
    name = "j4. context bounded, reservation grows"
    if not ctx.group:
        return report(name, ["skipped: no group room (b. failed)"])
    alice, bob, room = ctx.alice, ctx.bob, ctx.group
    b_name = display_name(bob, bob.user_id)
    question = "grok: what is the capital of Spain?"
    # Without context first: its reservation is the baseline, and its answer is cached.
    e0, r0, calls0, row0 = exchange(ctx, alice, room, question)
    if not r0:
        return report(name, [f"no bot reply to the plain question within {REPLY_TIMEOUT}s"])
    # Six long notes, each replying to the one before (nobody addresses the bot): about 1,500
    # estimated tokens each, so together far over context.max_tokens.
    notes, prev = [], None
    for i in range(6):
        body = f"note {i}: " + " ".join(f"item{i}-{k}" for k in range(500))
        prev = bob.send(room, reply_content(body, prev, mention=False))
        notes.append(body)
    before = len(ctx.provider_calls())
    q = alice.send(room, reply_content(question, prev))
    reply = L.wait_reply(alice, room, q, REPLY_TIMEOUT)
    if not reply:
        return report(name, [f"no bot reply within {REPLY_TIMEOUT}s"])
    problems = []
    call = call_for(ctx.provider_calls()[before:], "capital of Spain")
    if not call:
        return report(name, ["the question with context got no provider request (served from the cache?)"])
    got = turns_of(call)
    context = [c for _, c in got[:-1]]
    kept = len(context)
    want = [f"{b_name}: {n}" for n in notes[len(notes) - kept:]] if kept else []
    if not 0 < kept < len(notes) or context != want:
        problems.append(f"context {[c[:12] for c in context]}, want the newest notes only, in order, "
                        f"with some dropped from the oldest end")
    current = got[-1][1] if got else ""
    total = sum(est_tokens(c) for c in context) + est_tokens(current)
    if total > CONTEXT_MAX_TOKENS:
        problems.append(f"context and message are {total} estimated tokens, over {CONTEXT_MAX_TOKENS}")
    if kept < len(notes) and total + est_tokens(f"{b_name}: {notes[len(notes) - kept - 1]}") <= CONTEXT_MAX_TOKENS:
        problems.append("a dropped note would still have fitted under context.max_tokens")

    def amount(event):
        rows = ctx.bot.query("SELECT amount_ticks FROM budget_reservations WHERE id LIKE ? ORDER BY created_at",
                             (event + "#%",))
        return rows[0]["amount_ticks"] if rows else None

    base, grown = amount(e0), amount(q)
    rows = L.wait_until(lambda: ctx.bot.request_log(q), 10, 0.25) or []
    if base is None or grown is None:
        problems.append(f"reservations: plain {base}, with context {grown}; want both recorded")
    else:
        ctx_tokens = sum(est_tokens(c) for c in context)
        if grown - base < ctx_tokens * FINAL_INPUT_TICKS_PER_TOKEN:
            problems.append(f"the reservation grew by {grown - base} ticks for {ctx_tokens} context tokens, "
                            f"want at least {ctx_tokens * FINAL_INPUT_TICKS_PER_TOKEN}")
    for label, row in (("plain", row0), ("with context", rows[0] if rows else None)):
        if row is None or row["route"] != "grok_direct":
            problems.append(f"{label} question row {row and row['route']!r}, want route grok_direct "
                            "(the reservations are compared on one route)")
    if rows and rows[0]["cache_hit"]:
        problems.append("the question with context was served from the response cache")
    report(name, problems, f"kept {kept} of {len(notes)} notes ({total} estimated tokens); "
                           f"reservation {base} -> {grown} ticks")


SCENARIOS = [
    ("a. direct chat", scenario_direct),
    ("b. group room", scenario_group),
    ("c. addressed media", scenario_media),
    ("d. redelivery deduped", scenario_redelivery),
    ("e. thread reply", scenario_thread),
    ("f. request_log", scenario_request_log),
    # After f.: that check sums every provider call against the rows of a.-e.
    ("f2. image question", scenario_image),
    ("g. routes", scenario_routes),
    ("h. response cache", scenario_cache),
    ("h2. budget books", scenario_budget_books),
    ("h3. bot may not post", scenario_no_post),
    ("j1. reply-chain context", scenario_reply_chain),
    ("j2. thread context", scenario_thread_context),
    ("j3. direct-chat follow-up", scenario_dm_followup),
    ("j4. context bounds", scenario_context_bounds),
    # Last: it restarts the bot with a tiny ceiling that refuses everything after it.
    ("i. spend ceiling", scenario_ceiling),
]


def main():
    started = time.monotonic()
    keep = os.environ.get("KEEP") == "1"
    with L.Stack(keep=keep) as stack:
        try:
            L.log("e2e: building / locating the binary and the Synapse venv")
            binary = L.build_binary()
            venv = L.ensure_venv()
            fake = stack.start_fake_xai()
            synapse, bot = L.start_stack(stack, binary, fake.base_url, API_KEY, venv)
            ctx = Ctx(stack, synapse, bot, fake)
            L.log(f"e2e: up in {time.monotonic() - started:.0f}s (synapse {synapse.url}, bot {bot.url}, "
                  f"fake xAI {fake.base_url}, dir {stack.dir})")
        except Exception as e:
            traceback.print_exc()
            report("setup", [f"{type(e).__name__}: {e}"])
            ctx = None
        if ctx:
            for name, scenario in SCENARIOS:
                try:
                    scenario(ctx)
                except Exception as e:
                    traceback.print_exc()
                    report(name, [f"{type(e).__name__}: {e}"])
                    # A dead process makes every later check fail the same way: stop here.
                    if any(p.poll() is not None for _, p, _ in stack.procs):
                        break
        failed = sum(1 for _, ok, _ in results if not ok)
        if failed:
            stack.keep = True
            stack.print_log_tails()
            L.log(f"e2e: logs kept in {stack.dir}")
    passed = len(results) - failed
    L.log("e2e: ---- results ----")
    for name, ok, detail in results:
        L.log(f"e2e:   {'PASS' if ok else 'FAIL'}  {name}" + ("" if ok else f"  -- {detail[:300]}"))
    L.log(f"e2e: took {time.monotonic() - started:.0f}s")
    print(f"e2e: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
