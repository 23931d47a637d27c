//! Shared test harness: fake homeserver and fake xAI servers on loopback, and the real
//! appservice router driven in-process.
#![allow(dead_code)]

pub mod db;
pub mod proxy;
pub mod serve;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use tower::ServiceExt;

use grok_appservice::config::Config;
use grok_appservice::registration;
use grok_appservice::state::{AppState, Overrides, Timings};
use grok_appservice::store::{RequestLogRow, Store};

pub const BOT: &str = "@grok:example.org";
pub const ALICE: &str = "@alice:example.org";

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// One request a fake server received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
    /// When it arrived.
    pub at: std::time::Instant,
}

/// A scripted answer of a fake server.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(&'static str, String)>,
}

#[derive(Default)]
struct HsInner {
    seen: Vec<Seen>,
    sent_by_txn: HashMap<String, String>,
    members: HashMap<String, Vec<String>>,
    /// Room id -> its state events (`GET /rooms/{room}/state`).
    state: HashMap<String, Vec<Value>>,
    events: HashMap<String, Value>,
    send_script: VecDeque<Scripted>,
    next_id: u64,
    /// `(room, event_id, content)` of everything the bot posted, oldest first.
    timeline: Vec<(String, String, Value)>,
    /// `server/media_id` -> (content type, bytes) of uploaded media.
    media: HashMap<String, (String, Vec<u8>)>,
    /// Answer the authenticated media endpoint with 404 `M_UNRECOGNIZED` (an old homeserver).
    legacy_media_only: bool,
    /// Rooms whose leave is answered 403.
    refuse_leave: std::collections::HashSet<String>,
}

/// A fake homeserver implementing the client-server calls the bot makes.
#[derive(Clone)]
pub struct FakeHs {
    pub url: String,
    inner: Arc<Mutex<HsInner>>,
}

impl FakeHs {
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(HsInner::default()));
        let app = Router::new()
            .route("/_matrix/client/v3/register", post(hs_register))
            .route("/_matrix/client/v3/profile/{user}/displayname", put(hs_ok))
            .route("/_matrix/client/v1/appservice/{id}/ping", post(hs_ping))
            .route("/_matrix/client/v3/rooms/{room}/join", post(hs_join))
            .route("/_matrix/client/v3/rooms/{room}/leave", post(hs_leave))
            .route("/_matrix/client/v3/joined_rooms", get(hs_joined_rooms))
            .route("/_matrix/client/v3/rooms/{room}/forget", post(hs_ok))
            .route("/_matrix/client/v3/rooms/{room}/state", get(hs_state))
            .route(
                "/_matrix/client/v3/rooms/{room}/joined_members",
                get(hs_members),
            )
            .route(
                "/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}",
                put(hs_send),
            )
            .route("/_matrix/client/v3/rooms/{room}/typing/{user}", put(hs_ok))
            .route(
                "/_matrix/client/v3/rooms/{room}/event/{event}",
                get(hs_event),
            )
            .route("/_matrix/client/v3/rooms/{room}/messages", get(hs_messages))
            .route(
                "/_matrix/client/v1/media/download/{server}/{media}",
                get(hs_media_authenticated),
            )
            .route(
                "/_matrix/media/v3/download/{server}/{media}",
                get(hs_media_legacy),
            )
            .with_state(inner.clone());
        let addr = serve(app).await;
        Self {
            url: format!("http://{addr}"),
            inner,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HsInner> {
        self.inner.lock().unwrap()
    }

    pub fn set_members(&self, room: &str, members: &[&str]) {
        self.lock()
            .members
            .insert(room.into(), members.iter().map(|m| m.to_string()).collect());
    }

    /// Sets a room's state events (power levels, create event).
    pub fn set_state(&self, room: &str, events: Vec<Value>) {
        self.lock().state.insert(room.into(), events);
    }

    pub fn add_event(&self, event: Value) {
        let id = event["event_id"].as_str().unwrap().to_string();
        self.lock().events.insert(id, event);
    }

    /// The next sends answer these instead of succeeding.
    pub fn script_send(&self, answer: Scripted) {
        self.lock().send_script.push_back(answer);
    }

    /// Leaving `room` is refused (403).
    pub fn refuse_leave(&self, room: &str) {
        self.lock().refuse_leave.insert(room.into());
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// Messages that reached the room (distinct txnIds), in order.
    pub fn sent(&self) -> Vec<Seen> {
        let mut txns = std::collections::HashSet::new();
        self.seen()
            .into_iter()
            .filter(|s| s.method == "PUT" && s.path.contains("/send/"))
            .filter(|s| txns.insert(s.path.clone()))
            .collect()
    }

    /// How many distinct messages the bot posted (cheap, for load tests).
    pub fn send_count(&self) -> usize {
        self.lock().sent_by_txn.len()
    }

    pub fn calls_to(&self, fragment: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.path.contains(fragment))
            .count()
    }
}

