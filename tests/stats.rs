//! `grok-appservice stats` against a seeded `request_log` with hand-computed answers, on
//! SQLite and (with `TEST_DATABASE_URL`) PostgreSQL; the renderers' contracts (80 columns,
//! stable JSON keys, a self-contained HTML file); and a real headless Chromium that opens the
//! HTML report and lays its charts out.
//!
//! The seed: 15 rows on 2026-11-20 and 2026-11-21 (every route on both days, cache hits, an
//! escalation, a fallback, a ceiling hit, a per-user cap hit, degrade reasons) plus one row on
//! 2026-11-19 that the window must leave out. Prices are grok-4.3's defaults: 12 500 ticks per
//! input token, 2 000 per cached input token, 25 000 per output token.

#[path = "common/db.rs"]
mod db;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{NaiveDate, NaiveDateTime};
use serde_json::{json, Value};

use grok_appservice::config::Config;
use grok_appservice::provider::Price;
use grok_appservice::stats::{
    self, nearest_rank, render_html, render_json, render_text, summarize, Comparison, Options,
    Percentiles, Rate, Report, Spender,
};
use grok_appservice::store::budget::{Counter, GLOBAL_SCOPE};
use grok_appservice::store::{RequestLogRow, Store, StoreError};

const ALPHA: &str = "!alpha:example.org";
const BRAVO: &str = "!bravo:example.org";
const CHARLIE: &str = "!charlie:example.org";
const DELTA: &str = "!delta:example.org";
const ALICE: &str = "@alice:example.org";
const BOB: &str = "@bob:example.org";
const CAROL: &str = "@carol:example.org";
const DAVE: &str = "@dave:example.org";
const ERIN: &str = "@erin:example.org";
const FRANK: &str = "@frank:example.org";

fn at(day: u32, hour: u32, minute: u32) -> NaiveDateTime {
    NaiveDate::from_ymd_opt(2026, 11, day)
        .unwrap()
        .and_hms_opt(hour, minute, 0)
        .unwrap()
}

fn day(d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 11, d).unwrap()
}

/// A row with the defaults the bot writes; callers set what the scenario needs.
fn row(
    id: &str,
    created_at: NaiveDateTime,
    room: &str,
    sender: &str,
    route: &str,
    source: &str,
) -> RequestLogRow {
    RequestLogRow {
        id: id.into(),
        room_id: room.into(),
        sender: sender.into(),
        route: route.into(),
        router_source: source.into(),
        router_confidence: 0.9,
        models: "{}".into(),
        stage_ms: "{}".into(),
        ok: route != "none",
        created_at,
        ..RequestLogRow::default()
    }
}

/// Tokens, per-stage costs (router, trivial, web, reason, final), latency and stage timings.
fn spend(
    mut r: RequestLogRow,
    tokens: (i64, i64, i64),
    stages: [i64; 5],
    latency_ms: i64,
    stage_ms: Value,
) -> RequestLogRow {
    (r.prompt_tokens, r.cached_tokens, r.completion_tokens) = tokens;
    [
        r.cost_router_ticks,
        r.cost_trivial_ticks,
        r.cost_web_ticks,
        r.cost_reason_ticks,
        r.cost_final_ticks,
    ] = stages;
    r.cost_total_ticks = stages.iter().sum();
    r.latency_ms = latency_ms;
    r.stage_ms = stage_ms.to_string();
    r.cost_source = "reported".into();
    r
}

/// One stage as the bot records it: `(stage, model, [input, cached, output, reasoning,
/// web_search_calls])`.
type StageTokens<'a> = (&'a str, &'a str, [i64; 5]);

/// A row with per-stage tokens and the `grok_direct` estimate `(input, output)`.
fn tokens(mut r: RequestLogRow, stages: &[StageTokens], direct: (i64, i64)) -> RequestLogRow {
    let mut models = serde_json::Map::new();
    let mut usage = serde_json::Map::new();
    for (stage, model, [input, cached, output, reasoning, web]) in stages {
        models.insert(stage.to_string(), json!(model));
        usage.insert(
            stage.to_string(),
            json!({"input": input, "cached": cached, "output": output,
                   "reasoning": reasoning, "web_search_calls": web}),
        );
    }
    r.models = Value::Object(models).to_string();
    r.stage_usage = Value::Object(usage).to_string();
    (r.direct_input_tokens, r.direct_output_tokens) = direct;
    r
}

const FINAL: &str = "grok-4.3";
const CHEAP: &str = "grok-4.20-non-reasoning";
const REASON: &str = "grok-4.5";

