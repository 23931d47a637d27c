//! The render stage: the answer text becomes the reply's events (safe HTML, split under the
//! event size limit), each with its deterministic send txnId, gathered in the outbox that is
//! stored with the claim before anything is sent.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::ReplyMsgtype;
use crate::matrix::reply_txn_id;
use crate::render::{render_parts, Part, MAX_PART_BYTES};
use crate::telemetry::RequestLog;

/// The content key that marks every event of a reply with its source and place, so recovery
/// can tell which parts already landed.
pub const PART_KEY: &str = "com.x.grok.reply";

/// Where the reply goes: the source event and, for a threaded message, the thread root.
#[derive(Debug, Clone)]
pub struct ReplyTarget<'a> {
    pub event_id: &'a str,
    pub sender: &'a str,
    pub thread_root: Option<&'a str>,
}

/// One event of a stored reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxPart {
    pub txn_id: String,
    pub content: Value,
}

/// A reply ready to send: its events in order and the request's row, written once it is sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outbox {
    pub parts: Vec<OutboxPart>,
    pub row: RequestLog,
}

impl Outbox {
    /// Renders `text` as the reply to `to`; `purpose` keeps the txnIds of different kinds of
    /// message about one event apart (a reply, a notice).
    pub fn new(
        msgtype: ReplyMsgtype,
        text: &str,
        to: &ReplyTarget<'_>,
        purpose: &str,
        row: RequestLog,
    ) -> Self {
        let rendered = render_parts(text, MAX_PART_BYTES);
        let count = rendered.len();
        let parts = rendered
            .into_iter()
            .enumerate()
            .map(|(i, part)| OutboxPart {
                txn_id: part_txn_id(to.event_id, purpose, i),
                content: part_content(msgtype, part, to, i, count),
            })
            .collect();
        Self { parts, row }
    }
}

impl Outbox {
    /// Makes the first part an edit (`m.replace`) of the event the answer was first posted as
    /// while it was written, so the room shows one message that becomes the answer.
    pub fn edit_first(&mut self, progress_event_id: &str) {
        if let Some(first) = self.parts.first_mut() {
            first.content = edit_content(&first.content, progress_event_id);
        }
    }
}

/// The event an answer is first posted as while it is written: `text` so far (cut to one
/// part), replying to the question and mentioning the asker like a first part. Its marker says
/// `progress`, so recovery never mistakes it for a part of the answer.
pub fn progress_content(msgtype: ReplyMsgtype, text: &str, to: &ReplyTarget<'_>) -> Value {
    let part = render_parts(text, MAX_PART_BYTES)
        .into_iter()
        .next()
        .unwrap_or(Part {
            body: text.to_string(),
            formatted_body: String::new(),
        });
    let mut content = part_content(msgtype, part, to, 0, 1);
    content[PART_KEY] = json!({"source": to.event_id, "progress": true});
    content
}

/// An edit of `target` to `content`: the new content pings nobody (only the first event
/// mentioned the asker) and keeps no relation; the marker stays on the edit event.
pub fn edit_content(content: &Value, target: &str) -> Value {
    let field = |k: &str| content.get(k).cloned().unwrap_or(Value::Null);
    let mut new_content = json!({
        "msgtype": field("msgtype"),
        "body": field("body"),
        "m.mentions": {},
    });
    if let Some(html) = content.get("formatted_body") {
        new_content["format"] = field("format");
        new_content["formatted_body"] = html.clone();
    }
    let star = |v: &Value| format!("* {}", v.as_str().unwrap_or(""));
    let mut edit = json!({
        "msgtype": field("msgtype"),
        "body": star(&field("body")),
        "m.new_content": new_content,
        "m.mentions": {},
        "m.relates_to": {"rel_type": "m.replace", "event_id": target},
    });
    if let Some(html) = content.get("formatted_body") {
        edit["format"] = field("format");
        edit["formatted_body"] = json!(star(html));
    }
    if let Some(marker) = content.get(PART_KEY) {
        edit[PART_KEY] = marker.clone();
    }
    edit
}

/// The first part keeps the txnId replies always had, so an upgrade mid-send cannot post twice.
fn part_txn_id(event_id: &str, purpose: &str, index: usize) -> String {
    if index == 0 {
        reply_txn_id(event_id, purpose)
    } else {
        reply_txn_id(event_id, &format!("{purpose}.{index}"))
    }
}

