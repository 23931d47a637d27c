//! The pure aggregation of `request_log` rows into a [`Report`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::NaiveDate;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::provider::{compute_cost_ticks, Price, Usage};
use crate::store::budget::{Counter, GLOBAL_SCOPE};
use crate::store::RequestLogRow;
use crate::telemetry::{answer_stage, StageUsage};

use super::{
    Bucket, CeilingDay, Comparison, Counterfactual, Day, Options, Percentiles, Rate, Rates, Report,
    Spender, Tally, LATENCY_BUCKETS_MS, ROUTER_SOURCES, ROUTES, STAGES,
};

impl Tally {
    fn new(routes: &[String]) -> Self {
        Self {
            requests: routes.iter().map(|r| (r.clone(), 0)).collect(),
            cost_by_route: routes.iter().map(|r| (r.clone(), 0)).collect(),
            cost_by_stage: STAGES.iter().map(|s| (s.to_string(), 0)).collect(),
        }
    }

    fn add(&mut self, row: &RequestLogRow) {
        *self.requests.entry(row.route.clone()).or_default() += 1;
        *self.cost_by_route.entry(row.route.clone()).or_default() += row.cost_total_ticks;
        for stage in STAGES {
            *self.cost_by_stage.entry(stage.to_string()).or_default() += stage_cost(row, stage);
        }
    }
}

impl Percentiles {
    /// The percentiles of `samples` (any order); `None` when there are none.
    pub fn of(mut samples: Vec<i64>) -> Option<Self> {
        samples.sort_unstable();
        Some(Self {
            n: samples.len() as u64,
            p50: nearest_rank(&samples, 50)?,
            p95: nearest_rank(&samples, 95)?,
            p99: nearest_rank(&samples, 99)?,
            max: *samples.last()?,
        })
    }
}

/// The nearest-rank `p`-th percentile of ascending `sorted`: the value at rank
/// `ceil(p/100 * n)` (at least 1). Always an observed value; `None` for no samples.
pub fn nearest_rank(sorted: &[i64], p: u32) -> Option<i64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = (p as usize * n).div_ceil(100).clamp(1, n);
    Some(sorted[rank - 1])
}

/// A stage's cost column of a row.
fn stage_cost(row: &RequestLogRow, stage: &str) -> i64 {
    match stage {
        "router" => row.cost_router_ticks,
        "trivial" => row.cost_trivial_ticks,
        "web" => row.cost_web_ticks,
        "reason" => row.cost_reason_ticks,
        "final" => row.cost_final_ticks,
        _ => 0,
    }
}

/// The opaque id `--anonymize` shows for a user: the same hash the bot sends to xAI as `user`,
/// so a row can still be matched with the provider's usage records, never the Matrix id.
pub fn anonymize_user(user_id: &str) -> String {
    hex::encode(&Sha256::digest(user_id.as_bytes())[..12])
}

fn is_routed(row: &RequestLogRow) -> bool {
    row.route != "none"
}

fn is_answered(row: &RequestLogRow) -> bool {
    is_routed(row) && row.ok
}

