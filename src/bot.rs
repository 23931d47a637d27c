//! The answer worker: ties classify's verdict, the cascade, the homeserver and telemetry
//! together for one request. Everything here runs in tasks spawned after the webhook answered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pulldown_cmark::{html, Event as MdEvent, Options, Parser};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::cascade::{Ask, Outcome, Route, RouterSource};
use crate::classify::{self, Event, Facts, Request, SkipReason, Verdict};
use crate::config::ReplyMsgtype;
use crate::limiter::{refusal_text, Admission, Refusal};
use crate::matrix::reply_txn_id;
use crate::state::AppState;
use crate::store::{self, ClaimState};
use crate::telemetry::RequestLog;

/// A claim that failed this many times is given up.
const MAX_ATTEMPTS: i32 = 3;
/// How long the typing notification lasts before it must be renewed.
const TYPING_TIMEOUT: Duration = Duration::from_secs(30);

const APOLOGY: &str = "Sorry, I couldn't answer that just now. Please try again in a moment.";
const EMPTY_APOLOGY: &str = "Sorry, I came up empty on that one. Could you rephrase it?";

/// An addressed message to answer.
#[derive(Debug, Clone)]
pub struct Job {
    pub event_id: String,
    pub room_id: String,
    pub sender: String,
    pub request: Request,
    /// `origin_server_ts` of the message, in ms since the epoch.
    pub origin_ts: i64,
}

/// Where the reply goes: the source event and, for a threaded message, the thread root.
#[derive(Debug, Clone)]
pub struct ReplyTarget<'a> {
    pub event_id: &'a str,
    pub sender: &'a str,
    pub thread_root: Option<&'a str>,
}

/// Renders Markdown to the HTML subset Matrix clients show. Raw HTML from the model is shown
/// as text, never passed through.
pub fn render_markdown(text: &str) -> String {
    let options = Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH;
    let parser = Parser::new_ext(text, options).map(|event| match event {
        MdEvent::Html(raw) | MdEvent::InlineHtml(raw) => MdEvent::Text(raw),
        other => other,
    });
    let mut out = String::new();
    html::push_html(&mut out, parser);
    out.trim_end().to_string()
}

/// The content of a reply: the configured msgtype, Markdown rendered, a rich reply (or a
/// threaded reply when the source was in a thread) that mentions the asker.
pub fn reply_content(msgtype: ReplyMsgtype, text: &str, to: &ReplyTarget<'_>) -> Value {
    let msgtype = match msgtype {
        ReplyMsgtype::Notice => "m.notice",
        ReplyMsgtype::Text => "m.text",
    };
    let relates_to = match to.thread_root {
        Some(root) => json!({
            "rel_type": "m.thread",
            "event_id": root,
            "is_falling_back": false,
            "m.in_reply_to": {"event_id": to.event_id},
        }),
        None => json!({"m.in_reply_to": {"event_id": to.event_id}}),
    };
    json!({
        "msgtype": msgtype,
        "body": text,
        "format": "org.matrix.custom.html",
        "formatted_body": render_markdown(text),
        "m.relates_to": relates_to,
        "m.mentions": {"user_ids": [to.sender]},
    })
}

/// An opaque id for the provider's abuse tracking: never the Matrix id itself.
fn hashed_user(user_id: &str) -> String {
    hex::encode(&Sha256::digest(user_id.as_bytes())[..12])
}

fn message_age(origin_ts: i64) -> Duration {
    let now = chrono::Utc::now().timestamp_millis();
    Duration::from_millis(now.saturating_sub(origin_ts).max(0) as u64)
}

fn base_row(event_id: &str, room_id: &str, sender: &str) -> RequestLog {
    RequestLog {
        id: event_id.to_string(),
        room_id: room_id.to_string(),
        sender: sender.to_string(),
        route: Route::None.as_str().into(),
        router_source: RouterSource::Default.as_str().into(),
        models: "{}".into(),
        stage_ms: "{}".into(),
        created_at: store::now(),
        ..RequestLog::default()
    }
}

