//! Bad input against the webhook over real loopback HTTP: the real router behind the real
//! server (`server::serve`, with its read timeouts), a fake homeserver and a fake xAI. Every
//! request gets a Matrix error `{errcode, error}` or a 200 with the bad event skipped, never a
//! panic or a 5xx, and the process's memory stays bounded.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;
use grok_appservice::webhook::MAX_BODY_BYTES;

const GROUP: &str = "!group:example.org";
/// Anything that should take a moment and hangs instead fails the test after this.
const PATIENCE: Duration = Duration::from_secs(60);

/// Memory-heavy tests run one at a time, so each one's RSS growth is its own.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The harness with the real server on a loopback port.
struct Live {
    h: Harness,
    addr: SocketAddr,
}

impl Live {
    async fn start() -> Self {
        Self::with(|_| {}).await
    }

    async fn with(tweak: impl FnOnce(&mut grok_appservice::config::Config)) -> Self {
        Self::on(db::sqlite(), tweak).await
    }

    async fn on(db: db::TestDb, tweak: impl FnOnce(&mut grok_appservice::config::Config)) -> Self {
        let h = Harness::with(db, tweak).await;
        h.known_room(GROUP, false, &[BOT, ALICE, "@bob:example.org"])
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = h.router.clone();
        let header_timeout = h.state.config.appservice.header_read_timeout;
        tokio::spawn(grok_appservice::server::serve(
            listener,
            router,
            header_timeout,
            std::future::pending(),
        ));
        Live { h, addr }
    }

    fn auth(&self) -> String {
        format!("Authorization: Bearer {}\r\n", self.h.hs_token)
    }

    /// One request on a fresh connection: `head` is the request line and extra headers.
    async fn send(&self, head: &str, body: &[u8]) -> Reply {
        let stream = TcpStream::connect(self.addr).await.unwrap();
        exchange(stream, head, body).await
    }

    /// `PUT` of a transaction body, authenticated.
    async fn put(&self, txn: &str, body: &[u8]) -> Reply {
        let head = format!(
            "PUT /_matrix/app/v1/transactions/{txn} HTTP/1.1\r\n{}",
            self.auth()
        );
        self.send(&head, body).await
    }

    async fn put_events(&self, txn: &str, events: Vec<Value>) -> Reply {
        self.put(txn, json!({ "events": events }).to_string().as_bytes())
            .await
    }
}

/// A response: status and JSON body (`{"raw": text}` when it is not JSON).
#[derive(Debug)]
struct Reply {
    status: u16,
    body: Value,
}

impl Reply {
    /// Asserts a Matrix error with this status and errcode.
    fn assert_error(&self, status: u16, errcode: &str) {
        assert_eq!(
            (self.status, self.body["errcode"].as_str()),
            (status, Some(errcode)),
            "{self:?}"
        );
        assert!(self.body["error"].is_string(), "{self:?}");
    }

    fn assert_ok(&self) {
        assert_eq!((self.status, &self.body), (200, &json!({})), "{self:?}");
    }
}

/// Writes the request (with `Content-Length` and `Host`) while reading the response, so a
/// server that answers before reading the whole body is heard before it closes.
async fn exchange(stream: TcpStream, head: &str, body: &[u8]) -> Reply {
    let (mut rd, mut wr) = stream.into_split();
    let mut request = format!(
        "{head}Host: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let writer = tokio::spawn(async move {
        // The server may close early (an error before the whole body); that is its answer.
        let _ = wr.write_all(&request).await;
        wr
    });
    let reply = tokio::time::timeout(PATIENCE, read_response(&mut rd))
        .await
        .expect("no response within a minute")
        .expect("reading the response");
    drop(writer.await);
    reply
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one HTTP/1.1 response with a `Content-Length` (all the server sends).
async fn read_response(rd: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Reply> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let (end, len) = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            break (end + 4, len);
        }
        let n = rd.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    while buf.len() < end + len {
        let n = rd.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let status_line = String::from_utf8_lossy(&buf[..end]).to_string();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let raw = &buf[end..end + len];
    let body = serde_json::from_slice(raw)
        .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(raw)}));
    Ok(Reply { status, body })
}

