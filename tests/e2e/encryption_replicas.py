#!/usr/bin/env python3
"""End-to-end test of encryption across replicas: a real Synapse, two `grok-appservice`
replicas on one fresh PostgreSQL database behind the round-robin proxy (tests/e2e/rr_proxy.py),
both with `encryption.enabled`, the SAME `encryption.store_path` (a shared directory) and
`encryption.lease: 6s`; the offline fake xAI; alice as a real E2EE client (matrix-nio, the Device
class of tests/e2e/encryption.py).

    python3 tests/e2e/encryption_replicas.py

- e9a. exactly one replica logs "this replica owns the encryption device" (and keeps it: no
  second line over three lease lengths); crypto_devices, the `crypto` lease row and /keys/query
  agree on its one, cross-signed device; /metrics says grok_encryption_device_owned 1 on it and
  0 on the other;
- e9b. encrypted questions (sent until one reached each replica: the proxy notes which replica
  got each transaction) are each answered exactly once (one reply event, decrypted by alice,
  one provider call), all by the owner (the claim's lease_owner): the other leaves them queued;
- e9c. after kill -9 of the owner the other replica logs that it owns the device within
  lease + TAKEOVER_SLACK seconds, with the same device id (shared store and row, no new device,
  no store moved aside, its /metrics saying it owns it); a question sent while nobody owned the
  device and one sent after the takeover are each answered exactly once and decrypt;
- e9d. the killed replica, started again, does not take the lease while the other holds it
  (three lease lengths of silence, one "owns" line per ownership change, no "another replica
  took the encryption lease"); a last question is answered once, by the holder; no question of
  the run has two replies;
- e9e. (last, on a second fresh database and an empty store) both replicas started at the same
  moment come up, exactly one owns the device, and neither fails to open the store. The main
  part above starts r1 only once r0 is up, so that its store is made by one process.

The databases are `e2e_enc_<hex>`, created next to E2E_PG_URL's (default
postgres://postgres@127.0.0.1:5432/test) and dropped at the end (kept with KEEP=1).
GROK_APPSERVICE_BIN=path uses that binary instead of `cargo build`; KEEP=1 keeps the temp dir
(it is also kept when a check fails). The last line is `encryption_replicas: N passed, M
failed`; the exit code is non-zero if any failed.
"""

import asyncio
import json
import logging
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
import traceback
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts"))
sys.path.insert(0, HERE)
import e2e_lib as L  # noqa: E402

try:
    import nio  # noqa: E402,F401
except ImportError:
    # As encryption.py: run again under the venv's python, where nio is installed.
    L.run_under_nio(__file__)

import encryption as E  # noqa: E402  (Device, bot_keys, signature checks, reply diagnosis)
from rr_proxy import RoundRobinProxy  # noqa: E402

BOT = L.BOT_ID
API_KEY = "e2e-dummy-key"
PG_ADMIN_URL = os.environ.get("E2E_PG_URL", "postgres://postgres@127.0.0.1:5432/test")
LEASE_S = 6               # encryption.lease (its minimum is 5 s)
KEY_WAIT_S = 8            # encryption.key_wait
TAKEOVER_SLACK = 12       # s beyond the lease allowed for the other replica to own the device
START_TIMEOUT = 120
REPLY_TIMEOUT = 90
QUIET = 6                 # s of silence after a reply, for a duplicate to show up
OWNS = "this replica owns the encryption device"
DEVICE_RE = re.compile(r'device_id="?([A-Za-z0-9_]+)')

results = []  # (name, ok, detail)


def log(msg):
    L.log(msg)


def report(name, problems, info=""):
    ok = not problems
    detail = "; ".join(problems) if problems else info
    results.append((name, ok, detail))
    log(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""))
    return ok


# ---------------------------------------------------------------------------------------------
# A fresh PostgreSQL database


