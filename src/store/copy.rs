//! Copies of the database: `backup` (a consistent SQLite file while the bot runs) and
//! `migrate-to` (every table of the SQLite database into an empty PostgreSQL database).
//!
//! Rows cross backends as JSON: SQLite renders each row with `json_object`, PostgreSQL reads a
//! batch with `json_populate_recordset`, so no table needs its own copy code and a column
//! added by a later migration is copied without a change here.

use std::path::PathBuf;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

use super::upgrade::{Name, MIGRATIONS_TABLE};
use super::{Backend, Conn, DatabaseKind, Store, StoreError};

/// Rows per INSERT into PostgreSQL.
const BATCH_ROWS: usize = 500;

/// What `backup` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    pub path: PathBuf,
    pub bytes: u64,
}

/// One table copied by `migrate-to`: rows read from SQLite and counted in PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCopy {
    pub table: String,
    pub rows: i64,
}

/// What `migrate-to` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    pub tables: Vec<TableCopy>,
    /// Identity or serial sequences moved past the copied ids.
    pub sequences_reset: usize,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Column {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    kind: String,
}

#[derive(QueryableByName)]
struct SerialColumn {
    #[diesel(sql_type = Text)]
    tbl: String,
    #[diesel(sql_type = Text)]
    col: String,
}

/// Quotes an identifier for SQL (both backends).
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn not_sqlite(what: &str) -> StoreError {
    StoreError::Unsupported(format!(
        "{what} works on a SQLite database; for PostgreSQL use pg_dump \
         (e.g. `pg_dump -Fc -f grok.dump DBNAME`, restored with pg_restore)"
    ))
}

impl Store {
    /// Writes a consistent copy of the SQLite database to `path` with `VACUUM INTO`, safe while
    /// the bot runs (it reads one snapshot, WAL included); refuses an existing file and
    /// PostgreSQL.
    pub async fn backup_to(&self, path: PathBuf) -> Result<BackupReport, StoreError> {
        if !matches!(self.backend, Backend::Sqlite(_)) {
            return Err(not_sqlite("backup"));
        }
        if path.exists() {
            return Err(StoreError::Unsupported(format!(
                "{} exists already; give a new file",
                path.display()
            )));
        }
        let target = path
            .to_str()
            .ok_or_else(|| StoreError::Unsupported("the backup path is not UTF-8".into()))?
            .replace('\'', "''");
        self.run(move |conn| {
            db!(conn, |c| c
                .batch_execute(&format!("VACUUM INTO '{target}'")))?;
            Ok(())
        })
        .await?;
        let check = Store::connect(&format!("sqlite://{}", path.display()), 1)?;
        check
            .run(|conn| {
                let result: Vec<Name> = db!(conn, |c| diesel::sql_query(
                    "SELECT integrity_check AS name FROM pragma_integrity_check"
                )
                .load(c))?;
                match result.first().map(|r| r.name.as_str()) {
                    Some("ok") => Ok(()),
                    other => Err(StoreError::Query(format!(
                        "the backup failed its integrity check: {other:?}"
                    ))),
                }
            })
            .await?;
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Ok(BackupReport { path, bytes })
    }

    /// Copies every table of this SQLite database into the PostgreSQL database at
    /// `target_url`, in one PostgreSQL transaction: migrates the target first, refuses one that
    /// has rows, verifies each table's row count before committing and moves identity
    /// sequences past the copied ids. Holds the SQLite lock, so it refuses while `serve` runs.
    pub async fn copy_to_postgres(
        &self,
        sqlite_url: &str,
        target_url: &str,
    ) -> Result<CopyReport, StoreError> {
        let Backend::Sqlite(pool) = &self.backend else {
            return Err(StoreError::Unsupported(
                "migrate-to copies from a SQLite database (database.url is PostgreSQL already)"
                    .into(),
            ));
        };
        if !matches!(
            DatabaseKind::from_url(target_url)?,
            DatabaseKind::Postgres(_)
        ) {
            return Err(StoreError::BadUrl(
                "migrate-to needs a postgres://... URL".into(),
            ));
        }
        let _lock = self.lock_single_process(sqlite_url)?;
        let source = self.migration_status().await?;
        source.require_current()?;
        if !source.unknown.is_empty() {
            return Err(StoreError::SchemaBehind(format!(
                "the SQLite database has migrations this binary does not know ({}): \
                 use the grok-appservice version that wrote it",
                source.unknown.join(", ")
            )));
        }
        let target = Store::connect(target_url, 1)?;
        target.migrate().await?;
        let pool = pool.clone();
        let target_url = target_url.to_string();
        let task = tokio::task::spawn_blocking(move || {
            let mut src = pool.get()?;
            let mut dst = PgConnection::establish(&target_url)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            src.transaction(|src| dst.transaction(|dst| copy_all(src, dst)))
        });
        match task.await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Panicked),
        }
    }
}

