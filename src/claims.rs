//! The claim state machine: the states a claimed event moves through, the legal steps, the
//! fencing token that every step is conditional on, and the lease keeper that renews a held
//! claim and tells its worker the moment the claim is lost.
//!
//! ```text
//! claimed -> answering -> sending -> answered
//!    |           |           '-----> failed   (a permanent send error)
//!    '-----------'---------> failed | done    (too old, given up; skip and invite claims)
//! ```
//! A takeover (recovery) keeps the state and bumps the generation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::state::AppState;

/// Where a claim is in its life (the stable `processed_events.state` tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimState {
    /// Claimed; no model called yet.
    Claimed,
    /// The model is being asked (a re-run may pay again).
    Answering,
    /// The reply is in the outbox and being sent (a re-run re-sends it, never re-asks).
    Sending,
    /// The reply was sent; `reply_event_id` holds its first event.
    Answered,
    /// Handled without a reply of its own (invite, skip notice, ignored on recovery).
    Done,
    /// Given up on.
    Failed,
}

const ALL: [ClaimState; 6] = [
    ClaimState::Claimed,
    ClaimState::Answering,
    ClaimState::Sending,
    ClaimState::Answered,
    ClaimState::Done,
    ClaimState::Failed,
];

impl ClaimState {
    /// The stored token.
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimState::Claimed => "claimed",
            ClaimState::Answering => "answering",
            ClaimState::Sending => "sending",
            ClaimState::Answered => "answered",
            ClaimState::Done => "done",
            ClaimState::Failed => "failed",
        }
    }

    /// Parses a stored token.
    pub fn parse(token: &str) -> Option<Self> {
        ALL.into_iter().find(|s| s.as_str() == token)
    }

    /// Whether the claim is finished (never taken over, pruned after its retention).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            ClaimState::Answered | ClaimState::Done | ClaimState::Failed
        )
    }

    /// The tokens of the open (not final) states.
    pub fn open_tokens() -> [&'static str; 3] {
        [
            ClaimState::Claimed.as_str(),
            ClaimState::Answering.as_str(),
            ClaimState::Sending.as_str(),
        ]
    }

    /// The states this one may be reached from (staying in a state renews it).
    pub fn allowed_from(self) -> Vec<&'static str> {
        let from: &[ClaimState] = match self {
            ClaimState::Claimed => &[ClaimState::Claimed],
            ClaimState::Answering => &[ClaimState::Claimed, ClaimState::Answering],
            // Commands and refusals reach `sending` without asking a model.
            ClaimState::Sending => &[
                ClaimState::Claimed,
                ClaimState::Answering,
                ClaimState::Sending,
            ],
            ClaimState::Answered => &[ClaimState::Sending],
            ClaimState::Done | ClaimState::Failed => &[
                ClaimState::Claimed,
                ClaimState::Answering,
                ClaimState::Sending,
            ],
        };
        from.iter().map(|s| s.as_str()).collect()
    }
}

/// The fencing token of a held claim: who holds it, in which generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub event_id: String,
    pub owner: String,
    pub generation: i64,
}

/// What the worker knows about its claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Renewed recently: nobody else may take it before the lease runs out.
    Held,
    /// The lease ran out without a confirmed renewal (the database is unreachable): nobody
    /// may have taken it yet, but no new provider call or send may start until it is confirmed.
    Unconfirmed,
    /// Taken over or finished elsewhere: stop at once.
    Lost,
}

/// Renews a claim's lease in the background while its worker runs.
pub struct LeaseKeeper {
    hold: watch::Receiver<Hold>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    /// Starts renewing `fence` every quarter of the lease.
    pub fn start(state: &Arc<AppState>, fence: Fence) -> Self {
        let (tx, hold) = watch::channel(Hold::Held);
        let state = state.clone();
        let task = tokio::spawn(async move {
            let lease = state.timings.claim_lease;
            let every = lease / 4;
            let mut confirmed_at = Instant::now();
            loop {
                tokio::time::sleep(every).await;
                // A renewal that cannot answer within its period counts as not confirmed.
                let renewed =
                    tokio::time::timeout(every, state.store.claim_renew(fence.clone(), lease))
                        .await;
                match renewed {
                    Ok(Ok(true)) => {
                        confirmed_at = Instant::now();
                        tx.send_replace(Hold::Held);
                    }
                    Ok(Ok(false)) => {
                        tracing::warn!(event_id = %fence.event_id, "the claim was taken over; stopping");
                        tx.send_replace(Hold::Lost);
                        return;
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "could not renew the claim's lease"),
                    Err(_) => tracing::warn!("renewing the claim's lease timed out"),
                }
                // Leave a margin of one period: the lease may have been written late.
                if confirmed_at.elapsed() + every >= lease {
                    tx.send_if_modified(|h| {
                        let changed = *h == Hold::Held;
                        if changed {
                            *h = Hold::Unconfirmed;
                        }
                        changed
                    });
                }
            }
        });
        Self { hold, task }
    }

