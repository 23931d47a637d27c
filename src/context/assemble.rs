//! Pure assembly of the context: raw events in, bounded turns out. Reply fallbacks are
//! stripped, edits read as their latest content (the edit events themselves skipped),
//! redacted, encrypted and non-text events left out, and the parts of one bot answer joined
//! into one assistant turn.

use std::borrow::{Borrow, Cow};
use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::{Role, Turn};
use crate::answer::render::PART_KEY;
use crate::classify::{prompt_text, Identity};
use crate::provider::estimate_text_tokens;
use crate::vision::{self, ImageRef};

/// Removes a rich-reply fallback from a body: the leading `> ` quote lines of the replied-to
/// message (`> <@user:server> ...`) and the blank line after them. Clients before spec v1.13
/// add it; the quoted message is fetched on its own, so quoting it again only costs tokens.
pub fn strip_reply_fallback(body: &str) -> &str {
    if !body.starts_with('>') {
        return body;
    }
    let mut rest = body;
    while rest.starts_with('>') {
        rest = match rest.find('\n') {
            Some(i) => &rest[i + 1..],
            None => "",
        };
    }
    rest.strip_prefix("\r\n")
        .or_else(|| rest.strip_prefix('\n'))
        .unwrap_or(rest)
}

/// Removes `<mx-reply>...</mx-reply>` (the HTML reply fallback) from a formatted body.
pub fn strip_mx_reply(html: &str) -> Cow<'_, str> {
    match (html.find("<mx-reply>"), html.find("</mx-reply>")) {
        (Some(start), Some(end)) if end > start => {
            let mut out = String::with_capacity(html.len());
            out.push_str(&html[..start]);
            out.push_str(&html[end + "</mx-reply>".len()..]);
            Cow::Owned(out)
        }
        _ => Cow::Borrowed(html),
    }
}

/// A user turn's text: the sender's name, then what they wrote.
pub fn label(name: &str, text: &str) -> String {
    format!("{name}: {text}")
}

fn rel_type(raw: &Value) -> Option<&str> {
    raw.pointer("/content/m.relates_to/rel_type")
        .and_then(Value::as_str)
}

/// Whether an event belongs to a thread (not the main timeline).
pub fn in_thread(raw: &Value) -> bool {
    rel_type(raw) == Some("m.thread")
}

/// The event an event replies to, if any.
pub fn reply_target(raw: &Value) -> Option<&str> {
    raw.pointer("/content/m.relates_to/m.in_reply_to/event_id")
        .and_then(Value::as_str)
}

/// The latest replacement content of an edited event.
#[derive(Debug, Clone)]
struct Edit {
    ts: i64,
    content: Value,
}

/// The newest edit of each edited event by each sender (only the original sender's counts):
/// from edit events seen among `events`, and from the edits the homeserver bundles in
/// `unsigned.m.relations.m.replace`.
fn latest_edits(events: &[impl Borrow<Value>]) -> HashMap<(String, String), Edit> {
    let mut edits: HashMap<(String, String), Edit> = HashMap::new();
    let mut note = |target: &str, edit: &Value| {
        let (Some(sender), Some(content)) = (
            edit["sender"].as_str(),
            edit.pointer("/content/m.new_content")
                .filter(|c| c.is_object()),
        ) else {
            return;
        };
        let ts = edit["origin_server_ts"].as_i64().unwrap_or(0);
        let key = (target.to_string(), sender.to_string());
        if edits.get(&key).is_none_or(|e| e.ts <= ts) {
            edits.insert(
                key,
                Edit {
                    ts,
                    content: content.clone(),
                },
            );
        }
    };
    for e in events.iter().map(Borrow::borrow) {
        if rel_type(e) == Some("m.replace") {
            if let Some(target) = e
                .pointer("/content/m.relates_to/event_id")
                .and_then(Value::as_str)
            {
                note(target, e);
            }
        }
        if let (Some(id), Some(bundled)) = (
            e["event_id"].as_str(),
            e.pointer("/unsigned/m.relations/m.replace"),
        ) {
            note(id, bundled);
        }
    }
    edits
}