fn outcome_row(job: &Job, outcome: &Outcome, prompt_version: &str) -> RequestLog {
    let mut row = base_row(&job.event_id, &job.room_id, &job.sender);
    row.route = outcome.route.as_str().into();
    row.router_source = outcome.router_source.as_str().into();
    row.router_confidence = outcome.router_confidence;
    row.models = serde_json::to_string(&outcome.models).unwrap_or_else(|_| "{}".into());
    row.stage_ms = serde_json::to_string(&outcome.stage_ms).unwrap_or_else(|_| "{}".into());
    row.prompt_version = prompt_version.to_string();
    row.prompt_tokens = outcome.prompt_tokens;
    row.cached_tokens = outcome.cached_tokens;
    row.completion_tokens = outcome.completion_tokens;
    row.reasoning_tokens = outcome.reasoning_tokens;
    let stage = |name| outcome.stage_cost.get(name).copied().unwrap_or(0);
    row.cost_router_ticks = stage("router");
    row.cost_trivial_ticks = stage("trivial");
    row.cost_web_ticks = stage("web");
    row.cost_reason_ticks = stage("reason");
    row.cost_final_ticks = stage("final");
    row.cost_total_ticks = outcome.cost_total();
    row.escalated = outcome.escalated;
    row.cache_hit = outcome.cache_hit;
    row.cost_source = outcome
        .cost_source
        .map(|s| s.as_str().to_string())
        .unwrap_or_default();
    row.fallback_fired = outcome.fallback_fired;
    row.provider_request_id = outcome.provider_request_id.clone();
    row.degraded = outcome.degraded.unwrap_or("").into();
    row.err = outcome
        .error
        .as_ref()
        .map(|e| e.to_string())
        .unwrap_or_default();
    row.ok = outcome.ok();
    row.query_text = job.request.text.clone();
    row
}

/// Keeps the typing notification alive until stopped.
struct Typing {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Typing {
    fn start(state: &Arc<AppState>, room_id: &str) -> Self {
        let state = state.clone();
        let room = room_id.to_string();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = state.matrix.typing(&room, true, TYPING_TIMEOUT).await {
                    tracing::debug!(error = %e, "typing notification failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(TYPING_TIMEOUT - Duration::from_secs(5)) => {}
                    _ = &mut stopped => return,
                }
            }
        });
        Self { stop, task }
    }

    /// Stops the renewals, lets an in-flight "typing" request finish (so it cannot land after
    /// the "stopped typing" one), then clears the notification.
    async fn stop(self, state: &AppState, room_id: &str) {
        let _ = self.stop.send(());
        let _ = self.task.await;
        if let Err(e) = state.matrix.typing(room_id, false, TYPING_TIMEOUT).await {
            tracing::debug!(error = %e, "clearing the typing notification failed");
        }
    }
}

/// Answers one addressed message and records it. Never panics the caller; every failure ends
/// as an apology to the user (when possible) and a `request_log` row.
pub async fn answer(state: Arc<AppState>, job: Job) {
    let started = Instant::now();
    if message_age(job.origin_ts) > state.timings.max_message_age {
        tracing::warn!(event_id = %job.event_id, "message too old to answer, dropping");
        finish_claim(&state, &job.event_id, ClaimState::Failed, None).await;
        let mut row = base_row(&job.event_id, &job.room_id, &job.sender);
        row.err = "message too old when handled".into();
        state.telemetry.record(row);
        return;
    }

    let typing = Typing::start(&state, &job.room_id);
    let lease = keep_lease(&state, &job.event_id);
    let (text, mut row) = respond(&state, &job).await;
    typing.stop(&state, &job.room_id).await;
    lease.abort();

    let target = ReplyTarget {
        event_id: &job.event_id,
        sender: &job.sender,
        thread_root: job.request.thread_root.as_deref(),
    };
    let content = reply_content(state.config.bot.reply_msgtype, &text, &target);
    finish_claim(&state, &job.event_id, ClaimState::Sending, None).await;
    let txn_id = reply_txn_id(&job.event_id, "reply");
    match state
        .matrix
        .send_message(&job.room_id, &txn_id, &content)
        .await
    {
        Ok(reply_id) => {
            if let Err(e) = state
                .store
                .record_bot_event(reply_id.clone(), job.room_id.clone())
                .await
            {
                tracing::warn!(error = %e, "could not record the reply as a bot event");
            }
            finish_claim(&state, &job.event_id, ClaimState::Answered, Some(reply_id)).await;
        }
        Err(e) => {
            // The claim stays in `sending`: once its lease expires the recovery sweeper retries
            // with the same txnId, so the homeserver still deduplicates a send that did land.
            tracing::warn!(event_id = %job.event_id, error = %e, "sending the reply failed");
            row.ok = false;
            row.degraded = "send_failed".into();
            row.err = "sending the reply failed".into();
        }
    }
    row.latency_ms = started.elapsed().as_millis() as i64;
    let outcome = if row.ok { "ok" } else { "failed" };
    state.metrics.inc(
        "requests_total",
        &[("route", &row.route), ("outcome", outcome)],
    );
    if !row.degraded.is_empty() {
        state
            .metrics
            .inc("degraded_total", &[("reason", &row.degraded)]);
    }
    tracing::info!(event_id = %job.event_id, route = %row.route, ok = row.ok,
        latency_ms = row.latency_ms, cost_ticks = row.cost_total_ticks, "answered");
    state.telemetry.record(row);
}

