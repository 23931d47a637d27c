//! The record stage: the `request_log` row of a request and its metrics.

use crate::cascade::{Outcome, Route, RouterSource};
use crate::classify::SkipReason;
use crate::state::AppState;
use crate::store;
use crate::telemetry::RequestLog;

use super::Job;

/// A row with only the request's identity filled in.
pub fn base_row(event_id: &str, room_id: &str, sender: &str) -> RequestLog {
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

/// The row of a request the cascade answered.
pub fn outcome_row(job: &Job, outcome: &Outcome, prompt_version: &str) -> RequestLog {
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

/// The row of an addressed message that could not be served.
pub fn skip_row(event_id: &str, room_id: &str, sender: &str, reason: SkipReason) -> RequestLog {
    let mut row = base_row(event_id, room_id, sender);
    row.degraded = reason.as_str().into();
    row.ok = false;
    row
}

/// Counts the finished request in `/metrics`, logs it, and queues its row.
pub fn finish(state: &AppState, row: RequestLog) {
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
    tracing::info!(event_id = %row.id, route = %row.route, ok = row.ok,
        latency_ms = row.latency_ms, cost_ticks = row.cost_total_ticks, "answered");
    state.telemetry.record(row);
}
