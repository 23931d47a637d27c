//! The `stats` report over `request_log`: a pure aggregation of rows into a [`Report`]
//! ([`summarize`]) and three renderers: an 80-column terminal table ([`render_text`]), a
//! stable JSON document ([`render_json`]) and one self-contained HTML file with inline SVG
//! charts ([`render_html`]). No I/O happens here, so every number is table-testable.
//!
//! Definitions the numbers rest on (also in the README):
//! - A row's day is the UTC date of `created_at`; days run from the first row's day to the
//!   last row's, gaps filled with zeros.
//! - *Routed* rows are those whose route is not `none` (a model was meant to run); *answered*
//!   rows are routed rows with `ok`.
//! - Percentiles use the nearest-rank method: the value at rank `ceil(p/100 * n)` of the sorted
//!   samples. Route latency is `latency_ms` of routed rows; stage latency is every value in
//!   `stage_ms`.
//! - Escalation, fallback and cache-hit rates are over routed rows; ceiling-hit and per-user-cap
//!   rates are over all rows (a capped request may never get a route).
//! - Counterfactual ("is the cascade worth it"): every answered row priced as if `grok_direct`
//!   had answered it with the same prompt, cached and completion tokens at the final model's
//!   price. A cache hit called no answering model (its tokens are at most the router's), so it
//!   is priced at the median (nearest rank) counterfactual of the answered rows that were not
//!   cache hits. The saving compares that with the actual spend of the same answered rows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use chrono::{NaiveDate, NaiveDateTime};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::provider::{compute_cost_ticks, Price, Usage};
use crate::store::RequestLogRow;

/// Version of the JSON shape; bumped only when a key changes meaning or disappears.
pub const JSON_VERSION: u64 = 1;
/// The route tokens (DESIGN section 5) in display order.
pub const ROUTES: [&str; 5] = [
    "none",
    "grok_direct",
    "trivial_direct",
    "web_then_grok",
    "reason_then_grok",
];
/// The cost stages, in the order the cascade runs them.
pub const STAGES: [&str; 5] = ["router", "trivial", "web", "reason", "final"];
/// The router source tokens (DESIGN section 5).
pub const ROUTER_SOURCES: [&str; 5] = ["heuristic", "classifier", "default", "forced", "degraded"];
/// Upper bounds (exclusive, ms) of the latency histogram's buckets; a last bucket holds the rest.
pub const LATENCY_BUCKETS_MS: [i64; 8] = [250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000];
/// How many rooms and users the spend rankings list by default.
pub const DEFAULT_TOP: usize = 10;

/// What the report covers and how money is estimated.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rows created before this are ignored.
    pub since: NaiveDateTime,
    /// The end of the window (shown in the header only).
    pub until: NaiveDateTime,
    /// `models.final`: whose price the counterfactual uses.
    pub final_model: String,
    /// The final model's price; `None` when the config has none (no counterfactual then).
    pub final_price: Option<Price>,
    /// Replace user ids with their hash.
    pub anonymize: bool,
    /// Length of the room and user spend rankings.
    pub top: usize,
}

impl Options {
    /// Options for a window, taking the final model and its price from the config.
    pub fn from_config(
        config: &Config,
        since: NaiveDateTime,
        until: NaiveDateTime,
        anonymize: bool,
    ) -> Self {
        let final_model = config.models.final_model.clone();
        Self {
            since,
            until,
            final_price: config.prices.get(&final_model).map(Price::from),
            final_model,
            anonymize,
            top: DEFAULT_TOP,
        }
    }
}

/// Request counts and spend of one day (or of the whole window).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Route -> requests; every route of [`Report::routes`] is present.
    pub requests: BTreeMap<String, u64>,
    /// Route -> `cost_total_ticks`.
    pub cost_by_route: BTreeMap<String, i64>,
    /// Stage -> that stage's cost column; every stage of [`STAGES`] is present.
    pub cost_by_stage: BTreeMap<String, i64>,
}

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

    /// All requests.
    pub fn requests_total(&self) -> u64 {
        self.requests.values().sum()
    }

    /// All spend (the sum of `cost_total_ticks`).
    pub fn cost_total(&self) -> i64 {
        self.cost_by_route.values().sum()
    }
}

/// One UTC day of the window.
#[derive(Debug, Clone, PartialEq)]
pub struct Day {
    /// The UTC date.
    pub day: NaiveDate,
    /// That day's rows.
    pub tally: Tally,
}

/// Nearest-rank percentiles of a set of millisecond samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Percentiles {
    /// Number of samples.
    pub n: u64,
    /// Median.
    pub p50: i64,
    /// 95th percentile.
    pub p95: i64,
    /// 99th percentile.
    pub p99: i64,
    /// Largest sample.
    pub max: i64,
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

/// One bar of the latency histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// Exclusive upper bound in ms; `None` for the last, open bucket.
    pub below_ms: Option<i64>,
    /// Route -> routed requests whose latency fell in the bucket.
    pub by_route: BTreeMap<String, u64>,
}

