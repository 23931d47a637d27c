//! The database probes behind `/ready` and `/metrics`, cached for a moment: both endpoints are
//! unauthenticated by default and polled by load balancers and scrapers, so a burst of hits
//! must not become a burst of queries.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::{Backlog, Store, StoreError};

/// How long one probe's answer is reused.
pub const PROBE_TTL: Duration = Duration::from_secs(2);

/// A value and when it was read.
type Cached<T> = Mutex<Option<(Instant, T)>>;

/// The cached probes of one process.
#[derive(Default)]
pub struct Probes {
    ready: Cached<bool>,
    backlog: Cached<(String, Backlog)>,
}

fn fresh<T: Clone>(cell: &Cached<T>) -> Option<T> {
    let guard = cell.lock().unwrap_or_else(|p| p.into_inner());
    guard
        .as_ref()
        .filter(|(at, _)| at.elapsed() < PROBE_TTL)
        .map(|(_, v)| v.clone())
}

fn keep<T>(cell: &Cached<T>, value: T) {
    *cell.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), value));
}

impl Probes {
    /// Whether the database answers (at most one query per [`PROBE_TTL`]).
    pub async fn database_up(&self, store: &Store) -> bool {
        if let Some(up) = fresh(&self.ready) {
            return up;
        }
        let up = match store.ping().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "readiness check failed");
                false
            }
        };
        keep(&self.ready, up);
        up
    }

    /// The shared backlog of `day` (at most one query per [`PROBE_TTL`]); errors are not cached.
    pub async fn backlog(&self, store: &Store, day: String) -> Result<Backlog, StoreError> {
        if let Some((cached_day, b)) = fresh(&self.backlog) {
            if cached_day == day {
                return Ok(b);
            }
        }
        let b = store.backlog(day.clone()).await?;
        keep(&self.backlog, (day, b));
        Ok(b)
    }
}
