"""Shared helpers for the end-to-end test (tests/e2e/run.py) and the demo (scripts/demo).

Everything runs on loopback in one temp dir: a real Synapse from the project's virtualenv,
the grok-appservice binary, and (unless a real key is given) the offline fake xAI. Python 3.11
stdlib only, so the harness needs nothing but the venv that scripts/synapse-venv creates.
"""

import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
SERVER_NAME = "localhost"
BOT_LOCALPART = "grok"
BOT_ID = f"@{BOT_LOCALPART}:{SERVER_NAME}"

sys.path.insert(0, SCRIPTS)
from fake_xai import FakeXAI  # noqa: E402  (re-exported for the test and the demo)


def log(msg):
    print(msg, flush=True)


def free_port():
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def wait_until(fn, timeout, interval=0.25, what="condition", pause=None):
    """Polls `fn` until it returns a truthy value (returned) or `timeout` seconds pass (None);
    between polls it sleeps `interval`, or calls `pause` (a client's sync) instead."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        if pause:
            pause()
        else:
            time.sleep(interval)


# --------------------------------------------------------------------------------------------
# HTTP


class HttpError(Exception):
    def __init__(self, status, body, url):
        super().__init__(f"HTTP {status} from {url}: {body}")
        self.status, self.body, self.url = status, body, url


def http(method, url, body=None, token=None, timeout=30, headers=None):
    """One JSON request; returns (status, parsed body). Raises HttpError on non-2xx."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode("utf-8", "replace")
        raise HttpError(e.code, parsed, url) from None
    try:
        return status, (json.loads(raw) if raw else None)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def http_ok(url, timeout=2):
    """True when GET `url` answers 200."""
    try:
        return http("GET", url, timeout=timeout)[0] == 200
    except (HttpError, OSError):
        return False


# --------------------------------------------------------------------------------------------
# Processes


class Stack:
    """Owns the temp dir and every process started in it; `close()` stops them all.

    Logs live in the temp dir; on failure `print_log_tails()` shows their ends. Use it as a
    context manager so processes are stopped on success, failure, Ctrl-C and SIGTERM alike.
    """

    def __init__(self, keep=False, prefix="grok-e2e-"):
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.keep = keep
        self.procs = []  # (name, Popen, log path)
        self.fakes = []
        self.logs = {}
        self._closed = False
        # SIGTERM (e.g. CI cancelling) should run the same clean-up as Ctrl-C.
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def spawn(self, name, argv, env=None, cwd=None):
        """Starts `argv` with stdout+stderr going to <dir>/<name>.log."""
        log_path = self.path(f"{name}.log")
        out = open(log_path, "ab")
        full_env = dict(os.environ)
        full_env.update(env or {})
        p = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=full_env, cwd=cwd or self.dir,
        )
        out.close()
        self.procs.append((name, p, log_path))
        self.logs[name] = log_path
        return p

    def check_alive(self, name):
        for n, p, _ in self.procs:
            if n == name and p.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.returncode}; see {self.logs[name]}")

    def stop(self, name, timeout=10, forget=False):
        """Stops one process started by this stack: SIGTERM, then SIGKILL after `timeout`.

        Returns the exit codes. With `forget`, the stopped process is dropped from the stack, so
        a deliberate stop is not mistaken for a crash and the name can be spawned again (its log
        file is appended to).
        """
        codes = []
        for n, p, _ in self.procs:
            if n == name:
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(timeout)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait(5)
                codes.append(p.returncode)
        if forget:
            self.procs = [e for e in self.procs if e[0] != name]
        return codes

    def close(self):
        if self._closed:
            return
        self._closed = True
        for name, _, _ in reversed(self.procs):
            self.stop(name)
        for f in self.fakes:
            f.stop()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def print_log_tails(self, lines=40):
        for name, path in self.logs.items():
            try:
                with open(path, "r", errors="replace") as f:
                    tail = f.readlines()[-lines:]
            except OSError:
                continue
            log(f"----- last {len(tail)} lines of {name} log ({path}) -----")
            sys.stdout.write("".join(tail))
        sys.stdout.flush()

    # --- the fake provider runs in-process, so tests read its request list directly ---
    def start_fake_xai(self, latency_ms=0, cost_ticks=None):
        fake = FakeXAI(latency_ms=latency_ms, cost_ticks=cost_ticks).start()
        self.fakes.append(fake)
        return fake


# --------------------------------------------------------------------------------------------
# Synapse


def ensure_venv():
    """The path of the Synapse virtualenv, created by scripts/synapse-venv if missing."""
    out = subprocess.run(
        ["bash", os.path.join(SCRIPTS, "synapse-venv")], check=True, stdout=subprocess.PIPE, text=True
    )
    return out.stdout.strip().splitlines()[-1]


