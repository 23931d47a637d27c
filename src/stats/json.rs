//! The JSON renderer: a stable document (shape version [`JSON_VERSION`]).

use chrono::NaiveDateTime;
use serde_json::{json, Map, Value};

use super::{Percentiles, Rate, Report, Spender, Tally, JSON_VERSION, STAGES};

fn ts(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Rounds a display ratio so the JSON stays readable and diff-friendly.
fn round_to(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

fn tally_json(t: &Tally) -> Value {
    json!({
        "requests": {"total": t.requests_total(), "by_route": t.requests},
        "cost_ticks": {
            "total": t.cost_total(),
            "by_route": t.cost_by_route,
            "by_stage": t.cost_by_stage,
        },
    })
}

fn percentiles_json(p: &Option<Percentiles>) -> Value {
    match p {
        Some(p) => json!({"n": p.n, "p50": p.p50, "p95": p.p95, "p99": p.p99, "max": p.max}),
        None => json!({"n": 0, "p50": null, "p95": null, "p99": null, "max": null}),
    }
}

fn rate_json(r: &Rate) -> Value {
    json!({"count": r.count, "of": r.of, "rate": r.fraction().map(|f| round_to(f, 4))})
}

fn spenders_json(list: &[Spender]) -> Value {
    list.iter()
        .map(|s| json!({"id": s.id, "requests": s.requests, "cost_ticks": s.cost_ticks}))
        .collect()
}

/// The report as JSON (shape version [`JSON_VERSION`], documented in the README). Money is
/// integer ticks (1 USD = 10^10); every route, stage and router-source key is always present.
pub fn render_json(report: &Report) -> Value {
    let cf = &report.counterfactual;
    let latency_by_route: Map<String, Value> = report
        .latency_by_route
        .iter()
        .map(|(k, v)| (k.clone(), percentiles_json(v)))
        .collect();
    let latency_by_stage: Map<String, Value> = report
        .latency_by_stage
        .iter()
        .map(|(k, v)| (k.clone(), percentiles_json(v)))
        .collect();
    let degraded: Map<String, Value> = report
        .degraded
        .iter()
        .map(|(k, n)| (k.clone(), json!(n)))
        .collect();
    let mut root = tally_json(&report.total);
    let extra = json!({
        "version": JSON_VERSION,
        "since": ts(report.since),
        "until": ts(report.until),
        "final_model": report.final_model,
        "anonymized": report.anonymized,
        "routes": report.routes,
        "stages": STAGES,
        "days": report.days.iter().map(|d| {
            let mut v = tally_json(&d.tally);
            v["day"] = json!(d.day.to_string());
            v
        }).collect::<Vec<_>>(),
        "router_sources": report.router_sources,
        "counterfactual": {
            "priced": cf.direct_ticks.is_some(),
            "answered": cf.answered,
            "cache_hits": cf.cache_hits,
            "actual_ticks": cf.actual_ticks,
            "grok_direct_ticks": cf.direct_ticks,
            "cache_hit_estimate_ticks": cf.cache_hit_estimate_ticks,
            "saving_ticks": cf.saving_ticks(),
            "saving_pct": cf.saving_pct().map(|p| round_to(p, 2)),
        },
        "latency_ms": {
            "method": "nearest_rank",
            "by_route": latency_by_route,
            "by_stage": latency_by_stage,
            "histogram": report.latency_histogram.iter().map(|b| json!({
                "below_ms": b.below_ms,
                "by_route": b.by_route,
            })).collect::<Vec<_>>(),
        },
        "rates": {
            "escalated": rate_json(&report.rates.escalated),
            "fallback_fired": rate_json(&report.rates.fallback_fired),
            "cache_hit": rate_json(&report.rates.cache_hit),
            "ceiling_hit": rate_json(&report.rates.ceiling_hit),
            "per_user_cap_hit": rate_json(&report.rates.per_user_cap_hit),
        },
        "degraded": degraded,
        "top_rooms": spenders_json(&report.top_rooms),
        "top_users": spenders_json(&report.top_users),
    });
    if let (Value::Object(root), Value::Object(extra)) = (&mut root, extra) {
        root.extend(extra);
    }
    root
}