/// The seeded rows, the out-of-window one (`e0`) first.
fn seed() -> Vec<RequestLogRow> {
    let mut rows = Vec::new();
    rows.push(spend(
        row(
            "$e0",
            at(19, 23, 59),
            ALPHA,
            ALICE,
            "grok_direct",
            "heuristic",
        ),
        (100_000, 0, 100_000),
        [0, 0, 0, 0, 9_999_999_999],
        60_000,
        json!({"final": 60_000}),
    ));
    // Day 1.
    let e1 = spend(
        row(
            "$e1",
            at(20, 9, 0),
            ALPHA,
            ALICE,
            "grok_direct",
            "heuristic",
        ),
        (1_000, 200, 400),
        [0, 0, 0, 0, 20_000_000],
        2_000,
        json!({"final": 1_900}),
    );
    rows.push(e1);
    rows.push(spend(
        row(
            "$e2",
            at(20, 9, 7),
            ALPHA,
            BOB,
            "trivial_direct",
            "heuristic",
        ),
        (300, 0, 40),
        [0, 800_000, 0, 0, 0],
        500,
        json!({"trivial": 450}),
    ));
    rows.push(spend(
        row(
            "$e3",
            at(20, 9, 14),
            BRAVO,
            ALICE,
            "web_then_grok",
            "heuristic",
        ),
        (6_000, 0, 500),
        [0, 0, 60_000_000, 0, 25_000_000],
        4_000,
        json!({"web": 2_500, "final": 1_400}),
    ));
    let mut e4 = spend(
        row(
            "$e4",
            at(20, 9, 21),
            BRAVO,
            CAROL,
            "reason_then_grok",
            "classifier",
        ),
        (2_000, 1_000, 3_000),
        [500_000, 0, 0, 70_000_000, 15_000_000],
        9_000,
        json!({"router": 300, "reason": 6_500, "final": 2_100}),
    );
    e4.reasoning_tokens = 2_500;
    rows.push(e4);
    let mut e5 = row("$e5", at(20, 9, 28), ALPHA, BOB, "none", "default");
    e5.degraded = "media".into();
    rows.push(e5);
    let mut e6 = row(
        "$e6",
        at(20, 9, 35),
        ALPHA,
        ALICE,
        "grok_direct",
        "heuristic",
    );
    e6.cache_hit = true;
    e6.latency_ms = 100;
    rows.push(e6);
    let mut e7 = spend(
        row(
            "$e7",
            at(20, 9, 42),
            CHARLIE,
            DAVE,
            "trivial_direct",
            "heuristic",
        ),
        (800, 0, 350),
        [0, 700_000, 0, 0, 12_000_000],
        2_500,
        json!({"trivial": 400, "final": 2_000}),
    );
    e7.escalated = true;
    rows.push(e7);
    // Day 2.
    let mut e8 = spend(
        row("$e8", at(21, 10, 0), ALPHA, ALICE, "grok_direct", "default"),
        (1_500, 500, 600),
        [0, 0, 0, 0, 30_000_000],
        3_000,
        json!({"final": 2_900}),
    );
    e8.fallback_fired = true;
    rows.push(e8);
    let mut e9 = spend(
        row(
            "$e9",
            at(21, 10, 7),
            CHARLIE,
            DAVE,
            "web_then_grok",
            "degraded",
        ),
        (1_200, 400, 300),
        [0, 0, 0, 0, 14_000_000],
        1_500,
        json!({"web": 800, "final": 650}),
    );
    e9.degraded = "web_failed".into();
    rows.push(e9);
    let mut e10 = row("$e10", at(21, 10, 14), BRAVO, ERIN, "none", "default");
    e10.ceiling_hit = true;
    rows.push(e10);
    let mut e11 = row("$e11", at(21, 10, 21), ALPHA, BOB, "none", "default");
    e11.per_user_cap_hit = true;
    rows.push(e11);
    let mut e12 = spend(
        row(
            "$e12",
            at(21, 10, 28),
            ALPHA,
            ALICE,
            "grok_direct",
            "forced",
        ),
        (900, 0, 0),
        [0, 0, 0, 0, 11_250_000],
        1_200,
        json!({"final": 1_150}),
    );
    e12.ok = false;
    e12.degraded = "empty_completion".into();
    rows.push(e12);
    let mut e13 = spend(
        row(
            "$e13",
            at(21, 10, 35),
            CHARLIE,
            CAROL,
            "reason_then_grok",
            "classifier",
        ),
        (200, 0, 10),
        [300_000, 0, 0, 0, 0],
        350,
        json!({"router": 300}),
    );
    e13.cache_hit = true;
    rows.push(e13);
    rows.push(spend(
        row(
            "$e14",
            at(21, 10, 42),
            BRAVO,
            BOB,
            "trivial_direct",
            "forced",
        ),
        (250, 0, 30),
        [0, 600_000, 0, 0, 0],
        400,
        json!({"trivial": 380}),
    ));
    let mut e15 = row("$e15", at(21, 10, 49), DELTA, FRANK, "none", "default");
    e15.degraded = "media".into();
    rows.push(e15);

    // What the bot recorded per stage for the answered rows (the counterfactual's inputs,
    // priced in `assert_known_answer`). e9 is a row from before per-stage tokens existed
    // (the migration's defaults); e14's trivial model has no price.
    let recorded: Vec<(&str, Vec<StageTokens>, (i64, i64))> = vec![
        (
            "$e1",
            vec![("final", FINAL, [1_000, 200, 400, 0, 0])],
            (1_000, 400),
        ),
        (
            "$e2",
            vec![("trivial", CHEAP, [300, 0, 40, 0, 0])],
            (250, 40),
        ),
        (
            "$e3",
            vec![("web", FINAL, [6_000, 1_000, 500, 0, 1])],
            (400, 500),
        ),
        (
            "$e4",
            vec![
                ("router", CHEAP, [200, 0, 10, 0, 0]),
                ("reason", REASON, [1_000, 0, 3_000, 2_500, 0]),
                ("final", FINAL, [1_500, 500, 400, 0, 0]),
            ],
            (300, 400),
        ),
        ("$e6", vec![], (600, 200)),
        (
            "$e7",
            vec![
                ("trivial", CHEAP, [400, 0, 50, 0, 0]),
                ("final", FINAL, [400, 100, 350, 0, 0]),
            ],
            (250, 350),
        ),
        (
            "$e8",
            vec![("final", FINAL, [1_500, 500, 600, 0, 0])],
            (1_500, 600),
        ),
        (
            "$e13",
            vec![("router", CHEAP, [200, 0, 10, 0, 0])],
            (300, 100),
        ),
        (
            "$e14",
            vec![("trivial", "grok-unpriced", [250, 0, 30, 0, 0])],
            (200, 30),
        ),
    ];
    for (id, stages, direct) in recorded {
        if let Some(i) = rows.iter().position(|r| r.id == id) {
            rows[i] = tokens(rows[i].clone(), &stages, direct);
        }
    }
    if let Some(e9) = rows.iter_mut().find(|r| r.id == "$e9") {
        e9.stage_usage = "{}".into();
        (e9.direct_input_tokens, e9.direct_output_tokens) = (-1, -1);
    }
    rows
}

fn config() -> Config {
    let mut c = Config::parse(
        "homeserver: {url: 'http://127.0.0.1:8008', server_name: example.org}\n\
         models: {final: grok-4.3}\n",
    )
    .unwrap();
    c.validate().unwrap();
    c
}

fn options(since: NaiveDateTime) -> Options {
    Options::from_config(&config(), since, at(22, 0, 0), false)
}

/// A migrated store on `db` holding the seed, written newest first so the read has to sort.
async fn seeded(db: &db::TestDb) -> Store {
    let store = Store::connect(&db.url, 2)
        .unwrap_or_else(|e| panic!("[{}] connect {}: {e}", db.label, db.url));
    store
        .migrate()
        .await
        .unwrap_or_else(|e| panic!("[{}] migrate: {e}", db.label));
    for r in seed().into_iter().rev() {
        store
            .upsert_request_log(r)
            .await
            .unwrap_or_else(|e| panic!("[{}] seed: {e}", db.label));
    }
    store
}

fn by_route(pairs: &[(&str, i64)]) -> Vec<(String, i64)> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn spender(id: &str, requests: u64, cost_ticks: i64) -> Spender {
    Spender {
        id: id.into(),
        requests,
        cost_ticks,
    }
}

fn pct(n: u64, p50: i64, p95: i64, p99: i64, max: i64) -> Option<Percentiles> {
    Some(Percentiles {
        n,
        p50,
        p95,
        p99,
        max,
    })
}