class PgDatabase:
    """`e2e_enc_<hex>` on the server of `admin_url`, created and dropped through psql."""

    def __init__(self, admin_url):
        self.admin_url = admin_url
        self.name = f"e2e_enc_{secrets.token_hex(4)}"
        parts = urllib.parse.urlsplit(admin_url)
        self.url = urllib.parse.urlunsplit(parts._replace(path=f"/{self.name}"))

    def _psql(self, url, sql):
        out = subprocess.run(["psql", url, "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"psql failed ({out.returncode}): {out.stderr.strip()}\n  SQL: {sql}")
        return out.stdout

    def create(self):
        self._psql(self.admin_url, f"CREATE DATABASE {self.name}")

    def drop(self):
        self._psql(self.admin_url, f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")

    def query(self, sql):
        """Rows of a SELECT as dicts; [] while the table does not exist yet."""
        try:
            text = self._psql(self.url, f"SELECT coalesce(json_agg(t), '[]'::json) FROM ({sql}) t").strip()
        except RuntimeError as e:
            if "does not exist" in str(e):
                return []
            raise
        return json.loads(text or "[]")


def sql_str(s):
    return "'" + s.replace("'", "''") + "'"


# ---------------------------------------------------------------------------------------------
# Replicas


class Replica:
    """One `grok-appservice serve` with its own config and port, the shared store and database.
    Its log (<dir>/<name>.log) is appended to across restarts; `starts` has each start's offset."""

    def __init__(self, stack, binary, name, port, registration, homeserver_url, provider_url, db_url,
                 store_path, passphrase):
        self.stack, self.binary, self.name = stack, binary, name
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = stack.path(f"config-{name}.yaml")
        self.log_path = stack.path(f"{name}.log")
        self.passphrase = passphrase
        self.proc = None
        self.starts = []  # log offsets at each start
        self.base = {
            "homeserver": {"url": homeserver_url, "server_name": L.SERVER_NAME},
            "appservice": {"registration": registration, "listen": f"127.0.0.1:{self.port}"},
            "provider": {"base_url": provider_url},
            "telemetry": {"enabled": True, "store_text": False},
        }
        self.configure(db_url, store_path)

    def configure(self, db_url, store_path):
        """(Re)writes the config for a database and a crypto store; read at the next start."""
        config = dict(self.base, database={"url": db_url},
                      encryption={"enabled": True, "store_path": store_path, "key_wait": f"{KEY_WAIT_S}s",
                                  "lease": f"{LEASE_S}s"})
        with open(self.config, "w") as f:
            json.dump(config, f, indent=2)  # JSON is valid YAML

    def stop(self, timeout=30):
        """SIGTERM (a clean shutdown releases the lease) and wait; returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.mark(f"stopped (exit {self.proc.returncode})")
        return self.proc.returncode if self.proc else None

    def spawn(self):
        with open(self.log_path, "a") as f:
            f.write(f"===== e2e: start #{len(self.starts) + 1} of {self.name} at {time.strftime('%H:%M:%S')} =====\n")
        self.starts.append(os.path.getsize(self.log_path))
        # HOSTNAME is the prefix of the replica's instance id: the lease's and the claims' owner.
        env = {"XAI_API_KEY": API_KEY, "RUST_LOG": os.environ.get("RUST_LOG", "grok_appservice=debug,info"),
               "NO_COLOR": "1", "HOSTNAME": self.name, "GROK_CRYPTO_PASSPHRASE": self.passphrase}
        self.proc = self.stack.spawn(self.name, [self.binary, "serve", "-c", self.config], env=env)
        return self

    def wait_ready(self, timeout=START_TIMEOUT):
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}; see {self.log_path}")
            return L.http_ok(f"{self.url}/health") and L.http_ok(f"{self.url}/ready")

        if not L.wait_until(ready, timeout, 0.2):
            raise RuntimeError(f"{self.name} did not answer /health and /ready within {timeout}s")
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.mark("killed with SIGKILL")
        return self.proc.returncode

    def mark(self, text):
        with open(self.log_path, "a") as f:
            f.write(f"===== e2e: {text} at {time.strftime('%H:%M:%S')} =====\n")

    def lines(self, since_start=None):
        """The log's lines, all or those since start number `since_start` (0-based)."""
        with open(self.log_path, "rb") as f:
            if since_start is not None:
                f.seek(self.starts[since_start])
            return f.read().decode(errors="replace").splitlines()

    def grep(self, needle, since_start=None):
        return [ln for ln in self.lines(since_start) if needle in ln]

    def owns(self, since_start=None):
        """(line, device id) of each "owns the encryption device" line."""
        out = []
        for ln in self.grep(OWNS, since_start):
            m = DEVICE_RE.search(ln.split(OWNS, 1)[1])
            out.append((ln, m.group(1) if m else None))
        return out


class TracingProxy(RoundRobinProxy):
    """The round-robin proxy, also noting the event ids of each transaction it forwards, so a
    check can tell which replica received a question."""

    def forward(self, method, path, headers, body):
        status, reason, out_headers, data, rec = super().forward(method, path, headers, body)
        if method == "PUT" and "/transactions/" in path:
            try:
                rec["event_ids"] = [e.get("event_id") for e in json.loads(body).get("events", [])]
            except (ValueError, AttributeError):
                rec["event_ids"] = []
        return status, reason, out_headers, data, rec

    def received(self, event_id):
        """Indices of the replicas that answered 200 to a transaction carrying `event_id`."""
        return [r["backend"] for r in self.snapshot()
                if event_id in r.get("event_ids", ()) and r["status"] == 200]


def generate_registration(stack, binary, url):
    path = stack.path("registration.yaml")
    out = subprocess.run([binary, "generate-registration", "--server-name", L.SERVER_NAME, "--url", url,
                          "-o", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"generate-registration exited {out.returncode}: {out.stdout.strip()}")
    return path


# ---------------------------------------------------------------------------------------------
# The run


class Run:
    def __init__(self, stack, loop):
        self.stack, self.loop = stack, loop
        self.db = self.proxy = self.synapse = self.fake = None
        self.replicas = []
        self.alice = None
        self.dm = None
        self.questions = {}  # event id -> (label, word)
        self.owner = None  # the replica owning the device now
        self.device_id = None

    def by_name(self, name):
        return next(r for r in self.replicas if r.name == name)

    def other(self, replica):
        return next(r for r in self.replicas if r is not replica)

    def provider_calls(self):
        return [r for r in self.fake.snapshot() if r["path"].rstrip("/") == "/v1/responses"]

    def calls_for(self, word):
        return [c for c in self.provider_calls() if word in json.dumps(c["body"].get("input"), ensure_ascii=False)]

    def claim(self, event_id):
        rows = self.db.query(f"SELECT kind, state, lease_owner, reply_event_id, attempts FROM processed_events "
                             f"WHERE event_id = {sql_str(event_id)}")
        return rows[0] if rows else None

    def recorded_device(self):
        rows = self.db.query(f"SELECT device_id FROM crypto_devices WHERE user_id = {sql_str(BOT)}")
        return rows[0]["device_id"] if rows else None

    def lease(self):
        rows = self.db.query("SELECT owner, expires_at FROM leases WHERE name = 'crypto'")
        return rows[0] if rows else None

    def raw_replies(self, event_id):
        server = self.alice.plain_client()
        return [e for e in server.messages(self.dm, limit=200)
                if e.get("sender") == BOT and L.in_reply_to(e) == event_id]

    def ask(self, label):
        """Sends an encrypted question in the DM; returns (event id, word, sent at)."""
        word = E.secret_word()
        q_id = self.alice.say(self.dm, f"{word}: {label}?")
        self.questions[q_id] = (label, word)
        return q_id, word, time.time()

    def answered_once(self, q_id, word, sent_at, owner):
        """Problems with the answer to one question: exactly one reply event, readable and
        encrypted, one provider call, the claim answered by `owner`; and the reply's delay."""
        problems = []
        reply = self.alice.wait_reply(self.dm, q_id, timeout=REPLY_TIMEOUT)
        if not reply:
            return [f"no readable reply within {REPLY_TIMEOUT}s: "
                    + E.reply_diagnosis(self.alice, self.dm, q_id)], None
        delay = reply.get("origin_server_ts", 0) / 1000 - sent_at
        if reply["wire"] != "m.room.encrypted":
            problems.append(f"the reply reached alice as {reply['wire']}, want m.room.encrypted")
        if word not in reply["content"].get("body", ""):
            problems.append(f"the decrypted reply does not echo the question: {reply['content'].get('body', '')[:120]!r}")
        self.alice.wait(lambda: False, QUIET)
        raw = self.raw_replies(q_id)
        readable = self.alice.replies(self.dm, q_id)
        if len(raw) != 1 or len(readable) != 1:
            problems.append(f"{len(raw)} reply events on the server ({len(readable)} readable), want exactly 1: "
                            f"{[e['event_id'] for e in raw]}")
        if any(e.get("type") != "m.room.encrypted" for e in raw):
            problems.append(f"the server holds a reply unencrypted: {[e.get('type') for e in raw]}")
        n_calls = len(self.calls_for(word))
        if n_calls != 1:
            problems.append(f"the provider got {n_calls} requests for the question, want 1")
        claim = self.claim(q_id)
        if not claim or claim["state"] != "answered":
            problems.append(f"the question's claim is {claim}, want answered")
        elif owner and not claim["lease_owner"].startswith(owner.name + "-"):
            problems.append(f"the question was answered by {claim['lease_owner']}, not by the device's owner "
                            f"{owner.name}")
        return problems, delay


def owns_lines(run):
    return {r.name: r.owns() for r in run.replicas}


def keys_problems(run, device_id):
    """The bot's published keys: exactly `device_id`, cross-signed."""
    keys = E.bot_keys(run.alice.plain_client() if run.alice else run.synapse.register("erin"))
    devices = (keys.get("device_keys") or {}).get(BOT) or {}
    problems = []
    if list(devices) != [device_id]:
        problems.append(f"/keys/query lists the bot's devices {sorted(devices)}, want only {device_id}")
    master = (keys.get("master_keys") or {}).get(BOT)
    ssk = (keys.get("self_signing_keys") or {}).get(BOT)
    m_id, m_pub = E.only_key(master)
    s_id, s_pub = E.only_key(ssk)
    if not m_pub or not E.signed_by(ssk or {}, BOT, m_id, m_pub):
        problems.append("no master key, or a self-signing key it did not sign")
    elif device_id in devices and not E.signed_by(devices[device_id], BOT, s_id, s_pub):
        problems.append(f"device {device_id} is not signed by the self-signing key")
    return problems, m_pub


def start_error(replica):
    """The error lines a replica that exited at start printed (without the backtrace)."""
    lines = replica.lines(len(replica.starts) - 1)
    head = []
    for ln in lines:
        if "Stack backtrace" in ln:
            break
        if ln.strip() and not ln.startswith("====="):
            head.append(ln.strip())
    return " | ".join(head)[:500]


def scenario_race(run, make_db):
    """e9e. A first deployment: both replicas started at the same moment on a fresh database and
    an EMPTY shared store. Both must come up, exactly one must own the device, and the store must
    stay usable (nobody logs that it cannot open it)."""
    name = "e9e. two replicas started together on an empty shared store: both up, one owner"
    problems = []
    for r in run.replicas:
        r.stop()
    db = make_db()
    store = run.stack.path("crypto-race")
    for r in run.replicas:
        r.configure(db.url, store)
    for r in run.replicas:  # at the same moment
        r.spawn()
    starts = {r.name: len(r.starts) - 1 for r in run.replicas}
    for r in run.replicas:
        try:
            r.wait_ready()
        except RuntimeError as e:
            problems.append(f"{r.name} did not come up: {e}: {start_error(r)}")
    up = [r for r in run.replicas if r.alive()]

    def owners():
        return {r.name: r.owns(starts[r.name]) for r in run.replicas if r.owns(starts[r.name])}

    if up and L.wait_until(owners, START_TIMEOUT, 0.5):
        time.sleep(3 * LEASE_S)
    own = owners()
    if len(own) != 1 or any(len(v) != 1 for v in own.values()):
        problems.append(f"'owns' lines {({n: len(v) for n, v in own.items()})} within {START_TIMEOUT}s "
                        f"(+{3 * LEASE_S}s), want exactly one, of one replica")
    for r in run.replicas:
        hits = [ln for ln in r.lines(starts[r.name]) if "cannot open the encryption device" in ln]
        if hits:
            problems.append(f"{r.name} cannot open the device: {hits[0][:300]}")
    # Whether the store the race left can be opened at all (user_version and kv 'version').
    version = store_version(store)
    outcome = (f"{', '.join(own) or 'nobody'} owns device {next(iter(own.values()))[0][1] if own else None}; "
               f"store schema version {version}")
    report(name, problems + ([f"(outcome: {outcome})"] if problems else []), f"both up; {outcome}")


def store_version(store):
    """The crypto store's schema version as matrix-sdk-sqlite keeps it (kv 'version'), or why not."""
    path = os.path.join(store, "matrix-sdk-crypto.sqlite3")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT value FROM kv WHERE key = 'version'").fetchone()
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        finally:
            con.close()
        return f"{row[0].hex() if row else None} ({len(tables)} tables)"
    except Exception as e:
        return f"unreadable ({e})"


def owned_gauge(replica):
    """The replica's grok_encryption_device_owned, from its /metrics (None if absent)."""
    try:
        with urllib.request.urlopen(f"{replica.url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    found = re.search(r"^grok_encryption_device_owned (\d+)$", text, re.M)
    return int(found.group(1)) if found else None


def gauge_problems(owner, other):
    """What /metrics says wrong about who owns the device: the owner 1, the other 0 (the
    gauge the README's alerts sum); the owner's figure is waited for briefly, as it is set
    when the device opens."""
    problems = []
    if L.wait_until(lambda: owned_gauge(owner) == 1, 10, 0.5) is None:
        problems.append(f"{owner.name}'s /metrics says grok_encryption_device_owned {owned_gauge(owner)}, want 1")
    if other is not None and owned_gauge(other) != 0:
        problems.append(f"{other.name}'s /metrics says grok_encryption_device_owned {owned_gauge(other)}, want 0")
    return problems


def scenario_one_owner(run):
    """e9a. Both replicas started together: exactly one owns the device, and keeps owning it."""
    name = "e9a. two replicas on one store: exactly one owns the encryption device"
    problems = []
    first = L.wait_until(lambda: any(owns_lines(run).values()), START_TIMEOUT, 0.5)
    if not first:
        return report(name, [f"no replica logged {OWNS!r} within {START_TIMEOUT}s"])
    # The other retries every lease/3: three lease lengths give it nine chances to take it too.
    time.sleep(3 * LEASE_S)
    owns = owns_lines(run)
    holders = [n for n, lines in owns.items() if lines]
    if len(holders) != 1:
        problems.append(f"{len(holders)} replicas own the device: " + "; ".join(
            f"{n}: {[ln[:160] for ln, _ in owns[n]]}" for n in holders))
    for n in holders:
        if len(owns[n]) != 1:
            problems.append(f"{n} logged {len(owns[n])} 'owns' lines, want 1: {[ln[:160] for ln, _ in owns[n]]}")
    if not holders:
        return report(name, problems)
    run.owner = run.by_name(holders[0])
    run.device_id = owns[holders[0]][0][1]
    if not run.device_id:
        problems.append(f"the 'owns' line names no device_id: {owns[holders[0]][0][0][:200]}")
    recorded = run.recorded_device()
    if recorded != run.device_id:
        problems.append(f"crypto_devices names {recorded!r}, the owner logged {run.device_id!r}")
    lease = run.lease()
    if not lease or not lease["owner"].startswith(run.owner.name + "-"):
        problems.append(f"the crypto lease row is {lease}, want an owner {run.owner.name}-…")
    for r in run.replicas:
        for bad in ("another replica took the encryption lease", "dropping the device",
                    "cannot open the encryption device"):
            hits = r.grep(bad)
            if hits:
                problems.append(f"{r.name} logged {bad!r}: {hits[0][:200]}")
    kp, _ = keys_problems(run, run.device_id)
    problems += kp
    problems += gauge_problems(run.owner, run.other(run.owner))
    report(name, problems, f"{run.owner.name} owns device {run.device_id} (lease {lease and lease['owner']}); "
                           f"{run.other(run.owner).name} logged no 'owns' line in {3 * LEASE_S}s")


def setup_alice(run):
    run.synapse.register("alice", E.PASSWORD)
    run.alice = E.Device(run.loop, run.synapse.url, f"@alice:{L.SERVER_NAME}",
                         run.stack.path("nio", "alice-1"), "alice-1").login()
    run.dm = run.alice.create_encrypted_room(invite=[BOT], is_direct=True)
    if not run.alice.plain_client().wait_joined(run.dm, BOT, 30):
        raise RuntimeError("the bot did not join alice's encrypted DM within 30s")
    if not run.alice.wait(lambda: run.alice.devices_of(BOT), 30):
        raise RuntimeError("alice sees no device of the bot within 30s")


def scenario_answered_once(run):
    """e9b. With both replicas up behind the proxy, encrypted questions are answered once each,
    by the owner; Synapse's transactions reach both replicas."""
    name = "e9b. encrypted questions answered exactly once, by the owner"
    if not run.owner:
        return report(name, ["skipped: no owner (e9a failed)"])
    problems = []
    seen = sorted(run.alice.devices_of(BOT))
    if seen != [run.device_id]:
        problems.append(f"alice sees the bot's devices {seen}, want [{run.device_id}]")
    delays, via = [], []
    other = run.other(run.owner)
    names = {i: r.name for i, r in enumerate(run.replicas)}
    # Questions until one of them reached the replica without the device (the ring alternates,
    # so two or three do), which must leave it queued for the owner, and one reached the owner.
    labels = ["what is the capital of Peru", "and the capital of Chile", "and the capital of Colombia",
              "and the capital of Paraguay"]
    for n, label in enumerate(labels):
        q_id, word, at = run.ask(label)
        p, delay = run.answered_once(q_id, word, at, run.owner)
        problems += [f"{label!r}: {x}" for x in p]
        delays.append(delay)
        via.append("+".join(names.get(i, "?") for i in run.proxy.received(q_id)) or "?")
        if n >= 1 and any(other.name in v for v in via) and any(run.owner.name in v for v in via):
            break
        # Each question's transaction is followed by one carrying the bot's reply, so the ring
        # hands every question to the same replica: a topic change (a transaction the bot
        # ignores) shifts it by one.
        if other.name not in via[-1]:
            marks = len(run.proxy.snapshot())
            run.alice.plain_client().call("PUT", f"/rooms/{L.q(run.dm)}/state/m.room.topic/",
                                          {"topic": f"shift {n}"})
            L.wait_until(lambda: any("/transactions/" in r["path"] for r in run.proxy.snapshot()[marks:]), 10, 0.2)
    if not any(other.name in v for v in via):
        problems.append(f"no question's transaction reached {other.name} (the replica without the device) "
                        f"in {len(via)} tries: received by {via}; the check proves less")
    puts = [r for r in run.proxy.snapshot() if r["method"] == "PUT" and "/transactions/" in r["path"]]
    per = {}
    for r in puts:
        per[r["backend"]] = per.get(r["backend"], 0) + 1
    if not all(per.get(i, 0) for i in names):
        problems.append(f"transaction PUTs per replica {per}: the proxy did not reach both")
    report(name, problems, f"{len(via)} questions received by {via}, each answered once by {run.owner.name} "
                           f"({', '.join(f'{d:.1f}s' for d in delays if d is not None)} after the question); "
                           f"transaction PUTs {({names.get(k, k): v for k, v in per.items()})}")


def scenario_failover(run):
    """e9c. kill -9 of the owner: the other replica owns the same device after the lease runs
    out; a question sent meanwhile and one sent after are each answered once."""
    name = f"e9c. kill -9 of the owner: the other owns the same device within lease+{TAKEOVER_SLACK}s"
    if not run.owner:
        return report(name, ["skipped: no owner (e9a failed)"])
    problems = []
    victim, heir = run.owner, run.other(run.owner)
    before = len(heir.owns())
    _, master_before = keys_problems(run, run.device_id)
    aside = {n for n in os.listdir(run.stack.dir) if ".replaced-" in n}
    killed_at = time.time()
    victim.kill9()
    # Sent while nobody owns the device: the survivor must queue it for the next owner.
    q_gap, w_gap, at_gap = run.ask("and the capital of Bolivia (sent during the failover)")
    took = L.wait_until(lambda: len(heir.owns()) > before, 60, 0.2)
    takeover = time.time() - killed_at if took else None
    if not took:
        return report(name, [f"{heir.name} did not log {OWNS!r} within 60s of the kill; its last lines: "
                             + repr(heir.lines()[-5:])])
    line, device = heir.owns()[-1]
    run.owner = heir
    if takeover > LEASE_S + TAKEOVER_SLACK:
        problems.append(f"{heir.name} owned the device {takeover:.1f}s after the kill, want <= lease "
                        f"{LEASE_S}s + {TAKEOVER_SLACK}s")
    if device != run.device_id:
        problems.append(f"{heir.name} owns device {device}, want the same {run.device_id} (shared store and row)")
    recorded = run.recorded_device()
    if recorded != run.device_id:
        problems.append(f"crypto_devices names {recorded!r} after the takeover, want {run.device_id}")
    lease = run.lease()
    if not lease or not lease["owner"].startswith(heir.name + "-"):
        problems.append(f"the crypto lease row is {lease} after the takeover, want {heir.name}-…")
    for bad in ("creating a new device", "store was lost", "moved aside", "cannot open the encryption device"):
        hits = heir.grep(bad)
        if hits:
            problems.append(f"{heir.name} logged {bad!r}: {hits[0][:200]}")
    if {n for n in os.listdir(run.stack.dir) if ".replaced-" in n} - aside:
        problems.append("the shared crypto store was moved aside")
    kp, master_after = keys_problems(run, run.device_id)
    problems += kp
    if master_before and master_after != master_before:
        problems.append("the bot's master key changed across the takeover")
    problems += gauge_problems(heir, None)
    p, d_gap = run.answered_once(q_gap, w_gap, at_gap, heir)
    problems += [f"the question sent during the failover: {x}" for x in p]
    q2, w2, at2 = run.ask("and the capital of Ecuador")
    p, d2 = run.answered_once(q2, w2, at2, heir)
    problems += [f"the question after the takeover: {x}" for x in p]
    fmt = lambda d: f"{d:.1f}s" if d is not None else "-"  # noqa: E731
    report(name, problems, f"{heir.name} owned device {device} {takeover:.1f}s after the kill of {victim.name}; "
                           f"the question sent during the failover answered {fmt(d_gap)} after it, "
                           f"the next one {fmt(d2)} after it; each once")


def scenario_restart(run):
    """e9d. The killed replica comes back and leaves the lease to its holder."""
    name = "e9d. the restarted replica does not take the lease from its holder"
    if not run.owner:
        return report(name, ["skipped: no owner"])
    holder = run.owner
    back = run.other(holder)
    problems = []
    back.spawn()
    back.wait_ready()
    start = len(back.starts) - 1
    time.sleep(3 * LEASE_S)
    if back.owns(start):
        problems.append(f"{back.name} took the device after its restart while {holder.name} held it: "
                        f"{[ln[:200] for ln, _ in back.owns(start)]}")
    for bad in ("another replica took the encryption lease", "dropping the device",
                "could not be renewed in time"):
        hits = holder.grep(bad)
        if hits:
            problems.append(f"{holder.name} logged {bad!r}: {hits[0][:200]}")
    lease = run.lease()
    if not lease or not lease["owner"].startswith(holder.name + "-"):
        problems.append(f"the crypto lease row is {lease}, want {holder.name}-…")
    q3, w3, at3 = run.ask("and the capital of Uruguay")
    p, d3 = run.answered_once(q3, w3, at3, holder)
    problems += [f"the question after the restart: {x}" for x in p]
    # Every question of the run: one reply each; one "owns" line per ownership change (2).
    run.alice.wait(lambda: False, QUIET)
    counts = {q: len(run.raw_replies(q)) for q in run.questions}
    bad = {run.questions[q][0]: n for q, n in counts.items() if n != 1}
    if bad:
        problems.append(f"questions without exactly one reply: {bad}")
    owns = owns_lines(run)
    total = sum(len(v) for v in owns.values())
    if total != 2:
        problems.append(f"{total} 'owns' lines in all, want 2 (one per ownership change): "
                        + "; ".join(f"{n}: {[ln[:120] for ln, _ in v]}" for n, v in owns.items()))
    report(name, problems, f"{back.name} stayed without the device for {3 * LEASE_S}s after its restart; "
                           f"{holder.name} kept it; last question answered once "
                           f"{f'{d3:.1f}s' if d3 is not None else '-'} after it; {len(counts)} questions, "
                           f"one reply each; 'owns' lines {({n: len(v) for n, v in owns.items()})}")


SCENARIOS = [("e9a", scenario_one_owner), ("e9b", scenario_answered_once),
             ("e9c", scenario_failover), ("e9d", scenario_restart)]


def main():
    started = time.monotonic()
    keep = os.environ.get("KEEP") == "1"
    loop = asyncio.new_event_loop()
    timings = []
    with L.Stack(keep=keep, prefix="grok-encryption-replicas-") as stack:
        nio_log = stack.path("nio.log")
        handler = logging.FileHandler(nio_log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("nio").addHandler(handler)
        logging.getLogger("nio").setLevel(logging.INFO)
        logging.getLogger("nio").propagate = False
        stack.logs["nio"] = nio_log
        run = Run(stack, loop)
        up = False
        dbs = []

        def make_db():
            db = PgDatabase(PG_ADMIN_URL)
            dbs.append(db)
            db.create()
            return db

        try:
            venv = L.ensure_venv()
            binary = L.build_binary()
            run.fake = stack.start_fake_xai()
            run.db = make_db()
            passphrase = "e2e-crypto-" + secrets.token_hex(12)
            store = stack.path("crypto-shared")
            # The proxy first (the registration names it), its backends' ports chosen up front.
            names = ["r0", "r1"]
            ports = [L.free_port() for _ in names]
            run.proxy = TracingProxy(ports).start()
            registration = generate_registration(stack, binary, run.proxy.url)
            run.synapse = L.Synapse(stack, venv, registration).start()
            for n, port in zip(names, ports):
                run.replicas.append(Replica(stack, binary, n, port, registration, run.synapse.url,
                                            run.fake.base_url, run.db.url, store, passphrase))
            # r1 starts as soon as r0 is up: both still race for the lease (taken a few seconds
            # after start), but the empty store is created by one of them (see e9e).
            run.replicas[0].spawn().wait_ready()
            run.replicas[1].spawn().wait_ready()
            up = True
            log(f"encryption_replicas: up in {time.monotonic() - started:.0f}s: synapse {run.synapse.url}, "
                f"proxy {run.proxy.url} -> {', '.join(f'{r.name} {r.url}' for r in run.replicas)}, "
                f"db {run.db.name}, store {store}, dir {stack.dir}")
        except Exception as e:
            traceback.print_exc()
            report("setup", [f"{type(e).__name__}: {e}"])
        if up:
            for key, scenario in SCENARIOS:
                t0 = time.monotonic()
                try:
                    if key == "e9b":
                        setup_alice(run)
                    scenario(run)
                except Exception as e:
                    traceback.print_exc()
                    report(key, [f"{type(e).__name__}: {e}"])
                timings.append((key, time.monotonic() - t0))
            t0 = time.monotonic()
            try:
                scenario_race(run, make_db)
            except Exception as e:
                traceback.print_exc()
                report("e9e", [f"{type(e).__name__}: {e}"])
            timings.append(("e9e", time.monotonic() - t0))
        if run.alice:
            run.alice.close()
        failed = sum(1 for _, ok, _ in results if not ok)
        for r in run.replicas:
            if r.alive():
                r.proc.send_signal(signal.SIGTERM)
        for r in run.replicas:
            try:
                if r.proc:
                    r.proc.wait(30)
            except subprocess.TimeoutExpired:
                r.proc.kill()
        if run.proxy:
            run.proxy.stop()
        if failed:
            stack.keep = True
            stack.print_log_tails()
            log(f"encryption_replicas: logs kept in {stack.dir}")
    loop.close()
    for db in dbs:
        if keep:
            log(f"encryption_replicas: database kept: {db.url}")
            continue
        try:
            db.drop()
        except Exception as e:
            log(f"encryption_replicas: dropping database {db.name} failed: {e}")
    for name, ok, detail in results:
        log(f"encryption_replicas:   {'PASS' if ok else 'FAIL'}  {name}" + ("" if ok else f"  -- {detail[:400]}"))
    log("encryption_replicas: took " + ", ".join(f"{k} {t:.0f}s" for k, t in timings)
        + f"; {time.monotonic() - started:.0f}s in all")
    print(f"encryption_replicas: {len(results) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
