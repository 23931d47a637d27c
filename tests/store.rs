//! The store against every configured backend: SQLite always, PostgreSQL when
//! `TEST_DATABASE_URL` is set. Each scenario runs once per backend; failures name the backend.

#[path = "common/db.rs"]
mod db;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{NaiveDate, NaiveDateTime};

use grok_appservice::store::{
    now, redact_url, ClaimKind, ClaimState, DatabaseKind, Fence, MemberChange, NewClaim,
    RequestLogRow, Store, StoreError, TxnWrite,
};

const HOUR: Duration = Duration::from_secs(3600);

/// A migrated store on `db`.
async fn open(db: &db::TestDb) -> Store {
    let store = Store::connect(&db.url, 4)
        .unwrap_or_else(|e| panic!("[{}] connect {}: {e}", db.label, db.url));
    store
        .migrate()
        .await
        .unwrap_or_else(|e| panic!("[{}] migrate: {e}", db.label));
    store
}

/// A second, independent instance (its own pool) on the same database, as a replica would be.
fn replica(db: &db::TestDb) -> Store {
    Store::connect(&db.url, 4).unwrap_or_else(|e| panic!("[{}] connect: {e}", db.label))
}

fn claim(event_id: &str, room_id: &str, kind: ClaimKind) -> NewClaim {
    NewClaim {
        event_id: event_id.into(),
        room_id: room_id.into(),
        sender: "@alice:example.org".into(),
        kind,
        origin_ts: now(),
        leased: true,
    }
}

fn txn(txn_id: &str, claims: Vec<NewClaim>) -> TxnWrite {
    TxnWrite {
        txn_id: txn_id.into(),
        event_count: claims.len() as i32,
        claims,
        ..Default::default()
    }
}

fn join(room_id: &str, user_id: &str, joined: bool) -> MemberChange {
    MemberChange {
        room_id: room_id.into(),
        user_id: user_id.into(),
        joined,
    }
}

