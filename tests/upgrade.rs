//! Upgrades: `migrate --status` lists applied and pending migrations; `stats`, `route` and
//! `ask` refuse a schema that is behind (naming `grok-appservice migrate`) and never migrate;
//! `migrate` does. Runs the real binary, on SQLite and (with `TEST_DATABASE_URL`) PostgreSQL.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use diesel::{Connection, PgConnection, SqliteConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use common::db;
use grok_appservice::store::Store;

const SQLITE: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES: EmbeddedMigrations = embed_migrations!("migrations/postgres");

fn run(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_grok-appservice"))
        .args(args)
        .arg("-c")
        .arg(config)
        .env_remove("DATABASE_URL")
        .env_remove("GROK_APPSERVICE_CONFIG")
        .env_remove("XAI_API_KEY")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Applies all but the last `behind` migrations, as an older version of the bot left it.
fn migrate_all_but(url: &str, behind: usize) -> usize {
    let total = diesel::migration::MigrationSource::<diesel::sqlite::Sqlite>::migrations(&SQLITE)
        .unwrap()
        .len();
    if let Some(path) = url.strip_prefix("sqlite://") {
        let mut c = SqliteConnection::establish(path).unwrap();
        for _ in 0..total - behind {
            c.run_next_migration(SQLITE).unwrap();
        }
    } else {
        let mut c = PgConnection::establish(url).unwrap();
        for _ in 0..total - behind {
            c.run_next_migration(POSTGRES).unwrap();
        }
    }
    total
}

#[test]
fn read_only_commands_refuse_a_schema_that_is_behind_and_migrate_fixes_it() {
    for test_db in db::all() {
        let label = test_db.label;
        let dir = tempfile::tempdir().unwrap();
        let config = db::config_file(dir.path(), &test_db.url);
        let total = migrate_all_but(&test_db.url, 1);

        let status = run(&config, &["migrate", "--status"]);
        assert!(status.status.success(), "{label}: {}", stderr(&status));
        let listing = stdout(&status);
        assert_eq!(
            listing.matches("applied  ").count(),
            total - 1,
            "{label}: {listing}"
        );
        assert_eq!(
            listing.matches("pending  ").count(),
            1,
            "{label}: {listing}"
        );
        assert!(
            listing.contains(&format!("{} applied, 1 pending", total - 1)),
            "{listing}"
        );

        for args in [
            &["stats"][..],
            &["route", "what is the weather today"],
            &["ask", "hello"],
        ] {
            let out = run(&config, args);
            assert!(
                !out.status.success(),
                "{label} {args:?} ran on an old schema"
            );
            let err = stderr(&out);
            assert!(
                err.contains("grok-appservice migrate") && err.contains("behind"),
                "{label} {args:?}: {err}"
            );
        }
        // None of them migrated.
        let rt = tokio::runtime::Runtime::new().unwrap();
        let store = Store::connect(&test_db.url, 1).unwrap();
        let pending = rt.block_on(store.migration_status()).unwrap().pending;
        assert_eq!(pending.len(), 1, "{label}: {pending:?}");

        let migrated = run(&config, &["migrate"]);
        assert!(
            migrated.status.success(),
            "{label}: {:?}: {} {}",
            migrated.status,
            stderr(&migrated),
            stdout(&migrated)
        );
        assert!(stdout(&migrated).starts_with("1 migration(s) applied"));
        let stats = run(&config, &["stats", "--json"]);
        assert!(stats.status.success(), "{label}: {}", stderr(&stats));
        let listing = stdout(&run(&config, &["migrate", "--status"]));
        assert!(
            listing.contains(&format!("{total} applied, 0 pending")),
            "{listing}"
        );
    }
}

#[test]
fn a_missing_sqlite_database_is_not_created_by_stats() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("absent.db");
    let config = db::config_file(dir.path(), &format!("sqlite://{}", file.display()));
    let out = run(&config, &["stats"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("grok-appservice migrate"),
        "{}",
        stderr(&out)
    );
    assert!(!file.exists(), "stats created the database");
}

/// A one-shot command exits while the PostgreSQL pool's threads may still be opening TLS
/// connections; libpq's OpenSSL exit handler used to free its state under them (SIGSEGV in
/// about one run in five). Forty runs in a row make a regression all but certain to show.
#[test]
fn one_shot_commands_on_postgres_exit_cleanly() {
    let Some(test_db) = db::postgres() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = db::config_file(dir.path(), &test_db.url);
    for run_no in 0..40 {
        let out = run(&config, &["migrate"]);
        assert!(
            out.status.success(),
            "run {run_no}: {:?}: {}",
            out.status,
            stderr(&out)
        );
    }
}
