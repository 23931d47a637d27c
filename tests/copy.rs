//! `backup` and `migrate-to`: a backup taken while the store is open is a database the bot
//! starts on with the same rows; a copy from SQLite into PostgreSQL has every table's rows and
//! a bot then answers from PostgreSQL.

mod common;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel::{PgConnection, SqliteConnection};

use chrono::SubsecRound;

use common::*;
use grok_appservice::store::{Store, StoreError};

const DM: &str = "!dm:example.org";

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn sqlite_path(url: &str) -> &str {
    url.strip_prefix("sqlite://").unwrap()
}

/// `(table, rows)` of every table of a SQLite file but Diesel's own, by name.
fn sqlite_counts(url: &str) -> Vec<(String, i64)> {
    let mut c = SqliteConnection::establish(sqlite_path(url)).unwrap();
    let tables: Vec<Name> = diesel::sql_query(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
         AND name != '__diesel_schema_migrations' ORDER BY name",
    )
    .load(&mut c)
    .unwrap();
    tables
        .into_iter()
        .map(|t| {
            let n: Vec<Count> = diesel::sql_query(format!("SELECT count(*) AS n FROM {}", t.name))
                .load(&mut c)
                .unwrap();
            (t.name, n[0].n)
        })
        .collect()
}

/// A bot that answered a direct message, so most tables have rows.
async fn answered_once() -> Harness {
    let h = Harness::new().await;
    h.known_room(DM, true, &[BOT, ALICE]).await;
    h.put_txn(
        "t1",
        vec![text_event("$q1", DM, ALICE, "how do tides work")],
    )
    .await;
    h.settle().await;
    assert_eq!(h.xai.seen().len(), 1);
    h.row("$q1").await;
    h
}

/// The bot on `db` knows the room and the transaction of [`answered_once`]: the old txnId is
/// not processed again, and a plain message in the direct chat (no mention) is answered.
async fn bot_carries_on(db: db::TestDb, old: &Harness) {
    let h = Harness::with(db, |_| {}).await;
    // PostgreSQL keeps timestamps to the microsecond; SQLite kept nanoseconds.
    let micros = |mut row: grok_appservice::store::RequestLogRow| {
        row.created_at = row.created_at.round_subsecs(6);
        row
    };
    assert_eq!(
        micros(h.row("$q1").await),
        micros(old.row("$q1").await),
        "the request_log row is the same"
    );
    h.put_txn(
        "t1",
        vec![text_event("$again", DM, ALICE, "how do tides work")],
    )
    .await;
    h.put_txn(
        "t2",
        vec![text_event("$q2", DM, ALICE, "and why twice a day?")],
    )
    .await;
    h.settle().await;
    assert_eq!(h.xai.seen().len(), 1, "only the new transaction's message");
    assert!(h.row("$q2").await.ok);
    assert!(h
        .state
        .store
        .request_log("$again".into())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_of_an_open_store_is_a_database_the_bot_starts_on() {
    let h = answered_once().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backup.db");
    // The store is open with pooled connections and recent writes still in its WAL file.
    let report = h.state.store.backup_to(path.clone()).await.unwrap();
    assert!(report.bytes > 0);
    let backup_url = format!("sqlite://{}", path.display());
    let source = sqlite_counts(&h.db.url);
    assert_eq!(sqlite_counts(&backup_url), source);
    for table in [
        "request_log",
        "processed_events",
        "rooms",
        "appservice_transactions",
    ] {
        assert!(
            source.iter().any(|(t, n)| t == table && *n > 0),
            "{table} is empty: {source:?}"
        );
    }
    let again = h.state.store.backup_to(path.clone()).await.unwrap_err();
    assert!(again.to_string().contains("exists already"), "{again}");
    let status = Store::connect(&backup_url, 1)
        .unwrap()
        .migration_status()
        .await
        .unwrap();
    assert!(status.pending.is_empty(), "{status:?}");
    bot_carries_on(db::sqlite_file(dir, &path), &h).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_refuses_postgresql_and_points_to_pg_dump() {
    let Some(pg) = db::postgres() else {
        eprintln!("TEST_DATABASE_URL unset: skipped");
        return;
    };
    let store = Store::connect(&pg.url, 1).unwrap();
    let err = store
        .backup_to(std::env::temp_dir().join("never-written.db"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unsupported(_)));
    assert!(err.to_string().contains("pg_dump"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_to_copies_every_table_into_postgresql_and_the_bot_answers_from_it() {
    let Some(pg) = db::postgres() else {
        eprintln!("TEST_DATABASE_URL unset: skipped");
        return;
    };
    let h = answered_once().await;
    h.state
        .store
        .cache_put(
            "k".into(),
            "grok_direct".into(),
            "cached".into(),
            std::time::Duration::from_secs(3600),
        )
        .await
        .unwrap();
    // A table with a serial id (none of the bot's have one yet) shows the sequence reset.
    let mut lite = SqliteConnection::establish(sqlite_path(&h.db.url)).unwrap();
    lite.batch_execute(
        "CREATE TABLE extra_serial (id INTEGER PRIMARY KEY, v TEXT NOT NULL); \
         INSERT INTO extra_serial (v) VALUES ('a'), ('b'), ('c');",
    )
    .unwrap();
    Store::connect(&pg.url, 1).unwrap().migrate().await.unwrap();
    let mut dst = PgConnection::establish(&pg.url).unwrap();
    dst.batch_execute(
        "CREATE TABLE extra_serial (id BIGSERIAL PRIMARY KEY, v TEXT NOT NULL); \
         INSERT INTO extra_serial (v) VALUES ('left over');",
    )
    .unwrap();

    // A target with rows is refused, and so is a copy while a bot serves from the file.
    let store = &h.state.store;
    let err = store
        .copy_to_postgres(&h.db.url, &pg.url)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    dst.batch_execute("TRUNCATE extra_serial").unwrap();
    let serving = store.lock_single_process(&h.db.url).unwrap();
    let err = store
        .copy_to_postgres(&h.db.url, &pg.url)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Locked(_)), "{err}");
    drop(serving);

    let report = store.copy_to_postgres(&h.db.url, &pg.url).await.unwrap();
    let source = sqlite_counts(&h.db.url);
    let copied: Vec<(String, i64)> = report
        .tables
        .iter()
        .map(|t| (t.table.clone(), t.rows))
        .collect();
    assert_eq!(copied, source, "every table, with its rows");
    for (table, rows) in &source {
        let n: Vec<Count> = diesel::sql_query(format!("SELECT count(*) AS n FROM {table}"))
            .load(&mut dst)
            .unwrap();
        assert_eq!(n[0].n, *rows, "{table} in PostgreSQL");
    }
    assert!(report.sequences_reset >= 1);
    let next: Vec<Count> =
        diesel::sql_query("INSERT INTO extra_serial (v) VALUES ('d') RETURNING id AS n")
            .load(&mut dst)
            .unwrap();
    assert_eq!(next[0].n, 4, "the sequence continues after the copied ids");
    let cached = Store::connect(&pg.url, 1)
        .unwrap()
        .cache_get("k".into())
        .await
        .unwrap();
    assert_eq!(cached.as_deref(), Some("cached"));

    bot_carries_on(pg, &h).await;
}
