#!/usr/bin/env python3
"""Multi-replica end-to-end test (issue 6): nothing users asked is lost, nothing is answered twice.

    python3 tests/e2e/replicas.py            # both tests: postgres (3 replicas) then sqlite (1)
    python3 tests/e2e/replicas.py postgres   # or only one of them
    python3 tests/e2e/replicas.py sqlite

postgres: a real Synapse, PostgreSQL (a fresh schema `e2e_<hex>` in E2E_PG_URL, default
postgres://postgres@127.0.0.1:5432/test, dropped at the end), a fake xAI answering after a
random 0.5-3 s, and three `grok-appservice` replicas behind a round-robin proxy on loopback
(tests/e2e/rr_proxy.py; Synapse's registration URL is the proxy). Ten users send 200 addressed
messages (DMs, plus `grok: ...` in a group room) and some not-addressed chatter in the group
room over about a minute. Meanwhile: one replica is killed with SIGKILL while it holds claims and
started again, another gets SIGTERM (and is started again once it has exited), the
replicas' PostgreSQL backends are terminated once, and twice the proxy swallows a replica's
200 to a transaction and answers 502, so Synapse retries that txnId and the ring hands the retry
to another replica. Then, reading back through the client-server
API as the users: every addressed message has exactly one reply from the bot, no chatter has
one, the budget counters equal the recomputation from the reservation rows, and `request_log`
has exactly one `ok` row per answered event.

sqlite: the same with one replica on SQLite and no proxy (kill -9 and restart, SIGTERM and
restart; there is no database connection to cut).

The replicas run with the bot's DEFAULT claim lease and recovery interval (no override), so the
killed replica's claims must be taken over within seconds: the run fails when the kill -9 failover
(kill -> last reply to a message the killed replica held) or the tail (last message sent -> last
reply) exceeds FAILOVER_LIMIT (30 s). Provider calls are counted per message from the fake xAI's
request log: a message may be paid twice only if its call was in flight on the killed replica
(the fake had received it before the kill, and no reply had been sent by then). GROK_APPSERVICE_BIN=path uses that
binary instead of `cargo build`; KEEP=1 keeps the temp dirs and the schema (they are kept on
failure too, except the schema, which is dropped unless KEEP=1). The last line is
`replicas: N passed, M failed`; the exit code is non-zero when a check failed.
"""

import json
import os
import random
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts"))
sys.path.insert(0, HERE)
import e2e_lib as L  # noqa: E402
from rr_proxy import RoundRobinProxy  # noqa: E402
import fake_xai  # noqa: E402

BOT = L.BOT_ID
API_KEY = "e2e-dummy-key"
PG_ADMIN_URL = os.environ.get("E2E_PG_URL", "postgres://postgres@127.0.0.1:5432/test")

# appservice.claim_lease and appservice.recovery_interval are NOT set: the defaults are under test.
RESERVATION_TTL = 60      # s, limits.reservation_ttl (its minimum)
# The bot requires reservation_ttl >= 3 x (provider.max_retries + 1) x provider.timeout_secs
# (+ 30 s per retry): a 20 s timeout without retries fits 60 s. The fake never fails or stalls.
PROVIDER_TIMEOUT, PROVIDER_RETRIES = 20, 0
FAILOVER_LIMIT = 30       # s: kill -> last orphan reply, and last message -> last reply
# Only to check that the harness catches slow failover (e.g. E2E_APPSERVICE='{"claim_lease": "45s"}'):
# a JSON object merged into every replica's `appservice` section. Unset in CI.
APPSERVICE_OVERRIDE = json.loads(os.environ.get("E2E_APPSERVICE") or "{}")
LATENCY_MS = (500, 3000)  # the fake provider's answer delay, uniform per request

N_USERS = 10
PER_USER = 20             # addressed messages per user: 200 in all
GROUP_USERS = 4           # u0..u3 are in the group room too
GROUP_ADDRESSED = 4       # of each group user's PER_USER, sent as `grok: ...` in the group
GROUP_CHATTER = 8         # not-addressed messages per group user
SEND_WINDOW = 60          # s over which the messages are sent
# When the disruptions happen, in s after sending started.
T_KILL, KILL_DOWN = 10, 3
T_TERM, TERM_DOWN = 25, 4
T_DB = 40
T_DROP = (18, 50)         # the proxy swallows a transaction's 200 (postgres only)
REPLY_TIMEOUT = 120       # s after the last message: a generous deadline, not a lease multiple
QUIET = 8                 # s of silence after the last reply, to let a late duplicate show up

TOPICS = ["owls", "tea", "bridges", "volcanoes", "jazz", "sailing", "bread", "comets", "maps",
          "chess", "bees", "glass", "rivers", "kites", "moss", "lighthouses", "cheese", "clocks"]
CHATTER = ["anyone up for lunch later", "the coffee machine is broken again", "nice weather today",
           "I pushed the slides to the shared folder", "see you all at the standup",
           "who took my stapler", "the train was late this morning", "back in ten minutes"]

results = []  # (test, name, ok, detail)


def log(msg):
    L.log(msg)


def report(test, name, problems, info=""):
    ok = not problems
    detail = "; ".join(problems) if problems else info
    results.append((test, name, ok, detail))
    log(f"{'PASS' if ok else 'FAIL'} [{test}] {name}" + (f": {detail}" if detail else ""))
    return ok


# ---------------------------------------------------------------------------------------------
# The provider: e2e_lib's fake with a random delay per request


class JitterFakeXAI(L.FakeXAI):
    """The offline fake xAI, answering after a uniformly random LATENCY_MS delay. The fake
    sleeps `latency_ms` before each answer; here that attribute draws a new value on each read."""

    def __init__(self, lo_ms, hi_ms, **kw):
        self._lo, self._hi = lo_ms, hi_ms
        super().__init__(**kw)
        # A killed replica leaves the fake writing to a closed socket: expected, not news.
        base = self.httpd.handle_error

        def handle_error(request, client_address):
            if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                base(request, client_address)

        self.httpd.handle_error = handle_error

    @property
    def latency_ms(self):
        return random.uniform(self._lo, self._hi)

    @latency_ms.setter
    def latency_ms(self, _value):
        pass  # the base class sets a fixed value in __init__; the range wins


