#!/usr/bin/env python3
"""End-to-end test of end-to-end encryption: a real Synapse, the real binary with
`encryption.enabled`, the offline fake xAI, and real E2EE clients (matrix-nio with vodozemac).

    python3 tests/e2e/encryption.py                 # everything below
    python3 tests/e2e/encryption.py --client-only   # only e0: the E2EE client against Synapse

- e0. the harness itself: two nio users exchange and decrypt encrypted messages (no bot);
- e1. alice (nio) opens an encrypted direct chat with the bot, trusts its device on first use,
  and decrypts one encrypted answer replying to her question; the provider saw the plaintext;
- e2. after a restart on the same crypto store the bot keeps its one device and still answers
  encrypted, with the earlier question read back from the room and decrypted as context;
- e3. a second device of alice, logged in later, decrypts the bot's next answer (the bot noticed
  the new device through device-list changes);
- e4. events whose room key never arrives (real Megolm messages of a session never shared) get,
  after `encryption.key_wait`, one encrypted notice (one per room) and each a request_log row
  with degraded = encrypted_room; e4b. so does an event with random ciphertext (no wait needed);
- e5. no question's plaintext (random words) and not the crypto passphrase in the bot's log
  (run at RUST_LOG=grok_appservice=debug), and no question or answer text in Synapse's database
  or the bot's own (run with telemetry.store_text, which a plaintext control question shows);
- e6. the bot's device is cross-signed: master and self-signing keys published, signatures valid,
  unchanged by the restart; the device has no last_seen_ts, so Synapse's
  `delete_stale_devices_after` never prunes it;
- e7. an encrypted group room (alice, bob, the bot): chatter is decrypted and ignored (no reply,
  no provider call, no request_log row); `grok: ...` with m.mentions and `Grok, ...` are each
  answered once, encrypted, and alice and bob both decrypt both answers (runs before e5);
- e8. the crypto store is lost (moved away while the bot is stopped): a WARN naming the old
  device, a new device (crypto_devices, /keys/query) and the old one deleted, a new
  cross-signing identity signing it,
  and alice decrypts the new device's answer once her client trusts it (on first use);
- e10. the bot's device is deleted on the homeserver while the bot runs: the bot notices through
  its /sync (no restart), WARNs, makes a new device signed by its unchanged cross-signing
  identity, and alice decrypts the new device's answer;
- e13. (runs after e11) frank, invited to an encrypted room but not yet joined when the bot
  answers there, joins and decrypts that answer (the bot shares room keys with invitees);
- e11. (runs after e3) an image in the DM, its attachment encrypted by alice's client as Element
  does: the model gets the decrypted image and caption, and alice decrypts the answer;
- e12. (last) with `reply.streaming` the answer is one encrypted message and encrypted edits
  that alice decrypts, the last one the whole answer.

The replica side of encryption (two replicas sharing one store, the lease, kill -9 failover) is
tests/e2e/encryption_replicas.py.

matrix-nio runs from the Synapse virtualenv (scripts/synapse-venv; E2E_VENV picks its place):
when this interpreter cannot import nio, the script installs matrix-nio[e2e] there if needed
(NIO_SPEC overrides the pinned version) and runs itself again with the venv's python.
GROK_APPSERVICE_BIN=path uses that binary instead of `cargo build`; KEEP=1 keeps the temp dir
(it is also kept when a check fails; nio's own log is nio.log there).
The last line is `encryption: N passed, M failed`; the exit code is non-zero if any failed.
"""

import asyncio
import base64
import json
import logging
import os
import secrets
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts"))
import e2e_lib as L  # noqa: E402

try:
    import nio  # noqa: E402
    import vodozemac  # noqa: E402
except ImportError:
    # Not the venv's interpreter (or nio is missing there): install it, then run under it.
    L.run_under_nio(__file__)

BOT = L.BOT_ID
API_KEY = "e2e-dummy-key"
REPLY_TIMEOUT = 90  # generous: the first encrypted answer also sets up Olm sessions
QUIET_WAIT = 3
KEY_WAIT_S = 8
START_TIMEOUT = 120  # start-up creates the device and its cross-signing keys
MEGOLM = "m.megolm.v1.aes-sha2"
PASSWORD = "e2e-password-" + secrets.token_hex(4)

results = []  # (name, ok, detail)


def report(name, problems, info=""):
    """Records a check: it passes when `problems` is empty."""
    ok = not problems
    detail = "; ".join(problems) if problems else info
    results.append((name, ok, detail))
    L.log(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""))


def secret_word():
    """A word that occurs nowhere by chance: the log and database checks look for it."""
    return "qz" + secrets.token_hex(6)


def b64(n):
    """`n` random bytes as unpadded base64, the way Matrix writes keys and ciphertexts."""
    return base64.b64encode(secrets.token_bytes(n)).decode().rstrip("=")


# ---------------------------------------------------------------------------------------------
# One E2EE device, driven synchronously


