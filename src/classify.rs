//! Event classification: a pure function from one event plus room facts to a verdict.
//!
//! No I/O happens here; the webhook looks up the facts (is the room direct, does the message
//! reply to the bot) and acts on the verdict.

use percent_encoding::percent_decode_str;
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use crate::access::Access;
use crate::context::assemble::{strip_mx_reply, strip_reply_fallback};
use crate::vision::{self, ImageRef};

/// One timeline event, parsed just far enough to classify it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_id: String,
    pub room_id: String,
    pub sender: String,
    pub kind: String,
    pub state_key: Option<String>,
    pub content: Value,
    pub origin_server_ts: i64,
    /// `unsigned.prev_content.membership`: what a member event replaced.
    pub prev_membership: Option<String>,
}

/// The wire shape of an event: one typed pass over the JSON, so only `content` becomes a
/// `Value` and everything else in the event (`unsigned` can be large) is skipped unparsed.
#[derive(Deserialize)]
struct WireEvent {
    #[serde(default)]
    event_id: Option<Value>,
    #[serde(default)]
    room_id: Option<Value>,
    #[serde(default)]
    sender: Option<Value>,
    #[serde(default, rename = "type")]
    kind: Option<Value>,
    #[serde(default)]
    state_key: Option<Value>,
    #[serde(default)]
    content: Value,
    #[serde(default)]
    origin_server_ts: Option<Value>,
    #[serde(default)]
    unsigned: Option<WireUnsigned>,
}

#[derive(Deserialize)]
struct WireUnsigned {
    #[serde(default)]
    prev_content: Option<WirePrevContent>,
}

#[derive(Deserialize)]
struct WirePrevContent {
    #[serde(default)]
    membership: Option<Value>,
}

impl Event {
    /// Parses an event from its JSON text; an error names what is wrong (the event is then
    /// skipped alone).
    pub fn from_json(json: &str) -> Result<Self, String> {
        let wire: WireEvent = serde_json::from_str(json).map_err(|e| {
            if json.trim_start().starts_with('{') {
                format!("event is malformed: {e}")
            } else {
                "event is not a JSON object".to_string()
            }
        })?;
        Self::from_wire(wire)
    }

    /// Parses an event already held as a `Value` (as the homeserver's `/event` returns it).
    pub fn parse(value: &Value) -> Result<Self, String> {
        if !value.is_object() {
            return Err("event is not a JSON object".into());
        }
        let wire = WireEvent::deserialize(value).map_err(|e| format!("event is malformed: {e}"))?;
        Self::from_wire(wire)
    }

    fn from_wire(wire: WireEvent) -> Result<Self, String> {
        // Lenient like the old tree walk: a field of the wrong type counts as missing.
        // No Matrix id holds a NUL, and PostgreSQL text cannot: such an event would fail the
        // transaction's commit on every retry.
        let text = |v: Option<Value>, key: &str| -> Result<String, String> {
            match v {
                Some(Value::String(s)) if !s.is_empty() && !s.contains('\0') => Ok(s),
                _ => Err(format!("event has no string `{key}` (or one with a NUL)")),
            }
        };
        if !wire.content.is_object() {
            return Err("event has no object `content`".into());
        }
        if matches!(&wire.state_key, Some(Value::String(k)) if k.contains('\0')) {
            return Err("event has a NUL in `state_key`".into());
        }
        Ok(Self {
            event_id: text(wire.event_id, "event_id")?,
            room_id: text(wire.room_id, "room_id")?,
            sender: text(wire.sender, "sender")?,
            kind: text(wire.kind, "type")?,
            state_key: match wire.state_key {
                Some(Value::String(s)) => Some(s),
                _ => None,
            },
            content: wire.content,
            origin_server_ts: wire
                .origin_server_ts
                .as_ref()
                .and_then(Value::as_i64)
                .unwrap_or(0),
            prev_membership: wire.unsigned.and_then(|u| u.prev_content).and_then(|p| {
                match p.membership {
                    Some(Value::String(s)) => Some(s),
                    _ => None,
                }
            }),
        })
    }

    /// The event this one replies to (`m.relates_to.m.in_reply_to.event_id`), if any. In a
    /// thread, clients point `m.in_reply_to` at the thread's latest event as a fallback for
    /// clients without threads (`is_falling_back`); that is not a reply, so it is no reply
    /// here: otherwise every message after the bot's in a thread would address the bot.
    pub fn in_reply_to(&self) -> Option<&str> {
        let rel = self.content.get("m.relates_to")?;
        if rel["rel_type"] == "m.thread" && rel["is_falling_back"] == true {
            return None;
        }
        // An id with a NUL names no event (and PostgreSQL could not look it up).
        rel.pointer("/m.in_reply_to/event_id")
            .and_then(Value::as_str)
            .filter(|id| !id.contains('\0'))
    }

