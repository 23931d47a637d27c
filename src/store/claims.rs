//! Claim queries. Every change of a held claim is a conditional update on its fencing token
//! (owner and generation): a worker that lost its claim cannot move it, and a takeover bumps
//! the generation so the old holder's next write fails.

use std::time::Duration;

use diesel::prelude::*;

use super::schema::processed_events;
use super::{chrono_dur, now, ClaimRow, Conn, Store, StoreError};
use crate::claims::{ClaimState, Fence};

/// The rows a fence names: the claim, still held by that owner in that generation, not final.
macro_rules! fenced {
    ($fence:expr) => {
        processed_events::table
            .filter(processed_events::event_id.eq(&$fence.event_id))
            .filter(processed_events::lease_owner.eq(&$fence.owner))
            .filter(processed_events::generation.eq($fence.generation))
            .filter(processed_events::state.eq_any(ClaimState::open_tokens()))
    };
}

impl Store {
    /// Reads one claim.
    pub async fn claim(&self, event_id: String) -> Result<Option<ClaimRow>, StoreError> {
        self.run(move |conn| {
            Ok(db!(conn, |c| processed_events::table
                .find(&event_id)
                .first::<ClaimRow>(c)
                .optional())?)
        })
        .await
    }

    /// Moves a held claim to `to` (which must be a legal step from its state), renewing its
    /// lease for `lease`; false when the fence no longer holds (the claim was taken over or
    /// finished). `reply` sets the reply event id.
    pub async fn claim_transition(
        &self,
        fence: Fence,
        to: ClaimState,
        lease: Duration,
        reply: Option<String>,
    ) -> Result<bool, StoreError> {
        self.run(move |conn| {
            let now = now();
            let from = to.allowed_from();
            let set = (
                processed_events::state.eq(to.as_str()),
                processed_events::lease_expires_at.eq(now + chrono_dur(lease)),
                processed_events::updated_at.eq(now),
            );
            // A finished claim forgets its stored reply: no answer text stays at rest.
            let outbox: Option<Option<String>> = to.is_final().then_some(None);
            let n = db!(conn, |c| {
                let target = fenced!(fence).filter(processed_events::state.eq_any(&from));
                match (&reply, &outbox) {
                    (Some(r), Some(o)) => diesel::update(target)
                        .set((
                            set,
                            processed_events::reply_event_id.eq(r),
                            processed_events::outbox.eq(o),
                        ))
                        .execute(c),
                    (Some(r), None) => diesel::update(target)
                        .set((set, processed_events::reply_event_id.eq(r)))
                        .execute(c),
                    (None, Some(o)) => diesel::update(target)
                        .set((set, processed_events::outbox.eq(o)))
                        .execute(c),
                    (None, None) => diesel::update(target).set(set).execute(c),
                }
            })?;
            Ok(n == 1)
        })
        .await
    }

    /// Renews the lease of a held claim; false when the fence no longer holds.
    pub async fn claim_renew(&self, fence: Fence, lease: Duration) -> Result<bool, StoreError> {
        self.run(move |conn| {
            let expires = now() + chrono_dur(lease);
            let n = db!(conn, |c| diesel::update(fenced!(fence))
                .set(processed_events::lease_expires_at.eq(expires))
                .execute(c))?;
            Ok(n == 1)
        })
        .await
    }

    /// Stores the rendered reply with the claim (state `sending`) in one fenced update, before
    /// anything is sent; false when the fence no longer holds.
    pub async fn claim_store_outbox(
        &self,
        fence: Fence,
        outbox: String,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.run(move |conn| {
            let now = now();
            let n = db!(conn, |c| diesel::update(fenced!(fence).filter(
                processed_events::state.eq_any(ClaimState::Sending.allowed_from())
            ))
            .set((
                processed_events::state.eq(ClaimState::Sending.as_str()),
                processed_events::outbox.eq(&outbox),
                processed_events::sent_parts.eq(0),
                processed_events::lease_expires_at.eq(now + chrono_dur(lease)),
                processed_events::updated_at.eq(now),
            ))
            .execute(c))?;
            Ok(n == 1)
        })
        .await
    }

