//! The database: SQLite (embedded default) or PostgreSQL (replicas), chosen by URL at run time.
//!
//! This is the only module that touches Diesel. Every public method is async and runs its
//! Diesel work on tokio's blocking pool, so a slow query never stalls an async worker thread.
//! Queries are written once against the shared schema and compiled for both backends by the
//! [`db!`] and [`db_tx!`] macros.

pub mod schema;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::NaiveDateTime;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool, PooledConnection};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use schema::*;

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
/// Advisory-lock key that serialises migrations of replicas starting together.
/// Most ids one `IN (...)` query binds, well under SQLite's limit of 32,766 parameters.
const MAX_BINDS: usize = 10_000;
const MIGRATION_LOCK_KEY: i64 = 0x6772_6f6b_6d69_6772; // "grokmigr"

/// A store error that callers branch on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (pool timeout, connection refused or lost).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness conflict the caller did not expect.
    #[error("database conflict: {0}")]
    Conflict(String),
    /// Any other query failure.
    #[error("database query failed: {0}")]
    Query(String),
    /// Migrations could not be applied.
    #[error("migration failed: {0}")]
    Migration(String),
    /// The database URL is not one this build understands.
    #[error("{0}")]
    BadUrl(String),
    /// The blocking task running the query panicked.
    #[error("database task panicked")]
    Panicked,
    /// Another process holds the SQLite database.
    #[error("{0}")]
    Locked(String),
    /// Migrations are pending and the command does not migrate.
    #[error("{0}")]
    SchemaBehind(String),
    /// An operation this database or target cannot do (the message says what to do instead).
    #[error("{0}")]
    Unsupported(String),
}

impl From<DieselError> for StoreError {
    fn from(e: DieselError) -> Self {
        match e {
            DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
                StoreError::Conflict(info.message().to_string())
            }
            DieselError::DatabaseError(
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                info,
            ) => StoreError::Unavailable(info.message().to_string()),
            DieselError::BrokenTransactionManager => {
                StoreError::Unavailable("broken transaction manager".into())
            }
            other => StoreError::Query(other.to_string()),
        }
    }
}

impl From<diesel::r2d2::PoolError> for StoreError {
    fn from(e: diesel::r2d2::PoolError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// Which backend a database URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseKind {
    /// `sqlite://path` (relative or absolute path to the file).
    Sqlite(String),
    /// `postgres://...` or `postgresql://...`, passed to libpq as is.
    Postgres(String),
}

impl DatabaseKind {
    /// Parses a database URL; an unknown scheme is an error, never a silently created file.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() || path == ":memory:" {
                return Err(StoreError::BadUrl(format!(
                    "`{url}`: give the SQLite database a file path, e.g. sqlite://grok-appservice.db"
                )));
            }
            Ok(Self::Sqlite(path.to_string()))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres(url.to_string()))
        } else {
            Err(StoreError::BadUrl(format!(
                "unsupported database URL scheme in `{}`: use sqlite://PATH or postgres://...",
                redact_url(url)
            )))
        }
    }
}

/// Hides a password in a URL (in the user-info part or a `password=` query parameter) before
/// it is shown anywhere.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match (base.find("://"), base.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &base[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &base[..s + 3], &creds[..c], &base[at..]),
                None => base.to_string(),
            }
        }
        _ => base.to_string(),
    };
    match query {
        None => base,
        Some(q) => {
            let params: Vec<String> = q
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_string(),
                })
                .collect();
            format!("{base}?{}", params.join("&"))
        }
    }
}

#[derive(Debug)]
struct SqlitePragmas;

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for SqlitePragmas {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        // busy_timeout first: switching to WAL takes a lock, and pooled connections opening
        // together would otherwise fail at once. WAL lets readers run beside the writer.
        conn.batch_execute(
            "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; \
             PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
        )
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// Logs pool errors (a connection cut, a failed reconnect) at WARN: the pool recovers from
/// them by itself, so they are not errors of the service.
#[derive(Debug)]
struct PoolErrors;

impl<E: std::fmt::Display> diesel::r2d2::HandleError<E> for PoolErrors {
    fn handle_error(&self, error: E) {
        tracing::warn!(%error, "database connection error; the pool reconnects");
    }
}

#[derive(Clone)]
enum Backend {
    Sqlite(Pool<ConnectionManager<SqliteConnection>>),
    Postgres(Pool<ConnectionManager<PgConnection>>),
}

/// A checked-out connection of either backend.
enum Conn {
    Sqlite(PooledConnection<ConnectionManager<SqliteConnection>>),
    Postgres(PooledConnection<ConnectionManager<PgConnection>>),
}

/// Runs `$body` with `$c` bound to the concrete connection of either backend.
macro_rules! db {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            Conn::Sqlite(pooled) => {
                let $c: &mut SqliteConnection = &mut *pooled;
                $body
            }
            Conn::Postgres(pooled) => {
                let $c: &mut PgConnection = &mut *pooled;
                $body
            }
        }
    };
}

