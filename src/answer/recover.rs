//! Recovery: claims whose lease ran out (their worker died, or they were queued for a free
//! slot) are taken over, a few at a time and only as many as this replica has free slots.
//! A claim with a stored outbox is re-sent from it, never answered again; one without is
//! answered from the event, read back from the homeserver (no message text kept at rest).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use crate::claims::{ClaimState, LeaseKeeper};
use crate::classify::{self, Event, Facts, Verdict};
use crate::state::AppState;
use crate::store::ClaimRow;
use crate::telemetry::RequestLog;

use super::record::base_row;
use super::render::Outbox;
use super::{close, dispatch, send_stored};

/// A claim taken over this many times is given up.
const MAX_ATTEMPTS: i32 = 3;
/// At most this many claims are taken per sweep: each must start before its new lease runs out.
const RECOVERY_BATCH: usize = 8;
/// How far back the room is searched for parts of a reply that already landed.
const LANDED_SEARCH: u32 = 100;

/// Takes over expired claims for the free slots and starts each; returns how many.
pub async fn recover_once(state: &Arc<AppState>) -> usize {
    let mut slots = Vec::new();
    while slots.len() < RECOVERY_BATCH {
        match state.slots.clone().try_acquire_owned() {
            Ok(slot) => slots.push(slot),
            Err(_) => break,
        }
    }
    if slots.is_empty() {
        return 0;
    }
    let taken = match state
        .store
        .take_expired_claims(
            state.instance_id.clone(),
            state.timings.claim_lease,
            slots.len() as i64,
            state.working.snapshot(),
            // Encrypted claims wait for the replica that owns the crypto machine.
            if state.matrix.crypto().is_some() {
                Vec::new()
            } else {
                vec![crate::store::ClaimKind::Encrypted.as_str()]
            },
        )
        .await
    {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "recovery sweep failed");
            return 0;
        }
    };
    if taken.len() < slots.len() {
        state.queued.store(false, Ordering::SeqCst);
    }
    let count = taken.len();
    for (claim, slot) in taken.into_iter().zip(slots) {
        let worker = state.clone();
        let span = tracing::info_span!("request", event_id = %claim.event_id);
        state.spawn_worker(tracing::Instrument::instrument(
            async move { take_over(worker, claim, slot).await },
            span,
        ));
    }
    count
}

async fn take_over(state: Arc<AppState>, claim: ClaimRow, slot: OwnedSemaphorePermit) {
    let fence = claim.fence();
    if claim.attempts > MAX_ATTEMPTS {
        tracing::warn!(attempts = claim.attempts, "giving up on a claim");
        if close(&state, &fence, ClaimState::Failed, None).await {
            let mut row = match stored_outbox(&state, &claim) {
                Stored::Outbox(o) => o.row,
                Stored::Nothing | Stored::Sealed => {
                    base_row(&claim.event_id, &claim.room_id, &claim.sender)
                }
            };
            row.ok = false;
            row.err = format!("gave up after {} attempts", claim.attempts - 1);
            state.telemetry.record(row);
        }
        return;
    }
    match stored_outbox(&state, &claim) {
        Stored::Outbox(outbox) => {
            let _working = state.working.enter(&claim.event_id);
            resend(&state, &claim, *outbox).await;
        }
        Stored::Sealed => {
            // Its lease runs out again and the replica that owns the machine takes it.
            tracing::info!(
                "a sealed stored reply without the crypto machine; leaving it to its owner"
            );
        }
        Stored::Nothing => return answer_again(state, claim, slot).await,
    }
    drop(slot);
    state.slot_freed.notify_one();
}

/// What a claim taken over holds of its reply.
enum Stored {
    /// A reply to send (unsealed if it was sealed).
    Outbox(Box<Outbox>),
    /// A sealed reply this replica cannot open: the crypto machine is elsewhere.
    Sealed,
    /// No reply, or one that cannot be read: answer again.
    Nothing,
}

