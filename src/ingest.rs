//! From a transaction body to what it writes and does: parsing (pure, one typed pass over the
//! JSON) and planning (classifying every event against the room facts the store read).
//!
//! The webhook runs both inside one store call, so a transaction costs one connection checkout
//! and one database round trip; see `Store::ingest`.

use std::sync::atomic::Ordering;

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::OwnedSemaphorePermit;

use crate::classify::{classify, is_direct_room, Event, Facts, IgnoreReason, Verdict};
use crate::state::AppState;
use crate::store::{ClaimKind, FactsQuery, MemberChange, NewClaim, RoomFacts, TxnWrite};

/// A transaction body as parsed: its well-formed events and why the others were skipped.
#[derive(Debug, Default)]
pub struct Parsed {
    pub events: Vec<Event>,
    /// `(index in the transaction, why)` of each malformed event.
    pub malformed: Vec<(usize, String)>,
    /// How many events the transaction carried, malformed ones included.
    pub event_count: usize,
}

/// Why a body is not a transaction at all (a malformed event alone is only skipped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("body is not a transaction: {0}")]
    NotTransaction(String),
}

/// The envelope only: each event stays raw text until it is parsed on its own, so one bad
/// event cannot fail the transaction and nothing is built twice.
#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

/// Parses a transaction body. Pure, so it can be fuzzed and benchmarked alone.
pub fn parse_transaction(body: &[u8]) -> Result<Parsed, BodyError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| BodyError::NotJson(format!("body is not UTF-8: {e}")))?;
    let envelope: Body<'_> = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            BodyError::NotTransaction(e.to_string())
        } else {
            BodyError::NotJson(e.to_string())
        }
    })?;
    let mut parsed = Parsed {
        events: Vec::with_capacity(envelope.events.len()),
        malformed: Vec::new(),
        event_count: envelope.events.len(),
    };
    for (i, raw) in envelope.events.iter().enumerate() {
        match Event::from_json(raw.get()) {
            Ok(event) => parsed.events.push(event),
            Err(why) => parsed.malformed.push((i, why)),
        }
    }
    Ok(parsed)
}

/// What the store must look up to classify these events.
pub fn facts_query(events: &[Event]) -> FactsQuery {
    FactsQuery::new(
        events.iter().map(|e| e.room_id.as_str()),
        events.iter().filter_map(Event::in_reply_to),
    )
}

/// What a transaction will do once its write is committed.
pub struct Plan {
    /// The events to work on, each with the worker slot it holds.
    pub actions: Vec<(Event, Verdict, OwnedSemaphorePermit)>,
    /// Rooms the bot was removed from.
    pub left_rooms: Vec<String>,
    /// Events per verdict label, counted once the transaction is known to be new.
    pub verdicts: VerdictCounts,
    /// Some claim found no free worker slot and was queued in the database.
    pub queued: bool,
}

/// Events per verdict label, added to the metrics in one go per transaction.
#[derive(Debug, Default, Clone, Copy)]
pub struct VerdictCounts {
    ignore: u64,
    invite: u64,
    skip: u64,
    addressed: u64,
    decrypt: u64,
}

impl VerdictCounts {
    fn count(&mut self, verdict: &Verdict) {
        match verdict {
            Verdict::Ignore(_) => self.ignore += 1,
            Verdict::Invite { .. } => self.invite += 1,
            Verdict::Skip(_) => self.skip += 1,
            Verdict::Addressed(_) => self.addressed += 1,
            Verdict::Decrypt => self.decrypt += 1,
        }
    }