type HsState = State<Arc<Mutex<HsInner>>>;

fn record(inner: &Mutex<HsInner>, method: &str, path: String, headers: &HeaderMap, body: &Bytes) {
    let body = serde_json::from_slice(body).unwrap_or(Value::Null);
    inner.lock().unwrap().seen.push(Seen {
        at: std::time::Instant::now(),
        method: method.into(),
        path,
        headers: headers.clone(),
        body,
    });
}

async fn hs_register(State(s): HsState, h: HeaderMap, b: Bytes) -> Json<Value> {
    record(&s, "POST", "/register".into(), &h, &b);
    Json(json!({"user_id": BOT}))
}
async fn hs_ok(State(s): HsState, uri: axum::http::Uri, h: HeaderMap, b: Bytes) -> Json<Value> {
    let path = percent_encoding::percent_decode_str(uri.path())
        .decode_utf8_lossy()
        .to_string();
    record(&s, "PUT/POST", path, &h, &b);
    Json(json!({}))
}
/// Leaves a room: the bot is no longer a member (unless the leave is refused).
async fn hs_leave(
    State(s): HsState,
    Path(room): Path<String>,
    uri: axum::http::Uri,
    h: HeaderMap,
    b: Bytes,
) -> Response {
    let path = percent_encoding::percent_decode_str(uri.path())
        .decode_utf8_lossy()
        .to_string();
    record(&s, "PUT/POST", path, &h, &b);
    let mut inner = s.lock().unwrap();
    if inner.refuse_leave.contains(&room) {
        let body = json!({"errcode": "M_FORBIDDEN", "error": "no"});
        return (StatusCode::FORBIDDEN, Json(body)).into_response();
    }
    if let Some(members) = inner.members.get_mut(&room) {
        members.retain(|m| m != BOT);
    }
    Json(json!({})).into_response()
}
/// The rooms whose members include the bot.
async fn hs_joined_rooms(State(s): HsState) -> Json<Value> {
    let inner = s.lock().unwrap();
    let mut rooms: Vec<&String> = inner
        .members
        .iter()
        .filter(|(_, m)| m.iter().any(|u| u == BOT))
        .map(|(r, _)| r)
        .collect();
    rooms.sort();
    Json(json!({ "joined_rooms": rooms }))
}
async fn hs_ping(State(s): HsState, h: HeaderMap, b: Bytes) -> Json<Value> {
    record(&s, "POST", "/ping".into(), &h, &b);
    Json(json!({"duration_ms": 3}))
}
async fn hs_join(
    State(s): HsState,
    Path(room): Path<String>,
    h: HeaderMap,
    b: Bytes,
) -> Json<Value> {
    record(&s, "POST", format!("/join/{room}"), &h, &b);
    Json(json!({"room_id": room}))
}
async fn hs_state(State(s): HsState, Path(room): Path<String>) -> Json<Value> {
    let events = s.lock().unwrap().state.get(&room).cloned();
    Json(Value::Array(events.unwrap_or_default()))
}
async fn hs_members(State(s): HsState, Path(room): Path<String>) -> Json<Value> {
    let members = s
        .lock()
        .unwrap()
        .members
        .get(&room)
        .cloned()
        .unwrap_or_default();
    let joined: serde_json::Map<String, Value> =
        members.into_iter().map(|m| (m, json!({}))).collect();
    Json(json!({"joined": joined}))
}
async fn hs_send(
    State(s): HsState,
    Path((room, txn)): Path<(String, String)>,
    h: HeaderMap,
    b: Bytes,
) -> Response {
    let path = format!("/rooms/{room}/send/{txn}");
    let scripted = s.lock().unwrap().send_script.pop_front();
    if let Some(answer) = scripted {
        record(&s, "PUT-REJECTED", path, &h, &b);
        return scripted_response(answer);
    }
    record(&s, "PUT", path, &h, &b);
    let mut inner = s.lock().unwrap();
    inner.next_id += 1;
    let fresh = format!("$reply{}", inner.next_id);
    // Like Synapse: the same txnId gives back the same event, and nothing is posted twice.
    let is_new = !inner.sent_by_txn.contains_key(&txn);
    let id = inner.sent_by_txn.entry(txn).or_insert(fresh).clone();
    if is_new {
        let content = serde_json::from_slice(&b).unwrap_or(Value::Null);
        inner.timeline.push((room, id.clone(), content));
    }
    Json(json!({"event_id": id})).into_response()
}
async fn hs_messages(State(s): HsState, Path(room): Path<String>) -> Json<Value> {
    let inner = s.lock().unwrap();
    let chunk: Vec<Value> = inner
        .timeline
        .iter()
        .rev()
        .filter(|(r, _, _)| *r == room)
        .map(|(_, id, content)| json!({"event_id": id, "sender": BOT, "type": "m.room.message", "content": content}))
        .collect();
    Json(json!({"chunk": chunk}))
}

