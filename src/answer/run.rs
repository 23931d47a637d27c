//! The admit, context, decide, reserve and run stages: the room's reply limit, room commands
//! (see [`super::command`]), the conversation's earlier turns, the router's decision, a free
//! cached answer, the limiter's reservation, the cascade, and settling what it cost.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::cascade::router::Decision;
use crate::cascade::{Ask, Degrade, Outcome, Route, RouterSource};
use crate::claims::{ClaimState, Fence, Gate};
use crate::commands;
use crate::context::{self, Conversation};
use crate::limiter::{refusal_text, Admission, Refusal};
use crate::provider::{FailureKind, ProviderError};
use crate::state::AppState;
use crate::store::room_state::RoomSettings;
use crate::telemetry::RequestLog;
use crate::vision::{self, ImageInput, IMAGE_TOKENS};

use super::images;
use super::progress::Progress;
use super::record::{base_row, outcome_row};
use super::Job;

const APOLOGY: &str = "Sorry, I couldn't answer that just now. Please try again in a moment.";
const EMPTY_APOLOGY: &str = "Sorry, I came up empty on that one. Could you rephrase it?";
/// The reply when the database or homeserver a step needs cannot be reached.
pub const UNAVAILABLE: &str =
    "Sorry, I'm temporarily unavailable. Please try again in a few minutes.";
const STREAM_BROKEN_NOTE: &str =
    "*(This answer is incomplete: the connection to the model broke while it was written.)*";
const ROOM_LIMIT_NOTICE: &str =
    "I'm answering a lot in this room right now, so I'll pause until the minute is over.";
/// The `room_notices` reason of the room reply limit's notice.
const ROOM_LIMIT_REASON: Degrade = Degrade::RoomRateLimited;

/// What the worker does next.
pub enum Response {
    /// Send this text, as an edit of the given event when the answer was first posted as it
    /// (progress); the row is written once it is sent.
    Reply(String, Box<RequestLog>, Option<String>),
    /// Send this text as an `m.notice`, which bots do not answer.
    Notice(String, Box<RequestLog>),
    /// Send nothing; only record the row.
    Silent(Box<RequestLog>),
    /// The claim was lost on the way: stop without sending.
    Lost,
}

/// The start of the UTC minute of `t`: the room reply limit counts per minute.
fn minute_start(t: chrono::NaiveDateTime) -> chrono::NaiveDateTime {
    use chrono::Timelike;
    t.with_second(0)
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or(t)
}

/// The admit stage's room check: within `bot.room_answers_per_minute`, or one notice per
/// minute past it and silence after, so two bots cannot loop and a flood cannot drain the
/// budget. A store error lets the reply through (the budget still guards the spend).
async fn room_limit(state: &AppState, job: &Job, row: &RequestLog) -> Option<Response> {
    let allowed = state
        .store
        .take_room_answer(
            job.room_id.clone(),
            minute_start(crate::store::now()),
            state.config.bot.room_answers_per_minute,
        )
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "room reply limit unavailable; replying");
            true
        });
    if allowed {
        return None;
    }
    let mut row = Box::new(row.clone());
    row.degraded = ROOM_LIMIT_REASON.as_str().into();
    let notice = state
        .store
        .take_notice_slot(
            job.room_id.clone(),
            ROOM_LIMIT_REASON.as_str().into(),
            Duration::from_secs(60),
        )
        .await
        .unwrap_or(false);
    tracing::info!(room_id = %job.room_id, notice, "room reply limit reached");
    Some(if notice {
        Response::Notice(ROOM_LIMIT_NOTICE.to_string(), row)
    } else {
        Response::Silent(row)
    })
}

/// An opaque id for the provider's abuse tracking: never the Matrix id itself.
pub fn hashed_user(user_id: &str) -> String {
    hex::encode(&Sha256::digest(user_id.as_bytes())[..12])
}

/// The room's settings from its moderators, or the defaults when the store cannot say.
pub(super) async fn room_settings(state: &AppState, room_id: &str) -> RoomSettings {
    state
        .store
        .room_settings(room_id.to_string())
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "room settings unavailable; using the defaults");
            RoomSettings::default()
        })
}

