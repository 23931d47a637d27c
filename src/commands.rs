//! Room commands (`!grok help`, `!grok usage`, and for moderators `!grok context ...` and
//! `!grok route ...`): parsing, who may change a room, and the help text. Pure; the answer
//! path's command stage does the I/O. Commands never call a model and never cost budget.

use serde_json::Value;

use crate::cascade::Route;

/// The context modes a room can choose (`history`, `chain`, `off`).
pub const CONTEXT_MODES: [&str; 3] = ["history", "chain", "off"];

/// What a moderator can change in a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `context history|chain|off|default`; `None` goes back to the config's default.
    Context(Option<String>),
    /// `route auto|<route>`; `None` is automatic routing.
    Route(Option<Route>),
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help,
    Usage,
    /// A moderator's change of the room.
    Set(Change),
    /// Not a command the bot knows (or a bad argument): answered with the help text.
    Unknown,
}

/// Parses `text` (the message without the mention) as a command: `<prefix> <word> [arg]`, or
/// the standalone usage command (`!usage`). `None` when the text is not a command at all.
pub fn parse(text: &str, prefix: &str, usage_command: &str) -> Option<Command> {
    let text = text.trim();
    if text.eq_ignore_ascii_case(usage_command) {
        return Some(Command::Usage);
    }
    let mut words = text.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let word = words.next().map(str::to_ascii_lowercase);
    let arg = words.next().map(str::to_ascii_lowercase);
    if words.next().is_some() {
        return Some(Command::Unknown);
    }
    Some(match (word.as_deref(), arg.as_deref()) {
        (None | Some("help"), None) => Command::Help,
        (Some("usage"), None) => Command::Usage,
        (Some("context"), Some("default")) => Command::Set(Change::Context(None)),
        (Some("context"), Some(mode)) if CONTEXT_MODES.contains(&mode) => {
            Command::Set(Change::Context(Some(mode.to_string())))
        }
        (Some("route"), Some("auto")) => Command::Set(Change::Route(None)),
        (Some("route"), Some(route)) => match Route::parse(route) {
            Some(r) if r != Route::None => Command::Set(Change::Route(Some(r))),
            _ => Command::Unknown,
        },
        _ => Command::Unknown,
    })
}

/// Whether `user` may change the room: a power level at or above the room's `state_default`
/// (who may change room state), or a creator of a room version 12 or later (creators there
/// outrank every power level). `state` is the room's state events
/// (`GET /rooms/{roomId}/state`).
pub fn is_moderator(state: &[Value], user: &str) -> bool {
    let find = |kind: &str| {
        state
            .iter()
            .find(|e| e["type"] == kind && e["state_key"] == "")
    };
    let create = find("m.room.create");
    if let Some(create) = create {
        if creators_are_privileged(&create["content"]) && is_creator(create, user) {
            return true;
        }
    }
    let Some(levels) = find("m.room.power_levels").map(|e| &e["content"]) else {
        // The spec: with no power levels event anyone may send state (`state_default` is 0).
        // Homeservers always create one, so this is only a room that is not set up yet.
        return create.is_some();
    };
    let level = |v: &Value| v.as_i64().or_else(|| v.as_str()?.parse().ok());
    let user_level = levels["users"]
        .get(user)
        .and_then(level)
        .or_else(|| level(&levels["users_default"]))
        .unwrap_or(0);
    let state_default = level(&levels["state_default"]).unwrap_or(50);
    user_level >= state_default
}

/// Room versions 12 and later give creators unlimited power (they are not in `users`).
fn creators_are_privileged(create_content: &Value) -> bool {
    create_content["room_version"]
        .as_str()
        .and_then(|v| v.parse::<u32>().ok())
        .is_some_and(|v| v >= 12)
}

fn is_creator(create: &Value, user: &str) -> bool {
    create["sender"] == user
        || create["content"]["creator"] == user
        || create["content"]["additional_creators"]
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c == user))
}

/// What the help text shows of the room and the asker.
#[derive(Debug, Clone)]
pub struct HelpFacts<'a> {
    pub bot_name: &'a str,
    pub prefix: &'a str,
    pub usage_command: &'a str,
    /// The room's context mode and whether a moderator chose it.
    pub context_mode: &'a str,
    pub context_set: bool,
    /// The room's fixed route, if a moderator set one.
    pub route: Option<&'a str>,
    /// The asker's limits, as `!usage` words them.
    pub usage: Option<String>,
}

