//! Encrypted claims: the event is decrypted by the crypto machine (waiting, bounded by
//! `encryption.key_wait`, for a room key still on its way by `/sync`), then classified and
//! handled like a plaintext event. One that stays unreadable gets the `encrypted_room` notice
//! (once per room per day) and a `request_log` row.

use std::sync::Arc;

use serde_json::json;

use crate::claims::{Fence, LeaseKeeper};
use crate::classify::{Event, SkipReason, Verdict};
use crate::state::AppState;

use super::recover::classify_now;

/// The plaintext event and its verdict; `None` when there is nothing more to do here (the
/// claim was lost, or it waits for the replica that owns the crypto machine).
pub(super) async fn decrypt(
    state: &Arc<AppState>,
    event: Event,
    fence: &Fence,
) -> Option<(Event, Verdict)> {
    let Some(crypto) = state.matrix.crypto() else {
        // The machine moved to another replica: this lease runs out and the owner takes it.
        tracing::info!("an encrypted claim without the crypto machine; leaving it to its owner");
        return None;
    };
    let raw = json!({
        "event_id": event.event_id,
        "room_id": event.room_id,
        "sender": event.sender,
        "type": event.kind,
        "content": event.content,
        "origin_server_ts": event.origin_server_ts,
    });
    // The wait can outlast the claim's lease: keep it renewed meanwhile.
    let keeper = LeaseKeeper::start(state, fence.clone());
    let gate = keeper.gate();
    let patience = state.config.encryption.key_wait;
    let result = tokio::select! {
        r = crypto.decrypt_waiting(&event.room_id, &raw, patience) => r,
        () = gate.lost() => {
            tracing::warn!("lost an encrypted claim while waiting for its key");
            return None;
        }
    };
    keeper.stop();
    match result {
        Ok(plain) => {
            let mut plain_event = match Event::parse(&plain) {
                Ok(e) => e,
                Err(why) => {
                    tracing::warn!(%why, "a decrypted event is malformed");
                    return Some((event, Verdict::Skip(SkipReason::EncryptedRoom)));
                }
            };
            plain_event.room_id = event.room_id.clone();
            state.metrics.inc("decrypted_total", &[("result", "ok")]);
            let verdict = classify_now(state, &plain_event).await?;
            tracing::debug!(verdict = verdict.label(), "decrypted a claimed event");
            Some((plain_event, verdict))
        }
        Err(why) => {
            let label = why.as_str();
            tracing::warn!(
                reason = label,
                ?patience,
                "an encrypted message could not be decrypted"
            );
            state.metrics.inc("decrypted_total", &[("result", label)]);
            Some((event, Verdict::Skip(SkipReason::EncryptedRoom)))
        }
    }
}
