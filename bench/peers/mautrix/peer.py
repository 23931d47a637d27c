#!/usr/bin/env python3
"""The mautrix-python peer: a minimal appservice on mautrix's `AppService` with the bot's
logic. mautrix authenticates hs_token and dedupes txnIds in memory; the handler here
classifies each event as grok-appservice does (mentions by user id, pills, a name prefix;
own echoes, other namespace users, notices and edits ignored) and dedupes the ids of
addressed events in memory. Handlers run synchronously, so the transaction is acknowledged
only after every event was classified, as grok-appservice does before answering 200.

  peer.py PORT HS_TOKEN STATE_DIR   (GET /bench/stats -> {"txns": N, "addressed": M})
"""
import asyncio
import logging
import re
import sys

from aiohttp import web
from mautrix.appservice import AppService
from mautrix.appservice.state_store import FileASStateStore
from mautrix.types import EventType, MessageType

BOT = "@grok:example.org"
LOCALPART = "grok"
DISPLAY_NAME = "Grok"
SERVER = "example.org"
NAMESPACE = re.compile(r"^@grok:example\.org$")
PILLS = (f"matrix.to/#/{BOT}", f"matrix:u/{BOT[1:]}")
NAMES = (BOT[1:].lower(), LOCALPART.lower(), DISPLAY_NAME.lower())

claimed: set[str] = set()
stats = {"addressed": 0}


def name_prefix(body: str) -> bool:
    text = body.lstrip()
    text = text[1:] if text.startswith("@") else text
    low = text[:64].lower()
    return any(low.startswith(n) and low[len(n):len(n) + 1] in (":", ",") for n in NAMES)


def addressed(event) -> bool:
    if event.sender == BOT or NAMESPACE.match(event.sender):
        return False
    if event.type != EventType.ROOM_MESSAGE or getattr(event, "state_key", None) is not None:
        return False
    content = event.content
    if content.relates_to and content.relates_to.rel_type and \
            content.relates_to.rel_type.value == "m.replace":
        return False
    if content.msgtype not in (MessageType.TEXT, MessageType.EMOTE):
        return False
    mentions = content.get("m.mentions") or {}
    if BOT in (mentions.get("user_ids") or []):
        return True
    html = getattr(content, "formatted_body", None) or ""
    if any(p in html for p in PILLS):
        return True
    if name_prefix(content.body or ""):
        return True
    return False


async def on_event(event) -> None:
    if addressed(event) and event.sender.split(":", 1)[1] == SERVER:
        if event.event_id not in claimed:
            claimed.add(event.event_id)
            stats["addressed"] += 1


async def main(port: int, hs_token: str, state_dir: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    appservice = AppService(
        server="http://127.0.0.1:9", domain=SERVER, as_token="unused", hs_token=hs_token,
        bot_localpart=LOCALPART, id="bench", state_store=FileASStateStore(
            f"{state_dir}/mx-state.json", binary=False),
        aiohttp_params={"client_max_size": 64 * 1024 * 1024})
    appservice.synchronous_handlers = True
    appservice.matrix_event_handler(on_event)

    async def bench_stats(_request):
        return web.json_response({"txns": len(appservice.transactions), **stats})

    appservice.app.router.add_get("/bench/stats", bench_stats)
    await appservice.start(host="127.0.0.1", port=port)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
