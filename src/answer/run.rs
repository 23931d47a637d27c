//! The admit, decide, reserve and run stages: the `!usage` command, the router's decision,
//! a free cached answer, the limiter's reservation, the cascade, and settling what it cost.

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::cascade::{Ask, RouterSource};
use crate::claims::{ClaimState, Fence, Gate};
use crate::limiter::{refusal_text, Admission, Refusal};
use crate::provider::ProviderError;
use crate::state::AppState;
use crate::telemetry::RequestLog;

use super::record::{base_row, outcome_row};
use super::Job;

const APOLOGY: &str = "Sorry, I couldn't answer that just now. Please try again in a moment.";
const EMPTY_APOLOGY: &str = "Sorry, I came up empty on that one. Could you rephrase it?";
const UNAVAILABLE: &str = "Sorry, I'm temporarily unavailable. Please try again in a few minutes.";

/// What the worker does next.
pub enum Response {
    /// Send this text; the row is written once it is sent.
    Reply(String, Box<RequestLog>),
    /// The claim was lost on the way: stop without sending.
    Lost,
}

/// An opaque id for the provider's abuse tracking: never the Matrix id itself.
pub fn hashed_user(user_id: &str) -> String {
    hex::encode(&Sha256::digest(user_id.as_bytes())[..12])
}

/// Decides what to answer: the `!usage` command, a refusal from the limiter, or the cascade's
/// answer within a reservation.
pub async fn respond(state: &AppState, job: &Job, fence: &Fence, gate: &Gate) -> Response {
    let mut row = base_row(&job.event_id, &job.room_id, &job.sender);
    row.query_text = job.request.text.clone();
    row.prompt_version = state.cascade.prompt_version().to_string();
    if job
        .request
        .text
        .trim()
        .eq_ignore_ascii_case(&state.config.limits.usage_command)
    {
        return match state.limiter.usage(&job.sender).await {
            Ok(u) => {
                row.ok = true;
                Response::Reply(crate::limiter::usage_text(&u), Box::new(row))
            }
            Err(e) => {
                row.degraded = "reserve_error".into();
                row.err = e.to_string();
                Response::Reply(UNAVAILABLE.to_string(), Box::new(row))
            }
        };
    }

    let mut decision = state.cascade.decide(&job.request.text, Some(&job.room_id));
    row.router_source = decision.source.as_str().into();
    row.router_confidence = decision.confidence;
    // A cached answer costs nothing: serve it without touching the budget.
    if let Some(outcome) = state.cascade.cached(&decision).await {
        let row = outcome_row(job, &outcome, &state.cascade);
        return Response::Reply(outcome.text, Box::new(row));
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
            return Response::Reply(refusal_text(&refusal, state.limiter.now()), Box::new(row));
        }
        Admission::Unavailable(e) => {
            // Fail closed: without the budget store no model is called.
            tracing::warn!(event_id = %job.event_id, error = %e, "budget store unavailable");
            row.degraded = "reserve_error".into();
            row.err = e.to_string();
            return Response::Reply(UNAVAILABLE.to_string(), Box::new(row));
        }
    };
    if plan.shrunk {
        decision.route = plan.route;
        decision.source = RouterSource::Degraded;
        decision.ambiguous = false;
    }
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
    let ask = Ask {
        text: &job.request.text,
        room_id: Some(&job.room_id),
        user: Some(&hashed),
        output_cap: plan.output_cap,
        gate: Some(gate),
    };
    let outcome = state.cascade.run_decided(decision, &ask).await;
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
    let text = if outcome.ok() {
        outcome.text.clone()
    } else if outcome.error.is_some() {
        tracing::warn!(event_id = %job.event_id, error = ?outcome.error, "cascade failed");
        APOLOGY.to_string()
    } else {
        EMPTY_APOLOGY.to_string()
    };
    Response::Reply(text, Box::new(outcome_row(job, &outcome, &state.cascade)))
}

/// Provider latency and spend per model in `/metrics`.
fn observe(state: &AppState, outcome: &crate::cascade::Outcome) {
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
