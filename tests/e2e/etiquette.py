#!/usr/bin/env python3
"""End-to-end test of room commands and room etiquette: a real Synapse, the real binary, the
offline fake xAI, and users talking through the client-server API.

    python3 tests/e2e/etiquette.py

- `!grok help` answers with no provider call;
- a moderator's `!grok context off` / `!grok route ...` changes the room (stored in the
  database) and a non-moderator's is refused;
- two bots in one room (ours and a scripted user that answers everything it sees) stop after
  the per-room limit: one notice, then silence;
- a kick makes the bot forget the room, and nothing more is recorded for it;
- with `reply.streaming`, a second user sees one message plus at most `reply.max_edits` edits,
  the last one the full answer, and only the first event mentions the asker.

GROK_APPSERVICE_BIN=path uses that binary instead of `cargo build`; KEEP=1 keeps the temp dir.
The last line is `etiquette: N passed, M failed`; the exit code is non-zero if any failed.
"""

import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
import e2e_lib as L  # noqa: E402

BOT = L.BOT_ID
API_KEY = "e2e-dummy-key"
REPLY_TIMEOUT = 30
ROOM_LIMIT = 6  # bot.room_answers_per_minute for this run: small, so the loop test is short

results = []


def report(name, problems, info=""):
    ok = not problems
    results.append((name, ok, "; ".join(problems) if problems else info))
    L.log(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {results[-1][2]}" if results[-1][2] else ""))


def provider_calls(fake):
    return [r for r in fake.snapshot() if r["path"].rstrip("/") == "/v1/responses"]


def bot_messages(client, room):
    return [e for e in client.messages(room, limit=200)
            if e.get("sender") == BOT and e.get("type") == "m.room.message"]


def group_room(alice, bob, name):
    room = alice.create_room(invite=[bob.user_id, BOT], name=name)
    bob.join(room)
    if not alice.wait_joined(room, BOT, 20):
        raise RuntimeError(f"the bot did not join {name}")
    alice.wait_joined(room, bob.user_id, 10)
    return room


def ask(client, room, text):
    """Sends `text` addressed to the bot by name; returns (event id, the bot's reply or None)."""
    event = client.send(room, {"msgtype": "m.text", "body": f"grok: {text}",
                               "m.mentions": {"user_ids": [BOT]}})
    return event, L.wait_reply(client, room, event, REPLY_TIMEOUT)


def body(event):
    return (event or {}).get("content", {}).get("body", "")


def scenario_commands(ctx):
    name = "c1. commands: help costs nothing, only moderators change the room"
    alice, bob, fake, bot = ctx["alice"], ctx["bob"], ctx["fake"], ctx["bot"]
    room = group_room(alice, bob, "e2e commands")
    problems = []
    before = len(provider_calls(fake))
    _, help_reply = ask(bob, room, "!grok help")
    if not help_reply:
        problems.append("no reply to !grok help")
    elif "!grok context" not in body(help_reply):
        problems.append(f"the help text does not list the commands: {body(help_reply)[:200]!r}")
    # alice created the room (room v12: creators outrank every power level); bob has 0.
    _, refused = ask(bob, room, "!grok context off")
    if not refused or not body(refused).startswith("Only room moderators"):
        problems.append(f"bob's !grok context off was not refused: {body(refused)[:120]!r}")
    settings = lambda: bot.query("SELECT context_mode, route FROM room_settings WHERE room_id = ?", (room,))
    if settings():
        problems.append(f"a refused command changed the room: {settings()}")
    _, done = ask(alice, room, "!grok context off")
    if not done or "`off`" not in body(done):
        problems.append(f"alice's !grok context off did not take: {body(done)[:120]!r}")
    _, routed = ask(alice, room, "!grok route web_then_grok")
    rows = settings()
    if not rows or (rows[0]["context_mode"], rows[0]["route"]) != ("off", "web_then_grok"):
        problems.append(f"room_settings is {rows}, want context off and route web_then_grok")
    _, answer = ask(bob, room, "tell me about otters")
    calls = provider_calls(fake)[before:]
    if len(calls) != 1:
        problems.append(f"{len(calls)} provider calls, want 1 (only the question; commands are free)")
    elif (calls[0]["body"].get("tools") or [{}])[0].get("type") != "web_search":
        problems.append("the question after `!grok route web_then_grok` did not search the web")
    if not answer:
        problems.append("no answer to the question")
    report(name, problems, "help and refusal free, moderator's settings stored and applied")


def scenario_loop(ctx):
    name = "c2. two bots in one room stop at the per-room limit"
    alice, bob, fake, bot = ctx["alice"], ctx["bob"], ctx["fake"], ctx["bot"]
    room = group_room(alice, bob, "e2e two bots")
    # The limit counts per UTC minute: start early in one, so the loop cannot straddle two.
    while time.time() % 60 > 15:
        time.sleep(0.5)
    before = len(provider_calls(fake))
    # bob plays a bot that answers everything the other bot says, by replying to it.
    bob.say(room, "grok: hello, other bot!", **{"m.mentions": {"user_ids": [BOT]}})
    seen, replies, idle_since = set(), 0, time.monotonic()
    while time.monotonic() - idle_since < 8 and replies < 100:
        fresh = [e for e in bot_messages(bob, room) if e["event_id"] not in seen]
        for e in fresh:
            seen.add(e["event_id"])
            replies += 1
            bob.send(room, {"msgtype": "m.text", "body": f"grok: interesting, tell me more ({replies})",
                            "m.mentions": {"user_ids": [BOT]},
                            "m.relates_to": {"m.in_reply_to": {"event_id": e["event_id"]}}})
        if fresh:
            idle_since = time.monotonic()
        time.sleep(0.3)
    posts = bot_messages(bob, room)
    notices = [e for e in posts if e["content"].get("msgtype") == "m.notice"
               and "pause" in e["content"].get("body", "")]
    calls = len(provider_calls(fake)) - before
    limited = bot.query("SELECT COUNT(*) AS n FROM request_log WHERE room_id = ? AND degraded = ?",
                        (room, "room_rate_limited"))
    problems = []
    if len(posts) != ROOM_LIMIT + 1:
        problems.append(f"the bot posted {len(posts)} messages, want {ROOM_LIMIT} answers and one notice")
    if len(notices) != 1:
        problems.append(f"{len(notices)} limit notices, want 1")
    if calls != ROOM_LIMIT:
        problems.append(f"{calls} provider calls, want {ROOM_LIMIT}")
    if not limited or limited[0]["n"] < 1:
        problems.append("no request_log row says room_rate_limited")
    report(name, problems, f"{len(posts)} bot messages ({len(notices)} notice), {calls} provider calls, "
                           f"then silence for 8 s")


def scenario_kick(ctx):
    name = "c3. a kicked bot forgets the room"
    alice, bob, bot = ctx["alice"], ctx["bob"], ctx["bot"]
    room = group_room(alice, bob, "e2e kick")
    ask(alice, room, "!grok route web_then_grok")
    alice.call("POST", f"/rooms/{L.q(room)}/kick", {"user_id": BOT, "reason": "e2e"})
    gone = L.wait_until(lambda: not bot.query("SELECT room_id FROM rooms WHERE room_id = ?", (room,)), 20, 0.5)
    bob.send(room, {"msgtype": "m.text", "body": "grok: are you still there?",
                    "m.mentions": {"user_ids": [BOT]}})
    time.sleep(4)
    problems = []
    if not gone:
        problems.append("the room is still in the bot's database 20 s after the kick")
    if bot.query("SELECT * FROM room_settings WHERE room_id = ?", (room,)):
        problems.append("the room's settings outlived the kick")
    after = bot.query("SELECT id FROM request_log WHERE room_id = ? AND route != 'none'", (room,))
    if bot.query("SELECT id FROM processed_events WHERE room_id = ? AND kind = 'addressed' "
                 "AND state != 'done'", (room,)) or len(after) > 0:
        problems.append(f"something was recorded for the room after the kick: {after}")
    report(name, problems, "room, members and settings forgotten; nothing recorded afterwards")


MAX_EDITS = 4


def scenario_streaming(ctx):
    name = "c4. a streamed answer is one message and a few edits"
    alice, bob, fake, bot = ctx["alice"], ctx["bob"], ctx["fake"], ctx["bot"]
    bot.restart(API_KEY, extra_config={"bot": {"room_answers_per_minute": ROOM_LIMIT},
                                       "reply": {"streaming": True, "edit_interval": "500ms",
                                                 "max_edits": MAX_EDITS}})
    room = group_room(alice, bob, "e2e streaming")
    before = len(provider_calls(fake))
    question = "please tell me a long story about otters building a dam in the river"
    event, first = ask(alice, room, question)
    problems = []
    if not first:
        return report(name, ["no reply"])
    # Wait for the stream to end: the answer's row is written once the last edit is sent.
    L.wait_until(lambda: bot.request_log(event), REPLY_TIMEOUT, 0.5)
    time.sleep(1)
    events = [e for e in bob.messages(room, limit=200) if e.get("sender") == BOT]
    edits = [e for e in events if L.relates_to(e).get("rel_type") == "m.replace"
             and L.relates_to(e).get("event_id") == first["event_id"]]
    others = [e for e in events if e not in edits and e["event_id"] != first["event_id"]
              and L.in_reply_to(e) == event]
    calls = provider_calls(fake)[before:]
    full = ""
    if len(calls) != 1 or not calls[0]["body"].get("stream"):
        problems.append(f"{len(calls)} provider calls (stream={[c['body'].get('stream') for c in calls]}), "
                        "want one streamed call")
    else:
        full = calls[0]["response"]["output"][-1]["content"][0]["text"]
    if others:
        problems.append(f"{len(others)} more messages besides the first and its edits")
    if not 1 <= len(edits) <= MAX_EDITS:
        problems.append(f"{len(edits)} edits, want 1..{MAX_EDITS}")
    if (first["content"].get("m.mentions") or {}).get("user_ids") != [alice.user_id]:
        problems.append(f"the first event does not mention the asker: {first['content'].get('m.mentions')}")
    for e in edits:
        if (e["content"].get("m.mentions") or {}).get("user_ids"):
            problems.append(f"an edit mentions {e['content']['m.mentions']}")
        if (e["content"].get("m.new_content", {}).get("m.mentions") or {}).get("user_ids"):
            problems.append("an edit's new content mentions someone")
    last = edits[-1]["content"].get("m.new_content", {}).get("body") if edits else None
    if full and last != full:
        problems.append(f"the last edit says {last!r}, the full answer is {full!r}")
    report(name, problems, f"one message, {len(edits)} edits (max {MAX_EDITS}), the last the full answer; "
                           f"one mention, in the first event")


SCENARIOS = [("c1", scenario_commands), ("c2", scenario_loop), ("c3", scenario_kick),
             ("c4", scenario_streaming)]


def main():
    started = time.monotonic()
    with L.Stack(keep=os.environ.get("KEEP") == "1", prefix="grok-etiquette-") as stack:
        ctx = None
        try:
            binary = L.build_binary()
            venv = L.ensure_venv()
            fake = stack.start_fake_xai()
            synapse, bot = L.start_stack(stack, binary, fake.base_url, API_KEY, venv)
            bot.restart(API_KEY, extra_config={"bot": {"room_answers_per_minute": ROOM_LIMIT}})
            ctx = {"fake": fake, "bot": bot, "alice": synapse.register("alice"),
                   "bob": synapse.register("bob")}
        except Exception as e:
            traceback.print_exc()
            report("setup", [f"{type(e).__name__}: {e}"])
        for name, scenario in SCENARIOS if ctx else []:
            try:
                scenario(ctx)
            except Exception as e:
                traceback.print_exc()
                report(name, [f"{type(e).__name__}: {e}"])
        failed = sum(1 for _, ok, _ in results if not ok)
        if failed:
            stack.keep = True
            stack.print_log_tails()
            L.log(f"etiquette: logs kept in {stack.dir}")
    for name, ok, detail in results:
        L.log(f"etiquette:   {'PASS' if ok else 'FAIL'}  {name}" + ("" if ok else f"  -- {detail[:300]}"))
    L.log(f"etiquette: took {time.monotonic() - started:.0f}s")
    print(f"etiquette: {len(results) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
