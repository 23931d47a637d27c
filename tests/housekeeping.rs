//! Housekeeping against every configured backend (SQLite always, PostgreSQL when
//! `TEST_DATABASE_URL` is set): what is pruned and what survives, batch sizes, the lease.
//! `db_growth` (ignored) measures what 10,000 answered messages leave in the database.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

use common::*;
use grok_appservice::housekeeping::{run_once, Table, LEASE};
use grok_appservice::store::budget::{Finish, ReserveRequest};
use grok_appservice::store::{
    now, ClaimKind, ClaimState, NewClaim, RequestLogRow, Store, TxnWrite,
};

/// A timestamp as both backends store it (Diesel's SQLite text format sorts like time).
fn at(offset: chrono::Duration) -> String {
    (now() + offset).format("%F %T%.f").to_string()
}

const OLD: &str = "2000-01-01 00:00:00";

enum Raw {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

/// A direct connection to the test database, for seeding rows with chosen timestamps and
/// reading back what is left.
fn raw(db: &db::TestDb) -> Raw {
    match db.url.strip_prefix("sqlite://") {
        Some(path) => Raw::Sqlite(SqliteConnection::establish(path).unwrap()),
        None => Raw::Postgres(PgConnection::establish(&db.url).unwrap()),
    }
}

#[derive(QueryableByName)]
struct Key {
    #[diesel(sql_type = Text)]
    k: String,
}

#[derive(QueryableByName)]
struct Size {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = BigInt)]
    bytes: i64,
}