# The E2EE client of tests/e2e/encryption.py; its `e2e` extra brings vodozemac wheels (no
# system library). NIO_SPEC overrides what is installed.
NIO_SPEC = os.environ.get("NIO_SPEC", "matrix-nio[e2e]==0.26.0")


def ensure_nio(venv):
    """Installs NIO_SPEC into the virtualenv `venv` unless its python already imports nio with
    encryption; returns that python's path. (The harness stays stdlib-only: only the venv's
    interpreter imports nio.)"""
    python = os.path.join(venv, "bin", "python")
    check = [python, "-c", "import nio.crypto, sys; sys.exit(0 if nio.crypto.ENCRYPTION_ENABLED else 1)"]
    if subprocess.run(check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
        log(f"ensure_nio: installing {NIO_SPEC} into {venv}")
        subprocess.run([python, "-m", "pip", "install", "--quiet", NIO_SPEC], check=True,
                       stdout=sys.stderr)
        subprocess.run(check, check=True)
    return python


def run_under_nio(script):
    """Runs `script` again under the virtualenv's python with nio installed (for a test that
    failed to import nio here); does not return."""
    if os.environ.get("GROK_E2E_NIO_REEXEC"):
        raise ImportError("nio does not import even under the virtualenv's python")
    python = ensure_nio(ensure_venv())
    os.environ["GROK_E2E_NIO_REEXEC"] = "1"
    sys.stdout.flush()
    os.execv(python, [python, os.path.abspath(script)] + sys.argv[1:])


def write_synapse_config(stack, port, registration_path):
    """Writes a minimal single-process homeserver.yaml for `localhost`; returns (path, secret)."""
    d = stack.path("synapse")
    os.makedirs(d, exist_ok=True)
    secret = secrets.token_hex(16)
    lots = {"per_second": 1000, "burst_count": 1000}
    # JSON is valid YAML, so the config is written with json.dumps and no YAML library.
    config = {
        "server_name": SERVER_NAME,
        "pid_file": os.path.join(d, "homeserver.pid"),
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {"name": "sqlite3", "args": {"database": os.path.join(d, "homeserver.db")}},
        "media_store_path": os.path.join(d, "media_store"),
        "signing_key_path": os.path.join(d, f"{SERVER_NAME}.signing.key"),
        "registration_shared_secret": secret,
        "macaroon_secret_key": secrets.token_hex(16),
        "form_secret": secrets.token_hex(16),
        "enable_registration": False,
        "report_stats": False,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "presence": {"enabled": False},
        "url_preview_enabled": False,
        "app_service_config_files": [registration_path],
        # Generous limits: the test sends bursts from a few users and must never see a 429.
        "rc_message": lots,
        "rc_registration": lots,
        "rc_login": {"address": lots, "account": lots, "failed_attempts": lots},
        "rc_joins": {"local": lots, "remote": lots},
        "rc_joins_per_room": lots,
        "rc_invites": {"per_room": lots, "per_user": lots, "per_issuer": lots},
        "rc_admin_redaction": lots,
    }
    path = os.path.join(d, "homeserver.yaml")
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return path, secret


class Synapse:
    def __init__(self, stack, venv, registration_path):
        self.stack = stack
        self.python = os.path.join(venv, "bin", "python")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config, self.shared_secret = write_synapse_config(stack, self.port, registration_path)

    def start(self, timeout=120):
        cmd = [self.python, "-m", "synapse.app.homeserver", "-c", self.config]
        # Creates the signing key (and any other missing key file), then exits.
        keys = subprocess.run(cmd + ["--generate-keys"], cwd=self.stack.dir,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if keys.returncode != 0:
            raise RuntimeError(f"synapse --generate-keys exited {keys.returncode}:\n{keys.stdout[-3000:]}")
        self.stack.spawn("synapse", cmd)

        def up():
            self.stack.check_alive("synapse")
            return http_ok(f"{self.url}/_matrix/client/versions")

        if not wait_until(up, timeout, 0.5):
            raise RuntimeError(f"Synapse did not answer /_matrix/client/versions within {timeout}s")
        return self

    def register(self, username, password=None, admin=False):
        """Registers a user with the shared-secret admin API; returns a logged-in Client."""
        password = password or secrets.token_hex(8)
        _, body = http("GET", f"{self.url}/_synapse/admin/v1/register")
        nonce = body["nonce"]
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), username.encode(), password.encode(),
                                 b"admin" if admin else b"notadmin"]))
        _, body = http("POST", f"{self.url}/_synapse/admin/v1/register", {
            "nonce": nonce, "username": username, "password": password,
            "admin": admin, "mac": mac.hexdigest(),
        })
        return Client(self.url, body["access_token"], body["user_id"])