/// Extends the claim's lease while a long answer runs, so no other replica takes it over.
fn keep_lease(state: &Arc<AppState>, event_id: &str) -> tokio::task::JoinHandle<()> {
    let state = state.clone();
    let event_id = event_id.to_string();
    tokio::spawn(async move {
        let every = state.timings.claim_lease / 3;
        loop {
            tokio::time::sleep(every).await;
            let extended = state
                .store
                .extend_lease(
                    event_id.clone(),
                    state.instance_id.clone(),
                    state.timings.claim_lease,
                )
                .await;
            if let Err(e) = extended {
                tracing::warn!(error = %e, "could not extend the claim's lease");
            }
        }
    })
}

const UNAVAILABLE: &str = "Sorry, I'm temporarily unavailable. Please try again in a few minutes.";

/// Decides what to answer: the `!usage` command, a refusal from the limiter, or the cascade's
/// answer within a reservation. Returns the reply text and the request's row.
async fn respond(state: &AppState, job: &Job) -> (String, RequestLog) {
    let mut row = base_row(&job.event_id, &job.room_id, &job.sender);
    row.query_text = job.request.text.clone();
    row.prompt_version = state.cascade.prompt_version().to_string();
    let command = &state.config.limits.usage_command;
    if job.request.text.trim().eq_ignore_ascii_case(command) {
        return match state.limiter.usage(&job.sender).await {
            Ok(u) => {
                row.ok = true;
                (crate::limiter::usage_text(&u), row)
            }
            Err(e) => {
                row.degraded = "reserve_error".into();
                row.err = e.to_string();
                (UNAVAILABLE.to_string(), row)
            }
        };
    }

    let mut decision = state.cascade.decide(&job.request.text, Some(&job.room_id));
    row.router_source = decision.source.as_str().into();
    row.router_confidence = decision.confidence;
    // A cached answer costs nothing: serve it without touching the budget.
    if let Some(outcome) = state.cascade.cached(&decision).await {
        let mut row = outcome_row(job, &outcome, state.cascade.prompt_version());
        row.query_text = job.request.text.clone();
        return (outcome.text, row);
    }
    let plans = state
        .limiter
        .plans(decision.route, &decision.text, decision.ambiguous);
    let (reservation, plan) = match state
        .limiter
        .reserve(&job.event_id, &job.sender, &plans)
        .await
    {
        Admission::Granted {
            reservation_id,
            plan,
        } => (reservation_id, plan),
        Admission::Refused(refusal) => {
            row.ceiling_hit = matches!(refusal, Refusal::Ceiling { .. });
            row.per_user_cap_hit = !row.ceiling_hit;
            tracing::info!(event_id = %job.event_id, ceiling = row.ceiling_hit, "refused by the spend limits");
            return (refusal_text(&refusal, state.limiter.now()), row);
        }
        Admission::Unavailable(e) => {
            // Fail closed: without the budget store no model is called.
            tracing::warn!(event_id = %job.event_id, error = %e, "budget store unavailable");
            row.degraded = "reserve_error".into();
            row.err = e.to_string();
            return (UNAVAILABLE.to_string(), row);
        }
    };
    if plan.shrunk {
        decision.route = plan.route;
        decision.source = RouterSource::Degraded;
        decision.ambiguous = false;
    }
    if let Err(e) = state.limiter.dispatched(&reservation).await {
        tracing::warn!(error = %e, "could not mark the reservation dispatched");
    }
    let hashed = hashed_user(&job.sender);
    let ask = Ask {
        text: &job.request.text,
        room_id: Some(&job.room_id),
        user: Some(&hashed),
        output_cap: plan.output_cap,
    };
    let outcome = state.cascade.run_decided(decision, &ask).await;
    let settled = if outcome.stage_cost.is_empty() {
        // No provider call completed: a cache hit, or every call failed before billing.
        state.limiter.release(&reservation).await
    } else {
        state
            .limiter
            .settle(&reservation, outcome.cost_total())
            .await
    };
    if let Err(e) = settled {
        // The sweeper settles it at its estimate once it expires.
        tracing::warn!(error = %e, "could not settle the reservation");
    }
    for (stage, ms) in &outcome.stage_ms {
        let Some(model) = outcome.models.get(stage) else {
            continue;
        };
        state
            .metrics
            .observe_provider(model, Duration::from_millis(*ms));
        if let Some(cost) = outcome.stage_cost.get(stage) {
            state.metrics.add(
                "spend_ticks_total",
                &[("model", model)],
                (*cost).max(0) as u64,
            );
        }
    }
    let text = if outcome.ok() {
        outcome.text.clone()
    } else if outcome.error.is_some() {
        tracing::warn!(event_id = %job.event_id, error = ?outcome.error, "cascade failed");
        APOLOGY.to_string()
    } else {
        EMPTY_APOLOGY.to_string()
    };
    let mut row = outcome_row(job, &outcome, state.cascade.prompt_version());
    row.query_text = job.request.text.clone();
    (text, row)
}

