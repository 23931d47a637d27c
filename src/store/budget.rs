//! Budget queries: counters per (UTC day, scope) and one row per reservation. Every admission
//! is a conditional update inside one transaction (never read, decide, then write), so
//! replicas racing for the last dollar cannot overshoot.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::schema::{budget_counters, budget_reservations};
use super::{Conn, Store, StoreError};

/// The scope of the all-users counter.
pub const GLOBAL_SCOPE: &str = "global";

/// How far settled spend went past its cap. Admission never grants past the cap, but the real
/// cost of a call is only known after it (a longer answer, a retry billed at its worst case).
pub fn overshoot(cap_ticks: i64, settled_ticks: i64) -> i64 {
    (settled_ticks - cap_ticks).max(0)
}

/// The counter scope of one user.
pub fn user_scope(user_id: &str) -> String {
    format!("user:{user_id}")
}

/// One reservation to make.
#[derive(Debug, Clone)]
pub struct ReserveRequest {
    pub id: String,
    pub day: String,
    pub user_id: String,
    pub amount_ticks: i64,
    pub global_cap_ticks: i64,
    /// `None` exempts the user from the per-user caps (admins).
    pub user_cap_ticks: Option<i64>,
    pub requests_per_hour: Option<u32>,
    pub now: NaiveDateTime,
    pub expires_at: NaiveDateTime,
}

/// Why a reservation was or was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveResult {
    Granted,
    /// The daily ceiling cannot cover the amount.
    GlobalFull,
    /// The user's daily cap cannot cover the amount.
    UserFull,
    /// The user made too many requests in the last hour.
    HourlyFull,
}

/// One counter row.
#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub struct Counter {
    pub day: String,
    pub scope: String,
    pub cap_ticks: i64,
    pub settled_ticks: i64,
    pub reserved_ticks: i64,
    pub requests: i64,
}

/// A counter whose stored figures differ from what its reservation rows say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditMismatch {
    pub scope: String,
    /// `(settled, reserved)` stored.
    pub stored: (i64, i64),
    /// `(settled, reserved)` recomputed from the reservations.
    pub recomputed: (i64, i64),
}

/// `(user_id, state, amount_ticks, actual_ticks)` of one reservation, for the audit.
type AuditRow = (String, String, i64, i64);

/// The life of a reservation row (`budget_reservations.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationState {
    /// Counted at its estimate until it ends.
    Held,
    /// Its call ran and its real cost is counted.
    Settled,
    /// Its call never went out; it counts nothing.
    Released,
    /// Its worker died; counted at its estimate if its call went out, else at zero.
    Expired,
}

impl ReservationState {
    /// Every state that ends a reservation.
    pub const FINISHED: [ReservationState; 3] = [Self::Settled, Self::Released, Self::Expired];

    /// The stored token.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::Settled => "settled",
            Self::Released => "released",
            Self::Expired => "expired",
        }
    }
}

/// How a reservation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The call ran: count what it cost.
    Settled,
    /// The call never went out.
    Released,
}

/// Adds `reserved`, `settled` and `requests` deltas to one counter.
macro_rules! bump {
    ($c:expr, $day:expr, $scope:expr, $reserved:expr, $settled:expr, $requests:expr) => {
        diesel::update(
            budget_counters::table
                .filter(budget_counters::day.eq($day))
                .filter(budget_counters::scope.eq($scope)),
        )
        .set((
            budget_counters::reserved_ticks.eq(budget_counters::reserved_ticks + $reserved),
            budget_counters::settled_ticks.eq(budget_counters::settled_ticks + $settled),
            budget_counters::requests.eq(budget_counters::requests + $requests),
        ))
        .execute($c)
    };
}

/// Ends a held reservation (state guard: a second call is a no-op); returns whether it did.
macro_rules! finish_one {
    ($c:expr, $id:expr, $state:expr, $actual:expr, $now:expr) => {{
        let row: Option<(String, String, i64, bool)> = budget_reservations::table
            .find($id)
            .filter(budget_reservations::state.eq(ReservationState::Held.as_str()))
            .select((
                budget_reservations::day,
                budget_reservations::user_id,
                budget_reservations::amount_ticks,
                budget_reservations::dispatched,
            ))
            .first($c)
            .optional()?;
        match row {
            None => Ok::<bool, StoreError>(false),
            Some((day, user, amount, dispatched)) => {
                let actual: i64 = ($actual)(amount, dispatched);
                let n = diesel::update(
                    budget_reservations::table
                        .find($id)
                        .filter(budget_reservations::state.eq(ReservationState::Held.as_str())),
                )
                .set((
                    budget_reservations::state.eq($state),
                    budget_reservations::actual_ticks.eq(actual),
                    budget_reservations::finished_at.eq(Some($now)),
                ))
                .execute($c)?;
                if n == 1 {
                    bump!($c, &day, GLOBAL_SCOPE, -amount, actual, 0)?;
                    bump!($c, &day, &user_scope(&user), -amount, actual, 0)?;
                }
                Ok(n == 1)
            }
        }
    }};
}

