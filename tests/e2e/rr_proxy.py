"""A small round-robin HTTP forwarder for the multi-replica end-to-end test (tests/e2e/replicas.py).

It stands where an operator's load balancer would: Synapse's registration URL points at it, and
it spreads successive requests over the replicas' ports in turn, forwarding method, path (with
the query string), headers and body, and passing the replica's answer back unchanged.

When a replica is down:
  - the connection is refused (or cannot be made): nothing reached the replica, so the request
    goes to the next replica in the ring (what nginx's `proxy_next_upstream error` and HAProxy's
    `option redispatch` do). This is safe for any request, and it keeps a dead replica from
    turning a third of Synapse's pushes into failures, each of which would make Synapse back off
    (2, 4, 8 ... s) and stretch the run.
  - the connection breaks after the request was sent (the replica was killed mid-request, or it
    timed out): the replica may have acted on it, so the proxy does not replay it; it answers
    502 and Synapse retries the same txnId later, usually on another replica. That is the case
    the test is after: a retried transaction landing on a different replica.
  - the replica answers (any status, e.g. 503 while it shuts down or its database is down): the
    answer is passed through; Synapse retries non-2xx itself.

Standard library only. Every forwarded request is recorded (time, method, path, backend,
status), so the test can show which replica saw which transaction.

Fault hook: `drop_next_answers(n)` makes the proxy swallow the next `n` successful answers to
transaction PUTs and answer 502 instead, as a load balancer does when its upstream timeout fires
just after the replica finished. The replica has acted on the transaction, Synapse has not
heard so, and its retry (same txnId) goes to the next replica in the ring.
"""

import http.client
import itertools
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own business, never forwarded.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-connection",
}


class RoundRobinProxy:
    """`RoundRobinProxy([port, ...]).start()`; `url` is what Synapse is told to use."""

    def __init__(self, backend_ports, host="127.0.0.1", port=0, timeout=60):
        self.backends = [("127.0.0.1", p) for p in backend_ports]
        self.timeout = timeout
        self._ring = itertools.cycle(range(len(self.backends)))
        self._lock = threading.Lock()
        self.records = []  # dicts: time, method, path, backend (index or None), status, tried
        self.httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = None
        self._drop = 0

    def drop_next_answers(self, n=1):
        with self._lock:
            self._drop += n

    def _take_drop(self, method, path, status):
        if method != "PUT" or "/transactions/" not in path or status != 200:
            return False
        with self._lock:
            if self._drop > 0:
                self._drop -= 1
                return True
        return False

    def start(self):
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rr-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def snapshot(self):
        with self._lock:
            return list(self.records)

    def _next(self):
        with self._lock:
            return next(self._ring)

    def forward(self, method, path, headers, body):
        """(status, reason, headers, body, record) for one request, per the policy above."""
        first = self._next()
        n = len(self.backends)
        tried = []
        for k in range(n):
            idx = (first + k) % n
            host, port = self.backends[idx]
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            try:
                conn.connect()
            except OSError:
                tried.append(idx)
                conn.close()
                continue  # nothing was sent: the next replica may take it
            tried.append(idx)
            try:
                conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for k2, v in headers:
                    conn.putheader(k2, v)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
                out_headers = [(k2, v) for k2, v in resp.getheaders()
                               if k2.lower() not in HOP_BY_HOP and k2.lower() != "content-length"]
                if self._take_drop(method, path, resp.status):
                    msg = b'{"errcode":"M_UNKNOWN","error":"bad gateway: upstream answer dropped (test fault)"}'
                    return 502, "Bad Gateway", [("Content-Type", "application/json")], msg, \
                        {"backend": idx, "tried": tried, "dropped": True, "upstream_status": resp.status}
                return resp.status, resp.reason, out_headers, data, {"backend": idx, "tried": tried}
            except (OSError, http.client.HTTPException) as e:
                # Sent (maybe in part) and then lost: never replay, let the client retry.
                msg = f'{{"errcode":"M_UNKNOWN","error":"bad gateway: replica {idx}: {type(e).__name__}"}}'
                return 502, "Bad Gateway", [("Content-Type", "application/json")], msg.encode(), \
                    {"backend": idx, "tried": tried, "error": f"{type(e).__name__}: {e}"}
            finally:
                conn.close()
        msg = b'{"errcode":"M_UNKNOWN","error":"bad gateway: no replica reachable"}'
        return 502, "Bad Gateway", [("Content-Type", "application/json")], msg, {"backend": None, "tried": tried}

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive towards Synapse; every answer has a length

            def log_message(self, fmt, *args):
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                headers = [(k, v) for k, v in self.headers.items()
                           if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
                started = time.time()
                status, reason, out_headers, data, rec = proxy.forward(self.command, self.path, headers, body)
                rec.update(time=started, method=self.command, path=self.path, status=status,
                           ms=int((time.time() - started) * 1000))
                with proxy._lock:
                    proxy.records.append(rec)
                self.send_response(status, reason)
                for k, v in out_headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _handle

        return Handler
