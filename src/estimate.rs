//! `grok-appservice estimate`: the monthly cost to expect at a few message volumes for a route
//! mix, against sending everything to `grok_direct` (the final model alone). Pure arithmetic
//! over per-route costs of one message, which come from typical token counts priced at the
//! configured prices, or from `request_log` (the `stats` counterfactual) once a route has
//! enough answered rows.

use std::collections::BTreeMap;

use crate::cascade::{Route, Stage};
use crate::config::{Config, TICKS_PER_USD};
use crate::provider::{compute_cost_ticks, estimate_prompt_tokens, Price, Usage};
use crate::stats::Comparison;

/// Messages a day the table shows.
pub const VOLUMES: [i64; 3] = [100, 1_000, 10_000];
/// Days in the month of the table.
pub const DAYS_PER_MONTH: i64 = 30;
/// Answered rows of a route in `request_log` from which its averages replace the typical
/// token counts.
pub const MIN_OBSERVED_ROWS: u64 = 20;
/// Shares are in basis points (1/10,000), so the mix stays integer arithmetic.
const WHOLE: i64 = 10_000;
/// The routes a mix names, in display order.
pub const ROUTES: [Route; 4] = [
    Route::TrivialDirect,
    Route::GrokDirect,
    Route::WebThenGrok,
    Route::ReasonThenGrok,
];
/// The default mix, in basis points: mostly plain questions, some greetings, searches and
/// hard problems.
pub const DEFAULT_MIX: [(Route, i64); 4] = [
    (Route::TrivialDirect, 1_500),
    (Route::GrokDirect, 5_500),
    (Route::WebThenGrok, 1_500),
    (Route::ReasonThenGrok, 1_500),
];

/// Typical tokens of one stage beyond the system prompt: the user's text and context in,
/// the stage's answer out.
#[derive(Debug, Clone, Copy)]
struct TypicalStage {
    stage: Stage,
    /// Input tokens on top of the system prompt (message, context, search results, notes).
    input: i64,
    output: i64,
    reasoning: i64,
    /// Web searches; `None` means `cascade.web_max_turns` (each turn is one search).
    web_searches: Option<i64>,
}

/// Typical tokens of a message per route, and what `grok_direct` alone would have written:
/// assumptions, not measurements (short greetings, a few hundred tokens of question and
/// context, about 2,500 tokens of results a search, reasoning notes of about 400 tokens),
/// stated in the output and replaced by `request_log` averages once there are rows.
fn typical(route: Route) -> (Vec<TypicalStage>, i64, i64) {
    fn st(stage: Stage, input: i64, output: i64, reasoning: i64) -> TypicalStage {
        TypicalStage {
            stage,
            input,
            output,
            reasoning,
            web_searches: Some(0),
        }
    }
    // (stages, grok_direct input beyond the system prompt, grok_direct output)
    match route {
        Route::TrivialDirect => (vec![st(Stage::Trivial, 15, 25, 0)], 15, 25),
        Route::WebThenGrok => (
            vec![TypicalStage {
                stage: Stage::Web,
                input: 300 + 2 * 2_500,
                output: 450,
                reasoning: 0,
                web_searches: None,
            }],
            300,
            400,
        ),
        Route::ReasonThenGrok => (
            vec![
                st(Stage::Reason, 400, 1_800, 1_400),
                st(Stage::Final, 400 + 400, 450, 0),
            ],
            400,
            450,
        ),
        Route::GrokDirect | Route::None => (vec![st(Stage::Final, 300, 350, 0)], 300, 350),
    }
}

/// Where a route's per-message cost came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The typical token counts of [`typical`].
    Typical,
    /// Averages of this many answered `request_log` rows.
    Observed(u64),
}

/// The cost of one message of a route, and of the same message on `grok_direct`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteCost {
    pub cascade_ticks: i64,
    pub direct_ticks: i64,
    pub source: Source,
}