    /// Notes the event a streamed or placeholder answer was first posted as, before any edit
    /// of it; false when the fence no longer holds.
    pub async fn claim_progress_event(
        &self,
        fence: Fence,
        event_id: String,
    ) -> Result<bool, StoreError> {
        self.run(move |conn| {
            let n = db!(conn, |c| diesel::update(fenced!(fence))
                .set((
                    processed_events::progress_event_id.eq(&event_id),
                    processed_events::updated_at.eq(now()),
                ))
                .execute(c))?;
            Ok(n == 1)
        })
        .await
    }

    /// Notes that outbox part `index` landed as `event_id` (the first part is the reply event
    /// id); false when the fence no longer holds.
    pub async fn claim_part_sent(
        &self,
        fence: Fence,
        index: i32,
        event_id: String,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.run(move |conn| {
            let now = now();
            let set = (
                processed_events::sent_parts.eq(index + 1),
                processed_events::lease_expires_at.eq(now + chrono_dur(lease)),
                processed_events::updated_at.eq(now),
            );
            let n = db!(conn, |c| {
                let target = fenced!(fence);
                if index == 0 {
                    diesel::update(target)
                        .set((set, processed_events::reply_event_id.eq(&event_id)))
                        .execute(c)
                } else {
                    diesel::update(target).set(set).execute(c)
                }
            })?;
            Ok(n == 1)
        })
        .await
    }

    /// Ends the leases of this replica's unfinished claims at once, so another replica's
    /// sweeper takes them over without waiting (graceful shutdown); returns how many.
    pub async fn release_claims(&self, owner: String) -> Result<usize, StoreError> {
        self.run(move |conn| {
            let n = db!(conn, |c| diesel::update(
                processed_events::table
                    .filter(processed_events::lease_owner.eq(&owner))
                    .filter(processed_events::state.eq_any(ClaimState::open_tokens()))
            )
            .set(processed_events::lease_expires_at.eq(now() - chrono::Duration::seconds(1)))
            .execute(c))?;
            Ok(n)
        })
        .await
    }

    /// Takes over up to `limit` unfinished claims whose lease expired (a worker died, or the
    /// claim was queued for a free slot), skipping `exclude` (claims this replica still works
    /// on). Each is leased to `owner` for `lease`, its generation and attempt count raised.
    /// Safe on every replica at once: the conditional update on the generation lets exactly one
    /// taker win each claim, and only claims still open are taken.
    pub async fn take_expired_claims(
        &self,
        owner: String,
        lease: Duration,
        limit: i64,
        exclude: Vec<String>,
        skip_kinds: Vec<&'static str>,
    ) -> Result<Vec<ClaimRow>, StoreError> {
        self.run(move |conn| {
            let now = now();
            let expires = now + chrono_dur(lease);
            db!(conn, |c| {
                let candidates: Vec<ClaimRow> = processed_events::table
                    .filter(processed_events::state.eq_any(ClaimState::open_tokens()))
                    .filter(processed_events::lease_expires_at.lt(now))
                    .filter(processed_events::event_id.ne_all(&exclude))
                    .filter(processed_events::kind.ne_all(&skip_kinds))
                    .order(processed_events::lease_expires_at)
                    .limit(limit)
                    .load(c)?;
                let mut taken = Vec::new();
                for mut row in candidates {
                    let won = diesel::update(
                        processed_events::table
                            .filter(processed_events::event_id.eq(&row.event_id))
                            .filter(processed_events::generation.eq(row.generation))
                            .filter(processed_events::state.eq_any(ClaimState::open_tokens()))
                            .filter(processed_events::lease_expires_at.lt(now)),
                    )
                    .set((
                        processed_events::lease_owner.eq(&owner),
                        processed_events::lease_expires_at.eq(expires),
                        processed_events::generation.eq(row.generation + 1),
                        processed_events::attempts.eq(row.attempts + 1),
                        processed_events::updated_at.eq(now),
                    ))
                    .execute(c)?;
                    if won == 1 {
                        row.lease_owner = owner.clone();
                        row.lease_expires_at = expires;
                        row.generation += 1;
                        row.attempts += 1;
                        taken.push(row);
                    }
                }
                Ok(taken)
            })
        })
        .await
    }
}