/// One readable message of the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub event_id: String,
    pub sender: String,
    pub ts: i64,
    /// What the sender wrote, fallback and the bot's name prefix removed.
    pub text: String,
    /// For a part of the bot's reply: the message it answered (parts of one answer share it).
    pub answer_to: Option<String>,
}

const TEXT_MSGTYPES: [&str; 3] = ["m.text", "m.notice", "m.emote"];

/// Reads one event as a message, with its latest edit applied; `None` for anything that is
/// not readable text: other event types (encrypted ones too), edits, redacted events, media
/// (an image with a caption reads as the caption).
fn message(raw: &Value, edits: &HashMap<(String, String), Edit>, me: &Identity) -> Option<Message> {
    if raw["type"] != "m.room.message" || rel_type(raw) == Some("m.replace") {
        return None;
    }
    if raw.pointer("/unsigned/redacted_because").is_some() {
        return None;
    }
    let event_id = raw["event_id"].as_str()?;
    let sender = raw["sender"].as_str()?;
    let original = raw.get("content")?;
    // Only the sender may edit their message; anyone else's "edit" is ignored.
    let mut content = match edits.get(&(event_id.to_string(), sender.to_string())) {
        Some(edit) => edit.content.clone(),
        None => original.clone(),
    };
    // Relations are the original's: `m.new_content` carries none.
    if let Some(rel) = original.get("m.relates_to") {
        content["m.relates_to"] = rel.clone();
    }
    let msgtype = content["msgtype"].as_str()?;
    // A captioned image reads as its caption; its bytes go only with a message that replies
    // to it (see `image`).
    let captioned = msgtype == "m.image" && vision::caption(&content).is_some();
    if !(TEXT_MSGTYPES.contains(&msgtype) || captioned) || !content["body"].is_string() {
        return None;
    }
    let text = if sender == me.user_id {
        content["body"].as_str().unwrap_or("").trim().to_string()
    } else {
        prompt_text(&content, me)
    };
    if text.is_empty() {
        return None;
    }
    Some(Message {
        event_id: event_id.to_string(),
        sender: sender.to_string(),
        ts: raw["origin_server_ts"].as_i64().unwrap_or(0),
        text,
        answer_to: original[PART_KEY]["source"].as_str().map(str::to_string),
    })
}

/// The unencrypted image an event shows (`m.image` or `m.sticker`), unless it was redacted.
pub fn image(raw: &Value) -> Option<ImageRef> {
    if raw.pointer("/unsigned/redacted_because").is_some() {
        return None;
    }
    let content = raw.get("content")?;
    let is_image = match raw["type"].as_str()? {
        "m.sticker" => true,
        "m.room.message" => content["msgtype"] == "m.image" && rel_type(raw) != Some("m.replace"),
        _ => false,
    };
    if is_image {
        vision::image_ref(content)
    } else {
        None
    }
}

/// The readable messages among `events` that came before the current message, oldest first,
/// each once.
pub fn messages(
    events: &[impl Borrow<Value>],
    me: &Identity,
    current_id: &str,
    current_ts: i64,
) -> Vec<Message> {
    let edits = latest_edits(events);
    let mut seen = HashSet::new();
    let mut out: Vec<Message> = events
        .iter()
        .filter_map(|raw| message(raw.borrow(), &edits, me))
        .filter(|m| m.event_id != current_id && m.ts <= current_ts)
        .filter(|m| seen.insert(m.event_id.clone()))
        .collect();
    out.sort_by_key(|m| m.ts);
    out
}

/// Leaves out room commands (`is_command` on a user's text) and the bot's answers to them:
/// `!grok help` and its reply say nothing about the conversation and only cost tokens.
pub fn without_commands(messages: Vec<Message>, is_command: impl Fn(&str) -> bool) -> Vec<Message> {
    let commands: HashSet<String> = messages
        .iter()
        .filter(|m| m.answer_to.is_none() && is_command(&m.text))
        .map(|m| m.event_id.clone())
        .collect();
    messages
        .into_iter()
        .filter(|m| !commands.contains(&m.event_id))
        .filter(|m| !m.answer_to.as_ref().is_some_and(|q| commands.contains(q)))
        .collect()
}