class Device:
    """A nio AsyncClient with its own store directory (one Matrix device), driven synchronously:
    each call runs the shared event loop until the request is done. Timeline events are kept as
    dicts like the client-server API's; encrypted ones are decrypted when their room key is
    there, retried after every sync (a key may arrive after its message)."""

    def __init__(self, loop, homeserver, user_id, store_dir, name):
        os.makedirs(store_dir, exist_ok=True)
        config = nio.AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True)
        self.loop, self.user_id, self.name = loop, user_id, name
        self.client = nio.AsyncClient(homeserver, user_id, store_path=store_dir, config=config)
        self.events = {}  # event_id -> {event_id, room_id, sender, type, content, wire, ...}
        self.undecrypted = {}  # event_id -> MegolmEvent still without its room key
        self.client.add_event_callback(self._on_event, nio.Event)
        self._synced = False

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    @property
    def device_id(self):
        return self.client.device_id

    def login(self, password=PASSWORD):
        resp = self.run(self.client.login(password, device_name=self.name))
        if not isinstance(resp, nio.LoginResponse):
            raise RuntimeError(f"{self.name}: login failed: {resp}")
        if self.client.should_upload_keys:
            up = self.run(self.client.keys_upload())
            if not isinstance(up, nio.KeysUploadResponse):
                raise RuntimeError(f"{self.name}: keys upload failed: {up}")
        self.sync(0)
        return self

    def close(self):
        try:
            self.run(self.client.close())
        except Exception:
            pass

    # --- events ---
    def _record(self, event, wire):
        src = dict(event.source)
        src.setdefault("event_id", event.event_id)
        src.setdefault("sender", event.sender)
        src["room_id"] = getattr(event, "room_id", None) or src.get("room_id")
        src["wire"] = wire  # the type the server carried: m.room.encrypted or the plain type
        src["session_id"] = getattr(event, "session_id", None)  # the Megolm session, if encrypted
        self.events[event.event_id] = src

    def _on_event(self, room, event):
        if isinstance(event, nio.MegolmEvent):
            event.room_id = room.room_id
            self.undecrypted[event.event_id] = event
            self._record(event, "m.room.encrypted")
        elif getattr(event, "event_id", None):
            event.room_id = room.room_id
            self._record(event, "m.room.encrypted" if getattr(event, "decrypted", False) else
                         event.source.get("type"))

    def _retry_decrypt(self):
        for event_id, event in list(self.undecrypted.items()):
            try:
                plain = self.client.decrypt_event(event)
            except nio.EncryptionError:
                continue
            if isinstance(plain, nio.Event) and not isinstance(plain, (nio.BadEvent, nio.UnknownBadEvent)):
                plain.room_id = event.room_id
                self._record(plain, "m.room.encrypted")
                del self.undecrypted[event_id]

    def sync(self, timeout_ms=1000):
        """One /sync, then what nio's sync_forever does between syncs: to-device messages out,
        key upload, query and claim when due; then undecrypted events are retried."""
        resp = self.run(self.client.sync(timeout=timeout_ms, full_state=not self._synced))
        if not isinstance(resp, nio.SyncResponse):
            raise RuntimeError(f"{self.name}: sync failed: {resp}")
        self._synced = True
        self.run(self.client.send_to_device_messages())
        if self.client.should_upload_keys:
            self.run(self.client.keys_upload())
        if self.client.should_query_keys:
            self.run(self.client.keys_query())
        if self.client.should_claim_keys:
            self.run(self.client.keys_claim(self.client.get_users_for_key_claiming()))
        self._retry_decrypt()

    def wait(self, fn, timeout):
        """Syncs until `fn()` is truthy (returned) or `timeout` seconds pass (None)."""
        return L.wait_until(fn, timeout, pause=lambda: self.sync(1000))

    def decrypted(self, room_id):
        """The room's events this device could read (decrypted or plain), oldest first."""
        return sorted((e for e in self.events.values() if e["room_id"] == room_id
                       and e.get("type") != "m.room.encrypted"),
                      key=lambda e: e.get("origin_server_ts", 0))

    def replies(self, room_id, event_id, sender=BOT):
        """Readable m.room.message events by `sender` replying to `event_id` (nio copies an
        m.relates_to sent in the clear into the decrypted content, so either place counts)."""
        return [e for e in self.decrypted(room_id) if e.get("sender") == sender
                and e.get("type") == "m.room.message" and L.in_reply_to(e) == event_id]

    def wait_reply(self, room_id, event_id, timeout=REPLY_TIMEOUT, sender=BOT):
        found = self.wait(lambda: self.replies(room_id, event_id, sender), timeout)
        return found[0] if found else None

    # --- devices and trust ---
    def devices_of(self, user_id):
        """{device_id: OlmDevice} that this device knows for `user_id` (its own excluded)."""
        return {d.id: d for d in self.client.device_store.active_user_devices(user_id)
                if not (user_id == self.user_id and d.id == self.device_id)}

    def trust(self, user_ids):
        """Trust on first use: marks every known device of `user_ids` verified."""
        for user_id in user_ids:
            for device in self.devices_of(user_id).values():
                if not self.client.olm.is_device_verified(device):
                    self.client.verify_device(device)

    # --- rooms ---
    def create_encrypted_room(self, invite=(), is_direct=False, name=None):
        resp = self.run(self.client.room_create(
            name=name, is_direct=is_direct, invite=list(invite),
            preset=nio.RoomPreset.trusted_private_chat if is_direct else nio.RoomPreset.private_chat,
            initial_state=[{"type": "m.room.encryption", "state_key": "",
                            "content": {"algorithm": MEGOLM}}]))
        if not isinstance(resp, nio.RoomCreateResponse):
            raise RuntimeError(f"{self.name}: createRoom failed: {resp}")
        room = resp.room_id
        if not self.wait(lambda: room in self.client.rooms and self.client.rooms[room].encrypted, 30):
            raise RuntimeError(f"{self.name}: room {room} not synced as encrypted within 30s")
        return room

    def join(self, room_id):
        resp = self.run(self.client.join(room_id))
        if not isinstance(resp, nio.JoinResponse):
            raise RuntimeError(f"{self.name}: join failed: {resp}")
        self.wait(lambda: room_id in self.client.rooms, 30)

    def send(self, room_id, content):
        """Sends `content` as an m.room.message, encrypted by nio in an encrypted room, after
        trusting (on first use) every device of the room's members; returns the event id."""
        members = list(self.client.rooms[room_id].users)
        for attempt in range(3):
            self.trust(members)
            try:
                resp = self.run(self.client.room_send(room_id, "m.room.message", content))
            except nio.OlmUnverifiedDeviceError:
                # room_send queried keys and met a device seen for the first time: trust it too.
                if attempt == 2:
                    raise
                continue
            if not isinstance(resp, nio.RoomSendResponse):
                raise RuntimeError(f"{self.name}: send failed: {resp}")
            return resp.event_id

    def say(self, room_id, body):
        return self.send(room_id, {"msgtype": "m.text", "body": body})

    def plain_client(self):
        """The harness's plain HTTP client with this device's access token."""
        return L.Client(self.client.homeserver, self.client.access_token, self.user_id)


# ---------------------------------------------------------------------------------------------
# Cross-signing


