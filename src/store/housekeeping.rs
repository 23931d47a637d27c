//! Housekeeping queries: named leases (a job that runs on one replica at a time) and the
//! deletion of rows that outlived their retention.
//!
//! Every prune deletes at most `batch` rows, chosen by primary key in a limited subselect
//! (Diesel's delete has no LIMIT, and neither backend's DELETE takes one portably), so one
//! statement never holds the write lock for long. The statements are SQL text: Diesel's DSL
//! cannot filter a delete by a subselect of the same table. Each returns how many rows it deleted; a
//! count below `batch` means nothing older is left.

use std::time::Duration;

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text, Timestamp};

use super::budget::ReservationState;
use super::schema::leases;
use super::{chrono_dur, now, ClaimState, Conn, Store, StoreError};

/// Claim states nothing will move on from: only these are ever deleted.
const FINAL_CLAIM_STATES: [ClaimState; 3] =
    [ClaimState::Answered, ClaimState::Failed, ClaimState::Done];

/// The value a prune compares rows with.
enum Cutoff {
    /// A point in time.
    At(NaiveDateTime),
    /// A UTC day, `YYYY-MM-DD` (sorts as text).
    Day(String),
}

/// `'a', 'b'`: stored state strings as an SQL list (they are fixed tokens, never user input).
fn sql_list(tokens: &[&str]) -> String {
    let quoted: Vec<String> = tokens.iter().map(|t| format!("'{t}'")).collect();
    quoted.join(", ")
}

/// Deletes at most `batch` rows of `table` matching `condition`, by `key` (its primary key,
/// one column or two) chosen in a limited subselect. `condition` compares with the cutoff
/// through the placeholder `{cutoff}`; row values make the statement the same on both backends
/// but for the placeholder syntax.
fn delete_batch(
    conn: &mut Conn,
    table: &str,
    key: &str,
    condition: &str,
    cutoff: Cutoff,
    batch: i64,
) -> Result<usize, StoreError> {
    let sql = |cutoff: &str, limit: &str| {
        let condition = condition.replace("{cutoff}", cutoff);
        format!(
            "DELETE FROM {table} WHERE ({key}) IN \
             (SELECT {key} FROM {table} WHERE {condition} LIMIT {limit})"
        )
    };
    macro_rules! exec {
        ($c:expr, $sql:expr) => {
            match cutoff {
                Cutoff::At(at) => diesel::sql_query($sql)
                    .bind::<Timestamp, _>(at)
                    .bind::<BigInt, _>(batch)
                    .execute($c)?,
                Cutoff::Day(day) => diesel::sql_query($sql)
                    .bind::<Text, _>(day)
                    .bind::<BigInt, _>(batch)
                    .execute($c)?,
            }
        };
    }
    Ok(match conn {
        Conn::Sqlite(c) => exec!(&mut **c, sql("?", "?")),
        Conn::Postgres(c) => exec!(&mut **c, sql("$1", "$2")),
    })
}

impl Store {
    /// Takes the lease `name` for `owner` for `ttl`: succeeds when nobody holds it, when it
    /// expired, or when `owner` already holds it (a renewal). Safe for any number of replicas
    /// at once: the insert and the conditional update let exactly one of them win.
    pub async fn take_lease(
        &self,
        name: String,
        owner: String,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.run(move |conn| {
            let now = now();
            let expires = now + chrono_dur(ttl);
            db_tx!(conn, |c| {
                let inserted = diesel::insert_into(leases::table)
                    .values((
                        leases::name.eq(&name),
                        leases::owner.eq(&owner),
                        leases::expires_at.eq(expires),
                    ))
                    .on_conflict_do_nothing()
                    .execute(c)?;
                if inserted == 1 {
                    return Ok::<_, StoreError>(true);
                }
                let taken = diesel::update(
                    leases::table
                        .filter(leases::name.eq(&name))
                        .filter(leases::owner.eq(&owner).or(leases::expires_at.lt(now))),
                )
                .set((leases::owner.eq(&owner), leases::expires_at.eq(expires)))
                .execute(c)?;
                Ok(taken == 1)
            })
        })
        .await
    }

    /// Gives up the lease `name` if `owner` holds it, so another replica may take it at once.
    pub async fn release_lease(&self, name: String, owner: String) -> Result<(), StoreError> {
        self.run(move |conn| {
            db!(conn, |c| diesel::delete(
                leases::table
                    .filter(leases::name.eq(&name))
                    .filter(leases::owner.eq(&owner))
            )
            .execute(c))?;
            Ok(())
        })
        .await
    }

