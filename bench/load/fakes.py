#!/usr/bin/env python3
"""Local fakes for the release-binary benchmarks (loopback only).

  fakes.py hs PORT        a homeserver that accepts every client-server call at once
  fakes.py hold PORT      a provider that accepts each POST and never answers it (the
                          answer stays in flight); `GET /count` says how many arrived,
                          any other GET answers at once (start-up checks of key and models)

Each prints `ready` on stdout once it listens, and runs until killed.
"""
import asyncio
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BOT = "@grok:example.org"
# One body that satisfies every call the bot makes: register, profile, ping, typing, send,
# joined_members, messages, relations.
HS_ANSWER = json.dumps({"user_id": BOT, "event_id": "$fake:example.org", "duration_ms": 1,
                        "joined": {}, "chunk": []}).encode()


class Homeserver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = b"[]" if self.path.split("?")[0].endswith("/state") else HS_ANSWER
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = _answer

    def log_message(self, *args):
        pass


def run_hs(port):
    server = ThreadingHTTPServer(("127.0.0.1", port), Homeserver)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


async def run_hold(port):
    arrived = 0

    async def handle(reader, writer):
        nonlocal arrived
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path = lines[0].split(" ")[:2]
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            if length:
                await reader.readexactly(length)
            if method == "POST":
                arrived += 1
                # Keep the connection open and silent until the client gives up.
                await reader.read()
                return
            if path.startswith("/count"):
                body = str(arrived).encode()
            else:
                body = json.dumps({"data": [{"id": m} for m in (
                    "grok-4.3", "grok-4.20-non-reasoning", "grok-4.5")]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()

    async def guarded(reader, writer):
        try:
            await handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", port, backlog=2048)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "hs":
        run_hs(port)
    elif mode == "hold":
        asyncio.run(run_hold(port))
    else:
        sys.exit(f"unknown mode {mode}")
