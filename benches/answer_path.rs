//! Two measurements of the real library, in process (`bench/run` runs both and puts them in
//! `bench/RESULTS.md`):
//!
//! - `answer` (the default): the bot's own overhead per answered message. The real router and
//!   `AppState` over an instant fake provider and an instant fake homeserver on loopback; N
//!   addressed direct-chat messages are sent one at a time, and per message two intervals are
//!   taken, all as `Instant`s in this process: receipt (just before the webhook gets the PUT)
//!   to the provider's request arriving, and the provider's response leaving to the send
//!   request arriving at the homeserver. p50 and p99 on SQLite, and on PostgreSQL too when
//!   `TEST_DATABASE_URL` is set. `ANSWERS=N` (default 1000).
//! - `floor BODY_FILE`: the parse+classify floor, the webhook's own parse and classify calls
//!   in a loop over one transaction body on one core, no store and no HTTP. `FLOOR_SECS`
//!   (default 3).
//!
//! `cargo bench --bench answer_path [-- answer | -- floor bench/body.json]`. Each prints a
//! human line and one `ANSWER ...` / `FLOOR ...` line of `key=value` pairs for bench/run.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;
use tower::ServiceExt;

use common::{db, response_body, text_event, ALICE, BOT, FAKE_COST_TICKS};
use grok_appservice::classify::{classify, Facts, Identity, Verdict};
use grok_appservice::config::Config;
use grok_appservice::registration;
use grok_appservice::state::{AppState, Timings};
use grok_appservice::store::Store;

const DM: &str = "!dm:example.org";

/// The webhook's parse and classify steps for one transaction body, without the store: keep
/// this in step with `webhook::transaction` and `webhook::plan`. Returns the addressed count.
fn parse_and_classify(body: &[u8], me: &Identity) -> usize {
    let parsed = grok_appservice::ingest::parse_transaction(body).expect("a transaction");
    parsed
        .events
        .iter()
        .filter(|e| matches!(classify(e, me, Facts::default()), Verdict::Addressed(_)))
        .count()
}

/// When each message's requests reached the fakes, keyed by the message's tag.
#[derive(Default)]
struct Marks {
    provider_in: HashMap<String, Instant>,
    provider_out: HashMap<String, Instant>,
    sent: HashMap<String, Instant>,
}

type Shared = Arc<Mutex<Marks>>;

/// The tag `qtag<N>end` a message (and so its prompt and its reply) carries.
fn tag_of(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("qtag")?;
    let len = text[start..].find("end")? + 3;
    Some(text[start..start + len].to_string())
}

async fn provider(State(marks): State<Shared>, body: Bytes) -> Response {
    let arrived = Instant::now();
    let tag = tag_of(&body).unwrap_or_default();
    marks
        .lock()
        .unwrap()
        .provider_in
        .entry(tag.clone())
        .or_insert(arrived);
    let answer = response_body(
        "grok-4.3",
        &format!("answer to {tag}"),
        Some(FAKE_COST_TICKS),
    );
    let response = Json(answer).into_response();
    // The last response of a message counts (a route may call the provider twice).
    marks
        .lock()
        .unwrap()
        .provider_out
        .insert(tag, Instant::now());
    response
}