    /// A membership change of a user other than the bot: `(user, joined now)`. Used to keep the
    /// joined-member count of rooms the bot is in.
    pub fn membership(&self) -> Option<(&str, bool)> {
        if self.kind != "m.room.member" {
            return None;
        }
        let user = self.state_key.as_deref()?;
        let membership = self.content.get("membership")?.as_str()?;
        Some((user, membership == "join"))
    }
}

/// Who the bot is and whom it serves.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Full user id, `@grok:example.org`.
    pub user_id: String,
    pub localpart: String,
    pub display_name: String,
    /// The appservice's user namespaces: senders inside them are bots of this service.
    pub namespaces: Vec<Regex>,
    /// `rooms.ignore_senders`: senders never answered.
    pub ignored_senders: Vec<Regex>,
    /// Servers whose users may invite and address the bot.
    pub allowed_servers: Vec<String>,
    /// `rooms.allowed_users`, `rooms.denied_users` and `rooms.allowed_rooms`.
    pub access: Access,
}

impl Identity {
    fn is_allowed_server(&self, user_id: &str) -> bool {
        server_of(user_id).is_some_and(|s| self.allowed_servers.iter().any(|a| a == s))
    }

    /// Why this user may not use the bot, if they may not (server first, then the lists, then
    /// a per-user cap of 0).
    fn refusal(&self, user_id: &str, facts: Facts) -> Option<SkipReason> {
        if !self.is_allowed_server(user_id) {
            Some(SkipReason::ForeignRoom)
        } else if !self.access.user_allowed(user_id) {
            Some(SkipReason::NotAllowed)
        } else if facts.sender_blocked {
            Some(SkipReason::UserBlocked)
        } else {
            None
        }
    }
}

/// Whether a room is a direct chat: exactly two joined members, the bot and one person. The
/// invite's `is_direct` only stands in while the member count is unknown (0): a member cannot
/// flag a busy group room as direct and have the bot answer every message in it.
pub fn is_direct_room(invited_direct: bool, joined_members: i64) -> bool {
    joined_members == 2 || (invited_direct && joined_members <= 0)
}

/// What the webhook knows about the event's room and its reply target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    /// The room is a direct chat ([`is_direct_room`]).
    pub direct_room: bool,
    /// The event replies to a message the bot sent.
    pub replies_to_bot: bool,
    /// The sender's per-user cap is 0 (`Limiter::blocks`): they get a notice, never a model.
    pub sender_blocked: bool,
    /// The bot reads encrypted messages (`encryption.enabled`).
    pub decrypts: bool,
}

/// Why an addressed event cannot be served (the stable `degraded` tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    EncryptedRoom,
    Media,
    ForeignRoom,
    /// Outside `rooms.allowed_users`, or in `rooms.denied_users`; for an invite, also a room
    /// outside `rooms.allowed_rooms`.
    NotAllowed,
    /// A per-user cap of 0 (`limits.per_user_overrides`).
    UserBlocked,
}

impl SkipReason {
    /// The token stored in `request_log.degraded`.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::EncryptedRoom => "encrypted_room",
            SkipReason::Media => "media",
            SkipReason::ForeignRoom => "foreign_room",
            SkipReason::NotAllowed => "not_allowed",
            SkipReason::UserBlocked => "user_blocked",
        }
    }
}

/// Why an event is ignored (a metrics label; nothing is stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoreReason {
    NotAddressed,
    OwnEcho,
    Namespace,
    IgnoredSender,
    Notice,
    Edit,
    Redaction,
    State,
    UnknownType,
    /// A room outside `rooms.allowed_rooms`.
    RoomNotAllowed,
}

impl IgnoreReason {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            IgnoreReason::NotAddressed => "not_addressed",
            IgnoreReason::OwnEcho => "own_echo",
            IgnoreReason::Namespace => "namespace",
            IgnoreReason::IgnoredSender => "ignored_sender",
            IgnoreReason::Notice => "notice",
            IgnoreReason::Edit => "edit",
            IgnoreReason::Redaction => "redaction",
            IgnoreReason::State => "state",
            IgnoreReason::UnknownType => "unknown_type",
            IgnoreReason::RoomNotAllowed => "room_not_allowed",
        }
    }
}

/// An addressed message, ready for the answer worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The user's text with the mention, reply fallback and whitespace removed.
    pub text: String,
    /// The thread root when the message was in a thread.
    pub thread_root: Option<String>,
    /// The message it replies to, unless that is only a thread's fallback for old clients.
    pub reply_to: Option<String>,
    /// The room counts as a direct chat.
    pub direct: bool,
    /// The image of an `m.image` or `m.sticker` message (the text is then its caption).
    pub image: Option<ImageRef>,
}

/// The verdict for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ignore(IgnoreReason),
    /// An invite of the bot: join, or leave (decline) for the `declined` reason.
    Invite {
        declined: Option<SkipReason>,
        is_direct: bool,
    },
    Skip(SkipReason),
    Addressed(Request),
    /// An encrypted event: classified again once decrypted (`crate::answer::encrypted`).
    Decrypt,
}

