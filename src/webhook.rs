//! The HTTP side: the appservice API Synapse calls (`/_matrix/app/v1/*`), hs_token auth,
//! Matrix error JSON, and `/health`, `/ready`, `/metrics`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::answer;
use crate::claims::Fence;
use crate::ingest::{self, BodyError};
use crate::state::AppState;
use crate::store::Ingested;

/// Largest transaction body accepted: 100 events of up to 64 KiB each fit with room to spare.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Malformed events of one transaction logged one by one; the rest only counted.
const MALFORMED_LOGGED: usize = 5;

/// A Matrix-facing error: `{"errcode": ..., "error": ...}` with its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatrixApiError {
    MissingToken,
    Forbidden,
    NotJson(String),
    BadJson(String),
    TooLarge,
    NotFound,
    Unrecognized,
    MethodNotAllowed,
    /// The database is down: Synapse must retry the transaction later.
    Unavailable,
    /// The body did not arrive within `appservice.body_read_timeout`.
    BodyTimeout,
    /// A path or query parameter that cannot be read (not UTF-8 once decoded, say).
    InvalidParam(String),
}

impl MatrixApiError {
    fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            Self::MissingToken => (
                StatusCode::UNAUTHORIZED,
                "M_MISSING_TOKEN",
                "Missing access token".into(),
            ),
            Self::Forbidden => (
                StatusCode::FORBIDDEN,
                "M_FORBIDDEN",
                "Invalid homeserver token".into(),
            ),
            Self::NotJson(m) => (StatusCode::BAD_REQUEST, "M_NOT_JSON", m.clone()),
            Self::BadJson(m) => (StatusCode::BAD_REQUEST, "M_BAD_JSON", m.clone()),
            Self::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "M_TOO_LARGE",
                "Request body too large".into(),
            ),
            Self::NotFound => (StatusCode::NOT_FOUND, "M_NOT_FOUND", "Not found".into()),
            Self::Unrecognized => (
                StatusCode::NOT_FOUND,
                "M_UNRECOGNIZED",
                "Unrecognized request".into(),
            ),
            Self::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "M_UNRECOGNIZED",
                "Method not allowed".into(),
            ),
            Self::InvalidParam(m) => (StatusCode::BAD_REQUEST, "M_INVALID_PARAM", m.clone()),
            Self::BodyTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "M_UNKNOWN",
                "Request body not received in time".into(),
            ),
            Self::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "M_UNKNOWN",
                "Storage unavailable, retry later".into(),
            ),
        }
    }
}

impl IntoResponse for MatrixApiError {
    fn into_response(self) -> Response {
        let (status, errcode, error) = self.parts();
        (status, Json(json!({"errcode": errcode, "error": error}))).into_response()
    }
}

/// The appservice router with all routes and layers, ready to serve.
pub fn router(state: Arc<AppState>) -> Router {
    let appservice = Router::new()
        .route("/_matrix/app/v1/transactions/{txn_id}", put(transaction))
        .route("/_matrix/app/v1/users/{user_id}", get(query_user))
        .route("/_matrix/app/v1/rooms/{alias}", get(query_room))
        .route("/_matrix/app/v1/ping", post(ping))
        // Inside the token check: an unauthenticated client never gets its body read.
        .route_layer(middleware::from_fn_with_state(state.clone(), read_body))
        .route_layer(middleware::from_fn(refuse_nul_in_path))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_hs_token,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    Router::new()
        .merge(appservice)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { MatrixApiError::Unrecognized })
        .method_not_allowed_fallback(|| async { MatrixApiError::MethodNotAllowed })
        .layer(middleware::map_response(matrix_rejections))
        .with_state(state)
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares in constant time (over fixed-length digests, so the length does not leak either).
fn token_matches(given: &str, expected: &str) -> bool {
    digest(given).ct_eq(&digest(expected)).into()
}

/// Checks `hs_token` from `Authorization: Bearer` or the legacy `access_token` query
/// parameter. Every copy given must match: a header and a parameter, or a header or a
/// parameter given twice, that disagree are refused rather than one of them picked.
async fn require_hs_token(
    State(state): State<Arc<AppState>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    request: Request,
    next: Next,
) -> Result<Response, MatrixApiError> {
    let Query(query) = query.map_err(|e| MatrixApiError::InvalidParam(e.body_text()))?;
    let mut given = Vec::new();
    for value in request.headers().get_all(header::AUTHORIZATION) {
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(MatrixApiError::Forbidden)?;
        given.push(token.trim().to_string());
    }
    given.extend(
        query
            .into_iter()
            .filter(|(key, _)| key == "access_token")
            .map(|(_, token)| token),
    );
    if given.is_empty() {
        return Err(MatrixApiError::MissingToken);
    }
    let expected = &state.registration.hs_token;
    if !given.iter().all(|t| token_matches(t, expected)) {
        return Err(MatrixApiError::Forbidden);
    }
    Ok(next.run(request).await)
}

