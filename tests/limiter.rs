//! The spend limiter: exact admission under concurrency (also across two store instances, as
//! two replicas would have), crash recovery by the sweeper, day rollover, per-user caps, and
//! what a user sees when a limit stops them.

mod common;

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde_json::json;

use common::*;
use grok_appservice::cascade::Route;
use grok_appservice::config::{Config, TICKS_PER_USD};
use grok_appservice::limiter::{Admission, Clock, CostModel, Limiter, Plan, Refusal};
use grok_appservice::store::budget::{user_scope, ReserveRequest, ReserveResult, GLOBAL_SCOPE};
use grok_appservice::store::Store;

async fn open(db: &db::TestDb) -> Store {
    let store = Store::connect(&db.url, 8).unwrap();
    store.migrate().await.unwrap();
    store
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

/// A clock the test moves.
fn clock(start: &str) -> (Clock, Arc<Mutex<DateTime<Utc>>>) {
    let now = Arc::new(Mutex::new(at(start)));
    let handle = now.clone();
    (Arc::new(move || *handle.lock().unwrap()), now)
}

fn request(id: &str, user: &str, amount: i64, ceiling: i64, now: DateTime<Utc>) -> ReserveRequest {
    ReserveRequest {
        id: id.into(),
        day: now.format("%Y-%m-%d").to_string(),
        user_id: user.into(),
        amount_ticks: amount,
        global_cap_ticks: ceiling,
        user_cap_ticks: Some(i64::MAX / 4),
        requests_per_hour: None,
        now: now.naive_utc(),
        expires_at: now.naive_utc() + chrono::Duration::minutes(20),
    }
}

async fn assert_books_balance(store: &Store, day: &str, label: &str) {
    let mismatches = store.budget_audit(day.into()).await.unwrap();
    assert!(
        mismatches.is_empty(),
        "[{label}] counters differ from reservations: {mismatches:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_reservations_admit_exactly_what_fits() {
    const ESTIMATE: i64 = 1_000_000;
    const CEILING: i64 = 50 * ESTIMATE;
    for db in db::all() {
        // Two pools on one database, as two replicas would have.
        let stores = [open(&db).await, open(&db).await];
        let now = Utc::now();
        let day = now.format("%Y-%m-%d").to_string();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let store = stores[i % 2].clone();
            let user = format!("@u{}:example.org", i % 20);
            tasks.push(tokio::spawn(async move {
                let r = store
                    .budget_reserve(request(&format!("r{i}"), &user, ESTIMATE, CEILING, now))
                    .await
                    .unwrap();
                (format!("r{i}"), r)
            }));
        }
        let mut granted = Vec::new();
        for t in tasks {
            let (id, r) = t.await.unwrap();
            match r {
                ReserveResult::Granted => granted.push(id),
                ReserveResult::GlobalFull => {}
                other => panic!("[{}] unexpected {other:?}", db.label),
            }
        }
        assert_eq!(
            granted.len(),
            50,
            "[{}] exactly the admissible number",
            db.label
        );
        assert_books_balance(&stores[0], &day, db.label).await;

        // Settle below the estimate (it is a worst case), except one that overshoots by 10%.
        let mut settled_total = 0;
        for (n, id) in granted.iter().enumerate() {
            let actual = if n == 0 {
                ESTIMATE * 11 / 10
            } else {
                ESTIMATE * (30 + (n as i64 * 7) % 70) / 100
            };
            settled_total += actual;
            assert!(stores[n % 2]
                .budget_finish(
                    id.clone(),
                    grok_appservice::store::budget::Finish::Settled,
                    actual,
                    now.naive_utc()
                )
                .await
                .unwrap());
        }
        assert_books_balance(&stores[1], &day, db.label).await;

        // Later waves fill what the settlements freed, and never past the ceiling.
        let mut wave = 0;
        loop {
            wave += 1;
            let mut any = false;
            let mut handles = Vec::new();
            for i in 0..40 {
                let store = stores[i % 2].clone();
                let id = format!("w{wave}-{i}");
                handles.push(tokio::spawn(async move {
                    let r = store
                        .budget_reserve(request(&id, "@late:example.org", ESTIMATE, CEILING, now))
                        .await
                        .unwrap();
                    (id, r)
                }));
            }
            for h in handles {
                let (id, r) = h.await.unwrap();
                if r == ReserveResult::Granted {
                    any = true;
                    settled_total += ESTIMATE;
                    stores[0]
                        .budget_finish(
                            id,
                            grok_appservice::store::budget::Finish::Settled,
                            ESTIMATE,
                            now.naive_utc(),
                        )
                        .await
                        .unwrap();
                }
            }
            if !any {
                break;
            }
        }
        let counters = stores[0]
            .budget_counters(day.clone(), vec![GLOBAL_SCOPE.into()])
            .await
            .unwrap();
        assert_eq!(counters[0].settled_ticks, settled_total, "[{}]", db.label);
        assert_eq!(counters[0].reserved_ticks, 0);
        assert!(
            settled_total <= CEILING + ESTIMATE / 10,
            "[{}] overshoot {} exceeds one estimate error",
            db.label,
            settled_total - CEILING
        );
        assert!(
            settled_total > CEILING - ESTIMATE,
            "[{}] the budget was used up",
            db.label
        );
        assert_books_balance(&stores[0], &day, db.label).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_workers_reservations_are_swept_back() {
    for db in db::all() {
        let store = open(&db).await;
        let config =
            Config::parse("homeserver: {url: 'http://h', server_name: example.org}\n").unwrap();
        let (clk, now) = clock("2026-11-28T10:00:00Z");
        let limiter = Limiter::new(&config, store.clone(), clk);
        let plan = Plan {
            route: Route::GrokDirect,
            output_cap: None,
            estimate_ticks: 7_000_000,
            shrunk: false,
        };
        let mut ids = Vec::new();
        for (i, user) in ["@a:example.org", "@b:example.org", "@c:example.org"]
            .iter()
            .enumerate()
        {
            match limiter.reserve(&format!("$e{i}"), user, &[plan]).await {
                Admission::Granted { reservation_id, .. } => ids.push(reservation_id),
                other => panic!("[{}] {other:?}", db.label),
            }
        }
        // The first two calls went out, the third never did; then the worker died.
        limiter.dispatched(&ids[0]).await.unwrap();
        limiter.dispatched(&ids[1]).await.unwrap();
        assert_eq!(
            limiter.sweep().await.unwrap(),
            0,
            "[{}] nothing expired yet",
            db.label
        );
        // Past the default reservation_ttl (1h).
        *now.lock().unwrap() = at("2026-11-28T11:01:00Z");
        assert_eq!(limiter.sweep().await.unwrap(), 3, "[{}]", db.label);
        assert_eq!(
            limiter.sweep().await.unwrap(),
            0,
            "[{}] a second sweep finds nothing",
            db.label
        );
        let day = "2026-11-28".to_string();
        let g = store
            .budget_counters(day.clone(), vec![GLOBAL_SCOPE.into()])
            .await
            .unwrap();
        assert_eq!(
            (g[0].settled_ticks, g[0].reserved_ticks),
            (14_000_000, 0),
            "[{}] dispatched calls count at their estimate",
            db.label
        );
        let c = store
            .budget_counters(day.clone(), vec![user_scope("@c:example.org")])
            .await
            .unwrap();
        assert_eq!(
            (c[0].settled_ticks, c[0].reserved_ticks),
            (0, 0),
            "[{}]",
            db.label
        );
        // A late settle of an expired reservation changes nothing.
        assert!(!limiter.settle(&ids[0], 1).await.unwrap());
        assert_books_balance(&store, &day, db.label).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn settle_and_release_are_idempotent() {
    for db in db::all() {
        let store = open(&db).await;
        let config =
            Config::parse("homeserver: {url: 'http://h', server_name: example.org}\n").unwrap();
        let (clk, _) = clock("2026-11-28T10:00:00Z");
        let limiter = Limiter::new(&config, store.clone(), clk);
        let plan = Plan {
            route: Route::GrokDirect,
            output_cap: None,
            estimate_ticks: 5_000,
            shrunk: false,
        };
        let Admission::Granted {
            reservation_id: a, ..
        } = limiter.reserve("$a", "@u:example.org", &[plan]).await
        else {
            panic!()
        };
        let Admission::Granted {
            reservation_id: b, ..
        } = limiter.reserve("$b", "@u:example.org", &[plan]).await
        else {
            panic!()
        };
        assert!(limiter.settle(&a, 3_000).await.unwrap());
        assert!(!limiter.settle(&a, 3_000).await.unwrap());
        assert!(!limiter.release(&a).await.unwrap());
        assert!(limiter.release(&b).await.unwrap());
        assert!(!limiter.release(&b).await.unwrap());
        let u = store
            .budget_counters("2026-11-28".into(), vec![user_scope("@u:example.org")])
            .await
            .unwrap();
        assert_eq!(
            (u[0].settled_ticks, u[0].reserved_ticks, u[0].requests),
            (3_000, 0, 2),
            "[{}]",
            db.label
        );
        assert_books_balance(&store, "2026-11-28", db.label).await;
    }
}

fn limits_config(extra: &str) -> Config {
    let mut c = Config::parse(&format!(
        "homeserver: {{url: 'http://h', server_name: example.org}}\n{extra}"
    ))
    .unwrap();
    c.validate().unwrap();
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn caps_per_user_per_hour_admins_and_overrides() {
    let db = db::sqlite();
    let store = open(&db).await;
    let cent = TICKS_PER_USD / 100;
    let config = limits_config(
        "limits: {daily_ceiling_usd: 1.0, per_user_daily_usd: 0.05, per_user_requests_per_hour: 3,\n\
           admins: ['@boss:example.org'],\n\
           per_user_overrides: {'@vip:example.org': {daily_usd: 0.20, requests_per_hour: 100}}}\n",
    );
    let (clk, now) = clock("2026-11-28T08:00:00Z");
    let limiter = Limiter::new(&config, store.clone(), clk);
    let plan = |cents: i64| Plan {
        route: Route::GrokDirect,
        output_cap: None,
        estimate_ticks: cents * cent,
        shrunk: false,
    };

    // Per-user daily cap: 2 + 2 cents fit under 5, a third 2 does not; the refusal says what is left.
    assert!(matches!(
        limiter.reserve("$1", "@al:example.org", &[plan(2)]).await,
        Admission::Granted { .. }
    ));
    assert!(matches!(
        limiter.reserve("$2", "@al:example.org", &[plan(2)]).await,
        Admission::Granted { .. }
    ));
    match limiter.reserve("$3", "@al:example.org", &[plan(2)]).await {
        Admission::Refused(Refusal::UserDaily {
            left_ticks,
            cap_ticks,
            ..
        }) => {
            assert_eq!((left_ticks, cap_ticks), (cent, 5 * cent));
        }
        other => panic!("{other:?}"),
    }
    // A smaller plan still fits: shrinking before refusing.
    match limiter
        .reserve("$4", "@al:example.org", &[plan(2), plan(1)])
        .await
    {
        Admission::Granted { plan, .. } => assert_eq!(plan.estimate_ticks, cent),
        other => panic!("{other:?}"),
    }
    // Requests per hour: the fourth within an hour is refused, an hour later it passes.
    for i in 0..3 {
        assert!(matches!(
            limiter
                .reserve(&format!("$h{i}"), "@chatty:example.org", &[plan(0)])
                .await,
            Admission::Granted { .. }
        ));
    }
    assert!(matches!(
        limiter
            .reserve("$h3", "@chatty:example.org", &[plan(0)])
            .await,
        Admission::Refused(Refusal::UserHourly { per_hour: 3 })
    ));
    *now.lock().unwrap() = at("2026-11-28T09:00:01Z");
    assert!(matches!(
        limiter
            .reserve("$h4", "@chatty:example.org", &[plan(0)])
            .await,
        Admission::Granted { .. }
    ));
    // Admins skip the per-user caps but not the ceiling.
    for i in 0..5 {
        assert!(
            matches!(
                limiter
                    .reserve(&format!("$b{i}"), "@boss:example.org", &[plan(10)])
                    .await,
                Admission::Granted { .. }
            ),
            "admin {i}"
        );
    }
    assert!(matches!(
        limiter
            .reserve("$b5", "@boss:example.org", &[plan(50)])
            .await,
        Admission::Refused(Refusal::Ceiling { .. })
    ));
    // Overrides replace the defaults.
    assert!(matches!(
        limiter.reserve("$v", "@vip:example.org", &[plan(15)]).await,
        Admission::Refused(Refusal::Ceiling { .. }) | Admission::Granted { .. }
    ));
    let u = limiter.usage("@boss:example.org").await.unwrap();
    assert!(u.global.is_some() && u.cap_ticks.is_none());
    let a = limiter.usage("@al:example.org").await.unwrap();
    assert_eq!(
        (a.reserved_ticks, a.requests, a.cap_ticks, a.global),
        (5 * cent, 3, Some(5 * cent), None)
    );
    assert_books_balance(&store, "2026-11-28", "sqlite").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_utc_day_starts_a_new_budget() {
    let db = db::sqlite();
    let store = open(&db).await;
    let config = limits_config("limits: {daily_ceiling_usd: 1.0, per_user_daily_usd: 0.02}\n");
    let (clk, now) = clock("2026-11-28T23:59:58Z");
    let limiter = Limiter::new(&config, store.clone(), clk);
    let plan = Plan {
        route: Route::GrokDirect,
        output_cap: None,
        estimate_ticks: TICKS_PER_USD / 100 * 2,
        shrunk: false,
    };
    assert!(matches!(
        limiter.reserve("$1", "@u:example.org", &[plan]).await,
        Admission::Granted { .. }
    ));
    match limiter.reserve("$2", "@u:example.org", &[plan]).await {
        Admission::Refused(Refusal::UserDaily { resets_at, .. }) => {
            assert_eq!(resets_at, at("2026-11-29T00:00:00Z"))
        }
        other => panic!("{other:?}"),
    }
    *now.lock().unwrap() = at("2026-11-29T00:00:01Z");
    assert!(
        matches!(
            limiter.reserve("$3", "@u:example.org", &[plan]).await,
            Admission::Granted { .. }
        ),
        "a new day, a new counter"
    );
    assert_eq!(limiter.today(), "2026-11-29");
    assert_books_balance(&store, "2026-11-28", "sqlite").await;
    assert_books_balance(&store, "2026-11-29", "sqlite").await;
}

/// A harness whose limits allow exactly `n` normal answers of the DM question.
async fn harness_with_limits(yaml: &str) -> Harness {
    let parsed = limits_config(yaml);
    let h = Harness::with(db::sqlite(), |c| c.limits = parsed.limits.clone()).await;
    h.known_room("!dm:example.org", true, &[BOT, ALICE]).await;
    h
}

/// The normal and the shrunk estimate of a direct answer to `text`.
fn answer_ticks(config: &Config, text: &str) -> (i64, i64) {
    let plans = grok_appservice::limiter::plans(
        &CostModel::from_config(config),
        Route::GrokDirect,
        text,
        0,
        false,
        config.limits.safety_factor,
    );
    (plans[0].estimate_ticks, plans[1].estimate_ticks)
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_ceiling_users_get_one_line_and_no_model_runs() {
    let probe = Harness::new().await;
    let (est, small) = answer_ticks(&probe.state.config, "tell me about otters");
    // Room for two answers that each cost a full estimate, and not even for a shrunk third.
    let ceiling_usd = (2 * est + small / 2) as f64 / TICKS_PER_USD as f64;
    let h = harness_with_limits(&format!(
        "limits: {{daily_ceiling_usd: {ceiling_usd}, per_user_daily_usd: 100}}\n"
    ))
    .await;
    // Distinct questions: a cached answer would cost nothing and pass.
    for (i, animal) in ["otters", "badgers", "herons", "voles"].iter().enumerate() {
        // Each answer costs a full estimate, so the third cannot fit.
        h.xai
            .script(200, response_body("grok-4.3", "an answer", Some(est)));
        h.put_txn(
            &format!("c{i}"),
            vec![text_event(
                &format!("$c{i}"),
                "!dm:example.org",
                ALICE,
                &format!("tell me about {animal}"),
            )],
        )
        .await;
        h.settle().await;
    }
    assert_eq!(
        h.xai.seen().len(),
        2,
        "the provider sees nothing past the ceiling"
    );
    let sent = h.hs.sent();
    assert_eq!(sent.len(), 4);
    let refusal = sent[3].body["body"].as_str().unwrap();
    assert!(
        refusal.contains("spending limit") && refusal.contains("00:00 UTC"),
        "{refusal}"
    );
    let row = h.row("$c3").await;
    assert_eq!(
        (
            row.route.as_str(),
            row.ceiling_hit,
            row.per_user_cap_hit,
            row.ok
        ),
        ("none", true, false, false)
    );
    // A question answered before is served from the cache: free, so not refused.
    h.put_txn(
        "c9",
        vec![text_event(
            "$c9",
            "!dm:example.org",
            ALICE,
            "tell me about otters",
        )],
    )
    .await;
    h.settle().await;
    assert_eq!(h.hs.sent()[4].body["body"], "an answer");
    let row = h.row("$c9").await;
    assert!(row.cache_hit && row.ok && !row.ceiling_hit);
    assert_eq!(h.xai.seen().len(), 2);
    let day = Utc::now().format("%Y-%m-%d").to_string();
    assert_books_balance(&h.state.store, &day, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_over_their_cap_is_told_what_is_left() {
    let probe = Harness::new().await;
    let (est, small) = answer_ticks(&probe.state.config, "tell me about otters");
    let cap_usd = (est + small / 2) as f64 / TICKS_PER_USD as f64;
    let h = harness_with_limits(&format!(
        "limits: {{daily_ceiling_usd: 100, per_user_daily_usd: {cap_usd}}}\n"
    ))
    .await;
    h.xai
        .script(200, response_body("grok-4.3", "an answer", Some(est)));
    h.put_txn(
        "u1",
        vec![text_event(
            "$u1",
            "!dm:example.org",
            ALICE,
            "tell me about otters",
        )],
    )
    .await;
    h.settle().await;
    h.put_txn(
        "u2",
        vec![text_event(
            "$u2",
            "!dm:example.org",
            ALICE,
            "tell me about badgers",
        )],
    )
    .await;
    h.settle().await;
    let sent = h.hs.sent();
    let body = sent[1].body["body"].as_str().unwrap();
    assert!(
        body.contains("your daily limit") && body.contains("left"),
        "{body}"
    );
    let row = h.row("$u2").await;
    assert!(row.per_user_cap_hit && !row.ceiling_hit);
    // `!usage` still answers, without a model.
    h.put_txn(
        "u3",
        vec![text_event("$u3", "!dm:example.org", ALICE, "!usage")],
    )
    .await;
    h.settle().await;
    let usage = h.hs.sent()[2].body["body"].as_str().unwrap().to_string();
    assert!(
        usage.contains("1 request") && usage.contains("daily limit"),
        "{usage}"
    );
    assert_eq!(h.xai.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tight_budget_shrinks_the_answer_before_refusing() {
    let probe = Harness::new().await;
    let config = &probe.state.config;
    let text = "solve 3x + 5 = 20 step by step";
    let plans = grok_appservice::limiter::plans(
        &CostModel::from_config(config),
        Route::ReasonThenGrok,
        text,
        0,
        false,
        config.limits.safety_factor,
    );
    assert!(plans.len() == 2 && plans[1].shrunk);
    let between = (plans[1].estimate_ticks + plans[0].estimate_ticks) / 2;
    let h = harness_with_limits(&format!(
        "limits: {{daily_ceiling_usd: {}, per_user_daily_usd: 100}}\n",
        between as f64 / TICKS_PER_USD as f64
    ))
    .await;
    h.put_txn(
        "s1",
        vec![text_event("$s1", "!dm:example.org", ALICE, text)],
    )
    .await;
    h.settle().await;
    let seen = h.xai.seen();
    assert_eq!(
        seen.len(),
        1,
        "one short direct answer instead of two stages"
    );
    assert_eq!(seen[0].body["model"], "grok-4.3");
    assert_eq!(
        seen[0].body["max_output_tokens"],
        json!(plans[1].output_cap.unwrap())
    );
    let row = h.row("$s1").await;
    assert_eq!(
        (row.route.as_str(), row.router_source.as_str(), row.ok),
        ("grok_direct", "degraded", true)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_budget_store_no_model_is_called() {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    let h = harness_with_limits("").await;
    let path = h.db.url.trim_start_matches("sqlite://").to_string();
    let mut conn = diesel::SqliteConnection::establish(&path).unwrap();
    conn.batch_execute("DROP TABLE budget_reservations")
        .unwrap();
    h.put_txn(
        "f1",
        vec![text_event(
            "$f1",
            "!dm:example.org",
            ALICE,
            "tell me about otters",
        )],
    )
    .await;
    h.settle().await;
    assert!(h.xai.seen().is_empty(), "fail closed");
    let body = h.hs.sent()[0].body["body"].as_str().unwrap().to_string();
    assert!(body.contains("temporarily unavailable"), "{body}");
    assert_eq!(h.row("$f1").await.degraded, "reserve_error");
}

#[tokio::test(flavor = "multi_thread")]
async fn settling_past_the_ceiling_is_shown_as_overshoot() {
    for db in db::all() {
        let store = open(&db).await;
        let config = Config::parse(
            "homeserver: {url: 'http://h', server_name: example.org}\n\
             limits: {daily_ceiling_usd: 0.000001, per_user_daily_usd: 1}\n",
        )
        .unwrap();
        let ceiling = TICKS_PER_USD / 1_000_000;
        let (clk, _) = clock("2026-11-28T10:00:00Z");
        let limiter = Limiter::new(&config, store.clone(), clk);
        let plan = Plan {
            route: Route::GrokDirect,
            output_cap: None,
            estimate_ticks: ceiling / 2,
            shrunk: false,
        };
        let Admission::Granted { reservation_id, .. } =
            limiter.reserve("$a", "@u:example.org", &[plan]).await
        else {
            panic!("[{}] half the ceiling fits", db.label)
        };
        let before = store.backlog(limiter.today()).await.unwrap();
        assert_eq!(before.overshoot_ticks, 0, "[{}]", db.label);
        assert_eq!(before.spent_ticks, 0, "[{}] held is not spent", db.label);
        // The real cost came out larger than the whole ceiling.
        limiter
            .settle(&reservation_id, ceiling + 777)
            .await
            .unwrap();
        let after = store.backlog(limiter.today()).await.unwrap();
        assert_eq!(after.overshoot_ticks, 777, "[{}]", db.label);
        assert_eq!(after.spent_ticks, ceiling + 777, "[{}]", db.label);
        assert_eq!(
            store
                .backlog("2026-11-29".into())
                .await
                .unwrap()
                .overshoot_ticks,
            0,
            "[{}] another day has its own ceiling",
            db.label
        );
        assert_books_balance(&store, "2026-11-28", db.label).await;
    }
}