/// The context mode of the job's room: the moderators' choice, else the default for direct
/// chats or group rooms.
pub(super) fn context_mode(state: &AppState, job: &Job, settings: &RoomSettings) -> context::Mode {
    let chosen = settings
        .context_mode
        .as_deref()
        .and_then(context::Mode::parse);
    context::mode_for(job.request.direct, chosen, &state.config.context)
}

/// Decides what to answer: nothing past the room's reply limit, a room command, a refusal
/// from the limiter, or the cascade's answer within a reservation.
pub async fn respond(state: &Arc<AppState>, job: &Job, fence: &Fence, gate: &Gate) -> Response {
    let mut row = base_row(&job.event_id, &job.room_id, &job.sender);
    row.query_text = job.query_text();
    row.prompt_version = state.cascade.prompt_version().to_string();
    if let Some(limited) = room_limit(state, job, &row).await {
        return limited;
    }
    let config = &state.config;
    if let Some(command) = commands::parse(
        &job.request.text,
        &config.bot.command_prefix,
        &config.limits.usage_command,
    ) {
        return super::command::answer(state, job, command, Box::new(row)).await;
    }

    let settings = room_settings(state, &job.room_id).await;
    let mode = context_mode(state, job, &settings);
    let conversation = state
        .context
        .conversation(&state.matrix, &state.identity, job, mode)
        .await;
    let selected = match images::select(state, job, conversation.as_ref()) {
        Ok(selected) => selected,
        Err(why) => return images::unread(state, job, why, row).await,
    };
    let with_context = conversation.as_ref().is_some_and(Conversation::has_turns);
    if let Some(c) = &conversation {
        let turns = c.turns.len() as u64;
        state
            .metrics
            .add("context_turns_total", &[("mode", mode.as_str())], turns);
    }

    // The router decides on the current message alone.
    let room_route = settings.route.as_deref().and_then(Route::parse);
    let mut decision = state
        .cascade
        .decide(&job.request.text, Some(&job.room_id), room_route);
    if !selected.is_empty() {
        vision::image_route(&mut decision);
    }
    row.router_source = decision.source.as_str().into();
    row.router_confidence = decision.confidence;
    // A cached answer costs nothing: serve it without touching the budget. An answer that
    // reads earlier turns or an image, or answers an encrypted message, is never shared, so
    // there is none for it.
    if !with_context && selected.is_empty() && !job.encrypted {
        if let Some(outcome) = state.cascade.cached(&decision).await {
            let row = outcome_row(job, &outcome, &state.cascade, &decision.text);
            return Response::Reply(outcome.text, Box::new(row), job.progress_event.clone());
        }
    }
    // The estimate covers everything sent: the earlier turns too.
    let material = match &conversation {
        Some(c) => c.estimate_material(&decision.text),
        None => decision.text.clone(),
    };
    let plans = state.limiter.plans(
        decision.route,
        &material,
        selected.len(),
        decision.ambiguous,
    );
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
            return Response::Reply(
                refusal_text(&refusal, state.limiter.now()),
                Box::new(row),
                job.progress_event.clone(),
            );
        }
        Admission::Unavailable(e) => {
            // Fail closed: without the budget store no model is called.
            tracing::warn!(event_id = %job.event_id, error = %e, "budget store unavailable");
            row.degraded = Degrade::ReserveError.as_str().into();
            row.err = e.to_string();
            return Response::Reply(
                UNAVAILABLE.to_string(),
                Box::new(row),
                job.progress_event.clone(),
            );
        }
    };
    if plan.shrunk {
        decision.route = plan.route;
        decision.source = RouterSource::Degraded;
        decision.ambiguous = false;
    }
    // Downloaded only once admitted: a refused user costs the homeserver nothing.
    let images = match images::download(state, job, &selected).await {
        Ok(images) => images,
        Err(why) => {
            if let Err(e) = state.limiter.release(&reservation).await {
                tracing::warn!(error = %e, "could not release the reservation");
            }
            return images::unread(state, job, why, row).await;
        }
    };
    let admitted = Admitted {
        decision,
        output_cap: plan.output_cap,
        reservation,
        conversation,
        images,
        material,
    };
    run_admitted(state, job, fence, gate, admitted).await
}