/// Every number of the seeded window, computed by hand (see the comments).
fn assert_known_answer(r: &Report, label: &str) {
    let ctx = |what: &str| format!("[{label}] {what}");
    assert_eq!(r.days.len(), 2, "{}", ctx("days"));
    assert_eq!(r.days[0].day, day(20));
    assert_eq!(r.days[1].day, day(21));
    assert_eq!(
        r.routes,
        stats::ROUTES.map(String::from).to_vec(),
        "{}",
        ctx("routes")
    );

    // Requests per day by route.
    let counts = |t: &stats::Tally| -> Vec<(String, i64)> {
        t.requests
            .iter()
            .map(|(k, v)| (k.clone(), *v as i64))
            .collect()
    };
    let day1 = by_route(&[
        ("grok_direct", 2), // e1, e6
        ("none", 1),        // e5
        ("reason_then_grok", 1),
        ("trivial_direct", 2), // e2, e7
        ("web_then_grok", 1),
    ]);
    let day2 = by_route(&[
        ("grok_direct", 2), // e8, e12
        ("none", 3),        // e10, e11, e15
        ("reason_then_grok", 1),
        ("trivial_direct", 1),
        ("web_then_grok", 1),
    ]);
    assert_eq!(counts(&r.days[0].tally), day1, "{}", ctx("day 1 requests"));
    assert_eq!(counts(&r.days[1].tally), day2, "{}", ctx("day 2 requests"));
    assert_eq!(r.days[0].tally.requests_total(), 7);
    assert_eq!(r.days[1].tally.requests_total(), 8);
    assert_eq!(r.total.requests_total(), 15);

    // Spend per day by route: day 1 = 20M + 0.8M+12.7M + 85M + 85.5M.
    let costs = |m: &std::collections::BTreeMap<String, i64>| -> Vec<(String, i64)> {
        m.iter().map(|(k, v)| (k.clone(), *v)).collect()
    };
    let day1 = by_route(&[
        ("grok_direct", 20_000_000),
        ("none", 0),
        ("reason_then_grok", 85_500_000),
        ("trivial_direct", 13_500_000),
        ("web_then_grok", 85_000_000),
    ]);
    let day2 = by_route(&[
        ("grok_direct", 41_250_000),
        ("none", 0),
        ("reason_then_grok", 300_000),
        ("trivial_direct", 600_000),
        ("web_then_grok", 14_000_000),
    ]);
    assert_eq!(
        costs(&r.days[0].tally.cost_by_route),
        day1,
        "{}",
        ctx("day 1 $")
    );
    assert_eq!(
        costs(&r.days[1].tally.cost_by_route),
        day2,
        "{}",
        ctx("day 2 $")
    );
    assert_eq!(r.days[0].tally.cost_total(), 204_000_000);
    assert_eq!(r.days[1].tally.cost_total(), 56_150_000);
    assert_eq!(r.total.cost_total(), 260_150_000);

    // Spend per day by stage.
    let day1 = by_route(&[
        ("final", 72_000_000),
        ("reason", 70_000_000),
        ("router", 500_000),
        ("trivial", 1_500_000),
        ("web", 60_000_000),
    ]);
    let day2 = by_route(&[
        ("final", 55_250_000),
        ("reason", 0),
        ("router", 300_000),
        ("trivial", 600_000),
        ("web", 0),
    ]);
    assert_eq!(
        costs(&r.days[0].tally.cost_by_stage),
        day1,
        "{}",
        ctx("day 1 stages")
    );
    assert_eq!(
        costs(&r.days[1].tally.cost_by_stage),
        day2,
        "{}",
        ctx("day 2 stages")
    );

    // Counterfactual, both sides tokens at the default prices (per token: grok-4.3 and
    // grok-4.20-non-reasoning 12 500 in, 2 000 cached, 25 000 out; grok-4.5 20 000, 3 000,
    // 60 000; 50M a web search). The grok_direct side's cached input is the answering
    // stage's, up to the direct input.
    // grok_direct: e1 20.4M vs 20.4M; e8 28.5M vs 28.5M; e6 (cache hit) 0 vs 600 in + 200 out
    //   = 12.5M.
    // trivial_direct: e2 4.75M vs 250 in + 40 out = 4.125M; e7 trivial 6.25M + final 12.7M
    //   vs 150 in + 100 cached + 350 out = 10.825M. (e14: unpriced.)
    // web_then_grok: e3 5 000 in + 1 000 cached + 500 out + 1 search = 127M vs 400 cached +
    //   500 out = 13.3M. (e9: no per-stage tokens.)
    // reason_then_grok: e4 router 2.75M + reason 200M + final 23.5M vs 300 cached + 400 out
    //   = 10.6M; e13 (cache hit) router 2.75M vs 300 in + 100 out = 6.25M.
    let cf = &r.counterfactual;
    assert!(cf.priced);
    assert_eq!(cf.answered, 10, "{}", ctx("answered"));
    assert_eq!(cf.cache_hits, 2);
    assert_eq!(cf.actual_ticks, 248_900_000, "{}", ctx("actual")); // all spend but e12's
    assert_eq!(cf.without_stage_usage, 1, "{}", ctx("e9"));
    assert_eq!(cf.unpriced, 1, "{}", ctx("e14"));
    let cmp = |rows, cache_hits, reported_ticks, cascade_ticks, direct_ticks| Comparison {
        rows,
        cache_hits,
        reported_ticks,
        cascade_ticks,
        direct_ticks,
    };
    let expected = [
        ("grok_direct", cmp(3, 1, 50_000_000, 48_900_000, 61_400_000)),
        (
            "reason_then_grok",
            cmp(2, 1, 85_800_000, 229_000_000, 16_850_000),
        ),
        (
            "trivial_direct",
            cmp(2, 0, 13_500_000, 23_700_000, 14_950_000),
        ),
        (
            "web_then_grok",
            cmp(1, 0, 85_000_000, 127_000_000, 13_300_000),
        ),
    ];
    let compared: Vec<(&str, Comparison)> =
        cf.by_route.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(compared, expected, "{}", ctx("counterfactual by route"));
    assert_eq!(
        cf.total,
        cmp(8, 2, 234_300_000, 428_600_000, 106_500_000),
        "{}",
        ctx("counterfactual total")
    );
    assert_eq!(cf.by_route["grok_direct"].saving_ticks(), 12_500_000);
    assert_eq!(cf.total.saving_ticks(), -322_100_000);
    for (route, pct) in [
        ("grok_direct", 20.358_306),
        ("trivial_direct", -58.528_428),
        ("web_then_grok", -854.887_218),
        ("reason_then_grok", -1_259.050_445),
    ] {
        let got = cf.by_route[route].saving_pct().unwrap();
        assert!((got - pct).abs() < 1e-5, "{}: {got}", ctx(route));
    }
    let saving = cf.total.saving_pct().unwrap();
    assert!(
        (saving - -302.441_314).abs() < 1e-5,
        "{}: {saving}",
        ctx("saving %")
    );

    // Latency, nearest rank.
    let lat = &r.latency_by_route;
    assert_eq!(lat["grok_direct"], pct(4, 1_200, 3_000, 3_000, 3_000)); // 100 1200 2000 3000
    assert_eq!(lat["trivial_direct"], pct(3, 500, 2_500, 2_500, 2_500)); // 400 500 2500
    assert_eq!(lat["web_then_grok"], pct(2, 1_500, 4_000, 4_000, 4_000));
    assert_eq!(lat["reason_then_grok"], pct(2, 350, 9_000, 9_000, 9_000));
    assert!(!lat.contains_key("none"));
    let stage = &r.latency_by_stage;
    assert_eq!(stage["router"], pct(2, 300, 300, 300, 300));
    assert_eq!(stage["trivial"], pct(3, 400, 450, 450, 450));
    assert_eq!(stage["web"], pct(2, 800, 2_500, 2_500, 2_500));
    assert_eq!(stage["reason"], pct(1, 6_500, 6_500, 6_500, 6_500));
    // 650 1150 1400 1900 2000 2100 2900: rank 4 and rank 7.
    assert_eq!(stage["final"], pct(7, 1_900, 2_900, 2_900, 2_900));
    let hist: Vec<u64> = r
        .latency_histogram
        .iter()
        .map(|b| b.by_route.values().sum())
        .collect();
    // <250: e6; <500: e13 e14; <1s: e2; <2s: e9 e12; <4s: e1 e7 e8; <8s: e3; <16s: e4.
    assert_eq!(
        hist,
        vec![1, 2, 1, 2, 3, 1, 1, 0, 0],
        "{}",
        ctx("histogram")
    );

    // Rates: 11 routed rows, 15 rows in all.
    let rate = |count, of| Rate { count, of };
    assert_eq!(r.rates.escalated, rate(1, 11));
    assert_eq!(r.rates.fallback_fired, rate(1, 11));
    assert_eq!(r.rates.cache_hit, rate(2, 11));
    assert_eq!(r.rates.ceiling_hit, rate(1, 15));
    assert_eq!(r.rates.per_user_cap_hit, rate(1, 15));

    let sources: Vec<(String, i64)> = r
        .router_sources
        .iter()
        .map(|(k, v)| (k.clone(), *v as i64))
        .collect();
    assert_eq!(
        sources,
        by_route(&[
            ("classifier", 2),
            ("default", 5),
            ("degraded", 1),
            ("forced", 2),
            ("heuristic", 5),
        ])
    );

    let degraded: Vec<(&str, u64)> = r.degraded.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(
        degraded,
        vec![("media", 2), ("empty_completion", 1), ("web_failed", 1)]
    );

    assert_eq!(
        r.top_rooms,
        vec![
            spender(BRAVO, 4, 171_100_000),
            spender(ALPHA, 7, 62_050_000),
            spender(CHARLIE, 3, 27_000_000),
            spender(DELTA, 1, 0),
        ],
        "{}",
        ctx("top rooms")
    );
    assert_eq!(
        r.top_users,
        vec![
            spender(ALICE, 5, 146_250_000),
            spender(CAROL, 2, 85_800_000),
            spender(DAVE, 2, 26_700_000),
            spender(BOB, 4, 1_400_000),
            spender(ERIN, 1, 0), // a tie at zero: by id
            spender(FRANK, 1, 0),
        ],
        "{}",
        ctx("top users")
    );
}