/// The model each stage runs on, from the config.
fn stage_model(config: &Config, stage: Stage) -> &str {
    let m = &config.models;
    match stage {
        Stage::Router => &m.router,
        Stage::Trivial => &m.trivial,
        Stage::Reason => &m.reason,
        Stage::Web | Stage::Final => &m.final_model,
    }
}

/// Why a cost cannot be estimated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EstimateError {
    #[error("model `{0}` has no price under `prices:`")]
    Unpriced(String),
    #[error("--mix: {0}")]
    Mix(String),
}

/// Per-route costs from the typical token counts at the configured prices.
pub fn typical_costs(config: &Config) -> Result<BTreeMap<Route, RouteCost>, EstimateError> {
    let price = |model: &str| -> Result<Price, EstimateError> {
        config
            .prices
            .get(model)
            .map(Price::from)
            .ok_or_else(|| EstimateError::Unpriced(model.to_string()))
    };
    let system = estimate_prompt_tokens(&config.bot.system_prompt);
    let final_price = price(&config.models.final_model)?;
    let mut out = BTreeMap::new();
    for route in ROUTES {
        let (stages, direct_in, direct_out) = typical(route);
        let mut cascade_ticks = 0;
        for s in &stages {
            let usage = Usage {
                input_tokens: system + s.input,
                output_tokens: s.output,
                reasoning_tokens: s.reasoning,
                web_search_calls: s
                    .web_searches
                    .unwrap_or(i64::from(config.cascade.web_max_turns)),
                ..Usage::default()
            };
            cascade_ticks += compute_cost_ticks(&usage, &price(stage_model(config, s.stage))?);
        }
        let direct = Usage {
            input_tokens: system + direct_in,
            output_tokens: direct_out,
            ..Usage::default()
        };
        out.insert(
            route,
            RouteCost {
                cascade_ticks,
                direct_ticks: compute_cost_ticks(&direct, &final_price),
                source: Source::Typical,
            },
        );
    }
    Ok(out)
}

/// Replaces typical costs by `request_log` averages (the `stats` counterfactual by route)
/// where a route has at least [`MIN_OBSERVED_ROWS`] compared rows.
pub fn with_observed(
    mut costs: BTreeMap<Route, RouteCost>,
    by_route: &BTreeMap<String, Comparison>,
) -> BTreeMap<Route, RouteCost> {
    for (token, c) in by_route {
        let Some(route) = Route::parse(token) else {
            continue;
        };
        if c.rows >= MIN_OBSERVED_ROWS && costs.contains_key(&route) {
            let rows = c.rows as i64;
            costs.insert(
                route,
                RouteCost {
                    cascade_ticks: c.cascade_ticks / rows,
                    direct_ticks: c.direct_ticks / rows,
                    source: Source::Observed(c.rows),
                },
            );
        }
    }
    costs
}

/// Parses `trivial=0.4,web=0.1,...` (route tokens or `trivial`, `direct`, `web`, `reason`).
/// Shares must not pass 1; when `grok_direct` is not named it takes what is left, otherwise
/// the shares must add up to 1.
pub fn parse_mix(text: &str) -> Result<Vec<(Route, i64)>, EstimateError> {
    let bad = |m: String| EstimateError::Mix(m);
    let mut mix: BTreeMap<Route, i64> = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, share) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("`{part}` is not ROUTE=SHARE")))?;
        let route = match name.trim() {
            "trivial" => Route::TrivialDirect,
            "direct" => Route::GrokDirect,
            "web" => Route::WebThenGrok,
            "reason" => Route::ReasonThenGrok,
            other => Route::parse(other)
                .filter(|r| ROUTES.contains(r))
                .ok_or_else(|| bad(format!("`{other}` is not a route")))?,
        };
        let share: f64 = share
            .trim()
            .parse()
            .ok()
            .filter(|s: &f64| (0.0..=1.0).contains(s))
            .ok_or_else(|| bad(format!("`{part}`: the share must be between 0 and 1")))?;
        mix.insert(route, (share * WHOLE as f64).round() as i64);
    }
    let total: i64 = mix.values().sum();
    if total > WHOLE {
        return Err(bad(format!(
            "the shares add up to {:.2}",
            total as f64 / 1e4
        )));
    }
    if total < WHOLE {
        if mix.contains_key(&Route::GrokDirect) {
            return Err(bad(format!(
                "the shares add up to {:.2}, not 1",
                total as f64 / 1e4
            )));
        }
        mix.insert(Route::GrokDirect, WHOLE - total);
    }
    Ok(ROUTES
        .iter()
        .map(|r| (*r, mix.get(r).copied().unwrap_or(0)))
        .collect())
}