impl Verdict {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Ignore(_) => "ignore",
            Verdict::Invite { .. } => "invite",
            Verdict::Skip(_) => "skip",
            Verdict::Addressed(_) => "addressed",
            Verdict::Decrypt => "decrypt",
        }
    }
}

/// The server name of a user id (`@user:server` -> `server`). Never use it on a room id:
/// room version 12 ids have no server part.
pub fn server_of(user_id: &str) -> Option<&str> {
    user_id
        .strip_prefix('@')
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, server)| server)
}

const MEDIA_MSGTYPES: [&str; 4] = ["m.image", "m.file", "m.audio", "m.video"];

/// Classifies one event.
pub fn classify(event: &Event, me: &Identity, facts: Facts) -> Verdict {
    if event.sender == me.user_id {
        return Verdict::Ignore(IgnoreReason::OwnEcho);
    }
    if event.state_key.is_some() {
        return classify_state(event, me, facts);
    }
    if !me.access.room_allowed(&event.room_id) {
        return Verdict::Ignore(IgnoreReason::RoomNotAllowed);
    }
    if me.namespaces.iter().any(|re| re.is_match(&event.sender)) {
        return Verdict::Ignore(IgnoreReason::Namespace);
    }
    if me
        .ignored_senders
        .iter()
        .any(|re| re.is_match(&event.sender))
    {
        return Verdict::Ignore(IgnoreReason::IgnoredSender);
    }
    match event.kind.as_str() {
        "m.room.redaction" => Verdict::Ignore(IgnoreReason::Redaction),
        "m.room.encrypted" if facts.decrypts => Verdict::Decrypt,
        // Without encryption the content is unreadable; in a direct chat the user is clearly
        // talking to the bot, so tell them. In a group it may not concern the bot at all.
        "m.room.encrypted" if facts.direct_room => Verdict::Skip(SkipReason::EncryptedRoom),
        "m.room.encrypted" => Verdict::Ignore(IgnoreReason::NotAddressed),
        "m.sticker" => addressed_or(event, me, facts, |e| image_request(e, me, facts)),
        "m.room.message" => classify_message(event, me, facts),
        _ => Verdict::Ignore(IgnoreReason::UnknownType),
    }
}

fn classify_state(event: &Event, me: &Identity, facts: Facts) -> Verdict {
    let is_bot_invite = event.kind == "m.room.member"
        && event.state_key.as_deref() == Some(me.user_id.as_str())
        && event.content.get("membership").and_then(Value::as_str) == Some("invite");
    if !is_bot_invite {
        return Verdict::Ignore(IgnoreReason::State);
    }
    let declined = me
        .refusal(&event.sender, facts)
        .or_else(|| (!me.access.room_allowed(&event.room_id)).then_some(SkipReason::NotAllowed));
    Verdict::Invite {
        declined,
        is_direct: event.content.get("is_direct").and_then(Value::as_bool) == Some(true),
    }
}

fn classify_message(event: &Event, me: &Identity, facts: Facts) -> Verdict {
    let content = &event.content;
    if content
        .pointer("/m.relates_to/rel_type")
        .and_then(Value::as_str)
        == Some("m.replace")
    {
        return Verdict::Ignore(IgnoreReason::Edit);
    }
    let msgtype = content.get("msgtype").and_then(Value::as_str).unwrap_or("");
    match msgtype {
        "m.notice" => Verdict::Ignore(IgnoreReason::Notice),
        "m.text" | "m.emote" => addressed_or(event, me, facts, |e| {
            Verdict::Addressed(Request {
                text: prompt_text(&e.content, me),
                thread_root: thread_root(e),
                reply_to: e.in_reply_to().map(str::to_string),
                direct: facts.direct_room,
                image: None,
            })
        }),
        "m.image" => addressed_or(event, me, facts, |e| image_request(e, me, facts)),
        t if MEDIA_MSGTYPES.contains(&t) => {
            addressed_or(event, me, facts, |_| Verdict::Skip(SkipReason::Media))
        }
        _ => Verdict::Ignore(IgnoreReason::UnknownType),
    }
}

/// An addressed image: its caption (name prefix and reply fallback removed) is the question,
/// "describe this image" when there is none. A malformed media URI cannot be read: the notice.
fn image_request(event: &Event, me: &Identity, facts: Facts) -> Verdict {
    let Some(image) = vision::image_ref(&event.content) else {
        return Verdict::Skip(SkipReason::Media);
    };
    let mut text = vision::caption(&event.content).unwrap_or("");
    if event.in_reply_to().is_some() {
        text = strip_reply_fallback(text);
    }
    let text = strip_name_prefix(text, me).unwrap_or(text).trim();
    Verdict::Addressed(Request {
        text: if text.is_empty() {
            vision::DESCRIBE
        } else {
            text
        }
        .to_string(),
        thread_root: thread_root(event),
        reply_to: event.in_reply_to().map(str::to_string),
        direct: facts.direct_room,
        image: Some(image),
    })
}