#[tokio::test]
async fn seeded_request_log_gives_the_known_answer_on_every_backend() {
    for db in db::all() {
        let store = seeded(&db).await;
        let rows = store.request_log_since(at(20, 0, 0)).await.unwrap();
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let expected: Vec<String> = (1..=15).map(|i| format!("$e{i}")).collect();
        assert_eq!(ids, expected, "[{}] rows in created_at order", db.label);
        // The rows survive the round trip through the database unchanged.
        assert_eq!(rows, seed()[1..].to_vec(), "[{}] round trip", db.label);
        assert_known_answer(&summarize(&rows, &[], &options(at(20, 0, 0))), db.label);
    }
}

#[tokio::test]
async fn since_filters_in_the_store_and_in_the_summary() {
    for db in db::all() {
        let store = seeded(&db).await;
        assert_eq!(
            store.request_log_since(at(19, 0, 0)).await.unwrap().len(),
            16,
            "[{}] everything",
            db.label
        );
        // The boundary is inclusive: a row created exactly at `since` counts.
        let rows = store.request_log_since(at(21, 10, 0)).await.unwrap();
        assert_eq!(rows.len(), 8, "[{}] day 2 only", db.label);
        assert_eq!(rows[0].id, "$e8");
        assert!(store
            .request_log_since(at(23, 0, 0))
            .await
            .unwrap()
            .is_empty());

        let report = summarize(&rows, &[], &options(at(21, 0, 0)));
        assert_eq!(report.days.len(), 1);
        assert_eq!(report.days[0].day, day(21));
        assert_eq!(report.total.requests_total(), 8);
        assert_eq!(report.total.cost_total(), 56_150_000);
        // The summary applies the window too, so a wider read gives the same report.
        let wide = store.request_log_since(at(19, 0, 0)).await.unwrap();
        assert_eq!(summarize(&wide, &[], &options(at(21, 0, 0))), report);
    }
    // And the old row really is left out of the full window.
    let report = summarize(&seed(), &[], &options(at(20, 0, 0)));
    assert_eq!(report.total.requests_total(), 15);
    assert_known_answer(&report, "pure");
}

#[test]
fn nearest_rank_percentiles() {
    assert_eq!(nearest_rank(&[], 50), None);
    assert_eq!(nearest_rank(&[7], 1), Some(7));
    assert_eq!(nearest_rank(&[7], 99), Some(7));
    let hundred: Vec<i64> = (1..=100).collect();
    for p in [1, 50, 95, 99, 100] {
        assert_eq!(nearest_rank(&hundred, p), Some(p as i64), "p{p} of 1..=100");
    }
    let twenty_one: Vec<i64> = (1..=21).collect();
    // ranks ceil(10.5) = 11, ceil(19.95) = 20, ceil(20.79) = 21
    assert_eq!(nearest_rank(&twenty_one, 50), Some(11));
    assert_eq!(nearest_rank(&twenty_one, 95), Some(20));
    assert_eq!(nearest_rank(&twenty_one, 99), Some(21));
    assert_eq!(nearest_rank(&[10, 20, 30, 40], 50), Some(20));
}

#[test]
fn anonymize_hashes_user_ids_and_nothing_else() {
    let mut opts = options(at(20, 0, 0));
    opts.anonymize = true;
    opts.top = 3;
    let report = summarize(&seed(), &[], &opts);
    let hash = |u: &str| {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(u.as_bytes())[..12])
    };
    assert_eq!(
        report.top_users,
        vec![
            spender(&hash(ALICE), 5, 146_250_000),
            spender(&hash(CAROL), 2, 85_800_000),
            spender(&hash(DAVE), 2, 26_700_000),
        ]
    );
    assert_eq!(stats::anonymize_user(ALICE), hash(ALICE));
    assert_eq!(report.top_rooms[0].id, BRAVO, "room ids are not hashed");
    assert_eq!(report.top_rooms.len(), 3);
    let json = render_json(&report);
    assert_eq!(json["anonymized"], true);
    assert_eq!(json["top_users"][0]["id"], hash(ALICE));
    for (what, out) in [
        ("text", render_text(&report)),
        ("json", json.to_string()),
        ("html", render_html(&report)),
    ] {
        for user in [ALICE, BOB, CAROL, DAVE, ERIN, FRANK] {
            assert!(!out.contains(user), "{what} shows {user}");
        }
    }
}

#[test]
fn text_report_fits_80_columns() {
    let report = summarize(&seed(), &[], &options(at(20, 0, 0)));
    let text = render_text(&report);
    for line in text.lines() {
        assert!(line.chars().count() <= 80, "too wide: {line:?}");
    }
    for needle in [
        "15 requests, $0.026015 spent; final model grok-4.3",
        "2026-11-20       1       2       2       1       1       7",
        "2026-11-21       3       2       1       1       1       8",
        "grok_direct             3   $0.004890    $0.006140    $0.001250    20.4%",
        "total                   8   $0.042860    $0.010650   -$0.032210  -302.4%",
        "  not compared: 1 older rows without per-stage tokens",
        "  not compared: 1 rows with a model not under prices:",
        "2026-11-20  $0.002000  $0.001350  $0.008500  $0.008550  $0.020400",
        "total       $0.000080  $0.000210  $0.006000  $0.007000  $0.012725  $0.026015",
        "  route grok_direct               4     1200     3000     3000     3000",
        "  stage final                     7     1900     2900     2900     2900",
        "  cache hit                2 of 11       18.2%  routed requests",
        "  ceiling hit              1 of 15        6.7%  all requests",
        "Router source: heuristic 5, classifier 2, default 5, forced 2, degraded 1",
        "  media                                2",
        "  !bravo:example.org",
        "  @alice:example.org",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }

    // Big money, long ids and an unknown route token still fit.
    let mut rows = seed();
    let mut big = rows[1].clone();
    big.id = "$big".into();
    big.room_id = format!("!{}:example.org", "x".repeat(120));
    big.sender = format!("@{}:example.org", "y".repeat(120));
    big.route = "mystery_route".into();
    big.cost_final_ticks = 9_876 * 10_000_000_000;
    big.cost_total_ticks = big.cost_final_ticks;
    rows.push(big);
    let report = summarize(&rows, &[], &options(at(20, 0, 0)));
    assert!(report.routes.contains(&"mystery_route".to_string()));
    let text = render_text(&report);
    for line in text.lines() {
        assert!(line.chars().count() <= 80, "too wide: {line:?}\n{text}");
    }
    assert!(text.contains("other"), "{text}");
}

