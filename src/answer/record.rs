//! The record stage: the `request_log` row of a request and its metrics.

use std::collections::BTreeMap;

use crate::cascade::{Cascade, Degrade, Outcome, Route, RouterSource, Stage};
use crate::classify::SkipReason;
use crate::provider::estimate_text_tokens;
use crate::state::AppState;
use crate::store;
use crate::telemetry::{answer_stage, RequestLog, StageUsage};

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
        stage_usage: "{}".into(),
        direct_input_tokens: -1,
        direct_output_tokens: -1,
        created_at: store::now(),
        ..RequestLog::default()
    }
}

/// Tokens `grok_direct` alone would have sent (`input`) and written (`output`) for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectEstimate {
    pub input: i64,
    pub output: i64,
}

/// What `grok_direct` alone would have sent and written, from the stages that ran:
/// - a `grok_direct` answer that called its model: that final stage's real tokens;
/// - a cache hit: `prompt_tokens` in, `cached_answer_tokens` out (no model wrote it now);
/// - any other route: `prompt_tokens` in, and out the output of the stage that wrote the
///   answer (`final`, else the route's own stage) less its reasoning, since `grok_direct`'s
///   final model writes the answer without a reasoning pass.
///
/// `prompt_tokens` is an estimate of the system prompt and the message. `None` when no stage
/// wrote an answer (nothing to compare).
pub fn direct_estimate(
    route: Route,
    cache_hit: bool,
    stages: &BTreeMap<Stage, StageUsage>,
    prompt_tokens: i64,
    cached_answer_tokens: i64,
) -> Option<DirectEstimate> {
    if cache_hit {
        return Some(DirectEstimate {
            input: prompt_tokens,
            output: cached_answer_tokens,
        });
    }
    match route {
        Route::None => None,
        Route::GrokDirect => stages.get(&Stage::Final).map(|f| DirectEstimate {
            input: f.input,
            output: f.output,
        }),
        Route::TrivialDirect | Route::WebThenGrok | Route::ReasonThenGrok => {
            let writer = answer_stage(|s| stages.get(&s))?;
            Some(DirectEstimate {
                input: prompt_tokens,
                output: (writer.output - writer.reasoning).max(0),
            })
        }
    }
}

