//! The JSON renderer: a stable document (shape version [`JSON_VERSION`]).

use chrono::NaiveDateTime;
use serde_json::{json, Map, Value};

use super::{
    Comparison, Counterfactual, Percentiles, Rate, Report, Spender, Tally, JSON_VERSION, STAGES,
};

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

/// One comparison; its money is `null` without a price for the final model.
fn comparison_json(c: &Comparison, priced: bool) -> Value {
    let money = |v: i64| if priced { json!(v) } else { Value::Null };
    json!({
        "compared": c.rows,
        "cache_hits": c.cache_hits,
        "reported_ticks": c.reported_ticks,
        "cascade_ticks": money(c.cascade_ticks),
        "grok_direct_ticks": money(c.direct_ticks),
        "saving_ticks": money(c.saving_ticks()),
        "saving_pct": c.saving_pct().map(|p| round_to(p, 2)),
    })
}

/// The counterfactual: the totals at the top level, then `not_compared` and `by_route`.
fn counterfactual_json(cf: &Counterfactual) -> Value {
    let mut v = comparison_json(&cf.total, cf.priced);
    let by_route: Map<String, Value> = cf
        .by_route
        .iter()
        .map(|(route, c)| (route.clone(), comparison_json(c, cf.priced)))
        .collect();
    let extra = json!({
        "method": "tokens_at_configured_prices",
        "priced": cf.priced,
        "answered": cf.answered,
        "answered_cache_hits": cf.cache_hits,
        "actual_ticks": cf.actual_ticks,
        "not_compared": {
            "without_stage_usage": cf.without_stage_usage,
            "unpriced": cf.unpriced,
        },
        "by_route": by_route,
    });
    if let (Value::Object(v), Value::Object(extra)) = (&mut v, extra) {
        v.extend(extra);
    }
    v
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
        "counterfactual": counterfactual_json(cf),
        "overshoot": {
            "total_ticks": report.overshoot_total_ticks(),
            "days": report.ceiling_days.iter().map(|d| json!({
                "day": d.day.to_string(),
                "cap_ticks": d.cap_ticks,
                "settled_ticks": d.settled_ticks,
                "overshoot_ticks": d.overshoot_ticks(),
            })).collect::<Vec<_>>(),
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