#[test]
fn json_shape_is_stable() {
    let report = summarize(&seed(), &[], &options(at(20, 0, 0)));
    let j = render_json(&report);
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&j),
        [
            "anonymized",
            "cost_ticks",
            "counterfactual",
            "days",
            "degraded",
            "final_model",
            "latency_ms",
            "overshoot",
            "rates",
            "requests",
            "router_sources",
            "routes",
            "since",
            "stages",
            "top_rooms",
            "top_users",
            "until",
            "version",
        ]
    );
    assert_eq!(j["version"], 2);
    assert_eq!(j["since"], "2026-11-20T00:00:00Z");
    assert_eq!(j["until"], "2026-11-22T00:00:00Z");
    assert_eq!(j["final_model"], "grok-4.3");
    assert_eq!(j["requests"]["total"], 15);
    assert_eq!(j["requests"]["by_route"]["none"], 4);
    assert_eq!(j["cost_ticks"]["total"], 260_150_000);
    assert_eq!(j["cost_ticks"]["by_stage"]["final"], 127_250_000);
    assert_eq!(j["cost_ticks"]["by_route"]["web_then_grok"], 99_000_000);
    assert_eq!(j["days"][0]["day"], "2026-11-20");
    assert_eq!(keys(&j["days"][0]), ["cost_ticks", "day", "requests"]);
    assert_eq!(j["days"][1]["requests"]["by_route"]["none"], 3);
    assert_eq!(
        j["days"][1]["cost_ticks"]["by_route"]["grok_direct"],
        41_250_000
    );
    assert_eq!(j["days"][0]["cost_ticks"]["by_stage"]["web"], 60_000_000);
    assert_eq!(
        j["counterfactual"],
        json!({
            "method": "tokens_at_configured_prices", "priced": true,
            "answered": 10, "answered_cache_hits": 2, "actual_ticks": 248_900_000,
            "compared": 8, "cache_hits": 2, "reported_ticks": 234_300_000,
            "cascade_ticks": 428_600_000, "grok_direct_ticks": 106_500_000,
            "saving_ticks": -322_100_000, "saving_pct": -302.44,
            "not_compared": {"without_stage_usage": 1, "unpriced": 1},
            "by_route": {
                "grok_direct": {"compared": 3, "cache_hits": 1, "reported_ticks": 50_000_000,
                    "cascade_ticks": 48_900_000, "grok_direct_ticks": 61_400_000,
                    "saving_ticks": 12_500_000, "saving_pct": 20.36},
                "trivial_direct": {"compared": 2, "cache_hits": 0, "reported_ticks": 13_500_000,
                    "cascade_ticks": 23_700_000, "grok_direct_ticks": 14_950_000,
                    "saving_ticks": -8_750_000, "saving_pct": -58.53},
                "web_then_grok": {"compared": 1, "cache_hits": 0, "reported_ticks": 85_000_000,
                    "cascade_ticks": 127_000_000, "grok_direct_ticks": 13_300_000,
                    "saving_ticks": -113_700_000, "saving_pct": -854.89},
                "reason_then_grok": {"compared": 2, "cache_hits": 1,
                    "reported_ticks": 85_800_000, "cascade_ticks": 229_000_000,
                    "grok_direct_ticks": 16_850_000, "saving_ticks": -212_150_000,
                    "saving_pct": -1259.05},
            },
        })
    );
    assert_eq!(j["overshoot"], json!({"total_ticks": 0, "days": []}));
    assert_eq!(j["latency_ms"]["method"], "nearest_rank");
    assert_eq!(
        j["latency_ms"]["by_route"]["grok_direct"],
        json!({"n": 4, "p50": 1200, "p95": 3000, "p99": 3000, "max": 3000})
    );
    assert_eq!(j["latency_ms"]["by_stage"]["web"]["p50"], 800);
    assert_eq!(j["latency_ms"]["histogram"].as_array().unwrap().len(), 9);
    assert_eq!(j["latency_ms"]["histogram"][0]["below_ms"], 250);
    assert_eq!(
        j["latency_ms"]["histogram"][0]["by_route"]["grok_direct"],
        1
    );
    assert_eq!(j["latency_ms"]["histogram"][8]["below_ms"], Value::Null);
    assert_eq!(
        j["rates"]["cache_hit"],
        json!({"count": 2, "of": 11, "rate": 0.1818})
    );
    assert_eq!(
        keys(&j["rates"]),
        [
            "cache_hit",
            "ceiling_hit",
            "escalated",
            "fallback_fired",
            "per_user_cap_hit"
        ]
    );
    assert_eq!(
        j["degraded"],
        json!({"media": 2, "empty_completion": 1, "web_failed": 1})
    );
    assert_eq!(j["router_sources"]["heuristic"], 5);
    assert_eq!(
        j["top_rooms"][0],
        json!({"id": BRAVO, "requests": 4, "cost_ticks": 171_100_000})
    );
    assert_eq!(j["top_users"][5]["id"], FRANK);
    for route in stats::ROUTES {
        assert!(j["requests"]["by_route"].get(route).is_some(), "{route}");
        assert!(j["cost_ticks"]["by_route"].get(route).is_some(), "{route}");
    }
    for stage in stats::STAGES {
        assert!(j["cost_ticks"]["by_stage"].get(stage).is_some(), "{stage}");
        assert!(j["latency_ms"]["by_stage"].get(stage).is_some(), "{stage}");
    }
}

#[test]
fn without_a_price_there_is_no_counterfactual() {
    let mut opts = options(at(20, 0, 0));
    opts.final_price = None;
    let report = summarize(&seed(), &[], &opts);
    let cf = &report.counterfactual;
    assert!(!cf.priced);
    assert_eq!(cf.total, Comparison::default());
    assert_eq!((cf.without_stage_usage, cf.unpriced), (0, 0));
    assert_eq!(cf.actual_ticks, 248_900_000);
    let j = render_json(&report);
    assert_eq!(j["counterfactual"]["priced"], false);
    assert_eq!(j["counterfactual"]["saving_pct"], Value::Null);
    assert_eq!(j["counterfactual"]["grok_direct_ticks"], Value::Null);
    assert_eq!(
        j["counterfactual"]["by_route"]["web_then_grok"]["cascade_ticks"],
        Value::Null
    );
    assert!(render_text(&report).contains("n/a"));
    // Options::from_config took grok-4.3's default price.
    assert_eq!(
        options(at(20, 0, 0)).final_price,
        Some(Price {
            input: 12_500,
            cached_input: 2_000,
            output: 25_000,
            web_search_call: 50_000_000,
        })
    );
}

#[test]
fn an_empty_window_renders() {
    let report = summarize(&[], &[], &options(at(20, 0, 0)));
    assert!(report.days.is_empty());
    assert!(render_text(&report).contains("No requests in this window."));
    let j = render_json(&report);
    assert_eq!(j["days"], json!([]));
    assert_eq!(j["requests"]["total"], 0);
    assert_eq!(j["counterfactual"]["grok_direct_ticks"], 0);
    assert_eq!(j["rates"]["escalated"]["rate"], Value::Null);
    let html = render_html(&report);
    assert_eq!(svg_of(&html, "chart-route-mix").matches("<rect").count(), 0);
}

/// The `<svg id="{id}" ...>...</svg>` element of a chart.
fn svg_of<'a>(html: &'a str, id: &str) -> &'a str {
    let start = html
        .find(&format!("<svg id=\"{id}\""))
        .unwrap_or_else(|| panic!("no chart {id}"));
    let len = html[start..].find("</svg>").expect("closed svg") + "</svg>".len();
    &html[start..start + len]
}

/// Non-zero (day, route) cells of the seed: every route on day 1 and day 2 (requests); the
/// four model routes on both days (spend); ten (bucket, route) cells (latency).
const ROUTE_MIX_BARS: usize = 10;
const SPEND_BARS: usize = 8;
const LATENCY_BARS: usize = 10;

#[test]
fn html_report_is_self_contained_with_three_charts() {
    let report = summarize(&seed(), &[], &options(at(20, 0, 0)));
    let html = render_html(&report);
    assert!(html.starts_with("<!DOCTYPE html>"));
    for (id, kind, bars) in [
        ("chart-route-mix", "route-mix", ROUTE_MIX_BARS),
        ("chart-spend", "spend-by-route", SPEND_BARS),
        ("chart-latency", "latency-histogram", LATENCY_BARS),
    ] {
        let svg = svg_of(&html, id);
        assert!(svg.contains(&format!("data-chart=\"{kind}\"")), "{id}");
        assert_eq!(svg.matches("<rect").count(), bars, "{id} bars");
    }
    // Offline: nothing is fetched (the SVG namespace is a name, not a request).
    let without_ns = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    for needle in [
        "http:", "https:", "src=", "href=", "@import", "url(", "<script", "<link",
    ] {
        assert!(!without_ns.contains(needle), "the report contains {needle}");
    }
    assert!(html.contains("saving -$0.032210 (-302.4%)"));
    assert!(html.contains("<td>web_then_grok</td><td>1</td><td>0</td><td>$0.012700</td>"));
    assert!(html.contains("<title>2026-11-20: web_then_grok, $0.008500</title>"));
}