impl FakeHs {
    /// Stores media as if a user uploaded it; returns its `mxc://` URI.
    pub fn upload(&self, content_type: &str, bytes: &[u8]) -> String {
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = format!("media{}", inner.next_id);
        inner.media.insert(
            format!("example.org/{id}"),
            (content_type.to_string(), bytes.to_vec()),
        );
        format!("mxc://example.org/{id}")
    }

    /// Makes the homeserver one without authenticated media (before Matrix 1.11).
    pub fn legacy_media_only(&self) {
        self.lock().legacy_media_only = true;
    }

    /// Media downloads the bot made (either endpoint).
    pub fn downloads(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path.contains("/download/"))
            .collect()
    }

    /// Forgets all send txnIds, as Synapse does after 30-60 minutes.
    pub fn forget_txn_ids(&self) {
        self.lock().sent_by_txn.clear();
    }
}

async fn hs_event(State(s): HsState, Path((_room, event)): Path<(String, String)>) -> Response {
    match s.lock().unwrap().events.get(&event) {
        Some(e) => Json(e.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"errcode": "M_NOT_FOUND", "error": "no event"})),
        )
            .into_response(),
    }
}

async fn hs_media_authenticated(
    State(s): HsState,
    Path((server, media)): Path<(String, String)>,
    h: HeaderMap,
) -> Response {
    let path = format!("/_matrix/client/v1/media/download/{server}/{media}");
    record(&s, "GET", path, &h, &Bytes::new());
    if s.lock().unwrap().legacy_media_only {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"})),
        )
            .into_response();
    }
    media_response(&s, &server, &media)
}

async fn hs_media_legacy(
    State(s): HsState,
    Path((server, media)): Path<(String, String)>,
    h: HeaderMap,
) -> Response {
    let path = format!("/_matrix/media/v3/download/{server}/{media}");
    record(&s, "GET", path, &h, &Bytes::new());
    media_response(&s, &server, &media)
}

fn media_response(s: &Mutex<HsInner>, server: &str, media: &str) -> Response {
    match s.lock().unwrap().media.get(&format!("{server}/{media}")) {
        Some((content_type, bytes)) => {
            let mut response = Response::new(Body::from(bytes.clone()));
            response.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                content_type.parse().unwrap(),
            );
            response
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"errcode": "M_NOT_FOUND", "error": "Not found"})),
        )
            .into_response(),
    }
}

fn scripted_response(answer: Scripted) -> Response {
    let mut response = (
        StatusCode::from_u16(answer.status).unwrap(),
        Json(answer.body),
    )
        .into_response();
    for (k, v) in answer.headers {
        response.headers_mut().insert(k, v.parse().unwrap());
    }
    response
}