/// Like [`db!`] inside a transaction; SQLite takes the write lock up front (`BEGIN IMMEDIATE`)
/// so two writers never deadlock on a lock upgrade.
macro_rules! db_tx {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            Conn::Sqlite(pooled) => pooled.immediate_transaction(|$c| $body),
            Conn::Postgres(pooled) => pooled.transaction(|$c| $body),
        }
    };
}

/// The rooms and reply targets a transaction's classification depends on, each once (built
/// by [`FactsQuery::new`], so the store never looks an id up twice).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FactsQuery {
    room_ids: Vec<String>,
    reply_targets: Vec<String>,
}

impl FactsQuery {
    /// The distinct ids of each list, sorted; only those are copied.
    pub fn new<'a>(
        room_ids: impl IntoIterator<Item = &'a str>,
        reply_targets: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let distinct = |ids: std::collections::BTreeSet<&str>| {
            ids.into_iter().map(str::to_string).collect::<Vec<_>>()
        };
        Self {
            room_ids: distinct(room_ids.into_iter().collect()),
            reply_targets: distinct(reply_targets.into_iter().collect()),
        }
    }

    /// The rooms asked about.
    pub fn room_ids(&self) -> &[String] {
        &self.room_ids
    }

    /// The events asked whether the bot sent them.
    pub fn reply_targets(&self) -> &[String] {
        &self.reply_targets
    }
}

/// What `Store::ingest` did with a transaction.
#[derive(Debug)]
pub enum Ingested<P> {
    /// Committed now; the event ids newly claimed and leased to this replica.
    New { claimed: Vec<String>, planned: P },
    /// The txnId was handled before; nothing was written.
    Duplicate,
    /// The plan wrote nothing, so nothing was committed.
    NothingToWrite(P),
}

impl TxnWrite {
    /// Nothing to claim, echo or record.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty() && self.bot_events.is_empty() && self.member_changes.is_empty()
    }
}

fn read_room_facts(conn: &mut Conn, query: &FactsQuery) -> Result<RoomFacts, StoreError> {
    // In slices under both backends' bind-parameter limits (SQLite 32,766, PostgreSQL
    // 65,535): a transaction of 100,000 events must not fail its lookup.
    let (room_ids, reply_targets) = (query.room_ids(), query.reply_targets());
    db!(conn, |c| {
        let (mut direct, mut counts, mut bot) = (Vec::new(), Vec::new(), Vec::new());
        for ids in room_ids.chunks(MAX_BINDS) {
            direct.extend(
                rooms::table
                    .filter(rooms::room_id.eq_any(ids))
                    .select((rooms::room_id, rooms::is_direct))
                    .load::<(String, bool)>(c)?,
            );
            counts.extend(
                room_members::table
                    .filter(room_members::room_id.eq_any(ids))
                    .group_by(room_members::room_id)
                    .select((room_members::room_id, diesel::dsl::count_star()))
                    .load::<(String, i64)>(c)?,
            );
        }
        let counts: HashMap<String, i64> = counts.into_iter().collect();
        for ids in reply_targets.chunks(MAX_BINDS) {
            bot.extend(
                bot_events::table
                    .filter(bot_events::event_id.eq_any(ids))
                    .select(bot_events::event_id)
                    .load::<String>(c)?,
            );
        }
        let rooms = direct
            .into_iter()
            .map(|(id, d)| {
                let n = counts.get(&id).copied().unwrap_or(0);
                (id, (d, n))
            })
            .collect();
        Ok(RoomFacts {
            rooms,
            bot_events: bot.into_iter().collect(),
        })
    })
}

