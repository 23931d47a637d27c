//! The deliver stage: stores the outbox with the claim, then sends its parts in order. Send
//! errors are classified: a permanent one ends the claim, a transient one is retried with
//! backoff within a bounded time while the lease keeper renews the claim.

use std::time::{Duration, Instant};

use crate::claims::{Fence, Gate};
use crate::matrix::MatrixError;
use crate::state::AppState;

use super::render::Outbox;

/// How long a stored reply is retried on transient errors before the claim is left to
/// recovery (which retries the stored reply, never the model).
pub const SEND_RETRY_BUDGET: Duration = Duration::from_secs(120);
/// How long a stage waits for an unconfirmed claim (database unreachable).
pub const CLAIM_PATIENCE: Duration = Duration::from_secs(30);

/// Why a reply was not (fully) sent.
#[derive(Debug, thiserror::Error)]
pub enum SendFailure {
    /// The homeserver refused the event for good (no permission, too large, bad request,
    /// the bot is not in the room): trying again cannot help.
    #[error("the homeserver refused the reply: {0}")]
    Permanent(MatrixError),
    /// Transient errors outlasted the retry budget.
    #[error("the homeserver kept failing: {0}")]
    GaveUp(MatrixError),
    /// The claim was lost: another worker owns the reply now.
    #[error("the claim was lost")]
    Lost,
}

/// Whether a failed send may succeed if tried again.
pub fn is_transient(e: &MatrixError) -> bool {
    match e {
        MatrixError::Transport(_) => true,
        MatrixError::Http { status, .. } => matches!(status, 408 | 429 | 500..=599),
    }
}

/// Stores the outbox with the claim (fenced); `sealed` (a reply to an encrypted message)
/// stores it encrypted by the crypto machine. While the database is unreachable it tries
/// again until the claim is lost or cannot be confirmed; false means the worker must stop.
pub async fn store_outbox(
    state: &AppState,
    fence: &Fence,
    gate: &Gate,
    outbox: &Outbox,
    sealed: bool,
) -> bool {
    let mut json = match serde_json::to_string(outbox) {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(error = %e, "could not serialise the outbox");
            return false;
        }
    };
    if sealed {
        let Some(crypto) = state.matrix.crypto() else {
            tracing::warn!(
                "the crypto machine moved to another replica before the reply was stored"
            );
            return false;
        };
        json = match crypto.seal(&json) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "could not seal the outbox");
                return false;
            }
        };
    }
    let started = Instant::now();
    loop {
        match state
            .store
            .claim_store_outbox(fence.clone(), json.clone(), state.timings.claim_lease)
            .await
        {
            Ok(stored) => return stored,
            Err(e) if started.elapsed() < CLAIM_PATIENCE => {
                tracing::warn!(error = %e, "could not store the reply yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = gate.lost() => return false,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not store the reply; leaving it to recovery");
                return false;
            }
        }
    }
}

/// Sends the outbox parts from `first` on; returns the event id of each part sent.
pub async fn send_parts(
    state: &AppState,
    fence: &Fence,
    gate: &Gate,
    room_id: &str,
    outbox: &Outbox,
    first: usize,
) -> Result<Vec<String>, SendFailure> {
    let mut sent = Vec::new();
    for (index, part) in outbox.parts.iter().enumerate().skip(first) {
        gate.ready(CLAIM_PATIENCE)
            .await
            .map_err(|_| SendFailure::Lost)?;
        let event_id = send_one(state, gate, room_id, &part.txn_id, &part.content).await?;
        if let Err(e) = state
            .store
            .record_bot_event(event_id.clone(), room_id.to_string())
            .await
        {
            tracing::warn!(error = %e, "could not record the reply as a bot event");
        }
        match state
            .store
            .claim_part_sent(
                fence.clone(),
                index as i32,
                event_id.clone(),
                state.timings.claim_lease,
            )
            .await
        {
            Ok(true) => {}
            Ok(false) => return Err(SendFailure::Lost),
            // The part landed; a re-run finds it in the room or the homeserver dedupes it.
            Err(e) => tracing::warn!(error = %e, "could not note a sent part"),
        }
        sent.push(event_id);
    }
    Ok(sent)
}

/// One send with retries of transient errors, with jittered exponential backoff.
async fn send_one(
    state: &AppState,
    gate: &Gate,
    room_id: &str,
    txn_id: &str,
    content: &serde_json::Value,
) -> Result<String, SendFailure> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(500);
    loop {
        let result = tokio::select! {
            r = state.matrix.send_message(room_id, txn_id, content) => r,
            _ = gate.lost() => return Err(SendFailure::Lost),
        };
        match result {
            Ok(id) => return Ok(id),
            Err(e) if !is_transient(&e) => return Err(SendFailure::Permanent(e)),
            Err(e) if started.elapsed() + backoff > SEND_RETRY_BUDGET => {
                return Err(SendFailure::GaveUp(e))
            }
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "sending the reply failed; retrying");
                let jitter = rand::random_range(0.75..1.25);
                tokio::select! {
                    _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                    _ = gate.lost() => return Err(SendFailure::Lost),
                }
                backoff = (backoff * 2).min(Duration::from_secs(15));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, errcode: &str) -> MatrixError {
        MatrixError::Http {
            status,
            errcode: errcode.into(),
            error: String::new(),
        }
    }

    #[test]
    fn send_errors_are_classified() {
        for (s, code) in [
            (403, "M_FORBIDDEN"),
            (413, "M_TOO_LARGE"),
            (400, "M_BAD_JSON"),
            (404, "M_NOT_FOUND"),
        ] {
            assert!(!is_transient(&http(s, code)), "{s}");
        }
        for s in [429, 500, 502, 503, 504, 408] {
            assert!(is_transient(&http(s, "")), "{s}");
        }
        assert!(is_transient(&MatrixError::Transport("reset".into())));
    }
}