/// Waits until the server closes the connection; panics after a minute.
async fn closed_by_server(rd: &mut (impl AsyncRead + Unpin)) {
    let mut sink = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        loop {
            match rd.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server did not close the connection within a minute");
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

extern "C" {
    /// glibc: returns freed heap to the system, so a baseline is not inflated by memory an
    /// earlier test freed (which would then be reused without showing as growth).
    fn malloc_trim(pad: usize) -> i32;
}

/// The process's peak resident memory over a stretch of a test, above where it started.
struct Peak {
    before_kib: u64,
}

impl Peak {
    fn start() -> Self {
        // SAFETY: malloc_trim only releases free memory; it takes no pointers.
        unsafe { malloc_trim(0) };
        // "5" resets VmHWM to the current RSS (Linux 4.0+), so VmHWM is this stretch's peak.
        std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
        Peak {
            before_kib: status_kib("VmRSS:"),
        }
    }

    /// Peak RSS growth since `start`, in MiB (printed for the record).
    fn grown_mib(&self, what: &str) -> u64 {
        let grown = status_kib("VmHWM:").saturating_sub(self.before_kib) / 1024;
        eprintln!("peak RSS growth for {what}: {grown} MiB");
        grown
    }
}

fn chatter(event_id: &str, body: &str) -> Value {
    text_event(event_id, GROUP, ALICE, body)
}

/// The bot's own message echoed back: remembered, so its transaction is recorded (a
/// transaction of chatter alone writes nothing, not even its txnId).
fn echo(event_id: &str, body: &str) -> Value {
    text_event(event_id, GROUP, BOT, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_missing_and_duplicated_tokens_are_refused() {
    let live = Live::start().await;
    let token = live.h.hs_token.clone();
    let body = br#"{"events": []}"#;
    let put = |txn: &str, query: &str, headers: &str| {
        format!("PUT /_matrix/app/v1/transactions/{txn}{query} HTTP/1.1\r\n{headers}")
    };
    let cases: Vec<(String, u16, &str)> = vec![
        (put("a1", "", ""), 401, "M_MISSING_TOKEN"),
        (
            put("a2", "", "Authorization: Bearer wrong\r\n"),
            403,
            "M_FORBIDDEN",
        ),
        (
            put("a3", "", "Authorization: Bearer\r\n"),
            403,
            "M_FORBIDDEN",
        ),
        (
            put("a4", "", &format!("Authorization: bearer {token}\r\n")),
            403,
            "M_FORBIDDEN",
        ),
        (
            put("a5", "", &format!("Authorization: Bearer {token}x\r\n")),
            403,
            "M_FORBIDDEN",
        ),
        (put("a6", "?access_token=", ""), 403, "M_FORBIDDEN"),
        // The header and the query disagree, either way round.
        (
            put(
                "a7",
                "?access_token=wrong",
                &format!("Authorization: Bearer {token}\r\n"),
            ),
            403,
            "M_FORBIDDEN",
        ),
        (
            put(
                "a8",
                &format!("?access_token={token}"),
                "Authorization: Bearer wrong\r\n",
            ),
            403,
            "M_FORBIDDEN",
        ),
        // Duplicated: every copy must match, whichever comes first.
        (
            put(
                "a9",
                &format!("?access_token=wrong&access_token={token}"),
                "",
            ),
            403,
            "M_FORBIDDEN",
        ),
        (
            put(
                "a10",
                &format!("?access_token={token}&access_token=wrong"),
                "",
            ),
            403,
            "M_FORBIDDEN",
        ),
        (
            put(
                "a11",
                "",
                &format!("Authorization: Bearer {token}\r\nAuthorization: Bearer wrong\r\n"),
            ),
            403,
            "M_FORBIDDEN",
        ),
        (
            put(
                "a12",
                "",
                &format!("Authorization: Bearer wrong\r\nAuthorization: Bearer {token}\r\n"),
            ),
            403,
            "M_FORBIDDEN",
        ),
        // Percent-encoded, the token is still compared decoded; a mangled one is wrong.
        (
            put("a13", &format!("?access_token={token}%00"), ""),
            403,
            "M_FORBIDDEN",
        ),
    ];
    for (head, status, errcode) in &cases {
        live.send(head, body).await.assert_error(*status, errcode);
    }
    // Every good form is accepted, duplicates included when they agree.
    for head in [
        put("ok1", "", &format!("Authorization: Bearer {token}\r\n")),
        put("ok2", &format!("?access_token={token}"), ""),
        put(
            "ok3",
            &format!("?access_token={token}&access_token={token}"),
            &format!("Authorization: Bearer {token}\r\n"),
        ),
    ] {
        live.send(&head, body).await.assert_ok();
    }
    let refused = live.h.state.store.txn_seen("a7".into()).await.unwrap();
    assert!(!refused, "a refused transaction is not recorded");
}

#[tokio::test(flavor = "multi_thread")]
async fn traversal_and_encoding_in_path_parameters() {
    let live = Live::start().await;
    let auth = live.auth();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\n{auth}");
    // A txnId is an opaque string: decoded once, stored as is, deduplicated as itself.
    for (i, txn) in [
        "..%2F..%2Fhealth",
        "%2E%2E",
        "a%2Fb%3Fc%23d",
        "%F0%9F%A6%80",
    ]
    .iter()
    .enumerate()
    {
        let event = echo(&format!("$t{i}"), "hi");
        live.put_events(txn, vec![event.clone()]).await.assert_ok();
        live.put_events(txn, vec![event]).await.assert_ok();
    }
    assert!(live
        .h
        .state
        .store
        .txn_seen("../../health".into())
        .await
        .unwrap());
    assert!(live.h.state.store.txn_seen("a/b?c#d".into()).await.unwrap());
    // Not one segment: no route, whatever the dots say.
    for path in [
        "/_matrix/app/v1/transactions/../../../health",
        "/_matrix/app/v1/transactions/a/b",
        "/_matrix/app/v1/transactions/",
    ] {
        let head = format!("PUT {path} HTTP/1.1\r\n{auth}");
        live.send(&head, b"{}")
            .await
            .assert_error(404, "M_UNRECOGNIZED");
    }
    // Invalid UTF-8 once decoded is a bad parameter, not a crash or a bare text answer.
    live.put("%FF%FE", br#"{"events": []}"#)
        .await
        .assert_error(400, "M_INVALID_PARAM");
    live.send(&get("/_matrix/app/v1/users/%40grok%3Aexample.org%FF"), b"")
        .await
        .assert_error(400, "M_INVALID_PARAM");
    // Only the bot's own id, exactly, exists; encodings of something else do not.
    live.send(&get("/_matrix/app/v1/users/%40grok%3Aexample.org"), b"")
        .await
        .assert_ok();
    live.send(&get("/_matrix/app/v1/users/@grok:example.org"), b"")
        .await
        .assert_ok();
    for user in [
        "%40grok%253Aexample.org",
        "%40grok%3Aexample.org%2F..",
        "..%2F%40grok%3Aexample.org",
        "%40GROK%3Aexample.org",
    ] {
        live.send(&get(&format!("/_matrix/app/v1/users/{user}")), b"")
            .await
            .assert_error(404, "M_NOT_FOUND");
    }
    live.send(&get("/_matrix/app/v1/users/%40grok%3Aexample.org%00"), b"")
        .await
        .assert_error(400, "M_INVALID_PARAM");
    live.send(&get("/_matrix/app/v1/rooms/%23..%2F..%3Aexample.org"), b"")
        .await
        .assert_error(404, "M_NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_at_and_just_over_the_limit() {
    let _one = HEAVY.lock().await;
    let live = Live::start().await;
    // Declared over the limit: refused before a byte of the body is read.
    let stream = TcpStream::connect(live.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "PUT /_matrix/app/v1/transactions/big1 HTTP/1.1\r\n{}Host: x\r\nContent-Length: {}\r\n\r\n",
        live.auth(),
        MAX_BODY_BYTES + 1
    );
    wr.write_all(head.as_bytes()).await.unwrap();
    let reply = tokio::time::timeout(PATIENCE, read_response(&mut rd))
        .await
        .unwrap()
        .unwrap();
    reply.assert_error(413, "M_TOO_LARGE");

    // Sent without a length (chunked): cut off once past the limit.
    let stream = TcpStream::connect(live.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "PUT /_matrix/app/v1/transactions/big2 HTTP/1.1\r\n{}Host: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        live.auth()
    );
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        let piece = vec![b' '; 1 << 20];
        for _ in 0..=MAX_BODY_BYTES / piece.len() {
            wr.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                .await?;
            wr.write_all(&piece).await?;
            wr.write_all(b"\r\n").await?;
        }
        wr.write_all(b"0\r\n\r\n").await
    });
    let reply = tokio::time::timeout(PATIENCE, read_response(&mut rd))
        .await
        .unwrap()
        .unwrap();
    reply.assert_error(413, "M_TOO_LARGE");
    drop(writer.await);

    // Exactly at the limit: one echo of the bot whose body fills it, accepted and remembered,
    // for a small multiple of its size in memory.
    let frame = json!({"events": [echo("$huge", "")]}).to_string();
    let fill = MAX_BODY_BYTES - frame.len();
    let body = frame.replacen(
        r#""body":"""#,
        &format!(r#""body":"{}""#, "a".repeat(fill)),
        1,
    );
    assert_eq!(body.len(), MAX_BODY_BYTES);
    let peak = Peak::start();
    live.put("at-limit", body.as_bytes()).await.assert_ok();
    let grown_mib = peak.grown_mib("a body at the limit");
    // The body, its copy on the wire side, the parsed tree and the event: about 4x; 8x is the
    // bound (the allocator keeps some of it).
    assert!(
        grown_mib < 8 * 32,
        "RSS grew {grown_mib} MiB for a 32 MiB body"
    );
    assert!(live
        .h
        .state
        .store
        .txn_seen("at-limit".into())
        .await
        .unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn deeply_nested_json_is_refused_without_a_stack_overflow() {
    let live = Live::start().await;
    let depth = 100_000;
    let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let objects = format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
    let bodies = [
        format!(r#"{{"events": [{arrays}]}}"#),
        // A well-formed event whose content is nested that deep.
        format!(
            r#"{{"events": [{{"event_id": "$n", "room_id": "{GROUP}", "sender": "{ALICE}", "type": "m.room.message", "content": {objects}}}]}}"#
        ),
        arrays.clone(),
        format!(r#"{{"events": [], "extra": {objects}}}"#),
    ];
    for (i, body) in bodies.iter().enumerate() {
        let reply = live.put(&format!("deep{i}"), body.as_bytes()).await;
        // Refused as JSON, or (a parser that skips what it does not need) taken with the
        // event skipped; nothing else.
        let errcode = reply.body["errcode"].as_str().unwrap_or("");
        let refused = reply.status == 400 && ["M_NOT_JSON", "M_BAD_JSON"].contains(&errcode);
        assert!(refused || reply.status == 200, "{i}: {reply:?}");
    }
    // The server is still there.
    live.put_events("after-deep", vec![]).await.assert_ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_utf8_and_nul_bytes() {
    for db in db::all() {
        let label = db.label;
        let live = Live::on(db, |_| {}).await;
        invalid_utf8_and_nul_bytes_on(&live).await;
        // The bot answered the mention with a NUL in it, once.
        assert_eq!(live.h.hs.sent().len(), 1, "{label}");
    }
}

async fn invalid_utf8_and_nul_bytes_on(live: &Live) {
    let mut bad = br#"{"events": [{"event_id": "$u", "room_id": "!r:x", "sender": "@a:x", "type": "m.room.message", "content": {"body": "#.to_vec();
    bad.extend_from_slice(b"\"\xff\xfe\xc3\x28\"}}]}");
    live.put("utf8-1", &bad)
        .await
        .assert_error(400, "M_NOT_JSON");
    live.put("utf8-2", b"\xef\xbb\xbf{\"events\": []}")
        .await
        .assert_error(400, "M_NOT_JSON");
    live.put("nul-1", b"{\"events\": [\x00]}")
        .await
        .assert_error(400, "M_NOT_JSON");
    live.put("nul-2", b"\x00\x00\x00\x00")
        .await
        .assert_error(400, "M_NOT_JSON");
    // NUL escaped in strings is valid JSON. In text it is kept; in an id (which none can
    // hold, and PostgreSQL could not store) the event is skipped alone.
    let malformed = || {
        live.h
            .state
            .metrics
            .get("events_total", &[("verdict", "malformed")])
    };
    let before = malformed();
    let mut nul_text = mention_event("$nul-text", GROUP, ALICE, "grok: a\u{0}b");
    nul_text["content"]["formatted_body"] = json!("<b>\u{0}</b>");
    nul_text["content"]["m.relates_to"] = json!({"m.in_reply_to": {"event_id": "$x\u{0}"}});
    let mut nul_state = json!({"event_id": "$nul-state", "room_id": GROUP, "sender": ALICE,
        "type": "m.room.member", "state_key": "@b\u{0}:example.org", "content": {"membership": "join"}});
    nul_state["origin_server_ts"] = json!(now_ms());
    let events = vec![
        nul_text,
        mention_event("$nul\u{0}id", GROUP, ALICE, "grok: hi"),
        mention_event("$nul-room", "!gr\u{0}oup:example.org", ALICE, "grok: hi"),
        mention_event("$nul-sender", GROUP, "@ali\u{0}ce:example.org", "grok: hi"),
        nul_state,
        chatter("$plain-nul", "\u{0}"),
    ];
    live.put_events("nul-3", events).await.assert_ok();
    assert_eq!(malformed() - before, 4);
    live.put_events("nul%00txn", vec![])
        .await
        .assert_error(400, "M_INVALID_PARAM");
    live.h.settle().await;
    // Headers with bytes HTTP does not allow never reach the handler.
    let head =
        "PUT /_matrix/app/v1/transactions/hdr HTTP/1.1\r\nAuthorization: Bearer \u{1}\u{7f}\r\n";
    let reply = live.send(head, b"{}").await;
    assert!(reply.status == 400 || reply.status == 403, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_headers_and_idle_connections_are_closed() {
    let live = Live::with(|c| {
        c.appservice.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    // Headers one byte at a time, slower than the server will wait for: cut off.
    let stream = TcpStream::connect(live.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let trickle = tokio::spawn(async move {
        let head = b"PUT /_matrix/app/v1/transactions/slow HTTP/1.1\r\nX-Padding: ";
        wr.write_all(head).await?;
        // Far longer than the timeout if it were never enforced.
        for _ in 0..600 {
            wr.write_all(b"a").await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok::<_, std::io::Error>(())
    });
    closed_by_server(&mut rd).await;
    trickle.abort();

    // A connection that never sends anything is closed too.
    let mut idle = TcpStream::connect(live.addr).await.unwrap();
    closed_by_server(&mut idle).await;

    // After its first request, a keep-alive connection idle that long is closed.
    let mut kept = TcpStream::connect(live.addr).await.unwrap();
    let request = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    kept.write_all(request.as_bytes()).await.unwrap();
    let reply = read_response(&mut kept).await.unwrap();
    assert_eq!(reply.status, 200);
    closed_by_server(&mut kept).await;

    // A prompt client is unaffected.
    live.put_events("prompt", vec![]).await.assert_ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_body_gets_a_timeout_and_is_closed() {
    let live = Live::with(|c| {
        c.appservice.body_read_timeout = Duration::from_secs(1);
    })
    .await;
    let stream = TcpStream::connect(live.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "PUT /_matrix/app/v1/transactions/slowbody HTTP/1.1\r\n{}Host: x\r\nContent-Length: 100000\r\n\r\n{{\"events\": [",
        live.auth()
    );
    let trickle = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        for _ in 0..600 {
            wr.write_all(b" ").await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok::<_, std::io::Error>(())
    });
    let reply = tokio::time::timeout(PATIENCE, read_response(&mut rd))
        .await
        .expect("no answer within a minute")
        .unwrap();
    reply.assert_error(408, "M_UNKNOWN");
    closed_by_server(&mut rd).await;
    trickle.abort();
    assert!(!live
        .h
        .state
        .store
        .txn_seen("slowbody".into())
        .await
        .unwrap());

    // Without the token, the body is never waited for.
    let head = "PUT /_matrix/app/v1/transactions/slowanon HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n";
    let stream = TcpStream::connect(live.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    wr.write_all(head.as_bytes()).await.unwrap();
    let reply = tokio::time::timeout(
        Duration::from_secs(1) / 2 + PATIENCE,
        read_response(&mut rd),
    )
    .await
    .unwrap()
    .unwrap();
    reply.assert_error(401, "M_MISSING_TOKEN");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_concurrent_connections() {
    let _one = HEAVY.lock().await;
    let live = Live::start().await;
    let peak = Peak::start();
    // All open at once before any request is sent.
    let mut streams = Vec::new();
    for _ in 0..1_000 {
        streams.push(TcpStream::connect(live.addr).await.unwrap());
    }
    let auth = live.auth();
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, stream)| {
            let head = format!("PUT /_matrix/app/v1/transactions/c{i} HTTP/1.1\r\n{auth}");
            let body = json!({"events": [echo(&format!("$c{i}"), "echo")]}).to_string();
            tokio::spawn(async move { exchange(stream, &head, body.as_bytes()).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().assert_ok();
    }
    let grown_mib = peak.grown_mib("1,000 connections");
    assert!(
        grown_mib < 200,
        "RSS grew {grown_mib} MiB for 1,000 connections"
    );
    for i in [0, 499, 999] {
        assert!(live.h.state.store.txn_seen(format!("c{i}")).await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_with_a_ten_megabyte_body() {
    let _one = HEAVY.lock().await;
    let live = Live::start().await;
    let big = "word ".repeat(2 * 1024 * 1024);
    let peak = Peak::start();
    live.put_events("ten-mb-chatter", vec![chatter("$big-chatter", &big)])
        .await
        .assert_ok();
    // Addressed: the limiter refuses what it could not afford (no model call is made for a
    // question this size), and the user hears why.
    live.put_events(
        "ten-mb-mention",
        vec![mention_event("$big-mention", GROUP, ALICE, &big)],
    )
    .await
    .assert_ok();
    let row = live.h.row("$big-mention").await;
    live.h.settle().await;
    let grown_mib = peak.grown_mib("two 10 MB events");
    assert!(
        grown_mib < 400,
        "RSS grew {grown_mib} MiB for two 10 MB events"
    );
    assert!(
        live.h
            .xai
            .seen()
            .iter()
            .all(|s| s.body.to_string().len() < 1 << 20),
        "a 10 MB question reached the provider"
    );
    assert!(!row.ok, "{row:?}");
    let replies = live.h.hs.sent();
    assert_eq!(replies.len(), 1, "one notice for the refused question");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_thousand_events_in_one_transaction() {
    let _one = HEAVY.lock().await;
    let live = Live::start().await;
    let mut events: Vec<Value> = (0..100_000)
        .map(|i| match i % 10 {
            // Malformed ones are skipped alone.
            7 => json!({"event_id": format!("$m{i}"), "type": "m.room.message"}),
            _ => chatter(&format!("$e{i}"), "just chatting"),
        })
        .collect();
    events.push(mention_event("$last", GROUP, ALICE, "grok: still there?"));
    let body = json!({ "events": events }).to_string();
    let size_mib = body.len() as u64 / (1 << 20);
    let peak = Peak::start();
    live.put("hundred-k", body.as_bytes()).await.assert_ok();
    let grown_mib = peak.grown_mib("100,000 events");
    assert!(
        grown_mib < 40 * size_mib.max(1),
        "RSS grew {grown_mib} MiB for a {size_mib} MiB transaction"
    );
    let metrics = &live.h.state.metrics;
    assert_eq!(
        metrics.get("events_total", &[("verdict", "malformed")]),
        10_000
    );
    assert_eq!(metrics.get("events_total", &[("verdict", "addressed")]), 1);
    // The one question among them is answered.
    let row = live.h.row("$last").await;
    assert!(row.ok, "{row:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn room_facts_takes_more_ids_than_a_query_can_bind() {
    for db in db::all() {
        let store = grok_appservice::store::Store::connect(&db.url, 2).unwrap();
        store.migrate().await.unwrap();
        store
            .set_room(GROUP.into(), false, vec![BOT.into(), ALICE.into()])
            .await
            .unwrap();
        // More than either backend binds in one statement, distinct and repeated.
        let mut rooms: Vec<String> = (0..70_000).map(|i| format!("!r{i}:example.org")).collect();
        rooms.extend(std::iter::repeat_n(GROUP.to_string(), 40_000));
        let targets: Vec<String> = (0..70_000).map(|i| format!("$t{i}")).collect();
        let facts = store.room_facts(rooms, targets).await.unwrap();
        assert_eq!(facts.rooms.len(), 1, "{}", db.label);
        assert_eq!(facts.rooms[GROUP], (false, 2), "{}", db.label);
        assert!(facts.bot_events.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_finishes_the_request_in_flight_then_stops() {
    let h = Harness::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(grok_appservice::server::serve(
        listener,
        h.router.clone(),
        Duration::from_secs(30),
        async move {
            let _ = stopped.await;
        },
    ));
    // A request whose body is still on its way when the shutdown starts.
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let body = json!({"events": [echo("$last", "bye")]}).to_string();
    let body = body.as_bytes();
    let head = format!(
        "PUT /_matrix/app/v1/transactions/last HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        h.hs_token,
        body.len()
    );
    wr.write_all(head.as_bytes()).await.unwrap();
    wr.write_all(&body[..5]).await.unwrap();
    // An idle keep-alive connection, which has nothing in flight.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut idle).await.unwrap().status, 200);

    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    wr.write_all(&body[5..]).await.unwrap();
    let reply = tokio::time::timeout(PATIENCE, read_response(&mut rd))
        .await
        .unwrap()
        .unwrap();
    reply.assert_ok();
    closed_by_server(&mut idle).await;
    tokio::time::timeout(PATIENCE, server)
        .await
        .expect("serve returned within a minute")
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    assert!(h.state.store.txn_seen("last".into()).await.unwrap());
}