#[derive(Default)]
struct XaiInner {
    seen: Vec<Seen>,
    script: VecDeque<Scripted>,
    /// When false, default answers omit `cost_in_usd_ticks`.
    no_cost: bool,
    /// How long each answer takes.
    delay: Duration,
    /// Requests received, including those still waiting out `delay`.
    arrived: usize,
    /// Streamed answers: this text instead of the default, in `stream_chunks` deltas sent
    /// `stream_gap` apart; `break_stream` ends the stream halfway, with no terminal event.
    stream_text: Option<String>,
    stream_chunks: usize,
    stream_gap: Duration,
    break_stream: bool,
}

/// A fake xAI Responses API.
#[derive(Clone)]
pub struct FakeXai {
    pub url: String,
    inner: Arc<Mutex<XaiInner>>,
}

pub const FAKE_COST_TICKS: i64 = 1_234_567;

/// A Responses API body in the documented shape.
pub fn response_body(model: &str, text: &str, cost: Option<i64>) -> Value {
    let mut usage = json!({
        "input_tokens": 120, "input_tokens_details": {"cached_tokens": 20},
        "output_tokens": 30, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 150,
    });
    if let Some(c) = cost {
        usage["cost_in_usd_ticks"] = json!(c);
    }
    json!({
        "id": "resp_fake", "object": "response", "created_at": 1_700_000_000, "model": model,
        "status": "completed",
        "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": usage,
    })
}

impl FakeXai {
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(XaiInner::default()));
        let app = Router::new()
            .route("/v1/responses", post(xai_responses))
            .with_state(inner.clone());
        let addr = serve(app).await;
        Self {
            url: format!("http://{addr}/v1"),
            inner,
        }
    }

    pub fn script(&self, status: u16, body: Value) {
        self.script_with_headers(status, body, vec![]);
    }

    pub fn script_with_headers(
        &self,
        status: u16,
        body: Value,
        headers: Vec<(&'static str, String)>,
    ) {
        self.inner.lock().unwrap().script.push_back(Scripted {
            status,
            body,
            headers,
        });
    }

    /// Makes every answer take `delay` (a slow model).
    pub fn set_delay(&self, delay: Duration) {
        self.inner.lock().unwrap().delay = delay;
    }

    /// Streamed answers say `text` in `chunks` deltas, `gap` apart; `broken` cuts them off.
    pub fn set_stream(&self, text: &str, chunks: usize, gap: Duration, broken: bool) {
        let mut inner = self.inner.lock().unwrap();
        inner.stream_text = Some(text.to_string());
        inner.stream_chunks = chunks.max(1);
        inner.stream_gap = gap;
        inner.break_stream = broken;
    }

    /// Requests received so far, answered or not.
    pub fn arrived(&self) -> usize {
        self.inner.lock().unwrap().arrived
    }

    pub fn omit_cost(&self) {
        self.inner.lock().unwrap().no_cost = true;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.inner.lock().unwrap().seen.clone()
    }
}

async fn xai_responses(State(s): State<Arc<Mutex<XaiInner>>>, h: HeaderMap, b: Bytes) -> Response {
    let delay = {
        let mut inner = s.lock().unwrap();
        inner.arrived += 1;
        inner.delay
    };
    tokio::time::sleep(delay).await;
    xai_answer(&s, h, b)
}

fn xai_answer(s: &Mutex<XaiInner>, h: HeaderMap, b: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
    let mut inner = s.lock().unwrap();
    inner.seen.push(Seen {
        at: std::time::Instant::now(),
        method: "POST".into(),
        path: "/v1/responses".into(),
        headers: h,
        body: body.clone(),
    });
    if let Some(answer) = inner.script.pop_front() {
        return scripted_response(answer);
    }
    // A message with images is a list of parts: answer to its text part.
    let content = &body["input"][0]["content"];
    let input = content
        .as_str()
        .or_else(|| {
            content
                .as_array()?
                .iter()
                .find_map(|p| (p["type"] == "input_text").then(|| p["text"].as_str())?)
        })
        .unwrap_or("")
        .to_string();
    let cost = (!inner.no_cost).then_some(FAKE_COST_TICKS);
    let model = body["model"].as_str().unwrap_or("").to_string();
    let mut answer = response_body(&model, &format!("answer to: {input}"), cost);
    if body["tools"][0]["type"] == "web_search" {
        // One successful search, with its source, as xAI reports server-side tool use.
        answer["usage"]["server_side_tool_usage_details"] = json!({"web_search_calls": 1});
        answer["citations"] = json!(["https://news.example.org/story"]);
    }
    let mut response = if body["stream"] == true {
        let text = inner.stream_text.clone();
        if let Some(t) = &text {
            answer["output"][0]["content"][0]["text"] = json!(t);
        }
        sse_response(
            answer,
            inner.stream_chunks.max(1),
            inner.stream_gap,
            inner.break_stream,
        )
    } else {
        Json(answer).into_response()
    };
    response
        .headers_mut()
        .insert("x-request-id", "req-fake-1".parse().unwrap());
    response
}

