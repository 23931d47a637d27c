#!/usr/bin/env python3
"""End-to-end test: a real Synapse, the real grok-appservice binary, the offline fake xAI, and
two users (alice, bob) talking through the client-server API.

    python3 tests/e2e/run.py

GROK_APPSERVICE_BIN=path uses that binary instead of `cargo build`. KEEP=1 keeps the temp dir
(it is also kept when a check fails). RUST_LOG is passed to the bot (default info).
The last line is `e2e: N passed, M failed`; the exit code is non-zero if any check failed.
"""

import json
import os
import sys
import time
import traceback

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


def reply_problems(reply, asker, msgtype="m.notice"):
    """What is wrong with a bot reply's msgtype and mentions (empty list when fine)."""
    content = reply.get("content", {})
    problems = []
    if content.get("msgtype") != msgtype:
        problems.append(f"msgtype is {content.get('msgtype')!r}, want {msgtype!r}")
    mentions = (content.get("m.mentions") or {}).get("user_ids")
    if mentions != [asker]:
        problems.append(f"m.mentions.user_ids is {mentions!r}, want [{asker!r}]")
    return problems


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
    problems = reply_problems(reply, alice.user_id)
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
    ctx.group_question = alice.send(ctx.group, {
        "msgtype": "m.text", "body": "grok: what is 2+2?", "m.mentions": {"user_ids": [BOT]},
    })
    reply = L.wait_reply(alice, ctx.group, ctx.group_question, REPLY_TIMEOUT)
    if not reply:
        return report("b2. group mention answered", [f"no bot reply within {REPLY_TIMEOUT}s"])
    problems = reply_problems(reply, alice.user_id)
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
    """c. Addressed media gets a short notice and no provider call."""
    if not ctx.dm:
        return report("c. addressed media", ["skipped: no direct chat (a. failed)"])
    alice = ctx.alice
    before = len(ctx.provider_calls())
    ctx.media_event = alice.send(ctx.dm, {
        "msgtype": "m.image", "body": "cat.png", "url": "mxc://localhost/fake",
        "info": {"mimetype": "image/png", "size": 1234, "w": 10, "h": 10},
    })
    reply = L.wait_reply(alice, ctx.dm, ctx.media_event, REPLY_TIMEOUT)
    if not reply:
        return report("c. addressed media", [f"no bot notice within {REPLY_TIMEOUT}s"])
    problems = reply_problems(reply, alice.user_id)
    time.sleep(1)
    if len(ctx.provider_calls()) != before:
        problems.append(f"provider got {len(ctx.provider_calls()) - before} requests for an image, want 0")
    report("c. addressed media", problems, f"notice: {reply['content'].get('body')!r}")


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
    problems = reply_problems(reply, alice.user_id)
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


SCENARIOS = [
    ("a. direct chat", scenario_direct),
    ("b. group room", scenario_group),
    ("c. addressed media", scenario_media),
    ("d. redelivery deduped", scenario_redelivery),
    ("e. thread reply", scenario_thread),
    ("f. request_log", scenario_request_log),
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
    L.log(f"e2e: took {time.monotonic() - started:.0f}s")
    print(f"e2e: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