impl Store {
    /// Reserves against the global and the user's counters in one transaction.
    pub async fn budget_reserve(&self, r: ReserveRequest) -> Result<ReserveResult, StoreError> {
        self.run(move |conn| {
            let scope = user_scope(&r.user_id);
            let hour_ago = r.now - chrono::Duration::hours(1);
            db_tx!(conn, |c| {
                // Caps follow the config: a restart with a new ceiling applies today.
                for (s, cap) in [
                    (GLOBAL_SCOPE.to_string(), r.global_cap_ticks),
                    (scope.clone(), r.user_cap_ticks.unwrap_or(i64::MAX)),
                ] {
                    diesel::insert_into(budget_counters::table)
                        .values((
                            budget_counters::day.eq(&r.day),
                            budget_counters::scope.eq(&s),
                            budget_counters::cap_ticks.eq(cap),
                        ))
                        .on_conflict((budget_counters::day, budget_counters::scope))
                        .do_update()
                        .set(budget_counters::cap_ticks.eq(cap))
                        .execute(c)?;
                }
                // Global first, then the user: every transaction locks in this order.
                let fits = |s: &str| {
                    budget_counters::table
                        .filter(budget_counters::day.eq(r.day.clone()))
                        .filter(budget_counters::scope.eq(s.to_string()))
                        .filter(
                            (budget_counters::settled_ticks + budget_counters::reserved_ticks)
                                .le(budget_counters::cap_ticks - r.amount_ticks),
                        )
                };
                let add = (
                    budget_counters::reserved_ticks
                        .eq(budget_counters::reserved_ticks + r.amount_ticks),
                    budget_counters::requests.eq(budget_counters::requests + 1),
                );
                if diesel::update(fits(GLOBAL_SCOPE)).set(add).execute(c)? == 0 {
                    return Ok(ReserveResult::GlobalFull);
                }
                let undo_global =
                    |c: &mut _| bump!(c, &r.day, GLOBAL_SCOPE, -r.amount_ticks, 0, -1);
                if diesel::update(fits(&scope)).set(add).execute(c)? == 0 {
                    undo_global(c)?;
                    return Ok(ReserveResult::UserFull);
                }
                if let Some(per_hour) = r.requests_per_hour {
                    // Counted under the user's row lock taken just above, so two requests of
                    // one user cannot both see room for one more.
                    let recent: i64 = budget_reservations::table
                        .filter(budget_reservations::user_id.eq(&r.user_id))
                        .filter(budget_reservations::created_at.gt(hour_ago))
                        .filter(budget_reservations::state.ne(ReservationState::Released.as_str()))
                        .count()
                        .get_result(c)?;
                    if recent >= i64::from(per_hour) {
                        undo_global(c)?;
                        bump!(c, &r.day, &scope, -r.amount_ticks, 0, -1)?;
                        return Ok(ReserveResult::HourlyFull);
                    }
                }
                diesel::insert_into(budget_reservations::table)
                    .values((
                        budget_reservations::id.eq(&r.id),
                        budget_reservations::day.eq(&r.day),
                        budget_reservations::user_id.eq(&r.user_id),
                        budget_reservations::amount_ticks.eq(r.amount_ticks),
                        budget_reservations::state.eq(ReservationState::Held.as_str()),
                        budget_reservations::created_at.eq(r.now),
                        budget_reservations::expires_at.eq(r.expires_at),
                    ))
                    .execute(c)?;
                Ok::<_, StoreError>(ReserveResult::Granted)
            })
        })
        .await
    }

    /// Marks that the reservation's provider call is about to go out, so an expired
    /// reservation is counted at its estimate rather than at zero.
    pub async fn budget_mark_dispatched(&self, id: String) -> Result<(), StoreError> {
        self.run(move |conn| {
            db!(conn, |c| diesel::update(
                budget_reservations::table.find(&id)
            )
            .set(budget_reservations::dispatched.eq(true))
            .execute(c))?;
            Ok(())
        })
        .await
    }

    /// Settles (with the real cost) or releases (zero) a held reservation. Idempotent:
    /// returns false when it was already finished.
    pub async fn budget_finish(
        &self,
        id: String,
        how: Finish,
        actual_ticks: i64,
        now: NaiveDateTime,
    ) -> Result<bool, StoreError> {
        self.run(move |conn| {
            let (state, actual) = match how {
                Finish::Settled => (ReservationState::Settled.as_str(), actual_ticks),
                Finish::Released => (ReservationState::Released.as_str(), 0),
            };
            db_tx!(conn, |c| finish_one!(c, &id, state, |_, _| actual, now))
        })
        .await
    }

