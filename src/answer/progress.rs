//! The progress stage: while the model writes, the room sees the answer early. With
//! `reply.streaming` the answer is posted after its first words and edited as more arrives, at
//! most once per `reply.edit_interval` and leaving the last of `reply.max_edits` edits for the
//! complete answer; with `reply.placeholder_after` a slow answer gets a short "Thinking..."
//! notice. Either way the first event's id is stored with the claim before any edit, so the
//! final answer (the outbox's first part, see [`super::render::Outbox::edit_first`]) and a
//! replica that takes the claim over edit that event instead of posting a second message.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::claims::{Fence, Gate};
use crate::matrix::reply_txn_id;
use crate::provider::StreamUpdate;
use crate::state::AppState;

use super::deliver::CLAIM_PATIENCE;
use super::render::{edit_content, progress_content, ReplyTarget};
use super::Job;

/// What a slow, non-streamed answer shows until it is ready.
const PLACEHOLDER: &str = "Thinking...";

/// Shows one answer's progress until [`Progress::finish`].
pub struct Progress {
    updates: Option<mpsc::UnboundedSender<StreamUpdate>>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Option<String>>,
}

impl Progress {
    /// Starts showing progress for `job`, or `None` when the config asks for none and no
    /// earlier worker posted a first event (`job.progress_event`) that must be edited.
    pub fn start(state: &Arc<AppState>, job: &Job, fence: &Fence, gate: &Gate) -> Option<Self> {
        let reply = &state.config.reply;
        if !reply.streaming && reply.placeholder_after.is_none() && job.progress_event.is_none() {
            return None;
        }
        let (updates, rx) = if reply.streaming {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let (stop, stopped) = oneshot::channel();
        let shower = Shower {
            state: state.clone(),
            job: job.clone(),
            fence: fence.clone(),
            posted: job.progress_event.clone(),
            edits: 0,
        };
        let task = tokio::spawn(shower.run(rx, stopped, gate.clone()));
        Some(Self {
            updates,
            stop,
            task,
        })
    }

    /// Where the cascade streams the answer's text, when streaming is on.
    pub fn updates(&self) -> Option<&mpsc::UnboundedSender<StreamUpdate>> {
        self.updates.as_ref()
    }

    /// Stops showing progress; returns the event the answer was first posted as, if any (the
    /// final answer edits it).
    pub async fn finish(self) -> Option<String> {
        let _ = self.stop.send(());
        self.task.await.ok().flatten()
    }
}

/// The task behind [`Progress`].
struct Shower {
    state: Arc<AppState>,
    job: Job,
    fence: Fence,
    /// The first event, once posted (or posted by an earlier worker).
    posted: Option<String>,
    edits: u32,
}

impl Shower {
    async fn run(
        mut self,
        mut rx: Option<mpsc::UnboundedReceiver<StreamUpdate>>,
        mut stopped: oneshot::Receiver<()>,
        gate: Gate,
    ) -> Option<String> {
        let reply = self.state.config.reply.clone();
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let placeholder_at = reply
            .placeholder_after
            .filter(|_| self.posted.is_none())
            .map_or(far, |d| Instant::now() + d);
        let mut placeholder_due = placeholder_at < far;
        let mut text = String::new();
        let mut dirty = false;
        let mut next_edit = Instant::now();
        loop {
            let flush_at = if dirty { next_edit } else { far };
            tokio::select! {
                _ = &mut stopped => break,
                _ = gate.lost() => break,
                update = recv(&mut rx) => match update {
                    Some(StreamUpdate::Delta(more)) => {
                        text.push_str(&more);
                        dirty = true;
                    }
                    Some(StreamUpdate::Restart) => {
                        text.clear();
                        dirty = false;
                    }
                    None => rx = None,
                },
                _ = tokio::time::sleep_until(placeholder_at), if placeholder_due => {
                    placeholder_due = false;
                    if self.posted.is_none() && text.is_empty() {
                        self.post(&gate, PLACEHOLDER).await;
                    }
                }
                _ = tokio::time::sleep_until(flush_at), if dirty => {
                    dirty = false;
                    next_edit = Instant::now() + reply.edit_interval;
                    if text.trim().is_empty() {
                        continue;
                    }
                    if self.posted.is_none() {
                        self.post(&gate, &text).await;
                    } else if self.edits + 1 < reply.max_edits {
                        // The last edit allowed is the complete answer's.
                        self.edit(&gate, &text).await;
                    }
                }
            }
        }
        self.posted
    }

    fn target(&self) -> ReplyTarget<'_> {
        ReplyTarget {
            event_id: &self.job.event_id,
            sender: &self.job.sender,
            thread_root: self.job.request.thread_root.as_deref(),
        }
    }

    /// Posts the first event and stores its id with the claim before anything edits it.
    async fn post(&mut self, gate: &Gate, text: &str) {
        if gate.ready(CLAIM_PATIENCE).await.is_err() {
            return;
        }
        let msgtype = self.state.config.bot.reply_msgtype;
        let content = progress_content(msgtype, text, &self.target());
        let txn = reply_txn_id(&self.job.event_id, "progress");
        let room = &self.job.room_id;
        let id = match self.state.matrix.send_message(room, &txn, &content).await {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(error = %e, "could not post the answer's first event");
                return;
            }
        };
        let _ = self
            .state
            .store
            .record_bot_event(id.clone(), room.clone())
            .await;
        match self
            .state
            .store
            .claim_progress_event(self.fence.clone(), id.clone())
            .await
        {
            Ok(true) => self.posted = Some(id),
            // Unrecorded, an edit could leave a second copy after a takeover: edit nothing.
            Ok(false) => tracing::warn!("lost the claim while posting progress"),
            Err(e) => tracing::warn!(error = %e, "could not store the progress event"),
        }
    }

    /// Edits the first event to show `text`.
    async fn edit(&mut self, gate: &Gate, text: &str) {
        let Some(target) = self.posted.clone() else {
            return;
        };
        if gate.ready(CLAIM_PATIENCE).await.is_err() {
            return;
        }
        self.edits += 1;
        let msgtype = self.state.config.bot.reply_msgtype;
        let content = edit_content(&progress_content(msgtype, text, &self.target()), &target);
        // The generation keeps a new holder's edits apart from a dead one's in the
        // homeserver's txnId cache.
        let purpose = format!("progress.{}.{}", self.fence.generation, self.edits);
        let txn = reply_txn_id(&self.job.event_id, &purpose);
        if let Err(e) = self
            .state
            .matrix
            .send_message(&self.job.room_id, &txn, &content)
            .await
        {
            tracing::debug!(error = %e, "a progress edit failed");
        }
    }
}

/// The next update, or never when there is no stream.
async fn recv(rx: &mut Option<mpsc::UnboundedReceiver<StreamUpdate>>) -> Option<StreamUpdate> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