    /// Deletes up to `batch` `appservice_transactions` rows received before `cutoff`.
    pub async fn prune_transactions(
        &self,
        cutoff: NaiveDateTime,
        batch: i64,
    ) -> Result<usize, StoreError> {
        self.run(move |conn| {
            let condition = "received_at < {cutoff}";
            delete_batch(
                conn,
                "appservice_transactions",
                "txn_id",
                condition,
                Cutoff::At(cutoff),
                batch,
            )
        })
        .await
    }

    /// Deletes up to `batch` claims in a final state (answered, failed, done) last updated
    /// before `cutoff`; a claim still being worked on is never deleted.
    pub async fn prune_claims(
        &self,
        cutoff: NaiveDateTime,
        batch: i64,
    ) -> Result<usize, StoreError> {
        self.run(move |conn| {
            let finals = sql_list(&FINAL_CLAIM_STATES.map(ClaimState::as_str));
            let condition = format!("state IN ({finals}) AND updated_at < {{cutoff}}");
            delete_batch(
                conn,
                "processed_events",
                "event_id",
                &condition,
                Cutoff::At(cutoff),
                batch,
            )
        })
        .await
    }

    /// Deletes up to `batch` `bot_events` rows recorded before `cutoff`.
    pub async fn prune_bot_events(
        &self,
        cutoff: NaiveDateTime,
        batch: i64,
    ) -> Result<usize, StoreError> {
        self.run(move |conn| {
            let condition = "created_at < {cutoff}";
            delete_batch(
                conn,
                "bot_events",
                "event_id",
                condition,
                Cutoff::At(cutoff),
                batch,
            )
        })
        .await
    }

    /// Deletes up to `batch` cached answers that expired before `cutoff`.
    pub async fn prune_cache(
        &self,
        cutoff: NaiveDateTime,
        batch: i64,
    ) -> Result<usize, StoreError> {
        self.run(move |conn| {
            let condition = "expires_at < {cutoff}";
            delete_batch(
                conn,
                "response_cache",
                "cache_key",
                condition,
                Cutoff::At(cutoff),
                batch,
            )
        })
        .await
    }

    /// Deletes up to `batch` finished reservations (settled, released, expired) that finished
    /// before `cutoff`; a held reservation is never deleted.
    pub async fn prune_reservations(
        &self,
        cutoff: NaiveDateTime,
        batch: i64,
    ) -> Result<usize, StoreError> {
        self.run(move |conn| {
            let finished = sql_list(&ReservationState::FINISHED.map(ReservationState::as_str));
            let condition = format!("state IN ({finished}) AND finished_at < {{cutoff}}");
            delete_batch(
                conn,
                "budget_reservations",
                "id",
                &condition,
                Cutoff::At(cutoff),
                batch,
            )
        })
        .await
    }

    /// Deletes up to `batch` `room_notices` rows whose notice was last posted before `cutoff`.
    pub async fn prune_notices(
        &self,
        cutoff: NaiveDateTime,
        batch: i64,
    ) -> Result<usize, StoreError> {
        self.run(move |conn| {
            let condition = "last_sent_at < {cutoff}";
            delete_batch(
                conn,
                "room_notices",
                "room_id, reason",
                condition,
                Cutoff::At(cutoff),
                batch,
            )
        })
        .await
    }

    /// Deletes up to `batch` per-room reply windows that started before `cutoff`.
    pub async fn prune_answer_windows(
        &self,
        cutoff: NaiveDateTime,
        batch: i64,
    ) -> Result<usize, StoreError> {
        self.run(move |conn| {
            delete_batch(
                conn,
                "room_answer_windows",
                "room_id, window_start",
                "window_start < {cutoff}",
                Cutoff::At(cutoff),
                batch,
            )
        })
        .await
    }

    /// Deletes up to `batch` `budget_counters` rows of UTC days before `before_day`
    /// (`YYYY-MM-DD`).
    pub async fn prune_budget_counters(
        &self,
        before_day: String,
        batch: i64,
    ) -> Result<usize, StoreError> {
        self.run(move |conn| {
            let condition = "day < {cutoff}";
            delete_batch(
                conn,
                "budget_counters",
                "day, scope",
                condition,
                Cutoff::Day(before_day),
                batch,
            )
        })
        .await
    }
}