async fn finish_claim(state: &AppState, event_id: &str, to: ClaimState, reply: Option<String>) {
    if let Err(e) = state
        .store
        .set_claim_state(event_id.to_string(), to, reply)
        .await
    {
        tracing::warn!(event_id, error = %e, state = to.as_str(), "could not update the claim");
    }
}

/// The notice for an addressed message the bot cannot serve.
fn skip_notice(state: &AppState, reason: SkipReason) -> String {
    match reason {
        SkipReason::EncryptedRoom => {
            "I can't read encrypted messages. Please talk to me in a room \
                                      without encryption."
                .into()
        }
        SkipReason::Media => "I can only read text for now, not images, files, audio or video. \
                              Please describe what you need in words."
            .into(),
        SkipReason::ForeignRoom => format!(
            "Sorry, I only answer users of {}.",
            state.config.rooms.allowed_servers.join(", ")
        ),
    }
}

/// How often a notice of one kind may be posted in one room.
fn notice_window(reason: SkipReason) -> Duration {
    match reason {
        SkipReason::EncryptedRoom | SkipReason::ForeignRoom => Duration::from_secs(24 * 3600),
        SkipReason::Media => Duration::from_secs(60),
    }
}

/// Handles an addressed message that cannot be served: a rate-limited notice and a
/// `request_log` row with route `none`.
pub async fn skip(state: Arc<AppState>, event: Event, reason: SkipReason) {
    let room_id = event.room_id.clone();
    let allowed = state
        .store
        .take_notice_slot(
            room_id.clone(),
            reason.as_str().into(),
            notice_window(reason),
        )
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "notice rate limit unavailable; not posting");
            false
        });
    if allowed {
        let target = ReplyTarget {
            event_id: &event.event_id,
            sender: &event.sender,
            thread_root: None,
        };
        let content = reply_content(ReplyMsgtype::Notice, &skip_notice(&state, reason), &target);
        let txn = reply_txn_id(&event.event_id, "notice");
        match state.matrix.send_message(&room_id, &txn, &content).await {
            Ok(id) => {
                let _ = state.store.record_bot_event(id, room_id.clone()).await;
            }
            Err(e) => tracing::warn!(event_id = %event.event_id, error = %e, "notice failed"),
        }
    }
    finish_claim(&state, &event.event_id, ClaimState::Done, None).await;
    state
        .metrics
        .inc("degraded_total", &[("reason", reason.as_str())]);
    state
        .telemetry
        .record(skip_row(&event.event_id, &room_id, &event.sender, reason));
}

fn skip_row(event_id: &str, room_id: &str, sender: &str, reason: SkipReason) -> RequestLog {
    let mut row = base_row(event_id, room_id, sender);
    row.degraded = reason.as_str().into();
    row.ok = false;
    row
}