/// A count out of a population.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rate {
    /// Rows with the flag.
    pub count: u64,
    /// Rows in the population.
    pub of: u64,
}

impl Rate {
    /// `count / of`, or `None` when the population is empty.
    pub fn fraction(&self) -> Option<f64> {
        (self.of > 0).then(|| self.count as f64 / self.of as f64)
    }
}

/// Flag rates; see the module docs for each population.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    /// `escalated` among routed rows.
    pub escalated: Rate,
    /// `fallback_fired` among routed rows.
    pub fallback_fired: Rate,
    /// `cache_hit` among routed rows.
    pub cache_hit: Rate,
    /// `ceiling_hit` among all rows.
    pub ceiling_hit: Rate,
    /// `per_user_cap_hit` among all rows.
    pub per_user_cap_hit: Rate,
}

/// What sending every answered request to `grok_direct` would have cost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counterfactual {
    /// Answered rows (routed and `ok`).
    pub answered: u64,
    /// Of those, cache hits.
    pub cache_hits: u64,
    /// Actual spend of the answered rows.
    pub actual_ticks: i64,
    /// Their estimated cost on `grok_direct`; `None` when the final model has no price.
    pub direct_ticks: Option<i64>,
    /// The estimate each cache hit was counted at (median of the other answered rows).
    pub cache_hit_estimate_ticks: Option<i64>,
}

impl Counterfactual {
    /// `direct - actual`: positive when the cascade saved money.
    pub fn saving_ticks(&self) -> Option<i64> {
        self.direct_ticks.map(|d| d - self.actual_ticks)
    }

    /// The saving as a percentage of the `grok_direct` estimate.
    pub fn saving_pct(&self) -> Option<f64> {
        match (self.saving_ticks(), self.direct_ticks) {
            (Some(s), Some(d)) if d > 0 => Some(s as f64 * 100.0 / d as f64),
            _ => None,
        }
    }
}

/// A room or user and what it spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spender {
    /// Room id, user id, or the user's hash with `--anonymize`.
    pub id: String,
    /// Rows in the window.
    pub requests: u64,
    /// Their `cost_total_ticks`.
    pub cost_ticks: i64,
}

/// Everything the renderers show; built by [`summarize`].
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Start of the window (UTC).
    pub since: NaiveDateTime,
    /// End of the window (UTC).
    pub until: NaiveDateTime,
    /// The model whose prices the counterfactual uses.
    pub final_model: String,
    /// Whether user ids are hashed.
    pub anonymized: bool,
    /// Route tokens in display order: [`ROUTES`], then any unknown token found, sorted.
    pub routes: Vec<String>,
    /// Every UTC day from the first row's to the last row's.
    pub days: Vec<Day>,
    /// The whole window.
    pub total: Tally,
    /// Router source -> rows; [`ROUTER_SOURCES`] always present.
    pub router_sources: BTreeMap<String, u64>,
    /// The `grok_direct`-only estimate.
    pub counterfactual: Counterfactual,
    /// Routed route -> latency percentiles (`None`: no samples).
    pub latency_by_route: BTreeMap<String, Option<Percentiles>>,
    /// Stage -> latency percentiles; [`STAGES`] always present.
    pub latency_by_stage: BTreeMap<String, Option<Percentiles>>,
    /// Routed rows by latency bucket ([`LATENCY_BUCKETS_MS`]) and route.
    pub latency_histogram: Vec<Bucket>,
    /// Flag rates.
    pub rates: Rates,
    /// Degrade or skip reason -> rows, most frequent first (ties by name).
    pub degraded: Vec<(String, u64)>,
    /// Rooms by spend, at most `Options::top`.
    pub top_rooms: Vec<Spender>,
    /// Users by spend, at most `Options::top`.
    pub top_users: Vec<Spender>,
}

impl Report {
    /// Routes a model runs on (all but `none`), in display order.
    pub fn routed_routes(&self) -> impl Iterator<Item = &String> {
        self.routes.iter().filter(|r| r.as_str() != "none")
    }