/// The Responses API's server-sent events for `answer`: its text in `chunks` deltas `gap`
/// apart, then `response.completed` (unless `broken`: the stream stops halfway).
fn sse_response(answer: Value, chunks: usize, gap: Duration, broken: bool) -> Response {
    let text = answer["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(chunks).max(1);
    let mut events: Vec<String> = vec![format!(
        "event: response.created\ndata: {}\n\n",
        json!({"type": "response.created"})
    )];
    for piece in chars.chunks(size) {
        let delta: String = piece.iter().collect();
        events.push(format!(
            "event: response.output_text.delta\ndata: {}\n\n",
            json!({"type": "response.output_text.delta", "delta": delta})
        ));
    }
    if broken {
        events.truncate(1 + chunks / 2);
    } else {
        events.push(format!(
            "event: response.completed\ndata: {}\n\n",
            json!({"type": "response.completed", "response": answer})
        ));
    }
    let stream = futures_util::stream::unfold(events.into_iter(), move |mut rest| async move {
        let next = rest.next()?;
        tokio::time::sleep(gap).await;
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(next)), rest))
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        "text/event-stream".parse().unwrap(),
    );
    response
}

/// The real appservice state and router over fakes and a test database.
pub struct Harness {
    pub state: Arc<AppState>,
    pub router: Router,
    pub hs: FakeHs,
    pub xai: FakeXai,
    pub hs_token: String,
    pub db: Arc<db::TestDb>,
}

pub fn config_yaml(hs: &str, xai: &str, db_url: &str) -> String {
    format!(
        "homeserver: {{url: '{hs}', server_name: example.org}}\n\
         database: {{url: '{db_url}', pool_size: 4}}\n\
         provider: {{base_url: '{xai}', max_retries: 2}}\n\
         models: {{final: grok-4.3, fallback: grok-4.20-non-reasoning}}\n\
         telemetry: {{enabled: true, store_text: false}}\n"
    )
}

impl Harness {
    pub async fn new() -> Self {
        Self::with(db::sqlite(), |_| {}).await
    }

    pub async fn with(db: db::TestDb, tweak: impl FnOnce(&mut Config)) -> Self {
        Self::with_overrides(db, tweak, Overrides::default()).await
    }

    /// A harness with parts of the state substituted (clock, telemetry sink).
    pub async fn with_overrides(
        db: db::TestDb,
        tweak: impl FnOnce(&mut Config),
        overrides: Overrides,
    ) -> Self {
        let hs = FakeHs::start().await;
        let xai = FakeXai::start().await;
        let mut config = Config::parse(&config_yaml(&hs.url, &xai.url, &db.url)).unwrap();
        config
            .apply_env(|k| (k == "XAI_API_KEY").then(|| "xai-test-key".to_string()))
            .unwrap();
        tweak(&mut config);
        config.validate().unwrap();
        let reg = registration::generate("example.org", "http://127.0.0.1:1", "grok");
        Self::build(config, reg, Arc::new(db), hs, xai, overrides).await
    }

    /// A second process over the same database and fakes (a restart or another replica).
    pub async fn restart(&self) -> Harness {
        self.replica(|_| {}).await
    }

    /// Another replica over the same database and fakes, its config changed by `tweak`.
    pub async fn replica(&self, tweak: impl FnOnce(&mut Config)) -> Harness {
        let mut config = self.state.config.clone();
        tweak(&mut config);
        Self::build(
            config,
            self.state.registration.clone(),
            self.db.clone(),
            self.hs.clone(),
            self.xai.clone(),
            Overrides::default(),
        )
        .await
    }