/// A request the limiter admitted, ready for the cascade.
struct Admitted {
    decision: Decision,
    /// The admitted plan's output cap (lower than configured when the budget shrank it).
    output_cap: Option<u32>,
    reservation: String,
    conversation: Option<Conversation>,
    images: Vec<ImageInput>,
    /// What a `grok_direct` call would have been sent besides the system prompt.
    material: String,
}

/// The run stage: marks the claim answering, runs the cascade (showing progress), settles
/// what it cost and words the reply.
async fn run_admitted(
    state: &Arc<AppState>,
    job: &Job,
    fence: &Fence,
    gate: &Gate,
    admitted: Admitted,
) -> Response {
    let Admitted {
        decision,
        output_cap,
        reservation,
        conversation,
        images,
        material,
    } = admitted;
    // From here on a re-run may pay again: say so in the claim, fenced.
    match state
        .store
        .claim_transition(
            fence.clone(),
            ClaimState::Answering,
            state.timings.claim_lease,
            None,
        )
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            let _ = state.limiter.release(&reservation).await;
            return Response::Lost;
        }
        Err(e) => tracing::warn!(error = %e, "could not mark the claim answering"),
    }
    if let Err(e) = state.limiter.dispatched(&reservation).await {
        tracing::warn!(error = %e, "could not mark the reservation dispatched");
    }
    let hashed = hashed_user(&job.sender);
    let progress = Progress::start(state, job, fence, gate);
    let ask = Ask {
        text: &job.request.text,
        room_id: Some(&job.room_id),
        user: Some(&hashed),
        output_cap,
        gate: Some(gate),
        stream: progress.as_ref().and_then(Progress::updates),
        context: conversation.as_ref(),
        images: &images,
        private: job.encrypted,
    };
    let outcome = state.cascade.run_decided(decision, &ask).await;
    let first_event = match progress {
        Some(p) => p.finish().await,
        None => None,
    };
    let settled = if outcome.stage_cost.is_empty() {
        // No provider call completed: every call failed before billing.
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
    observe(state, &outcome);
    if matches!(outcome.error, Some(ProviderError::ClaimLost)) {
        return Response::Lost;
    }
    let text = reply_text(job, &outcome);
    let mut row = outcome_row(job, &outcome, &state.cascade, &material);
    row.images = images.len() as i32;
    if row.direct_input_tokens >= 0 && outcome.route != Route::GrokDirect {
        // The counterfactual's input was estimated from the text: add what the images cost.
        row.direct_input_tokens += IMAGE_TOKENS * images.len() as i64;
    }
    Response::Reply(text, Box::new(row), first_event)
}

/// What the user reads: the answer (marked when its stream broke), or an apology.
fn reply_text(job: &Job, outcome: &Outcome) -> String {
    if outcome.ok() && outcome.degraded == Some(Degrade::StreamBroken) {
        format!("{}\n\n{STREAM_BROKEN_NOTE}", outcome.text.trim_end())
    } else if outcome.ok() {
        outcome.text.clone()
    } else if outcome.error.is_some() {
        tracing::warn!(event_id = %job.event_id, error = ?outcome.error, "cascade failed");
        APOLOGY.to_string()
    } else {
        EMPTY_APOLOGY.to_string()
    }
}

/// Provider latency and spend per model in `/metrics`.
fn observe(state: &AppState, outcome: &Outcome) {
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
    if let Some(e) = outcome
        .error
        .as_ref()
        .filter(|e| e.kind() != FailureKind::ClaimLost)
    {
        let kind = e.kind();
        state
            .metrics
            .inc("provider_failures_total", &[("kind", kind.as_str())]);
        // The operator must act on these; the user only sees the apology.
        match kind {
            FailureKind::ApiKey => tracing::error!(error = %e,
                "xAI refused the API key: check XAI_API_KEY (wrong, revoked or blocked)"),
            FailureKind::Credits => tracing::error!(error = %e,
                "xAI credits or the team's spending limit ran out: top up at console.x.ai"),
            _ => {}
        }
    }
    if outcome.unconfirmed_attempts > 0 {
        state.metrics.add(
            "provider_unconfirmed_attempts_total",
            &[],
            u64::from(outcome.unconfirmed_attempts),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_user_ids_are_hashed() {
        let h = hashed_user("@alice:example.org");
        assert!(!h.contains("alice"));
        assert_eq!(h, hashed_user("@alice:example.org"));
    }
}
