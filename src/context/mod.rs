//! Conversation context: which earlier messages the model sees with an addressed message.
//!
//! Sources are the reply chain above the message, its thread (root and earlier thread
//! messages) and, in `history` mode, the room's recent main-timeline messages. [`assemble`]
//! is pure (fallback stripping, edits, merging the bot's split replies, bounding, layout);
//! [`fetch`] reads the events from the homeserver as the bot, through a bounded cache.

pub mod assemble;
pub mod fetch;

use serde::Deserialize;

use crate::config::ContextConfig;
use crate::vision::ImageRef;

/// Which earlier messages a room's answers see (stable tokens: config and room commands).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Recent room history, plus the reply chain or thread.
    History,
    /// Only the reply chain or thread the message is in.
    Chain,
    /// No context: every message stands alone.
    Off,
}

impl Mode {
    /// The stable token.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::History => "history",
            Mode::Chain => "chain",
            Mode::Off => "off",
        }
    }

    /// Parses a token.
    pub fn parse(token: &str) -> Option<Mode> {
        [Mode::History, Mode::Chain, Mode::Off]
            .into_iter()
            .find(|m| m.as_str() == token)
    }
}

/// The mode of a room: its own override (a room command) if set, else the default for
/// direct chats or group rooms.
pub fn mode_for(direct: bool, room_override: Option<Mode>, config: &ContextConfig) -> Mode {
    room_override.unwrap_or(if direct {
        config.dm_mode
    } else {
        config.group_mode
    })
}

/// Who speaks a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    /// The Responses API role.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One earlier message (or one whole answer of the bot) as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    /// User turns start with the sender's display name (`Alice: ...`).
    pub text: String,
}

/// The context of one addressed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// Names the conversation for xAI's prompt cache (`prompt_cache_key`): the room, or the
    /// room and thread root.
    pub key: String,
    /// Earlier turns, oldest first, already bounded.
    pub turns: Vec<Turn>,
    /// The asker's display name, which prefixes the current message when there are turns.
    pub speaker: String,
    /// Images of the reply chain above the message, newest first (a question about an
    /// earlier image replies to it).
    pub images: Vec<ImageRef>,
}

impl Conversation {
    /// Whether any earlier message is sent (then the response cache is skipped).
    pub fn has_turns(&self) -> bool {
        !self.turns.is_empty()
    }

    /// The current message as the last user turn: labelled like the earlier user turns, so
    /// the next request's history repeats it byte for byte (append-only, cache friendly).
    pub fn current_input(&self, text: &str) -> String {
        if self.has_turns() {
            assemble::label(&self.speaker, text)
        } else {
            text.to_string()
        }
    }

    /// Everything the request sends besides the instructions, for the limiter's estimate.
    pub fn estimate_material(&self, text: &str) -> String {
        let mut all: Vec<&str> = self.turns.iter().map(|t| t.text.as_str()).collect();
        let current = self.current_input(text);
        all.push(&current);
        all.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip_and_rooms_override_the_default() {
        for m in [Mode::History, Mode::Chain, Mode::Off] {
            assert_eq!(Mode::parse(m.as_str()), Some(m));
        }
        assert_eq!(Mode::parse("room"), None);
        let c = ContextConfig::default();
        assert_eq!(mode_for(true, None, &c), Mode::History);
        assert_eq!(mode_for(false, None, &c), Mode::Chain);
        assert_eq!(mode_for(true, Some(Mode::Off), &c), Mode::Off);
        assert_eq!(mode_for(false, Some(Mode::History), &c), Mode::History);
    }

    #[test]
    fn the_current_message_is_labelled_only_when_there_is_context() {
        let mut c = Conversation {
            key: "!r".into(),
            turns: vec![],
            speaker: "Alice".into(),
            images: vec![],
        };
        assert_eq!(c.current_input("hi"), "hi");
        c.turns.push(Turn {
            role: Role::User,
            text: "Alice: before".into(),
        });
        assert_eq!(c.current_input("hi"), "Alice: hi");
        assert_eq!(c.estimate_material("hi"), "Alice: before\nAlice: hi");
    }
}
