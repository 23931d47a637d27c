#!/usr/bin/env python3
"""An offline stand-in for xAI's Responses API, for the end-to-end test and the demo.

It answers `POST /v1/responses` in the documented response shape, so the bot's real provider
client parses it, but no model runs: every answer says it came from an offline fake.

Test hooks (not part of xAI's API):
  GET  /_fake/requests   every request received so far, as a JSON list
  POST /_fake/reset      forget them

Run it alone:   python3 scripts/fake_xai.py --port 0      (prints "LISTENING <port>" first)
Or in a thread: srv = FakeXAI(); srv.start(); ...; srv.stop()
"""

import argparse
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Roughly grok-4 list prices, in xAI's unit (1 USD = 10^10 ticks): $3 / M input tokens,
# $15 / M output tokens. Only there so the bot has a non-zero cost to record.
TICKS_PER_INPUT_TOKEN = 30_000
TICKS_PER_OUTPUT_TOKEN = 150_000


def _text_of(content):
    """The plain text of a message's content: a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _last_user_text(body):
    """The text of the last `user` message of a Responses API `input` (a string or a list)."""
    inp = body.get("input")
    if isinstance(inp, str):
        return inp
    if isinstance(inp, list):
        for msg in reversed(inp):
            if isinstance(msg, dict) and msg.get("role") == "user":
                return _text_of(msg.get("content"))
    return ""


def _count_tokens(text):
    # A crude stand-in for a tokenizer: about one token per word, at least one.
    return max(1, len(text.split()))


def make_response(body):
    """A completed Responses API object for the request `body`, as xAI documents it."""
    question = _last_user_text(body)
    answer = "[offline fake xAI] You asked: " + question[:80]
    all_input = json.dumps(body.get("input", ""), ensure_ascii=False) + str(body.get("instructions") or "")
    n_in, n_out = _count_tokens(all_input), _count_tokens(answer)
    return {
        "id": "resp_" + uuid.uuid4().hex,
        "object": "response",
        "created_at": int(time.time()),
        "model": body.get("model") or "grok-fake",
        "status": "completed",
        "output": [
            {
                "type": "message",
                "id": "msg_" + uuid.uuid4().hex,
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": answer, "annotations": []}],
            }
        ],
        "usage": {
            "input_tokens": n_in,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": n_out,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": n_in + n_out,
            "cost_in_usd_ticks": n_in * TICKS_PER_INPUT_TOKEN + n_out * TICKS_PER_OUTPUT_TOKEN,
        },
    }


class FakeXAI:
    """The fake server; `requests` holds every request received (method, path, headers, body)."""

    def __init__(self, host="127.0.0.1", port=0, latency_ms=0, quiet=True):
        self.latency_ms = latency_ms
        self.quiet = quiet
        self.requests = []
        self._lock = threading.Lock()
        self._thread = None
        self.httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://{host}:{self.port}/v1"

    # --- for tests running it in-process ---
    def start(self):
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fake-xai", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def snapshot(self):
        """A copy of the recorded requests."""
        with self._lock:
            return list(self.requests)

    def reset(self):
        with self._lock:
            self.requests.clear()

    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "fake-xai/1"
            protocol_version = "HTTP/1.1"  # keep-alive, like the real API; every reply sets Content-Length

            def log_message(self, fmt, *args):
                if not fake.quiet:
                    sys.stderr.write("fake-xai: " + (fmt % args) + "\n")

            def _send(self, status, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _read_body(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    return json.loads(raw) if raw else None
                except ValueError:
                    return raw.decode("utf-8", "replace")

            def do_GET(self):
                if self.path == "/_fake/requests":
                    return self._send(200, fake.snapshot())
                self._send(404, {"code": "Not found", "error": f"no route for GET {self.path}"})

            def do_POST(self):
                if self.path == "/_fake/reset":
                    fake.reset()
                    return self._send(200, {})
                body = self._read_body()
                auth = self.headers.get("Authorization", "")
                record = {
                    "time": time.time(),
                    "method": "POST",
                    "path": self.path,
                    "authorization": auth,
                    "headers": {k.lower(): v for k, v in self.headers.items() if k.lower() != "authorization"},
                    "body": body,
                    "status": None,  # set once answered
                }
                with fake._lock:
                    fake.requests.append(record)
                status, answer, headers = self._answer(auth, body)
                record["status"] = status
                if status == 200:
                    # Kept with the request so a test can compare the bot's recorded cost and id.
                    record.update(request_id=headers["x-request-id"], response=answer)
                self._send(status, answer, headers)

            def _answer(self, auth, body):
                """(status, JSON body, headers) for a POST; errors in xAI's {"code", "error"} shape."""
                if not auth.startswith("Bearer ") or not auth[len("Bearer "):].strip():
                    return 401, {"code": "Unauthorized",
                                 "error": "No API key provided. Send 'Authorization: Bearer <key>'."}, {}
                if self.path.rstrip("/") != "/v1/responses":
                    return 404, {"code": "Not found", "error": f"no route for POST {self.path}"}, {}
                if not isinstance(body, dict) or not body.get("model") or "input" not in body:
                    return 400, {"code": "Client specified an invalid argument",
                                 "error": "body must be JSON with model and input"}, {}
                if body.get("stream"):
                    return 400, {"code": "Client specified an invalid argument",
                                 "error": "the offline fake does not stream"}, {}
                if fake.latency_ms:
                    time.sleep(fake.latency_ms / 1000)
                return 200, make_response(body), {"x-request-id": str(uuid.uuid4())}

        return Handler


def main():
    ap = argparse.ArgumentParser(description="Offline fake of xAI's Responses API.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--latency-ms", type=int, default=0, help="delay before each answer")
    ap.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = ap.parse_args()
    fake = FakeXAI(args.host, args.port, args.latency_ms, quiet=not args.verbose)
    # First stdout line tells a parent process which port was picked.
    print(f"LISTENING {fake.port}", flush=True)
    try:
        fake.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        fake.httpd.server_close()


if __name__ == "__main__":
    main()