    /// `(label, count)` pairs with the labels of `Verdict::label`.
    pub fn pairs(&self) -> [(&'static str, u64); 5] {
        [
            ("ignore", self.ignore),
            ("invite", self.invite),
            ("skip", self.skip),
            ("addressed", self.addressed),
            ("decrypt", self.decrypt),
        ]
    }
}

/// Classifies every event of a transaction in order against the room facts and decides what
/// to write: claims (leased when a worker slot is free, else queued), the bot's own echoes and
/// membership changes. Synchronous: it runs inside the store call, on its connection.
pub fn plan(state: &AppState, txn_id: &str, parsed: Parsed, facts: RoomFacts) -> (TxnWrite, Plan) {
    let mut rooms = facts.rooms;
    let me = &state.identity;
    let mut write = TxnWrite {
        txn_id: txn_id.to_string(),
        event_count: i32::try_from(parsed.event_count).unwrap_or(i32::MAX),
        ..TxnWrite::default()
    };
    let mut plan = Plan {
        actions: Vec::new(),
        left_rooms: Vec::new(),
        verdicts: VerdictCounts::default(),
        queued: false,
    };
    let crypto = state.matrix.crypto();
    for event in parsed.events {
        // Changed encryption settings (rotation) or history visibility (who gets the room
        // key) are read again before the next send.
        if let (Some(crypto), "m.room.encryption" | "m.room.history_visibility") =
            (&crypto, event.kind.as_str())
        {
            crypto.forget_room(&event.room_id);
        }
        // Membership changes apply in order, so a later message in the same transaction sees
        // the room as it is after them.
        if let Some((user, joined)) = event.membership() {
            if user == me.user_id && !joined && event.content["membership"] != "invite" {
                plan.left_rooms.push(event.room_id.clone());
            }
            let was_joined = event.prev_membership.as_deref() == Some("join");
            if let Some((_, count)) = rooms.get_mut(&event.room_id) {
                match (was_joined, joined) {
                    (false, true) => *count += 1,
                    (true, false) => *count -= 1,
                    _ => {}
                }
            }
            write.member_changes.push(MemberChange {
                room_id: event.room_id.clone(),
                user_id: user.to_string(),
                joined,
            });
        }
        let room = rooms.get(&event.room_id);
        let event_facts = Facts {
            direct_room: room.is_some_and(|(direct, count)| is_direct_room(*direct, *count)),
            replies_to_bot: event
                .in_reply_to()
                .is_some_and(|id| facts.bot_events.contains(id)),
            sender_blocked: state.limiter.blocks(&event.sender),
            decrypts: state.config.encryption.enabled,
        };
        let verdict = classify(&event, me, event_facts);
        plan.verdicts.count(&verdict);
        let kind = match &verdict {
            Verdict::Ignore(IgnoreReason::OwnEcho) => {
                write
                    .bot_events
                    .push((event.event_id.clone(), event.room_id.clone()));
                continue;
            }
            Verdict::Ignore(_) => continue,
            Verdict::Invite { .. } => ClaimKind::Invite,
            Verdict::Skip(_) => ClaimKind::Skip,
            Verdict::Addressed(_) => ClaimKind::Addressed,
            Verdict::Decrypt => ClaimKind::Encrypted,
        };
        // Without a free worker slot the claim is queued in the database, not in memory; an
        // encrypted one also while another replica owns the crypto machine.
        let slot = if kind == ClaimKind::Encrypted && state.matrix.crypto().is_none() {
            None
        } else {
            state.slots.clone().try_acquire_owned().ok()
        };
        plan.queued |= slot.is_none();
        write.claims.push(NewClaim {
            event_id: event.event_id.clone(),
            room_id: event.room_id.clone(),
            sender: event.sender.clone(),
            kind,
            origin_ts: chrono::DateTime::from_timestamp_millis(event.origin_server_ts)
                .map(|t| t.naive_utc())
                .unwrap_or_else(crate::store::now),
            leased: slot.is_some(),
        });
        if let Some(slot) = slot {
            plan.actions.push((event, verdict, slot));
        }
    }
    (write, plan)
}

impl Plan {
    /// Counts what was classified; called once the transaction is known not to be a replay.
    pub fn record_metrics(&self, state: &AppState) {
        for (label, n) in self.verdicts.pairs() {
            if n > 0 {
                state.metrics.add("events_total", &[("verdict", label)], n);
            }
        }
        if self.queued {
            state.queued.store(true, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_event_is_skipped_alone() {
        let body = br#"{"events": [
            {"event_id": "$a", "room_id": "!r", "sender": "@u:x", "type": "m.room.message",
             "content": {"body": "hi"}},
            "not an event",
            {"room_id": "!r", "sender": "@u:x", "type": "m.room.message", "content": {}},
            {"event_id": "$b", "room_id": "!r", "sender": "@u:x", "type": "m.room.member",
             "state_key": "@u:x", "content": {"membership": "join"},
             "unsigned": {"prev_content": {"membership": "invite"}, "age": 5}}
        ]}"#;
        let parsed = parse_transaction(body).unwrap();
        assert_eq!(parsed.event_count, 4);
        let ids: Vec<_> = parsed.events.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids, ["$a", "$b"]);
        assert_eq!(parsed.events[1].prev_membership.as_deref(), Some("invite"));
        let skipped: Vec<usize> = parsed.malformed.iter().map(|(i, _)| *i).collect();
        assert_eq!(skipped, [1, 2]);
        assert!(parsed.malformed[1].1.contains("event_id"));
    }

    #[test]
    fn bodies_that_are_not_transactions_are_told_apart() {
        assert!(matches!(
            parse_transaction(b"{\"events\": [").unwrap_err(),
            BodyError::NotJson(_)
        ));
        assert!(matches!(
            parse_transaction(b"\xff\xfe").unwrap_err(),
            BodyError::NotJson(_)
        ));
        assert!(matches!(
            parse_transaction(br#"{"events": 5}"#).unwrap_err(),
            BodyError::NotTransaction(_)
        ));
        assert!(matches!(
            parse_transaction(br#"{"ephemeral": []}"#).unwrap_err(),
            BodyError::NotTransaction(_)
        ));
    }

    #[test]
    fn deep_nesting_skips_the_event_without_recursing() {
        let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let deep_content = format!(
            r#"{{"event_id": "$d", "room_id": "!r", "sender": "@u:x", "type": "m.room.message",
                "content": {{"a": {nested}}}}}"#
        );
        let body = format!(r#"{{"events": [{nested}, {deep_content}], "x": {nested}}}"#);
        let parsed = parse_transaction(body.as_bytes()).unwrap();
        assert!(parsed.events.is_empty());
        assert_eq!(parsed.malformed.len(), 2);
    }

    #[test]
    fn facts_are_asked_for_every_room_and_reply_target() {
        let body = br#"{"events": [
            {"event_id": "$a", "room_id": "!r1", "sender": "@u:x", "type": "m.room.message",
             "content": {"body": "x", "m.relates_to": {"m.in_reply_to": {"event_id": "$t"}}}},
            {"event_id": "$b", "room_id": "!r2", "sender": "@u:x", "type": "m.room.message",
             "content": {"body": "y"}},
            {"event_id": "$c", "room_id": "!r1", "sender": "@u:x", "type": "m.room.message",
             "content": {"body": "z", "m.relates_to": {"m.in_reply_to": {"event_id": "$t"}}}}
        ]}"#;
        let q = facts_query(&parse_transaction(body).unwrap().events);
        assert_eq!(q.room_ids(), ["!r1", "!r2"]);
        assert_eq!(q.reply_targets(), ["$t"]);
    }
}
