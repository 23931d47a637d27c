//! The terminal renderer: an 80-column table.

use std::fmt::Write as _;

use super::{
    pct, percent, router_source_order, stamp, usd, Comparison, Percentiles, Report, Tally, ROUTES,
    STAGES,
};

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
        overshoot_text(report, &mut out);
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

    counterfactual_text(report, &mut out);
    overshoot_text(report, &mut out);

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

/// "Is the cascade worth it?": per route and in total, both sides from tokens at configured
/// prices, with the reported spend and the rows left out below.
fn counterfactual_text(report: &Report, out: &mut String) {
    let cf = &report.counterfactual;
    out.push_str("\nIs the cascade worth it? (both sides: tokens at configured prices)\n");
    if !cf.priced {
        let _ = writeln!(
            out,
            "  n/a: no price for {} under prices: ({} answered)",
            fit(&report.final_model, 30),
            cf.answered
        );
        return;
    }
    let _ = writeln!(
        out,
        "{:<16} {:>8} {:>11}  {:>11}  {:>11} {:>8}",
        "route", "compared", "cascade", "grok_direct", "saving", "%"
    );
    let line = |label: &str, c: &Comparison| {
        format!(
            "{:<16} {:>8} {:>11}  {:>11}  {:>11} {:>8}",
            fit(label, 16),
            c.rows,
            usd_fit(c.cascade_ticks, 11),
            usd_fit(c.direct_ticks, 11),
            usd_fit(c.saving_ticks(), 11),
            percent(c.saving_pct())
        )
    };
    for route in report.routed_routes() {
        let c = cf.by_route.get(route).copied().unwrap_or_default();
        let _ = writeln!(out, "{}", line(route, &c));
    }
    let _ = writeln!(out, "{}", line("total", &cf.total));
    let _ = writeln!(
        out,
        "  grok_direct = each prompt in, each answer's length out, {} prices",
        fit(&report.final_model, 16)
    );
    let _ = writeln!(
        out,
        "  {} answered ({} cache hits); reported spend of the compared rows {}",
        cf.answered,
        cf.cache_hits,
        usd_fit(cf.total.reported_ticks, 10)
    );
    if cf.without_stage_usage > 0 {
        let _ = writeln!(
            out,
            "  not compared: {} older rows without per-stage tokens",
            cf.without_stage_usage
        );
    }
    if cf.unpriced > 0 {
        let _ = writeln!(
            out,
            "  not compared: {} rows with a model not under prices:",
            cf.unpriced
        );
    }
}

/// The daily ceiling's overshoot per day that had a ceiling, and the total.
fn overshoot_text(report: &Report, out: &mut String) {
    if report.ceiling_days.is_empty() {
        out.push_str("\nDaily ceiling overshoot: no day with a ceiling in this window\n");
        return;
    }
    out.push_str("\nDaily ceiling overshoot (spend settled past the day's ceiling)\n");
    let _ = writeln!(
        out,
        "{:<10} {:>12} {:>12} {:>12}",
        "day", "ceiling", "settled", "overshoot"
    );
    for d in &report.ceiling_days {
        let _ = writeln!(
            out,
            "{:<10} {:>12} {:>12} {:>12}",
            d.day.to_string(),
            usd_fit(d.cap_ticks, 12),
            usd_fit(d.settled_ticks, 12),
            usd_fit(d.overshoot_ticks(), 12)
        );
    }
    let _ = writeln!(
        out,
        "{:<10} {:>12} {:>12} {:>12}",
        "total",
        "",
        "",
        usd_fit(report.overshoot_total_ticks(), 12)
    );
}

/// USD with 6 places, or fewer (down to 2) when that is wider than `width`.
fn usd_fit(ticks: i64, width: usize) -> String {
    (2..=6)
        .rev()
        .map(|d| usd(ticks, d))
        .find(|s| s.len() <= width)
        .unwrap_or_else(|| usd(ticks, 2))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TICKS_PER_USD;

    #[test]
    fn usd_fit_drops_places_to_fit() {
        assert_eq!(usd_fit(1_234 * TICKS_PER_USD, 10), "$1234.0000");
        assert_eq!(usd_fit(12 * TICKS_PER_USD, 10), "$12.000000");
    }
}