    /// Expires up to `limit` held reservations whose time ran out (their worker died),
    /// counting each at its estimate if its call went out, else at zero. On PostgreSQL the
    /// rows are taken `FOR UPDATE SKIP LOCKED`, so sweepers on several replicas share the work.
    pub async fn budget_sweep(&self, now: NaiveDateTime, limit: i64) -> Result<usize, StoreError> {
        self.run(move |conn| {
            let charge = |amount: i64, dispatched: bool| if dispatched { amount } else { 0 };
            match conn {
                Conn::Postgres(pooled) => pooled.transaction(|c| {
                    let ids: Vec<String> = budget_reservations::table
                        .filter(budget_reservations::state.eq(ReservationState::Held.as_str()))
                        .filter(budget_reservations::expires_at.lt(now))
                        .order(budget_reservations::expires_at)
                        .limit(limit)
                        .select(budget_reservations::id)
                        .for_update()
                        .skip_locked()
                        .load(c)?;
                    let mut n = 0;
                    for id in &ids {
                        n += usize::from(finish_one!(
                            c,
                            id,
                            ReservationState::Expired.as_str(),
                            charge,
                            now
                        )?);
                    }
                    Ok(n)
                }),
                Conn::Sqlite(pooled) => pooled.immediate_transaction(|c| {
                    let ids: Vec<String> = budget_reservations::table
                        .filter(budget_reservations::state.eq(ReservationState::Held.as_str()))
                        .filter(budget_reservations::expires_at.lt(now))
                        .order(budget_reservations::expires_at)
                        .limit(limit)
                        .select(budget_reservations::id)
                        .load(c)?;
                    let mut n = 0;
                    for id in &ids {
                        n += usize::from(finish_one!(
                            c,
                            id,
                            ReservationState::Expired.as_str(),
                            charge,
                            now
                        )?);
                    }
                    Ok(n)
                }),
            }
        })
        .await
    }

    /// What the reservations of one request (ids `<request_id>#...`) settled, in ticks.
    pub async fn budget_settled_for(&self, request_id: String) -> Result<i64, StoreError> {
        self.run(move |conn| {
            // A key range instead of LIKE: event ids may contain `_` and `%`.
            let (low, high) = (format!("{request_id}#"), format!("{request_id}$"));
            let actual: Vec<i64> = db!(conn, |c| budget_reservations::table
                .filter(budget_reservations::id.ge(&low))
                .filter(budget_reservations::id.lt(&high))
                .filter(budget_reservations::state.ne(ReservationState::Held.as_str()))
                .select(budget_reservations::actual_ticks)
                .load(c))?;
            Ok(actual.into_iter().sum())
        })
        .await
    }

    /// The counters of `day` for the given scopes (missing ones are left out).
    pub async fn budget_counters(
        &self,
        day: String,
        scopes: Vec<String>,
    ) -> Result<Vec<Counter>, StoreError> {
        self.run(move |conn| {
            Ok(db!(conn, |c| budget_counters::table
                .filter(budget_counters::day.eq(&day))
                .filter(budget_counters::scope.eq_any(&scopes))
                .order(budget_counters::scope)
                .load::<Counter>(c))?)
        })
        .await
    }

    /// The global (ceiling) counters of the UTC days `first..=last` (`YYYY-MM-DD`), oldest
    /// first: what `stats` shows the ceiling's overshoot from.
    pub async fn budget_global_days(
        &self,
        first: String,
        last: String,
    ) -> Result<Vec<Counter>, StoreError> {
        self.run(move |conn| {
            Ok(db!(conn, |c| budget_counters::table
                .filter(budget_counters::scope.eq(GLOBAL_SCOPE))
                .filter(budget_counters::day.ge(&first))
                .filter(budget_counters::day.le(&last))
                .order(budget_counters::day)
                .load::<Counter>(c))?)
        })
        .await
    }

    /// Recomputes every counter of `day` from its reservation rows and returns the counters
    /// that disagree (none when the books balance).
    pub async fn budget_audit(&self, day: String) -> Result<Vec<AuditMismatch>, StoreError> {
        self.run(move |conn| {
            let (counters, rows): (Vec<Counter>, Vec<AuditRow>) = db!(conn, |c| {
                let counters = budget_counters::table
                    .filter(budget_counters::day.eq(&day))
                    .load::<Counter>(c)?;
                let rows = budget_reservations::table
                    .filter(budget_reservations::day.eq(&day))
                    .select((
                        budget_reservations::user_id,
                        budget_reservations::state,
                        budget_reservations::amount_ticks,
                        budget_reservations::actual_ticks,
                    ))
                    .load(c)?;
                Ok::<_, StoreError>((counters, rows))
            })?;
            let mut totals: std::collections::HashMap<String, (i64, i64)> = Default::default();
            for (user, state, amount, actual) in rows {
                let (settled, reserved) = if state == ReservationState::Held.as_str() {
                    (0, amount)
                } else {
                    (actual, 0)
                };
                for scope in [GLOBAL_SCOPE.to_string(), user_scope(&user)] {
                    let t = totals.entry(scope).or_default();
                    t.0 += settled;
                    t.1 += reserved;
                }
            }
            Ok(counters
                .into_iter()
                .filter_map(|k| {
                    let recomputed = totals.get(&k.scope).copied().unwrap_or((0, 0));
                    let stored = (k.settled_ticks, k.reserved_ticks);
                    (stored != recomputed).then_some(AuditMismatch {
                        scope: k.scope,
                        stored,
                        recomputed,
                    })
                })
                .collect())
        })
        .await
    }
}