/// Turns axum's plain-text rejections (a path parameter that is not UTF-8 once decoded, a
/// malformed query) into Matrix errors, so every error a client sees is `{errcode, error}`.
async fn matrix_rejections(response: Response) -> Response {
    let status = response.status();
    let plain_text = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"text/plain"));
    if !plain_text || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let errcode = match status {
        StatusCode::BAD_REQUEST => "M_INVALID_PARAM",
        StatusCode::PAYLOAD_TOO_LARGE => "M_TOO_LARGE",
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => "M_UNRECOGNIZED",
        _ => "M_UNKNOWN",
    };
    (status, Json(json!({"errcode": errcode, "error": text}))).into_response()
}

/// Refuses a NUL in a path parameter (`%00`): no txnId or Matrix id holds one, and PostgreSQL
/// text cannot, so such a transaction would fail with a 503 on every retry.
async fn refuse_nul_in_path(request: Request, next: Next) -> Result<Response, MatrixApiError> {
    if request.uri().path().contains("%00") {
        return Err(MatrixApiError::InvalidParam(
            "a path parameter holds a NUL".into(),
        ));
    }
    Ok(next.run(request).await)
}

/// Reads the whole body within `appservice.body_read_timeout` and at most
/// [`MAX_BODY_BYTES`], so a client trickling its body (slowloris) is cut off; the handlers
/// then take it from memory. A declared length over the limit is refused before any read.
async fn read_body(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, MatrixApiError> {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(MatrixApiError::TooLarge);
    }
    let limited = http_body_util::Limited::new(body, MAX_BODY_BYTES);
    let deadline = state.config.appservice.body_read_timeout;
    let bytes = match tokio::time::timeout(deadline, limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(MatrixApiError::TooLarge)
        }
        Ok(Err(e)) => {
            return Err(MatrixApiError::BadJson(format!(
                "cannot read the body: {e}"
            )))
        }
        Err(_) => {
            tracing::warn!(timeout = ?deadline, "a request body arrived too slowly; closing");
            return Err(MatrixApiError::BodyTimeout);
        }
    };
    let request = Request::from_parts(parts, axum::body::Body::from(bytes));
    Ok(next.run(request).await)
}

async fn transaction(
    State(state): State<Arc<AppState>>,
    Path(txn_id): Path<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Value>, MatrixApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            MatrixApiError::TooLarge
        } else {
            MatrixApiError::BadJson(e.body_text())
        }
    })?;
    let parsed = ingest::parse_transaction(&body).map_err(|e| match e {
        BodyError::NotJson(_) => MatrixApiError::NotJson(e.to_string()),
        BodyError::NotTransaction(_) => MatrixApiError::BadJson(e.to_string()),
    })?;
    // The events are owned now; the body's memory goes before the database work.
    drop(body);
    // A few lines say what was wrong; a transaction of 100,000 bad events must not log each.
    for (index, why) in parsed.malformed.iter().take(MALFORMED_LOGGED) {
        tracing::warn!(txn_id, index, %why, "skipping a malformed event");
    }
    if parsed.malformed.len() > MALFORMED_LOGGED {
        tracing::warn!(
            txn_id,
            skipped = parsed.malformed.len(),
            "skipping more malformed events"
        );
    }
    if !parsed.malformed.is_empty() {
        state.metrics.add(
            "events_total",
            &[("verdict", "malformed")],
            parsed.malformed.len() as u64,
        );
    }

    if !state.accepting.load(Ordering::SeqCst) {
        // Shutting down: take no new claims; Synapse retries, through the load balancer to
        // a replica that is still up.
        return Err(MatrixApiError::Unavailable);
    }
    let query = ingest::facts_query(&parsed.events);
    let planner = state.clone();
    let txn = txn_id.clone();
    let ingested = state
        .store
        .ingest(
            query,
            state.instance_id.clone(),
            state.timings.claim_lease,
            move |facts| ingest::plan(&planner, &txn, parsed, facts),
        )
        .await
        .map_err(|e| {
            tracing::error!(txn_id = %txn_id, error = %e, "cannot record the transaction; Synapse will retry");
            MatrixApiError::Unavailable
        })?;
    let (claimed, plan) = match ingested {
        Ingested::Duplicate => {
            state
                .metrics
                .inc("transactions_total", &[("result", "duplicate")]);
            return Ok(Json(json!({})));
        }
        Ingested::New { claimed, planned } => (claimed, planned),
        Ingested::NothingToWrite(planned) => (Vec::new(), planned),
    };
    state
        .metrics
        .inc("transactions_total", &[("result", "new")]);
    plan.record_metrics(&state);
    act(&state, plan, &claimed).await;
    Ok(Json(json!({})))
}