/// Turns in order: the bot's messages as assistant turns (consecutive parts of one answer
/// joined, as they were split from one text), everyone else's as user turns labelled with
/// their display name (`names`; the user id's localpart when unknown).
pub fn turns(messages: &[Message], me: &Identity, names: &HashMap<String, String>) -> Vec<Turn> {
    let mut out: Vec<Turn> = Vec::new();
    let mut last_answer: Option<&str> = None;
    for m in messages {
        if m.sender == me.user_id {
            let same_answer = m.answer_to.is_some() && m.answer_to.as_deref() == last_answer;
            match out.last_mut() {
                Some(prev) if same_answer && prev.role == Role::Assistant => {
                    prev.text.push_str("\n\n");
                    prev.text.push_str(&m.text);
                }
                _ => out.push(Turn {
                    role: Role::Assistant,
                    text: m.text.clone(),
                }),
            }
            last_answer = m.answer_to.as_deref();
        } else {
            out.push(Turn {
                role: Role::User,
                text: label(&display_name(&m.sender, names), &m.text),
            });
            last_answer = None;
        }
    }
    out
}

/// A user's display name, or their localpart when the room does not know one.
pub fn display_name(user_id: &str, names: &HashMap<String, String>) -> String {
    names
        .get(user_id)
        .filter(|n| !n.trim().is_empty())
        .cloned()
        .unwrap_or_else(|| {
            let local = user_id.trim_start_matches('@');
            local.split(':').next().unwrap_or(local).to_string()
        })
}