#[test]
fn html_escapes_ids() {
    let mut rows = seed();
    rows[1].room_id = "!<script>alert(1)</script>:example.org".into();
    let html = render_html(&summarize(&rows, &[], &options(at(20, 0, 0))));
    assert!(!html.contains("<script>"));
    assert!(html.contains("!&lt;script&gt;alert(1)&lt;/script&gt;:example.org"));
}

fn find_chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|n| dir.join(n)))
        .find(|p| p.is_file())
}

/// Runs headless Chromium on `file` and returns the DOM after load and layout.
fn dump_dom(chromium: &Path, file: &Path, profile: &Path) -> String {
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", file.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).map(|_| out)
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().unwrap().expect("read chromium output")
}

/// Measures, in the browser, each chart's laid-out size and how many of its bars have a
/// non-zero rendered box. Added to the test's copy only: the report itself has no script.
const PROBE: &str = "<script>\
for (const svg of document.querySelectorAll('svg[data-chart]')) {\
  const box = svg.getBoundingClientRect();\
  let marks = 0;\
  for (const r of svg.querySelectorAll('rect')) {\
    const b = r.getBoundingClientRect();\
    if (b.width > 0 && b.height > 0) marks++;\
  }\
  svg.setAttribute('data-rendered-marks', String(marks));\
  svg.setAttribute('data-rendered-size', Math.round(box.width) + 'x' + Math.round(box.height));\
}\
document.body.setAttribute('data-probe', 'done');\
</script>";

/// The value of `attr` on the opening tag of the chart `id` in the dumped DOM.
fn attr_of(dom: &str, id: &str, attr: &str) -> String {
    let start = dom
        .find(&format!("<svg id=\"{id}\""))
        .unwrap_or_else(|| panic!("no chart {id} in the DOM"));
    let tag = &dom[start..start + dom[start..].find('>').unwrap()];
    let key = format!("{attr}=\"");
    let at = tag
        .find(&key)
        .unwrap_or_else(|| panic!("{id} has no {attr}: {tag}"))
        + key.len();
    tag[at..at + tag[at..].find('"').unwrap()].to_string()
}

#[test]
fn headless_chromium_renders_the_charts() {
    let Some(chromium) = find_chromium() else {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but chromium is not on PATH: install Debian's `chromium` package");
        }
        eprintln!("SKIP headless_chromium_renders_the_charts: chromium not on PATH");
        return;
    };
    let report = summarize(&seed(), &[], &options(at(20, 0, 0)));
    let html = render_html(&report).replace("</body>", &format!("{PROBE}</body>"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("report.html");
    std::fs::write(&file, html).unwrap();
    let profile = dir.path().join("profile");
    let dom = dump_dom(&chromium, &file, &profile);
    assert!(
        dom.contains("data-probe=\"done\""),
        "the page did not load:\n{dom}"
    );
    for (id, bars) in [
        ("chart-route-mix", ROUTE_MIX_BARS),
        ("chart-spend", SPEND_BARS),
        ("chart-latency", LATENCY_BARS),
    ] {
        assert_eq!(
            attr_of(&dom, id, "data-rendered-marks"),
            bars.to_string(),
            "{id}: bars with a non-zero rendered box"
        );
        let size = attr_of(&dom, id, "data-rendered-size");
        let (w, h) = size.split_once('x').unwrap();
        assert!(
            w.parse::<u32>().unwrap() > 100 && h.parse::<u32>().unwrap() > 50,
            "{id} laid out at {size}"
        );
    }
}

#[test]
fn the_stats_command_reads_the_configured_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("stats.db");
    let url = format!("sqlite://{}", db.display());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::connect(&url, 1).unwrap();
        store.migrate().await.unwrap();
        let now = grok_appservice::store::now();
        for (i, hours_ago) in [1i64, 50, 24 * 10].into_iter().enumerate() {
            let mut r = seed()[1].clone();
            r.id = format!("$cli{i}");
            r.created_at = now - chrono::Duration::hours(hours_ago);
            store.upsert_request_log(r).await.unwrap();
        }
    });
    let config = db::config_file(dir.path(), &url);
    let html = dir.path().join("report.html");
    let run = |args: &[&str]| -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_grok-appservice"))
            .arg("stats")
            .args(args)
            .arg("-c")
            .arg(&config)
            .env_remove("DATABASE_URL")
            .env_remove("GROK_APPSERVICE_CONFIG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stats {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let week: Value = serde_json::from_str(&run(&["--json"])).unwrap();
    assert_eq!(week["requests"]["total"], 2, "default --since 7d");
    assert_eq!(week["cost_ticks"]["total"], 40_000_000);
    let two_days: Value = serde_json::from_str(&run(&["--since", "2d", "--json"])).unwrap();
    assert_eq!(two_days["requests"]["total"], 1);
    let text = run(&[
        "--since",
        "30d",
        "--anonymize",
        "--html",
        html.to_str().unwrap(),
    ]);
    assert!(text.contains("3 requests"), "{text}");
    assert!(!text.contains(ALICE));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("data-chart=\"route-mix\""));
}

#[tokio::test]
async fn long_windows_are_read_page_by_page_without_gaps_or_repeats() {
    // More rows than one page (5 000), many sharing a timestamp, so a page boundary falls
    // inside a run of equal `created_at` and the (created_at, id) keyset must break the tie.
    const N: usize = 5_003;
    for db in db::all() {
        let store = Store::connect(&db.url, 4).unwrap();
        store.migrate().await.unwrap();
        let base = row(
            "$x",
            at(20, 12, 0),
            ALPHA,
            ALICE,
            "grok_direct",
            "heuristic",
        );
        let mut writes: tokio::task::JoinSet<Result<(), StoreError>> = tokio::task::JoinSet::new();
        for i in 0..N {
            let mut r = base.clone();
            r.id = format!("$p{i:05}");
            r.created_at = at(20, 12, (i / 1_000) as u32);
            // As many writes in flight as the pool has connections: more would only queue
            // for a connection and could hit the pool's checkout timeout on a busy machine.
            if writes.len() >= 4 {
                let done = writes.join_next().await.unwrap().unwrap();
                done.unwrap_or_else(|e| panic!("[{}] seed: {e}", db.label));
            }
            let store = store.clone();
            writes.spawn(async move { store.upsert_request_log(r).await });
        }
        while let Some(done) = writes.join_next().await {
            done.unwrap()
                .unwrap_or_else(|e| panic!("[{}] seed: {e}", db.label));
        }
        let rows = store.request_log_since(at(20, 0, 0)).await.unwrap();
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let expected: Vec<String> = (0..N).map(|i| format!("$p{i:05}")).collect();
        assert_eq!(ids.len(), N, "[{}] row count", db.label);
        assert!(ids == expected, "[{}] order or duplicates", db.label);
    }
}

/// A price of `input`, `cached` and `output` ticks per token and `web` per search.
fn price(input: i64, cached: i64, output: i64, web: i64) -> Price {
    Price {
        input,
        cached_input: cached,
        output,
        web_search_call: web,
    }
}

