//! `grok-appservice leave-all`, for uninstalling: the bot leaves and forgets every room the
//! homeserver says it is in, and the database forgets those rooms and any it still lists.

use std::collections::BTreeSet;

use crate::matrix::{MatrixClient, MatrixError};
use crate::store::{Store, StoreError};

/// What `leave-all` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaveReport {
    /// Rooms the homeserver listed as joined.
    pub joined: usize,
    /// Of those, rooms left (and forgotten on the homeserver).
    pub left: usize,
    /// Rooms whose leave failed, with the error; they stay in the database for a re-run.
    pub failed: Vec<(String, String)>,
    /// Rooms removed from the database's `rooms` (left ones, and stale ones the homeserver
    /// did not list).
    pub cleared: usize,
}

/// Why `leave-all` could not start.
#[derive(Debug, thiserror::Error)]
pub enum LeaveError {
    #[error("listing the bot's rooms failed: {0}")]
    Matrix(#[from] MatrixError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Leaves and forgets every joined room, one at a time (the client waits out rate limits),
/// then clears the rooms from the database.
pub async fn leave_all(matrix: &MatrixClient, store: &Store) -> Result<LeaveReport, LeaveError> {
    let joined = matrix.joined_rooms().await?;
    let mut report = LeaveReport {
        joined: joined.len(),
        ..LeaveReport::default()
    };
    for room in &joined {
        match matrix.leave(room).await {
            Ok(()) => {
                report.left += 1;
                // Forgetting only tidies the bot's room list; a failure leaves nothing open.
                if let Err(e) = matrix.forget(room).await {
                    tracing::warn!(room_id = %room, error = %e, "forgetting a left room failed");
                }
            }
            Err(e) => report.failed.push((room.clone(), e.to_string())),
        }
    }
    let failed: BTreeSet<&str> = report.failed.iter().map(|(r, _)| r.as_str()).collect();
    let known = store.room_ids().await?;
    // Joined rooms the database never recorded may still have settings or notices.
    let unknown = joined.iter().filter(|r| !known.contains(r)).cloned();
    for room in known.iter().cloned().chain(unknown) {
        if failed.contains(room.as_str()) {
            continue;
        }
        let was_known = known.contains(&room);
        store.forget_room(room).await?;
        report.cleared += usize::from(was_known);
    }
    Ok(report)
}