    async fn build(
        config: Config,
        reg: ruma::api::appservice::Registration,
        db: Arc<db::TestDb>,
        hs: FakeHs,
        xai: FakeXai,
        overrides: Overrides,
    ) -> Harness {
        let store = Store::connect(&config.database.url, config.database.pool_size).unwrap();
        store.migrate().await.unwrap();
        let hs_token = reg.hs_token.clone();
        let timings = Timings::from_config(&config);
        let state = AppState::build(config, reg, store, timings, overrides).unwrap();
        let router = grok_appservice::webhook::router(state.clone());
        Harness {
            state,
            router,
            hs,
            xai,
            hs_token,
            db,
        }
    }

    pub async fn call(&self, request: Request<Body>) -> (StatusCode, Value) {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes)}));
        (status, body)
    }

    pub async fn put_raw(&self, txn: &str, body: impl Into<Body>) -> (StatusCode, Value) {
        let request = Request::put(format!("/_matrix/app/v1/transactions/{txn}"))
            .header("authorization", format!("Bearer {}", self.hs_token))
            .header("content-type", "application/json")
            .body(body.into())
            .unwrap();
        self.call(request).await
    }

    pub async fn put_txn(&self, txn: &str, events: Vec<Value>) -> (StatusCode, Value) {
        self.put_raw(txn, json!({"events": events}).to_string())
            .await
    }

    /// Waits until every spawned worker finished.
    pub async fn settle(&self) {
        for _ in 0..500 {
            if self.state.tasks.is_empty() {
                // Workers hand rows to telemetry as their last step.
                self.state.telemetry.flush().await;
                if self.state.tasks.is_empty() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("workers did not finish");
    }

    /// Waits for the `request_log` row of an event.
    pub async fn row(&self, event_id: &str) -> RequestLogRow {
        for _ in 0..200 {
            if let Some(row) = self.state.store.request_log(event_id.into()).await.unwrap() {
                return row;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no request_log row for {event_id}");
    }

    /// Claims Alice's DM message `event_id` in transaction `txn` for `owner`, as a replica
    /// would on receiving it, without starting its worker (crash and hand-over scenarios).
    pub async fn claim_directly(&self, txn: &str, event_id: &str, owner: String, lease: Duration) {
        use grok_appservice::store::{ClaimKind, NewClaim, TxnWrite};
        let write = TxnWrite {
            txn_id: txn.into(),
            event_count: 1,
            claims: vec![NewClaim {
                event_id: event_id.into(),
                room_id: "!dm:example.org".into(),
                sender: ALICE.into(),
                kind: ClaimKind::Addressed,
                origin_ts: grok_appservice::store::now(),
                leased: true,
            }],
            ..TxnWrite::default()
        };
        self.state
            .store
            .commit_transaction(write, owner, lease)
            .await
            .unwrap();
    }

    /// Puts a claim back into `state` with no stored reply, as a replica of an older version
    /// that died mid-send leaves it (SQLite harness only).
    pub fn force_claim_state(&self, event_id: &str, state: grok_appservice::claims::ClaimState) {
        use diesel::prelude::*;
        let path = self.db.url.trim_start_matches("sqlite://").to_string();
        let mut conn = diesel::SqliteConnection::establish(&path).unwrap();
        diesel::sql_query(
            "UPDATE processed_events SET state = ?, outbox = NULL WHERE event_id = ?",
        )
        .bind::<diesel::sql_types::Text, _>(state.as_str())
        .bind::<diesel::sql_types::Text, _>(event_id)
        .execute(&mut conn)
        .unwrap();
    }

    /// Makes the store know `room` as a room of the given members.
    pub async fn known_room(&self, room: &str, direct: bool, members: &[&str]) {
        self.state
            .store
            .set_room(
                room.into(),
                direct,
                members.iter().map(|m| m.to_string()).collect(),
            )
            .await
            .unwrap();
    }
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A text message event.
pub fn text_event(event_id: &str, room: &str, sender: &str, body: &str) -> Value {
    json!({
        "event_id": event_id, "room_id": room, "sender": sender, "type": "m.room.message",
        "origin_server_ts": now_ms(), "content": {"msgtype": "m.text", "body": body},
    })
}

/// A message that mentions the bot.
pub fn mention_event(event_id: &str, room: &str, sender: &str, body: &str) -> Value {
    let mut e = text_event(event_id, room, sender, body);
    e["content"]["m.mentions"] = json!({"user_ids": [BOT]});
    e
}