#[test]
fn each_row_is_priced_from_tokens_on_both_sides() {
    use stats::aggregate::{compare_row, RowComparison};
    let prices = std::collections::BTreeMap::from([
        ("final".to_string(), price(10, 1, 100, 1_000)),
        ("cheap".to_string(), price(2, 1, 5, 0)),
        ("deep".to_string(), price(20, 2, 300, 0)),
    ]);
    let final_price = prices["final"];
    let base = |route: &str| {
        let mut r = row("$c", at(20, 12, 0), ALPHA, ALICE, route, "heuristic");
        r.cost_total_ticks = 77; // reported: carried beside, never priced
        r
    };
    let compared = |rows, cache_hits, cascade_ticks, direct_ticks| {
        RowComparison::Compared(Comparison {
            rows,
            cache_hits,
            reported_ticks: 77,
            cascade_ticks,
            direct_ticks,
        })
    };
    let mut hit = tokens(base("grok_direct"), &[], (30, 8));
    hit.cache_hit = true;
    let cases: Vec<(&str, RequestLogRow, RowComparison)> = vec![
        (
            // 90 uncached * 10 + 10 cached * 1 + 20 out * 100, on both sides.
            "grok_direct",
            tokens(
                base("grok_direct"),
                &[("final", "final", [100, 10, 20, 0, 0])],
                (100, 20),
            ),
            compared(1, 0, 2_910, 2_910),
        ),
        (
            // router 50*2 + 4*5 = 120 on top of the same final call.
            "grok_direct after the classifier",
            tokens(
                base("grok_direct"),
                &[
                    ("router", "cheap", [50, 0, 4, 0, 0]),
                    ("final", "final", [100, 10, 20, 0, 0]),
                ],
                (100, 20),
            ),
            compared(1, 0, 3_030, 2_910),
        ),
        (
            // trivial 40*2 + 6*5 = 110; direct 30 in * 10 + 6 out * 100 = 900.
            "trivial",
            tokens(
                base("trivial_direct"),
                &[("trivial", "cheap", [40, 0, 6, 0, 0])],
                (30, 6),
            ),
            compared(1, 0, 110, 900),
        ),
        (
            // web 500 uncached * 10 + 100 cached + 2 searches * 1 000 + 50 out * 100 = 12 100;
            // direct: 100 cached capped at the 60 direct input: 60 * 1 + 50 * 100 = 5 060.
            "web",
            tokens(
                base("web_then_grok"),
                &[("web", "final", [600, 100, 50, 0, 2])],
                (60, 50),
            ),
            compared(1, 0, 12_100, 5_060),
        ),
        (
            // reason 100*20 + 1 000*300 = 302 000, final 190*10 + 10*1 + 40*100 = 5 910;
            // direct: final's 10 cached, 70 uncached: 700 + 10 + 4 000 = 4 710.
            "reason",
            tokens(
                base("reason_then_grok"),
                &[
                    ("reason", "deep", [100, 0, 1_000, 800, 0]),
                    ("final", "final", [200, 10, 40, 0, 0]),
                ],
                (80, 40),
            ),
            compared(1, 0, 307_910, 4_710),
        ),
        // A cache hit ran nothing: 30 * 10 + 8 * 100 on the direct side only.
        ("cache hit", hit, compared(1, 1, 0, 1_100)),
        (
            "a model without a price",
            tokens(
                base("trivial_direct"),
                &[("trivial", "unknown", [40, 0, 6, 0, 0])],
                (30, 6),
            ),
            RowComparison::Unpriced,
        ),
        (
            "a row from before: migration defaults",
            {
                let mut r = base("grok_direct");
                r.stage_usage = "{}".into();
                (r.direct_input_tokens, r.direct_output_tokens) = (-1, -1);
                r
            },
            RowComparison::WithoutStageUsage,
        ),
        (
            "a row without stage_usage",
            base("grok_direct"),
            RowComparison::WithoutStageUsage,
        ),
        (
            "an unknown output estimate",
            tokens(base("grok_direct"), &[], (30, -1)),
            RowComparison::WithoutStageUsage,
        ),
    ];
    for (what, r, expected) in cases {
        assert_eq!(compare_row(&r, &prices, &final_price), expected, "{what}");
    }
}

#[test]
fn per_route_savings_add_up_exactly() {
    // Two routes at the default prices (12 500 in, 2 000 cached, 25 000 out per token).
    let rows = vec![
        // cascade 1 000 * 12 500 + 100 * 25 000 = 15M; direct 400 * 12 500 + 100 * 25 000 = 7.5M
        tokens(
            row(
                "$a",
                at(20, 1, 0),
                ALPHA,
                ALICE,
                "web_then_grok",
                "heuristic",
            ),
            &[("web", FINAL, [1_000, 0, 100, 0, 0])],
            (400, 100),
        ),
        // cascade 2 000 * 12 500 + 300 * 25 000 = 32.5M; direct 500 * 12 500 + 300 * 25 000 = 13.75M
        tokens(
            row(
                "$b",
                at(20, 2, 0),
                ALPHA,
                ALICE,
                "web_then_grok",
                "heuristic",
            ),
            &[("web", FINAL, [2_000, 0, 300, 0, 0])],
            (500, 300),
        ),
        // cascade 100 * 12 500 + 10 * 25 000 = 1.5M; direct 1 000 * 12 500 + 400 * 25 000 = 22.5M
        tokens(
            row(
                "$c",
                at(20, 3, 0),
                ALPHA,
                ALICE,
                "trivial_direct",
                "heuristic",
            ),
            &[("trivial", CHEAP, [100, 0, 10, 0, 0])],
            (1_000, 400),
        ),
    ];
    let cf = summarize(&rows, &[], &options(at(20, 0, 0))).counterfactual;
    let web = cf.by_route["web_then_grok"];
    assert_eq!(
        (web.rows, web.cascade_ticks, web.direct_ticks),
        (2, 47_500_000, 21_250_000)
    );
    assert_eq!(web.saving_ticks(), -26_250_000);
    assert!((web.saving_pct().unwrap() - -123.529_412).abs() < 1e-5);
    let trivial = cf.by_route["trivial_direct"];
    assert_eq!(
        (trivial.cascade_ticks, trivial.direct_ticks),
        (1_500_000, 22_500_000)
    );
    assert!((trivial.saving_pct().unwrap() - 93.333_333).abs() < 1e-5);
    assert_eq!(cf.total.cascade_ticks, 49_000_000);
    assert_eq!(cf.total.direct_ticks, 43_750_000);
    assert_eq!(cf.total.saving_ticks(), -5_250_000);
    assert!((cf.total.saving_pct().unwrap() - -12.0).abs() < 1e-9);
    // Routes without rows are there with zeros and no percentage.
    assert_eq!(cf.by_route["grok_direct"], Comparison::default());
    assert_eq!(cf.by_route["grok_direct"].saving_pct(), None);
    assert!(!cf.by_route.contains_key("none"));
}

#[test]
fn grok_direct_alone_saves_minus_the_router() {
    let direct = |id: &str, router: Option<[i64; 5]>, fin: [i64; 5]| {
        let mut stages = vec![("final", FINAL, fin)];
        if let Some(r) = router {
            stages.insert(0, ("router", CHEAP, r));
        }
        tokens(
            row(id, at(20, 1, 0), ALPHA, ALICE, "grok_direct", "classifier"),
            &stages,
            (fin[0], fin[2]),
        )
    };
    // No router ran: both sides are the same final calls.
    let plain = vec![
        direct("$p1", None, [1_000, 300, 200, 0, 0]),
        direct("$p2", None, [5_000, 0, 900, 100, 0]),
    ];
    let cf = summarize(&plain, &[], &options(at(20, 0, 0))).counterfactual;
    assert_eq!(cf.total.rows, 2);
    assert!(cf.total.direct_ticks > 0);
    assert_eq!(cf.total.saving_ticks(), 0);
    assert_eq!(cf.total.saving_pct(), Some(0.0));

    // The classifier ran on two of three: the saving is minus what it cost
    // (300 * 12 500 + 20 * 25 000 = 4.25M, and 100 * 12 500 + 10 * 25 000 = 1.5M).
    let routed = vec![
        direct("$r1", Some([300, 0, 20, 0, 0]), [1_000, 300, 200, 0, 0]),
        direct("$r2", Some([100, 0, 10, 0, 0]), [5_000, 0, 900, 100, 0]),
        direct("$r3", None, [2_000, 1_500, 50, 0, 0]),
    ];
    let cf = summarize(&routed, &[], &options(at(20, 0, 0))).counterfactual;
    assert_eq!(cf.total.rows, 3);
    assert_eq!(cf.total.saving_ticks(), -5_750_000);
    assert_eq!(cf.by_route["grok_direct"], cf.total);
}