fn stored_outbox(state: &AppState, claim: &ClaimRow) -> Stored {
    let Some(stored) = claim.outbox.as_deref() else {
        return Stored::Nothing;
    };
    let json = if crate::crypto::is_sealed(stored) {
        let Some(crypto) = state.matrix.crypto() else {
            return Stored::Sealed;
        };
        match crypto.unseal(stored) {
            Ok(json) => std::borrow::Cow::Owned(json),
            Err(e) => {
                tracing::error!(error = %e, "a sealed stored reply cannot be opened; answering again");
                return Stored::Nothing;
            }
        }
    } else {
        std::borrow::Cow::Borrowed(stored)
    };
    match serde_json::from_str(&json) {
        Ok(o) => Stored::Outbox(Box::new(o)),
        Err(e) => {
            tracing::error!(error = %e, "a stored reply cannot be read; answering again");
            Stored::Nothing
        }
    }
}

/// Sends what is left of a stored reply: the parts not yet in the room.
async fn resend(state: &Arc<AppState>, claim: &ClaimRow, outbox: Outbox) {
    let fence = claim.fence();
    let keeper = LeaseKeeper::start(state, fence.clone());
    let gate = keeper.gate();
    let mut first = claim.sent_parts.max(0) as usize;
    match state
        .matrix
        .find_reply_parts(&claim.room_id, &claim.event_id, LANDED_SEARCH)
        .await
    {
        Ok(landed) => {
            // Parts go out in order, so everything up to the last landed one is in the room.
            if let Some(last) = landed.iter().map(|(i, _)| *i).max() {
                first = first.max(last + 1);
            }
            for (_, id) in &landed {
                let _ = state
                    .store
                    .record_bot_event(id.clone(), claim.room_id.clone())
                    .await;
            }
            if first >= outbox.parts.len() {
                tracing::info!("the stored reply was already sent; closing the claim");
                let reply = landed
                    .iter()
                    .find(|(i, _)| *i == 0)
                    .map(|(_, id)| id.clone())
                    .or_else(|| claim.reply_event_id.clone());
                if close(state, &fence, ClaimState::Answered, reply).await {
                    super::record::finish(state, outbox.row);
                }
                return;
            }
        }
        // Re-sending is still safe while the homeserver remembers the txnIds.
        Err(e) => tracing::warn!(error = %e, "could not look for parts already sent"),
    }
    tracing::info!(
        first,
        parts = outbox.parts.len(),
        "re-sending a stored reply"
    );
    send_stored(state, &fence, &gate, &claim.room_id, outbox, first).await;
    keeper.stop();
}

/// Answers a claim that has no stored reply, from the event as the homeserver has it.
async fn answer_again(state: Arc<AppState>, claim: ClaimRow, slot: OwnedSemaphorePermit) {
    let fence = claim.fence();
    if claim.claim_state() == ClaimState::Sending && reply_already_sent(&state, &claim).await {
        return;
    }
    let raw = match state.matrix.event(&claim.room_id, &claim.event_id).await {
        Ok(v) => v,
        Err(e) => {
            // The lease runs out and another sweep tries again.
            tracing::warn!(error = %e, "cannot fetch a claimed event");
            return;
        }
    };
    let Ok(mut event) = Event::parse(&raw) else {
        close(&state, &fence, ClaimState::Failed, None).await;
        return;
    };
    // /event omits room_id in some servers' answers.
    event.room_id = claim.room_id.clone();
    let Some(verdict) = classify_now(&state, &event).await else {
        return;
    };
    tracing::info!(verdict = verdict.label(), "recovering a claim");
    if matches!(verdict, Verdict::Ignore(_)) {
        close(&state, &fence, ClaimState::Done, None).await;
    } else {
        // An encrypted claim's event comes back from the homeserver already decrypted.
        let how = super::Received {
            progress_event: claim.progress_event_id.clone(),
            encrypted: claim.kind == crate::store::ClaimKind::Encrypted.as_str(),
        };
        dispatch(&state, event, verdict, fence, slot, how);
    }
}