/// The row of a request the cascade answered; `material` is what a `grok_direct` call would
/// have been sent besides the system prompt (the message, and the conversation's turns).
pub fn outcome_row(job: &Job, outcome: &Outcome, cascade: &Cascade, material: &str) -> RequestLog {
    let mut row = base_row(&job.event_id, &job.room_id, &job.sender);
    row.route = outcome.route.as_str().into();
    row.router_source = outcome.router_source.as_str().into();
    row.router_confidence = outcome.router_confidence;
    row.models = serde_json::to_string(&outcome.models).unwrap_or_else(|_| "{}".into());
    row.stage_ms = serde_json::to_string(&outcome.stage_ms).unwrap_or_else(|_| "{}".into());
    row.prompt_version = cascade.prompt_version().to_string();
    row.prompt_tokens = outcome.prompt_tokens;
    row.cached_tokens = outcome.cached_tokens;
    row.completion_tokens = outcome.completion_tokens;
    row.reasoning_tokens = outcome.reasoning_tokens;
    let stage = |s| outcome.stage_cost.get(&s).copied().unwrap_or(0);
    row.cost_router_ticks = stage(Stage::Router);
    row.cost_trivial_ticks = stage(Stage::Trivial);
    row.cost_web_ticks = stage(Stage::Web);
    row.cost_reason_ticks = stage(Stage::Reason);
    row.cost_final_ticks = stage(Stage::Final);
    row.cost_total_ticks = outcome.cost_total();
    row.stage_usage = serde_json::to_string(&outcome.stage_usage).unwrap_or_else(|_| "{}".into());
    // The bytes-based estimate of what grok_direct would have been sent; the framing the
    // limiter adds for a reservation is left out, the system prompt is counted as text.
    let prompt = estimate_text_tokens(cascade.system_prompt()) + estimate_text_tokens(material);
    if let Some(d) = direct_estimate(
        outcome.route,
        outcome.cache_hit,
        &outcome.stage_usage,
        prompt,
        estimate_text_tokens(&outcome.text),
    ) {
        row.direct_input_tokens = d.input;
        row.direct_output_tokens = d.output;
    }
    row.escalated = outcome.escalated;
    row.cache_hit = outcome.cache_hit;
    row.cost_source = outcome
        .cost_source
        .map(|s| s.as_str().to_string())
        .unwrap_or_default();
    row.fallback_fired = outcome.fallback_fired;
    row.provider_request_id = outcome.provider_request_id.clone();
    row.degraded = outcome.degraded.map_or("", Degrade::as_str).into();
    row.err = outcome
        .error
        .as_ref()
        .map(|e| e.to_string())
        .unwrap_or_default();
    row.ok = outcome.ok();
    row.query_text = job.query_text();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// (route, cache hit, stages that ran, expected estimate).
    type Case = (
        Route,
        bool,
        Vec<(Stage, StageUsage)>,
        Option<DirectEstimate>,
    );

    fn usage(input: i64, cached: i64, output: i64, reasoning: i64) -> StageUsage {
        StageUsage {
            input,
            cached,
            output,
            reasoning,
            web_search_calls: 0,
        }
    }

    #[test]
    fn direct_estimate_by_route() {
        let u = usage;
        let d = |input, output| Some(DirectEstimate { input, output });
        // (route, cache hit, stages, expected) with a prompt estimate of 500 tokens and a
        // cached answer of 120.
        let cases: Vec<Case> = vec![
            // grok_direct: the final stage's real tokens, reasoning and router ignored.
            (
                Route::GrokDirect,
                false,
                vec![(Stage::Final, u(900, 300, 400, 50))],
                d(900, 400),
            ),
            (
                Route::GrokDirect,
                false,
                vec![
                    (Stage::Router, u(80, 0, 10, 0)),
                    (Stage::Final, u(910, 0, 410, 0)),
                ],
                d(910, 410),
            ),
            // A grok_direct call that failed: nothing to compare.
            (
                Route::GrokDirect,
                false,
                vec![(Stage::Router, u(80, 0, 10, 0))],
                None,
            ),
            // trivial answered: its output; escalated: the final stage's.
            (
                Route::TrivialDirect,
                false,
                vec![(Stage::Trivial, u(700, 0, 40, 0))],
                d(500, 40),
            ),
            (
                Route::TrivialDirect,
                false,
                vec![
                    (Stage::Trivial, u(700, 0, 5, 0)),
                    (Stage::Final, u(710, 0, 300, 20)),
                ],
                d(500, 280),
            ),
            // web: the web stage wrote it (search results inflate its input, not ours).
            (
                Route::WebThenGrok,
                false,
                vec![(Stage::Web, u(9_000, 0, 600, 0))],
                d(500, 600),
            ),
            // reason: the final stage wrote it; without one, the analysis, less reasoning.
            (
                Route::ReasonThenGrok,
                false,
                vec![
                    (Stage::Reason, u(800, 0, 5_000, 4_000)),
                    (Stage::Final, u(2_000, 0, 700, 0)),
                ],
                d(500, 700),
            ),
            (
                Route::ReasonThenGrok,
                false,
                vec![(Stage::Reason, u(800, 0, 5_000, 4_000))],
                d(500, 1_000),
            ),
            // More reasoning than output never goes negative.
            (
                Route::ReasonThenGrok,
                false,
                vec![(Stage::Reason, u(800, 0, 10, 30))],
                d(500, 0),
            ),
            // A cache hit on any route: the prompt and the cached answer's estimate.
            (Route::GrokDirect, true, vec![], d(500, 120)),
            (
                Route::WebThenGrok,
                true,
                vec![(Stage::Router, u(80, 0, 10, 0))],
                d(500, 120),
            ),
            // No model ran.
            (Route::None, false, vec![], None),
            (Route::WebThenGrok, false, vec![], None),
        ];
        for (route, hit, stages, expected) in cases {
            let map: BTreeMap<Stage, StageUsage> = stages.iter().copied().collect();
            assert_eq!(
                direct_estimate(route, hit, &map, 500, 120),
                expected,
                "{route:?} cache_hit={hit} {stages:?}"
            );
        }
    }
}