/// The user tables of the SQLite database, in name order.
fn sqlite_tables(src: &mut SqliteConnection) -> Result<Vec<String>, StoreError> {
    let names: Vec<Name> = diesel::sql_query(format!(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
         AND name != '{MIGRATIONS_TABLE}' ORDER BY name"
    ))
    .load(src)?;
    Ok(names.into_iter().map(|n| n.name).collect())
}

fn pg_count(dst: &mut PgConnection, table: &str) -> Result<i64, StoreError> {
    let rows: Vec<Count> =
        diesel::sql_query(format!("SELECT count(*) AS n FROM {}", ident(table))).load(dst)?;
    Ok(rows.first().map_or(0, |r| r.n))
}

fn copy_all(src: &mut SqliteConnection, dst: &mut PgConnection) -> Result<CopyReport, StoreError> {
    let tables = sqlite_tables(src)?;
    for table in &tables {
        let n = pg_count(dst, table).map_err(|e| {
            StoreError::Unsupported(format!(
                "the target has no table {table} that the SQLite database has ({e})"
            ))
        })?;
        if n > 0 {
            return Err(StoreError::Unsupported(format!(
                "the target database is not empty ({table} has {n} rows); \
                 migrate-to only fills an empty database"
            )));
        }
    }
    let mut copied = Vec::new();
    for table in &tables {
        let rows = table_as_json(src, table)?;
        for batch in rows.chunks(BATCH_ROWS) {
            diesel::sql_query(format!(
                "INSERT INTO {t} SELECT * FROM json_populate_recordset(NULL::{t}, $1::json)",
                t = ident(table)
            ))
            .bind::<Text, _>(format!("[{}]", batch.join(",")))
            .execute(dst)?;
        }
        let counted = pg_count(dst, table)?;
        if counted != rows.len() as i64 {
            return Err(StoreError::Query(format!(
                "{table}: read {} rows from SQLite but PostgreSQL counts {counted}; nothing was \
                 committed",
                rows.len()
            )));
        }
        copied.push(TableCopy {
            table: table.clone(),
            rows: counted,
        });
    }
    let sequences_reset = reset_sequences(dst)?;
    Ok(CopyReport {
        tables: copied,
        sequences_reset,
    })
}

/// Every row of a SQLite table as a JSON object. Booleans (stored as 0/1) become JSON
/// booleans, so PostgreSQL reads them as `boolean`.
fn table_as_json(src: &mut SqliteConnection, table: &str) -> Result<Vec<String>, StoreError> {
    let columns: Vec<Column> = diesel::sql_query(
        "SELECT name, upper(type) AS kind FROM pragma_table_info(?) ORDER BY cid",
    )
    .bind::<Text, _>(table)
    .load(src)?;
    let fields: Vec<String> = columns
        .iter()
        .map(|c| {
            let col = ident(&c.name);
            let value = if c.kind.starts_with("BOOL") {
                format!("CASE WHEN {col} IS NULL THEN NULL WHEN {col} THEN json('true') ELSE json('false') END")
            } else {
                col
            };
            format!("'{}', {value}", c.name.replace('\'', "''"))
        })
        .collect();
    let rows: Vec<Name> = diesel::sql_query(format!(
        "SELECT json_object({}) AS name FROM {} ORDER BY rowid",
        fields.join(", "),
        ident(table)
    ))
    .load(src)?;
    Ok(rows.into_iter().map(|r| r.name).collect())
}

/// Moves every identity or serial sequence of the schema past the largest copied id, so the
/// next insert does not collide with a copied row.
fn reset_sequences(dst: &mut PgConnection) -> Result<usize, StoreError> {
    let serials: Vec<SerialColumn> = diesel::sql_query(
        "SELECT table_name::text AS tbl, column_name::text AS col FROM information_schema.columns \
         WHERE table_schema = current_schema() \
         AND (is_identity = 'YES' OR column_default LIKE 'nextval(%')",
    )
    .load(dst)?;
    for s in &serials {
        diesel::sql_query(format!(
            "SELECT setval(pg_get_serial_sequence($1, $2), \
             COALESCE((SELECT MAX({c}) FROM {t}), 0) + 1, false)",
            c = ident(&s.col),
            t = ident(&s.tbl)
        ))
        .bind::<Text, _>(ident(&s.tbl))
        .bind::<Text, _>(&s.col)
        .execute(dst)?;
    }
    Ok(serials.len())
}
