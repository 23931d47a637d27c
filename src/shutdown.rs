//! Graceful shutdown: stop taking work, let answers in flight finish within the grace period,
//! cancel the rest, and hand every unfinished claim to the other replicas at once.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::state::AppState;

/// How long cancelled workers get to unwind, and `request_log` writes to drain.
const UNWIND: Duration = Duration::from_secs(5);

/// What shutdown did with the work in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Workers were still running when the grace period ended and were cancelled.
    pub cancelled: bool,
    /// Unfinished claims of this replica released for the others.
    pub released: usize,
}

/// Drains this replica's work. Safe to call once the HTTP server stopped accepting.
pub async fn drain(state: &AppState, grace: Duration) -> Drained {
    // `/ready` fails and the sweepers stop taking claims from now on.
    state.accepting.store(false, Ordering::SeqCst);
    state.tasks.close();
    let cancelled = tokio::time::timeout(grace, state.tasks.wait())
        .await
        .is_err();
    if cancelled {
        tracing::warn!(
            ?grace,
            "answers still running after the grace period; cancelling them"
        );
        state.cancel.cancel();
        if tokio::time::timeout(UNWIND, state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("cancelled workers did not stop in time");
        }
    }
    if tokio::time::timeout(UNWIND, state.telemetry.flush())
        .await
        .is_err()
    {
        tracing::warn!("request_log writes did not finish in time");
    }
    // Released now, a claim is taken by another replica at its next sweep, not after its lease.
    let released = match state.store.release_claims(state.instance_id.clone()).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "could not release claims; they expire with their lease");
            0
        }
    };
    if released > 0 {
        tracing::info!(released, "released unfinished claims");
    }
    crate::crypto::owner::release(state).await;
    Drained {
        cancelled,
        released,
    }
}