/// Keeps the newest turns that fit: at most `max_messages` turns, and at most `max_tokens`
/// estimated tokens together with the current message (which is never dropped). The oldest
/// go first, so what is kept is always a contiguous, most recent stretch.
pub fn bound(
    mut turns: Vec<Turn>,
    current: &str,
    max_messages: usize,
    max_tokens: i64,
) -> Vec<Turn> {
    let mut budget = max_tokens - estimate_text_tokens(current);
    let mut keep = 0;
    for t in turns.iter().rev() {
        let cost = estimate_text_tokens(&t.text);
        if keep == max_messages || cost > budget {
            break;
        }
        budget -= cost;
        keep += 1;
    }
    turns.drain(..turns.len() - keep);
    turns
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BOT: &str = "@grok:example.org";

    fn me() -> Identity {
        Identity {
            user_id: BOT.into(),
            localpart: "grok".into(),
            display_name: "Grok".into(),
            namespaces: vec![],
            ignored_senders: vec![],
            allowed_servers: vec!["example.org".into()],
            access: crate::access::Access::default(),
        }
    }

    fn ev(id: &str, sender: &str, ts: i64, content: Value) -> Value {
        json!({"event_id": id, "sender": sender, "type": "m.room.message",
               "origin_server_ts": ts, "content": content})
    }

    fn text(body: &str) -> Value {
        json!({"msgtype": "m.text", "body": body})
    }

    fn user(t: &str) -> Turn {
        Turn {
            role: Role::User,
            text: t.into(),
        }
    }

    fn bot(t: &str) -> Turn {
        Turn {
            role: Role::Assistant,
            text: t.into(),
        }
    }

    #[test]
    fn reply_fallbacks_are_stripped() {
        let cases = [
            ("> <@a:x> hi\n\nhello", "hello"),
            (
                "> <@a:x> line one\n> line two\n\nanswer\nmore",
                "answer\nmore",
            ),
            ("> <@a:x> hi\r\n\r\nhello", "hello"),
            ("> <@a:x> only a quote", ""),
            ("no fallback > here", "no fallback > here"),
            ("", ""),
            ("> <@a:x> hi\nno blank line", "no blank line"),
        ];
        for (body, want) in cases {
            assert_eq!(strip_reply_fallback(body), want, "{body:?}");
        }
        let html_cases = [
            (
                "<mx-reply><blockquote><a href=\"https://matrix.to/#/@grok:x\">g</a> hi</blockquote></mx-reply>thanks",
                "thanks",
            ),
            ("<p>plain</p>", "<p>plain</p>"),
            ("</mx-reply>broken<mx-reply>", "</mx-reply>broken<mx-reply>"),
        ];
        for (html, want) in html_cases {
            assert_eq!(strip_mx_reply(html), want, "{html:?}");
        }
    }

    #[test]
    fn messages_apply_edits_and_leave_out_the_unreadable() {
        let alice = "@alice:example.org";
        let events = vec![
            ev("$1", alice, 1, text("my cat is called Tom")),
            // Alice's edit of $1: read as its new content, not as a message of its own.
            ev(
                "$2",
                alice,
                2,
                json!({"msgtype": "m.text", "body": "* my cat is called Zorblax",
                       "m.new_content": {"msgtype": "m.text", "body": "my cat is called Zorblax"},
                       "m.relates_to": {"rel_type": "m.replace", "event_id": "$1"}}),
            ),
            // Someone else cannot edit Alice's message, even later.
            ev(
                "$3",
                "@mallory:example.org",
                3,
                json!({"msgtype": "m.text", "body": "* hacked",
                       "m.new_content": {"msgtype": "m.text", "body": "hacked"},
                       "m.relates_to": {"rel_type": "m.replace", "event_id": "$1"}}),
            ),
            ev("$4", alice, 4, text("second")),
            json!({"event_id": "$5", "sender": alice, "type": "m.room.encrypted",
                   "origin_server_ts": 5, "content": {"algorithm": "m.megolm.v1.aes-sha2"}}),
            json!({"event_id": "$6", "sender": alice, "type": "m.room.message",
                   "origin_server_ts": 6, "content": {},
                   "unsigned": {"redacted_because": {"type": "m.room.redaction"}}}),
            ev(
                "$7",
                alice,
                7,
                json!({"msgtype": "m.image", "body": "cat.png"}),
            ),
            ev(
                "$7b",
                alice,
                7,
                json!({"msgtype": "m.image", "body": "grok: who is this?", "filename": "c.png"}),
            ),
            // A reply with a fallback, and the bot's name prefix.
            ev(
                "$8",
                alice,
                8,
                json!({"msgtype": "m.text", "body": "> <@bob:example.org> what?\n\ngrok: thanks",
                       "m.relates_to": {"m.in_reply_to": {"event_id": "$4"}}}),
            ),
            // A bundled edit from the homeserver.
            json!({"event_id": "$9", "sender": alice, "type": "m.room.message",
                   "origin_server_ts": 9, "content": text("typo"),
                   "unsigned": {"m.relations": {"m.replace": {"sender": alice, "origin_server_ts": 10,
                       "content": {"m.new_content": {"msgtype": "m.text", "body": "fixed"}}}}}}),
            ev("$now", alice, 11, text("the current one")),
            ev("$later", alice, 12, text("after the current one")),
        ];
        let got: Vec<(String, String)> = messages(&events, &me(), "$now", 11)
            .into_iter()
            .map(|m| (m.event_id, m.text))
            .collect();
        let want = [
            ("$1", "my cat is called Zorblax"),
            ("$4", "second"),
            ("$7b", "who is this?"),
            ("$8", "thanks"),
            ("$9", "fixed"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn commands_and_their_answers_are_left_out() {
        let msg = |id: &str, text: &str, answer_to: Option<&str>| Message {
            event_id: id.into(),
            sender: if answer_to.is_some() {
                BOT.into()
            } else {
                "@alice:example.org".into()
            },
            ts: 1,
            text: text.into(),
            answer_to: answer_to.map(str::to_string),
        };
        let kept = without_commands(
            vec![
                msg("$1", "my cat is called Zorblax", None),
                msg("$2", "Nice name!", Some("$1")),
                msg("$3", "!grok help", None),
                msg("$4", "I'm Grok, ...", Some("$3")),
                msg("$5", "!usage", None),
            ],
            |t| t.starts_with("!grok") || t == "!usage",
        );
        let ids: Vec<&str> = kept.iter().map(|m| m.event_id.as_str()).collect();
        assert_eq!(ids, ["$1", "$2"]);
    }

    #[test]
    fn the_parts_of_one_answer_are_one_assistant_turn() {
        let alice = "@alice:example.org";
        let part = |id: &str, ts, body: &str, source: &str, i: u64| {
            ev(
                id,
                BOT,
                ts,
                json!({"msgtype": "m.notice", "body": body, PART_KEY: {"source": source, "part": i}}),
            )
        };
        let events = vec![
            ev("$q1", alice, 1, text("long question")),
            part("$a1", 2, "first half", "$q1", 0),
            part("$a2", 3, "second half", "$q1", 1),
            part("$b1", 4, "another answer", "$q0", 0),
            ev("$q2", "@bob:example.org", 5, text("and?")),
        ];
        let names = HashMap::from([(alice.to_string(), "Alice".to_string())]);
        let got = turns(&messages(&events, &me(), "$x", 9), &me(), &names);
        assert_eq!(
            got,
            vec![
                user("Alice: long question"),
                bot("first half\n\nsecond half"),
                bot("another answer"),
                user("bob: and?"),
            ]
        );
    }

    #[test]
    fn bounding_drops_the_oldest_turns_first() {
        let t = |n: usize| user(&"x".repeat(n));
        // Each "x" * 30 is 10 estimated tokens.
        let five = || vec![t(30), t(30), t(30), t(30), t(30)];
        let lens = |v: &[Turn]| v.iter().map(|t| t.text.len()).collect::<Vec<_>>();
        // (name, turns, current message bytes, max_messages, max_tokens, kept turn lengths)
        type Case = (&'static str, Vec<Turn>, usize, usize, i64, Vec<usize>);
        let cases: Vec<Case> = vec![
            ("everything fits", five(), 30, 10, 1000, vec![30; 5]),
            (
                "message cap keeps the newest",
                five(),
                30,
                2,
                1000,
                vec![30; 2],
            ),
            (
                "token cap: 10 for the current, 30 left",
                five(),
                30,
                10,
                40,
                vec![30; 3],
            ),
            ("current alone fills the budget", five(), 30, 10, 10, vec![]),
            (
                "current over the budget is still sent",
                five(),
                300,
                10,
                10,
                vec![],
            ),
            (
                "no cap is crossed by skipping a big turn",
                vec![t(30), t(300), t(30)],
                3,
                10,
                30,
                vec![30],
            ),
            ("nothing to bound", vec![], 30, 10, 40, vec![]),
        ];
        for (name, turns, current, max_messages, max_tokens, want) in cases {
            let got = bound(turns, &"y".repeat(current), max_messages, max_tokens);
            assert_eq!(lens(&got), want, "{name}");
        }
        // Order is kept and the newest survive.
        let got = bound(vec![user("a"), bot("b"), user("c")], "d", 2, 1000);
        assert_eq!(got, vec![bot("b"), user("c")]);
    }

    #[test]
    fn images_are_found_in_image_and_sticker_events_only() {
        let url = "mxc://example.org/m1";
        let img = ev(
            "$i",
            "@a:x",
            1,
            json!({"msgtype": "m.image", "body": "a.png", "url": url}),
        );
        assert_eq!(image(&img).unwrap().media_id, "m1");
        let mut sticker = ev("$s", "@a:x", 1, json!({"body": "hi", "url": url}));
        sticker["type"] = json!("m.sticker");
        assert!(image(&sticker).is_some());
        let file = ev(
            "$f",
            "@a:x",
            1,
            json!({"msgtype": "m.file", "body": "a", "url": url}),
        );
        assert!(image(&file).is_none());
        let mut redacted = img.clone();
        redacted["unsigned"] = json!({"redacted_because": {}});
        assert!(image(&redacted).is_none());
    }

    #[test]
    fn unknown_names_fall_back_to_the_localpart() {
        let names = HashMap::from([("@a:x".to_string(), "Alice".to_string())]);
        assert_eq!(display_name("@a:x", &names), "Alice");
        assert_eq!(display_name("@bob:x", &names), "bob");
    }
}