/// Aggregates `rows` (any order; rows before `opts.since` are ignored) and the budget
/// counters of the window (`budget`, any order and scope) into a [`Report`].
pub fn summarize(rows: &[RequestLogRow], budget: &[Counter], opts: &Options) -> Report {
    let rows: Vec<&RequestLogRow> = rows.iter().filter(|r| r.created_at >= opts.since).collect();

    let unknown: BTreeSet<&str> = rows
        .iter()
        .map(|r| r.route.as_str())
        .filter(|r| !ROUTES.contains(r))
        .collect();
    let routes: Vec<String> = ROUTES
        .iter()
        .copied()
        .chain(unknown)
        .map(str::to_string)
        .collect();

    let mut total = Tally::new(&routes);
    let mut days = Vec::new();
    let first = rows.iter().map(|r| r.created_at.date()).min();
    let last = rows.iter().map(|r| r.created_at.date()).max();
    if let (Some(first), Some(last)) = (first, last) {
        let mut day = first;
        while day <= last {
            days.push(Day {
                day,
                tally: Tally::new(&routes),
            });
            match day.succ_opt() {
                Some(next) => day = next,
                None => break,
            }
        }
    }
    let day_index: HashMap<NaiveDate, usize> =
        days.iter().enumerate().map(|(i, d)| (d.day, i)).collect();

    let mut router_sources: BTreeMap<String, u64> =
        ROUTER_SOURCES.iter().map(|s| (s.to_string(), 0)).collect();
    let mut route_ms: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut stage_ms: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut histogram: Vec<Bucket> = LATENCY_BUCKETS_MS
        .iter()
        .map(|b| Some(*b))
        .chain([None])
        .map(|below_ms| Bucket {
            below_ms,
            by_route: routes
                .iter()
                .filter(|r| r.as_str() != "none")
                .map(|r| (r.clone(), 0))
                .collect(),
        })
        .collect();
    let mut rates = Rates::default();
    let mut degraded: BTreeMap<String, u64> = BTreeMap::new();
    let mut rooms: HashMap<&str, (u64, i64)> = HashMap::new();
    let mut users: HashMap<&str, (u64, i64)> = HashMap::new();

    for row in &rows {
        total.add(row);
        if let Some(&i) = day_index.get(&row.created_at.date()) {
            days[i].tally.add(row);
        }
        *router_sources.entry(row.router_source.clone()).or_default() += 1;

        let routed = is_routed(row);
        if routed {
            route_ms
                .entry(row.route.clone())
                .or_default()
                .push(row.latency_ms);
            let bucket = LATENCY_BUCKETS_MS
                .iter()
                .position(|b| row.latency_ms < *b)
                .unwrap_or(LATENCY_BUCKETS_MS.len());
            *histogram[bucket]
                .by_route
                .entry(row.route.clone())
                .or_default() += 1;
        }
        // A malformed stage_ms (never written by this program) only loses its latencies.
        if let Ok(Value::Object(stages)) = serde_json::from_str::<Value>(&row.stage_ms) {
            for (stage, ms) in stages {
                if let Some(ms) = ms.as_i64() {
                    stage_ms.entry(stage).or_default().push(ms);
                }
            }
        }

        let count = |rate: &mut Rate, population: bool, flag: bool| {
            if population {
                rate.of += 1;
                rate.count += flag as u64;
            }
        };
        count(&mut rates.escalated, routed, row.escalated);
        count(&mut rates.fallback_fired, routed, row.fallback_fired);
        count(&mut rates.cache_hit, routed, row.cache_hit);
        count(&mut rates.ceiling_hit, true, row.ceiling_hit);
        count(&mut rates.per_user_cap_hit, true, row.per_user_cap_hit);

        if !row.degraded.is_empty() {
            *degraded.entry(row.degraded.clone()).or_default() += 1;
        }
        for (map, key) in [(&mut rooms, &row.room_id), (&mut users, &row.sender)] {
            let entry = map.entry(key.as_str()).or_default();
            entry.0 += 1;
            entry.1 += row.cost_total_ticks;
        }
    }

    let mut latency_by_route: BTreeMap<String, Option<Percentiles>> = routes
        .iter()
        .filter(|r| r.as_str() != "none")
        .map(|r| (r.clone(), None))
        .collect();
    for (route, samples) in route_ms {
        latency_by_route.insert(route, Percentiles::of(samples));
    }
    let mut latency_by_stage: BTreeMap<String, Option<Percentiles>> =
        STAGES.iter().map(|s| (s.to_string(), None)).collect();
    for (stage, samples) in stage_ms {
        latency_by_stage.insert(stage, Percentiles::of(samples));
    }

    let mut degraded: Vec<(String, u64)> = degraded.into_iter().collect();
    degraded.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));

    let users: HashMap<String, (u64, i64)> = if opts.anonymize {
        users
            .into_iter()
            .map(|(u, v)| (anonymize_user(u), v))
            .collect()
    } else {
        users.into_iter().map(|(u, v)| (u.to_string(), v)).collect()
    };
    let rooms: HashMap<String, (u64, i64)> =
        rooms.into_iter().map(|(r, v)| (r.to_string(), v)).collect();

    Report {
        since: opts.since,
        until: opts.until,
        final_model: opts.final_model.clone(),
        anonymized: opts.anonymize,
        counterfactual: counterfactual(&rows, &routes, opts),
        ceiling_days: ceiling_days(budget, opts),
        routes,
        days,
        total,
        router_sources,
        latency_by_route,
        latency_by_stage,
        latency_histogram: histogram,
        rates,
        degraded,
        top_rooms: ranking(rooms, opts.top),
        top_users: ranking(users, opts.top),
    }
}

/// Highest spend first; ties by more requests, then by id, so the order is deterministic.
fn ranking(map: HashMap<String, (u64, i64)>, top: usize) -> Vec<Spender> {
    let mut list: Vec<Spender> = map
        .into_iter()
        .map(|(id, (requests, cost_ticks))| Spender {
            id,
            requests,
            cost_ticks,
        })
        .collect();
    list.sort_by(|a, b| {
        b.cost_ticks
            .cmp(&a.cost_ticks)
            .then_with(|| b.requests.cmp(&a.requests))
            .then_with(|| a.id.cmp(&b.id))
    });
    list.truncate(top);
    list
}