/// Joins a room on an allowed invite, or leaves (declines) a foreign one.
pub async fn invite(state: Arc<AppState>, event: Event, accept: bool, is_direct: bool) {
    let room = event.room_id.clone();
    if !accept {
        tracing::info!(room_id = %room, inviter = %event.sender, "declining a foreign invite");
        if let Err(e) = state.matrix.leave(&room).await {
            tracing::warn!(room_id = %room, error = %e, "declining the invite failed");
        }
        finish_claim(&state, &event.event_id, ClaimState::Done, None).await;
        state.metrics.inc(
            "degraded_total",
            &[("reason", SkipReason::ForeignRoom.as_str())],
        );
        state.telemetry.record(skip_row(
            &event.event_id,
            &room,
            &event.sender,
            SkipReason::ForeignRoom,
        ));
        return;
    }
    match state.matrix.join(&room).await {
        Ok(()) => {
            let members = state
                .matrix
                .joined_members(&room)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(room_id = %room, error = %e, "could not list members");
                    Vec::new()
                });
            if let Err(e) = state.store.set_room(room.clone(), is_direct, members).await {
                tracing::warn!(room_id = %room, error = %e, "could not record the room");
            }
            tracing::info!(room_id = %room, is_direct, "joined");
            finish_claim(&state, &event.event_id, ClaimState::Done, None).await;
        }
        Err(e) => {
            tracing::warn!(room_id = %room, error = %e, "joining failed");
            finish_claim(&state, &event.event_id, ClaimState::Failed, None).await;
        }
    }
}

/// Hands a verdict that needs work to a tracked task. Every log line of the task carries the
/// source event id.
pub fn dispatch(state: &Arc<AppState>, event: Event, verdict: Verdict) {
    let worker = state.clone();
    let span = tracing::info_span!("request", event_id = %event.event_id);
    match verdict {
        Verdict::Addressed(request) => {
            let job = Job {
                event_id: event.event_id,
                room_id: event.room_id,
                sender: event.sender,
                request,
                origin_ts: event.origin_server_ts,
            };
            state.tasks.spawn(answer(worker, job).instrument(span));
        }
        Verdict::Skip(reason) => {
            state
                .tasks
                .spawn(skip(worker, event, reason).instrument(span));
        }
        Verdict::Invite { accept, is_direct } => {
            state
                .tasks
                .spawn(invite(worker, event, accept, is_direct).instrument(span));
        }
        Verdict::Ignore(_) => {}
    }
}

/// Finds claims whose worker died (lease expired) and handles them again. The event is read
/// back from the homeserver, so no message text is kept at rest for recovery.
pub async fn recover_once(state: &Arc<AppState>) -> usize {
    let taken = match state
        .store
        .take_expired_claims(state.instance_id.clone(), state.timings.claim_lease, 50)
        .await
    {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "recovery sweep failed");
            return 0;
        }
    };
    let count = taken.len();
    for claim in taken {
        if claim.attempts > MAX_ATTEMPTS {
            tracing::warn!(event_id = %claim.event_id, attempts = claim.attempts, "giving up on a claim");
            finish_claim(state, &claim.event_id, ClaimState::Failed, None).await;
            let mut row = base_row(&claim.event_id, &claim.room_id, &claim.sender);
            row.err = format!("gave up after {} attempts", claim.attempts - 1);
            state.telemetry.record(row);
            continue;
        }
        if claim.state == ClaimState::Sending.as_str() && reply_already_sent(state, &claim).await {
            continue;
        }
        let raw = match state.matrix.event(&claim.room_id, &claim.event_id).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(event_id = %claim.event_id, error = %e, "cannot fetch a claimed event");
                continue;
            }
        };
        let Ok(mut event) = Event::parse(&raw) else {
            finish_claim(state, &claim.event_id, ClaimState::Failed, None).await;
            continue;
        };
        // /event omits room_id in some servers' answers.
        event.room_id = claim.room_id.clone();
        let facts = match state
            .store
            .room_facts(
                vec![event.room_id.clone()],
                event
                    .in_reply_to()
                    .map(str::to_string)
                    .into_iter()
                    .collect(),
            )
            .await
        {
            Ok(f) => f,
            Err(_) => continue,
        };
        let direct = facts
            .rooms
            .get(&event.room_id)
            .is_some_and(|(d, n)| *d || *n == 2);
        let verdict = classify::classify(
            &event,
            &state.identity,
            Facts {
                direct_room: direct,
                replies_to_bot: event
                    .in_reply_to()
                    .is_some_and(|id| facts.bot_events.contains(id)),
            },
        );
        tracing::info!(event_id = %claim.event_id, verdict = verdict.label(), "recovering a claim");
        if matches!(verdict, Verdict::Ignore(_)) {
            finish_claim(state, &claim.event_id, ClaimState::Done, None).await;
        } else {
            dispatch(state, event, verdict);
        }
    }
    count
}

