#!/usr/bin/env python3
"""Writes a transaction body for the benchmarks: realistic m.room.message events from a few
dozen senders in a few rooms, a share of them addressing the bot (a mention by user id, or its
display name as a prefix), some replies and some HTML.

The output is deterministic for a given seed. With --template the event ids contain the
placeholder @@TXN@@ (the wrk script replaces it with a fresh id per request) and the
timestamps @@TS@@ (replaced with the current time once per wrk run); otherwise both are filled
in here (--tag, and the current time).

  make_body.py OUT [--events 100] [--addressed-pct 2] [--target-bytes 40000] [--template]
  make_body.py OUT --all-addressed --events 100 --tag t3   # every event mentions the bot
  make_body.py OUT --target-bytes 33554432 --body-chars 64000  # large events up to a size
"""
import argparse
import json
import random
import time

BOT = "@grok:example.org"
DISPLAY_NAME = "Grok"
SENDERS = [f"@{name}:example.org" for name in (
    "alice bob carol dave erin frank grace heidi ivan judy mallory niaj olivia peggy rupert "
    "sybil trent victor walter xavier yvonne zoe amir bea chen dara emil fatima goran hana "
    "igor jun kofi lena milo nadia omar priya").split()]
ROOMS = [f"!{name}:example.org" for name in
         ("general", "random", "dev", "support", "ops", "music")]
WORDS = ("the a to and of is in that it for on with this was be are at have not you but "
         "deploy build release server room message bot cache queue latency ticket meeting "
         "lunch coffee weekend review merge branch test config database index backup "
         "yesterday tomorrow morning later maybe sure thanks please question idea plan "
         "issue fix error log metrics graph dashboard alert ping pong update docs").split()


def sentence(rng, lo, hi):
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + rng.choice([".", "?", "!", "."])


def text(rng, target_chars):
    out = ""
    while len(out) < target_chars:
        out += (" " if out else "") + sentence(rng, 4, 14)
    return out


def event(rng, event_id, ts, mode, body_chars):
    """One event; mode is None (chatter), "mention" or "prefix"."""
    room = ROOMS[rng.randrange(len(ROOMS))]
    sender = SENDERS[rng.randrange(len(SENDERS))]
    body = text(rng, body_chars or rng.randint(20, 230))
    content = {"msgtype": "m.text", "body": body, "m.mentions": {}}
    if mode == "mention":
        content["body"] = f"{DISPLAY_NAME}: {body}"
        content["format"] = "org.matrix.custom.html"
        # Large events keep their HTML short, so that none passes Matrix's 64 KiB limit.
        html = body[:200] if body_chars else body
        content["formatted_body"] = (
            f'<a href="https://matrix.to/#/{BOT}">{DISPLAY_NAME}</a>: {html}')
        content["m.mentions"] = {"user_ids": [BOT]}
    elif mode == "prefix":
        content["body"] = f"grok: {body}"
    elif rng.random() < 0.15 and not body_chars:
        content["format"] = "org.matrix.custom.html"
        content["formatted_body"] = f"<p>{body}</p>"
    if mode is None and rng.random() < 0.1:
        # A reply to someone else's earlier message: the webhook looks up whether it was the bot's.
        content["m.relates_to"] = {"m.in_reply_to": {"event_id": f"$earlier{rng.randrange(10**6)}"}}
    return {
        "type": "m.room.message",
        "room_id": room,
        "sender": sender,
        "content": content,
        "origin_server_ts": ts,
        "unsigned": {"age": rng.randint(5, 900)},
        "event_id": event_id,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--events", type=int, default=100)
    ap.add_argument("--addressed-pct", type=float, default=2.0)
    ap.add_argument("--all-addressed", action="store_true")
    ap.add_argument("--target-bytes", type=int, default=0,
                    help="append events until the body reaches this size (overrides --events)")
    ap.add_argument("--body-chars", type=int, default=0,
                    help="every message body this long (default: 20-230 characters)")
    ap.add_argument("--template", action="store_true")
    ap.add_argument("--tag", default="t0")
    ap.add_argument("--seed", type=int, default=12)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tag = "@@TXN@@" if args.template else args.tag
    ts = "@@TS@@" if args.template else int(time.time() * 1000)
    # Event ids look like Synapse's (a 43-character hash) with the transaction's id in them.
    every = max(1, round(100 / args.addressed_pct)) if args.addressed_pct > 0 else 0
    parts, size, i = [], 0, 0
    while (size < args.target_bytes) if args.target_bytes else (i < args.events):
        if args.all_addressed:
            mode = "mention"
        elif every and i % every == every // 2:
            mode = "mention" if (i // every) % 2 == 0 else "prefix"
        else:
            mode = None
        eid = "$" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
                            for _ in range(24)) + f"_{tag}_{i}"
        e = json.dumps(event(rng, eid, 0, mode, args.body_chars), separators=(",", ":"))
        e = e.replace('"origin_server_ts":0', f'"origin_server_ts":{ts}')
        parts.append(e)
        size += len(e) + 1
        i += 1
    if args.target_bytes:
        # Stay under the target (the webhook's limit is exact).
        while parts and size + 12 > args.target_bytes:
            size -= len(parts.pop()) + 1
    with open(args.out, "w") as f:
        f.write('{"events":[' + ",".join(parts) + "]}")


if __name__ == "__main__":
    main()