/// The content of part `index` of `count`: the first is a rich (or threaded) reply that
/// mentions the asker; the rest follow in the same thread and ping nobody.
fn part_content(
    msgtype: ReplyMsgtype,
    part: Part,
    to: &ReplyTarget<'_>,
    index: usize,
    count: usize,
) -> Value {
    let msgtype = match msgtype {
        ReplyMsgtype::Notice => "m.notice",
        ReplyMsgtype::Text => "m.text",
    };
    let mut content = json!({
        "msgtype": msgtype,
        "body": part.body,
        "format": "org.matrix.custom.html",
        "formatted_body": part.formatted_body,
        "m.mentions": {},
        PART_KEY: {"source": to.event_id, "part": index, "parts": count},
    });
    let relates_to = match (to.thread_root, index) {
        // In the thread, `m.in_reply_to` is only the fallback for clients without threads.
        (Some(root), _) => Some(json!({
            "rel_type": "m.thread",
            "event_id": root,
            "is_falling_back": true,
            "m.in_reply_to": {"event_id": to.event_id},
        })),
        (None, 0) => Some(json!({"m.in_reply_to": {"event_id": to.event_id}})),
        (None, _) => None,
    };
    if let Some(r) = relates_to {
        content["m.relates_to"] = r;
    }
    if index == 0 {
        content["m.mentions"] = json!({"user_ids": [to.sender]});
    }
    content
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(thread_root: Option<&str>) -> ReplyTarget<'_> {
        ReplyTarget {
            event_id: "$q",
            sender: "@alice:example.org",
            thread_root,
        }
    }

    #[test]
    fn a_short_reply_is_one_rich_reply_that_mentions_the_asker() {
        let o = Outbox::new(
            ReplyMsgtype::Notice,
            "**42**",
            &to(None),
            "reply",
            RequestLog::default(),
        );
        assert_eq!(o.parts.len(), 1);
        let c = &o.parts[0].content;
        assert_eq!(c["msgtype"], "m.notice");
        assert_eq!(c["formatted_body"], "<p><strong>42</strong></p>");
        assert_eq!(c["m.relates_to"]["m.in_reply_to"]["event_id"], "$q");
        assert_eq!(c["m.mentions"]["user_ids"][0], "@alice:example.org");
        assert_eq!(o.parts[0].txn_id, reply_txn_id("$q", "reply"));
    }

    #[test]
    fn a_progress_event_becomes_the_answer_by_edits_that_ping_nobody() {
        let first = progress_content(ReplyMsgtype::Notice, "The answer so", &to(Some("$root")));
        assert_eq!(first["m.mentions"]["user_ids"][0], "@alice:example.org");
        assert_eq!(first["m.relates_to"]["rel_type"], "m.thread");
        assert_eq!(first[PART_KEY]["progress"], true);
        assert!(
            first[PART_KEY].get("part").is_none(),
            "not a part of the answer"
        );

        let mut o = Outbox::new(
            ReplyMsgtype::Notice,
            "The answer so far is **42**.",
            &to(Some("$root")),
            "reply",
            RequestLog::default(),
        );
        let txn = o.parts[0].txn_id.clone();
        o.edit_first("$first");
        let edit = &o.parts[0].content;
        assert_eq!(o.parts[0].txn_id, txn, "the txnId stays deterministic");
        assert_eq!(
            edit["m.relates_to"],
            json!({"rel_type": "m.replace", "event_id": "$first"})
        );
        assert_eq!(
            edit["m.new_content"]["body"],
            "The answer so far is **42**."
        );
        assert_eq!(
            edit["m.new_content"]["formatted_body"],
            "<p>The answer so far is <strong>42</strong>.</p>"
        );
        assert_eq!(edit["m.mentions"], json!({}));
        assert_eq!(edit["m.new_content"]["m.mentions"], json!({}));
        assert!(edit["body"].as_str().unwrap().starts_with("* "));
        assert_eq!(
            edit[PART_KEY]["part"], 0,
            "recovery sees the answer's first part landed"
        );
    }

    #[test]
    fn long_replies_split_with_one_mention_and_deterministic_txn_ids() {
        let text = (0..4000)
            .map(|i| format!("Paragraph {i} with a few words to make it longer than short."))
            .collect::<Vec<_>>()
            .join("\n\n");
        let a = Outbox::new(
            ReplyMsgtype::Text,
            &text,
            &to(Some("$root")),
            "reply",
            RequestLog::default(),
        );
        let b = Outbox::new(
            ReplyMsgtype::Text,
            &text,
            &to(Some("$root")),
            "reply",
            RequestLog::default(),
        );
        assert!(a.parts.len() > 1);
        assert_eq!(a, b, "the same answer renders to the same parts and txnIds");
        let mut txns: Vec<_> = a.parts.iter().map(|p| p.txn_id.clone()).collect();
        txns.dedup();
        assert_eq!(txns.len(), a.parts.len());
        for (i, p) in a.parts.iter().enumerate() {
            let size = serde_json::to_vec(&p.content).unwrap().len();
            assert!(
                size < crate::render::MAX_EVENT_BYTES - 2048,
                "part {i}: {size} bytes"
            );
            assert_eq!(p.content["m.relates_to"]["rel_type"], "m.thread");
            assert_eq!(p.content[PART_KEY]["part"], i);
            let mentions = &p.content["m.mentions"]["user_ids"];
            assert_eq!(mentions.is_array(), i == 0, "only the first part pings");
        }
        let back: String = a
            .parts
            .iter()
            .map(|p| p.content["body"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
            .join("\n\n");
        assert_eq!(back, text);
    }
}