def canonical(obj):
    """Matrix canonical JSON of a signed object (without `signatures` and `unsigned`)."""
    obj = {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signed_by(obj, user_id, key_id, public_key):
    """True when `obj` carries a valid ed25519 signature by `public_key` under `key_id`."""
    sig = ((obj.get("signatures") or {}).get(user_id) or {}).get(key_id)
    if not sig or not public_key:
        return False
    try:
        vodozemac.Ed25519PublicKey.from_base64(public_key).verify_signature(
            canonical(obj), vodozemac.Ed25519Signature.from_base64(sig))
        return True
    except Exception:
        return False


def only_key(cross_key):
    """(key id, public key) of a cross-signing key object with one ed25519 key."""
    keys = (cross_key or {}).get("keys") or {}
    return next(iter(keys.items()), (None, None))


def bot_keys(client):
    """POST /keys/query for the bot, as `client` (a plain L.Client) sees it."""
    return client.call("POST", "/keys/query", {"device_keys": {BOT: []}})


# ---------------------------------------------------------------------------------------------
# Diagnosis of a missing reply


def reply_diagnosis(dev, room, question):
    """Why `dev` has no readable bot reply to `question`, as precisely as the room shows."""
    server = dev.plain_client()
    notes = []
    try:
        raw = [e for e in server.messages(room, limit=100) if e.get("sender") == BOT]
    except L.HttpError as e:
        return f"(could not read the room: {e})"
    replying = [e for e in raw if L.in_reply_to(e) == question]
    plain = [e for e in raw if e.get("type") == "m.room.message"]
    if plain:
        notes.append(f"the bot sent {len(plain)} UNENCRYPTED m.room.message event(s) in the encrypted room "
                     f"(e.g. {json.dumps(plain[-1].get('content'))[:200]})")
    enc = [e for e in raw if e.get("type") == "m.room.encrypted"]
    if enc:
        stuck = [e for e in enc if e["event_id"] in dev.undecrypted]
        notes.append(f"the bot sent {len(enc)} m.room.encrypted event(s), {len(replying)} replying to the "
                     f"question in the clear; {dev.name} cannot decrypt {len(stuck)} of them (sessions "
                     f"{sorted({e['content'].get('session_id', '?')[:12] for e in stuck})}, no room key "
                     f"received for {dev.name} {dev.device_id})")
    if not raw:
        notes.append("the bot sent nothing at all in the room")
    return "; ".join(notes)


# ---------------------------------------------------------------------------------------------
# Scenarios


class Ctx:
    def __init__(self, stack, synapse, loop, fake=None, bot=None):
        self.stack, self.synapse, self.loop, self.fake, self.bot = stack, synapse, loop, fake, bot
        self.devices = []
        self.dm = None
        self.alice = self.alice2 = self.bob = None
        self.words = []  # the random words of every question sent to the bot
        self.questions = []  # their event ids
        self.answers = []  # texts of the bot's decrypted answers
        self.passphrase = "e2e-crypto-" + secrets.token_hex(12)
        self.bot_env = {"GROK_CRYPTO_PASSPHRASE": self.passphrase,
                        "RUST_LOG": "grok_appservice=debug,info"}
        # store_text: the bot keeps plaintext rooms' questions, never encrypted ones' (e5).
        self.bot_config = {"encryption": {"enabled": True, "store_path": stack.path("crypto"),
                                          "key_wait": f"{KEY_WAIT_S}s"},
                           "telemetry": {"enabled": True, "store_text": True}}
        self.bot_device = None  # (device id, ed25519) before the restart
        self.megolm_session = None  # the session of the bot's first encrypted answer
        self.master_key = None  # the bot's master key before the restart

    def device(self, localpart, name):
        dev = Device(self.loop, self.synapse.url, f"@{localpart}:{L.SERVER_NAME}",
                     self.stack.path("nio", f"{localpart}-{name}"), name).login()
        self.devices.append(dev)
        return dev

    def ask(self, dev, question, room=None):
        """`dev` asks `question` in `room` (the DM by default) behind a fresh secret word, which
        e5 looks for where no plaintext may be; returns (event id, word)."""
        word = secret_word()
        self.words.append(word)
        q_id = dev.say(room or self.dm, f"{word}: {question}")
        self.questions.append(q_id)
        return q_id, word

    def provider_calls(self):
        return [r for r in self.fake.snapshot() if r["path"].rstrip("/") == "/v1/responses"]


def scenario_harness(ctx):
    """e0. Two nio users exchange encrypted messages through Synapse, no bot involved: proves
    login, key upload, room creation with encryption, trust and decryption in the harness."""
    name = "e0. harness: two E2EE clients exchange encrypted messages"
    ctx.synapse.register("carol", PASSWORD)
    ctx.synapse.register("dave", PASSWORD)
    carol, dave = ctx.device("carol", "carol-1"), ctx.device("dave", "dave-1")
    room = carol.create_encrypted_room(invite=[dave.user_id], name="e2e harness")
    dave.join(room)
    problems = []
    if not carol.wait(lambda: dave.device_id in carol.devices_of(dave.user_id), 30):
        problems.append("carol never learnt dave's device keys")
    w1, w2 = secret_word(), secret_word()
    e1 = carol.say(room, f"hello dave {w1}")
    got1 = dave.wait(lambda: [e for e in dave.decrypted(room) if e["event_id"] == e1], 30)
    if not got1:
        problems.append(f"dave could not decrypt carol's message ({len(dave.undecrypted)} undecrypted)")
    elif w1 not in got1[0]["content"].get("body", "") or got1[0]["wire"] != "m.room.encrypted":
        problems.append(f"dave read {got1[0]} for carol's message")
    e2 = dave.send(room, {"msgtype": "m.text", "body": f"hi carol {w2}",
                          "m.relates_to": {"m.in_reply_to": {"event_id": e1}}})
    got2 = carol.wait(lambda: [e for e in carol.decrypted(room) if e["event_id"] == e2], 30)
    if not got2:
        problems.append(f"carol could not decrypt dave's reply ({len(carol.undecrypted)} undecrypted)")
    elif L.in_reply_to(got2[0]) != e1:
        problems.append(f"dave's decrypted reply does not relate to carol's message: {got2[0].get('content')}")
    raw = carol.plain_client().get_event(room, e1)
    if raw.get("type") != "m.room.encrypted" or w1 in json.dumps(raw):
        problems.append(f"the server holds carol's message as {raw.get('type')} (plaintext visible: {w1 in json.dumps(raw)})")
    report(name, problems, "encrypted both ways, decrypted both ways, the reply relation read")


def scenario_dm(ctx):
    """e1. An encrypted direct chat with the bot: one encrypted reply alice decrypts."""
    name = "e1. encrypted DM: the bot's answer is encrypted and alice decrypts it"
    alice = ctx.alice
    ctx.dm = alice.create_encrypted_room(invite=[BOT], is_direct=True)
    server = alice.plain_client()
    if not server.wait_joined(ctx.dm, BOT, 30):
        return report(name, [f"the bot did not join the encrypted DM within 30s "
                             f"(membership {server.membership(ctx.dm, BOT)})"])
    problems = []
    bot_devs = alice.wait(lambda: alice.devices_of(BOT), 30)
    if not bot_devs:
        return report(name, ["alice sees no device of the bot after 30s (did it upload device keys?)"])
    if len(bot_devs) != 1:
        problems.append(f"the bot has {len(bot_devs)} devices ({sorted(bot_devs)}), want 1")
    dev = next(iter(bot_devs.values()))
    ctx.bot_device = (dev.id, dev.ed25519)
    before = len(ctx.provider_calls())
    word = secret_word()
    ctx.words.append(word)
    question = f"{word}: what is the capital of Peru?"
    q_id = alice.say(ctx.dm, question)
    ctx.questions.append(q_id)
    reply = alice.wait_reply(ctx.dm, q_id)
    if not reply:
        return report(name, problems + [f"no readable bot reply within {REPLY_TIMEOUT}s: "
                                        + reply_diagnosis(alice, ctx.dm, q_id)])
    body = reply["content"].get("body", "")
    ctx.answers.append(body)
    ctx.megolm_session = reply.get("session_id")
    # Read once the bot answered (it is surely cross-signed by then), for e6 after the restart.
    ctx.master_key = only_key((bot_keys(server).get("master_keys") or {}).get(BOT))[1]
    if reply["wire"] != "m.room.encrypted":
        problems.append(f"the reply reached alice as {reply['wire']}, want m.room.encrypted")
    if "[offline fake xAI]" not in body:
        problems.append(f"the decrypted reply does not carry the fake's answer: {body[:200]!r}")
    raw = server.get_event(ctx.dm, reply["event_id"])
    if raw.get("type") != "m.room.encrypted":
        problems.append(f"the server holds the reply as {raw.get('type')}, want m.room.encrypted")
    alice.wait(lambda: False, QUIET_WAIT)  # a duplicate would show up right behind the first
    n = len(alice.replies(ctx.dm, q_id))
    if n != 1:
        problems.append(f"{n} readable bot replies, want 1")
    calls = ctx.provider_calls()[before:]
    if len(calls) != 1:
        problems.append(f"the provider got {len(calls)} requests, want 1")
    elif question not in json.dumps(calls[0]["body"].get("input"), ensure_ascii=False):
        problems.append(f"the provider's input lacks the decrypted question: {json.dumps(calls[0]['body'].get('input'))[:300]}")
    report(name, problems, f"bot device {dev.id}; reply {reply['event_id']} decrypted: {body[:80]!r}")


def moved_aside(ctx):
    """Crypto store directories the bot moved aside (<store_path>.replaced-*)."""
    store = ctx.bot_config["encryption"]["store_path"]
    parent, base = os.path.dirname(store), os.path.basename(store)
    return [n for n in os.listdir(parent) if n.startswith(base + ".replaced-")]


def scenario_restart(ctx):
    """e2. After a restart on the same store: the same single device, still answered."""
    name = "e2. after a restart the bot keeps its device and answers encrypted"
    if not ctx.dm:
        return report(name, ["skipped: no encrypted DM (e1 failed)"])
    alice, bot = ctx.alice, ctx.bot
    aside = set(moved_aside(ctx))
    bot.restart(API_KEY, extra_config=ctx.bot_config, timeout=START_TIMEOUT, extra_env=ctx.bot_env)
    problems = []
    earlier = list(ctx.words)
    before = len(ctx.provider_calls())
    q_id, word = ctx.ask(alice, "and the capital of Chile?")
    reply = alice.wait_reply(ctx.dm, q_id)
    # The conversation so far is read back from the room (after the restart: nothing cached)
    # and decrypted, so the provider sees the first question as context.
    inputs = [json.dumps(c["body"].get("input"), ensure_ascii=False)
              for c in ctx.provider_calls()[before:]]
    asked = [i for i in inputs if word in i]
    if not asked:
        problems.append(f"no provider request carries the decrypted question ({len(inputs)} requests)")
    elif earlier and not all(w in asked[0] for w in earlier):
        problems.append("the provider's input lacks the earlier (encrypted) question as context: "
                        + asked[0][:300])
    if not reply:
        problems.append(f"no readable reply after the restart within {REPLY_TIMEOUT}s: "
                        + reply_diagnosis(alice, ctx.dm, q_id))
    else:
        ctx.answers.append(reply["content"].get("body", ""))
        if reply["wire"] != "m.room.encrypted":
            problems.append(f"the reply reached alice as {reply['wire']}")
        elif ctx.megolm_session and reply.get("session_id") != ctx.megolm_session:
            problems.append(f"the reply is encrypted with a new Megolm session ({reply.get('session_id')}, "
                            f"before the restart {ctx.megolm_session}): the outbound session did not survive")
    # Checked once answered (the device is loaded after /ready): still the one device, same keys.
    devices = (bot_keys(alice.plain_client()).get("device_keys") or {}).get(BOT) or {}
    if ctx.bot_device and list(devices) != [ctx.bot_device[0]]:
        problems.append(f"after the restart the bot's devices are {sorted(devices)}, "
                        f"want only {ctx.bot_device[0]} (the crypto store was not reused?)")
    elif ctx.bot_device:
        key = (devices[ctx.bot_device[0]].get("keys") or {}).get(f"ed25519:{ctx.bot_device[0]}")
        if key != ctx.bot_device[1]:
            problems.append("the bot's device has a new ed25519 key after the restart")
    if set(moved_aside(ctx)) - aside:
        problems.append(f"the restart moved the crypto store aside: {sorted(set(moved_aside(ctx)) - aside)}")
    report(name, problems, f"same device {ctx.bot_device and ctx.bot_device[0]}; reply "
                           f"{reply and reply['event_id']} decrypted; the earlier question decrypted "
                           f"into its context")


def scenario_second_device(ctx):
    """e3. A device alice adds later decrypts the bot's next answer."""
    name = "e3. alice's second device decrypts the bot's later answer"
    if not ctx.dm:
        return report(name, ["skipped: no encrypted DM (e1 failed)"])
    alice = ctx.alice
    alice2 = ctx.alice2 = ctx.device("alice", "alice-2")
    problems = []
    if not alice2.wait(lambda: ctx.dm in alice2.client.rooms and alice2.devices_of(BOT), 30):
        return report(name, ["alice's second device does not see the DM or the bot's device within 30s"])
    # The device-list change reached the server's other users: alice's first device learns it
    # through its own /sync. A little more time for the bot's /sync, which sees the same change.
    if not alice.wait(lambda: alice2.device_id in alice.devices_of(alice.user_id), 30):
        problems.append("alice's first device never learnt of the second (device_lists.changed)")
    alice.wait(lambda: False, QUIET_WAIT)
    # Sent from the first device: the bot hears nothing from the new one but the device list.
    q_id, _ = ctx.ask(alice, "and the capital of Bolivia?")
    first = alice.wait_reply(ctx.dm, q_id)
    if not first:
        problems.append(f"the first device got no readable reply within {REPLY_TIMEOUT}s: "
                        + reply_diagnosis(alice, ctx.dm, q_id))
    reply = alice2.wait_reply(ctx.dm, q_id, timeout=REPLY_TIMEOUT if not first else 30)
    if not reply:
        problems.append(f"the second device ({alice2.device_id}) cannot read the bot's reply: "
                        + reply_diagnosis(alice2, ctx.dm, q_id))
    else:
        ctx.answers.append(reply["content"].get("body", ""))
    report(name, problems, f"device {alice2.device_id} decrypted reply {reply and reply['event_id']}")


def scenario_image(ctx):
    """e11. An image in the encrypted DM, its attachment encrypted by the client (nio, as
    Element does): the bot decrypts the event and the attachment, the model gets the plaintext
    image with its caption, and alice decrypts the answer."""
    name = "e11. encrypted image: the model gets the decrypted image, alice decrypts the answer"
    if not ctx.dm:
        return report(name, ["skipped: no encrypted DM (e1 failed)"])
    alice = ctx.alice
    image = b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(3000)
    upload, keys = alice.run(alice.client.upload(lambda *_: image, content_type="image/png",
                                                 filename="photo.png", encrypt=True,
                                                 filesize=len(image)))
    if not isinstance(upload, nio.UploadResponse):
        return report(name, [f"alice's encrypted upload failed: {upload}"])
    word = secret_word()
    ctx.words.append(word)
    caption = f"{word}: what is in this picture?"
    content = {"msgtype": "m.image", "body": caption, "filename": "photo.png",
               "info": {"mimetype": "image/png", "size": len(image)},
               "file": {"url": upload.content_uri, **{k: keys[k] for k in ("key", "iv", "hashes", "v")}}}
    before = len(ctx.provider_calls())
    q_id = alice.send(ctx.dm, content)
    ctx.questions.append(q_id)
    reply = alice.wait_reply(ctx.dm, q_id)
    problems = []
    if not reply:
        problems.append(f"no readable reply within {REPLY_TIMEOUT}s: " + reply_diagnosis(alice, ctx.dm, q_id))
    elif reply["wire"] != "m.room.encrypted":
        problems.append(f"the reply reached alice as {reply['wire']}")
    inputs = [json.dumps(c["body"].get("input"), ensure_ascii=False) for c in ctx.provider_calls()[before:]]
    encoded = base64.b64encode(image).decode()
    with_image = [i for i in inputs if f"data:image/png;base64,{encoded}" in i]
    if not with_image:
        problems.append(f"no provider request carries the decrypted image ({len(inputs)} requests"
                        + (f"; the first: {inputs[0][:200]}" if inputs else "") + ")")
    elif caption not in with_image[0]:
        problems.append("the provider request with the image lacks its decrypted caption")
    report(name, problems, f"{len(image)}-byte encrypted attachment decrypted for the model; reply "
                           f"{reply and reply['event_id']} decrypted")


def keyless_events(dev, room, n=2):
    """Sends `n` well-formed Megolm messages as `dev` (its device id and curve25519 key) from a
    session whose key is never shared: what a sender whose keys never arrive looks like."""
    session = vodozemac.GroupSession()
    sender_key = dev.client.olm.account.identity_keys["curve25519"]
    server, ids = dev.plain_client(), []
    for i in range(n):
        plain = json.dumps({"type": "m.room.message", "room_id": room,
                            "content": {"msgtype": "m.text", "body": f"grok: a question you cannot read ({i})"}})
        ids.append(server.send(room, {"algorithm": MEGOLM, "sender_key": sender_key,
                                      "device_id": dev.device_id, "session_id": session.session_id,
                                      "ciphertext": session.encrypt(plain.encode()).to_base64()},
                               event_type="m.room.encrypted"))
    return ids


def malformed_event(dev, room):
    """An m.room.encrypted event whose ciphertext is random base64, not a Megolm message."""
    return dev.plain_client().send(room, {"algorithm": MEGOLM, "ciphertext": b64(150), "sender_key": b64(32),
                                          "device_id": dev.device_id, "session_id": b64(32)},
                                   event_type="m.room.encrypted")


def bot_notices(dev, room, event_ids):
    return [e for e in dev.decrypted(room) if e.get("sender") == BOT and L.in_reply_to(e) in event_ids]


def skip_row_problems(bot, event_ids):
    """What is wrong with the request_log rows of undecryptable events (one each, encrypted_room)."""
    problems = []
    L.wait_until(lambda: all(bot.request_log(e) for e in event_ids), 30, 0.5)
    for i, event_id in enumerate(event_ids):
        r = bot.request_log(event_id)
        if len(r) != 1:
            problems.append(f"{len(r)} request_log rows for event {i + 1} ({event_id}), want 1")
        elif (r[0]["degraded"], r[0]["route"]) != ("encrypted_room", "none"):
            problems.append(f"event {i + 1}'s row has degraded={r[0]['degraded']!r} "
                            f"route={r[0]['route']!r}, want encrypted_room / none")
    return problems


def notice_problems(notice):
    problems = []
    if notice["content"].get("msgtype") != "m.notice":
        problems.append(f"the notice's msgtype is {notice['content'].get('msgtype')!r}, want m.notice")
    if notice["wire"] != "m.room.encrypted":
        problems.append(f"the notice reached alice as {notice['wire']}, want m.room.encrypted")
    return problems


def scenario_no_key(ctx):
    """e4. Room keys that never arrive: one notice per room after key_wait, a skip row each.

    The events are real Megolm messages of a session nobody receives the key of (random
    ciphertext is not a Megolm message at all: e4b)."""
    name = "e4. messages whose room key never arrives: one notice after key_wait, encrypted_room rows"
    if not ctx.dm:
        return report(name, ["skipped: no encrypted DM (e1 failed)"])
    alice = ctx.alice
    before = len(ctx.provider_calls())
    sent_at = time.time()
    events = keyless_events(alice, ctx.dm, 2)
    timeout = 2 * KEY_WAIT_S + REPLY_TIMEOUT
    alice.wait(lambda: bot_notices(alice, ctx.dm, events), timeout)
    problems = skip_row_problems(ctx.bot, events)
    alice.wait(lambda: False, QUIET_WAIT + 2)  # a second notice would come right behind
    found = bot_notices(alice, ctx.dm, events)
    delay = found[0].get("origin_server_ts", 0) / 1000 - sent_at if found else None
    if not found:
        problems.append(f"no readable notice replying to either event within {timeout}s: "
                        + reply_diagnosis(alice, ctx.dm, events[0]))
    else:
        problems += notice_problems(found[0])
        if len(found) != 1:
            problems.append(f"{len(found)} notices for two undecryptable events in one room, want 1")
        if delay < KEY_WAIT_S - 1:
            problems.append(f"the notice came {delay:.1f}s after the events, before key_wait ({KEY_WAIT_S}s)")
    if len(ctx.provider_calls()) != before:
        problems.append(f"the provider got {len(ctx.provider_calls()) - before} requests, want 0")
    shown = (f"one notice {delay:.1f}s after the events: {found[0]['content'].get('body', '')[:80]!r}; "
             if found else "")
    report(name, problems, shown + "both rows degraded=encrypted_room")


def scenario_malformed(ctx):
    """e4b. The same for an event whose ciphertext is random: a notice (no key could ever help,
    so no wait is required of it) and an encrypted_room row. In a room of its own, as the
    notice is once per room."""
    name = "e4b. a malformed encrypted message: a notice and an encrypted_room row"
    if not ctx.dm:
        return report(name, ["skipped: no encrypted DM (e1 failed)"])
    alice = ctx.alice
    room = alice.create_encrypted_room(invite=[BOT], is_direct=True)
    if not alice.plain_client().wait_joined(room, BOT, 30):
        return report(name, ["the bot did not join the second encrypted DM within 30s"])
    alice.wait(lambda: False, 1)
    sent_at = time.time()
    event = malformed_event(alice, room)
    alice.wait(lambda: bot_notices(alice, room, [event]), KEY_WAIT_S + REPLY_TIMEOUT)
    problems = skip_row_problems(ctx.bot, [event])
    found = bot_notices(alice, room, [event])
    if not found:
        problems.append(f"no readable notice within {KEY_WAIT_S + REPLY_TIMEOUT}s: "
                        + reply_diagnosis(alice, room, event))
    else:
        problems += notice_problems(found[0])
    delay = found[0].get("origin_server_ts", 0) / 1000 - sent_at if found else None
    report(name, problems, f"notice {delay:.1f}s after the event; row degraded=encrypted_room" if found else "")


def sqlite_bytes(db):
    """The raw bytes of a SQLite database and its WAL, where recent writes still sit."""
    out = b""
    for suffix in ("", "-wal"):
        if os.path.exists(db + suffix):
            with open(db + suffix, "rb") as f:
                out += f.read()
    return out


def scenario_logs(ctx):
    """e5. What must never be written in clear: the questions, the answers, the passphrase."""
    name = "e5. no plaintext in the bot's log or on the homeserver, no passphrase in the log"
    if not ctx.words:
        return report(name, ["skipped: no question was sent"])
    problems = []
    with open(ctx.stack.logs["bot"], "rb") as f:
        bot_log = f.read()
    n_debug = bot_log.count(b" DEBUG ")
    if n_debug == 0:
        problems.append("the bot's log has no DEBUG line: RUST_LOG=grok_appservice=debug did not apply, "
                        "so the check proves little")
    if not any(q.encode() in bot_log for q in ctx.questions):
        problems.append("the bot's log names none of the questions' event ids: is it the log of the "
                        "process that answered them?")
    for word in ctx.words:
        if word.encode() in bot_log:
            at = bot_log.index(word.encode())
            line = bot_log[bot_log.rfind(b"\n", 0, at) + 1: bot_log.find(b"\n", at)]
            problems.append(f"a question's word {word} is in the bot's log: {line.decode(errors='replace')[:300]}")
    if ctx.passphrase.encode() in bot_log:
        problems.append("the crypto passphrase is in the bot's log")
    # The fake's answers echo the question: in Synapse's database either means plaintext on the
    # wire. A control word sent unencrypted shows the scan sees what Synapse stored.
    server = ctx.alice.plain_client()
    control = secret_word()
    server.say(server.create_room(name="e2e plaintext control"), f"control {control}")
    db = ctx.synapse.config.replace("homeserver.yaml", "homeserver.db")
    stored = L.wait_until(lambda: (lambda b: b if control.encode() in b else None)(sqlite_bytes(db)), 10, 0.5)
    if stored is None:
        stored = sqlite_bytes(db)
        problems.append("a plaintext control message is not visible in Synapse's database files: "
                        "the scan proves nothing")
    leaked = [w for w in ctx.words if w.encode() in stored]
    if leaked:
        problems.append(f"Synapse's database holds the plaintext of {leaked} (a message sent unencrypted)")
    if b"[offline fake xAI]" in stored:
        problems.append("Synapse's database holds an answer's plaintext")
    problems += bot_database_problems(ctx, server)
    report(name, problems, f"{len(ctx.words)} question words, {n_debug} debug lines, "
                           f"{len(bot_log)} bytes of log, {len(stored)} bytes of homeserver database, "
                           "and the bot's database checked")


def bot_database_problems(ctx, server):
    """The bot's own database (file and WAL) holds no question or answer of an encrypted room,
    though the run sets telemetry.store_text (which keeps plaintext rooms' questions): a
    plaintext question to the bot, which must show up there, proves the scan sees its writes."""
    room = server.create_room(invite=[BOT], is_direct=True, name="e2e plaintext control for the bot")
    if not server.wait_joined(room, BOT, 30):
        return ["the bot did not join the plaintext control DM within 30s"]
    control = secret_word()
    server.say(room, f"control {control}: what is the capital of France?")

    stored = L.wait_until(lambda: (lambda b: b if control.encode() in b else None)(sqlite_bytes(ctx.bot.db)),
                          30, 0.5)
    if stored is None:
        return ["a plaintext question to the bot never showed up in its database (telemetry.store_text): "
                "the scan proves nothing"]
    leaked = [w for w in ctx.words if w.encode() in stored]
    return [f"the bot's database holds the plaintext of encrypted questions or answers: {leaked}"] if leaked else []


def scenario_cross_signing(ctx):
    """e6. The bot's device is cross-signed and its identity outlived the restart."""
    name = "e6. the bot's device is cross-signed"
    server = (ctx.alice.plain_client() if ctx.alice else ctx.synapse.register("erin"))
    keys = bot_keys(server)
    problems = []
    master = (keys.get("master_keys") or {}).get(BOT)
    ssk = (keys.get("self_signing_keys") or {}).get(BOT)
    devices = (keys.get("device_keys") or {}).get(BOT) or {}
    m_id, m_pub = only_key(master)
    s_id, s_pub = only_key(ssk)
    if not master or "master" not in (master.get("usage") or []):
        problems.append(f"no master key published for the bot: {json.dumps(master)[:200]}")
    if not ssk or "self_signing" not in (ssk.get("usage") or []):
        problems.append(f"no self-signing key published for the bot: {json.dumps(ssk)[:200]}")
    elif not signed_by(ssk, BOT, m_id, m_pub):
        problems.append("the self-signing key is not validly signed by the master key")
    if len(devices) != 1:
        problems.append(f"the bot has {len(devices)} devices {sorted(devices)}, want 1")
    for device_id, dev in devices.items():
        if not signed_by(dev, BOT, f"ed25519:{device_id}", (dev.get("keys") or {}).get(f"ed25519:{device_id}")):
            problems.append(f"device {device_id} is not validly self-signed")
        if s_id and not signed_by(dev, BOT, s_id, s_pub):
            sigs = sorted(((dev.get("signatures") or {}).get(BOT) or {}))
            problems.append(f"device {device_id} carries no valid self-signing signature (signatures: {sigs})")
    if ctx.master_key and m_pub and m_pub != ctx.master_key:
        problems.append("the bot's master key changed across the restart")
    # Never pruned: Synapse's delete_stale_devices_after deletes devices whose last_seen is
    # older than its limit; a device the appservice made has none (with Synapse's default
    # track_appservice_user_ips: false), so it is never among them (README "Stale devices").
    as_client = L.Client(ctx.synapse.url, ctx.bot.reg["as_token"], BOT)
    seen = {d: as_client.call("GET", f"/devices/{L.q(d)}", params={"user_id": BOT}).get("last_seen_ts")
            for d in devices}
    if any(ts is not None for ts in seen.values()):
        problems.append(f"the bot's device has a last_seen_ts ({seen}): delete_stale_devices_after "
                        "could prune it")
    report(name, problems, f"master {m_pub and m_pub[:10]}…, self-signing {s_pub and s_pub[:10]}…, "
                           f"device {', '.join(devices)} signed by both, never seen (unprunable)")


# ---------------------------------------------------------------------------------------------
# e7: an encrypted group room


def bot_messages(dev, room):
    """The bot's readable m.room.message events in the room, oldest first."""
    return [e for e in dev.decrypted(room) if e.get("sender") == BOT and e.get("type") == "m.room.message"]


def unexpected_bot_messages(dev, room, questions):
    """Bot messages that are neither a reply to one of `questions` nor an edit of such a reply."""
    replies = {e["event_id"] for e in bot_messages(dev, room) if L.in_reply_to(e) in questions}
    out = []
    for e in bot_messages(dev, room):
        rel = L.relates_to(e)
        if e["event_id"] in replies or (rel.get("rel_type") == "m.replace" and rel.get("event_id") in replies):
            continue
        out.append(e)
    return out


def group_room_problems(ctx, room, members):
    """Waits until the bot has recorded the room as a group (not direct) with `members` joined."""
    def recorded():
        rows = ctx.bot.query("SELECT r.is_direct, (SELECT count(*) FROM room_members m WHERE m.room_id = "
                             "r.room_id) AS n FROM rooms r WHERE r.room_id = ?", (room,))
        return rows[0] if rows and rows[0]["n"] >= members else None

    row = L.wait_until(recorded, 30, 0.5)
    if not row:
        rows = ctx.bot.query("SELECT user_id FROM room_members WHERE room_id = ?", (room,))
        return [f"the bot did not record {members} members of the group room within 30s "
                f"(room_members: {[r['user_id'] for r in rows]})"]
    if row["is_direct"]:
        return [f"the bot recorded the group room as direct (rooms.is_direct = {row['is_direct']})"]
    return []


def scenario_group(ctx):
    """e7. An encrypted group room of alice, bob and the bot: chatter (decrypted by the bot,
    then ignored) gets nothing; `grok: ...` with m.mentions from alice and `Grok, ...` (the
    display name, no m.mentions) from bob are each answered once, encrypted, and both people
    decrypt both answers. The chatter never reaches the provider."""
    name = "e7. encrypted group room: chatter ignored, mentions answered, both members decrypt"
    alice = ctx.alice
    ctx.synapse.register("bob", PASSWORD)
    bob = ctx.bob = ctx.device("bob", "bob-1")
    # The members join before the bot is invited: the bot sees a room of three from the start.
    room = alice.create_encrypted_room(invite=[bob.user_id], name="e2e encrypted group")
    bob.join(room)
    server = alice.plain_client()
    if not server.wait_joined(room, bob.user_id, 30):
        return report(name, ["bob did not join the group room within 30s"])
    server.invite(room, BOT)
    if not server.wait_joined(room, BOT, 30):
        return report(name, [f"the bot did not join the encrypted group room within 30s "
                             f"(membership {server.membership(room, BOT)})"])
    problems = group_room_problems(ctx, room, 3)
    for dev in (alice, bob):
        others = [u for u in (alice.user_id, bob.user_id, BOT) if u != dev.user_id]
        if not dev.wait(lambda: all(u in dev.client.rooms[room].users for u in others)
                        and all(dev.devices_of(u) for u in others), 30):
            return report(name, problems + [f"{dev.name} does not see every member joined, with their "
                                            f"devices, within 30s"])
    before = len(ctx.provider_calls())
    words = [secret_word() for _ in range(4)]
    ctx.words.extend(words)
    chatter = [
        alice.say(room, f"anyone up for lunch later? {words[0]}"),
        bob.send(room, {"msgtype": "m.text", "body": f"alice: did you see the slides? {words[1]}",
                        "m.mentions": {"user_ids": [alice.user_id]}}),
        # The name in the middle of a sentence does not address the bot (README: a mention, a
        # pill, the name as a prefix, or a reply to the bot).
        bob.say(room, f"I asked grok about the trains yesterday {words[2]}"),
    ]
    # The bot decrypts each (its key comes by to-device) and then ignores it: its claim is done.
    def chatter_claims():
        rows = [ctx.bot.query("SELECT kind, state, reply_event_id FROM processed_events WHERE event_id = ?",
                              (e,)) for e in chatter]
        return rows if all(r and r[0]["state"] in ("done", "answered", "failed") for r in rows) else None

    alice.wait(chatter_claims, REPLY_TIMEOUT)
    alice.wait(lambda: False, QUIET_WAIT + 3)
    claims = [ctx.bot.query("SELECT kind, state, reply_event_id FROM processed_events WHERE event_id = ?",
                            (e,)) for e in chatter]
    for i, (event_id, rows) in enumerate(zip(chatter, claims)):
        got = rows[0] if rows else None
        if not got or got["state"] != "done" or got["reply_event_id"]:
            problems.append(f"chatter {i + 1}'s claim is {got} within {REPLY_TIMEOUT}s, want state done "
                            f"without a reply (decrypted, then not addressed)")
    early = unexpected_bot_messages(alice, room, set())
    if early:
        problems.append(f"before any mention the bot sent {len(early)} message(s) in the room: "
                        f"{[e['content'].get('body', '')[:80] for e in early]}")
    raw_early = [e for e in server.messages(room) if e.get("sender") == BOT and "state_key" not in e]
    if raw_early:
        problems.append(f"before any mention the bot sent {len(raw_early)} timeline event(s) "
                        f"({sorted({e['type'] for e in raw_early})})")
    if len(ctx.provider_calls()) != before:
        problems.append(f"the provider got {len(ctx.provider_calls()) - before} requests for chatter, want 0")
    rows = [r for e in chatter for r in ctx.bot.request_log(e)]
    if rows:
        problems.append(f"{len(rows)} request_log rows for chatter (degraded "
                        f"{sorted({r['degraded'] for r in rows})}), want none")

    questions = {
        alice.send(room, {"msgtype": "m.text", "body": f"grok: {words[3]} what is the capital of Norway?",
                          "m.mentions": {"user_ids": [BOT]}}): alice,
    }
    word = secret_word()
    ctx.words.append(word)
    questions[bob.say(room, f"Grok, {word} and the capital of Finland?")] = bob
    ctx.questions.extend(questions)
    got = {}
    for q_id, asker in questions.items():
        for dev in (alice, bob):
            reply = dev.wait_reply(room, q_id)
            label = "alice's" if asker is alice else "bob's"
            if not reply:
                problems.append(f"{dev.name} has no readable reply to {label} question within "
                                f"{REPLY_TIMEOUT}s: " + reply_diagnosis(dev, room, q_id))
                continue
            got[(q_id, dev.name)] = reply
            if reply["wire"] != "m.room.encrypted":
                problems.append(f"the reply to {label} question reached {dev.name} as {reply['wire']}")
            if dev is asker:
                problems += [f"reply to {label} question: {p}"
                             for p in L.reply_problems(reply, asker.user_id)]
    alice.wait(lambda: False, QUIET_WAIT)  # a duplicate would come right behind
    bob.sync(0)
    for q_id, asker in questions.items():
        label = "alice's" if asker is alice else "bob's"
        for dev in (alice, bob):
            n = len(dev.replies(room, q_id))
            if n > 1:
                problems.append(f"{dev.name} reads {n} replies to {label} question, want 1")
        raw = [e for e in server.messages(room) if e.get("sender") == BOT and L.in_reply_to(e) == q_id]
        if any(e.get("type") != "m.room.encrypted" for e in raw):
            problems.append(f"the server holds a reply to {label} question unencrypted: "
                            f"{[e.get('type') for e in raw]}")
    for dev in (alice, bob):
        extra = unexpected_bot_messages(dev, room, set(questions))
        if extra:
            problems.append(f"{dev.name} reads {len(extra)} bot message(s) that answer no question: "
                            f"{[(L.in_reply_to(e), e['content'].get('body', '')[:60]) for e in extra]}")
    calls = ctx.provider_calls()[before:]
    inputs = [json.dumps(c["body"].get("input"), ensure_ascii=False) for c in calls]
    if len(calls) != 2:
        problems.append(f"the provider got {len(calls)} requests for two questions, want 2")
    for w in words[:3]:
        if any(w in i for i in inputs):
            problems.append(f"chatter ({w}) reached the provider")
    for w, who in ((words[3], "alice's"), (word, "bob's")):
        if not any(w in i for i in inputs):
            problems.append(f"no provider request carries {who} decrypted question")
    report(name, problems, f"3 chatter messages decrypted and ignored; {len(got)} of 4 replies decrypted "
                           f"(both questions, by alice and bob)")


def scenario_invited(ctx):
    """e13. The bot shares its room key with invited members too (the room's history is not
    for joined members only): frank, invited but not joined when the bot answers, joins later
    and decrypts that answer."""
    name = "e13. an invited member joins later and decrypts the bot's earlier answer"
    alice = ctx.alice
    ctx.synapse.register("frank", PASSWORD)
    frank = ctx.device("frank", "frank-1")
    room = alice.create_encrypted_room(name="e2e encrypted room with an invitee")
    server = alice.plain_client()
    server.invite(room, BOT)
    if not server.wait_joined(room, BOT, 30):
        return report(name, ["the bot did not join within 30s"])
    server.invite(room, frank.user_id)
    word = secret_word()
    ctx.words.append(word)
    q_id = alice.send(room, {"msgtype": "m.text", "body": f"grok: {word}, what is the capital of Chile?",
                             "m.mentions": {"user_ids": [BOT]}})
    ctx.questions.append(q_id)
    reply = alice.wait_reply(room, q_id)
    if not reply:
        return report(name, [f"no readable reply within {REPLY_TIMEOUT}s: " + reply_diagnosis(alice, room, q_id)])
    frank.join(room)
    got = frank.wait(lambda: frank.replies(room, q_id), 30)
    problems = []
    if not got:
        problems.append("frank, invited when the bot answered, cannot read the answer after joining: "
                        + reply_diagnosis(frank, room, q_id))
    report(name, problems, f"frank decrypted reply {reply['event_id']} after joining")


# ---------------------------------------------------------------------------------------------
# e8: the crypto store lost


def recorded_device(bot):
    rows = bot.query("SELECT device_id FROM crypto_devices WHERE user_id = ?", (BOT,))
    return rows[0]["device_id"] if rows else None


def log_since(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def answered_by_new_device(ctx, new, country, curve=None):
    """Alice asks once her client knows the bot's new device `new`: (the problems with the
    answer, the answer). It must be readable, encrypted by `new` (with its curve25519 key
    `curve`, when given) and come once."""
    alice = ctx.alice
    server = alice.plain_client()
    # Alice's client learns the bot's new device (device_lists.changed, then a keys query).
    if not alice.wait(lambda: new in alice.devices_of(BOT), 60):
        return [f"alice's client never saw the bot's new device {new} within 60s "
                f"(she knows {sorted(alice.devices_of(BOT))})"], None
    q_id, _ = ctx.ask(alice, f"and the capital of {country}?")
    reply = alice.wait_reply(ctx.dm, q_id)
    if not reply:
        return [f"no readable reply from the new device within {REPLY_TIMEOUT}s: "
                + reply_diagnosis(alice, ctx.dm, q_id)], None
    problems = []
    if reply["wire"] != "m.room.encrypted":
        problems.append(f"the reply reached alice as {reply['wire']}")
    # Who encrypted it: the Megolm content names the sending device and its curve25519 key.
    raw = server.get_event(ctx.dm, reply["event_id"]).get("content") or {}
    if raw.get("device_id") != new:
        problems.append(f"the reply was encrypted by device {raw.get('device_id')!r}, want the new {new}")
    if curve and raw.get("sender_key") != curve:
        problems.append("the reply's sender_key is not the new device's curve25519 key")
    alice.wait(lambda: False, QUIET_WAIT)
    if len(alice.replies(ctx.dm, q_id)) != 1:
        problems.append(f"{len(alice.replies(ctx.dm, q_id))} readable replies, want 1")
    return problems, reply


def scenario_store_lost(ctx):
    """e8. The crypto store is lost (moved away while the bot is stopped): the bot WARNs, makes
    a new device (recorded in crypto_devices, published in /keys/query), cross-signs it under a
    new identity, and alice, once her client trusts the new device, reads its answer."""
    name = "e8. crypto store lost: a WARN, a new cross-signed device, answers decrypt again"
    if not ctx.dm:
        return report(name, ["skipped: no encrypted DM (e1 failed)"])
    alice, bot = ctx.alice, ctx.bot
    server = alice.plain_client()
    old = recorded_device(bot)
    problems = []
    if not old or (ctx.bot_device and old != ctx.bot_device[0]):
        problems.append(f"before the loss crypto_devices names {old!r}, want the device alice saw "
                        f"({ctx.bot_device and ctx.bot_device[0]})")
    old_master = only_key((bot_keys(server).get("master_keys") or {}).get(BOT))[1]
    bot.stop()
    store = ctx.bot_config["encryption"]["store_path"]
    lost = ctx.stack.path("crypto-lost-by-test")
    os.rename(store, lost)
    aside = set(moved_aside(ctx))
    offset = os.path.getsize(ctx.stack.logs["bot"])
    bot.start(API_KEY, timeout=START_TIMEOUT, extra_env=ctx.bot_env)
    owns = L.wait_until(lambda: "this replica owns the encryption device" in log_since(ctx.stack.logs["bot"], offset),
                        START_TIMEOUT, 0.5)
    text = log_since(ctx.stack.logs["bot"], offset)
    if not owns:
        return report(name, problems + [f"the restarted bot never logged that it owns the encryption device "
                                        f"within {START_TIMEOUT}s"])
    warn = [ln for ln in text.splitlines() if " WARN " in ln and "store was lost" in ln]
    if not warn:
        problems.append("no WARN about the lost crypto store in the bot's log; WARN lines: "
                        + repr([ln[:200] for ln in text.splitlines() if " WARN " in ln][:5]))
    elif old and old not in warn[0]:
        problems.append(f"the WARN does not name the old device {old}: {warn[0][:300]}")
    new = recorded_device(bot)
    if not new or new == old:
        problems.append(f"crypto_devices names {new!r} after the loss, want a new device (old {old})")
    keys = bot_keys(server)
    devices = (keys.get("device_keys") or {}).get(BOT) or {}
    if new not in devices:
        problems.append(f"/keys/query lists the bot's devices {sorted(devices)}, not the new {new}")
    if old and old in devices:
        problems.append(f"the lost device {old} is still listed in /keys/query ({sorted(devices)}): "
                        "the bot should delete it")
    if set(moved_aside(ctx)) - aside:
        problems.append(f"the bot moved an (empty) store aside: {sorted(set(moved_aside(ctx)) - aside)}")
    if not os.path.isdir(store):
        problems.append(f"no new crypto store at {store}")
    # Cross-signed again: a new master key (the old one's private part went with the store).
    master = (keys.get("master_keys") or {}).get(BOT)
    ssk = (keys.get("self_signing_keys") or {}).get(BOT)
    m_id, m_pub = only_key(master)
    s_id, s_pub = only_key(ssk)
    if not m_pub or m_pub == old_master:
        problems.append(f"the bot's master key is {'unchanged' if m_pub else 'missing'} after the loss: "
                        "it was not cross-signed again")
    elif not signed_by(ssk or {}, BOT, m_id, m_pub):
        problems.append("the new self-signing key is not validly signed by the new master key")
    elif new in devices and not signed_by(devices[new], BOT, s_id, s_pub):
        problems.append(f"the new device {new} carries no valid signature of the new self-signing key")
    curve = ((devices.get(new) or {}).get("keys") or {}).get(f"curve25519:{new}")
    found, reply = answered_by_new_device(ctx, new, "Ecuador", curve)
    problems += found
    report(name, problems, f"old device {old} -> new device {new} (recorded and published, the old one "
                           f"deleted: /keys/query lists {sorted(devices)}); "
                           f"new master {m_pub and m_pub[:10]}…; reply {reply and reply['event_id']} decrypted")


# ---------------------------------------------------------------------------------------------
# e10: the device deleted while the bot runs


def cross_signed(server, device_id):
    """The bot's /keys/query once it lists `device_id` with a signature besides its own."""
    keys = bot_keys(server)
    dev = ((keys.get("device_keys") or {}).get(BOT) or {}).get(device_id) or {}
    signatures = set((dev.get("signatures") or {}).get(BOT) or {})
    return keys if signatures - {f"ed25519:{device_id}"} else None


def scenario_device_deleted(ctx):
    """e10. The bot's device is deleted while the bot runs (as an admin or Synapse's
    `delete_stale_devices_after` would): the bot's /sync is refused, it WARNs, makes a new
    device at once (no restart), signs it with its unchanged cross-signing identity, and alice
    reads the new device's answer."""
    name = "e10. device deleted while running: a new device under the same identity, answers decrypt again"
    if not ctx.dm:
        return report(name, ["skipped: no encrypted DM (e1 failed)"])
    alice, bot = ctx.alice, ctx.bot
    server = alice.plain_client()
    old = recorded_device(bot)
    before = bot_keys(server)
    old_master = only_key((before.get("master_keys") or {}).get(BOT))[1]
    old_ssk = only_key((before.get("self_signing_keys") or {}).get(BOT))[1]
    offset = os.path.getsize(ctx.stack.logs["bot"])
    # The appservice deletes devices of its users without interactive auth (MSC4190).
    as_client = L.Client(ctx.synapse.url, bot.reg["as_token"], BOT)
    as_client.call("DELETE", f"/devices/{L.q(old)}", {}, params={"user_id": BOT})
    problems = []
    t0 = time.monotonic()
    new = L.wait_until(lambda: (recorded_device(bot) != old and recorded_device(bot)) or None, 90, 0.5)
    if not new:
        return report(name, [f"crypto_devices still names {old} 90s after its deletion: the bot did not "
                             "notice or did not make a new device"])
    # Published and cross-signed: the keys and the signature follow the record closely.
    keys = L.wait_until(lambda: cross_signed(server, new), 30, 0.5) or bot_keys(server)
    took = time.monotonic() - t0
    text = log_since(ctx.stack.logs["bot"], offset)
    if not any(" WARN " in ln and "no longer knows the encryption device" in ln for ln in text.splitlines()):
        problems.append("no WARN that the homeserver forgot the device; WARN lines: "
                        + repr([ln[:200] for ln in text.splitlines() if " WARN " in ln][:5]))
    devices = (keys.get("device_keys") or {}).get(BOT) or {}
    if sorted(devices) != [new]:
        problems.append(f"/keys/query lists the bot's devices {sorted(devices)}, want only the new {new}")
    master = (keys.get("master_keys") or {}).get(BOT)
    ssk = (keys.get("self_signing_keys") or {}).get(BOT)
    m_id, m_pub = only_key(master)
    s_id, s_pub = only_key(ssk)
    if m_pub != old_master or s_pub != old_ssk:
        problems.append("the bot's cross-signing identity changed with its device (master "
                        f"{old_master and old_master[:10]} -> {m_pub and m_pub[:10]}): clients that "
                        "trusted the bot would see an identity reset")
    elif new in devices and not signed_by(devices[new], BOT, s_id, s_pub):
        problems.append(f"the new device {new} carries no valid signature of the bot's self-signing key")
    curve = ((devices.get(new) or {}).get("keys") or {}).get(f"curve25519:{new}")
    found, reply = answered_by_new_device(ctx, new, "Uruguay", curve)
    problems += found
    report(name, problems, f"device {old} deleted -> new device {new} in {took:.0f}s, same master "
                           f"{m_pub and m_pub[:10]}…; reply {reply and reply['event_id']} decrypted")


# ---------------------------------------------------------------------------------------------
# e12: a streamed answer's edits, encrypted


def scenario_streaming(ctx):
    """e12. With `reply.streaming`, the answer in the encrypted DM is one encrypted message and
    encrypted edits (m.replace) of it, which alice decrypts; the last edit is the whole answer."""
    name = "e12. streamed answer in the encrypted DM: the message and its edits are encrypted"
    if not ctx.dm:
        return report(name, ["skipped: no encrypted DM (e1 failed)"])
    alice, bot = ctx.alice, ctx.bot
    streaming = dict(ctx.bot_config, reply={"streaming": True, "edit_interval": "500ms", "max_edits": 20})
    bot.restart(API_KEY, extra_config=streaming, timeout=START_TIMEOUT, extra_env=ctx.bot_env)
    before = len(ctx.provider_calls())
    q_id, _ = ctx.ask(alice, "tell me a long story about otters building a dam in the river")
    first = alice.wait_reply(ctx.dm, q_id)
    if not first:
        return report(name, [f"no readable reply within {REPLY_TIMEOUT}s: " + reply_diagnosis(alice, ctx.dm, q_id)])
    # The row is written once the last edit is sent.
    L.wait_until(lambda: bot.request_log(q_id), REPLY_TIMEOUT, 0.5)
    alice.wait(lambda: False, QUIET_WAIT)
    problems = []
    calls = ctx.provider_calls()[before:]
    full = None
    if len(calls) != 1 or not calls[0]["body"].get("stream"):
        problems.append(f"{len(calls)} provider calls (stream={[c['body'].get('stream') for c in calls]}), "
                        "want one streamed call")
    else:
        full = calls[0]["response"]["output"][-1]["content"][0]["text"]
    edits = [e for e in alice.decrypted(ctx.dm) if e.get("sender") == BOT
             and L.relates_to(e).get("rel_type") == "m.replace"
             and L.relates_to(e).get("event_id") == first["event_id"]]
    if not edits:
        problems.append("no readable edit of the streamed message")
    plain = [e["event_id"] for e in [first] + edits if e["wire"] != "m.room.encrypted"]
    if plain:
        problems.append(f"{len(plain)} of the message and its edits reached alice unencrypted: {plain[:3]}")
    stuck = [e for e in alice.undecrypted.values() if e.sender == BOT]
    if stuck:
        problems.append(f"alice cannot decrypt {len(stuck)} of the bot's events")
    last = edits[-1]["content"].get("m.new_content", {}).get("body") if edits else None
    if full and last != full:
        problems.append(f"the last edit says {last!r}, the whole answer is {full!r}")
    report(name, problems, f"one message and {len(edits)} encrypted edits, the last the whole answer")


# e7 runs before e5, so its words are in the log and database scan too; e8 and e10 last, as they
# replace the device (e8 the identity too) that e2 and e6 check.
SCENARIOS = [("e1", scenario_dm), ("e2", scenario_restart), ("e3", scenario_second_device),
             ("e11", scenario_image), ("e13", scenario_invited),
             ("e4", scenario_no_key), ("e4b", scenario_malformed), ("e7", scenario_group),
             ("e5", scenario_logs), ("e6", scenario_cross_signing), ("e8", scenario_store_lost),
             ("e10", scenario_device_deleted), ("e12", scenario_streaming)]


def dummy_registration(stack):
    """A registration for --client-only runs (Synapse wants the file; nothing listens at url)."""
    path = stack.path("registration.yaml")
    with open(path, "w") as f:
        json.dump({"id": "e2e-none", "url": f"http://127.0.0.1:{L.free_port()}",
                   "as_token": secrets.token_hex(16), "hs_token": secrets.token_hex(16),
                   "sender_localpart": "_e2e_none", "rate_limited": False,
                   "namespaces": {"users": [], "aliases": [], "rooms": []}}, f)
    return path


def main():
    client_only = "--client-only" in sys.argv[1:]
    started = time.monotonic()
    loop = asyncio.new_event_loop()
    with L.Stack(keep=os.environ.get("KEEP") == "1", prefix="grok-encryption-") as stack:
        nio_log = stack.path("nio.log")
        handler = logging.FileHandler(nio_log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("nio").addHandler(handler)
        logging.getLogger("nio").setLevel(logging.INFO)
        logging.getLogger("nio").propagate = False
        stack.logs["nio"] = nio_log
        ctx = None
        try:
            venv = L.ensure_venv()
            if client_only:
                synapse = L.Synapse(stack, venv, dummy_registration(stack)).start()
                ctx = Ctx(stack, synapse, loop)
            else:
                binary = L.build_binary()
                fake = stack.start_fake_xai()
                bot = L.Bot(stack, binary)
                bot.generate_registration()
                synapse = L.Synapse(stack, venv, bot.registration).start()
                ctx = Ctx(stack, synapse, loop, fake, bot)
                bot.write_config(synapse.url, fake.base_url, extra=ctx.bot_config)
                bot.start(API_KEY, timeout=START_TIMEOUT, extra_env=ctx.bot_env)
            bot_up = True
        except Exception as e:
            traceback.print_exc()
            report("setup", [f"{type(e).__name__}: {e}"])
            bot_up = False
        # Without the bot only the harness check runs (it tells a client problem from a bot one).
        scenarios = [("e0", scenario_harness)] + (SCENARIOS if bot_up and not client_only else [])
        if ctx and len(scenarios) > 1:
            try:
                ctx.synapse.register("alice", PASSWORD)
                ctx.alice = ctx.device("alice", "alice-1")
            except Exception as e:
                traceback.print_exc()
                report("setup: alice's E2EE device", [f"{type(e).__name__}: {e}"])
                scenarios = scenarios[:1]
        timings = []
        for name, scenario in scenarios if ctx else []:
            t0 = time.monotonic()
            try:
                scenario(ctx)
            except Exception as e:
                traceback.print_exc()
                report(name, [f"{type(e).__name__}: {e}"])
            timings.append((name, time.monotonic() - t0))
        for dev in ctx.devices if ctx else []:
            dev.close()
        failed = sum(1 for _, ok, _ in results if not ok)
        if failed:
            stack.keep = True
            stack.print_log_tails()
            L.log(f"encryption: logs kept in {stack.dir}")
    loop.close()
    for name, ok, detail in results:
        L.log(f"encryption:   {'PASS' if ok else 'FAIL'}  {name}" + ("" if ok else f"  -- {detail[:400]}"))
    L.log("encryption: took " + ", ".join(f"{k} {t:.0f}s" for k, t in timings)
          + f"; {time.monotonic() - started:.0f}s in all")
    print(f"encryption: {len(results) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
