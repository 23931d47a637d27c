//! The `stats` report over `request_log`: a pure aggregation of rows into a [`Report`]
//! ([`summarize`], in [`aggregate`]) and three renderers: an 80-column terminal table
//! ([`render_text`]), a stable JSON document ([`render_json`]) and one self-contained HTML file
//! with inline SVG charts ([`render_html`]). No I/O happens here, so every number is
//! table-testable.
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
//! - Counterfactual: per route, the cascade's stage tokens against what `grok_direct` alone
//!   would have sent and written (the row's direct estimate), both at configured prices; the
//!   reported spend is shown beside, never compared (see [`aggregate::compare_row`]).
//! - Overshoot: per UTC day with a ceiling, settled spend past the global counter's cap.

pub mod aggregate;
mod html;
mod json;
mod text;

use std::collections::BTreeMap;

use chrono::{NaiveDate, NaiveDateTime};

use crate::cascade::Stage;
use crate::config::Config;
use crate::provider::Price;

pub use aggregate::{anonymize_user, nearest_rank, summarize};
pub use html::render_html;
pub use json::render_json;
pub use text::render_text;

/// Version of the JSON shape; bumped only when a key changes meaning or disappears.
pub const JSON_VERSION: u64 = 2;
/// The route tokens (DESIGN section 5) in display order.
pub const ROUTES: [&str; 5] = [
    "none",
    "grok_direct",
    "trivial_direct",
    "web_then_grok",
    "reason_then_grok",
];
/// The cost stages, in the order the cascade runs them.
pub const STAGES: [&str; 5] = [
    Stage::Router.as_str(),
    Stage::Trivial.as_str(),
    Stage::Web.as_str(),
    Stage::Reason.as_str(),
    Stage::Final.as_str(),
];
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
    /// `models.final`: whose price the counterfactual's `grok_direct` side uses.
    pub final_model: String,
    /// The final model's price; `None` when the config has none (no counterfactual then).
    pub final_price: Option<Price>,
    /// Model id -> configured price: the counterfactual's cascade side prices each stage's
    /// tokens at the price of the model that ran it.
    pub prices: BTreeMap<String, Price>,
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
        let prices: BTreeMap<String, Price> = config
            .prices
            .iter()
            .map(|(model, p)| (model.clone(), Price::from(p)))
            .collect();
        Self {
            since,
            until,
            final_price: prices.get(&final_model).copied(),
            final_model,
            prices,
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

/// The cascade against `grok_direct` alone over a set of rows, both sides priced from tokens
/// at the configured prices (never from the reported spend, which is only shown beside).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Comparison {
    /// Rows compared.
    pub rows: u64,
    /// Of those, cache hits.
    pub cache_hits: u64,
    /// Their settled spend (`cost_total_ticks`, mostly xAI-reported): shown, not compared.
    pub reported_ticks: i64,
    /// Every stage's tokens at the price of the model that ran the stage.
    pub cascade_ticks: i64,
    /// The `grok_direct` estimate (prompt in, answer out) at the final model's price.
    pub direct_ticks: i64,
}

impl Comparison {
    /// `direct - cascade`: positive when the cascade saved money.
    pub fn saving_ticks(&self) -> i64 {
        self.direct_ticks - self.cascade_ticks
    }

    /// The saving as a percentage of the `grok_direct` side; `None` when that is zero.
    pub fn saving_pct(&self) -> Option<f64> {
        (self.direct_ticks > 0)
            .then(|| self.saving_ticks() as f64 * 100.0 / self.direct_ticks as f64)
    }

    /// Adds one row's figures.
    pub fn add(&mut self, other: &Comparison) {
        self.rows += other.rows;
        self.cache_hits += other.cache_hits;
        self.reported_ticks += other.reported_ticks;
        self.cascade_ticks += other.cascade_ticks;
        self.direct_ticks += other.direct_ticks;
    }
}

/// Is the cascade worth it: answered rows compared with `grok_direct` alone, per route.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counterfactual {
    /// Whether the final model has a price (without one nothing is compared).
    pub priced: bool,
    /// Answered rows (routed and `ok`).
    pub answered: u64,
    /// Of those, cache hits.
    pub cache_hits: u64,
    /// Settled spend of all answered rows.
    pub actual_ticks: i64,
    /// Answered rows left out: written before per-stage tokens were recorded.
    pub without_stage_usage: u64,
    /// Answered rows left out: a stage's model has no price under `prices:`.
    pub unpriced: u64,
    /// Routed route -> its compared rows; every routed route of [`Report::routes`] present.
    pub by_route: BTreeMap<String, Comparison>,
    /// All compared rows.
    pub total: Comparison,
}

/// One UTC day's global budget counter, when it had a ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CeilingDay {
    /// The UTC date.
    pub day: NaiveDate,
    /// The day's ceiling (`daily_ceiling_usd` when the counter was made).
    pub cap_ticks: i64,
    /// Spend settled against it.
    pub settled_ticks: i64,
}

impl CeilingDay {
    /// How far settlement went past the cap: admission holds an estimate, settlement adds the
    /// real cost, so a day can end above its ceiling.
    pub fn overshoot_ticks(&self) -> i64 {
        (self.settled_ticks - self.cap_ticks).max(0)
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
    /// The cascade against `grok_direct` alone.
    pub counterfactual: Counterfactual,
    /// Days of the window whose global counter had a ceiling (cap > 0), oldest first.
    pub ceiling_days: Vec<CeilingDay>,
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
    /// The overshoot of the daily ceiling summed over the window.
    pub fn overshoot_total_ticks(&self) -> i64 {
        self.ceiling_days
            .iter()
            .map(CeilingDay::overshoot_ticks)
            .sum()
    }

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

/// A fraction as a percentage with one place, `-` when undefined.
fn pct(rate: Option<f64>) -> String {
    percent(rate.map(|r| r * 100.0))
}

/// A percentage with one place, `-` when undefined.
fn percent(p: Option<f64>) -> String {
    p.map(|p| format!("{p:.1}%")).unwrap_or_else(|| "-".into())
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
}