/// Whether the reply of a claim that died while sending is already in the room; if so, the
/// claim is closed with it instead of sending again.
async fn reply_already_sent(state: &AppState, claim: &crate::store::ClaimRow) -> bool {
    match state
        .matrix
        .find_reply(&claim.room_id, &claim.event_id, 100)
        .await
    {
        Ok(Some(reply)) => {
            tracing::info!(event_id = %claim.event_id, "the reply was already sent; closing the claim");
            let _ = state
                .store
                .record_bot_event(reply.clone(), claim.room_id.clone())
                .await;
            finish_claim(state, &claim.event_id, ClaimState::Answered, Some(reply)).await;
            // The dead replica may have written its row already: keep that fuller one.
            if let Ok(None) = state.store.request_log(claim.event_id.clone()).await {
                state.telemetry.record(recovered_row(state, claim).await);
            }
            true
        }
        Ok(None) => false,
        Err(e) => {
            // Re-sending is still safe while the homeserver remembers the txnId.
            tracing::warn!(event_id = %claim.event_id, error = %e, "could not look for an earlier reply");
            false
        }
    }
}

/// The `request_log` row of a request whose replica died after its reply went out: the route
/// is decided again (the router is deterministic) and the cost is what its reservations
/// settled; per-stage figures died with the replica.
async fn recovered_row(state: &AppState, claim: &crate::store::ClaimRow) -> RequestLog {
    let mut row = base_row(&claim.event_id, &claim.room_id, &claim.sender);
    row.ok = true;
    row.err = "recovered after a crash: the reply had been sent; stage details were lost".into();
    row.prompt_version = state.cascade.prompt_version().to_string();
    if let Ok(raw) = state.matrix.event(&claim.room_id, &claim.event_id).await {
        let body = raw
            .pointer("/content/body")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        let decision = state.cascade.decide(body, Some(&claim.room_id));
        row.route = decision.route.as_str().into();
        row.router_source = decision.source.as_str().into();
        row.router_confidence = decision.confidence;
    }
    match state.store.budget_settled_for(claim.event_id.clone()).await {
        Ok(ticks) => row.cost_total_ticks = ticks,
        Err(e) => tracing::warn!(error = %e, "could not read the recovered request's cost"),
    }
    row
}

/// Runs [`recover_once`] and the budget sweeper every `recovery_interval` until the process
/// stops accepting work.
pub async fn recovery_loop(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(state.timings.recovery_interval);
    while state.accepting.load(std::sync::atomic::Ordering::SeqCst) {
        tick.tick().await;
        recover_once(&state).await;
        match state.limiter.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(expired = n, "expired budget reservations of dead workers"),
            Err(e) => tracing::warn!(error = %e, "budget sweep failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_renders_and_raw_html_is_escaped() {
        assert_eq!(
            render_markdown("**bold** and `code`"),
            "<p><strong>bold</strong> and <code>code</code></p>"
        );
        let html = render_markdown("hi <script>alert(1)</script>");
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
    }

    #[test]
    fn replies_are_rich_or_threaded_and_mention_the_asker() {
        let to = ReplyTarget {
            event_id: "$q",
            sender: "@alice:example.org",
            thread_root: None,
        };
        let c = reply_content(ReplyMsgtype::Notice, "42", &to);
        assert_eq!(c["msgtype"], "m.notice");
        assert_eq!(c["m.relates_to"]["m.in_reply_to"]["event_id"], "$q");
        assert_eq!(c["m.mentions"]["user_ids"][0], "@alice:example.org");
        assert!(c["m.relates_to"].get("rel_type").is_none());

        let to = ReplyTarget {
            thread_root: Some("$root"),
            ..to
        };
        let c = reply_content(ReplyMsgtype::Text, "42", &to);
        assert_eq!(c["msgtype"], "m.text");
        assert_eq!(c["m.relates_to"]["rel_type"], "m.thread");
        assert_eq!(c["m.relates_to"]["event_id"], "$root");
        assert_eq!(c["m.relates_to"]["is_falling_back"], false);
        assert_eq!(c["m.relates_to"]["m.in_reply_to"]["event_id"], "$q");
    }

    #[test]
    fn provider_user_ids_are_hashed() {
        let h = hashed_user("@alice:example.org");
        assert!(!h.contains("alice"));
        assert_eq!(h, hashed_user("@alice:example.org"));
    }
}