/// One line of the volume table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Monthly {
    pub messages_per_day: i64,
    pub cascade_ticks: i64,
    pub direct_ticks: i64,
}

/// The whole estimate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    /// Route, share in basis points, its cost per message.
    pub routes: Vec<(Route, i64, RouteCost)>,
    pub months: Vec<Monthly>,
}

/// The monthly cost at each of [`VOLUMES`] for `mix` (basis points) over `costs`.
pub fn estimate(mix: &[(Route, i64)], costs: &BTreeMap<Route, RouteCost>) -> Estimate {
    let routes: Vec<(Route, i64, RouteCost)> = mix
        .iter()
        .filter_map(|(r, share)| costs.get(r).map(|c| (*r, *share, *c)))
        .collect();
    let month = |per_message: &dyn Fn(&RouteCost) -> i64, messages: i64| -> i64 {
        let weighted: i128 = routes
            .iter()
            .map(|(_, share, c)| i128::from(per_message(c)) * i128::from(*share))
            .sum();
        (weighted * i128::from(messages * DAYS_PER_MONTH) / i128::from(WHOLE)) as i64
    };
    let months = VOLUMES
        .iter()
        .map(|&n| Monthly {
            messages_per_day: n,
            cascade_ticks: month(&|c| c.cascade_ticks, n),
            direct_ticks: month(&|c| c.direct_ticks, n),
        })
        .collect();
    Estimate { routes, months }
}

/// Whole dollars with separators from $100, cents from $1, else five places (a message's cost).
fn usd(ticks: i64) -> String {
    let abs = ticks.abs();
    if abs >= 100 * TICKS_PER_USD {
        let sign = if ticks < 0 { "-" } else { "" };
        format!(
            "{sign}${}",
            grouped((abs + TICKS_PER_USD / 2) / TICKS_PER_USD)
        )
    } else if abs >= TICKS_PER_USD {
        crate::stats::usd(ticks, 2)
    } else {
        crate::stats::usd(ticks, 5)
    }
}

/// Thousands separators for the volume column.
fn grouped(n: i64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Whether a route saves money against `grok_direct`, in words.
fn verdict(c: &RouteCost) -> String {
    if c.direct_ticks == 0 {
        return "-".into();
    }
    let pct = (c.cascade_ticks - c.direct_ticks) as f64 * 100.0 / c.direct_ticks as f64;
    if pct.abs() < 0.5 {
        "same cost".into()
    } else if pct < 0.0 {
        format!("saves {:.0}%", -pct)
    } else {
        format!("costs {pct:.0}% more")
    }
}

/// The estimate as Markdown tables (they read as plain text too), with its assumptions.
pub fn render_text(e: &Estimate, models: &str) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Cost to expect per {DAYS_PER_MONTH}-day month at the configured prices ({models}).\n\n"
    ));
    out.push_str("| route | share | per message | same message on grok_direct | at today's prices | from |\n");
    out.push_str("| --- | ---: | ---: | ---: | --- | --- |\n");
    for (route, share, c) in &e.routes {
        let from = match c.source {
            Source::Typical => "typical tokens".to_string(),
            Source::Observed(n) => format!("request_log ({n} rows)"),
        };
        out.push_str(&format!(
            "| `{}` | {}% | {} | {} | {} | {from} |\n",
            route.as_str(),
            share / 100,
            usd(c.cascade_ticks),
            usd(c.direct_ticks),
            verdict(c)
        ));
    }
    out.push_str(
        "\n| messages a day | with the cascade | everything to grok_direct | difference |\n",
    );
    out.push_str("| ---: | ---: | ---: | ---: |\n");
    for m in &e.months {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            grouped(m.messages_per_day),
            usd(m.cascade_ticks),
            usd(m.direct_ticks),
            usd(m.cascade_ticks - m.direct_ticks)
        ));
    }
    out
}