# ---------------------------------------------------------------------------------------------
# Databases: what the test reads back (psql for PostgreSQL, sqlite3 for SQLite)


class PgDB:
    """A fresh schema in the shared PostgreSQL database; the bot's URL selects it with libpq
    `options` and tags its connections with an application_name, so terminating "its backends"
    touches nobody else's."""

    kind = "postgres"

    def __init__(self, admin_url):
        self.admin_url = admin_url
        tag = secrets.token_hex(4)
        self.schema = f"e2e_{tag}"
        self.app_name = f"grok-e2e-{tag}"
        sep = "&" if "?" in admin_url else "?"
        self.bot_url = (f"{admin_url}{sep}options=-csearch_path%3D{self.schema}"
                        f"&application_name={self.app_name}")

    def psql(self, sql, schema=True):
        env = dict(os.environ)
        if schema:
            env["PGOPTIONS"] = f"-c search_path={self.schema}"
        out = subprocess.run(["psql", self.admin_url, "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
                              "-c", sql], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"psql failed ({out.returncode}): {out.stderr.strip()}\n  SQL: {sql}")
        return out.stdout

    def create(self):
        self.psql(f"CREATE SCHEMA {self.schema}", schema=False)

    def drop(self):
        self.psql(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE", schema=False)

    def query(self, sql):
        """Rows of a SELECT, as dicts."""
        text = self.psql(f"SELECT coalesce(json_agg(t), '[]'::json) FROM ({sql}) t").strip()
        return json.loads(text or "[]")

    def terminate_backends(self):
        """Terminates every backend of the bot's connections; returns how many."""
        rows = self.psql("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         f"WHERE application_name = '{self.app_name}') t", schema=False)
        return int(rows.strip() or 0)

    def backends(self):
        rows = self.psql(f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{self.app_name}'",
                         schema=False)
        return int(rows.strip() or 0)


class SqliteDB:
    kind = "sqlite"

    def __init__(self, path):
        self.path = path
        self.bot_url = f"sqlite://{path}"

    def create(self):
        pass

    def drop(self):
        pass

    def query(self, sql):
        if not os.path.exists(self.path):
            return []
        con = sqlite3.connect(self.path, timeout=10)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute(sql).fetchall()]
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise
        finally:
            con.close()


def safe_query(db, sql):
    try:
        return db.query(sql)
    except Exception as e:  # a poll must not abort the run
        log(f"  (query failed: {e})")
        return None


# ---------------------------------------------------------------------------------------------
# Replicas


class Replica:
    """One `grok-appservice serve` process with its own config and port; restartable. Its log
    (<dir>/<name>.log) is appended to across restarts, with a marker line per start."""

    def __init__(self, stack, binary, name, port, registration, homeserver_url, provider_url, db):
        self.stack, self.binary, self.name = stack, binary, name
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = stack.path(f"config-{name}.yaml")
        self.log_path = stack.path(f"{name}.log")
        self.proc = None
        self.starts = 0
        config = {
            "homeserver": {"url": homeserver_url, "server_name": L.SERVER_NAME},
            # No claim_lease / recovery_interval: the defaults must give failover within seconds.
            "appservice": {"registration": registration, "listen": f"127.0.0.1:{self.port}",
                           **APPSERVICE_OVERRIDE},
            "database": {"url": db.bot_url},
            "provider": {"base_url": provider_url, "timeout_secs": PROVIDER_TIMEOUT,
                         "max_retries": PROVIDER_RETRIES},
            # Generous caps: the test is about delivery, not the limiter's refusals.
            "limits": {"daily_ceiling_usd": 1000.0, "per_user_daily_usd": 100.0,
                       "per_user_requests_per_hour": 10000, "reservation_ttl": f"{RESERVATION_TTL}s"},
            # Ten users share a few rooms at load-test rates: the per-room reply limit (an
            # etiquette rule, tested in etiquette.py) would refuse some of them here.
            "bot": {"room_answers_per_minute": 100000},
            "telemetry": {"enabled": True, "store_text": False},
        }
        with open(self.config, "w") as f:
            json.dump(config, f, indent=2)  # JSON is valid YAML

    def spawn(self):
        self.starts += 1
        with open(self.log_path, "a") as f:
            f.write(f"===== e2e: start #{self.starts} of {self.name} at {time.strftime('%H:%M:%S')} =====\n")
        # HOSTNAME is the prefix of the replica's instance id, i.e. of its claims' lease_owner.
        env = {"XAI_API_KEY": API_KEY, "RUST_LOG": os.environ.get("RUST_LOG", "info"), "NO_COLOR": "1",
               "HOSTNAME": self.name}
        self.proc = self.stack.spawn(self.name, [self.binary, "serve", "-c", self.config], env=env)
        return self

    def wait_ready(self, timeout=60):
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
        return self.proc.returncode

    def sigterm(self):
        self.proc.send_signal(signal.SIGTERM)

    def mark(self, text):
        with open(self.log_path, "a") as f:
            f.write(f"===== e2e: {text} at {time.strftime('%H:%M:%S')} =====\n")