/// Commits one transaction in one database transaction; see `Store::commit_transaction`.
fn write_transaction(
    conn: &mut Conn,
    write: TxnWrite,
    lease_owner: &str,
    lease: Duration,
) -> Result<Option<Vec<String>>, StoreError> {
    // Rows are inserted in key order, so two transactions claiming overlapping events
    // take their locks in the same order and cannot deadlock.
    let mut write = write;
    write.claims.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    write.bot_events.sort();
    write
        .member_changes
        .sort_by(|a, b| (&a.room_id, &a.user_id).cmp(&(&b.room_id, &b.user_id)));
    let now = now();
    let expires = now + chrono_dur(lease);
    db_tx!(conn, |c| {
        let inserted = diesel::insert_into(appservice_transactions::table)
            .values((
                appservice_transactions::txn_id.eq(&write.txn_id),
                appservice_transactions::event_count.eq(write.event_count),
                appservice_transactions::received_at.eq(now),
            ))
            .on_conflict_do_nothing()
            .execute(c)?;
        if inserted == 0 {
            return Ok::<_, StoreError>(None);
        }
        let mut claimed = Vec::new();
        let queued = now - chrono::Duration::seconds(1);
        for claim in &write.claims {
            let (lease_until, attempts) = if claim.leased {
                (expires, 1)
            } else {
                (queued, 0)
            };
            let n = diesel::insert_into(processed_events::table)
                .values((
                    processed_events::event_id.eq(&claim.event_id),
                    processed_events::room_id.eq(&claim.room_id),
                    processed_events::sender.eq(&claim.sender),
                    processed_events::kind.eq(claim.kind.as_str()),
                    processed_events::state.eq(ClaimState::Claimed.as_str()),
                    processed_events::lease_owner.eq(lease_owner),
                    processed_events::lease_expires_at.eq(lease_until),
                    processed_events::attempts.eq(attempts),
                    processed_events::origin_ts.eq(claim.origin_ts),
                    processed_events::created_at.eq(now),
                    processed_events::updated_at.eq(now),
                ))
                .on_conflict_do_nothing()
                .execute(c)?;
            if n == 1 && claim.leased {
                claimed.push(claim.event_id.clone());
            }
        }
        for (event_id, room_id) in &write.bot_events {
            diesel::insert_into(bot_events::table)
                .values((
                    bot_events::event_id.eq(event_id),
                    bot_events::room_id.eq(room_id),
                    bot_events::created_at.eq(now),
                ))
                .on_conflict_do_nothing()
                .execute(c)?;
        }
        for change in &write.member_changes {
            if change.joined {
                diesel::insert_into(room_members::table)
                    .values((
                        room_members::room_id.eq(&change.room_id),
                        room_members::user_id.eq(&change.user_id),
                    ))
                    .on_conflict_do_nothing()
                    .execute(c)?;
            } else {
                diesel::delete(
                    room_members::table
                        .filter(room_members::room_id.eq(&change.room_id))
                        .filter(room_members::user_id.eq(&change.user_id)),
                )
                .execute(c)?;
            }
        }
        Ok(Some(claimed))
    })
}

mod analytics;
pub mod budget;
mod claims;
pub mod copy;
mod crypto;
mod housekeeping;
pub mod room_state;
pub mod upgrade;

/// The handle every other module uses; cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

/// What kind of event a claim dedupes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimKind {
    /// A message the bot will answer.
    Addressed,
    /// An addressed message the bot cannot serve (notice only).
    Skip,
    /// An invite of the bot.
    Invite,
    /// An encrypted event: only the replica owning the crypto machine takes it.
    Encrypted,
}

impl ClaimKind {
    /// The stored token (`processed_events.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimKind::Addressed => "addressed",
            ClaimKind::Skip => "skip",
            ClaimKind::Invite => "invite",
            ClaimKind::Encrypted => "encrypted",
        }
    }
}

pub use crate::claims::{ClaimState, Fence};

/// A claim to write with a transaction.
#[derive(Debug, Clone)]
pub struct NewClaim {
    pub event_id: String,
    pub room_id: String,
    pub sender: String,
    pub kind: ClaimKind,
    pub origin_ts: NaiveDateTime,
    /// Leased to this replica now (a worker slot is free); otherwise queued with an expired
    /// lease, so whichever replica has a free slot takes it.
    pub leased: bool,
}