    /// A handle the worker's stages wait on.
    pub fn gate(&self) -> Gate {
        Gate {
            hold: self.hold.clone(),
        }
    }

    /// Stops renewing.
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The worker's view of its claim: waited on before every provider call and every send.
#[derive(Debug, Clone)]
pub struct Gate {
    hold: watch::Receiver<Hold>,
}

/// The claim was lost: the worker must stop without calling the model or sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the claim was lost to another worker")]
pub struct Lost;

impl Gate {
    /// A gate that is always open (the `ask` command and tests run without a claim).
    pub fn open() -> Self {
        let (tx, hold) = watch::channel(Hold::Held);
        // The sender may go: a closed channel keeps its last value.
        drop(tx);
        Self { hold }
    }

    /// Returns once the claim is confirmed held; `Err(Lost)` if it is lost, or if it cannot be
    /// confirmed within `patience` (the database stays unreachable).
    pub async fn ready(&self, patience: Duration) -> Result<(), Lost> {
        let mut hold = self.hold.clone();
        let waited = tokio::time::timeout(patience, async {
            match hold.wait_for(|h| *h != Hold::Unconfirmed).await {
                Ok(h) => *h,
                // A closed channel keeps its last value: the keeper stopped on Held or Lost.
                Err(_) => *self.hold.borrow(),
            }
        })
        .await;
        match waited {
            Ok(Hold::Held) => Ok(()),
            _ => Err(Lost),
        }
    }

    /// Resolves when the claim is lost (never for an open gate).
    pub async fn lost(&self) {
        let mut hold = self.hold.clone();
        if hold.wait_for(|h| *h == Hold::Lost).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The event ids this replica's workers hold right now: recovery never takes over a claim
/// from a live local worker whose lease merely lapsed (the database was unreachable).
#[derive(Debug, Default)]
pub struct Working {
    held: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl Working {
    /// Marks `event_id` as worked on until the guard drops.
    pub fn enter(self: &Arc<Self>, event_id: &str) -> WorkingGuard {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        *held.entry(event_id.to_string()).or_default() += 1;
        WorkingGuard {
            set: self.clone(),
            event_id: event_id.to_string(),
        }
    }

    /// The event ids held now.
    pub fn snapshot(&self) -> Vec<String> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.keys().cloned().collect()
    }
}

/// Removes its event id from [`Working`] when dropped.
pub struct WorkingGuard {
    set: Arc<Working>,
    event_id: String,
}

impl Drop for WorkingGuard {
    fn drop(&mut self) {
        let mut held = self.set.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.event_id) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.event_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_final_states_are_closed() {
        for s in ALL {
            assert_eq!(ClaimState::parse(s.as_str()), Some(s));
            assert_eq!(
                ClaimState::open_tokens().contains(&s.as_str()),
                !s.is_final()
            );
        }
        assert_eq!(ClaimState::parse("sent"), None);
    }

    #[test]
    fn no_step_leaves_a_final_state_and_answered_needs_sending() {
        for to in ALL {
            for from in to.allowed_from() {
                assert!(
                    !ClaimState::parse(from).unwrap().is_final(),
                    "{from} -> {to:?}"
                );
            }
        }
        assert_eq!(ClaimState::Answered.allowed_from(), vec!["sending"]);
        assert!(!ClaimState::Claimed.allowed_from().contains(&"answering"));
    }

    #[test]
    fn working_set_counts_nested_entries() {
        let w = Arc::new(Working::default());
        let a = w.enter("$e");
        let b = w.enter("$e");
        drop(a);
        assert_eq!(w.snapshot(), vec!["$e".to_string()]);
        drop(b);
        assert!(w.snapshot().is_empty());
    }

    #[tokio::test]
    async fn an_open_gate_never_blocks_or_reports_loss() {
        let gate = Gate::open();
        assert_eq!(gate.ready(Duration::from_millis(10)).await, Ok(()));
        let lost = tokio::time::timeout(Duration::from_millis(20), gate.lost()).await;
        assert!(lost.is_err());
    }

    #[tokio::test]
    async fn an_unconfirmed_gate_waits_then_follows_the_keeper() {
        let (tx, hold) = watch::channel(Hold::Unconfirmed);
        let gate = Gate { hold };
        assert_eq!(gate.ready(Duration::from_millis(20)).await, Err(Lost));
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.ready(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send_replace(Hold::Held);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        tx.send_replace(Hold::Lost);
        assert_eq!(gate.ready(Duration::from_secs(1)).await, Err(Lost));
        tokio::time::timeout(Duration::from_secs(1), gate.lost())
            .await
            .expect("loss is seen");
    }
}
