//! Addressed messages the bot cannot serve (a rate-limited notice) and invites (join or
//! decline).

use std::sync::Arc;
use std::time::Duration;

use crate::claims::{ClaimState, Fence};
use crate::classify::{Event, SkipReason};
use crate::config::ReplyMsgtype;
use crate::state::AppState;
use crate::telemetry::RequestLog;

use super::close;
use super::record::skip_row;
use super::render::{Outbox, ReplyTarget};

/// The notice for an addressed message the bot cannot serve.
pub(super) fn skip_notice(state: &AppState, reason: SkipReason) -> String {
    match reason {
        SkipReason::EncryptedRoom if state.config.encryption.enabled => {
            "I couldn't decrypt a message here: its key never reached me. Please send it \
             again; if this keeps happening, your client may not share keys with my device."
                .into()
        }
        SkipReason::EncryptedRoom => {
            "I can't read encrypted messages. Please talk to me in a room \
                                      without encryption."
                .into()
        }
        SkipReason::Media if state.config.vision.enabled => format!(
            "I can read text and images (JPEG, PNG, WebP or GIF up to {} MB), not other \
             files, audio or video. Please describe what you need in words.",
            state.config.vision.max_bytes.div_ceil(1024 * 1024)
        ),
        SkipReason::Media => "I can only read text for now, not images, files, audio or video. \
                              Please describe what you need in words."
            .into(),
        SkipReason::ForeignRoom => format!(
            "Sorry, I only answer users of {}.",
            state.config.rooms.allowed_servers.join(", ")
        ),
        SkipReason::NotAllowed => "Sorry, the administrator of this bot has not allowed your \
                                   account to use it."
            .into(),
        SkipReason::UserBlocked => "You can't use me: the administrator has set your limit to \
                                    zero. Ask them if you think this is a mistake."
            .into(),
    }
}

/// How often a notice of one kind may be posted in one room.
pub(super) fn notice_window(reason: SkipReason) -> Duration {
    match reason {
        SkipReason::EncryptedRoom
        | SkipReason::ForeignRoom
        | SkipReason::NotAllowed
        | SkipReason::UserBlocked => Duration::from_secs(24 * 3600),
        SkipReason::Media => Duration::from_secs(60),
    }
}

/// The rate-limit key of a notice: refusals that concern one user are told to each of them,
/// the others once per room.
fn notice_key(reason: SkipReason, sender: &str) -> String {
    match reason {
        SkipReason::NotAllowed | SkipReason::UserBlocked => format!("{}:{sender}", reason.as_str()),
        _ => reason.as_str().into(),
    }
}

/// Handles an addressed message that cannot be served: a rate-limited notice and a
/// `request_log` row with route `none`.
pub async fn skip(state: Arc<AppState>, event: Event, reason: SkipReason, fence: Fence) {
    let room_id = event.room_id.clone();
    let allowed = state
        .store
        .take_notice_slot(
            room_id.clone(),
            notice_key(reason, &event.sender),
            notice_window(reason),
        )
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "notice rate limit unavailable; not posting");
            false
        });
    if allowed {
        let target = ReplyTarget {
            event_id: &event.event_id,
            sender: &event.sender,
            thread_root: None,
        };
        let notice = Outbox::new(
            ReplyMsgtype::Notice,
            &skip_notice(&state, reason),
            &target,
            "notice",
            RequestLog::default(),
        );
        let part = &notice.parts[0];
        match state
            .matrix
            .send_message(&room_id, &part.txn_id, &part.content)
            .await
        {
            Ok(id) => {
                let _ = state.store.record_bot_event(id, room_id.clone()).await;
            }
            Err(e) => tracing::warn!(event_id = %event.event_id, error = %e, "notice failed"),
        }
    }
    close(&state, &fence, ClaimState::Done, None).await;
    state
        .metrics
        .inc("degraded_total", &[("reason", reason.as_str())]);
    state
        .telemetry
        .record(skip_row(&event.event_id, &room_id, &event.sender, reason));
}

/// Joins a room on an allowed invite, or leaves (declines) one refused for `declined`.
pub async fn invite(
    state: Arc<AppState>,
    event: Event,
    declined: Option<SkipReason>,
    is_direct: bool,
    fence: Fence,
) {
    let room = event.room_id.clone();
    if let Some(reason) = declined {
        tracing::info!(room_id = %room, inviter = %event.sender, reason = reason.as_str(),
            "declining an invite");
        if let Err(e) = state.matrix.leave(&room).await {
            tracing::warn!(room_id = %room, error = %e, "declining the invite failed");
        }
        close(&state, &fence, ClaimState::Done, None).await;
        state
            .metrics
            .inc("degraded_total", &[("reason", reason.as_str())]);
        state
            .telemetry
            .record(skip_row(&event.event_id, &room, &event.sender, reason));
        return;
    }
    match state.matrix.join(&room).await {
        Ok(()) => {
            let members = state
                .matrix
                .joined_members(&room)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(room_id = %room, error = %e, "could not list members");
                    Vec::new()
                });
            if let Err(e) = state.store.set_room(room.clone(), is_direct, members).await {
                tracing::warn!(room_id = %room, error = %e, "could not record the room");
            }
            tracing::info!(room_id = %room, is_direct, "joined");
            close(&state, &fence, ClaimState::Done, None).await;
        }
        Err(e) => {
            tracing::warn!(room_id = %room, error = %e, "joining failed");
            close(&state, &fence, ClaimState::Failed, None).await;
        }
    }
}