/// A change of room membership seen in a transaction.
#[derive(Debug, Clone)]
pub struct MemberChange {
    pub room_id: String,
    pub user_id: String,
    pub joined: bool,
}

/// Everything one appservice transaction writes, committed atomically.
#[derive(Debug, Clone, Default)]
pub struct TxnWrite {
    pub txn_id: String,
    pub event_count: i32,
    pub claims: Vec<NewClaim>,
    /// `(event_id, room_id)` of the bot's own echoed events.
    pub bot_events: Vec<(String, String)>,
    pub member_changes: Vec<MemberChange>,
}

/// Facts about rooms that classification needs.
#[derive(Debug, Clone, Default)]
pub struct RoomFacts {
    /// `room_id -> (is_direct, joined member count)` for rooms the store knows.
    pub rooms: HashMap<String, (bool, i64)>,
    /// Which of the asked event ids the bot sent.
    pub bot_events: HashSet<String>,
}

/// Open work across all replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    pub claims_pending: i64,
    pub reservations_held: i64,
    /// How far the day's settled spend went past the daily ceiling (0 when within it).
    pub overshoot_ticks: i64,
    /// The day's settled spend, all replicas together.
    pub spent_ticks: i64,
}

/// A claim row as read back (recovery).
#[derive(Debug, Clone, Queryable)]
#[diesel(table_name = processed_events)]
pub struct ClaimRow {
    pub event_id: String,
    pub room_id: String,
    pub sender: String,
    pub kind: String,
    pub state: String,
    pub lease_owner: String,
    pub lease_expires_at: NaiveDateTime,
    pub attempts: i32,
    pub reply_event_id: Option<String>,
    pub origin_ts: NaiveDateTime,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    pub generation: i64,
    /// The stored reply (JSON), once the answer is known.
    pub outbox: Option<String>,
    /// How many parts of the outbox are confirmed sent.
    pub sent_parts: i32,
    /// The event the answer was first posted as while it was written (streaming, placeholder).
    pub progress_event_id: Option<String>,
}

impl ClaimRow {
    /// The claim's state; an unknown stored token reads as failed.
    pub fn claim_state(&self) -> ClaimState {
        ClaimState::parse(&self.state).unwrap_or(ClaimState::Failed)
    }

    /// The fencing token of whoever holds the claim now.
    pub fn fence(&self) -> Fence {
        Fence {
            event_id: self.event_id.clone(),
            owner: self.lease_owner.clone(),
            generation: self.generation,
        }
    }
}

/// One `request_log` row (DESIGN section 5); zero values mean "did not apply". Serialisable
/// because the outbox keeps the row of a reply until it is sent.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Insertable,
    Queryable,
    AsChangeset,
    serde::Serialize,
    serde::Deserialize,
)]
#[diesel(table_name = request_log)]
#[serde(default)]
pub struct RequestLogRow {
    pub id: String,
    pub room_id: String,
    pub sender: String,
    pub route: String,
    pub router_source: String,
    pub router_confidence: f64,
    pub models: String,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_router_ticks: i64,
    pub cost_web_ticks: i64,
    pub cost_reason_ticks: i64,
    pub cost_final_ticks: i64,
    pub cost_total_ticks: i64,
    pub cost_source: String,
    pub latency_ms: i64,
    pub stage_ms: String,
    pub escalated: bool,
    pub fallback_fired: bool,
    pub cache_hit: bool,
    pub ceiling_hit: bool,
    pub per_user_cap_hit: bool,
    pub prompt_version: String,
    pub provider_request_id: String,
    pub degraded: String,
    pub err: String,
    pub ok: bool,
    pub query_text: String,
    pub created_at: NaiveDateTime,
    pub cost_trivial_ticks: i64,
    /// Stage -> tokens (`telemetry::StageUsage`), JSON; `{}` on rows from before it existed.
    pub stage_usage: String,
    /// Input tokens `grok_direct` alone would have sent; -1 = unknown.
    #[serde(default = "unknown_tokens")]
    pub direct_input_tokens: i64,
    /// Output tokens `grok_direct` alone would have written; -1 = unknown.
    #[serde(default = "unknown_tokens")]
    pub direct_output_tokens: i64,
    /// Images sent to the model with the request.
    pub images: i32,
}