# --------------------------------------------------------------------------------------------
# A tiny Matrix client


def q(s):
    return urllib.parse.quote(s, safe="")


class Client:
    def __init__(self, base_url, token, user_id):
        self.base, self.token, self.user_id = base_url, token, user_id

    def call(self, method, path, body=None, params=None):
        url = f"{self.base}/_matrix/client/v3{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        return http(method, url, body, token=self.token)[1]

    def create_room(self, invite=(), is_direct=False, name=None):
        body = {"preset": "trusted_private_chat" if is_direct else "private_chat",
                "invite": list(invite), "is_direct": is_direct}
        if name:
            body["name"] = name
        return self.call("POST", "/createRoom", body)["room_id"]

    def invite(self, room_id, user_id):
        self.call("POST", f"/rooms/{q(room_id)}/invite", {"user_id": user_id})

    def join(self, room_id):
        return self.call("POST", f"/join/{q(room_id)}", {})["room_id"]

    def send(self, room_id, content, event_type="m.room.message"):
        """Sends an event with any content dict; returns its event id."""
        txn = uuid.uuid4().hex
        return self.call("PUT", f"/rooms/{q(room_id)}/send/{q(event_type)}/{txn}", content)["event_id"]

    def upload(self, data, content_type, filename=None):
        """Uploads media (POST /_matrix/media/v3/upload); returns its mxc:// URI."""
        url = f"{self.base}/_matrix/media/v3/upload"
        if filename:
            url += "?filename=" + q(filename)
        req = urllib.request.Request(url, data=data, method="POST")
        req.add_header("Content-Type", content_type)
        req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())["content_uri"]

    def say(self, room_id, body, **extra):
        return self.send(room_id, {"msgtype": "m.text", "body": body, **extra})

    def get_event(self, room_id, event_id):
        return self.call("GET", f"/rooms/{q(room_id)}/event/{q(event_id)}")

    def membership(self, room_id, user_id):
        """'join', 'invite', 'leave', ... of `user_id` in the room, or None."""
        try:
            return self.call("GET", f"/rooms/{q(room_id)}/state/m.room.member/{q(user_id)}").get("membership")
        except HttpError as e:
            if e.status == 404:
                return None
            raise

    def messages(self, room_id, limit=100):
        """The room's latest events, oldest first."""
        body = self.call("GET", f"/rooms/{q(room_id)}/messages", params={"dir": "b", "limit": limit})
        return list(reversed(body.get("chunk", [])))

    def wait_joined(self, room_id, user_id, timeout=20):
        return wait_until(lambda: self.membership(room_id, user_id) == "join", timeout)


# --------------------------------------------------------------------------------------------
# Replies


def relates_to(event):
    return (event.get("content") or {}).get("m.relates_to") or {}


def in_reply_to(event):
    return (relates_to(event).get("m.in_reply_to") or {}).get("event_id")


def replies_to(client, room_id, event_id, sender=BOT_ID):
    """Events by `sender` in the room that reply to `event_id` (m.in_reply_to)."""
    return [e for e in client.messages(room_id)
            if e.get("sender") == sender and e.get("type") == "m.room.message" and in_reply_to(e) == event_id]


def wait_reply(client, room_id, event_id, timeout=30, sender=BOT_ID):
    """The first reply by `sender` to `event_id`, or None after `timeout` seconds."""
    found = wait_until(lambda: replies_to(client, room_id, event_id, sender), timeout, 0.5)
    return found[0] if found else None


# --------------------------------------------------------------------------------------------
# The bot


def build_binary(release=False):
    """The grok-appservice binary: $GROK_APPSERVICE_BIN, else `cargo build` in the project."""
    env_bin = os.environ.get("GROK_APPSERVICE_BIN")
    if env_bin:
        return os.path.abspath(env_bin)
    cmd = ["cargo", "build", "--quiet"] + (["--release"] if release else [])
    subprocess.run(cmd, check=True, cwd=ROOT)
    return os.path.join(ROOT, "target", "release" if release else "debug", "grok-appservice")


def read_registration(path):
    """The registration's top-level `key: value` scalars (enough for the tokens), no YAML lib."""
    out = {}
    with open(path) as f:
        for line in f:
            if line[:1].isspace() or ":" not in line or line.lstrip().startswith("#"):
                continue
            key, _, value = line.partition(":")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            out[key.strip()] = value
    return out


