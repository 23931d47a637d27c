//! The answer pipeline for one claimed event, in stages a newcomer finds by name:
//! admit (too old?) -> [`run`] (commands, decide, reserve, cascade) -> [`render`] (safe, split
//! reply into the outbox) -> [`deliver`] (outbox stored with the claim, then sent) ->
//! [`record`] (the `request_log` row). [`recover`] takes over claims of dead workers;
//! [`notice`] handles skip notices and invites; [`encrypted`] decrypts an encrypted claim
//! before it takes this path. Every claim change is fenced ([`crate::claims`]).

pub mod command;
pub mod deliver;
pub mod encrypted;
pub mod images;
pub mod notice;
pub mod progress;
pub mod record;
pub mod recover;
pub mod render;
pub mod run;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use crate::claims::{ClaimState, Fence, LeaseKeeper};
use crate::classify::{Event, Request, Verdict};
use crate::state::AppState;

use deliver::SendFailure;
use render::{Outbox, ReplyTarget};
use run::Response;

/// How long the typing notification lasts before it must be renewed.
const TYPING_TIMEOUT: Duration = Duration::from_secs(30);

/// An addressed message to answer.
#[derive(Debug, Clone)]
pub struct Job {
    pub event_id: String,
    pub room_id: String,
    pub sender: String,
    pub request: Request,
    /// `origin_server_ts` of the message, in ms since the epoch.
    pub origin_ts: i64,
    /// The event an earlier worker first posted the answer as (recovery edits it).
    pub progress_event: Option<String>,
    /// The message was end-to-end encrypted: its text is never stored, whatever
    /// `telemetry.store_text` says.
    pub encrypted: bool,
}

impl Job {
    /// The text `request_log.query_text` may hold (emptied later unless `store_text`).
    pub fn query_text(&self) -> String {
        if self.encrypted {
            String::new()
        } else {
            self.request.text.clone()
        }
    }
}

fn message_age(origin_ts: i64) -> Duration {
    let now = chrono::Utc::now().timestamp_millis();
    Duration::from_millis(now.saturating_sub(origin_ts).max(0) as u64)
}

/// Keeps the typing notification alive until stopped.
struct Typing {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Typing {
    fn start(state: &Arc<AppState>, room_id: &str) -> Self {
        let state = state.clone();
        let room = room_id.to_string();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = state.matrix.typing(&room, true, TYPING_TIMEOUT).await {
                    tracing::debug!(error = %e, "typing notification failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(TYPING_TIMEOUT - Duration::from_secs(10)) => {}
                    _ = &mut stopped => return,
                }
            }
        });
        Self { stop, task }
    }

    /// Stops the renewals, lets an in-flight "typing" request finish (so it cannot land after
    /// the "stopped typing" one), then clears the notification.
    async fn stop(self, state: &AppState, room_id: &str) {
        let _ = self.stop.send(());
        let _ = self.task.await;
        if let Err(e) = state.matrix.typing(room_id, false, TYPING_TIMEOUT).await {
            tracing::debug!(error = %e, "clearing the typing notification failed");
        }
    }
}

/// Ends a claim this worker holds; a failed or refused step is logged.
async fn close(state: &AppState, fence: &Fence, to: ClaimState, reply: Option<String>) -> bool {
    match state
        .store
        .claim_transition(fence.clone(), to, state.timings.claim_lease, reply)
        .await
    {
        Ok(done) => {
            if !done {
                tracing::warn!(event_id = %fence.event_id, state = to.as_str(), "the claim moved on elsewhere");
            }
            done
        }
        Err(e) => {
            tracing::warn!(event_id = %fence.event_id, error = %e, state = to.as_str(), "could not update the claim");
            false
        }
    }
}

/// Answers one addressed message and records it. Every failure ends as an apology to the
/// user (when possible) and a `request_log` row, except a lost claim: its new holder answers.
pub async fn answer(state: Arc<AppState>, job: Job, fence: Fence) {
    let started = Instant::now();
    if message_age(job.origin_ts) > state.timings.max_message_age {
        tracing::warn!(event_id = %job.event_id, "message too old to answer, dropping");
        if close(&state, &fence, ClaimState::Failed, None).await {
            let mut row = record::base_row(&job.event_id, &job.room_id, &job.sender);
            row.err = "message too old when handled".into();
            state.telemetry.record(row);
        }
        return;
    }

    let keeper = LeaseKeeper::start(&state, fence.clone());
    let gate = keeper.gate();
    let typing = Typing::start(&state, &job.room_id);
    let response = tokio::select! {
        r = run::respond(&state, &job, &fence, &gate) => r,
        _ = gate.lost() => Response::Lost,
    };
    typing.stop(&state, &job.room_id).await;
    let (text, mut row, msgtype, edit) = match response {
        Response::Reply(text, row, edit) => (text, row, state.config.bot.reply_msgtype, edit),
        Response::Notice(text, row) => (text, row, crate::config::ReplyMsgtype::Notice, None),
        Response::Silent(row) => {
            if close(&state, &fence, ClaimState::Done, None).await {
                record::finish(&state, *row);
            }
            return;
        }
        Response::Lost => {
            lost(&state, &fence);
            return;
        }
    };
    row.latency_ms = started.elapsed().as_millis() as i64;
    if !state.config.telemetry.store_text {
        row.query_text.clear();
    }
    let target = ReplyTarget {
        event_id: &job.event_id,
        sender: &job.sender,
        thread_root: job.request.thread_root.as_deref(),
    };
    let mut outbox = Outbox::new(msgtype, &text, &target, "reply", *row);
    if let Some(first) = edit.as_deref() {
        outbox.edit_first(first);
    }
    if !deliver::store_outbox(&state, &fence, &gate, &outbox, job.encrypted).await {
        lost(&state, &fence);
        return;
    }
    send_stored(&state, &fence, &gate, &job.room_id, outbox, 0).await;
    keeper.stop();
}

