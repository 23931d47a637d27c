#!/usr/bin/env python3
"""An offline stand-in for xAI's Responses API, for the end-to-end test and the demo.

It answers `POST /v1/responses` in the documented response shape, so the bot's real provider
client parses it, but no model runs: every answer says it came from an offline fake.

Tools: a request with `tools: [{"type": "web_search"}]` is answered as if one search ran
(citations, url_citation annotations, server_side_tool_usage_details); `reasoning.effort`
adds reasoning tokens. `--cost-ticks N` (or the `cost_ticks` attribute) fixes the reported cost.

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
# $5 per 1,000 web searches.
TICKS_PER_WEB_SEARCH = 50_000_000


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


def _tools(body):
    """The `type`s of the request's tools (e.g. {"web_search"})."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return set()
    return {t.get("type") for t in tools if isinstance(t, dict)}


# What a web search "finds": fixed, so a test can look for the links in the bot's reply.
WEB_SOURCES = [
    ("https://weather.example.org/paris", "Paris weather today"),
    ("https://news.example.com/today", "Today's news"),
]


# Seconds between two streamed words: slow enough that a streamed answer takes a few seconds.
STREAM_GAP_S = 0.15


def make_response(body, cost_ticks=None):
    """A completed Responses API object for the request `body`, as xAI documents it.

    A request with a `web_search` tool gets one `web_search_call` output item, the response's
    `citations` list, `url_citation` annotations on the text and
    `usage.server_side_tool_usage_details.web_search_calls`. A request with `reasoning.effort`
    reports `output_tokens_details.reasoning_tokens` (part of `output_tokens`, as on xAI).
    `cost_ticks` fixes `usage.cost_in_usd_ticks`; by default it follows the token counts.
    """
    question = _last_user_text(body)
    answer = "[offline fake xAI] You asked: " + question[:80]
    web = "web_search" in _tools(body)
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else None
    output = []
    annotations = []
    citations = []
    if web:
        output.append({
            "type": "web_search_call",
            "id": "ws_" + uuid.uuid4().hex,
            "status": "completed",
            "action": {"type": "search", "query": question[:80]},
        })
        answer += " (searched the web)"
        for url, title in WEB_SOURCES:
            citations.append(url)
            annotations.append({"type": "url_citation", "url": url, "title": title,
                                "start_index": 0, "end_index": len(answer)})
    all_input = json.dumps(body.get("input", ""), ensure_ascii=False) + str(body.get("instructions") or "")
    n_in, n_out = _count_tokens(all_input), _count_tokens(answer)
    n_reasoning = 0
    if reasoning and reasoning.get("effort"):
        n_reasoning = {"low": 16, "medium": 64, "high": 256}.get(reasoning["effort"], 64)
        n_out += n_reasoning
    output.append({
        "type": "message",
        "id": "msg_" + uuid.uuid4().hex,
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": answer, "annotations": annotations}],
    })
    if cost_ticks is None:
        cost_ticks = n_in * TICKS_PER_INPUT_TOKEN + n_out * TICKS_PER_OUTPUT_TOKEN
        if web:
            cost_ticks += TICKS_PER_WEB_SEARCH
    usage = {
        "input_tokens": n_in,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": n_out,
        "output_tokens_details": {"reasoning_tokens": n_reasoning},
        "total_tokens": n_in + n_out,
        "num_sources_used": len(citations),
        "num_server_side_tools_used": 1 if web else 0,
        "server_side_tool_usage_details": {"web_search_calls": 1 if web else 0},
        "cost_in_usd_ticks": cost_ticks,
    }
    response = {
        "id": "resp_" + uuid.uuid4().hex,
        "object": "response",
        "created_at": int(time.time()),
        "model": body.get("model") or "grok-fake",
        "status": "completed",
        "output": output,
        "usage": usage,
    }
    if web:
        response["citations"] = citations
    if reasoning:
        response["reasoning"] = {"effort": reasoning.get("effort"), "summary": None}
    return response


class FakeXAI:
    """The fake server; `requests` holds every request received (method, path, headers, body)."""

    def __init__(self, host="127.0.0.1", port=0, latency_ms=0, quiet=True, cost_ticks=None):
        self.latency_ms = latency_ms
        # usage.cost_in_usd_ticks of every answer; None: computed from the token counts.
        # A test may change it while the server runs.
        self.cost_ticks = cost_ticks
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
                auth = self.headers.get("Authorization", "")
                key = auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else ""
                # The start-up check's endpoints, shaped like xAI's: a key starting with "bad"
                # is refused (400, as xAI answers an unknown key), model ids not starting with
                # "grok" are unknown (404).
                if self.path == "/v1/api-key":
                    if not key or key.startswith("bad"):
                        return self._send(400, {"code": "Client specified an invalid argument",
                                                "error": "Incorrect API key provided: xa***ey."})
                    return self._send(200, {"redacted_api_key": "xai-...fake", "name": "fake",
                                            "api_key_blocked": False, "api_key_disabled": False,
                                            "team_blocked": False, "acls": ["api-key:model:*"]})
                if self.path.startswith("/v1/models/"):
                    model = self.path[len("/v1/models/"):]
                    if model.startswith("grok"):
                        return self._send(200, {"id": model, "object": "model", "owned_by": "xai"})
                    return self._send(404, {"code": "Some requested entity was not found",
                                            "error": f"The model {model} does not exist"})
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
                if status == 200 and isinstance(body, dict) and body.get("stream"):
                    return self._stream(answer, headers)
                self._send(status, answer, headers)

            def _stream(self, answer, headers):
                """The answer as Responses API server-sent events: response.created, one
                output_text.delta per word, STREAM_GAP_S apart, then response.completed with
                the whole response and its usage. No [DONE] line, as on xAI."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.close_connection = True

                def event(kind, data):
                    data = dict(data, type=kind)
                    self.wfile.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())
                    self.wfile.flush()

                event("response.created", {"response": {"id": answer["id"], "status": "in_progress"}})
                text = answer["output"][-1]["content"][0]["text"]
                words = text.split(" ")
                for i, word in enumerate(words):
                    time.sleep(STREAM_GAP_S)
                    event("response.output_text.delta", {"delta": word + (" " if i < len(words) - 1 else "")})
                event("response.completed", {"response": answer})

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
                if fake.latency_ms:
                    time.sleep(fake.latency_ms / 1000)
                return 200, make_response(body, fake.cost_ticks), {"x-request-id": str(uuid.uuid4())}

        return Handler


def main():
    ap = argparse.ArgumentParser(description="Offline fake of xAI's Responses API.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--latency-ms", type=int, default=0, help="delay before each answer")
    ap.add_argument("--cost-ticks", type=int, default=None, metavar="N",
                    help="report usage.cost_in_usd_ticks = N for every answer (1 USD = 10^10 ticks); "
                         "default: computed from the token counts")
    ap.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = ap.parse_args()
    fake = FakeXAI(args.host, args.port, args.latency_ms, quiet=not args.verbose, cost_ticks=args.cost_ticks)
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
