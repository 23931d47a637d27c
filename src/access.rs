//! Who may use the bot: `rooms.allowed_users`, `rooms.denied_users` and `rooms.allowed_rooms`,
//! compiled once when the config is loaded and checked by `classify` before any model call.

use std::collections::BTreeSet;

use regex::Regex;

/// One entry of a user list: a glob (`*` any run of characters, `?` one character, matched
/// against the whole user id) or a regex when written `/.../` (searched, so anchor it with
/// `^...$` to match the whole id).
#[derive(Debug, Clone)]
pub struct UserPattern {
    source: String,
    re: Regex,
}

impl UserPattern {
    /// Compiles one entry; the error says what is wrong with it.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let pattern = match entry
            .strip_prefix('/')
            .and_then(|rest| rest.strip_suffix('/'))
        {
            Some(re) if !re.is_empty() => re.to_string(),
            _ if entry.trim().is_empty() => return Err("an empty entry matches nobody".into()),
            _ => glob_to_regex(entry),
        };
        let re = Regex::new(&pattern).map_err(|e| e.to_string())?;
        Ok(Self {
            source: entry.to_string(),
            re,
        })
    }

    /// Whether the user id matches.
    pub fn matches(&self, user_id: &str) -> bool {
        self.re.is_match(user_id)
    }

    /// The entry as written in the config.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// An anchored regex for a glob: every character literal but `*` and `?`.
fn glob_to_regex(glob: &str) -> String {
    let mut out = String::from("^");
    for c in glob.chars() {
        match c {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            c => out.push_str(&regex::escape(c.encode_utf8(&mut [0; 4]))),
        }
    }
    out.push('$');
    out
}

/// The compiled access lists. Empty allow lists allow everyone; the deny list wins over the
/// allow list.
#[derive(Debug, Clone, Default)]
pub struct Access {
    allowed_users: Vec<UserPattern>,
    denied_users: Vec<UserPattern>,
    allowed_rooms: BTreeSet<String>,
}

/// The config key and entry an access list could not compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessError {
    pub key: &'static str,
    pub message: String,
}

impl Access {
    /// Compiles the lists. Rooms are room ids (`!...`), as events carry them: an alias can be
    /// moved to another room, so it is refused rather than resolved once at start.
    pub fn compile(
        allowed_users: &[String],
        denied_users: &[String],
        allowed_rooms: &[String],
    ) -> Result<Self, AccessError> {
        let users = |key: &'static str, entries: &[String]| {
            entries
                .iter()
                .map(|e| {
                    UserPattern::parse(e).map_err(|m| AccessError {
                        key,
                        message: format!("entry `{e}`: {m}"),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let mut rooms = BTreeSet::new();
        for room in allowed_rooms {
            if !room.starts_with('!') {
                let hint = if room.starts_with('#') {
                    "an alias; give the room id (`!...`, in the client's room settings)"
                } else {
                    "not a room id (`!...`)"
                };
                return Err(AccessError {
                    key: "rooms.allowed_rooms",
                    message: format!("entry `{room}` is {hint}"),
                });
            }
            rooms.insert(room.clone());
        }
        Ok(Self {
            allowed_users: users("rooms.allowed_users", allowed_users)?,
            denied_users: users("rooms.denied_users", denied_users)?,
            allowed_rooms: rooms,
        })
    }

    /// Whether the lists let this user use the bot (the server check is separate).
    pub fn user_allowed(&self, user_id: &str) -> bool {
        let listed =
            self.allowed_users.is_empty() || self.allowed_users.iter().any(|p| p.matches(user_id));
        listed && !self.denied_users.iter().any(|p| p.matches(user_id))
    }

    /// Whether the bot serves this room.
    pub fn room_allowed(&self, room_id: &str) -> bool {
        self.allowed_rooms.is_empty() || self.allowed_rooms.contains(room_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn globs_match_the_whole_id_with_star_and_question_mark() {
        let cases = [
            ("@alice:example.org", "@alice:example.org", true),
            ("@alice:example.org", "@alice:example.org.evil", false),
            ("@alice:example.org", "x@alice:example.org", false),
            ("@*:example.org", "@bob:example.org", true),
            ("@*:example.org", "@bob:example.org.evil", false),
            ("@*:example.org", "@bob:exampleXorg", false),
            ("@bot?:example.org", "@bot1:example.org", true),
            ("@bot?:example.org", "@bot12:example.org", false),
            ("@bot?:example.org", "@bot:example.org", false),
            ("*", "@anyone:anywhere", true),
            ("@a+b:example.org", "@a+b:example.org", true),
            ("@a+b:example.org", "@aab:example.org", false),
        ];
        for (glob, user, want) in cases {
            let p = UserPattern::parse(glob).unwrap();
            assert_eq!(p.matches(user), want, "{glob} vs {user}");
        }
    }

    #[test]
    fn slashes_make_a_searched_regex() {
        let p = UserPattern::parse("/^@.*-bot:example\\.org$/").unwrap();
        assert!(p.matches("@ci-bot:example.org"));
        assert!(!p.matches("@ci-bot:example.org.evil"));
        let unanchored = UserPattern::parse("/spam/").unwrap();
        assert!(unanchored.matches("@spammer:x.org"));
        assert!(!unanchored.matches("@alice:x.org"));
        assert_eq!(unanchored.source(), "/spam/");
    }

    #[test]
    fn bad_entries_name_the_key_and_the_entry() {
        let e = Access::compile(&[], &strings(&["@ok:x", "/(unclosed/"]), &[]).unwrap_err();
        assert_eq!(e.key, "rooms.denied_users");
        assert!(e.message.contains("`/(unclosed/`"), "{}", e.message);
        let e = Access::compile(&strings(&[" "]), &[], &[]).unwrap_err();
        assert_eq!(e.key, "rooms.allowed_users");
        let e = Access::compile(&[], &[], &strings(&["#lobby:example.org"])).unwrap_err();
        assert_eq!(e.key, "rooms.allowed_rooms");
        assert!(e.message.contains("alias"), "{}", e.message);
        let e = Access::compile(&[], &[], &strings(&["lobby"])).unwrap_err();
        assert!(e.message.contains("not a room id"), "{}", e.message);
    }

    #[test]
    fn empty_lists_allow_everyone_and_deny_wins() {
        let open = Access::default();
        assert!(open.user_allowed("@anyone:example.org"));
        assert!(open.room_allowed("!any:example.org"));

        let lists = Access::compile(
            &strings(&["@*:example.org"]),
            &strings(&["@mallory:example.org", "/^@spam/"]),
            &strings(&["!team:example.org"]),
        )
        .unwrap();
        assert!(lists.user_allowed("@alice:example.org"));
        assert!(!lists.user_allowed("@mallory:example.org"));
        assert!(!lists.user_allowed("@spambot:example.org"));
        assert!(!lists.user_allowed("@alice:other.org"));
        assert!(lists.room_allowed("!team:example.org"));
        assert!(!lists.room_allowed("!elsewhere:example.org"));
    }
}