    /// Stage names of the latency table: [`STAGES`] then unknown keys found in `stage_ms`.
    pub fn latency_stages(&self) -> Vec<String> {
        let mut stages: Vec<String> = STAGES.iter().map(|s| s.to_string()).collect();
        stages.extend(
            self.latency_by_stage
                .keys()
                .filter(|k| !STAGES.contains(&k.as_str()))
                .cloned(),
        );
        stages
    }
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

/// Aggregates `rows` (any order; rows before `opts.since` are ignored) into a [`Report`].
pub fn summarize(rows: &[RequestLogRow], opts: &Options) -> Report {
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
        counterfactual: counterfactual(&rows, opts.final_price.as_ref()),
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

/// The `grok_direct`-only estimate (rules in the module docs).
fn counterfactual(rows: &[&RequestLogRow], price: Option<&Price>) -> Counterfactual {
    let answered: Vec<&RequestLogRow> = rows.iter().copied().filter(|r| is_answered(r)).collect();
    let cache_hits = answered.iter().filter(|r| r.cache_hit).count() as u64;
    let actual_ticks = answered.iter().map(|r| r.cost_total_ticks).sum();
    let mut out = Counterfactual {
        answered: answered.len() as u64,
        cache_hits,
        actual_ticks,
        direct_ticks: None,
        cache_hit_estimate_ticks: None,
    };
    let Some(price) = price else {
        return out;
    };
    let mut direct: Vec<i64> = answered
        .iter()
        .filter(|r| !r.cache_hit)
        .map(|r| {
            let usage = Usage {
                input_tokens: r.prompt_tokens,
                cached_tokens: r.cached_tokens,
                output_tokens: r.completion_tokens,
                ..Usage::default()
            };
            compute_cost_ticks(&usage, price)
        })
        .collect();
    direct.sort_unstable();
    // With no uncached answer to learn from, a cache hit is counted as free: the estimate
    // then never overstates what the cascade saved.
    let estimate = nearest_rank(&direct, 50).unwrap_or(0);
    out.direct_ticks = Some(direct.iter().sum::<i64>() + estimate * cache_hits as i64);
    out.cache_hit_estimate_ticks = Some(estimate);
    out
}

// ---------------------------------------------------------------------------------------------
// Formatting helpers (display only: money stays integer ticks until here).

/// Formats ticks as USD with `decimals` (0..=10) places, rounding half away from zero.
pub fn usd(ticks: i64, decimals: u32) -> String {
    let decimals = decimals.min(10);
    let scale = 10i128.pow(10 - decimals);
    let abs = (ticks as i128).abs();
    let q = (abs + scale / 2) / scale;
    let unit = 10i128.pow(decimals);
    let sign = if ticks < 0 && q > 0 { "-" } else { "" };
    if decimals == 0 {
        format!("{sign}${q}")
    } else {
        format!(
            "{sign}${}.{:0width$}",
            q / unit,
            q % unit,
            width = decimals as usize
        )
    }
}

/// USD with 6 places, or fewer (down to 2) when that is wider than `width`.
fn usd_fit(ticks: i64, width: usize) -> String {
    (2..=6)
        .rev()
        .map(|d| usd(ticks, d))
        .find(|s| s.len() <= width)
        .unwrap_or_else(|| usd(ticks, 2))
}

fn pct(rate: Option<f64>) -> String {
    rate.map(|r| format!("{:.1}%", r * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// The short column name of a route in the terminal table.
fn short_route(route: &str) -> &str {
    match route {
        "grok_direct" => "direct",
        "trivial_direct" => "trivial",
        "web_then_grok" => "web",
        "reason_then_grok" => "reason",
        other => other,
    }
}

/// Cuts `s` to `width` characters, marking the cut with `...`.
fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        let kept: String = s.chars().take(width.saturating_sub(3)).collect();
        format!("{kept}...")
    }
}

fn stamp(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%d %H:%M").to_string()
}

/// Router sources in their documented order, then any unknown token found.
fn router_source_order(report: &Report) -> Vec<String> {
    let mut order: Vec<String> = ROUTER_SOURCES.iter().map(|s| s.to_string()).collect();
    order.extend(
        report
            .router_sources
            .keys()
            .filter(|s| !ROUTER_SOURCES.contains(&s.as_str()))
            .cloned(),
    );
    order
}

// ---------------------------------------------------------------------------------------------
// Text

/// Width of a money column in the terminal table.
const MONEY_W: usize = 10;

/// The terminal report; every line fits in 80 columns (ids longer than their column are cut).
pub fn render_text(report: &Report) -> String {
    let mut out = String::new();
    let total = &report.total;
    let _ = writeln!(
        out,
        "grok-appservice stats, {} .. {} UTC",
        stamp(report.since),
        stamp(report.until)
    );
    let _ = writeln!(
        out,
        "{} requests, {} spent; final model {}",
        total.requests_total(),
        usd(total.cost_total(), 6),
        fit(&report.final_model, 30)
    );
    if report.days.is_empty() {
        out.push_str("\nNo requests in this window.\n");
        return out;
    }

    // Unknown route tokens (never written by this program) share one `other` column, so the
    // table keeps its width; the JSON lists them by name.
    let other_requests = |t: &Tally| -> u64 {
        t.requests
            .iter()
            .filter(|(r, _)| !ROUTES.contains(&r.as_str()))
            .map(|(_, n)| n)
            .sum()
    };
    let show_other = other_requests(total) > 0;
    out.push_str("\nRequests per day by route\n");
    let mut header = format!("{:<10}", "day");
    for r in ROUTES {
        let _ = write!(header, " {:>7}", short_route(r));
    }
    if show_other {
        let _ = write!(header, " {:>7}", "other");
    }
    let _ = write!(header, " {:>7}", "total");
    let _ = writeln!(out, "{header}");
    let count_row = |label: &str, t: &Tally| {
        let mut line = format!("{label:<10}");
        for r in ROUTES {
            let _ = write!(line, " {:>7}", t.requests.get(r).copied().unwrap_or(0));
        }
        if show_other {
            let _ = write!(line, " {:>7}", other_requests(t));
        }
        let _ = write!(line, " {:>7}", t.requests_total());
        line
    };
    for d in &report.days {
        let _ = writeln!(out, "{}", count_row(&d.day.to_string(), &d.tally));
    }
    let _ = writeln!(out, "{}", count_row("total", total));
    out.push_str("(direct = grok_direct, trivial = trivial_direct, web = web_then_grok,\n");
    out.push_str(" reason = reason_then_grok; none = skipped or refused, no model ran)\n");
    if show_other {
        out.push_str("(other = route tokens this version does not know)\n");
    }

    // `none` never spends (no model ran): it joins unknown tokens in an `other` column that
    // only appears when some row says otherwise, so the table stays within 80 columns.
    const MODEL_ROUTES: [&str; 4] = [ROUTES[1], ROUTES[2], ROUTES[3], ROUTES[4]];
    let other_cost = |t: &Tally| -> i64 {
        t.cost_by_route
            .iter()
            .filter(|(r, _)| !MODEL_ROUTES.contains(&r.as_str()))
            .map(|(_, c)| c)
            .sum()
    };
    let show_other = other_cost(total) != 0;
    out.push_str("\nSpend per day by route (USD)\n");
    let mut header = format!("{:<10}", "day");
    for r in MODEL_ROUTES {
        let _ = write!(header, " {:>MONEY_W$}", short_route(r));
    }
    if show_other {
        let _ = write!(header, " {:>MONEY_W$}", "other");
    }
    let _ = writeln!(out, "{header} {:>MONEY_W$}", "total");
    let money_row = |label: &str, values: Vec<i64>, sum: i64| {
        let mut line = format!("{label:<10}");
        for v in values {
            let _ = write!(line, " {:>MONEY_W$}", usd_fit(v, MONEY_W));
        }
        let _ = write!(line, " {:>MONEY_W$}", usd_fit(sum, MONEY_W));
        line
    };
    let by_route = |t: &Tally| -> Vec<i64> {
        let mut v: Vec<i64> = MODEL_ROUTES
            .iter()
            .map(|r| t.cost_by_route.get(*r).copied().unwrap_or(0))
            .collect();
        if show_other {
            v.push(other_cost(t));
        }
        v
    };
    for d in &report.days {
        let line = money_row(&d.day.to_string(), by_route(&d.tally), d.tally.cost_total());
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "{}",
        money_row("total", by_route(total), total.cost_total())
    );

    out.push_str("\nSpend per day by stage (USD)\n");
    let mut header = format!("{:<10}", "day");
    for s in STAGES {
        let _ = write!(header, " {s:>MONEY_W$}");
    }
    let _ = writeln!(out, "{header} {:>MONEY_W$}", "total");
    let by_stage = |t: &Tally| -> Vec<i64> {
        STAGES
            .iter()
            .map(|s| t.cost_by_stage.get(*s).copied().unwrap_or(0))
            .collect()
    };
    for d in &report.days {
        let stages = by_stage(&d.tally);
        let sum = stages.iter().sum();
        let _ = writeln!(out, "{}", money_row(&d.day.to_string(), stages, sum));
    }
    let stages = by_stage(total);
    let sum = stages.iter().sum();
    let _ = writeln!(out, "{}", money_row("total", stages, sum));

    let cf = &report.counterfactual;
    let _ = writeln!(
        out,
        "\nCascade vs grok_direct only ({} answered, {} cache hits)",
        cf.answered, cf.cache_hits
    );
    let _ = writeln!(out, "  cascade spend       {:>14}", usd(cf.actual_ticks, 6));
    match (cf.direct_ticks, cf.saving_ticks()) {
        (Some(direct), Some(saving)) => {
            let _ = writeln!(
                out,
                "  grok_direct only    {:>14}  (same tokens, {} prices)",
                usd(direct, 6),
                fit(&report.final_model, 24)
            );
            let pct = cf
                .saving_pct()
                .map(|p| format!("{p:.1}%"))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(out, "  saving              {:>14}  {pct}", usd(saving, 6));
        }
        _ => {
            let _ = writeln!(
                out,
                "  grok_direct only    n/a (no price for {} under prices:)",
                fit(&report.final_model, 30)
            );
        }
    }

    let _ = writeln!(
        out,
        "\n{:<28} {:>6} {:>8} {:>8} {:>8} {:>8}",
        "Latency ms (nearest rank)", "n", "p50", "p95", "p99", "max"
    );
    let lat_row = |label: String, p: Option<&Percentiles>| match p {
        Some(p) => format!(
            "{:<28} {:>6} {:>8} {:>8} {:>8} {:>8}",
            fit(&label, 28),
            p.n,
            p.p50,
            p.p95,
            p.p99,
            p.max
        ),
        None => format!("{:<28} {:>6}", fit(&label, 28), 0),
    };
    for r in report.routed_routes() {
        let p = report.latency_by_route.get(r).and_then(Option::as_ref);
        let _ = writeln!(out, "{}", lat_row(format!("  route {r}"), p));
    }
    for s in report.latency_stages() {
        let p = report.latency_by_stage.get(&s).and_then(Option::as_ref);
        let _ = writeln!(out, "{}", lat_row(format!("  stage {s}"), p));
    }

    out.push_str("\nRates\n");
    let rates = &report.rates;
    for (label, rate, population) in [
        ("escalated", rates.escalated, "routed requests"),
        ("fallback fired", rates.fallback_fired, "routed requests"),
        ("cache hit", rates.cache_hit, "routed requests"),
        ("ceiling hit", rates.ceiling_hit, "all requests"),
        ("per-user cap hit", rates.per_user_cap_hit, "all requests"),
    ] {
        let _ = writeln!(
            out,
            "  {label:<18} {:>7} of {:<7} {:>6}  {population}",
            rate.count,
            rate.of,
            pct(rate.fraction())
        );
    }
    let mut line = String::from("\nRouter source:");
    let mut width = line.len() - 1;
    for (i, s) in router_source_order(report).into_iter().enumerate() {
        let n = report.router_sources.get(&s).copied().unwrap_or(0);
        let item = format!("{}{s} {n}", if i == 0 { " " } else { ", " });
        if width + item.len() > 78 {
            line.push_str(",\n ");
            width = 1;
            line.push_str(item.trim_start_matches(", "));
            width += item.len();
        } else {
            line.push_str(&item);
            width += item.len();
        }
    }
    let _ = writeln!(out, "{line}");

    out.push_str("\nDegrade and skip reasons\n");
    if report.degraded.is_empty() {
        out.push_str("  (none)\n");
    }
    for (reason, n) in &report.degraded {
        let _ = writeln!(out, "  {:<30} {n:>7}", fit(reason, 30));
    }

    let users = if report.anonymized {
        "Top users by spend (hashed)"
    } else {
        "Top users by spend"
    };
    for (title, list) in [
        ("Top rooms by spend", &report.top_rooms),
        (users, &report.top_users),
    ] {
        let _ = writeln!(out, "\n{title:<52} {:>9} {:>12}", "requests", "spend");
        for s in list {
            let _ = writeln!(
                out,
                "  {:<50} {:>9} {:>12}",
                fit(&s.id, 50),
                s.requests,
                usd(s.cost_ticks, 6)
            );
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// JSON

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

// ---------------------------------------------------------------------------------------------
// HTML

/// Escapes text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A route's colour in every chart (colour-blind-safe Tableau hues).
fn route_color(route: &str) -> &'static str {
    match route {
        "none" => "#9aa0a6",
        "grok_direct" => "#1f77b4",
        "trivial_direct" => "#2ca02c",
        "web_then_grok" => "#ff7f0e",
        "reason_then_grok" => "#9467bd",
        _ => "#8c564b",
    }
}

/// One stacked series of a bar chart.
struct Series<'a> {
    name: &'a str,
    color: &'static str,
    values: Vec<i64>,
}

/// The smallest "1, 2 or 5 times a power of ten" step that splits `max` into at most 5 steps,
/// and the axis top it gives.
fn axis(max: i64) -> (i64, i64) {
    let max = max.max(1);
    let mut magnitude = 1i64;
    loop {
        for m in [1, 2, 5] {
            let step = m * magnitude;
            if step * 5 >= max {
                return (step, (max + step - 1) / step * step);
            }
        }
        magnitude = magnitude.saturating_mul(10);
    }
}

const CHART_W: f64 = 760.0;
const CHART_H: f64 = 280.0;
const PAD_L: f64 = 78.0;
const PAD_R: f64 = 12.0;
const PAD_T: f64 = 12.0;
const PAD_B: f64 = 34.0;

/// A stacked bar chart as inline SVG. Only data marks are `<rect>` elements (one per non-zero
/// segment, each with a `<title>` tooltip), so a test can count them.
fn stacked_bars(
    id: &str,
    kind: &str,
    label: &str,
    categories: &[String],
    series: &[Series<'_>],
    fmt_axis: &dyn Fn(i64, i64) -> String,
    fmt_value: &dyn Fn(i64) -> String,
) -> String {
    let n = categories.len();
    let totals: Vec<i64> = (0..n)
        .map(|i| series.iter().map(|s| s.values[i].max(0)).sum())
        .collect();
    let (step, top) = axis(totals.iter().copied().max().unwrap_or(0));
    let plot_w = CHART_W - PAD_L - PAD_R;
    let plot_h = CHART_H - PAD_T - PAD_B;
    let y_of = |v: i64| PAD_T + plot_h - v as f64 * plot_h / top as f64;
    let mut svg = format!(
        "<svg id=\"{id}\" data-chart=\"{kind}\" class=\"chart\" role=\"img\" \
         aria-label=\"{}\" viewBox=\"0 0 {CHART_W} {CHART_H}\" width=\"{CHART_W}\" \
         height=\"{CHART_H}\" xmlns=\"http://www.w3.org/2000/svg\">",
        esc(label)
    );
    let mut v = 0;
    while v <= top {
        let y = y_of(v);
        let _ = write!(
            svg,
            "<line class=\"grid\" x1=\"{PAD_L}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text class=\"ylabel\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            CHART_W - PAD_R,
            PAD_L - 6.0,
            y + 4.0,
            esc(&fmt_axis(v, step))
        );
        v += step;
    }
    if n == 0 {
        let _ = write!(
            svg,
            "<text class=\"empty\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">no data</text>",
            PAD_L + plot_w / 2.0,
            PAD_T + plot_h / 2.0
        );
    }
    let slot = plot_w / n.max(1) as f64;
    let bar_w = (slot * 0.7).max(1.0);
    // At most ~16 labels along the axis, so long windows stay legible.
    let label_every = n.div_ceil(16).max(1);
    for (i, category) in categories.iter().enumerate() {
        let x = PAD_L + slot * i as f64 + (slot - bar_w) / 2.0;
        let mut base = 0i64;
        for s in series {
            let value = s.values[i];
            if value <= 0 {
                continue;
            }
            // Keep a tiny share visible: at least half a pixel tall.
            let h = (y_of(base) - y_of(base + value)).max(0.5);
            let _ = write!(
                svg,
                "<rect class=\"bar\" data-series=\"{}\" data-category=\"{}\" data-value=\"{value}\" \
                 x=\"{x:.2}\" y=\"{:.2}\" width=\"{bar_w:.2}\" height=\"{h:.2}\" fill=\"{}\">\
                 <title>{}: {}, {}</title></rect>",
                esc(s.name),
                esc(category),
                y_of(base) - h,
                s.color,
                esc(category),
                esc(s.name),
                esc(&fmt_value(value))
            );
            base += value;
        }
        if i % label_every == 0 {
            let _ = write!(
                svg,
                "<text class=\"xlabel\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x + bar_w / 2.0,
                CHART_H - PAD_B + 16.0,
                esc(category)
            );
        }
    }
    let _ = write!(
        svg,
        "<line class=\"axis\" x1=\"{PAD_L}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"/></svg>",
        CHART_W - PAD_R,
        PAD_T + plot_h,
        PAD_T + plot_h
    );
    svg
}

fn legend(routes: &[&String]) -> String {
    let mut out = String::from("<p class=\"legend\">");
    for r in routes {
        let _ = write!(
            out,
            "<span><i style=\"background:{}\"></i>{}</span>",
            route_color(r),
            esc(r)
        );
    }
    out.push_str("</p>");
    out
}

/// Axis label for ticks: USD with as many places as the step needs (at least 2).
fn usd_axis(v: i64, step: i64) -> String {
    let mut places = 10u32;
    let mut s = step;
    while places > 2 && s % 10 == 0 {
        s /= 10;
        places -= 1;
    }
    usd(v, places)
}

/// One cell of a per-day table: the day's tally and the column's key.
type DayCell = fn(&Tally, &str) -> String;

/// A table with one row per day plus a total row, one column per key, then a total column.
fn per_day_table(
    report: &Report,
    total: &Tally,
    columns: &[&str],
    cell: DayCell,
    total_cell: fn(&Tally) -> String,
) -> (Vec<String>, Vec<Vec<String>>) {
    let mut head = vec!["day".to_string()];
    head.extend(columns.iter().map(|c| c.to_string()));
    head.push("total".into());
    let rows = report
        .days
        .iter()
        .map(|d| (d.day.to_string(), &d.tally))
        .chain([("total".to_string(), total)])
        .map(|(label, t)| {
            let mut row = vec![label];
            row.extend(columns.iter().map(|c| cell(t, c)));
            row.push(total_cell(t));
            row
        })
        .collect();
    (head, rows)
}

fn html_table(head: &[String], rows: &[Vec<String>]) -> String {
    let mut out = String::from("<table><thead><tr>");
    for h in head {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{}</td>", esc(cell));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

const STYLE: &str = "body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;\
margin:2em auto;max-width:820px;padding:0 1em;color:#202124;background:#fff}\
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.8em}\
.meta{color:#5f6368;margin-top:0}\
table{border-collapse:collapse;margin:.5em 0;font-variant-numeric:tabular-nums}\
th,td{padding:.2em .7em;border-bottom:1px solid #e0e0e0;text-align:right}\
th:first-child,td:first-child{text-align:left}\
svg.chart{max-width:100%;height:auto;display:block}\
svg .grid{stroke:#e8eaed}svg .axis{stroke:#5f6368}\
svg text{font-size:11px;fill:#5f6368}\
.legend span{margin-right:1.2em;white-space:nowrap}\
.legend i{display:inline-block;width:.9em;height:.9em;margin-right:.35em;vertical-align:-.1em}\
.big{font-size:1.3em;font-weight:600}";

/// One self-contained HTML file: inline CSS and SVG, no scripts, fonts or external links,
/// so it opens offline. Charts: `#chart-route-mix` (`data-chart="route-mix"`), `#chart-spend`
/// (`data-chart="spend-by-route"`) and `#chart-latency` (`data-chart="latency-histogram"`).
pub fn render_html(report: &Report) -> String {
    let total = &report.total;
    let days: Vec<String> = report.days.iter().map(|d| d.day.to_string()).collect();
    let mut html = String::new();
    let title = format!(
        "grok-appservice stats {} .. {} UTC",
        stamp(report.since),
        stamp(report.until)
    );
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>\
         <h1>grok-appservice stats</h1><p class=\"meta\">{} .. {} UTC &middot; {} requests \
         &middot; {} spent &middot; final model {}{}</p>",
        esc(&title),
        esc(&stamp(report.since)),
        esc(&stamp(report.until)),
        total.requests_total(),
        esc(&usd(total.cost_total(), 6)),
        esc(&report.final_model),
        if report.anonymized {
            " &middot; user ids hashed"
        } else {
            ""
        }
    );

    let cf = &report.counterfactual;
    html.push_str("<h2>Is the cascade worth it?</h2>");
    match (cf.direct_ticks, cf.saving_ticks()) {
        (Some(direct), Some(saving)) => {
            let _ = write!(
                html,
                "<p class=\"big\" id=\"saving\">saving {} ({})</p>",
                esc(&usd(saving, 6)),
                cf.saving_pct()
                    .map(|p| format!("{p:.1}%"))
                    .unwrap_or_else(|| "-".into())
            );
            html.push_str(&html_table(
                &["".into(), "USD".into()],
                &[
                    vec![
                        format!("cascade spend ({} answered requests)", cf.answered),
                        usd(cf.actual_ticks, 6),
                    ],
                    vec![
                        format!("grok_direct only ({} prices)", report.final_model),
                        usd(direct, 6),
                    ],
                    vec![
                        format!("each of {} cache hits counted at", cf.cache_hits),
                        usd(cf.cache_hit_estimate_ticks.unwrap_or(0), 6),
                    ],
                ],
            ));
        }
        _ => {
            let _ = write!(
                html,
                "<p>No price for {} under <code>prices:</code>, so no estimate.</p>",
                esc(&report.final_model)
            );
        }
    }

    let routes: Vec<&String> = report.routes.iter().collect();
    let count_series: Vec<Series> = routes
        .iter()
        .map(|r| Series {
            name: r,
            color: route_color(r),
            values: report
                .days
                .iter()
                .map(|d| d.tally.requests.get(*r).copied().unwrap_or(0) as i64)
                .collect(),
        })
        .collect();
    html.push_str("<h2>Route mix over time</h2>");
    html.push_str(&stacked_bars(
        "chart-route-mix",
        "route-mix",
        "Requests per day, stacked by route",
        &days,
        &count_series,
        &|v, _| v.to_string(),
        &|v| format!("{v} requests"),
    ));
    html.push_str(&legend(&routes));

    let spend_series: Vec<Series> = routes
        .iter()
        .map(|r| Series {
            name: r,
            color: route_color(r),
            values: report
                .days
                .iter()
                .map(|d| d.tally.cost_by_route.get(*r).copied().unwrap_or(0))
                .collect(),
        })
        .collect();
    html.push_str("<h2>Spend per day by route</h2>");
    html.push_str(&stacked_bars(
        "chart-spend",
        "spend-by-route",
        "USD per day, stacked by route",
        &days,
        &spend_series,
        &usd_axis,
        &|v| usd(v, 6),
    ));
    html.push_str(&legend(&routes));

    let buckets: Vec<String> = report
        .latency_histogram
        .iter()
        .map(|b| match b.below_ms {
            Some(ms) if ms >= 1000 => format!("<{}s", ms / 1000),
            Some(ms) => format!("<{ms}ms"),
            None => format!(
                ">={}s",
                LATENCY_BUCKETS_MS[LATENCY_BUCKETS_MS.len() - 1] / 1000
            ),
        })
        .collect();
    let routed: Vec<&String> = report.routed_routes().collect();
    let latency_series: Vec<Series> = routed
        .iter()
        .map(|r| Series {
            name: r,
            color: route_color(r),
            values: report
                .latency_histogram
                .iter()
                .map(|b| b.by_route.get(*r).copied().unwrap_or(0) as i64)
                .collect(),
        })
        .collect();
    html.push_str("<h2>Latency distribution</h2>");
    html.push_str(&stacked_bars(
        "chart-latency",
        "latency-histogram",
        "Requests by end-to-end latency, stacked by route",
        &buckets,
        &latency_series,
        &|v, _| v.to_string(),
        &|v| format!("{v} requests"),
    ));
    html.push_str(&legend(&routed));

    let pct_row = |label: String, p: &Option<Percentiles>| -> Vec<String> {
        match p {
            Some(p) => vec![
                label,
                p.n.to_string(),
                p.p50.to_string(),
                p.p95.to_string(),
                p.p99.to_string(),
                p.max.to_string(),
            ],
            None => vec![
                label,
                "0".into(),
                "".into(),
                "".into(),
                "".into(),
                "".into(),
            ],
        }
    };
    let mut lat_rows: Vec<Vec<String>> = routed
        .iter()
        .map(|r| {
            pct_row(
                format!("route {r}"),
                report.latency_by_route.get(*r).unwrap_or(&None),
            )
        })
        .collect();
    for s in report.latency_stages() {
        let p = report.latency_by_stage.get(&s).unwrap_or(&None);
        lat_rows.push(pct_row(format!("stage {s}"), p));
    }
    html.push_str("<h2>Latency percentiles (ms, nearest rank)</h2>");
    html.push_str(&html_table(
        &["", "n", "p50", "p95", "p99", "max"].map(String::from),
        &lat_rows,
    ));

    let routes: Vec<&str> = report.routes.iter().map(String::as_str).collect();
    let tables: [(&str, &[&str], DayCell); 3] = [
        ("Requests per day by route", &routes, |t, r| {
            t.requests.get(r).copied().unwrap_or(0).to_string()
        }),
        ("Spend per day by route (USD)", &routes, |t, r| {
            usd(t.cost_by_route.get(r).copied().unwrap_or(0), 6)
        }),
        ("Spend per day by stage (USD)", &STAGES, |t, s| {
            usd(t.cost_by_stage.get(s).copied().unwrap_or(0), 6)
        }),
    ];
    let totals: [fn(&Tally) -> String; 3] = [
        |t| t.requests_total().to_string(),
        |t| usd(t.cost_total(), 6),
        |t| usd(t.cost_by_stage.values().sum(), 6),
    ];
    for ((title, columns, cell), total_cell) in tables.into_iter().zip(totals) {
        let (head, rows) = per_day_table(report, total, columns, cell, total_cell);
        html.push_str(&format!("<h2>{title}</h2>"));
        html.push_str(&html_table(&head, &rows));
    }

    let r = &report.rates;
    let rate_rows: Vec<Vec<String>> = [
        ("escalated", r.escalated, "routed"),
        ("fallback fired", r.fallback_fired, "routed"),
        ("cache hit", r.cache_hit, "routed"),
        ("ceiling hit", r.ceiling_hit, "all"),
        ("per-user cap hit", r.per_user_cap_hit, "all"),
    ]
    .into_iter()
    .map(|(label, rate, of)| {
        vec![
            label.to_string(),
            rate.count.to_string(),
            format!("{} {of}", rate.of),
            pct(rate.fraction()),
        ]
    })
    .collect();
    html.push_str("<h2>Rates</h2>");
    html.push_str(&html_table(
        &["", "count", "of requests", "rate"].map(String::from),
        &rate_rows,
    ));
    let source_rows: Vec<Vec<String>> = router_source_order(report)
        .into_iter()
        .map(|s| {
            let n = report.router_sources.get(&s).copied().unwrap_or(0);
            vec![s, n.to_string()]
        })
        .collect();
    html.push_str("<h2>Router source</h2>");
    html.push_str(&html_table(
        &["source", "requests"].map(String::from),
        &source_rows,
    ));
    let degrade_rows: Vec<Vec<String>> = report
        .degraded
        .iter()
        .map(|(d, n)| vec![d.clone(), n.to_string()])
        .collect();
    html.push_str("<h2>Degrade and skip reasons</h2>");
    if degrade_rows.is_empty() {
        html.push_str("<p>None.</p>");
    } else {
        html.push_str(&html_table(
            &["reason", "requests"].map(String::from),
            &degrade_rows,
        ));
    }
    for (title, list) in [
        ("Top rooms by spend", &report.top_rooms),
        (
            if report.anonymized {
                "Top users by spend (hashed ids)"
            } else {
                "Top users by spend"
            },
            &report.top_users,
        ),
    ] {
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|s| vec![s.id.clone(), s.requests.to_string(), usd(s.cost_ticks, 6)])
            .collect();
        let _ = write!(html, "<h2>{}</h2>", esc(title));
        html.push_str(&html_table(
            &["id", "requests", "spend"].map(String::from),
            &rows,
        ));
    }
    html.push_str("</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TICKS_PER_USD;

    #[test]
    fn usd_rounds_half_away_from_zero() {
        assert_eq!(usd(0, 6), "$0.000000");
        assert_eq!(usd(TICKS_PER_USD, 2), "$1.00");
        assert_eq!(usd(5_000, 6), "$0.000001");
        assert_eq!(usd(4_999, 6), "$0.000000");
        assert_eq!(usd(-15_000, 6), "-$0.000002");
        assert_eq!(usd(123_456_789_012, 6), "$12.345679");
        assert_eq!(usd(7, 10), "$0.0000000007");
    }

    #[test]
    fn usd_fit_drops_places_to_fit() {
        assert_eq!(usd_fit(1_234 * TICKS_PER_USD, 10), "$1234.0000");
        assert_eq!(usd_fit(12 * TICKS_PER_USD, 10), "$12.000000");
    }

    #[test]
    fn axis_steps_are_round() {
        assert_eq!(axis(0), (1, 1));
        assert_eq!(axis(3), (1, 3));
        assert_eq!(axis(7), (2, 8));
        assert_eq!(axis(26_440), (10_000, 30_000));
        assert_eq!(axis(100), (20, 100));
    }

    #[test]
    fn esc_escapes_markup() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
