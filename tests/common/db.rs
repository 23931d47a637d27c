//! Throw-away databases for tests: a SQLite file in a temp dir, and, when `TEST_DATABASE_URL`
//! is set, a fresh PostgreSQL schema in that database (dropped again with the `TestDb`).

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};

/// A database for one test; dropping it removes it.
pub struct TestDb {
    /// The URL to give `Store::connect`.
    pub url: String,
    /// `sqlite` or `postgres`, for labelling failures.
    pub label: &'static str,
    _guard: Guard,
}

enum Guard {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres { admin_url: String, schema: String },
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Guard::Postgres { admin_url, schema } = self {
            let dropped = PgConnection::establish(admin_url)
                .map_err(|e| e.to_string())
                .and_then(|mut c| {
                    c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = dropped {
                eprintln!("test db: could not drop schema {schema}: {e}");
            }
        }
    }
}

/// A fresh SQLite database file in its own temp dir.
pub fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().expect("create temp dir for the SQLite test database");
    let path = dir.path().join("test.db");
    TestDb {
        url: format!("sqlite://{}", path.display()),
        label: "sqlite",
        _guard: Guard::Sqlite(dir),
    }
}

/// A SQLite database at a file a test made in `dir` (a backup, say); removed with `dir`.
// Each test crate compiles the harness; only tests/copy.rs uses this.
#[allow(dead_code)]
pub fn sqlite_file(dir: tempfile::TempDir, path: &std::path::Path) -> TestDb {
    TestDb {
        url: format!("sqlite://{}", path.display()),
        label: "sqlite",
        _guard: Guard::Sqlite(dir),
    }
}

/// A fresh schema in the PostgreSQL database of `TEST_DATABASE_URL`, or `None` when that is
/// unset or empty. Panics when it is set but PostgreSQL cannot be reached (CI must fail then).
pub fn postgres() -> Option<TestDb> {
    let admin_url = std::env::var("TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())?;
    let schema = format!("t_{:016x}", rand::random::<u64>());
    let mut conn = PgConnection::establish(&admin_url).unwrap_or_else(|e| {
        panic!(
            "TEST_DATABASE_URL is set but PostgreSQL is unreachable ({}): {e}",
            grok_appservice::store::redact_url(&admin_url)
        )
    });
    conn.batch_execute(&format!("CREATE SCHEMA {schema}"))
        .unwrap_or_else(|e| panic!("create test schema {schema}: {e}"));
    let sep = if admin_url.contains('?') { '&' } else { '?' };
    Some(TestDb {
        url: format!("{admin_url}{sep}options=-csearch_path%3D{schema}"),
        label: "postgres",
        _guard: Guard::Postgres { admin_url, schema },
    })
}

/// SQLite, plus PostgreSQL when `TEST_DATABASE_URL` is set.
pub fn all() -> Vec<TestDb> {
    let mut dbs = vec![sqlite()];
    dbs.extend(postgres());
    dbs
}

/// A config file in `dir` naming only the homeserver and the database `url`, for the commands
/// that read the database; returns its path.
// Used by the tests that run the binary; tests/store.rs includes this file too.
#[allow(dead_code)]
pub fn config_file(dir: &std::path::Path, url: &str) -> std::path::PathBuf {
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "homeserver: {{url: 'http://127.0.0.1:8008', server_name: example.org}}\n\
             database: {{url: '{url}'}}\n"
        ),
    )
    .unwrap();
    config
}