/// The `help` reply (Markdown).
pub fn help_text(f: &HelpFacts<'_>) -> String {
    let p = f.prefix;
    let mut text = format!(
        "I'm {name}, answering with xAI's Grok models.\n\n\
         **Asking me:** in a direct chat just write. In a room, mention me, reply to one of my \
         messages, or start with \"{name}:\".\n\n\
         **Choosing the model:** start a question with `!fast` (quick and cheap), `!web` \
         (searches the web, with sources), `!think` (reasons step by step) or `!direct` (the \
         strong model). Otherwise I pick.\n\n\
         **Commands:** `{p} help`, `{p} usage` (or `{usage}`). Room moderators: \
         `{p} context history|chain|off|default` (what earlier messages I read), \
         `{p} route auto|grok_direct|trivial_direct|web_then_grok|reason_then_grok`.\n\n\
         **This room:** context `{mode}`{set}; route {route}.",
        name = f.bot_name,
        usage = f.usage_command,
        mode = f.context_mode,
        set = if f.context_set {
            " (set by a moderator)"
        } else {
            " (default)"
        },
        route = f
            .route
            .map_or("automatic".to_string(), |r| format!("`{r}`")),
    );
    if let Some(usage) = &f.usage {
        text.push_str(&format!("\n\n**Your limits:** {usage}"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cmd(text: &str) -> Option<Command> {
        parse(text, "!grok", "!usage")
    }

    #[test]
    fn commands_are_parsed() {
        assert_eq!(cmd("!grok"), Some(Command::Help));
        assert_eq!(cmd("  !GROK help "), Some(Command::Help));
        assert_eq!(cmd("!grok usage"), Some(Command::Usage));
        assert_eq!(cmd("!usage"), Some(Command::Usage));
        assert_eq!(
            cmd("!grok context OFF"),
            Some(Command::Set(Change::Context(Some("off".into()))))
        );
        assert_eq!(
            cmd("!grok context default"),
            Some(Command::Set(Change::Context(None)))
        );
        assert_eq!(
            cmd("!grok route web_then_grok"),
            Some(Command::Set(Change::Route(Some(Route::WebThenGrok))))
        );
        assert_eq!(
            cmd("!grok route auto"),
            Some(Command::Set(Change::Route(None)))
        );
        for unknown in [
            "!grok route none",
            "!grok route fast",
            "!grok context everything",
            "!grok frobnicate",
            "!grok help me please",
        ] {
            assert_eq!(cmd(unknown), Some(Command::Unknown), "{unknown}");
        }
        for not_a_command in ["what is !grok?", "grok help", "!grokky help", ""] {
            assert_eq!(cmd(not_a_command), None, "{not_a_command}");
        }
    }

    fn state(version: &str, creator: &str, levels: Option<Value>) -> Vec<Value> {
        let mut s = vec![json!({
            "type": "m.room.create", "state_key": "", "sender": creator,
            "content": {"room_version": version},
        })];
        if let Some(l) = levels {
            s.push(json!({"type": "m.room.power_levels", "state_key": "", "content": l}));
        }
        s
    }

    #[test]
    fn moderators_are_read_from_power_levels() {
        let levels = json!({"users": {"@mod:x": 50, "@admin:x": 100, "@str:x": "60"},
                            "users_default": 0, "state_default": 50});
        let room = state("10", "@admin:x", Some(levels));
        assert!(is_moderator(&room, "@mod:x"));
        assert!(is_moderator(&room, "@admin:x"));
        assert!(
            is_moderator(&room, "@str:x"),
            "string levels from old rooms"
        );
        assert!(!is_moderator(&room, "@alice:x"));

        // Room v12: the creator is not in `users` and still outranks everyone.
        let v12 = state("12", "@creator:x", Some(json!({"users": {"@mod:x": 50}})));
        assert!(is_moderator(&v12, "@creator:x"));
        assert!(is_moderator(&v12, "@mod:x"), "state_default defaults to 50");
        assert!(!is_moderator(&v12, "@alice:x"));

        // A creator of an older room counts only through its power level.
        let old = state("10", "@creator:x", Some(json!({"users": {}})));
        assert!(!is_moderator(&old, "@creator:x"));

        let everyone = state(
            "10",
            "@a:x",
            Some(json!({"users_default": 50, "state_default": 50})),
        );
        assert!(is_moderator(&everyone, "@anyone:x"));
        assert!(!is_moderator(&[], "@anyone:x"), "no state, no rights");
        assert!(
            is_moderator(&state("10", "@a:x", None), "@b:x"),
            "without power levels anyone may change state (the spec's state_default 0)"
        );
    }

    #[test]
    fn help_shows_the_room_and_the_asker() {
        let facts = HelpFacts {
            bot_name: "Grok",
            prefix: "!grok",
            usage_command: "!usage",
            context_mode: "off",
            context_set: true,
            route: Some("web_then_grok"),
            usage: Some("Today (UTC) you have used $0.00.".into()),
        };
        let text = help_text(&facts);
        assert!(text.contains("`!grok context history|chain|off|default`"));
        assert!(text.contains("context `off` (set by a moderator); route `web_then_grok`"));
        assert!(text.contains("**Your limits:** Today (UTC)"));
        let plain = help_text(&HelpFacts {
            context_set: false,
            route: None,
            usage: None,
            ..facts
        });
        assert!(plain.contains("(default); route automatic."));
        assert!(!plain.contains("Your limits"));
    }
}