/// Sends a stored outbox from part `first` on and ends the claim by what happened.
pub(crate) async fn send_stored(
    state: &AppState,
    fence: &Fence,
    gate: &crate::claims::Gate,
    room_id: &str,
    outbox: Outbox,
    first: usize,
) {
    let mut row = outbox.row.clone();
    match deliver::send_parts(state, fence, gate, room_id, &outbox, first).await {
        Ok(sent) => {
            let reply = sent.into_iter().next();
            if close(state, fence, ClaimState::Answered, reply).await {
                record::finish(state, row);
            }
        }
        Err(SendFailure::Permanent(e)) => {
            // Trying again cannot help, and the answer is paid: end the claim, no re-answer.
            tracing::warn!(event_id = %fence.event_id, error = %e, "the homeserver refused the reply");
            row.ok = false;
            row.degraded = crate::cascade::Degrade::SendFailed.as_str().into();
            row.err = format!("sending the reply failed: {e}");
            if close(state, fence, ClaimState::Failed, None).await {
                record::finish(state, row);
            }
        }
        Err(SendFailure::GaveUp(e)) => {
            // The reply stays stored; recovery retries it once the lease runs out.
            tracing::warn!(event_id = %fence.event_id, error = %e, "sending kept failing; leaving the stored reply to recovery");
        }
        Err(SendFailure::Lost) => lost(state, fence),
    }
}

fn lost(state: &AppState, fence: &Fence) {
    tracing::warn!(event_id = %fence.event_id, "lost the claim; its new holder answers");
    state.metrics.inc("claims_lost_total", &[]);
}

/// Hands a verdict that needs work to a tracked task holding one of the replica's worker
/// slots. Every log line of the task carries the source event id.
pub fn dispatch(
    state: &Arc<AppState>,
    event: Event,
    verdict: Verdict,
    fence: Fence,
    slot: OwnedSemaphorePermit,
    mut how: Received,
) {
    let worker = state.clone();
    let span = tracing::info_span!("request", event_id = %event.event_id);
    let working = state.working.enter(&event.event_id);
    how.encrypted |= matches!(verdict, Verdict::Decrypt);
    let task = async move {
        let decrypted = match verdict {
            Verdict::Decrypt => encrypted::decrypt(&worker, event, &fence).await,
            verdict => Some((event, verdict)),
        };
        if let Some((event, verdict)) = decrypted {
            work(worker.clone(), event, verdict, fence, how).await;
        }
        drop(working);
        drop(slot);
        // A slot is free: queued claims may be waiting for it.
        worker.slot_freed.notify_one();
    };
    state.spawn_worker(task.instrument(span));
}

/// How a claimed event reached the worker.
#[derive(Debug, Default)]
pub struct Received {
    /// The event an earlier worker first posted the answer as.
    pub progress_event: Option<String>,
    /// It was end-to-end encrypted: an encrypted claim, fetched again already decrypted
    /// (recovery) or still to decrypt.
    pub encrypted: bool,
}

/// Does what a (plaintext) verdict asks.
async fn work(state: Arc<AppState>, event: Event, verdict: Verdict, fence: Fence, how: Received) {
    match verdict {
        Verdict::Addressed(request) => {
            let job = Job {
                event_id: event.event_id,
                room_id: event.room_id,
                sender: event.sender,
                request,
                origin_ts: event.origin_server_ts,
                progress_event: how.progress_event,
                encrypted: how.encrypted,
            };
            answer(state, job, fence).await;
        }
        Verdict::Skip(reason) => notice::skip(state, event, reason, fence).await,
        Verdict::Invite {
            declined,
            is_direct,
        } => notice::invite(state, event, declined, is_direct, fence).await,
        // A decrypted event that is itself encrypted again is not read twice.
        Verdict::Ignore(_) | Verdict::Decrypt => {
            close(&state, &fence, ClaimState::Done, None).await;
        }
    }
}