fn ids(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `a` and `b` within `tol` of each other (backends differ in sub-second precision).
fn close(a: NaiveDateTime, b: NaiveDateTime, tol: chrono::Duration) -> bool {
    (a - b).abs() <= tol
}

fn ms(n: i64) -> chrono::Duration {
    chrono::Duration::milliseconds(n)
}

/// A timestamp with microsecond precision, which both backends store exactly.
fn ts(h: u32, m: u32, s: u32, micro: u32) -> NaiveDateTime {
    NaiveDate::from_ymd_opt(2026, 11, 28)
        .unwrap()
        .and_hms_micro_opt(h, m, s, micro)
        .unwrap()
}

#[test]
fn database_kind_from_url() {
    assert_eq!(
        DatabaseKind::from_url("sqlite:///var/lib/grok/app.db").unwrap(),
        DatabaseKind::Sqlite("/var/lib/grok/app.db".into())
    );
    assert_eq!(
        DatabaseKind::from_url("sqlite://grok-appservice.db").unwrap(),
        DatabaseKind::Sqlite("grok-appservice.db".into())
    );
    for url in [
        "postgres://grok:pw@db.internal:5432/grok",
        "postgresql://grok@db/grok?sslmode=require",
    ] {
        assert_eq!(
            DatabaseKind::from_url(url).unwrap(),
            DatabaseKind::Postgres(url.into()),
            "{url}"
        );
    }
    for url in [
        "mysql://grok:pw@db/grok",
        "sqlite://",
        "sqlite://:memory:",
        "grok-appservice.db",
        "/var/lib/grok/app.db",
        "sqlite:app.db",
        "",
    ] {
        assert!(
            matches!(DatabaseKind::from_url(url), Err(StoreError::BadUrl(_))),
            "{url:?} must be rejected"
        );
    }
    // The error for an unknown scheme must not echo the password.
    let err = DatabaseKind::from_url("mysql://grok:hunter2@db/grok").unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(
        err.to_string().contains("mysql://grok:***@db/grok"),
        "{err}"
    );
}

#[test]
fn redact_url_hides_password() {
    let r = redact_url("postgres://grok:s3cret@db.internal:5432/grok");
    assert_eq!(r, "postgres://grok:***@db.internal:5432/grok");
    // A password containing '@' and ':' is still hidden entirely.
    let r = redact_url("postgres://grok:p@ss:w0rd@db/grok");
    assert!(!r.contains("p@ss") && !r.contains("w0rd"), "{r}");
    assert!(r.starts_with("postgres://grok:***@db/grok"), "{r}");
    // Nothing to hide: unchanged.
    for url in [
        "postgres://grok@db/grok",
        "postgres://db/grok",
        "sqlite:///tmp/x.db",
    ] {
        assert_eq!(redact_url(url), url);
    }
}

/// libpq also takes the password as a query parameter; it must not be shown either.
#[test]
fn redact_url_hides_password_query_parameter() {
    let r = redact_url("postgres://grok@db/grok?sslmode=require&password=s3cret");
    assert!(!r.contains("s3cret"), "{r}");
    assert!(r.contains("sslmode=require"), "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_rejects_bad_urls() {
    for url in [
        "mysql://u:pw@h/db",
        "sqlite://",
        "sqlite://:memory:",
        "app.db",
    ] {
        assert!(
            matches!(Store::connect(url, 1), Err(StoreError::BadUrl(_))),
            "{url:?} must be rejected"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_postgres_is_unavailable() {
    // Lazy: connecting builds the pool without touching the server.
    let store = Store::connect("postgres://postgres@127.0.0.1:1/test", 1)
        .expect("connect to PostgreSQL is lazy");
    assert_eq!(store.backend_name(), "postgres");
    match store.ping().await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("ping of an unreachable PostgreSQL: want Unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_is_idempotent() {
    for db in db::all() {
        let l = db.label;
        let store = Store::connect(&db.url, 2).unwrap();
        assert_eq!(store.backend_name(), l);
        let first = store.migrate().await.unwrap();
        assert!(first > 0, "[{l}] a fresh database applies migrations");
        assert_eq!(store.migrate().await.unwrap(), 0, "[{l}] second run");
        // Another instance on the same database also finds nothing to do.
        assert_eq!(replica(&db).migrate().await.unwrap(), 0, "[{l}] replica");
        store.ping().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_migrations_on_postgres_take_turns() {
    for _round in 0..3 {
        // A fresh schema each round, so the replicas really race for the same migrations.
        let Some(db) = db::postgres() else {
            eprintln!("TEST_DATABASE_URL unset: skipping the PostgreSQL migration race");
            return;
        };
        let db = &db;
        let stores: Vec<Store> = (0..3).map(|_| replica(db)).collect();
        let results = futures_join(stores.iter().map(|s| {
            let s = s.clone();
            async move { s.migrate().await }
        }))
        .await;
        let mut applied: Vec<usize> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("[postgres] concurrent migrate: {e}")))
            .collect();
        applied.sort();
        assert_eq!(applied[0], 0, "[postgres] {applied:?}");
        assert_eq!(applied[1], 0, "[postgres] {applied:?}");
        assert!(
            applied[2] > 0,
            "[postgres] one replica applies: {applied:?}"
        );
        stores[0].ping().await.unwrap();
        assert_eq!(stores[1].migrate().await.unwrap(), 0);
    }
}

/// Runs the futures concurrently on the runtime and returns their outputs in order.
async fn futures_join<F>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task panicked"));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn commit_transaction_claims_once() {
    for db in db::all() {
        let l = db.label;
        let store = open(&db).await;
        store
            .set_room(
                "!r:x".into(),
                false,
                ids(&["@grok:x", "@alice:x", "@carol:x"]),
            )
            .await
            .unwrap();
        assert!(!store.txn_seen("t1".into()).await.unwrap(), "[{l}]");

        let mut write = txn(
            "t1",
            vec![
                claim("$e1", "!r:x", ClaimKind::Addressed),
                claim("$e2", "!r:x", ClaimKind::Invite),
            ],
        );
        let origin = write.claims[0].origin_ts;
        write.bot_events = vec![("$b1".into(), "!r:x".into())];
        write.member_changes = vec![
            join("!r:x", "@bob:x", true),
            join("!r:x", "@alice:x", false),
        ];
        let before = now();
        let got = store
            .commit_transaction(write, "w1".into(), HOUR)
            .await
            .unwrap();
        assert_eq!(got, Some(ids(&["$e1", "$e2"])), "[{l}] new txn");
        assert!(store.txn_seen("t1".into()).await.unwrap(), "[{l}]");
        assert!(!store.txn_seen("t2".into()).await.unwrap(), "[{l}]");

        let row = store.claim("$e1".into()).await.unwrap().expect("claim $e1");
        assert_eq!(row.event_id, "$e1");
        assert_eq!(row.room_id, "!r:x");
        assert_eq!(row.sender, "@alice:example.org");
        assert_eq!(row.kind, "addressed", "[{l}]");
        assert_eq!(row.state, "claimed", "[{l}]");
        assert_eq!(row.lease_owner, "w1", "[{l}]");
        assert_eq!(row.attempts, 1, "[{l}]");
        assert_eq!(row.reply_event_id, None, "[{l}]");
        assert!(close(row.origin_ts, origin, ms(1)), "[{l}] origin_ts");
        assert!(
            close(
                row.lease_expires_at,
                before + chrono::Duration::hours(1),
                ms(5_000)
            ),
            "[{l}] lease {} vs {}",
            row.lease_expires_at,
            before
        );
        assert!(close(row.created_at, before, ms(5_000)), "[{l}] created_at");
        let invite = store.claim("$e2".into()).await.unwrap().unwrap();
        assert_eq!(invite.kind, "invite", "[{l}]");

        // Membership changes and echoes were persisted with the txn.
        let facts = store
            .room_facts(ids(&["!r:x"]), ids(&["$b1", "$e1", "$nope"]))
            .await
            .unwrap();
        assert_eq!(
            facts.rooms.get("!r:x"),
            Some(&(false, 3)),
            "[{l}] grok, carol, bob"
        );
        assert_eq!(
            facts.bot_events,
            HashSet::from(["$b1".to_string()]),
            "[{l}]"
        );

        // The same txn again: None, and none of its (different) content is written.
        let mut again = txn("t1", vec![claim("$e3", "!r:x", ClaimKind::Addressed)]);
        again.bot_events = vec![("$b2".into(), "!r:x".into())];
        again.member_changes = vec![join("!r:x", "@dave:x", true)];
        let got = store
            .commit_transaction(again, "w2".into(), HOUR)
            .await
            .unwrap();
        assert_eq!(got, None, "[{l}] repeated txn");
        assert!(store.claim("$e3".into()).await.unwrap().is_none(), "[{l}]");
        let facts = store
            .room_facts(ids(&["!r:x"]), ids(&["$b2"]))
            .await
            .unwrap();
        assert_eq!(facts.rooms.get("!r:x"), Some(&(false, 3)), "[{l}]");
        assert!(facts.bot_events.is_empty(), "[{l}] $b2 must not be written");

        // A later txn carrying an already claimed event gets only the new one, and the old
        // claim keeps its owner.
        let got = store
            .commit_transaction(
                txn(
                    "t2",
                    vec![
                        claim("$e1", "!r:x", ClaimKind::Addressed),
                        claim("$e4", "!r:x", ClaimKind::Skip),
                    ],
                ),
                "w2".into(),
                HOUR,
            )
            .await
            .unwrap();
        assert_eq!(got, Some(ids(&["$e4"])), "[{l}] only the new event");
        let row = store.claim("$e1".into()).await.unwrap().unwrap();
        assert_eq!((row.lease_owner.as_str(), row.attempts), ("w1", 1), "[{l}]");
        assert_eq!(
            store.claim("$e4".into()).await.unwrap().unwrap().kind,
            "skip"
        );

        // A txn with no claims is still recorded.
        let got = store
            .commit_transaction(txn("t3", vec![]), "w1".into(), HOUR)
            .await
            .unwrap();
        assert_eq!(got, Some(vec![]), "[{l}] empty txn");
        assert!(store.txn_seen("t3".into()).await.unwrap(), "[{l}]");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_commits_of_one_txn_claim_once() {
    for db in db::all() {
        let l = db.label;
        let a = open(&db).await;
        let b = replica(&db);
        a.set_room("!r:x".into(), false, vec![]).await.unwrap();
        let results = futures_join((0..8).map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let mut write = txn(
                "tc",
                vec![
                    claim("$c1", "!r:x", ClaimKind::Addressed),
                    claim("$c2", "!r:x", ClaimKind::Addressed),
                ],
            );
            write.bot_events = vec![("$bc".into(), "!r:x".into())];
            write.member_changes = vec![join("!r:x", "@bob:x", true)];
            async move { store.commit_transaction(write, format!("w{i}"), HOUR).await }
        }))
        .await;
        let results: Vec<_> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("[{l}] concurrent commit: {e}")))
            .collect();
        let winners: Vec<_> = results.iter().flatten().collect();
        assert_eq!(
            winners.len(),
            1,
            "[{l}] exactly one commit wins: {results:?}"
        );
        assert_eq!(*winners[0], ids(&["$c1", "$c2"]), "[{l}]");
        assert!(b.txn_seen("tc".into()).await.unwrap(), "[{l}]");
        let facts = b.room_facts(ids(&["!r:x"]), ids(&["$bc"])).await.unwrap();
        assert_eq!(facts.rooms.get("!r:x"), Some(&(false, 1)), "[{l}]");
        assert_eq!(facts.bot_events.len(), 1, "[{l}]");
        // Both claims belong to the one winner.
        let c1 = a.claim("$c1".into()).await.unwrap().unwrap();
        let c2 = a.claim("$c2".into()).await.unwrap().unwrap();
        assert_eq!(c1.lease_owner, c2.lease_owner, "[{l}]");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_txns_sharing_an_event_claim_it_once() {
    for db in db::all() {
        let l = db.label;
        let a = open(&db).await;
        let b = replica(&db);
        let results = futures_join((0..8).map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let write = txn(
                &format!("td{i}"),
                vec![
                    claim("$shared", "!r:x", ClaimKind::Addressed),
                    claim(&format!("$own{i}"), "!r:x", ClaimKind::Addressed),
                ],
            );
            async move { store.commit_transaction(write, format!("w{i}"), HOUR).await }
        }))
        .await;
        let mut shared = 0;
        for (i, r) in results.into_iter().enumerate() {
            let got = r
                .unwrap_or_else(|e| panic!("[{l}] commit td{i}: {e}"))
                .unwrap_or_else(|| panic!("[{l}] td{i} is a new txn"));
            assert!(got.contains(&format!("$own{i}")), "[{l}] td{i}: {got:?}");
            if got.contains(&"$shared".to_string()) {
                shared += 1;
                let row = a.claim("$shared".into()).await.unwrap().unwrap();
                assert_eq!(row.lease_owner, format!("w{i}"), "[{l}]");
            }
        }
        assert_eq!(shared, 1, "[{l}] $shared claimed by exactly one txn");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn room_facts_and_rooms() {
    for db in db::all() {
        let l = db.label;
        let store = open(&db).await;
        store
            .set_room("!a:x".into(), false, ids(&["@u1:x", "@u2:x", "@u3:x"]))
            .await
            .unwrap();
        store
            .set_room("!d:x".into(), true, ids(&["@grok:x", "@alice:x"]))
            .await
            .unwrap();
        store.set_room("!e:x".into(), false, vec![]).await.unwrap();
        let facts = store
            .room_facts(ids(&["!a:x", "!d:x", "!e:x", "!unknown:x"]), vec![])
            .await
            .unwrap();
        let want: HashMap<String, (bool, i64)> = [
            ("!a:x".to_string(), (false, 3)),
            ("!d:x".to_string(), (true, 2)),
            ("!e:x".to_string(), (false, 0)),
        ]
        .into();
        assert_eq!(facts.rooms, want, "[{l}]");
        assert!(facts.bot_events.is_empty(), "[{l}]");

        // Only asked rooms are returned.
        let facts = store.room_facts(ids(&["!d:x"]), vec![]).await.unwrap();
        assert_eq!(facts.rooms.len(), 1, "[{l}]");
        let facts = store.room_facts(vec![], vec![]).await.unwrap();
        assert!(facts.rooms.is_empty(), "[{l}]");

        // set_room replaces members and the direct flag.
        store
            .set_room("!a:x".into(), true, ids(&["@u1:x", "@u1:x"]))
            .await
            .unwrap();
        let facts = store.room_facts(ids(&["!a:x"]), vec![]).await.unwrap();
        assert_eq!(facts.rooms.get("!a:x"), Some(&(true, 1)), "[{l}]");

        // Reply targets: only events the bot sent.
        store
            .record_bot_event("$b1".into(), "!a:x".into())
            .await
            .unwrap();
        store
            .record_bot_event("$b1".into(), "!a:x".into())
            .await
            .expect("recording an echo twice is fine");
        store
            .record_bot_event("$b2".into(), "!d:x".into())
            .await
            .unwrap();
        let facts = store
            .room_facts(vec![], ids(&["$b1", "$b2", "$user"]))
            .await
            .unwrap();
        assert_eq!(
            facts.bot_events,
            HashSet::from(["$b1".to_string(), "$b2".to_string()]),
            "[{l}]"
        );

        // Forgetting a room removes it (and only it).
        store.forget_room("!a:x".into()).await.unwrap();
        store.forget_room("!never:x".into()).await.unwrap();
        let facts = store
            .room_facts(ids(&["!a:x", "!d:x"]), vec![])
            .await
            .unwrap();
        assert!(!facts.rooms.contains_key("!a:x"), "[{l}] forgotten");
        assert_eq!(facts.rooms.get("!d:x"), Some(&(true, 2)), "[{l}]");
        // Its members went with it: re-adding the room with a join counts just the new one.
        store.set_room("!a:x".into(), false, vec![]).await.unwrap();
        store
            .commit_transaction(
                TxnWrite {
                    txn_id: "tm".into(),
                    member_changes: vec![join("!a:x", "@new:x", true)],
                    ..Default::default()
                },
                "w".into(),
                HOUR,
            )
            .await
            .unwrap();
        let facts = store.room_facts(ids(&["!a:x"]), vec![]).await.unwrap();
        assert_eq!(facts.rooms.get("!a:x"), Some(&(false, 1)), "[{l}]");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn notice_slots() {
    for db in db::all() {
        let l = db.label;
        let store = open(&db).await;
        let take = |room: &str, reason: &str, window: Duration| {
            store.take_notice_slot(room.into(), reason.into(), window)
        };
        assert!(take("!r:x", "budget", HOUR).await.unwrap(), "[{l}] first");
        assert!(!take("!r:x", "budget", HOUR).await.unwrap(), "[{l}] again");
        // Other reason, other room: independent.
        assert!(take("!r:x", "unsupported", HOUR).await.unwrap(), "[{l}]");
        assert!(take("!s:x", "budget", HOUR).await.unwrap(), "[{l}]");
        assert!(!take("!s:x", "budget", HOUR).await.unwrap(), "[{l}]");
        // A zero window always allows.
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(
            take("!r:x", "budget", Duration::ZERO).await.unwrap(),
            "[{l}]"
        );

        // A short window: closed inside it, open again after it.
        let w = Duration::from_millis(400);
        assert!(take("!t:x", "budget", w).await.unwrap(), "[{l}]");
        assert!(!take("!t:x", "budget", w).await.unwrap(), "[{l}]");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            take("!t:x", "budget", w).await.unwrap(),
            "[{l}] after the window"
        );
        assert!(
            !take("!t:x", "budget", w).await.unwrap(),
            "[{l}] window restarted"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_notice_takers_get_one_slot() {
    for db in db::all() {
        let l = db.label;
        let a = open(&db).await;
        let b = replica(&db);
        for round in 0..2 {
            // Round 0 races the insert of a new row, round 1 the update of an expired one.
            let window = if round == 0 {
                HOUR
            } else {
                Duration::from_millis(300)
            };
            if round == 1 {
                assert!(a
                    .take_notice_slot("!r:x".into(), "r1".into(), window)
                    .await
                    .unwrap());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let reason = format!("r{round}");
            let results = futures_join((0..8).map(|i| {
                let store = if i % 2 == 0 { a.clone() } else { b.clone() };
                let reason = reason.clone();
                async move { store.take_notice_slot("!r:x".into(), reason, window).await }
            }))
            .await;
            let won = results
                .into_iter()
                .map(|r| r.unwrap_or_else(|e| panic!("[{l}] take_notice_slot: {e}")))
                .filter(|w| *w)
                .count();
            assert_eq!(won, 1, "[{l}] round {round}: exactly one taker");
        }
    }
}

/// Moves a claim through `states` with the fence of whoever holds it now, leaving its lease
/// expired.
async fn drive(store: &Store, event_id: &str, states: &[ClaimState]) {
    for to in states {
        let fence = store.claim(event_id.into()).await.unwrap().unwrap().fence();
        assert!(
            store
                .claim_transition(fence, *to, Duration::ZERO, None)
                .await
                .unwrap(),
            "{event_id} -> {to:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn claims_are_fenced_through_their_life() {
    for db in db::all() {
        let l = db.label;
        let store = open(&db).await;
        store
            .commit_transaction(
                txn("t1", vec![claim("$e1", "!r:x", ClaimKind::Addressed)]),
                "w1".into(),
                HOUR,
            )
            .await
            .unwrap();
        let created = store.claim("$e1".into()).await.unwrap().unwrap();
        assert_eq!(
            (created.generation, created.state.as_str()),
            (1, "claimed"),
            "[{l}]"
        );
        let mine = created.fence();
        let stranger = Fence {
            owner: "w2".into(),
            ..mine.clone()
        };
        let stale = Fence {
            generation: 0,
            ..mine.clone()
        };
        for f in [&stranger, &stale] {
            assert!(!store.claim_renew(f.clone(), HOUR).await.unwrap(), "[{l}]");
            assert!(
                !store
                    .claim_transition(f.clone(), ClaimState::Answering, HOUR, None)
                    .await
                    .unwrap(),
                "[{l}] a wrong fence cannot move the claim"
            );
        }
        assert!(
            store.claim_renew(mine.clone(), HOUR).await.unwrap(),
            "[{l}]"
        );
        assert!(
            !store
                .claim_transition(mine.clone(), ClaimState::Answered, HOUR, None)
                .await
                .unwrap(),
            "[{l}] answered only from sending"
        );
        assert!(store
            .claim_transition(mine.clone(), ClaimState::Answering, HOUR, None)
            .await
            .unwrap());

        // Another replica takes the claim over: the old fence is dead everywhere.
        let path_expire = store.release_claims("w1".into()).await.unwrap();
        assert_eq!(path_expire, 1, "[{l}]");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let taken = store
            .take_expired_claims("w3".into(), HOUR, 10, vec![], vec![])
            .await
            .unwrap();
        assert_eq!(taken.len(), 1, "[{l}]");
        let theirs = taken[0].fence();
        assert_eq!(
            (theirs.owner.as_str(), theirs.generation),
            ("w3", 2),
            "[{l}]"
        );
        assert_eq!(taken[0].state, "answering", "[{l}] the state is kept");
        assert!(
            !store.claim_renew(mine.clone(), HOUR).await.unwrap(),
            "[{l}]"
        );
        assert!(
            !store
                .claim_store_outbox(mine.clone(), "{}".into(), HOUR)
                .await
                .unwrap(),
            "[{l}] the old holder cannot store a reply"
        );
        assert!(
            !store
                .claim_part_sent(mine.clone(), 0, "$x".into(), HOUR)
                .await
                .unwrap(),
            "[{l}]"
        );

        assert!(store
            .claim_store_outbox(theirs.clone(), "{\"parts\":[]}".into(), HOUR)
            .await
            .unwrap());
        let row = store.claim("$e1".into()).await.unwrap().unwrap();
        assert_eq!(row.state, "sending", "[{l}]");
        assert_eq!(row.outbox.as_deref(), Some("{\"parts\":[]}"), "[{l}]");
        assert!(store
            .claim_part_sent(theirs.clone(), 0, "$reply".into(), HOUR)
            .await
            .unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(store
            .claim_transition(theirs.clone(), ClaimState::Answered, HOUR, None)
            .await
            .unwrap());
        let row = store.claim("$e1".into()).await.unwrap().unwrap();
        assert_eq!(row.state, "answered", "[{l}]");
        assert_eq!(row.reply_event_id.as_deref(), Some("$reply"), "[{l}]");
        assert_eq!(row.sent_parts, 1, "[{l}]");
        assert!(
            row.outbox.is_none(),
            "[{l}] a finished claim keeps no reply text"
        );
        assert!(
            row.updated_at > created.updated_at,
            "[{l}] updated_at moves"
        );
        assert_eq!(row.created_at, created.created_at, "[{l}] created_at stays");

        // A final state is never left, and nothing renews it.
        for to in [ClaimState::Claimed, ClaimState::Sending, ClaimState::Failed] {
            assert!(
                !store
                    .claim_transition(theirs.clone(), to, HOUR, None)
                    .await
                    .unwrap(),
                "[{l}] answered -> {to:?}"
            );
        }
        assert!(
            !store.claim_renew(theirs.clone(), HOUR).await.unwrap(),
            "[{l}]"
        );
        let unknown = Fence {
            event_id: "$unknown".into(),
            ..theirs
        };
        assert!(!store
            .claim_transition(unknown, ClaimState::Done, HOUR, None)
            .await
            .unwrap());
        assert!(
            store.claim("$unknown".into()).await.unwrap().is_none(),
            "[{l}]"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_claims_are_taken_over_once() {
    for db in db::all() {
        let l = db.label;
        let store = open(&db).await;
        // Expired leases: $a (claimed), $s (sending), $ans (answered), $done, $fail.
        let expired = ["$a", "$s", "$ans", "$done", "$fail"];
        store
            .commit_transaction(
                txn(
                    "t1",
                    expired
                        .iter()
                        .map(|e| claim(e, "!r:x", ClaimKind::Addressed))
                        .collect(),
                ),
                "dead".into(),
                Duration::ZERO,
            )
            .await
            .unwrap();
        // An unexpired lease.
        store
            .commit_transaction(
                txn("t2", vec![claim("$live", "!r:x", ClaimKind::Addressed)]),
                "alive".into(),
                HOUR,
            )
            .await
            .unwrap();
        drive(&store, "$s", &[ClaimState::Sending]).await;
        drive(&store, "$ans", &[ClaimState::Sending, ClaimState::Answered]).await;
        drive(&store, "$done", &[ClaimState::Done]).await;
        drive(&store, "$fail", &[ClaimState::Failed]).await;
        tokio::time::sleep(Duration::from_millis(10)).await;

        let before = now();
        let taken = store
            .take_expired_claims("w2".into(), HOUR, 100, vec![], vec![])
            .await
            .unwrap();
        let mut got: Vec<&str> = taken.iter().map(|r| r.event_id.as_str()).collect();
        got.sort();
        assert_eq!(got, ["$a", "$s"], "[{l}] only unfinished, expired claims");
        for row in &taken {
            assert_eq!(row.lease_owner, "w2", "[{l}]");
            assert_eq!(row.attempts, 2, "[{l}]");
            assert!(
                close(
                    row.lease_expires_at,
                    before + chrono::Duration::hours(1),
                    ms(5_000)
                ),
                "[{l}]"
            );
            // The returned row matches what was stored.
            let stored = store.claim(row.event_id.clone()).await.unwrap().unwrap();
            assert_eq!(stored.lease_owner, "w2", "[{l}]");
            assert_eq!(stored.attempts, 2, "[{l}]");
            assert!(
                close(stored.lease_expires_at, row.lease_expires_at, ms(1)),
                "[{l}]"
            );
        }
        let s = store.claim("$s".into()).await.unwrap().unwrap();
        assert_eq!(
            s.state, "sending",
            "[{l}] the state is kept for the re-run to check"
        );
        let live = store.claim("$live".into()).await.unwrap().unwrap();
        assert_eq!(
            (live.lease_owner.as_str(), live.attempts),
            ("alive", 1),
            "[{l}]"
        );

        // Now leased for an hour: nothing to take.
        let again = store
            .take_expired_claims("w3".into(), HOUR, 100, vec![], vec![])
            .await
            .unwrap();
        assert!(again.is_empty(), "[{l}] {again:?}");

        // Attempts keep counting across take-overs; `limit` is honoured.
        store
            .commit_transaction(
                txn(
                    "t3",
                    (0..5)
                        .map(|i| claim(&format!("$z{i}"), "!r:x", ClaimKind::Addressed))
                        .collect(),
                ),
                "dead".into(),
                Duration::ZERO,
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let first = store
            .take_expired_claims("w4".into(), Duration::ZERO, 3, vec![], vec![])
            .await
            .unwrap();
        assert_eq!(first.len(), 3, "[{l}] limit");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let second = store
            .take_expired_claims("w5".into(), Duration::ZERO, 100, vec![], vec![])
            .await
            .unwrap();
        assert_eq!(second.len(), 5, "[{l}] all five expired again");
        let attempts: HashMap<&str, i32> = second
            .iter()
            .map(|r| (r.event_id.as_str(), r.attempts))
            .collect();
        for r in &first {
            assert_eq!(attempts[r.event_id.as_str()], 3, "[{l}] taken twice");
        }
        assert_eq!(
            attempts.values().filter(|a| **a == 2).count(),
            2,
            "[{l}] taken once"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_claims_wait_for_the_crypto_owner() {
    for db in db::all() {
        let l = db.label;
        let store = open(&db).await;
        store
            .commit_transaction(
                txn(
                    "t1",
                    vec![
                        claim("$plain", "!r:x", ClaimKind::Addressed),
                        claim("$sealed", "!r:x", ClaimKind::Encrypted),
                    ],
                ),
                "dead".into(),
                Duration::ZERO,
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let encrypted = vec![ClaimKind::Encrypted.as_str()];
        let other = store
            .take_expired_claims("plain-replica".into(), HOUR, 100, vec![], encrypted)
            .await
            .unwrap();
        let got: Vec<&str> = other.iter().map(|r| r.event_id.as_str()).collect();
        assert_eq!(got, ["$plain"], "[{l}] a replica without the machine");
        let owner = store
            .take_expired_claims("owner".into(), HOUR, 100, vec![], vec![])
            .await
            .unwrap();
        let got: Vec<(&str, &str)> = owner
            .iter()
            .map(|r| (r.event_id.as_str(), r.kind.as_str()))
            .collect();
        assert_eq!(got, [("$sealed", "encrypted")], "[{l}] the owner");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_crypto_device_is_recorded_once_per_user() {
    for db in db::all() {
        let l = db.label;
        let store = open(&db).await;
        let user = format!("@grok-{}:x", rand::random::<u32>());
        assert_eq!(
            store.crypto_device(user.clone()).await.unwrap(),
            None,
            "[{l}]"
        );
        store
            .set_crypto_device(user.clone(), "AAAA".into())
            .await
            .unwrap();
        store
            .set_crypto_device(user.clone(), "BBBB".into())
            .await
            .unwrap();
        assert_eq!(
            store.crypto_device(user).await.unwrap().as_deref(),
            Some("BBBB"),
            "[{l}] a new device replaces the old"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_takers_never_share_a_claim() {
    for db in db::all() {
        let l = db.label;
        let a = open(&db).await;
        let b = replica(&db);
        let n = 40;
        a.commit_transaction(
            txn(
                "t1",
                (0..n)
                    .map(|i| claim(&format!("$c{i:02}"), "!r:x", ClaimKind::Addressed))
                    .collect(),
            ),
            "dead".into(),
            Duration::ZERO,
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let results = futures_join((0..6).map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            async move {
                store
                    .take_expired_claims(format!("w{i}"), HOUR, 100, vec![], vec![])
                    .await
            }
        }))
        .await;
        let mut owner_of: HashMap<String, String> = HashMap::new();
        for (i, r) in results.into_iter().enumerate() {
            for row in r.unwrap_or_else(|e| panic!("[{l}] taker {i}: {e}")) {
                assert_eq!(row.attempts, 2, "[{l}]");
                if let Some(prev) = owner_of.insert(row.event_id.clone(), row.lease_owner) {
                    panic!("[{l}] {} taken by both {prev} and w{i}", row.event_id);
                }
            }
        }
        assert_eq!(owner_of.len(), n, "[{l}] every expired claim taken once");
        for (event, owner) in &owner_of {
            let row = a.claim(event.clone()).await.unwrap().unwrap();
            assert_eq!(&row.lease_owner, owner, "[{l}] stored owner of {event}");
            assert_eq!(row.attempts, 2, "[{l}]");
        }
    }
}

fn full_row(id: &str, created_at: NaiveDateTime) -> RequestLogRow {
    RequestLogRow {
        id: id.into(),
        room_id: "!r:x".into(),
        sender: "@alice:x".into(),
        route: "reason".into(),
        router_source: "model".into(),
        router_confidence: 0.837_412_345_678_9,
        models: r#"{"router":"grok-3-mini","final":"grok-4"}"#.into(),
        prompt_tokens: 1_234,
        cached_tokens: 567,
        completion_tokens: 890,
        reasoning_tokens: 4_321,
        cost_router_ticks: 11,
        cost_web_ticks: 22,
        cost_reason_ticks: 33,
        cost_final_ticks: 44,
        cost_total_ticks: 9_000_000_000_123,
        cost_source: "usage".into(),
        latency_ms: 2_345,
        stage_ms: r#"{"router":120,"final":2000}"#.into(),
        escalated: true,
        fallback_fired: false,
        cache_hit: true,
        ceiling_hit: false,
        per_user_cap_hit: true,
        prompt_version: "v3".into(),
        provider_request_id: "req-abc".into(),
        degraded: "web".into(),
        err: "".into(),
        ok: true,
        query_text: "what's 'new'? — ünïcödé \u{1f600}".into(),
        created_at,
        cost_trivial_ticks: 7,
        stage_usage: r#"{"final":{"input":1234,"cached":567,"output":890,"reasoning":4321,"web_search_calls":0}}"#.into(),
        direct_input_tokens: 1_200,
        direct_output_tokens: -1,
        images: 2,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn request_log_round_trip_and_trim() {
    for db in db::all() {
        let l = db.label;
        let store = open(&db).await;
        assert!(store.request_log("$none".into()).await.unwrap().is_none());

        let row = full_row("$e1", ts(12, 34, 56, 789_012));
        store.upsert_request_log(row.clone()).await.unwrap();
        let back = store.request_log("$e1".into()).await.unwrap().unwrap();
        assert_eq!(back, row, "[{l}] every column round-trips");

        // A second write of the same id replaces every column.
        let replaced = RequestLogRow {
            route: "trivial".into(),
            router_confidence: -1.5e-7,
            prompt_tokens: 0,
            cost_total_ticks: i64::MAX,
            escalated: false,
            fallback_fired: true,
            cache_hit: false,
            ceiling_hit: true,
            per_user_cap_hit: false,
            err: "timeout".into(),
            ok: false,
            query_text: String::new(),
            created_at: ts(13, 0, 0, 1),
            cost_trivial_ticks: 0,
            ..row.clone()
        };
        store.upsert_request_log(replaced.clone()).await.unwrap();
        let back = store.request_log("$e1".into()).await.unwrap().unwrap();
        assert_eq!(back, replaced, "[{l}] upsert replaces");

        // A default row (zero values) round-trips too.
        let zero = RequestLogRow {
            id: "$zero".into(),
            created_at: ts(0, 0, 0, 0),
            ..Default::default()
        };
        store.upsert_request_log(zero.clone()).await.unwrap();
        assert_eq!(
            store.request_log("$zero".into()).await.unwrap(),
            Some(zero),
            "[{l}]"
        );

        // A timestamp from now() keeps at least millisecond precision.
        let t = now();
        store.upsert_request_log(full_row("$now", t)).await.unwrap();
        let back = store.request_log("$now".into()).await.unwrap().unwrap();
        assert!(
            close(back.created_at, t, ms(1)),
            "[{l}] {} vs {t}",
            back.created_at
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn trim_request_log_deletes_only_old_rows() {
    for db in db::all() {
        let l = db.label;
        let store = open(&db).await;
        let t = now();
        let rows = [
            ("$old2", t - chrono::Duration::hours(48)),
            ("$old1", t - chrono::Duration::minutes(61)),
            // Sub-second precision on both sides of the cutoff.
            ("$just_old", t - chrono::Duration::minutes(60) - ms(1)),
            ("$just_new", t - chrono::Duration::minutes(60) + ms(1)),
            ("$new", t),
        ];
        for (id, at) in rows {
            store.upsert_request_log(full_row(id, at)).await.unwrap();
        }
        let cutoff = t - chrono::Duration::minutes(60);
        assert_eq!(store.trim_request_log(cutoff).await.unwrap(), 3, "[{l}]");
        for (id, _) in rows {
            let present = store.request_log(id.into()).await.unwrap().is_some();
            assert_eq!(present, !id.contains("old"), "[{l}] {id}");
        }
        assert_eq!(
            store.trim_request_log(cutoff).await.unwrap(),
            0,
            "[{l}] again"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn response_cache_expires() {
    for db in db::all() {
        let l = db.label;
        let store = open(&db).await;
        assert_eq!(store.cache_get("k".into()).await.unwrap(), None, "[{l}]");
        store
            .cache_put("k".into(), "trivial".into(), "a1".into(), HOUR)
            .await
            .unwrap();
        assert_eq!(
            store.cache_get("k".into()).await.unwrap().as_deref(),
            Some("a1")
        );
        store
            .cache_put("k".into(), "trivial".into(), "a2".into(), HOUR)
            .await
            .unwrap();
        assert_eq!(
            store.cache_get("k".into()).await.unwrap().as_deref(),
            Some("a2"),
            "[{l}] put refreshes"
        );
        store
            .cache_put(
                "short".into(),
                "trivial".into(),
                "x".into(),
                Duration::from_millis(200),
            )
            .await
            .unwrap();
        assert!(
            store.cache_get("short".into()).await.unwrap().is_some(),
            "[{l}]"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            store.cache_get("short".into()).await.unwrap(),
            None,
            "[{l}] expired"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grounding_reservations_never_overshoot() {
    for db in db::all() {
        let l = db.label;
        let a = open(&db).await;
        let b = replica(&db);
        let day = "2026-11-28".to_string();
        assert_eq!(a.grounding_used(day.clone()).await.unwrap(), 0, "[{l}]");
        let results = futures_join((0..16).map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let day = day.clone();
            async move { store.grounding_reserve(day, 1, 10).await }
        }))
        .await;
        let granted = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("[{l}] reserve: {e}")))
            .filter(|g| *g)
            .count();
        assert_eq!(granted, 10, "[{l}] exactly the cap is granted");
        assert_eq!(a.grounding_used(day.clone()).await.unwrap(), 10, "[{l}]");
        assert!(
            !a.grounding_reserve(day.clone(), 1, 10).await.unwrap(),
            "[{l}]"
        );
        a.grounding_adjust(day.clone(), -3).await.unwrap();
        assert_eq!(a.grounding_used(day.clone()).await.unwrap(), 7, "[{l}]");
        assert!(
            !a.grounding_reserve(day.clone(), 4, 10).await.unwrap(),
            "[{l}]"
        );
        assert!(
            a.grounding_reserve(day.clone(), 3, 10).await.unwrap(),
            "[{l}]"
        );
        assert_eq!(a.grounding_used(day.clone()).await.unwrap(), 10, "[{l}]");
        // Another day is independent.
        assert!(a
            .grounding_reserve("2026-11-29".into(), 10, 10)
            .await
            .unwrap());
    }
}