/// Which models the estimate prices, for its heading.
pub fn models_line(config: &Config) -> String {
    let m = &config.models;
    format!(
        "final {}, trivial {}, reason {}",
        m.final_model, m.trivial, m.reason
    )
}

/// The assumptions behind the typical costs, for the output's footnote.
pub fn assumptions(config: &Config) -> String {
    format!(
        "Typical tokens per message beyond the system prompt (about {} tokens): trivial_direct \
         15 in / 25 out; grok_direct 300 in / 350 out; web_then_grok {} search(es) \
         (cascade.web_max_turns) adding about 2,500 tokens of results each, 450 out; \
         reason_then_grok 400 in / 1,800 out on {} (1,400 of them reasoning), then 800 in / \
         450 out on {}. grok_direct alone: the same question in, 25 / 350 / 400 / 450 out. No \
         prompt-cache discount, no cache hits, no escalations, classifier off. A route with at \
         least {MIN_OBSERVED_ROWS} answered request_log rows in the window uses their averages \
         instead.",
        estimate_prompt_tokens(&config.bot.system_prompt),
        config.cascade.web_max_turns,
        config.models.reason,
        config.models.final_model,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let mut c =
            Config::parse("homeserver: {url: 'http://127.0.0.1:8008', server_name: example.org}\n")
                .unwrap();
        c.validate().unwrap();
        c
    }

    #[test]
    fn mixes_parse_with_the_rest_going_to_grok_direct() {
        let mix = parse_mix("trivial=0.4, web=0.1,reason_then_grok=0.05").unwrap();
        assert_eq!(
            mix,
            [
                (Route::TrivialDirect, 4_000),
                (Route::GrokDirect, 4_500),
                (Route::WebThenGrok, 1_000),
                (Route::ReasonThenGrok, 500),
            ]
        );
        assert!(
            parse_mix("direct=0.5,web=0.2").is_err(),
            "named direct: must add to 1"
        );
        assert!(parse_mix("trivial=0.8,web=0.3").is_err());
        assert!(parse_mix("fast=0.3").is_err());
        assert!(
            parse_mix("none=0.3").is_err(),
            "only the four answering routes"
        );
        assert!(parse_mix("web=1.5").is_err());
        assert!(parse_mix("web").is_err());
    }

    #[test]
    fn typical_costs_at_the_default_prices() {
        let c = config();
        let costs = typical_costs(&c).unwrap();
        // Ticks per token at the default prices: grok-4.3 and grok-4.20-non-reasoning 12,500
        // in / 25,000 out; grok-4.5 20,000 in / 60,000 out; a search 5e7.
        let s = estimate_prompt_tokens(&c.bot.system_prompt);
        let at = |input: i64, output: i64| input * 12_500 + output * 25_000;
        let table = [
            (Route::TrivialDirect, at(s + 15, 25), at(s + 15, 25)),
            (Route::GrokDirect, at(s + 300, 350), at(s + 300, 350)),
            (
                Route::WebThenGrok,
                at(s + 5_300, 450) + 2 * 50_000_000,
                at(s + 300, 400),
            ),
            (
                Route::ReasonThenGrok,
                (s + 400) * 20_000 + 1_800 * 60_000 + at(s + 800, 450),
                at(s + 400, 450),
            ),
        ];
        for (route, cascade, direct) in table {
            let got = costs[&route];
            assert_eq!(
                (got.cascade_ticks, got.direct_ticks),
                (cascade, direct),
                "{route:?}"
            );
            assert_eq!(got.source, Source::Typical);
        }
        // At these prices the cheap model costs what the final one does; search and
        // reasoning cost more.
        assert_eq!(verdict(&costs[&Route::TrivialDirect]), "same cost");
        assert!(verdict(&costs[&Route::WebThenGrok]).starts_with("costs"));
        assert!(verdict(&costs[&Route::ReasonThenGrok]).starts_with("costs"));
    }

    #[test]
    fn the_monthly_table_is_the_mix_weighted_cost_times_volume() {
        let cost = |cascade, direct| RouteCost {
            cascade_ticks: cascade,
            direct_ticks: direct,
            source: Source::Typical,
        };
        let costs = BTreeMap::from([
            (Route::TrivialDirect, cost(1_000_000, 4_000_000)),
            (Route::GrokDirect, cost(10_000_000, 10_000_000)),
            (Route::WebThenGrok, cost(100_000_000, 12_000_000)),
            (Route::ReasonThenGrok, cost(60_000_000, 15_000_000)),
        ]);
        let mix = parse_mix("trivial=0.5,web=0.1,reason=0.1").unwrap();
        let e = estimate(&mix, &costs);
        // Per message: cascade 0.5*1e6 + 0.3*1e7 + 0.1*1e8 + 0.1*6e7 = 1.95e7 ticks;
        // grok_direct 0.5*4e6 + 0.3*1e7 + 0.1*1.2e7 + 0.1*1.5e7 = 7.7e6 ticks.
        let want = [
            (100, 19_500_000 * 3_000, 7_700_000 * 3_000),
            (1_000, 19_500_000 * 30_000, 7_700_000 * 30_000),
            (10_000, 19_500_000 * 300_000, 7_700_000 * 300_000),
        ];
        let got: Vec<(i64, i64, i64)> = e
            .months
            .iter()
            .map(|m| (m.messages_per_day, m.cascade_ticks, m.direct_ticks))
            .collect();
        assert_eq!(got, want);
        // 10,000 a day on the cascade: 5.85e12 ticks = $585.
        assert_eq!(usd(e.months[2].cascade_ticks), "$585");
        assert_eq!(usd(12_345 * TICKS_PER_USD), "$12,345");
        assert_eq!(usd(-250 * TICKS_PER_USD), "-$250");
        let text = render_text(&e, "test prices");
        assert!(
            text.contains("| `trivial_direct` | 50% | $0.00010 | $0.00040 | saves 75% |"),
            "{text}"
        );
        assert!(text.contains("| 10,000 | $585 | $231 | $354 |"), "{text}");
    }

    #[test]
    fn observed_averages_replace_typical_costs_with_enough_rows() {
        let typical = typical_costs(&config()).unwrap();
        let by_route = BTreeMap::from([
            (
                "grok_direct".to_string(),
                Comparison {
                    rows: 40,
                    cascade_ticks: 40 * 7_000_000,
                    direct_ticks: 40 * 7_000_000,
                    ..Comparison::default()
                },
            ),
            (
                "web_then_grok".to_string(),
                Comparison {
                    rows: MIN_OBSERVED_ROWS - 1,
                    cascade_ticks: 1,
                    direct_ticks: 1,
                    ..Comparison::default()
                },
            ),
        ]);
        let costs = with_observed(typical.clone(), &by_route);
        assert_eq!(costs[&Route::GrokDirect].cascade_ticks, 7_000_000);
        assert_eq!(costs[&Route::GrokDirect].source, Source::Observed(40));
        assert_eq!(costs[&Route::WebThenGrok], typical[&Route::WebThenGrok]);
    }
}