/// Starts a worker for every event this replica claimed and forgets the rooms the bot left.
async fn act(state: &Arc<AppState>, plan: ingest::Plan, claimed: &[String]) {
    for (event, verdict, slot) in plan.actions {
        if claimed.contains(&event.event_id) {
            let fence = Fence {
                event_id: event.event_id.clone(),
                owner: state.instance_id.clone(),
                generation: 1,
            };
            answer::dispatch(state, event, verdict, fence, slot, Default::default());
        } else {
            tracing::debug!(event_id = %event.event_id, "event already claimed, skipping");
        }
    }
    for room in plan.left_rooms {
        // Kicked, banned or gone: drop the room from the bot's list and from the database, so
        // nothing more is recorded for it and a later invite starts afresh.
        if let Err(e) = state.matrix.forget(&room).await {
            tracing::warn!(error = %e, "could not forget a room on the homeserver");
        }
        if let Err(e) = state.store.forget_room(room).await {
            tracing::warn!(error = %e, "could not forget a room the bot left");
        }
    }
}

async fn query_user(
    State(state): State<Arc<AppState>>,
    Path(user_id): Path<String>,
) -> Result<Json<Value>, MatrixApiError> {
    if user_id == state.identity.user_id {
        Ok(Json(json!({})))
    } else {
        Err(MatrixApiError::NotFound)
    }
}

/// The bot owns no room aliases.
async fn query_room(Path(_alias): Path<String>) -> MatrixApiError {
    MatrixApiError::NotFound
}

async fn ping() -> Json<Value> {
    Json(json!({}))
}

/// The process is up, and which version it runs (a rolling upgrade shows in it).
async fn health() -> Json<Value> {
    Json(json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if !state.accepting.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "shutting down"})),
        )
            .into_response();
    }
    if state.probes.database_up(&state.store).await {
        Json(json!({"ready": true})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "database unreachable"})),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(expected) = &state.config.appservice.metrics_token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(token) if token_matches(token, expected) => {}
            Some(_) => return MatrixApiError::Forbidden.into_response(),
            None => return MatrixApiError::MissingToken.into_response(),
        }
    }
    // Shared figures come from the database, so every replica reports the same backlog; a
    // scrape while it is down still serves the process counters.
    let backlog = state
        .probes
        .backlog(&state.store, state.limiter.today())
        .await;
    let (claims, held, overshoot, spent) = match backlog {
        Ok(b) => (
            b.claims_pending,
            b.reservations_held,
            b.overshoot_ticks,
            b.spent_ticks,
        ),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: backlog unavailable");
            (-1, -1, -1, -1)
        }
    };
    let ceiling = crate::config::usd_to_ticks(state.config.limits.daily_ceiling_usd);
    let mut gauges = vec![
        (
            "claims_pending",
            "Claimed messages not yet answered (all replicas; -1: unknown).",
            claims,
        ),
        (
            "reservations_held",
            "Budget reservations not yet settled (all replicas; -1: unknown).",
            held,
        ),
        (
            "budget_overshoot_ticks",
            "Today's (UTC) settled spend past the daily ceiling, in ticks (-1: unknown).",
            overshoot,
        ),
        (
            "budget_spent_today_ticks",
            "Today's (UTC) settled spend, all replicas, in ticks (-1: unknown).",
            spent,
        ),
        (
            "budget_ceiling_ticks",
            "The daily spend ceiling (limits.daily_ceiling_usd) in ticks.",
            ceiling,
        ),
    ];
    // Only with encryption on, so that "no replica owns the device" is an alert's condition.
    if state.config.encryption.enabled {
        gauges.push((
            "encryption_device_owned",
            "1 while this replica runs the encryption device (exactly one replica should).",
            i64::from(state.matrix.crypto().is_some()),
        ));
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&gauges),
    )
        .into_response()
}