class Bot:
    """The grok-appservice process, its registration, config and SQLite file."""

    def __init__(self, stack, binary):
        self.stack, self.binary = stack, binary
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.registration = stack.path("registration.yaml")
        self.db = stack.path("bot.db")
        self.config = stack.path("config.yaml")
        self.reg = {}
        self.homeserver_url = self.provider_url = None

    def generate_registration(self):
        out = subprocess.run([self.binary, "generate-registration", "--server-name", SERVER_NAME,
                              "--url", self.url, "-o", self.registration],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"generate-registration exited {out.returncode}: {out.stdout.strip()}")
        self.reg = read_registration(self.registration)
        return self.reg

    def write_config(self, homeserver_url=None, provider_url=None, extra=None):
        """Writes config.yaml; `extra` adds top-level sections (e.g. {"limits": {...}}).
        Without URLs, the ones of the previous call are used (for a rewrite before a restart)."""
        self.homeserver_url = homeserver_url or self.homeserver_url
        self.provider_url = provider_url or self.provider_url
        config = {
            "homeserver": {"url": self.homeserver_url, "server_name": SERVER_NAME},
            "appservice": {"registration": self.registration, "listen": f"127.0.0.1:{self.port}"},
            "database": {"url": f"sqlite://{self.db}"},
            "provider": {"base_url": self.provider_url},
            "telemetry": {"enabled": True, "store_text": False},
        }
        config.update(extra or {})
        with open(self.config, "w") as f:
            json.dump(config, f, indent=2)  # JSON is valid YAML

    def start(self, api_key, timeout=60, extra_env=None):
        # NO_COLOR: the log is a file, keep it free of terminal colour codes.
        env = {"XAI_API_KEY": api_key, "RUST_LOG": os.environ.get("RUST_LOG", "info"), "NO_COLOR": "1"}
        env.update(extra_env or {})
        self.stack.spawn("bot", [self.binary, "serve", "-c", self.config], env=env)

        def ready():
            self.stack.check_alive("bot")
            return http_ok(f"{self.url}/health") and http_ok(f"{self.url}/ready")

        if not wait_until(ready, timeout, 0.25):
            raise RuntimeError(f"grok-appservice did not answer /health and /ready within {timeout}s")
        return self

    def stop(self, timeout=15):
        """Stops the bot (SIGTERM: a graceful shutdown) and forgets the process; returns its
        exit code."""
        codes = self.stack.stop("bot", timeout, forget=True)
        return codes[-1] if codes else None

    def restart(self, api_key, extra_config=None, timeout=60, extra_env=None):
        """Stops the bot, rewrites its config with `extra_config`, starts it again on the same
        database, registration and port (with `extra_env` as for `start`)."""
        code = self.stop()
        self.write_config(extra=extra_config)
        self.start(api_key, timeout, extra_env=extra_env)
        return code

    def query(self, sql, args=()):
        """Rows of any read-only query on the bot's SQLite database, as dicts."""
        if not os.path.exists(self.db):
            return []
        con = sqlite3.connect(self.db, timeout=5)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute(sql, args).fetchall()]
        except sqlite3.OperationalError:
            return []  # table not created yet
        finally:
            con.close()

    def put_transaction(self, events, txn_id=None):
        """PUTs a transaction to the bot as the homeserver would; returns (status, body)."""
        txn_id = txn_id or f"e2e-{uuid.uuid4().hex}"
        return http("PUT", f"{self.url}/_matrix/app/v1/transactions/{q(txn_id)}",
                    {"events": events}, token=self.reg["hs_token"])

    def request_log(self, event_id=None):
        """request_log rows (as dicts), all or the one for `event_id`."""
        if not os.path.exists(self.db):
            return []
        con = sqlite3.connect(self.db, timeout=5)
        con.row_factory = sqlite3.Row
        try:
            if event_id:
                rows = con.execute("SELECT * FROM request_log WHERE id = ?", (event_id,)).fetchall()
            else:
                rows = con.execute("SELECT * FROM request_log ORDER BY created_at").fetchall()
        except sqlite3.OperationalError:
            return []  # table not created yet
        finally:
            con.close()
        return [dict(r) for r in rows]


def start_stack(stack, binary, provider_url, api_key, venv=None):
    """Registration, Synapse, then the bot: the order Synapse needs (it reads the registration
    at start-up; the bot must be up before events for it are sent, or Synapse backs off)."""
    venv = venv or ensure_venv()
    bot = Bot(stack, binary)
    bot.generate_registration()
    synapse = Synapse(stack, venv, bot.registration).start()
    bot.write_config(synapse.url, provider_url)
    bot.start(api_key)
    return synapse, bot
