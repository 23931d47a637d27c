//! Housekeeping: deletes the rows that outlived their retention (`retention.*`), so the
//! database stops growing with the number of messages ever answered.
//!
//! One replica at a time does it: whoever holds the `housekeeping` lease. Each table is pruned
//! in batches of `retention.batch` rows, with a short pause between batches so other writers
//! get the database, and the lease is renewed between batches. `request_log` is trimmed by
//! telemetry (`telemetry.retention`), not here.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDateTime;

use crate::config::RetentionConfig;
use crate::state::AppState;
use crate::store::{self, Store, StoreError};

/// The lease that makes one replica the housekeeper.
pub const LEASE: &str = "housekeeping";

/// Pause between two delete statements, so other writers are not starved of the database.
const PAUSE: Duration = Duration::from_millis(20);

/// A table housekeeping prunes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    /// `appservice_transactions`: txnIds handled.
    Transactions,
    /// `processed_events`: claims in a final state.
    Claims,
    /// `bot_events`: the bot's own messages.
    BotEvents,
    /// `response_cache`: expired cached answers.
    Cache,
    /// `budget_reservations`: finished reservations.
    Reservations,
    /// `room_notices`: when skip notices were posted.
    Notices,
    /// `budget_counters`: counters of old UTC days.
    BudgetCounters,
    /// `room_answer_windows`: per-room reply counts of past minutes.
    AnswerWindows,
}

/// Reply windows last a minute; an hour of them is kept to look at, then they go.
const KEEP_ANSWER_WINDOWS: Duration = Duration::from_secs(3600);

impl Table {
    /// Every pruned table, in the order a run visits them.
    pub const ALL: [Table; 8] = [
        Table::Transactions,
        Table::Claims,
        Table::BotEvents,
        Table::Cache,
        Table::Reservations,
        Table::Notices,
        Table::BudgetCounters,
        Table::AnswerWindows,
    ];

    /// The table's name (also the `table` label of `housekeeping_deleted_total`).
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Transactions => "appservice_transactions",
            Table::Claims => "processed_events",
            Table::BotEvents => "bot_events",
            Table::Cache => "response_cache",
            Table::Reservations => "budget_reservations",
            Table::Notices => "room_notices",
            Table::BudgetCounters => "budget_counters",
            Table::AnswerWindows => "room_answer_windows",
        }
    }

    /// How long the table's rows are kept; `None` keeps them forever. The cache is the
    /// exception: its figure is a grace past expiry, and `0` means "as soon as expired".
    fn keep(self, r: &RetentionConfig) -> Option<Duration> {
        let keep = match self {
            Table::Transactions => r.transactions,
            Table::Claims => r.claims,
            Table::BotEvents => r.bot_events,
            Table::Cache => return Some(r.cache),
            Table::Reservations => r.reservations,
            Table::Notices => r.notices,
            Table::BudgetCounters => r.budget_days,
            Table::AnswerWindows => KEEP_ANSWER_WINDOWS,
        };
        (!keep.is_zero()).then_some(keep)
    }

    /// Deletes one batch of rows older than `cutoff`.
    async fn prune(
        self,
        store: &Store,
        cutoff: NaiveDateTime,
        batch: i64,
    ) -> Result<usize, StoreError> {
        match self {
            Table::Transactions => store.prune_transactions(cutoff, batch).await,
            Table::Claims => store.prune_claims(cutoff, batch).await,
            Table::BotEvents => store.prune_bot_events(cutoff, batch).await,
            Table::Cache => store.prune_cache(cutoff, batch).await,
            Table::Reservations => store.prune_reservations(cutoff, batch).await,
            Table::Notices => store.prune_notices(cutoff, batch).await,
            Table::BudgetCounters => {
                let day = cutoff.format("%Y-%m-%d").to_string();
                store.prune_budget_counters(day, batch).await
            }
            Table::AnswerWindows => store.prune_answer_windows(cutoff, batch).await,
        }
    }
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Whether this replica held the lease (otherwise another replica does the work).
    pub ran: bool,
    /// Rows deleted per table, in [`Table::ALL`] order (only tables that were pruned).
    pub deleted: Vec<(Table, usize)>,
    /// Delete statements issued, over all tables.
    pub batches: usize,
}

impl Report {
    /// Rows deleted from `table` in this run.
    pub fn deleted(&self, table: Table) -> usize {
        self.deleted
            .iter()
            .find(|(t, _)| *t == table)
            .map_or(0, |(_, n)| *n)
    }
}

/// How long the lease is taken for: two intervals, so the holder keeps it from run to run and
/// another replica takes over within two intervals of the holder dying.
fn lease_ttl(interval: Duration) -> Duration {
    interval.saturating_mul(2).max(Duration::from_secs(60))
}

/// Runs housekeeping once if this replica holds (or can take) the `housekeeping` lease:
/// prunes every table in batches until a batch comes back short, logs one INFO line with the
/// counts and adds them to `housekeeping_deleted_total`. A failing table is logged and skipped;
/// losing the lease mid-run stops the run.
pub async fn run_once(state: &AppState) -> Report {
    let retention = &state.config.retention;
    let ttl = lease_ttl(retention.interval);
    let lease = || {
        state
            .store
            .take_lease(LEASE.into(), state.instance_id.clone(), ttl)
    };
    match lease().await {
        Ok(true) => {}
        Ok(false) => return Report::default(),
        Err(e) => {
            tracing::warn!(error = %e, "housekeeping lease unavailable; skipping this run");
            return Report::default();
        }
    }
    let mut report = Report {
        ran: true,
        ..Report::default()
    };
    let batch = i64::from(retention.batch);
    let now = store::now();
    'tables: for table in Table::ALL {
        let Some(keep) = table.keep(retention) else {
            continue;
        };
        let cutoff = now - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
        let mut deleted = 0;
        loop {
            if report.batches > 0 {
                tokio::time::sleep(PAUSE).await;
                match lease().await {
                    Ok(true) => {}
                    Ok(false) | Err(_) => {
                        tracing::warn!(
                            table = table.as_str(),
                            "housekeeping lease lost or unreachable mid-run; stopping"
                        );
                        report.deleted.push((table, deleted));
                        break 'tables;
                    }
                }
            }
            report.batches += 1;
            match table.prune(&state.store, cutoff, batch).await {
                Ok(n) => {
                    deleted += n;
                    if (n as i64) < batch {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(table = table.as_str(), error = %e, "housekeeping delete failed");
                    break;
                }
            }
        }
        report.deleted.push((table, deleted));
    }
    for (table, n) in &report.deleted {
        state.metrics.add(
            "housekeeping_deleted_total",
            &[("table", table.as_str())],
            *n as u64,
        );
    }
    let counts: Vec<String> = report
        .deleted
        .iter()
        .map(|(t, n)| format!("{}={n}", t.as_str()))
        .collect();
    tracing::info!(batches = report.batches, deleted = %counts.join(" "), "housekeeping");
    report
}

/// Runs [`run_once`] every `retention.interval` (the first run at once) while the process
/// accepts work.
pub async fn housekeeping_loop(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(state.config.retention.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while state.accepting.load(Ordering::SeqCst) {
        tick.tick().await;
        if !state.accepting.load(Ordering::SeqCst) {
            break;
        }
        run_once(&state).await;
    }
}
