//! The HTML renderer: one self-contained file with inline CSS and SVG charts.

use std::fmt::Write as _;

use super::{
    pct, percent, router_source_order, stamp, usd, Comparison, Percentiles, Report, Tally,
    LATENCY_BUCKETS_MS, STAGES,
};

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

/// The "Is the cascade worth it?" panel: the total saving, then a table per route.
fn counterfactual_html(report: &Report) -> String {
    let cf = &report.counterfactual;
    let mut html = String::from("<h2>Is the cascade worth it?</h2>");
    if !cf.priced {
        let _ = write!(
            html,
            "<p>No price for {} under <code>prices:</code>, so no estimate.</p>",
            esc(&report.final_model)
        );
        return html;
    }
    let t = &cf.total;
    let _ = write!(
        html,
        "<p class=\"big\" id=\"saving\">saving {} ({})</p>\
         <p>Both sides are tokens at the configured prices: the cascade's every stage at its \
         model's price; <code>grok_direct</code> each prompt in and each answer's length out at \
         {} prices. Reported spend of the compared rows: {}.</p>",
        esc(&usd(t.saving_ticks(), 6)),
        esc(&percent(t.saving_pct())),
        esc(&report.final_model),
        esc(&usd(t.reported_ticks, 6))
    );
    let row = |label: &str, c: &Comparison| {
        vec![
            label.to_string(),
            c.rows.to_string(),
            c.cache_hits.to_string(),
            usd(c.cascade_ticks, 6),
            usd(c.direct_ticks, 6),
            usd(c.saving_ticks(), 6),
            percent(c.saving_pct()),
        ]
    };
    let mut rows: Vec<Vec<String>> = report
        .routed_routes()
        .map(|r| row(r, &cf.by_route.get(r).copied().unwrap_or_default()))
        .collect();
    rows.push(row("total", t));
    html.push_str(&html_table(
        &[
            "route",
            "compared",
            "cache hits",
            "cascade",
            "grok_direct",
            "saving",
            "%",
        ]
        .map(String::from),
        &rows,
    ));
    for (n, what) in [
        (
            cf.without_stage_usage,
            "older rows without per-stage tokens",
        ),
        (
            cf.unpriced,
            "rows with a model not under <code>prices:</code>",
        ),
    ] {
        if n > 0 {
            let _ = write!(html, "<p>{n} {what} not compared.</p>");
        }
    }
    html
}

/// The daily ceiling's overshoot per day that had a ceiling, and the total.
fn overshoot_html(report: &Report) -> String {
    let mut html = String::from("<h2>Daily ceiling overshoot</h2>");
    if report.ceiling_days.is_empty() {
        html.push_str("<p>No day with a ceiling in this window.</p>");
        return html;
    }
    let mut rows: Vec<Vec<String>> = report
        .ceiling_days
        .iter()
        .map(|d| {
            vec![
                d.day.to_string(),
                usd(d.cap_ticks, 6),
                usd(d.settled_ticks, 6),
                usd(d.overshoot_ticks(), 6),
            ]
        })
        .collect();
    rows.push(vec![
        "total".into(),
        String::new(),
        String::new(),
        usd(report.overshoot_total_ticks(), 6),
    ]);
    let _ = write!(
        html,
        "<p id=\"overshoot\">overshoot {} in total: admission holds an estimate and \
         settlement adds the real cost, so a day can end above its ceiling.</p>",
        esc(&usd(report.overshoot_total_ticks(), 6))
    );
    html.push_str(&html_table(
        &["day", "ceiling", "settled", "overshoot"].map(String::from),
        &rows,
    ));
    html
}

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

    html.push_str(&counterfactual_html(report));
    html.push_str(&overshoot_html(report));

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