/// What one answered row adds to the counterfactual.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowComparison {
    /// Both sides priced.
    Compared(Comparison),
    /// Written before per-stage tokens were recorded (`direct_*_tokens` -1, no `stage_usage`).
    WithoutStageUsage,
    /// A stage's model has no configured price.
    Unpriced,
}

/// Prices one answered row on both sides: the cascade side is every stage's tokens at the
/// price of the model that ran it (`models`); the `grok_direct` side is the row's direct
/// estimate at `final_price`, its cached input the answering stage's cached tokens up to the
/// direct input (the system prompt prefix would be cached for `grok_direct` too).
pub fn compare_row(
    row: &RequestLogRow,
    prices: &BTreeMap<String, Price>,
    final_price: &Price,
) -> RowComparison {
    let stages = serde_json::from_str::<BTreeMap<String, StageUsage>>(&row.stage_usage);
    let (Ok(stages), true) = (
        stages,
        row.direct_input_tokens >= 0 && row.direct_output_tokens >= 0,
    ) else {
        return RowComparison::WithoutStageUsage;
    };
    // A malformed `models` (never written by this program) leaves every stage unpriced.
    let models: BTreeMap<String, String> = serde_json::from_str(&row.models).unwrap_or_default();
    let mut cascade_ticks = 0;
    for (stage, usage) in &stages {
        let Some(price) = models.get(stage).and_then(|m| prices.get(m)) else {
            return RowComparison::Unpriced;
        };
        cascade_ticks += compute_cost_ticks(&usage.usage(), price);
    }
    let cached = answer_stage(|s| stages.get(s.as_str())).map_or(0, |s| s.cached);
    let direct = Usage {
        input_tokens: row.direct_input_tokens,
        cached_tokens: cached.clamp(0, row.direct_input_tokens),
        output_tokens: row.direct_output_tokens,
        ..Usage::default()
    };
    RowComparison::Compared(Comparison {
        rows: 1,
        cache_hits: row.cache_hit as u64,
        reported_ticks: row.cost_total_ticks,
        cascade_ticks,
        direct_ticks: compute_cost_ticks(&direct, final_price),
    })
}

/// The counterfactual over the answered rows among `rows`, per route and in total.
fn counterfactual(rows: &[&RequestLogRow], routes: &[String], opts: &Options) -> Counterfactual {
    let answered: Vec<&RequestLogRow> = rows.iter().copied().filter(|r| is_answered(r)).collect();
    let mut out = Counterfactual {
        priced: opts.final_price.is_some(),
        answered: answered.len() as u64,
        cache_hits: answered.iter().filter(|r| r.cache_hit).count() as u64,
        actual_ticks: answered.iter().map(|r| r.cost_total_ticks).sum(),
        by_route: routes
            .iter()
            .filter(|r| r.as_str() != "none")
            .map(|r| (r.clone(), Comparison::default()))
            .collect(),
        ..Counterfactual::default()
    };
    let Some(final_price) = &opts.final_price else {
        return out;
    };
    for row in answered {
        match compare_row(row, &opts.prices, final_price) {
            RowComparison::Compared(c) => {
                out.by_route.entry(row.route.clone()).or_default().add(&c);
                out.total.add(&c);
            }
            RowComparison::WithoutStageUsage => out.without_stage_usage += 1,
            RowComparison::Unpriced => out.unpriced += 1,
        }
    }
    out
}

/// The global counters of the window's days that had a ceiling, oldest first. Other scopes,
/// days outside the window, unparsable days and days without a cap are left out.
pub fn ceiling_days(counters: &[Counter], opts: &Options) -> Vec<CeilingDay> {
    let (first, last) = (opts.since.date(), opts.until.date());
    let mut days: Vec<CeilingDay> = counters
        .iter()
        .filter(|c| c.scope == GLOBAL_SCOPE && c.cap_ticks > 0)
        .filter_map(|c| {
            let day = NaiveDate::parse_from_str(&c.day, "%Y-%m-%d").ok()?;
            (first..=last).contains(&day).then_some(CeilingDay {
                day,
                cap_ticks: c.cap_ticks,
                settled_ticks: c.settled_ticks,
            })
        })
        .collect();
    days.sort_by_key(|d| d.day);
    days
}