/// Classifies an event read back from the homeserver against the room facts as they are now;
/// `None` when the facts cannot be read (the claim's lease runs out and it is tried again).
pub(super) async fn classify_now(state: &AppState, event: &Event) -> Option<Verdict> {
    let facts = state
        .store
        .room_facts(
            vec![event.room_id.clone()],
            event
                .in_reply_to()
                .map(str::to_string)
                .into_iter()
                .collect(),
        )
        .await
        .ok()?;
    let direct = facts
        .rooms
        .get(&event.room_id)
        .is_some_and(|(d, n)| classify::is_direct_room(*d, *n));
    Some(classify::classify(
        event,
        &state.identity,
        Facts {
            direct_room: direct,
            replies_to_bot: event
                .in_reply_to()
                .is_some_and(|id| facts.bot_events.contains(id)),
            sender_blocked: state.limiter.blocks(&event.sender),
            decrypts: state.config.encryption.enabled,
        },
    ))
}

/// Whether the reply of a claim that died while sending (stored before outboxes existed) is
/// already in the room; if so, the claim is closed with it instead of sending again.
async fn reply_already_sent(state: &AppState, claim: &ClaimRow) -> bool {
    let landed = match state
        .matrix
        .find_reply_parts(&claim.room_id, &claim.event_id, LANDED_SEARCH)
        .await
    {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "could not look for an earlier reply");
            return false;
        }
    };
    let Some((_, reply)) = landed.into_iter().find(|(i, _)| *i == 0) else {
        return false;
    };
    tracing::info!("the reply was already sent; closing the claim");
    let _ = state
        .store
        .record_bot_event(reply.clone(), claim.room_id.clone())
        .await;
    if close(state, &claim.fence(), ClaimState::Answered, Some(reply)).await {
        // The dead replica may have written its row already: keep that fuller one.
        if let Ok(None) = state.store.request_log(claim.event_id.clone()).await {
            state.telemetry.record(recovered_row(state, claim).await);
        }
    }
    true
}

/// The `request_log` row of a request whose replica died after its reply went out: the route
/// is decided again (the router is deterministic) and the cost is what its reservations
/// settled; per-stage figures died with the replica.
async fn recovered_row(state: &AppState, claim: &ClaimRow) -> RequestLog {
    let mut row = base_row(&claim.event_id, &claim.room_id, &claim.sender);
    row.ok = true;
    row.err = "recovered after a crash: the reply had been sent; stage details were lost".into();
    row.prompt_version = state.cascade.prompt_version().to_string();
    if let Ok(raw) = state.matrix.event(&claim.room_id, &claim.event_id).await {
        let body = raw
            .pointer("/content/body")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        let decision = state.cascade.decide(body, Some(&claim.room_id), None);
        row.route = decision.route.as_str().into();
        row.router_source = decision.source.as_str().into();
        row.router_confidence = decision.confidence;
    }
    match state.store.budget_settled_for(claim.event_id.clone()).await {
        Ok(ticks) => row.cost_total_ticks = ticks,
        Err(e) => tracing::warn!(error = %e, "could not read the recovered request's cost"),
    }
    row
}

/// Runs [`recover_once`] and the budget sweeper every `recovery_interval`, and sooner when a
/// slot frees while claims wait in the database, until the process stops accepting work.
pub async fn recovery_loop(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(state.timings.recovery_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while state.accepting.load(Ordering::SeqCst) {
        tokio::select! {
            _ = tick.tick() => {
                match state.limiter.sweep().await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(expired = n, "expired budget reservations of dead workers"),
                    Err(e) => tracing::warn!(error = %e, "budget sweep failed"),
                }
            }
            _ = state.slot_freed.notified() => {
                if !state.queued.load(Ordering::SeqCst) {
                    continue;
                }
            }
        }
        recover_once(&state).await;
    }
}