/// Applies the addressing rules and the sender's access checks, then `then` for a served event.
fn addressed_or(
    event: &Event,
    me: &Identity,
    facts: Facts,
    then: impl FnOnce(&Event) -> Verdict,
) -> Verdict {
    if !is_addressed(event, me, facts) {
        return Verdict::Ignore(IgnoreReason::NotAddressed);
    }
    if let Some(reason) = me.refusal(&event.sender, facts) {
        return Verdict::Skip(reason);
    }
    then(event)
}

fn is_addressed(event: &Event, me: &Identity, facts: Facts) -> bool {
    facts.direct_room
        || facts.replies_to_bot
        || mentions_me(&event.content, me)
        || pill_to_me(&event.content, me)
        || strip_name_prefix(addressing_text(event), me).is_some()
}

/// The text a name prefix is looked for in: a media message's caption (its `body` may be
/// only a file name), else the body.
fn addressing_text(event: &Event) -> &str {
    let media = event.kind == "m.sticker"
        || MEDIA_MSGTYPES.contains(&event.content["msgtype"].as_str().unwrap_or(""));
    if media {
        vision::caption(&event.content).unwrap_or("")
    } else {
        body(&event.content)
    }
}

fn body(content: &Value) -> &str {
    content.get("body").and_then(Value::as_str).unwrap_or("")
}

fn mentions_me(content: &Value, me: &Identity) -> bool {
    content
        .pointer("/m.mentions/user_ids")
        .and_then(Value::as_array)
        .is_some_and(|ids| {
            ids.iter()
                .any(|id| id.as_str() == Some(me.user_id.as_str()))
        })
}

fn pill_to_me(content: &Value, me: &Identity) -> bool {
    let Some(html) = content.get("formatted_body").and_then(Value::as_str) else {
        return false;
    };
    // A reply's HTML fallback quotes the replied-to message: a pill in the quote is not ours.
    let html = strip_mx_reply(html);
    let decoded = percent_decode_str(&html).decode_utf8_lossy();
    let uri_form = format!("matrix:u/{}", me.user_id.trim_start_matches('@'));
    decoded.contains(&format!("matrix.to/#/{}", me.user_id)) || decoded.contains(&uri_form)
}

/// If `text` starts with the bot's name (localpart, display name or full id, optionally with
/// `@`) followed by `:` or `,`, returns the rest.
fn strip_name_prefix<'a>(text: &'a str, me: &Identity) -> Option<&'a str> {
    let trimmed = text.trim_start();
    let unsigiled = trimmed.strip_prefix('@').unwrap_or(trimmed);
    let full = me.user_id.trim_start_matches('@');
    [full, me.localpart.as_str(), me.display_name.as_str()]
        .into_iter()
        .filter(|name| !name.is_empty())
        .find_map(|name| {
            let head = unsigiled.get(..name.len())?;
            if !head.eq_ignore_ascii_case(name) {
                return None;
            }
            let rest = &unsigiled[name.len()..];
            rest.strip_prefix(':')
                .or_else(|| rest.strip_prefix(','))
                .map(str::trim_start)
        })
}