/// The `-1` "unknown" of the direct-estimate columns, for rows serialised before they existed.
fn unknown_tokens() -> i64 {
    -1
}

/// The current time as stored (UTC, no zone).
pub fn now() -> NaiveDateTime {
    chrono::Utc::now().naive_utc()
}

fn chrono_dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl Store {
    /// Opens a pool for the URL (`sqlite://path` or `postgres://...`). Does not migrate.
    pub fn connect(url: &str, pool_size: u32) -> Result<Self, StoreError> {
        let backend = match DatabaseKind::from_url(url)? {
            DatabaseKind::Sqlite(path) => {
                let pool = Pool::builder()
                    .max_size(pool_size)
                    .connection_timeout(Duration::from_secs(10))
                    .connection_customizer(Box::new(SqlitePragmas))
                    .error_handler(Box::new(PoolErrors))
                    .build(ConnectionManager::<SqliteConnection>::new(path))?;
                Backend::Sqlite(pool)
            }
            DatabaseKind::Postgres(url) => {
                // libpq's OpenSSL otherwise registers an exit handler that frees its state
                // while the pool's threads may still be opening TLS connections: a command
                // that exits right after its work (`migrate`) crashed one run in five.
                // Initialising it first with OPENSSL_INIT_NO_ATEXIT leaves the cleanup to the OS.
                openssl_sys::init();
                // build_unchecked: a replica may start while the database is still coming up;
                // /ready reports it until then.
                let pool = Pool::builder()
                    .max_size(pool_size)
                    .connection_timeout(Duration::from_secs(5))
                    .test_on_check_out(true)
                    .error_handler(Box::new(PoolErrors))
                    .build_unchecked(ConnectionManager::<PgConnection>::new(url));
                Backend::Postgres(pool)
            }
        };
        Ok(Self { backend })
    }

    /// Like [`Store::connect`] for a database that must exist already: a missing SQLite file
    /// is an error naming `migrate`, not a new empty file (for the commands that only read).
    pub fn connect_existing(url: &str, pool_size: u32) -> Result<Self, StoreError> {
        if let DatabaseKind::Sqlite(path) = DatabaseKind::from_url(url)? {
            if !std::path::Path::new(&path).exists() {
                return Err(StoreError::SchemaBehind(format!(
                    "no database at {path} (database.url); run `grok-appservice migrate -c CONFIG` \
                     or start `serve` to create it"
                )));
            }
        }
        Self::connect(url, pool_size)
    }

    /// Which backend this store uses: `sqlite` or `postgres`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Runs `f` with a pooled connection on the blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Conn) -> Result<T, StoreError> + Send + 'static,
    {
        let backend = self.backend.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut conn = match &backend {
                Backend::Sqlite(pool) => Conn::Sqlite(pool.get()?),
                Backend::Postgres(pool) => Conn::Postgres(pool.get()?),
            };
            f(&mut conn)
        });
        match task.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(StoreError::Panicked),
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        }
    }

    /// Applies pending migrations (PostgreSQL: under an advisory lock, so replicas that start
    /// together take turns).
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        self.run(|conn| match conn {
            Conn::Sqlite(c) => {
                let done = c
                    .run_pending_migrations(SQLITE_MIGRATIONS)
                    .map_err(|e| StoreError::Migration(e.to_string()))?;
                Ok(done.len())
            }
            Conn::Postgres(c) => {
                diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
                    .execute(&mut **c)?;
                let result = c
                    .run_pending_migrations(POSTGRES_MIGRATIONS)
                    .map(|done| done.len())
                    .map_err(|e| StoreError::Migration(e.to_string()));
                diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
                    .execute(&mut **c)?;
                result
            }
        })
        .await
    }

    /// Makes this process the only one serving from a SQLite file: SQLite cannot be shared by
    /// replicas (the claims and budget rely on one writer), so a second `serve` on the same file
    /// is refused. The lock lives as long as the returned guard. PostgreSQL needs none.
    pub fn lock_single_process(&self, url: &str) -> Result<Option<std::fs::File>, StoreError> {
        let DatabaseKind::Sqlite(path) = DatabaseKind::from_url(url)? else {
            return Ok(None);
        };
        let lock_path = format!("{path}.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::Locked(format!("cannot open {lock_path}: {e}")))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(_) => Err(StoreError::Locked(format!(
                "another grok-appservice process is serving from {path} (lock {lock_path}); \
                 SQLite is for one process: use PostgreSQL to run several replicas"
            ))),
        }
    }

    /// Checks that the database answers (for `/ready`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run(|conn| {
            db!(conn, |c| diesel::sql_query("SELECT 1").execute(c))?;
            Ok(())
        })
        .await
    }

    /// Whether a transaction id was already handled.
    pub async fn txn_seen(&self, txn_id: String) -> Result<bool, StoreError> {
        self.run(move |conn| {
            let found: Option<String> = db!(conn, |c| appservice_transactions::table
                .find(&txn_id)
                .select(appservice_transactions::txn_id)
                .first(c)
                .optional())?;
            Ok(found.is_some())
        })
        .await
    }

    /// Facts for classification: known rooms (direct flag, member count) and which of
    /// `reply_targets` the bot sent.
    pub async fn room_facts(
        &self,
        room_ids: Vec<String>,
        reply_targets: Vec<String>,
    ) -> Result<RoomFacts, StoreError> {
        let query = FactsQuery::new(
            room_ids.iter().map(String::as_str),
            reply_targets.iter().map(String::as_str),
        );
        self.run(move |conn| read_room_facts(conn, &query)).await
    }

    /// One appservice transaction's whole database work on one connection: reads the room
    /// facts, lets `plan` classify against them, then commits what it decided (see
    /// `commit_transaction`). A plan that writes nothing commits nothing, not even the txnId:
    /// replaying such a transaction changes nothing, so idempotency needs no record of it.
    pub async fn ingest<P, F>(
        &self,
        query: FactsQuery,
        lease_owner: String,
        lease: Duration,
        plan: F,
    ) -> Result<Ingested<P>, StoreError>
    where
        P: Send + 'static,
        F: FnOnce(RoomFacts) -> (TxnWrite, P) + Send + 'static,
    {
        self.run(move |conn| {
            let facts = read_room_facts(conn, &query)?;
            let (write, planned) = plan(facts);
            if write.is_empty() {
                return Ok(Ingested::NothingToWrite(planned));
            }
            Ok(match write_transaction(conn, write, &lease_owner, lease)? {
                Some(claimed) => Ingested::New { claimed, planned },
                None => Ingested::Duplicate,
            })
        })
        .await
    }

    /// Commits one transaction: its id, the claims, echoes and membership changes, atomically.
    /// Returns `None` when the txnId was already handled (nothing is written), otherwise the
    /// event ids newly claimed and leased to this replica (an event claimed before, or queued
    /// for want of a free slot, is left out).
    pub async fn commit_transaction(
        &self,
        write: TxnWrite,
        lease_owner: String,
        lease: Duration,
    ) -> Result<Option<Vec<String>>, StoreError> {
        self.run(move |conn| write_transaction(conn, write, &lease_owner, lease))
            .await
    }

    /// Records a room the bot joined with its current members (replacing what was known).
    pub async fn set_room(
        &self,
        room_id: String,
        is_direct: bool,
        members: Vec<String>,
    ) -> Result<(), StoreError> {
        self.run(move |conn| {
            let now = now();
            db_tx!(conn, |c| {
                diesel::insert_into(rooms::table)
                    .values((
                        rooms::room_id.eq(&room_id),
                        rooms::is_direct.eq(is_direct),
                        rooms::updated_at.eq(now),
                    ))
                    .on_conflict(rooms::room_id)
                    .do_update()
                    .set((rooms::is_direct.eq(is_direct), rooms::updated_at.eq(now)))
                    .execute(c)?;
                diesel::delete(room_members::table.filter(room_members::room_id.eq(&room_id)))
                    .execute(c)?;
                for user in &members {
                    diesel::insert_into(room_members::table)
                        .values((
                            room_members::room_id.eq(&room_id),
                            room_members::user_id.eq(user),
                        ))
                        .on_conflict_do_nothing()
                        .execute(c)?;
                }
                Ok::<_, StoreError>(())
            })
        })
        .await
    }

    /// The ids of every room the database knows.
    pub async fn room_ids(&self) -> Result<Vec<String>, StoreError> {
        self.run(|conn| {
            Ok(db!(conn, |c| rooms::table
                .select(rooms::room_id)
                .order(rooms::room_id)
                .load::<String>(c))?)
        })
        .await
    }

    /// Forgets a room the bot left or was removed from.
    pub async fn forget_room(&self, room_id: String) -> Result<(), StoreError> {
        self.run(move |conn| {
            db_tx!(conn, |c| {
                diesel::delete(rooms::table.find(&room_id)).execute(c)?;
                diesel::delete(room_members::table.filter(room_members::room_id.eq(&room_id)))
                    .execute(c)?;
                // A later invite starts the room afresh: no settings or counts carry over.
                diesel::delete(room_settings::table.find(&room_id)).execute(c)?;
                diesel::delete(
                    room_answer_windows::table.filter(room_answer_windows::room_id.eq(&room_id)),
                )
                .execute(c)?;
                diesel::delete(room_notices::table.filter(room_notices::room_id.eq(&room_id)))
                    .execute(c)?;
                Ok::<_, StoreError>(())
            })
        })
        .await
    }

    /// Takes the right to post a `reason` notice in a room if none was posted within `window`.
    pub async fn take_notice_slot(
        &self,
        room_id: String,
        reason: String,
        window: Duration,
    ) -> Result<bool, StoreError> {
        self.run(move |conn| {
            let now = now();
            let cutoff = now - chrono_dur(window);
            db_tx!(conn, |c| {
                let inserted = diesel::insert_into(room_notices::table)
                    .values((
                        room_notices::room_id.eq(&room_id),
                        room_notices::reason.eq(&reason),
                        room_notices::last_sent_at.eq(now),
                    ))
                    .on_conflict_do_nothing()
                    .execute(c)?;
                if inserted == 1 {
                    return Ok::<_, StoreError>(true);
                }
                let updated = diesel::update(
                    room_notices::table
                        .filter(room_notices::room_id.eq(&room_id))
                        .filter(room_notices::reason.eq(&reason))
                        .filter(room_notices::last_sent_at.lt(cutoff)),
                )
                .set(room_notices::last_sent_at.eq(now))
                .execute(c)?;
                Ok(updated == 1)
            })
        })
        .await
    }

    /// How much work is open across all replicas, and the overshoot of `day` (for `/metrics`).
    pub async fn backlog(&self, day: String) -> Result<Backlog, StoreError> {
        self.run(move |conn| {
            db!(conn, |c| {
                let claims_pending = processed_events::table
                    .filter(processed_events::state.eq_any(ClaimState::open_tokens()))
                    .count()
                    .get_result(c)?;
                let reservations_held = budget_reservations::table
                    .filter(budget_reservations::state.eq(budget::ReservationState::Held.as_str()))
                    .count()
                    .get_result(c)?;
                let global: Option<(i64, i64)> = budget_counters::table
                    .filter(budget_counters::day.eq(&day))
                    .filter(budget_counters::scope.eq(budget::GLOBAL_SCOPE))
                    .select((budget_counters::cap_ticks, budget_counters::settled_ticks))
                    .first(c)
                    .optional()?;
                Ok(Backlog {
                    claims_pending,
                    reservations_held,
                    overshoot_ticks: global
                        .map_or(0, |(cap, settled)| budget::overshoot(cap, settled)),
                    spent_ticks: global.map_or(0, |(_, settled)| settled),
                })
            })
        })
        .await
    }

    /// Remembers an event the bot sent, so replies to it address the bot.
    pub async fn record_bot_event(
        &self,
        event_id: String,
        room_id: String,
    ) -> Result<(), StoreError> {
        self.run(move |conn| {
            db!(conn, |c| diesel::insert_into(bot_events::table)
                .values((
                    bot_events::event_id.eq(&event_id),
                    bot_events::room_id.eq(&room_id),
                    bot_events::created_at.eq(now()),
                ))
                .on_conflict_do_nothing()
                .execute(c))?;
            Ok(())
        })
        .await
    }

    /// Writes a `request_log` row; a second write for the same event replaces the first, so
    /// a retried request leaves one row with its final outcome.
    pub async fn upsert_request_log(&self, row: RequestLogRow) -> Result<(), StoreError> {
        self.upsert_request_logs(vec![row]).await
    }

    /// Writes several `request_log` rows in one transaction (each replaces an earlier row of
    /// the same event).
    pub async fn upsert_request_logs(&self, rows: Vec<RequestLogRow>) -> Result<(), StoreError> {
        self.run(move |conn| {
            db_tx!(conn, |c| {
                for row in &rows {
                    diesel::insert_into(request_log::table)
                        .values(row)
                        .on_conflict(request_log::id)
                        .do_update()
                        .set(row)
                        .execute(c)?;
                }
                Ok::<_, StoreError>(())
            })
        })
        .await
    }

    /// Reads one `request_log` row.
    pub async fn request_log(&self, id: String) -> Result<Option<RequestLogRow>, StoreError> {
        self.run(move |conn| {
            Ok(db!(conn, |c| request_log::table
                .find(&id)
                .first::<RequestLogRow>(c)
                .optional())?)
        })
        .await
    }

    /// Deletes `request_log` rows created before `cutoff`; returns how many.
    pub async fn trim_request_log(&self, cutoff: NaiveDateTime) -> Result<usize, StoreError> {
        self.run(move |conn| {
            Ok(db!(conn, |c| diesel::delete(
                request_log::table.filter(request_log::created_at.lt(cutoff))
            )
            .execute(c))?)
        })
        .await
    }

    /// A cached answer that has not expired.
    pub async fn cache_get(&self, key: String) -> Result<Option<String>, StoreError> {
        self.run(move |conn| {
            let now = now();
            Ok(db!(conn, |c| response_cache::table
                .find(&key)
                .filter(response_cache::expires_at.gt(now))
                .select(response_cache::answer)
                .first::<String>(c)
                .optional())?)
        })
        .await
    }

    /// Stores (or refreshes) a cached answer for `ttl`.
    pub async fn cache_put(
        &self,
        key: String,
        route: String,
        answer: String,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.run(move |conn| {
            let now = now();
            let expires = now + chrono_dur(ttl);
            db!(conn, |c| diesel::insert_into(response_cache::table)
                .values((
                    response_cache::cache_key.eq(&key),
                    response_cache::route.eq(&route),
                    response_cache::answer.eq(&answer),
                    response_cache::created_at.eq(now),
                    response_cache::expires_at.eq(expires),
                ))
                .on_conflict(response_cache::cache_key)
                .do_update()
                .set((
                    response_cache::answer.eq(&answer),
                    response_cache::created_at.eq(now),
                    response_cache::expires_at.eq(expires),
                ))
                .execute(c))?;
            Ok(())
        })
        .await
    }

    /// Reserves `calls` web-search calls of `day` if the total stays within `cap`, in one
    /// conditional update, so replicas racing for the last calls cannot overshoot.
    pub async fn grounding_reserve(
        &self,
        day: String,
        calls: i64,
        cap: i64,
    ) -> Result<bool, StoreError> {
        self.run(move |conn| {
            db_tx!(conn, |c| {
                diesel::insert_into(grounding_usage::table)
                    .values((grounding_usage::day.eq(&day), grounding_usage::calls.eq(0)))
                    .on_conflict_do_nothing()
                    .execute(c)?;
                let n = diesel::update(
                    grounding_usage::table
                        .filter(grounding_usage::day.eq(&day))
                        .filter(grounding_usage::calls.le(cap - calls)),
                )
                .set(grounding_usage::calls.eq(grounding_usage::calls + calls))
                .execute(c)?;
                Ok::<_, StoreError>(n == 1)
            })
        })
        .await
    }

    /// Corrects a reservation by the difference between the calls made and those reserved.
    pub async fn grounding_adjust(&self, day: String, delta: i64) -> Result<(), StoreError> {
        self.run(move |conn| {
            db!(conn, |c| diesel::update(grounding_usage::table.find(&day))
                .set(grounding_usage::calls.eq(grounding_usage::calls + delta))
                .execute(c))?;
            Ok(())
        })
        .await
    }

    /// Web-search calls counted for `day`.
    pub async fn grounding_used(&self, day: String) -> Result<i64, StoreError> {
        self.run(move |conn| {
            let n: Option<i64> = db!(conn, |c| grounding_usage::table
                .find(&day)
                .select(grounding_usage::calls)
                .first(c)
                .optional())?;
            Ok(n.unwrap_or(0))
        })
        .await
    }
}
