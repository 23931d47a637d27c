//! Which migrations a database has, read without writing anything, so the read-only commands
//! (`stats`, `route`, `ask`) can refuse a schema that is behind instead of migrating it.

use diesel::migration::MigrationSource;
use diesel::prelude::*;
use diesel::sql_types::Text;

use super::{Conn, Store, StoreError, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};

/// Diesel's bookkeeping table of applied migrations.
pub(super) const MIGRATIONS_TABLE: &str = "__diesel_schema_migrations";

/// Applied and pending migrations of a database, by name (`2026-11-28-000001_foundation`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationStatus {
    /// Migrations of this binary the database has, oldest first.
    pub applied: Vec<String>,
    /// Migrations of this binary it lacks, oldest first.
    pub pending: Vec<String>,
    /// Versions the database has that this binary does not know (a newer binary ran).
    pub unknown: Vec<String>,
}

impl MigrationStatus {
    /// The refusal of a read-only command when migrations are pending.
    pub fn require_current(&self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        Err(StoreError::SchemaBehind(format!(
            "the database schema is behind this version of grok-appservice ({} pending \
             migration(s), first {}); run `grok-appservice migrate -c CONFIG` (or start \
             `serve`, which migrates) first; this command never changes the schema",
            self.pending.len(),
            self.pending[0]
        )))
    }
}

#[derive(QueryableByName)]
pub(super) struct Name {
    #[diesel(sql_type = Text)]
    pub name: String,
}

/// The embedded migrations of a backend as `(version, name)`, oldest first.
fn embedded<DB: diesel::backend::Backend>(
    source: &impl MigrationSource<DB>,
) -> Result<Vec<(String, String)>, StoreError> {
    let mut all: Vec<(String, String)> = source
        .migrations()
        .map_err(|e| StoreError::Migration(e.to_string()))?
        .iter()
        .map(|m| (m.name().version().to_string(), m.name().to_string()))
        .collect();
    all.sort();
    Ok(all)
}

impl Store {
    /// Applied and pending migrations, read only: a database without Diesel's table has every
    /// migration pending, and nothing is created.
    pub async fn migration_status(&self) -> Result<MigrationStatus, StoreError> {
        self.run(|conn| {
            let (exists_sql, all) = match conn {
                Conn::Sqlite(_) => (
                    format!(
                        "SELECT name FROM sqlite_master WHERE type = 'table' \
                         AND name = '{MIGRATIONS_TABLE}'"
                    ),
                    embedded::<diesel::sqlite::Sqlite>(&SQLITE_MIGRATIONS)?,
                ),
                Conn::Postgres(_) => (
                    format!(
                        "SELECT table_name::text AS name FROM information_schema.tables \
                         WHERE table_schema = current_schema() AND table_name = '{MIGRATIONS_TABLE}'"
                    ),
                    embedded::<diesel::pg::Pg>(&POSTGRES_MIGRATIONS)?,
                ),
            };
            let applied: Vec<String> = db!(conn, |c| {
                let exists = !diesel::sql_query(&exists_sql).load::<Name>(c)?.is_empty();
                if exists {
                    diesel::sql_query(format!(
                        "SELECT version AS name FROM {MIGRATIONS_TABLE} ORDER BY version"
                    ))
                    .load::<Name>(c)?
                    .into_iter()
                    .map(|n| n.name)
                    .collect()
                } else {
                    Vec::new()
                }
            });
            let mut status = MigrationStatus::default();
            for (version, name) in &all {
                if applied.contains(version) {
                    status.applied.push(name.clone());
                } else {
                    status.pending.push(name.clone());
                }
            }
            status.unknown = applied
                .into_iter()
                .filter(|v| !all.iter().any(|(known, _)| known == v))
                .collect();
            Ok(status)
        })
        .await
    }
}