fn thread_root(event: &Event) -> Option<String> {
    let rel = event.content.get("m.relates_to")?;
    if rel.get("rel_type").and_then(Value::as_str) != Some("m.thread") {
        return None;
    }
    rel.get("event_id")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The text the model sees of a message's content: reply fallback and leading mention
/// removed (the context reads earlier messages through it too, so they match).
pub fn prompt_text(content: &Value, me: &Identity) -> String {
    let mut text = body(content);
    if content.pointer("/m.relates_to/m.in_reply_to").is_some() {
        text = strip_reply_fallback(text);
    }
    let text = strip_name_prefix(text, me).unwrap_or(text).trim();
    if text.is_empty() {
        body(content).trim().to_string()
    } else {
        text.to_string()
    }
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
            display_name: "Grok Bot".into(),
            namespaces: vec![Regex::new(r"^@grok:example\.org$").unwrap()],
            ignored_senders: vec![Regex::new(r"^@.*bot:example\.org$").unwrap()],
            allowed_servers: vec!["example.org".into(), "friends.org".into()],
            access: Access::default(),
        }
    }

    #[test]
    fn ids_with_a_nul_make_the_event_malformed() {
        let event = |key: &str, value: &str| {
            let mut e = json!({"event_id": "$e", "room_id": "!r:x", "sender": "@a:x",
                "type": "m.room.member", "state_key": "@a:x", "content": {"membership": "join"}});
            e[key] = json!(value);
            Event::parse(&e)
        };
        assert!(event("event_id", "$ok").is_ok());
        for key in ["event_id", "room_id", "sender", "type", "state_key"] {
            assert!(event(key, "a\u{0}b").is_err(), "{key}");
        }
        let reply = msg(
            "@alice:example.org",
            json!({"msgtype": "m.text", "body": "a\u{0}b",
                   "m.relates_to": {"m.in_reply_to": {"event_id": "$x\u{0}"}}}),
        );
        assert_eq!(reply.in_reply_to(), None, "a NUL id is no reply target");
        assert_eq!(reply.content["body"], "a\u{0}b", "a NUL in text is fine");
    }

    #[test]
    fn a_thread_fallback_is_not_a_reply() {
        let in_thread = |falling_back: bool| {
            msg(
                "@alice:example.org",
                json!({"msgtype": "m.text", "body": "and then?", "m.relates_to": {
                    "rel_type": "m.thread", "event_id": "$root", "is_falling_back": falling_back,
                    "m.in_reply_to": {"event_id": "$bot_answer"}}}),
            )
        };
        assert_eq!(in_thread(true).in_reply_to(), None);
        assert_eq!(in_thread(false).in_reply_to(), Some("$bot_answer"));
        let plain = msg(
            "@alice:example.org",
            json!({"msgtype": "m.text", "body": "yes",
                   "m.relates_to": {"m.in_reply_to": {"event_id": "$x"}}}),
        );
        assert_eq!(plain.in_reply_to(), Some("$x"));
    }

    #[test]
    fn only_two_member_rooms_are_direct() {
        assert!(is_direct_room(false, 2));
        assert!(is_direct_room(true, 2));
        assert!(
            is_direct_room(true, 0),
            "the invite's hint while the count is unknown"
        );
        assert!(
            !is_direct_room(true, 5),
            "a group room flagged direct at invite time"
        );
        assert!(!is_direct_room(true, 1), "the other person left");
        assert!(!is_direct_room(false, 0));
    }

    #[test]
    fn ignored_senders_are_never_answered() {
        let dm = Facts {
            direct_room: true,
            replies_to_bot: false,
            sender_blocked: false,
            decrypts: false,
        };
        let text = json!({"msgtype": "m.text", "body": "hello"});
        assert_eq!(
            classify(&msg("@otherbot:example.org", text.clone()), &me(), dm),
            Verdict::Ignore(IgnoreReason::IgnoredSender)
        );
        assert!(matches!(
            classify(&msg("@alice:example.org", text), &me(), dm),
            Verdict::Addressed(_)
        ));
    }

    fn msg(sender: &str, content: Value) -> Event {
        Event::parse(&json!({
            "event_id": "$e", "room_id": "!r", "sender": sender,
            "type": "m.room.message", "origin_server_ts": 1, "content": content,
        }))
        .unwrap()
    }

    fn text(body: &str) -> Value {
        json!({"msgtype": "m.text", "body": body})
    }

    fn event(kind: &str, sender: &str, state_key: Option<&str>, content: Value) -> Event {
        let mut v = json!({"event_id": "$e", "room_id": "!r", "sender": sender, "type": kind,
                           "content": content});
        if let Some(k) = state_key {
            v["state_key"] = json!(k);
        }
        Event::parse(&v).unwrap()
    }

    fn ask(t: &str) -> Verdict {
        Verdict::Addressed(Request {
            text: t.into(),
            thread_root: None,
            reply_to: None,
            direct: false,
            image: None,
        })
    }

    fn image_ask(t: &str, server: &str, media_id: &str) -> Verdict {
        Verdict::Addressed(Request {
            text: t.into(),
            thread_root: None,
            reply_to: None,
            direct: false,
            image: Some(ImageRef {
                server: server.into(),
                media_id: media_id.into(),
                mimetype: None,
                size: None,
                key: None,
            }),
        })
    }

    /// The table checks text and thread; `reply_to` and `direct` have their own test.
    fn without_context_facts(v: Verdict) -> Verdict {
        match v {
            Verdict::Addressed(r) => Verdict::Addressed(Request {
                reply_to: None,
                direct: false,
                ..r
            }),
            other => other,
        }
    }

    const GROUP: Facts = Facts {
        direct_room: false,
        replies_to_bot: false,
        sender_blocked: false,
        decrypts: false,
    };
    const DIRECT: Facts = Facts {
        direct_room: true,
        replies_to_bot: false,
        sender_blocked: false,
        decrypts: false,
    };
    const REPLY: Facts = Facts {
        direct_room: false,
        replies_to_bot: true,
        sender_blocked: false,
        decrypts: false,
    };
    const IGNORE_NA: Verdict = Verdict::Ignore(IgnoreReason::NotAddressed);

    #[test]
    fn classification_table() {
        let alice = "@alice:example.org";
        let mallory = "@mallory:evil.net";
        let cases: Vec<(&str, Event, Facts, Verdict)> = vec![
            (
                "plain chatter in a group",
                msg(alice, text("lunch at noon?")),
                GROUP,
                IGNORE_NA,
            ),
            (
                "encrypted in a group, read by a bot with encryption",
                event(
                    "m.room.encrypted",
                    alice,
                    None,
                    json!({"algorithm": "m.megolm.v1.aes-sha2"}),
                ),
                Facts {
                    decrypts: true,
                    ..GROUP
                },
                Verdict::Decrypt,
            ),
            (
                "any text in a direct room",
                msg(alice, text("what is rust?")),
                DIRECT,
                ask("what is rust?"),
            ),
            (
                "m.mentions holds the bot",
                msg(
                    alice,
                    json!({"msgtype": "m.text", "body": "hey there",
                               "m.mentions": {"user_ids": [BOT]}}),
                ),
                GROUP,
                ask("hey there"),
            ),
            (
                "m.mentions of someone else",
                msg(
                    alice,
                    json!({"msgtype": "m.text", "body": "hey",
                               "m.mentions": {"user_ids": ["@bob:example.org"]}}),
                ),
                GROUP,
                IGNORE_NA,
            ),
            (
                "matrix.to pill, URL-encoded",
                msg(
                    alice,
                    json!({"msgtype": "m.text", "body": "Grok Bot: why?",
                               "formatted_body": "<a href=\"https://matrix.to/#/%40grok%3Aexample.org\">Grok Bot</a>: why?"}),
                ),
                GROUP,
                ask("why?"),
            ),
            (
                "matrix: URI pill",
                msg(
                    alice,
                    json!({"msgtype": "m.text", "body": "look",
                               "formatted_body": "<a href=\"matrix:u/grok:example.org\">g</a> look"}),
                ),
                GROUP,
                ask("look"),
            ),
            (
                "pill to another user",
                msg(
                    alice,
                    json!({"msgtype": "m.text", "body": "bob: hi",
                "formatted_body": "<a href=\"https://matrix.to/#/@bob:example.org\">bob</a>: hi"}),
                ),
                GROUP,
                IGNORE_NA,
            ),
            (
                "localpart prefix with colon",
                msg(alice, text("grok: what is 2+2?")),
                GROUP,
                ask("what is 2+2?"),
            ),
            (
                "localpart prefix with comma, any case",
                msg(alice, text("Grok, explain tides")),
                GROUP,
                ask("explain tides"),
            ),
            (
                "display name prefix",
                msg(alice, text("grok bot: hello")),
                GROUP,
                ask("hello"),
            ),
            (
                "full user id prefix",
                msg(alice, text("@grok:example.org: ping")),
                GROUP,
                ask("ping"),
            ),
            (
                "name not followed by : or ,",
                msg(alice, text("grok is great")),
                GROUP,
                IGNORE_NA,
            ),
            (
                "name inside a word",
                msg(alice, text("groking: deep")),
                GROUP,
                IGNORE_NA,
            ),
            (
                "reply to the bot",
                msg(
                    alice,
                    json!({"msgtype": "m.text", "body": "and then?",
                "m.relates_to": {"m.in_reply_to": {"event_id": "$bot"}}}),
                ),
                REPLY,
                ask("and then?"),
            ),
            (
                "reply fallback stripped",
                msg(
                    alice,
                    json!({"msgtype": "m.text",
                "body": "> <@grok:example.org> earlier answer\n\nfollow-up",
                "m.relates_to": {"m.in_reply_to": {"event_id": "$bot"}}}),
                ),
                REPLY,
                ask("follow-up"),
            ),
            (
                "emote in a direct room",
                msg(alice, json!({"msgtype": "m.emote", "body": "waves"})),
                DIRECT,
                ask("waves"),
            ),
            (
                "thread message keeps its root",
                msg(
                    alice,
                    json!({"msgtype": "m.text", "body": "grok: in thread",
                "m.relates_to": {"rel_type": "m.thread", "event_id": "$root",
                                 "m.in_reply_to": {"event_id": "$x"}, "is_falling_back": true}}),
                ),
                GROUP,
                Verdict::Addressed(Request {
                    text: "in thread".into(),
                    thread_root: Some("$root".into()),
                    reply_to: None,
                    direct: false,
                    image: None,
                }),
            ),
            (
                "notice is never answered",
                msg(alice, json!({"msgtype": "m.notice", "body": "grok: hi"})),
                DIRECT,
                Verdict::Ignore(IgnoreReason::Notice),
            ),
            (
                "edit is not a new prompt",
                msg(
                    alice,
                    json!({"msgtype": "m.text", "body": "* grok: fixed",
                "m.new_content": {"msgtype": "m.text", "body": "grok: fixed"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": "$old"}}),
                ),
                DIRECT,
                Verdict::Ignore(IgnoreReason::Edit),
            ),
            (
                "own echo",
                msg(BOT, text("my answer")),
                DIRECT,
                Verdict::Ignore(IgnoreReason::OwnEcho),
            ),
            (
                "redaction",
                event("m.room.redaction", alice, None, json!({"redacts": "$x"})),
                DIRECT,
                Verdict::Ignore(IgnoreReason::Redaction),
            ),
            (
                "unknown event type",
                event(
                    "com.example.custom",
                    alice,
                    None,
                    json!({"body": "grok: x"}),
                ),
                DIRECT,
                Verdict::Ignore(IgnoreReason::UnknownType),
            ),
            (
                "unknown msgtype",
                msg(
                    alice,
                    json!({"msgtype": "m.location", "body": "here", "geo_uri": "geo:1,2"}),
                ),
                DIRECT,
                Verdict::Ignore(IgnoreReason::UnknownType),
            ),
            (
                "state event",
                event(
                    "m.room.name",
                    alice,
                    Some(""),
                    json!({"name": "grok: room"}),
                ),
                DIRECT,
                Verdict::Ignore(IgnoreReason::State),
            ),
            (
                "someone else's membership",
                event(
                    "m.room.member",
                    alice,
                    Some("@bob:example.org"),
                    json!({"membership": "invite"}),
                ),
                DIRECT,
                Verdict::Ignore(IgnoreReason::State),
            ),
            (
                "bot's own join",
                event(
                    "m.room.member",
                    BOT,
                    Some(BOT),
                    json!({"membership": "join"}),
                ),
                DIRECT,
                Verdict::Ignore(IgnoreReason::OwnEcho),
            ),
            (
                "invite from the bot's server, direct",
                event(
                    "m.room.member",
                    alice,
                    Some(BOT),
                    json!({"membership": "invite", "is_direct": true}),
                ),
                GROUP,
                Verdict::Invite {
                    declined: None,
                    is_direct: true,
                },
            ),
            (
                "invite from an allowed friend server",
                event(
                    "m.room.member",
                    "@f:friends.org",
                    Some(BOT),
                    json!({"membership": "invite"}),
                ),
                GROUP,
                Verdict::Invite {
                    declined: None,
                    is_direct: false,
                },
            ),
            (
                "invite from a foreign server",
                event(
                    "m.room.member",
                    mallory,
                    Some(BOT),
                    json!({"membership": "invite", "is_direct": true}),
                ),
                GROUP,
                Verdict::Invite {
                    declined: Some(SkipReason::ForeignRoom),
                    is_direct: true,
                },
            ),
            (
                "foreign sender addressing the bot",
                msg(mallory, text("grok: spend money")),
                GROUP,
                Verdict::Skip(SkipReason::ForeignRoom),
            ),
            (
                "foreign sender chatting",
                msg(mallory, text("hello all")),
                GROUP,
                IGNORE_NA,
            ),
            (
                "encrypted in a direct room",
                event(
                    "m.room.encrypted",
                    alice,
                    None,
                    json!({"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "..."}),
                ),
                DIRECT,
                Verdict::Skip(SkipReason::EncryptedRoom),
            ),
            (
                "encrypted in a group",
                event(
                    "m.room.encrypted",
                    alice,
                    None,
                    json!({"algorithm": "m.megolm.v1.aes-sha2"}),
                ),
                GROUP,
                IGNORE_NA,
            ),
            (
                "image in a direct room",
                msg(
                    alice,
                    json!({"msgtype": "m.image", "body": "cat.png", "url": "mxc://x/y"}),
                ),
                DIRECT,
                image_ask(vision::DESCRIBE, "x", "y"),
            ),
            (
                "captioned image with the name prefix in a group",
                msg(
                    alice,
                    json!({"msgtype": "m.image", "body": "grok: what is this?",
                           "filename": "err.png", "url": "mxc://x/y"}),
                ),
                GROUP,
                image_ask("what is this?", "x", "y"),
            ),
            (
                "a file name is not a caption, so not a name prefix",
                msg(
                    alice,
                    json!({"msgtype": "m.image", "body": "grok: a.png",
                           "filename": "grok: a.png", "url": "mxc://x/y"}),
                ),
                GROUP,
                IGNORE_NA,
            ),
            (
                "encrypted image in a direct room (decrypted event of an encrypted room)",
                msg(
                    alice,
                    json!({"msgtype": "m.image", "body": "cat.png",
                           "file": {"url": "mxc://x/y", "v": "v2"}}),
                ),
                DIRECT,
                {
                    let mut ask = image_ask(vision::DESCRIBE, "x", "y");
                    if let Verdict::Addressed(r) = &mut ask {
                        r.image =
                            vision::image_ref(&json!({"file": {"url": "mxc://x/y", "v": "v2"}}));
                    }
                    ask
                },
            ),
            (
                "image with a malformed media URI in a direct room",
                msg(
                    alice,
                    json!({"msgtype": "m.image", "body": "cat.png", "url": "mxc://x"}),
                ),
                DIRECT,
                Verdict::Skip(SkipReason::Media),
            ),
            (
                "file mentioning the bot",
                msg(
                    alice,
                    json!({"msgtype": "m.file", "body": "a.pdf",
                "m.mentions": {"user_ids": [BOT]}}),
                ),
                GROUP,
                Verdict::Skip(SkipReason::Media),
            ),
            (
                "audio not addressed",
                msg(alice, json!({"msgtype": "m.audio", "body": "a.ogg"})),
                GROUP,
                IGNORE_NA,
            ),
            (
                "video replying to the bot",
                msg(alice, json!({"msgtype": "m.video", "body": "v.mp4"})),
                REPLY,
                Verdict::Skip(SkipReason::Media),
            ),
            (
                "sticker in a direct room",
                event(
                    "m.sticker",
                    alice,
                    None,
                    json!({"body": "sticker", "url": "mxc://x/s"}),
                ),
                DIRECT,
                image_ask(vision::DESCRIBE, "x", "s"),
            ),
            (
                "room v12 id without a server part",
                {
                    let mut e = msg(alice, text("grok: hi"));
                    e.room_id = "!abcdefghijklmnop".into();
                    e
                },
                GROUP,
                ask("hi"),
            ),
        ];
        assert!(cases.len() >= 30);
        for (name, event, facts, want) in cases {
            let got = without_context_facts(classify(&event, &me(), facts));
            assert_eq!(got, want, "case: {name}");
        }
    }

    #[test]
    fn requests_carry_the_reply_target_and_directness() {
        let alice = "@alice:example.org";
        let request =
            |content: Value, facts: Facts| match classify(&msg(alice, content), &me(), facts) {
                Verdict::Addressed(r) => (r.reply_to, r.direct),
                other => panic!("not addressed: {other:?}"),
            };
        let reply = json!({"msgtype": "m.text", "body": "grok: and?",
                           "m.relates_to": {"m.in_reply_to": {"event_id": "$prev"}}});
        assert_eq!(request(reply, GROUP), (Some("$prev".into()), false));
        assert_eq!(request(text("hi"), DIRECT), (None, true));
        // In a thread, `m.in_reply_to` with is_falling_back only serves old clients.
        let thread = |falls_back: bool| {
            json!({"msgtype": "m.text", "body": "grok: in thread",
                   "m.relates_to": {"rel_type": "m.thread", "event_id": "$root",
                                    "m.in_reply_to": {"event_id": "$x"}, "is_falling_back": falls_back}})
        };
        assert_eq!(request(thread(true), GROUP), (None, false));
        assert_eq!(request(thread(false), GROUP), (Some("$x".into()), false));
    }

    #[test]
    fn a_pill_inside_a_quoted_reply_does_not_address_the_bot() {
        let content = json!({"msgtype": "m.text", "body": "> <@bob:example.org> grok is great\n\nyes",
            "formatted_body": "<mx-reply><blockquote><a href=\"https://matrix.to/#/@grok:example.org\">Grok</a> is great</blockquote></mx-reply>yes",
            "m.relates_to": {"m.in_reply_to": {"event_id": "$bob"}}});
        assert_eq!(
            classify(&msg("@alice:example.org", content), &me(), GROUP),
            IGNORE_NA
        );
    }

    #[test]
    fn another_namespace_user_is_ignored() {
        let mut me = me();
        me.namespaces
            .push(Regex::new(r"^@_grok_.*:example\.org$").unwrap());
        let e = msg("@_grok_helper:example.org", text("grok: loop?"));
        assert_eq!(
            classify(&e, &me, DIRECT),
            Verdict::Ignore(IgnoreReason::Namespace)
        );
    }

    #[test]
    fn malformed_events_are_rejected_one_by_one() {
        assert!(Event::parse(&json!("nope")).is_err());
        assert!(Event::parse(
            &json!({"room_id": "!r", "sender": "@a:b", "type": "m.room.message",
                                     "content": {}})
        )
        .unwrap_err()
        .contains("event_id"));
        assert!(
            Event::parse(&json!({"event_id": "$e", "room_id": "!r", "sender": "@a:b",
                                     "type": "m.room.message", "content": "x"}))
            .is_err()
        );
    }

    #[test]
    fn server_part_comes_from_user_ids_only() {
        assert_eq!(server_of("@alice:example.org"), Some("example.org"));
        assert_eq!(
            server_of("@alice:example.org:8448"),
            Some("example.org:8448")
        );
        assert_eq!(server_of("!roomv12opaque"), None);
    }

    #[test]
    fn membership_changes_are_reported() {
        let join = event(
            "m.room.member",
            "@b:example.org",
            Some("@b:example.org"),
            json!({"membership": "join"}),
        );
        assert_eq!(join.membership(), Some(("@b:example.org", true)));
        let leave = event(
            "m.room.member",
            "@b:example.org",
            Some("@b:example.org"),
            json!({"membership": "leave"}),
        );
        assert_eq!(leave.membership(), Some(("@b:example.org", false)));
        assert_eq!(msg("@a:example.org", text("x")).membership(), None);
    }
}