#[test]
fn rows_without_per_stage_tokens_are_left_out_and_counted() {
    let new = tokens(
        row("$n", at(20, 1, 0), ALPHA, ALICE, "grok_direct", "heuristic"),
        &[("final", FINAL, [1_000, 0, 100, 0, 0])],
        (1_000, 100),
    );
    let mut migrated = row("$m", at(20, 2, 0), ALPHA, ALICE, "grok_direct", "heuristic");
    migrated.stage_usage = "{}".into();
    (migrated.direct_input_tokens, migrated.direct_output_tokens) = (-1, -1);
    migrated.cost_total_ticks = 99_000_000;
    let mut unanswered = migrated.clone();
    unanswered.id = "$u".into();
    unanswered.ok = false;
    let rows = vec![new, migrated.clone(), migrated.clone(), unanswered];
    let rows: Vec<RequestLogRow> = rows
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            r.id = format!("$r{i}");
            r
        })
        .collect();
    let report = summarize(&rows, &[], &options(at(20, 0, 0)));
    let cf = &report.counterfactual;
    assert_eq!(cf.answered, 3);
    assert_eq!(
        cf.without_stage_usage, 2,
        "the unanswered row is not counted"
    );
    assert_eq!(cf.total.rows, 1);
    assert_eq!(
        cf.total.reported_ticks, 0,
        "the old rows' spend is not compared"
    );
    assert_eq!(cf.total.direct_ticks, 1_000 * 12_500 + 100 * 25_000);
    assert_eq!(cf.actual_ticks, 2 * 99_000_000);
    assert_eq!(
        render_json(&report)["counterfactual"]["not_compared"]["without_stage_usage"],
        2
    );
    assert!(render_text(&report).contains("not compared: 2 older rows without per-stage tokens"));
    assert!(
        render_html(&report).contains("<p>2 older rows without per-stage tokens not compared.</p>")
    );
}

fn counter(day: &str, scope: &str, cap_ticks: i64, settled_ticks: i64) -> Counter {
    Counter {
        day: day.into(),
        scope: scope.into(),
        cap_ticks,
        settled_ticks,
        reserved_ticks: 0,
        requests: 1,
    }
}

#[test]
fn overshoot_is_settled_spend_past_each_days_cap() {
    let budget = [
        counter("2026-11-21", GLOBAL_SCOPE, 1_000, 1_000), // exactly at the cap: 0
        counter("2026-11-20", GLOBAL_SCOPE, 1_000, 1_750), // 750 over
        counter("2026-11-22", GLOBAL_SCOPE, 1_000, 1_200), // `until`'s day: 200 over
        counter("2026-11-20", "user:@alice:example.org", 100, 900), // not the ceiling
        counter("2026-11-19", GLOBAL_SCOPE, 1_000, 5_000), // before the window
        counter("2026-11-23", GLOBAL_SCOPE, 1_000, 5_000), // after it
        counter("2026-11-21", "global-typo", 1, 5_000),
        counter("not a day", GLOBAL_SCOPE, 1, 5_000),
        counter("2026-11-20", GLOBAL_SCOPE, 0, 5_000), // no ceiling configured
    ];
    let report = summarize(&seed(), &budget, &options(at(20, 0, 0)));
    let days: Vec<(NaiveDate, i64)> = report
        .ceiling_days
        .iter()
        .map(|d| (d.day, d.overshoot_ticks()))
        .collect();
    assert_eq!(days, vec![(day(20), 750), (day(21), 0), (day(22), 200)]);
    assert_eq!(report.overshoot_total_ticks(), 950);

    let j = render_json(&report);
    assert_eq!(j["overshoot"]["total_ticks"], 950);
    assert_eq!(
        j["overshoot"]["days"][0],
        json!({"day": "2026-11-20", "cap_ticks": 1_000, "settled_ticks": 1_750,
               "overshoot_ticks": 750})
    );
    // Dollars, so the renderers show the numbers; a window without request rows still shows
    // its ceiling days.
    let usd = 10_000_000_000;
    let big = vec![
        counter("2026-11-20", GLOBAL_SCOPE, 5 * usd, 5 * usd + usd / 8),
        counter("2026-11-21", GLOBAL_SCOPE, 5 * usd, 4 * usd),
    ];
    let report = summarize(&[], &big, &options(at(20, 0, 0)));
    let text = render_text(&report);
    for needle in [
        "2026-11-20    $5.000000    $5.125000    $0.125000",
        "2026-11-21    $5.000000    $4.000000    $0.000000",
        "total                                   $0.125000",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    for line in text.lines() {
        assert!(line.chars().count() <= 80, "too wide: {line:?}");
    }
    let html = render_html(&report);
    assert!(html.contains("overshoot $0.125000 in total"));
    assert!(
        html.contains("<td>2026-11-20</td><td>$5.000000</td><td>$5.125000</td><td>$0.125000</td>")
    );
    let none = render_text(&summarize(&seed(), &[], &options(at(20, 0, 0))));
    assert!(none.contains("no day with a ceiling in this window"));
}

#[tokio::test]
async fn the_global_counters_of_the_window_are_read_on_every_backend() {
    use grok_appservice::store::budget::{Finish, ReserveRequest};
    for db in db::all() {
        let store = Store::connect(&db.url, 2).unwrap();
        store.migrate().await.unwrap();
        for (i, (day, cap, estimate, actual)) in [
            ("2026-11-19", 1_000, 100, 100),
            ("2026-11-20", 1_000, 900, 1_600), // settled past the cap: 600 over
            ("2026-11-21", 1_000, 100, 300),
            ("2026-11-23", 1_000, 100, 100),
        ]
        .into_iter()
        .enumerate()
        {
            let id = format!("$b{i}");
            let granted = store
                .budget_reserve(ReserveRequest {
                    id: id.clone(),
                    day: day.into(),
                    user_id: ALICE.into(),
                    amount_ticks: estimate,
                    global_cap_ticks: cap,
                    user_cap_ticks: None,
                    requests_per_hour: None,
                    now: at(20, 0, 0),
                    expires_at: at(20, 1, 0),
                })
                .await
                .unwrap();
            assert_eq!(
                granted,
                grok_appservice::store::budget::ReserveResult::Granted,
                "[{}] {day}",
                db.label
            );
            store
                .budget_finish(id, Finish::Settled, actual, at(20, 0, 1))
                .await
                .unwrap();
        }
        let read = store
            .budget_global_days("2026-11-20".into(), "2026-11-22".into())
            .await
            .unwrap();
        let got: Vec<(&str, &str, i64, i64)> = read
            .iter()
            .map(|c| {
                (
                    c.day.as_str(),
                    c.scope.as_str(),
                    c.cap_ticks,
                    c.settled_ticks,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("2026-11-20", GLOBAL_SCOPE, 1_000, 1_600),
                ("2026-11-21", GLOBAL_SCOPE, 1_000, 300),
            ],
            "[{}]",
            db.label
        );
        let mut opts = options(at(20, 0, 0));
        opts.until = at(22, 0, 0);
        let report = summarize(&[], &read, &opts);
        assert_eq!(report.overshoot_total_ticks(), 600, "[{}]", db.label);
    }
}