/// Answers every client-server call at once; sends are timed.
async fn homeserver(State(marks): State<Shared>, uri: Uri, body: Bytes) -> Response {
    let path = uri.path();
    if path.contains("/send/") {
        let arrived = Instant::now();
        if let Some(tag) = tag_of(&body) {
            marks.lock().unwrap().sent.entry(tag).or_insert(arrived);
        }
        return Json(json!({"event_id": format!("$reply{}", rand::random::<u64>())}))
            .into_response();
    }
    let answer = if path.ends_with("/register") {
        json!({"user_id": BOT})
    } else if path.ends_with("/state") {
        json!([])
    } else if path.ends_with("/messages") {
        json!({"chunk": []})
    } else {
        json!({})
    };
    Json(answer).into_response()
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

/// The real state and router over the instant fakes, with limits that admit everything.
async fn setup(db: &db::TestDb, marks: Shared) -> (Arc<AppState>, Router, String) {
    let xai = serve(
        Router::new()
            .route("/v1/responses", post(provider))
            .with_state(marks.clone()),
    )
    .await;
    let hs = serve(Router::new().fallback(homeserver).with_state(marks)).await;
    let yaml = common::config_yaml(&hs, &format!("{xai}/v1"), &db.url);
    let mut config = Config::parse(&yaml).unwrap();
    config
        .apply_env(|k| (k == "XAI_API_KEY").then(|| "xai-bench-key".to_string()))
        .unwrap();
    config.limits.daily_ceiling_usd = 1e6;
    config.limits.per_user_daily_usd = 1e6;
    config.limits.per_user_requests_per_hour = u32::MAX;
    config.bot.room_answers_per_minute = u32::MAX;
    config.validate().unwrap();
    let reg = registration::generate("example.org", "http://127.0.0.1:1", "grok");
    let hs_token = reg.hs_token.clone();
    let store = Store::connect(&config.database.url, config.database.pool_size).unwrap();
    store.migrate().await.unwrap();
    let timings = Timings::from_config(&config);
    let state = AppState::new(config, reg, store, timings).unwrap();
    state
        .store
        .set_room(DM.into(), true, vec![BOT.into(), ALICE.into()])
        .await
        .unwrap();
    let router = grok_appservice::webhook::router(state.clone());
    (state, router, hs_token)
}

/// Per message: (receipt -> provider request, provider response -> send request).
async fn answer_one(
    state: &AppState,
    router: &Router,
    token: &str,
    marks: &Shared,
    i: usize,
) -> (Duration, Duration) {
    let tag = format!("qtag{i}end");
    let event = text_event(
        &format!("$bench{i}"),
        DM,
        ALICE,
        &format!("tell me about otters, {tag}"),
    );
    let request = Request::put(format!("/_matrix/app/v1/transactions/bench{i}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Body::from(json!({"events": [event]}).to_string()))
        .unwrap();
    let receipt = Instant::now();
    let response = router.clone().oneshot(request).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the webhook refused message {i}"
    );
    let deadline = receipt + Duration::from_secs(10);
    let sent = loop {
        if let Some(t) = marks.lock().unwrap().sent.get(&tag) {
            break *t;
        }
        assert!(Instant::now() < deadline, "message {i} was not answered");
        tokio::time::sleep(Duration::from_micros(200)).await;
    };
    // One at a time: the worker's last steps (claim, telemetry hand-off) finish first.
    while !state.tasks.is_empty() {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let m = marks.lock().unwrap();
    let provider_in = m.provider_in[&tag];
    let provider_out = m.provider_out[&tag];
    (provider_in - receipt, sent - provider_out)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn us(d: Duration) -> u128 {
    d.as_micros()
}

async fn answer_bench(db: db::TestDb, n: usize) {
    let marks = Shared::default();
    let (state, router, token) = setup(&db, marks.clone()).await;
    let warmup = 20;
    let (mut recv, mut send, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..warmup + n {
        let (a, b) = answer_one(&state, &router, &token, &marks, i).await;
        if i >= warmup {
            recv.push(a);
            send.push(b);
            total.push(a + b);
        }
    }
    for v in [&mut recv, &mut send, &mut total] {
        v.sort();
    }
    let p = |v: &[Duration], q| us(percentile(v, q));
    println!(
        "answer path on {} ({n} messages, one at a time): receipt->provider p50 {} us p99 {} us; \
         provider->send p50 {} us p99 {} us; both p50 {} us p99 {} us",
        db.label,
        p(&recv, 50.0),
        p(&recv, 99.0),
        p(&send, 50.0),
        p(&send, 99.0),
        p(&total, 50.0),
        p(&total, 99.0),
    );
    println!(
        "ANSWER backend={} n={n} recv_p50_us={} recv_p99_us={} send_p50_us={} send_p99_us={} \
         total_p50_us={} total_p99_us={} total_max_us={}",
        db.label,
        p(&recv, 50.0),
        p(&recv, 99.0),
        p(&send, 50.0),
        p(&send, 99.0),
        p(&total, 50.0),
        p(&total, 99.0),
        us(*total.last().unwrap()),
    );
}

async fn floor_bench(path: &str) {
    let template = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading the transaction body {path}: {e}"));
    let body = template
        .replace("@@TXN@@", "floor")
        .replace("@@TS@@", &chrono::Utc::now().timestamp_millis().to_string())
        .into_bytes();
    let db = db::sqlite();
    let (state, _router, _token) = setup(&db, Shared::default()).await;
    let me = &state.identity;
    let addressed = parse_and_classify(&body, me);
    let secs: f64 = std::env::var("FLOOR_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(300) {
        std::hint::black_box(parse_and_classify(std::hint::black_box(&body), me));
    }
    let started = Instant::now();
    let mut iterations = 0u64;
    while started.elapsed().as_secs_f64() < secs {
        std::hint::black_box(parse_and_classify(std::hint::black_box(&body), me));
        iterations += 1;
    }
    let rate = iterations as f64 / started.elapsed().as_secs_f64();
    println!(
        "parse+classify floor: {rate:.0} txn/s on one core ({} bytes, {addressed} addressed per txn)",
        body.len()
    );
    println!(
        "FLOOR txn_per_s={rate:.1} body_bytes={} addressed_per_txn={addressed}",
        body.len()
    );
}

fn main() {
    // `cargo bench` appends `--bench`; positional arguments are the mode and its file.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    match args.first().map(String::as_str) {
        Some("floor") => {
            let path = args
                .get(1)
                .expect("usage: answer_path floor BODY_FILE (bench/load/make_body.py makes one)");
            rt.block_on(floor_bench(path));
        }
        None | Some("answer") => {
            let n = std::env::var("ANSWERS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
            rt.block_on(async {
                answer_bench(db::sqlite(), n).await;
                if let Some(pg) = db::postgres() {
                    answer_bench(pg, n).await;
                }
            });
        }
        Some(other) => panic!("unknown mode {other}: answer or floor"),
    }
}