impl Raw {
    fn exec(&mut self, sql: &str) {
        match self {
            Raw::Sqlite(c) => c.batch_execute(sql),
            Raw::Postgres(c) => c.batch_execute(sql),
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The sorted values of `expr` over `table`.
    fn keys(&mut self, table: &str, expr: &str) -> Vec<String> {
        let q = diesel::sql_query(format!("SELECT {expr} AS k FROM {table} ORDER BY k"));
        let rows: Vec<Key> = match self {
            Raw::Sqlite(c) => q.load(c),
            Raw::Postgres(c) => q.load(c),
        }
        .unwrap();
        rows.into_iter().map(|r| r.k).collect()
    }

    fn sizes(&mut self, sql: &str) -> Vec<Size> {
        let q = diesel::sql_query(sql);
        match self {
            Raw::Sqlite(c) => q.load(c),
            Raw::Postgres(c) => q.load(c),
        }
        .unwrap()
    }
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Old and new rows in every pruned table, including old rows that must survive.
fn seed(conn: &mut Raw) {
    let new = at(chrono::Duration::zero());
    let soon = at(chrono::Duration::hours(1));
    let just_expired = at(-chrono::Duration::minutes(1));
    let today = now().format("%Y-%m-%d").to_string();
    let claim = |id: &str, state: &str, updated: &str| {
        format!(
            "INSERT INTO processed_events (event_id, room_id, sender, kind, state, lease_owner, \
             lease_expires_at, attempts, origin_ts, created_at, updated_at) VALUES \
             ('{id}', '!r:x', '@a:x', 'addressed', '{state}', 'w', '{updated}', 1, '{updated}', \
             '{updated}', '{updated}');"
        )
    };
    let reservation = |id: &str, state: &str, finished: Option<&str>| {
        let finished = finished.map_or("NULL".to_string(), |f| format!("'{f}'"));
        format!(
            "INSERT INTO budget_reservations (id, day, user_id, amount_ticks, state, created_at, \
             expires_at, finished_at) VALUES ('{id}', '2000-01-01', '@a:x', 5, '{state}', \
             '{OLD}', '{OLD}', {finished});"
        )
    };
    let mut sql = format!(
        "INSERT INTO appservice_transactions (txn_id, event_count, received_at) VALUES ('t_old', 1, '{OLD}'), ('t_new', 1, '{new}');
         INSERT INTO bot_events (event_id, room_id, created_at) VALUES ('b_old', '!r:x', '{OLD}'), ('b_new', '!r:x', '{new}');
         INSERT INTO response_cache (cache_key, route, answer, created_at, expires_at) VALUES ('c_old', 'grok_direct', 'a', '{OLD}', '{OLD}'),
             ('c_just_expired', 'grok_direct', 'a', '{OLD}', '{just_expired}'),
             ('c_live', 'grok_direct', 'a', '{new}', '{soon}');
         INSERT INTO room_notices (room_id, reason, last_sent_at) VALUES ('!old:x', 'media', '{OLD}'), ('!new:x', 'media', '{new}');
         INSERT INTO budget_counters (day, scope, cap_ticks) VALUES ('2000-01-01', 'global', 1),
             ('2000-01-01', 'user:@a:x', 1), ('{today}', 'global', 1), ('{today}', 'user:@a:x', 1);
        "
    );
    for (id, state, updated) in [
        ("e_old_answered", ClaimState::Answered, OLD),
        ("e_old_failed", ClaimState::Failed, OLD),
        ("e_old_done", ClaimState::Done, OLD),
        ("e_old_claimed", ClaimState::Claimed, OLD),
        ("e_old_sending", ClaimState::Sending, OLD),
        ("e_new_answered", ClaimState::Answered, new.as_str()),
    ] {
        sql.push_str(&claim(id, state.as_str(), updated));
    }
    for (id, state, finished) in [
        ("r_old_settled", "settled", Some(OLD)),
        ("r_old_released", "released", Some(OLD)),
        ("r_old_expired", "expired", Some(OLD)),
        ("r_old_held", "held", None),
        ("r_new_settled", "settled", Some(new.as_str())),
    ] {
        sql.push_str(&reservation(id, state, finished));
    }
    conn.exec(&sql);
}

#[tokio::test(flavor = "multi_thread")]
async fn old_rows_are_pruned_and_everything_else_survives() {
    for db in db::all() {
        let label = db.label;
        let h = Harness::with(db, |_| {}).await;
        let mut conn = raw(&h.db);
        seed(&mut conn);

        let report = run_once(&h.state).await;
        assert!(report.ran, "[{label}] the only replica takes the lease");
        let expected = [
            (Table::Transactions, 1),
            (Table::Claims, 3),
            (Table::BotEvents, 1),
            (Table::Cache, 2),
            (Table::Reservations, 3),
            (Table::Notices, 1),
            (Table::BudgetCounters, 2),
        ];
        for (table, n) in expected {
            assert_eq!(report.deleted(table), n, "[{label}] {}", table.as_str());
            let metric = h
                .state
                .metrics
                .get("housekeeping_deleted_total", &[("table", table.as_str())]);
            assert_eq!(metric, n as u64, "[{label}] metric of {}", table.as_str());
        }

        let left = |conn: &mut Raw, table: &str, key: &str| conn.keys(table, key);
        assert_eq!(
            left(&mut conn, "appservice_transactions", "txn_id"),
            strs(&["t_new"])
        );
        assert_eq!(
            left(&mut conn, "processed_events", "event_id"),
            strs(&["e_new_answered", "e_old_claimed", "e_old_sending"]),
            "[{label}] unfinished claims are never deleted"
        );
        assert_eq!(left(&mut conn, "bot_events", "event_id"), strs(&["b_new"]));
        assert_eq!(
            left(&mut conn, "response_cache", "cache_key"),
            strs(&["c_live"])
        );
        assert_eq!(
            left(&mut conn, "budget_reservations", "id"),
            strs(&["r_new_settled", "r_old_held"]),
            "[{label}] held reservations are never deleted"
        );
        assert_eq!(
            left(&mut conn, "room_notices", "room_id"),
            strs(&["!new:x"])
        );
        let today = now().format("%Y-%m-%d").to_string();
        assert_eq!(
            left(&mut conn, "budget_counters", "day || ' ' || scope"),
            vec![format!("{today} global"), format!("{today} user:@a:x")]
        );

        // A second run finds nothing more.
        let again = run_once(&h.state).await;
        assert!(again.ran, "[{label}] the holder renews its own lease");
        assert!(
            again.deleted.iter().all(|(_, n)| *n == 0),
            "[{label}] {again:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_keeps_a_table_and_the_cache_grace_is_honoured() {
    let h = Harness::with(db::sqlite(), |c| {
        c.retention.claims = Duration::ZERO;
        c.retention.cache = Duration::from_secs(3600);
    })
    .await;
    let mut conn = raw(&h.db);
    seed(&mut conn);
    let report = run_once(&h.state).await;
    assert!(report.deleted.iter().all(|(t, _)| *t != Table::Claims));
    assert_eq!(conn.keys("processed_events", "event_id").len(), 6);
    assert_eq!(
        conn.keys("response_cache", "cache_key"),
        strs(&["c_just_expired", "c_live"]),
        "an answer expired a minute ago is kept for the hour of grace"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prune_deletes_at_most_one_batch() {
    for db in db::all() {
        let label = db.label;
        let store = Store::connect(&db.url, 2).unwrap();
        store.migrate().await.unwrap();
        let mut conn = raw(&db);
        for i in 0..5 {
            conn.exec(&format!(
                "INSERT INTO appservice_transactions (txn_id, event_count, received_at) VALUES ('t{i}', 1, '{OLD}');
                 INSERT INTO room_notices (room_id, reason, last_sent_at) VALUES ('!r{i}:x', 'media', '{OLD}');"
            ));
        }
        let cutoff = now() - chrono::Duration::days(1);
        let mut passes = Vec::new();
        loop {
            let n = store.prune_transactions(cutoff, 2).await.unwrap();
            passes.push(n);
            if n < 2 {
                break;
            }
        }
        assert_eq!(passes, [2, 2, 1], "[{label}] transactions");
        let mut passes = Vec::new();
        loop {
            let n = store.prune_notices(cutoff, 2).await.unwrap();
            passes.push(n);
            if n < 2 {
                break;
            }
        }
        assert_eq!(passes, [2, 2, 1], "[{label}] notices (two-column key)");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_works_in_batches_of_the_configured_size() {
    let h = Harness::with(db::sqlite(), |c| c.retention.batch = 2).await;
    let mut conn = raw(&h.db);
    for i in 0..5 {
        conn.exec(&format!(
            "INSERT INTO bot_events (event_id, room_id, created_at) VALUES ('b{i}', '!r:x', '{OLD}');"
        ));
    }
    // A reply window from long ago, and one of this minute (which stays).
    conn.exec(&format!(
        "INSERT INTO room_answer_windows (room_id, window_start, answers) VALUES \
         ('!r:x', '{OLD}', 3), ('!r:x', '{}', 1);",
        grok_appservice::store::now().format("%Y-%m-%d %H:%M:00")
    ));
    let report = run_once(&h.state).await;
    assert_eq!(report.deleted(Table::BotEvents), 5);
    assert_eq!(report.deleted(Table::AnswerWindows), 1);
    // Three passes over bot_events, one (short) pass over each of the other seven tables.
    assert_eq!(report.batches, 3 + 7, "{report:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_replica_at_a_time_holds_the_lease() {
    for db in db::all() {
        let label = db.label;
        let a = Harness::with(db, |_| {}).await;
        let b = a.restart().await;
        assert_ne!(a.state.instance_id, b.state.instance_id);
        let (ra, rb) = tokio::join!(run_once(&a.state), run_once(&b.state));
        assert!(ra.ran ^ rb.ran, "[{label}] exactly one runs: {ra:?} {rb:?}");

        // Many independent pools racing for a fresh lease: exactly one wins.
        let mut racers = Vec::new();
        for i in 0..8 {
            let store = Store::connect(&a.state.config.database.url, 1).unwrap();
            racers.push(tokio::spawn(async move {
                store
                    .take_lease("race".into(), format!("r{i}"), Duration::from_secs(60))
                    .await
                    .unwrap()
            }));
        }
        let mut winners = 0;
        for r in racers {
            winners += usize::from(r.await.unwrap());
        }
        assert_eq!(winners, 1, "[{label}]");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_lease_is_taken_over() {
    for db in db::all() {
        let label = db.label;
        let h = Harness::with(db, |_| {}).await;
        let store = &h.state.store;
        let ttl = Duration::from_millis(300);
        assert!(store
            .take_lease(LEASE.into(), "dead".into(), ttl)
            .await
            .unwrap());
        assert!(
            store
                .take_lease(LEASE.into(), "dead".into(), ttl)
                .await
                .unwrap(),
            "[{label}] the holder renews"
        );
        assert!(
            !run_once(&h.state).await.ran,
            "[{label}] a live lease of another replica is respected"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            run_once(&h.state).await.ran,
            "[{label}] an expired lease is taken over"
        );
        assert!(
            !store
                .take_lease(LEASE.into(), "dead".into(), ttl)
                .await
                .unwrap(),
            "[{label}] the old holder cannot take it back while the new one holds it"
        );
    }
}

const MESSAGES: usize = 10_000;
const USERS: usize = 100;
/// One in this many answers goes to the response cache (cacheable routes).
const CACHED_EVERY: usize = 3;

fn event_id(prefix: &str, i: usize) -> String {
    // Matrix event ids of room v4+ are `$` and 43 characters of unpadded base64.
    format!("${prefix}{i:0>42}")
}

/// Writes, through the store, what `count` answered messages leave behind.
async fn answer_messages(store: &Store, from: usize, count: usize) {
    let day = now().format("%Y-%m-%d").to_string();
    let mut logs = Vec::new();
    for i in from..from + count {
        let event = event_id("q", i);
        let reply = event_id("a", i);
        let room = format!("!room{:0>18}:example.org", i % 50);
        let user = format!("@user{:04}:example.org", i % USERS);
        let write = TxnWrite {
            txn_id: format!("{}", 1_700_000_000_000u64 + i as u64),
            event_count: 1,
            claims: vec![NewClaim {
                event_id: event.clone(),
                room_id: room.clone(),
                sender: user.clone(),
                kind: ClaimKind::Addressed,
                origin_ts: now(),
                leased: true,
            }],
            ..Default::default()
        };
        store
            .commit_transaction(write, "grok-abcdef12".into(), Duration::from_secs(120))
            .await
            .unwrap();
        let t = now();
        store
            .budget_reserve(ReserveRequest {
                id: event.clone(),
                day: day.clone(),
                user_id: user.clone(),
                amount_ticks: 300_000_000,
                global_cap_ticks: i64::MAX / 4,
                user_cap_ticks: Some(i64::MAX / 4),
                requests_per_hour: None,
                now: t,
                expires_at: t + chrono::Duration::minutes(20),
            })
            .await
            .unwrap();
        store
            .budget_finish(event.clone(), Finish::Settled, 212_345_678, now())
            .await
            .unwrap();
        let fence = store.claim(event.clone()).await.unwrap().unwrap().fence();
        for to in [ClaimState::Sending, ClaimState::Answered] {
            let reply = (to == ClaimState::Answered).then(|| reply.clone());
            assert!(store
                .claim_transition(fence.clone(), to, Duration::from_secs(120), reply)
                .await
                .unwrap());
        }
        store.record_bot_event(reply, room.clone()).await.unwrap();
        if i % CACHED_EVERY == 0 {
            store
                .cache_put(
                    format!("{:064x}", i as u128 * 0x9e37_79b9_7f4a_7c15),
                    "grok_direct".into(),
                    "An answer of about a thousand characters. ".repeat(24),
                    Duration::from_secs(3600),
                )
                .await
                .unwrap();
        }
        logs.push(RequestLogRow {
            id: event,
            room_id: room,
            sender: user,
            route: "grok_direct".into(),
            router_source: "heuristic".into(),
            router_confidence: 0.82,
            models: r#"{"router":"","final":"grok-4.3"}"#.into(),
            prompt_tokens: 850,
            cached_tokens: 512,
            completion_tokens: 240,
            cost_final_ticks: 212_345_678,
            cost_total_ticks: 212_345_678,
            cost_source: "provider".into(),
            latency_ms: 2150,
            stage_ms: r#"{"final":2100}"#.into(),
            prompt_version: "v3".into(),
            provider_request_id: format!("{:032x}", i as u128 * 0x1234_5678_9abc),
            ok: true,
            created_at: now(),
            ..Default::default()
        });
        if logs.len() == 200 {
            store
                .upsert_request_logs(std::mem::take(&mut logs))
                .await
                .unwrap();
        }
    }
    store.upsert_request_logs(logs).await.unwrap();
}

/// Bytes per table (its indexes included) as the backend reports them.
fn table_sizes(db: &db::TestDb, conn: &mut Raw) -> (BTreeMap<String, i64>, Option<i64>) {
    const TABLES: &str = "'appservice_transactions','processed_events','bot_events',\
                          'request_log','response_cache','budget_counters','budget_reservations'";
    match conn {
        Raw::Sqlite(_) => {
            conn.exec("PRAGMA wal_checkpoint(TRUNCATE);");
            let rows = conn.sizes(&format!(
                "SELECT m.tbl_name AS name, CAST(SUM(s.pgsize) AS BIGINT) AS bytes \
                 FROM dbstat s JOIN sqlite_master m ON m.name = s.name \
                 WHERE m.tbl_name IN ({TABLES}) GROUP BY m.tbl_name"
            ));
            let path = db.url.strip_prefix("sqlite://").unwrap();
            let file = std::fs::metadata(path).unwrap().len() as i64;
            (
                rows.into_iter().map(|r| (r.name, r.bytes)).collect(),
                Some(file),
            )
        }
        Raw::Postgres(_) => {
            conn.exec("VACUUM ANALYZE;");
            let rows = conn.sizes(&format!(
                "SELECT c.relname::TEXT AS name, pg_total_relation_size(c.oid)::BIGINT AS bytes \
                 FROM pg_class c WHERE c.relkind = 'r' AND c.relname IN ({TABLES}) \
                 AND c.relnamespace = to_regnamespace(current_schema())::oid"
            ));
            (rows.into_iter().map(|r| (r.name, r.bytes)).collect(), None)
        }
    }
}

/// What 10,000 answered messages leave in the database, per table:
/// `cargo test -j1 --test housekeeping -- --ignored db_growth --nocapture`
/// (PostgreSQL too when `TEST_DATABASE_URL` is set).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement: run on demand"]
async fn db_growth() {
    for db in db::all() {
        let store = Store::connect(&db.url, 8).unwrap();
        store.migrate().await.unwrap();
        let mut conn = raw(&db);
        let (before, file_before) = table_sizes(&db, &mut conn);
        let started = Instant::now();
        let workers = if db.label == "sqlite" { 1 } else { 8 };
        let per = MESSAGES / workers;
        let mut tasks = Vec::new();
        for w in 0..workers {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                answer_messages(&store, w * per, per).await
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let took = started.elapsed();
        let (after, file_after) = table_sizes(&db, &mut conn);
        println!(
            "\n[{}] {MESSAGES} answered messages ({USERS} users, 1 in {CACHED_EVERY} cached) \
             written in {:.1}s",
            db.label,
            took.as_secs_f64()
        );
        println!("{:<26} {:>12} {:>14}", "table", "bytes", "bytes/message");
        let mut total = 0;
        for (name, bytes) in &after {
            let grown = bytes - before.get(name).copied().unwrap_or(0);
            total += grown;
            println!(
                "{name:<26} {grown:>12} {:>14.0}",
                grown as f64 / MESSAGES as f64
            );
        }
        println!(
            "{:<26} {total:>12} {:>14.0}",
            "all tables",
            total as f64 / MESSAGES as f64
        );
        if let (Some(a), Some(b)) = (file_after, file_before) {
            println!(
                "SQLite file after checkpoint: {a} bytes (grew {} bytes)",
                a - b
            );
        }
    }
}