def generate_registration(stack, binary, url):
    path = stack.path("registration.yaml")
    out = subprocess.run([binary, "generate-registration", "--server-name", L.SERVER_NAME, "--url", url,
                          "-o", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"generate-registration exited {out.returncode}: {out.stdout.strip()}")
    return path


# ---------------------------------------------------------------------------------------------
# Matrix helpers


def send_text(client, room_id, body, tries=4):
    """Sends with one fixed txnId, so a retry after a lost answer cannot post the message twice."""
    txn = uuid.uuid4().hex
    path = f"/rooms/{L.q(room_id)}/send/m.room.message/{txn}"
    for attempt in range(tries):
        try:
            return client.call("PUT", path, {"msgtype": "m.text", "body": body})["event_id"]
        except (L.HttpError, OSError):
            if attempt == tries - 1:
                raise
            time.sleep(1 + attempt)


def read_room(client, room_id):
    """Every event of the room the client can see, oldest first (paginating /messages)."""
    events, token = [], None
    for _ in range(200):
        params = {"dir": "b", "limit": 500}
        if token:
            params["from"] = token
        body = client.call("GET", f"/rooms/{L.q(room_id)}/messages", params=params)
        chunk = body.get("chunk", [])
        events.extend(chunk)
        token = body.get("end")
        if not chunk or not token:
            break
    return list(reversed(events))


class World:
    """Users, rooms and every message the users sent."""

    def __init__(self):
        self.users = []        # Clients
        self.dms = {}          # user_id -> room id
        self.group = None
        self.sent = []         # dicts: event_id, room, user, addressed, body, t (monotonic)
        self.send_errors = []
        self.lock = threading.Lock()

    def readers(self):
        """(client, room) pairs that together see every room once."""
        pairs = [(u, self.dms[u.user_id]) for u in self.users]
        if self.group:
            pairs.append((self.users[0], self.group))
        return pairs


def setup_world(test, synapse, db, replicas):
    w = World()
    w.users = [synapse.register(f"user{i}") for i in range(N_USERS)]
    for u in w.users:
        w.dms[u.user_id] = u.create_room(invite=[BOT], is_direct=True)
    # The group: members join before the bot is invited, so the bot sees a room of five (not a
    # direct chat) from the start.
    owner = w.users[0]
    w.group = owner.create_room(invite=[u.user_id for u in w.users[1:GROUP_USERS]], name="group")
    for u in w.users[1:GROUP_USERS]:
        u.join(w.group)
    owner.invite(w.group, BOT)
    rooms = list(w.dms.values()) + [w.group]
    for u in w.users:
        if not u.wait_joined(w.dms[u.user_id], BOT, 30):
            raise RuntimeError(f"the bot did not join {u.user_id}'s DM within 30s")
    if not owner.wait_joined(w.group, BOT, 30):
        raise RuntimeError("the bot did not join the group room within 30s")

    # The bot decides "direct chat" from its rooms table: wait until every room is recorded.
    def recorded():
        rows = safe_query(db, "SELECT r.room_id, r.is_direct, (SELECT count(*) FROM room_members m "
                              "WHERE m.room_id = r.room_id) AS members FROM rooms r")
        if not rows:
            return None
        got = {r["room_id"]: r for r in rows}
        if all(x in got for x in rooms) and got[w.group]["members"] >= GROUP_USERS + 1:
            return got
        return None

    got = L.wait_until(recorded, 30, 0.5)
    if not got:
        raise RuntimeError("the bot did not record all rooms within 30s")
    g = got[w.group]
    log(f"[{test}] rooms ready: {len(w.dms)} DMs, group room with {g['members']} members "
        f"(is_direct={g['is_direct']})")
    return w


def user_plan(i):
    """(room kind, body, addressed) for user i's messages, shuffled."""
    msgs = []
    group_n = GROUP_ADDRESSED if i < GROUP_USERS else 0
    for n in range(PER_USER):
        topic = TOPICS[(i * 7 + n) % len(TOPICS)]
        body = f"tell me something interesting about {topic} [u{i}-q{n}]"
        if n < group_n:
            msgs.append(("group", f"grok: {body}", True))
        else:
            msgs.append(("dm", body, True))
    if i < GROUP_USERS:
        for n in range(GROUP_CHATTER):
            msgs.append(("group", f"{CHATTER[(i + n) % len(CHATTER)]} [u{i}-c{n}]", False))
    random.Random(1000 + i).shuffle(msgs)
    return msgs


def sender_thread(w, i, t0):
    user = w.users[i]
    plan = user_plan(i)
    gap = SEND_WINDOW / len(plan)
    rnd = random.Random(i)
    next_at = t0 + rnd.uniform(0, gap)
    for kind, body, addressed in plan:
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        room = w.group if kind == "group" else w.dms[user.user_id]
        try:
            event_id = send_text(user, room, body)
        except Exception as e:
            with w.lock:
                w.send_errors.append(f"{user.user_id}: {type(e).__name__}: {e}")
            continue
        with w.lock:
            w.sent.append({"event_id": event_id, "room": room, "user": user.user_id,
                           "addressed": addressed, "body": body, "t": time.monotonic()})
        next_at += gap * rnd.uniform(0.6, 1.4)


# ---------------------------------------------------------------------------------------------
# Reading the outcome


def collect_replies(w):
    """source event id -> bot replies to it (events), over every room."""
    replies = {}
    for client, room in w.readers():
        for e in read_room(client, room):
            if e.get("sender") != BOT or e.get("type") != "m.room.message":
                continue
            src = L.in_reply_to(e)
            if src:
                replies.setdefault(src, []).append(e)
    return replies


def origin_ts(w):
    """event id -> origin_server_ts of the users' messages."""
    out = {}
    for client, room in w.readers():
        for e in read_room(client, room):
            out[e["event_id"]] = e.get("origin_server_ts")
    return out


TAG_RE = re.compile(r"\[u\d+-[qc]\d+\]")


def message_tag(body):
    """The unique `[uI-qN]` / `[uI-cN]` tag every test message carries, or None."""
    m = TAG_RE.search(body or "")
    return m.group(0) if m else None


def calls_by_tag(provider_calls):
    """(tag -> the provider calls whose user input carries it, calls matching no single tag).
    The bot sends one user message per request (no history), so a tag in the input names the
    message the call was made for."""
    by, unmatched = {}, []
    for c in provider_calls:
        body = c["body"] if isinstance(c.get("body"), dict) else {}
        tags = set(TAG_RE.findall(fake_xai._last_user_text(body)))
        if len(tags) != 1:  # e.g. a final call whose last user text is not the question
            tags = set(TAG_RE.findall(json.dumps(body.get("input"), ensure_ascii=False)))
        if len(tags) == 1:
            by.setdefault(tags.pop(), []).append(c)
        else:
            unmatched.append(c)
    return by, unmatched


def times_paid(calls):
    """How many times one message was paid for: the most calls to any one model (a two-stage
    route calls the reasoning model and the final model once each: paid once)."""
    per_model = {}
    for c in calls:
        m = (c["body"] if isinstance(c.get("body"), dict) else {}).get("model")
        per_model[m] = per_model.get(m, 0) + 1
    return max(per_model.values(), default=0)


def in_flight_at(event_id, calls, replies, held, t_wall):
    """Whether a message was in flight on a replica at wall-clock `t_wall`: its claim was held by
    that replica (`held`: event ids it owned right then), the fake had received a request for it
    before `t_wall`, and no reply to it had been sent (origin_server_ts) before `t_wall`."""
    if t_wall is None or event_id not in held:
        return False
    if not any(c["time"] < t_wall for c in calls):
        return False
    return not any(r["origin_server_ts"] / 1000 < t_wall for r in replies)


def live_claims(db):
    """(lease_owner prefix -> count) of unfinished addressed claims."""
    rows = safe_query(db, "SELECT lease_owner, state FROM processed_events "
                          "WHERE kind = 'addressed' AND state NOT IN ('answered', 'done', 'failed')") or []
    by = {}
    for r in rows:
        name = r["lease_owner"].split("-", 1)[0]
        by[name] = by.get(name, 0) + 1
    return by


def wait_for_claims(db, candidates, at_least, timeout):
    """The name of a replica in `candidates` holding >= `at_least` unfinished claims (the one
    holding most), waiting up to `timeout`; falls back to the best seen."""
    best = (None, 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = live_claims(db)
        for name in candidates:
            if held.get(name, 0) > best[1]:
                best = (name, held[name])
        if best[1] >= at_least:
            return best
        time.sleep(0.05)
    return best


def grep_logs(paths, needle, limit=12):
    lines = []
    for p in paths:
        try:
            with open(p, errors="replace") as f:
                for line in f:
                    if needle in line:
                        lines.append(f"  {os.path.basename(p)}: {line.rstrip()[:300]}")
        except OSError:
            pass
    return lines[:limit]


AUDIT_SQL = """
SELECT c.day, c.scope, c.settled_ticks, c.reserved_ticks, c.requests,
  (SELECT coalesce(sum(CASE WHEN r.state <> 'held' THEN r.actual_ticks ELSE 0 END), 0)
     FROM budget_reservations r
    WHERE r.day = c.day AND (c.scope = 'global' OR c.scope = 'user:' || r.user_id)) AS settled_re,
  (SELECT coalesce(sum(CASE WHEN r.state = 'held' THEN r.amount_ticks ELSE 0 END), 0)
     FROM budget_reservations r
    WHERE r.day = c.day AND (c.scope = 'global' OR c.scope = 'user:' || r.user_id)) AS reserved_re,
  (SELECT count(*) FROM budget_reservations r
    WHERE r.day = c.day AND (c.scope = 'global' OR c.scope = 'user:' || r.user_id)) AS rows_re
FROM budget_counters c ORDER BY c.day, c.scope
"""


# ---------------------------------------------------------------------------------------------
# One test


def run_test(test, binary, venv):
    """test: 'postgres' (3 replicas behind the proxy) or 'sqlite' (1 replica, no proxy)."""
    pg = test == "postgres"
    keep = os.environ.get("KEEP") == "1"
    started = time.monotonic()
    n_before = len(results)
    stack = L.Stack(keep=keep, prefix=f"grok-replicas-{test}-")
    db = PgDB(PG_ADMIN_URL) if pg else SqliteDB(stack.path("bot.db"))
    proxy = None
    replicas = []
    events = []  # what happened when, for the report

    def note(msg):
        events.append(f"t+{time.monotonic() - t_send:5.1f}s {msg}" if t_send else msg)
        log(f"[{test}] {events[-1]}")

    t_send = None
    try:
        fake = JitterFakeXAI(*LATENCY_MS).start()
        stack.fakes.append(fake)
        db.create()
        names = ["r0", "r1", "r2"] if pg else ["solo"]
        ports = [L.free_port() for _ in names]
        if pg:
            proxy = RoundRobinProxy(ports).start()
            as_url = proxy.url
        else:
            as_url = f"http://127.0.0.1:{ports[0]}"
        registration = generate_registration(stack, binary, as_url)
        synapse = L.Synapse(stack, venv, registration).start()
        for name, port in zip(names, ports):
            replicas.append(Replica(stack, binary, name, port, registration, synapse.url, fake.base_url, db))
        for r in replicas:   # together: migrations run under an advisory lock
            r.spawn()
        for r in replicas:
            r.wait_ready()
        by_name = {r.name: r for r in replicas}
        log(f"[{test}] up in {time.monotonic() - started:.0f}s: synapse {synapse.url}, "
            f"{'proxy ' + proxy.url + ' -> ' if pg else ''}{', '.join(f'{r.name} {r.url}' for r in replicas)}, "
            f"db {db.schema if pg else db.path}, fake xAI {fake.base_url} ({LATENCY_MS[0]}-{LATENCY_MS[1]} ms), "
            f"dir {stack.dir}")
        if APPSERVICE_OVERRIDE:
            log(f"[{test}] NOTE: E2E_APPSERVICE overrides the defaults under test: {APPSERVICE_OVERRIDE}")
        w = setup_world(test, synapse, db, replicas)

        # ---- send, and disrupt meanwhile ----
        fake.reset()
        t_send = time.monotonic()
        t_send_wall = time.time()
        threads = [threading.Thread(target=sender_thread, args=(w, i, t_send), daemon=True)
                   for i in range(N_USERS)]
        for t in threads:
            t.start()

        def sleep_until(t):
            d = t_send + t - time.monotonic()
            if d > 0:
                time.sleep(d)

        disruption = {}
        # 1. kill -9 a replica while it holds claims, start it again.
        sleep_until(T_KILL)
        victim, held = wait_for_claims(db, names, 2, 10)
        if victim is None:
            victim, held = names[0], 0
        v = by_name[victim]
        kill_wall = time.time()  # the clock of the fake's request log and (same host) Synapse's ts
        code = v.kill9()
        v.mark("killed with SIGKILL")
        # Nobody takes a claim over before its lease runs out, so the killed replica's claims
        # still name it as their owner right after the kill.
        orphans = safe_query(db, "SELECT event_id, state FROM processed_events WHERE kind = 'addressed' AND "
                                 f"state NOT IN ('answered', 'done', 'failed') AND lease_owner LIKE '{victim}-%'") or []
        disruption["killed"] = (victim, len(orphans))
        disruption["kill_wall"] = kill_wall
        disruption["kill_orphans"] = {o["event_id"]: o["state"] for o in orphans}
        note(f"kill -9 {victim} (exit {code}) holding {len(orphans)} unfinished claims "
             f"({sorted(o['state'] for o in orphans)})")
        time.sleep(KILL_DOWN)
        v.spawn()
        v.wait_ready()
        note(f"{victim} started again and ready")

        def drop_answer(at):
            # A lost answer: the replica handled the transaction, Synapse saw a 502 and retries
            # the same txnId, which the ring sends to another replica.
            if proxy:
                sleep_until(at)
                proxy.drop_next_answers(1)
                note("proxy will swallow the next transaction's 200")

        drop_answer(T_DROP[0])

        # 2. SIGTERM another replica (the one holding most claims), start it again after it exits.
        sleep_until(T_TERM)
        others = [n for n in names if n != victim] or names
        term_name, held = wait_for_claims(db, others, 1, 8)
        if term_name is None:
            term_name = others[0]
        t_r = by_name[term_name]
        t0 = time.monotonic()
        term_wall = time.time()
        term_held = safe_query(db, "SELECT event_id, state FROM processed_events WHERE kind = 'addressed' AND "
                                   f"state NOT IN ('answered', 'done', 'failed') AND lease_owner LIKE "
                                   f"'{term_name}-%'") or []
        disruption["term_wall"] = term_wall
        disruption["term_held"] = {o["event_id"]: o["state"] for o in term_held}
        t_r.sigterm()
        t_r.mark("SIGTERM")
        note(f"SIGTERM {term_name} holding {held} unfinished claims")
        try:
            code = t_r.proc.wait(45)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - t0
        disruption["term"] = (term_name, code, took, held)
        note(f"{term_name} exited with {code} after {took:.1f}s")
        time.sleep(TERM_DOWN)
        t_r.spawn()
        t_r.wait_ready()
        note(f"{term_name} started again and ready")

        # 3. cut the database connections once.
        if pg:
            sleep_until(T_DB)
            before = db.backends()
            n = db.terminate_backends()
            disruption["db"] = n
            note(f"terminated {n} PostgreSQL backends of the replicas (of {before})")
            ok_again = L.wait_until(lambda: all(L.http_ok(f"{r.url}/ready") for r in replicas), 20, 0.2)
            note(f"all replicas ready again: {bool(ok_again)}")
        drop_answer(T_DROP[1])

        for t in threads:
            t.join(SEND_WINDOW + 120)
        t_last_sent = time.monotonic()
        addressed = [m for m in w.sent if m["addressed"]]
        chatter = [m for m in w.sent if not m["addressed"]]
        note(f"sending done: {len(addressed)} addressed, {len(chatter)} chatter, {len(w.send_errors)} send errors")

        # ---- wait for the answers, then for silence ----
        want = {m["event_id"] for m in addressed}

        def all_answered():
            try:
                rep = collect_replies(w)
            except Exception as e:
                log(f"  (reading replies failed: {e})")
                return None
            return rep if want <= set(rep) else None

        L.wait_until(all_answered, REPLY_TIMEOUT, 2)
        note("every addressed message has a reply" if all_answered() else
             f"waited {REPLY_TIMEOUT}s after the last message; some have no reply")
        time.sleep(QUIET)
        # The killed worker's held reservations expire RESERVATION_TTL after they were made.
        held_left = L.wait_until(lambda: (rows := safe_query(db, "SELECT count(*) AS n FROM budget_reservations "
                                                                  "WHERE state = 'held'")) is not None
                                 and rows[0]["n"] == 0, RESERVATION_TTL + 30, 1)
        if not held_left:
            note("some reservations are still held; the audit counts them as reserved")

        # ---- read everything back ----
        replies = collect_replies(w)
        ts = origin_ts(w)
        claims = {r["event_id"]: r for r in safe_query(db, "SELECT * FROM processed_events") or []}
        rlog = {}
        for r in safe_query(db, "SELECT id, ok, route, degraded, err FROM request_log") or []:
            rlog.setdefault(r["id"], []).append(r)
        audit = safe_query(db, AUDIT_SQL) or []
        resv = safe_query(db, "SELECT state, count(*) AS n, sum(amount_ticks) AS amount, "
                              "sum(actual_ticks) AS actual FROM budget_reservations GROUP BY state") or []
        provider_calls = [r for r in fake.snapshot() if r["path"].rstrip("/") == "/v1/responses"]

        # ---- checks ----
        ids = [m["event_id"] for m in addressed]
        counts = {e: len(replies.get(e, [])) for e in ids}
        answered = [e for e in ids if counts[e] >= 1]
        lost = [e for e in ids if counts[e] == 0]
        dups = {e: counts[e] for e in ids if counts[e] > 1}
        extra_replies = sum(c - 1 for c in dups.values())
        chatter_replied = [m["event_id"] for m in chatter if m["event_id"] in replies]
        first_reply = {e: min(replies[e], key=lambda x: x["origin_server_ts"]) for e in answered}
        apologies = [e for e in answered if "[offline fake xAI]" not in first_reply[e]["content"].get("body", "")]
        last_msg_ts = max((ts.get(e) or 0) for e in ids) if ids else 0
        last_reply_ts = max((x["origin_server_ts"] for e in answered for x in replies[e]), default=0)
        lat = sorted((first_reply[e]["origin_server_ts"] - (ts.get(e) or 0)) / 1000 for e in answered)
        tail = (last_reply_ts - last_msg_ts) / 1000 if last_reply_ts and last_msg_ts else float("nan")

        log(f"[{test}] COUNTS sent={len(ids)} answered={len(answered)} duplicates={extra_replies} "
            f"(events={len(dups)}) lost={len(lost)} chatter={len(chatter)} chatter_replied={len(chatter_replied)} "
            f"apologies={len(apologies)} last_message_to_last_reply={tail:.1f}s")
        if lat:
            log(f"[{test}] reply latency per message: p50 {lat[len(lat) // 2]:.1f}s, "
                f"p95 {lat[int(len(lat) * 0.95)]:.1f}s, max {lat[-1]:.1f}s; provider calls {len(provider_calls)}")

        report(test, "200 addressed messages sent", ([f"sent {len(ids)} addressed, want {N_USERS * PER_USER}"]
                                                     if len(ids) != N_USERS * PER_USER else [])
               + [f"{len(w.send_errors)} send errors: {w.send_errors[:3]}"] * bool(w.send_errors),
               f"{len(ids)} addressed + {len(chatter)} chatter over {t_last_sent - t_send:.0f}s")
        problems = []
        if lost:
            problems.append(f"{len(lost)} addressed messages have no reply: {lost[:5]}")
        if dups:
            problems.append(f"{len(dups)} messages have more than one reply: "
                            f"{[(e, c) for e, c in list(dups.items())[:5]]}")
        report(test, "exactly one bot reply per addressed message", problems,
               f"{len(answered)}/{len(ids)} answered once; last message -> last reply {tail:.1f}s")
        report(test, "no reply to a not-addressed message",
               [f"{len(chatter_replied)} chatter messages got a reply: {chatter_replied[:5]}"] if chatter_replied else [],
               f"{len(chatter)} chatter messages, none answered")
        report(test, "replies are answers, not apologies",
               [f"{len(apologies)} replies are apologies: "
                f"{[(e, first_reply[e]['content'].get('body', '')[:70]) for e in apologies[:3]]}"] if apologies else [],
               f"{len(answered) - len(apologies)} answers from the provider")

        # ---- provider calls per message: paid once, unless in flight on the killed replica ----
        by_tag, unmatched = calls_by_tag(provider_calls)
        victim = disruption.get("killed", (None, 0))[0]
        kill_wall, kill_held = disruption.get("kill_wall"), disruption.get("kill_orphans", {})
        term_name = disruption.get("term", (None,))[0]
        term_wall, term_held = disruption.get("term_wall"), disruption.get("term_held", {})
        paid = {}          # event id -> times paid
        calls_of = {}      # event id -> its provider calls
        for m in addressed:
            calls_of[m["event_id"]] = by_tag.get(message_tag(m["body"]), [])
            paid[m["event_id"]] = times_paid(calls_of[m["event_id"]])
        once = [e for e in ids if paid[e] == 1]
        never = [e for e in ids if paid[e] == 0]
        twice = [e for e in ids if paid[e] > 1]
        in_flight_kill = {e for e in ids if in_flight_at(e, calls_of[e], replies.get(e, []), kill_held, kill_wall)}
        in_flight_term = {e for e in ids if in_flight_at(e, calls_of[e], replies.get(e, []), term_held, term_wall)}
        twice_kill = [e for e in twice if e in in_flight_kill]
        twice_other = [e for e in twice if e not in in_flight_kill]
        # In flight but already rendered: a claim in 'sending' holds its reply in the outbox, so
        # the takeover re-sends it and must not pay the model again.
        stored_at_kill = [e for e in in_flight_kill if kill_held.get(e) == "sending"]
        twice_stored = [e for e in twice_kill if kill_held.get(e) == "sending"]
        chatter_paid = [m["event_id"] for m in chatter if by_tag.get(message_tag(m["body"]))]
        rows = [
            ("addressed messages sent", len(ids)),
            ("answered (at least one reply)", len(answered)),
            ("paid exactly once", len(once)),
            ("paid more than once", len(twice)),
            (f"  of those in flight on the killed replica {victim} at the kill (allowed)", len(twice_kill)),
            ("  of those NOT in flight on the killed replica (must be 0)", len(twice_other)),
            ("not paid at all (no provider call found)", len(never)),
            (f"in flight on {victim} at the kill (held, request received, no reply yet)", len(in_flight_kill)),
            (f"  of those re-paid after the takeover", len(twice_kill)),
            ("  of those with the reply stored (claim 'sending' at the kill)", len(stored_at_kill)),
            ("    of those re-paid (must be 0: the stored reply is re-sent)", len(twice_stored)),
            (f"in flight on {term_name} at the SIGTERM", len(in_flight_term)),
            (f"  of those paid more than once", sum(1 for e in twice if e in in_flight_term)),
            ("chatter messages with a provider call (must be 0)", len(chatter_paid)),
            ("provider calls in all / not matched to a test message", f"{len(provider_calls)} / {len(unmatched)}"),
        ]
        width = max(len(k) for k, _ in rows)
        log(f"[{test}] PROVIDER CALLS PER MESSAGE (the fake xAI's request log, matched by each message's "
            f"unique [uI-qN] tag; 'paid' = the most calls to one model for that message)")
        for k, v in rows:
            log(f"[{test}]   {k:<{width}}  {v:>5}")
        problems = []
        if twice_other:
            problems.append(f"{len(twice_other)} messages paid more than once although not in flight on the "
                            f"killed replica: " + ", ".join(
                                f"{e} x{paid[e]} (calls at t+" + "/".join(
                                    f"{c['time'] - (kill_wall or 0):+.1f}s" for c in calls_of[e]) + " from the kill)"
                                for e in twice_other[:5]))
        if twice_stored:
            problems.append(f"{len(twice_stored)} messages whose reply was stored (claim 'sending' at the kill) "
                            f"were paid again after the takeover instead of re-sending the stored reply: "
                            f"{[(e, paid[e]) for e in twice_stored[:5]]}")
        if chatter_paid:
            problems.append(f"{len(chatter_paid)} chatter messages caused provider calls: {chatter_paid[:5]}")
        report(test, "each message paid once (re-paid only if in flight on the killed replica)", problems,
               f"{len(once)} paid once, {len(twice)} more than once (all {len(twice_kill)} in flight on "
               f"{victim} at the kill), {len(never)} not paid; {len(in_flight_kill)} were in flight at the kill, "
               f"{len(stored_at_kill)} of them with the reply stored (re-sent, not re-paid)")

        # ---- failover with the default lease: the killed replica's claims are taken over fast ----
        orphan_replies = [first_reply[e]["origin_server_ts"] / 1000 for e in kill_held if e in first_reply]
        orphans_unanswered = [e for e in kill_held if e not in first_reply]
        failover = (max(orphan_replies) - kill_wall) if orphan_replies and kill_wall else float("nan")
        log(f"[{test}] FAILOVER (default claim_lease / recovery_interval): kill -9 of {victim} -> last reply to "
            f"one of its {len(kill_held)} unfinished claims {failover:.1f}s; last message sent -> last reply "
            f"{tail:.1f}s; limit {FAILOVER_LIMIT}s each")
        problems = []
        if not kill_held:
            problems.append("the killed replica held no unfinished claims: no failover to measure")
        if orphans_unanswered:
            problems.append(f"{len(orphans_unanswered)} of the killed replica's claims have no reply: "
                            f"{orphans_unanswered[:5]}")
        if not failover <= FAILOVER_LIMIT:  # also catches nan
            problems.append(f"kill -> last reply to the killed replica's claims took {failover:.1f}s, "
                            f"limit {FAILOVER_LIMIT}s")
        if not tail <= FAILOVER_LIMIT:
            problems.append(f"last message sent -> last reply took {tail:.1f}s, limit {FAILOVER_LIMIT}s")
        report(test, f"kill -9 failover within {FAILOVER_LIMIT}s with the default lease", problems,
               f"kill -> last orphan reply {failover:.1f}s ({len(kill_held)} claims), "
               f"last message -> last reply {tail:.1f}s")

        # request_log: exactly one ok row per answered event, none for chatter.
        problems = []
        not_ok = [e for e in answered if sum(1 for r in rlog.get(e, []) if r["ok"]) != 1]
        if not_ok:
            problems.append(f"{len(not_ok)} answered events lack exactly one ok row: "
                            f"{[(e, rlog.get(e)) for e in not_ok[:3]]}")
        chatter_rows = [m["event_id"] for m in chatter if m["event_id"] in rlog]
        if chatter_rows:
            problems.append(f"{len(chatter_rows)} chatter messages have request_log rows")
        ok_rows = sum(1 for rows in rlog.values() for r in rows if r["ok"])
        stray = [i for i, rows in rlog.items() if i not in want and any(r["ok"] for r in rows)]
        if stray:
            problems.append(f"{len(stray)} ok rows for events the users did not send as addressed: {stray[:3]}")
        report(test, "request_log: one ok row per answered event", problems,
               f"{ok_rows} ok rows for {len(answered)} answered events")

        # Claims: every addressed event's claim ended answered with the reply users see.
        problems = []
        states = {}
        for e in ids:
            c = claims.get(e)
            st = c["state"] if c else "missing"
            states[st] = states.get(st, 0) + 1
            if c and c["state"] == "answered" and e in first_reply and c.get("reply_event_id") not in \
                    {x["event_id"] for x in replies[e]}:
                problems.append(f"{e}: claim reply_event_id {c.get('reply_event_id')} is not a reply users see")
        if states.get("answered", 0) != len(ids):
            problems.append(f"claim states {states}, want all answered")
        recovered = [c for e, c in claims.items() if e in want and c["attempts"] > 1]
        report(test, "claims all answered", problems[:6],
               f"states {states}; {len(recovered)} recovered by a sweeper (attempts > 1)")

        # Budget audit.
        problems = []
        for a in audit:
            if (a["settled_ticks"], a["reserved_ticks"]) != (a["settled_re"], a["reserved_re"]):
                problems.append(f"{a['day']} {a['scope']}: stored settled/reserved "
                                f"{a['settled_ticks']}/{a['reserved_ticks']}, recomputed "
                                f"{a['settled_re']}/{a['reserved_re']}")
        if not audit:
            problems.append("no budget counters")
        glob = [a for a in audit if a["scope"] == "global"]
        report(test, "budget counters equal the audit recomputation", problems[:6],
               f"{len(audit)} counters; global " + ", ".join(
                   f"settled {a['settled_ticks']} reserved {a['reserved_ticks']} requests {a['requests']} "
                   f"(reservation rows {a['rows_re']})" for a in glob)
               + f"; reservations by state {[(r['state'], r['n']) for r in resv]}")

        # The disruptions did what they were meant to.
        problems = []
        if "killed" in disruption and disruption["killed"][1] == 0:
            problems.append(f"the killed replica {disruption['killed'][0]} held no unfinished claims at the kill")
        if "term" in disruption:
            name, code, took, _ = disruption["term"]
            if code != 0:
                problems.append(f"{name} exited with {code} on SIGTERM, want 0")
        if pg and not disruption.get("db"):
            problems.append("no PostgreSQL backend was terminated")
        for r in replicas:
            if not r.alive():
                problems.append(f"{r.name} is not running at the end (exit {r.proc.returncode})")
        report(test, "disruptions happened", problems,
               f"kill -9 {disruption.get('killed')}, SIGTERM {disruption.get('term')}, "
               f"db backends terminated {disruption.get('db', 'n/a')}")

        if proxy:
            recs = [r for r in proxy.snapshot() if r["method"] == "PUT" and "/transactions/" in r["path"]]
            per_backend = {}
            by_txn = {}
            for r in recs:
                per_backend[r["backend"]] = per_backend.get(r["backend"], 0) + 1
                txn = r["path"].split("/transactions/", 1)[1].split("?")[0]
                by_txn.setdefault(txn, []).append(r)
            statuses = {}
            for r in recs:
                statuses[r["status"]] = statuses.get(r["status"], 0) + 1
            moved = [t for t, rs in by_txn.items() if len({x["backend"] for x in rs}) > 1]
            dropped = [t for t, rs in by_txn.items() if any(x.get("dropped") for x in rs)]
            for t in dropped:
                log(f"[{test}] dropped answer of txn {t}: " + ", ".join(
                    f"{names[x['backend']] if x['backend'] is not None else 'none'}->{x['status']}"
                    + (" (200 swallowed)" if x.get("dropped") else "") for x in by_txn[t]))
            redispatched = sum(1 for r in recs if len(r.get("tried", [])) > 1)
            problems = [] if all(per_backend.get(i, 0) > 0 for i in range(len(names))) else \
                [f"transactions per replica {per_backend}: not every replica got some"]
            for t in dropped:
                rs = by_txn[t]
                if rs[-1]["status"] != 200:
                    problems.append(f"txn {t} whose answer was dropped never got a 200 later")
                elif rs[-1]["backend"] == next(x["backend"] for x in rs if x.get("dropped")):
                    log(f"[{test}] note: txn {t} was retried on the same replica")
            if len(dropped) != len(T_DROP):
                problems.append(f"{len(dropped)} answers dropped, want {len(T_DROP)}")
            report(test, "proxy spread transactions over the replicas", problems,
                   f"{len(recs)} transaction PUTs ({len(by_txn)} txnIds), per replica "
                   f"{ {(names[k] if k is not None else 'none'): v for k, v in per_backend.items()} }, "
                   f"statuses {statuses}, {len(dropped)} answers dropped, {len(moved)} txnIds retried on another replica, "
                   f"{redispatched} redispatched past a down replica")
            # Final claim owner per replica: who answered.
            owners = {}
            for e in ids:
                c = claims.get(e)
                if c:
                    n = c["lease_owner"].split("-", 1)[0]
                    owners[n] = owners.get(n, 0) + 1
            log(f"[{test}] answers by replica (final claim owner): {owners}")

        # Evidence for anything lost or duplicated.
        if lost or dups or apologies or not_ok or twice_other:
            log(f"[{test}] ---- evidence ----")
            for e in (lost[:5] + list(dups)[:5] + apologies[:3] + not_ok[:3] + twice_other[:5]):
                m = next((x for x in addressed if x["event_id"] == e), {})
                log(f"event {e} from {m.get('user')} body {m.get('body')!r} sent at "
                    f"t+{m.get('t', t_send) - t_send:.1f}s; replies {counts.get(e)}")
                log(f"  claim: {claims.get(e)}")
                log(f"  request_log: {rlog.get(e)}")
                log(f"  provider calls: {[(round(c['time'] - t_send_wall, 1), (c.get('body') or {}).get('model'), c.get('status')) for c in calls_of.get(e, [])]} (s after sending started)")
                for x in replies.get(e, []):
                    log(f"  reply {x['event_id']} ts {x['origin_server_ts']} body "
                        f"{x['content'].get('body', '')[:60]!r}")
                for line in grep_logs([r.log_path for r in replicas], e):
                    log(line)
            log(f"[{test}] timeline: " + " | ".join(events))
        log(f"[{test}] summary: sent {len(ids)}, answered {len(answered)}, duplicate replies {extra_replies}, "
            f"lost {len(lost)}; paid once {len(once)}, more than once {len(twice)} "
            f"({len(twice_kill)} in flight on the killed replica, {len(twice_other)} not); "
            f"failover kill -> last orphan reply {failover:.1f}s, last message -> last reply {tail:.1f}s")
    except Exception as e:
        traceback.print_exc()
        report(test, "run", [f"{type(e).__name__}: {e}"])
    finally:
        failed = any(not ok for t, _, ok, _ in results[n_before:])
        # Stop the replicas (graceful), then everything else.
        for r in replicas:
            if r.alive():
                r.sigterm()
        for r in replicas:
            try:
                if r.proc:
                    r.proc.wait(40)
            except subprocess.TimeoutExpired:
                r.proc.kill()
        if proxy:
            proxy.stop()
        if failed:
            stack.keep = True
            for r in replicas:
                warn = grep_logs([r.log_path], " WARN ", 15) + grep_logs([r.log_path], " ERROR ", 15)
                if warn:
                    log(f"----- WARN/ERROR lines of {r.name} -----")
                    for line in warn:
                        log(line)
        stack.close()
        if failed:
            log(f"[{test}] logs kept in {stack.dir}")
        if not keep:
            try:
                db.drop()
            except Exception as e:
                log(f"[{test}] dropping the schema failed: {e}")
        elif pg:
            log(f"[{test}] schema kept: {db.schema}")
        log(f"[{test}] took {time.monotonic() - started:.0f}s")


def main():
    which = sys.argv[1:] or ["postgres", "sqlite"]
    bad = [w for w in which if w not in ("postgres", "sqlite")]
    if bad:
        print(f"usage: {sys.argv[0]} [postgres] [sqlite]", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        binary = L.build_binary()
        venv = L.ensure_venv()
    except Exception as e:
        traceback.print_exc()
        report("setup", "binary and venv", [f"{type(e).__name__}: {e}"])
        binary = venv = None
    if binary:
        for test in which:
            run_test(test, binary, venv)
    failed = sum(1 for r in results if not r[2])
    passed = len(results) - failed
    log("replicas: ---- results ----")
    for test, name, ok, detail in results:
        log(f"replicas:   {'PASS' if ok else 'FAIL'}  [{test}] {name}" + ("" if ok else f"  -- {detail[:300]}"))
    log(f"replicas: took {time.monotonic() - started:.0f}s")
    print(f"replicas: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
