//! Reading and generating the appservice `registration.yaml` (ruma's `Registration`).

use std::path::Path;

use base64::Engine;
use rand::RngCore;
use ruma::api::appservice::{Namespace, Namespaces, Registration, RegistrationInit};

/// Default localpart of the bot user (`@grok:<server>`).
pub const DEFAULT_LOCALPART: &str = "grok";

/// A registration error; names the file.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("cannot read registration {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("registration {path} is not valid: {message}")]
    Invalid { path: String, message: String },
    #[error("cannot write registration {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// A fresh token: 32 random bytes from the OS RNG, URL-safe base64 (43 characters).
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The bot user's localpart. A namespace regex that names exactly one user (as
/// `generate` writes) names the bot: the `sender_localpart` when it is such a user (older
/// registrations), else the one such user. Without one, the bot is the `sender_localpart`.
pub fn bot_localpart(registration: &Registration, server_name: &str) -> String {
    let named: Vec<String> = registration
        .namespaces
        .users
        .iter()
        .filter(|ns| ns.exclusive)
        .filter_map(|ns| literal_user(&ns.regex, server_name))
        .collect();
    let sender = &registration.sender_localpart;
    match named.as_slice() {
        [one] if one != sender && !named.contains(sender) => one.clone(),
        _ => sender.clone(),
    }
}

/// The localpart of the one user on `server_name` a regex matches, when it matches only one.
fn literal_user(regex: &str, server_name: &str) -> Option<String> {
    let inner = regex.strip_prefix('^')?.strip_suffix('$')?;
    let mut literal = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => literal.push(chars.next()?),
            c if "^$.|?*+()[]{}".contains(c) => return None,
            c => literal.push(c),
        }
    }
    let localpart = literal
        .strip_prefix('@')?
        .strip_suffix(&format!(":{server_name}"))?;
    (!localpart.is_empty() && !localpart.contains(':')).then(|| localpart.to_string())
}

/// The bot's full user id, `@<bot_localpart>:<server_name>`.
pub fn bot_user_id(registration: &Registration, server_name: &str) -> String {
    format!(
        "@{}:{server_name}",
        bot_localpart(registration, server_name)
    )
}

/// Why a registration cannot serve with encryption on: the homeserver refuses `/sync` (which
/// the bot's device needs for its keys) to the `sender_localpart` user.
pub fn check_for_encryption(registration: &Registration, server_name: &str) -> Result<(), String> {
    if bot_localpart(registration, server_name) == registration.sender_localpart {
        return Err(format!(
            "encryption.enabled needs a bot user other than the registration's sender_localpart \
             `{}` (the homeserver refuses /sync to that user): run generate-registration again, \
             or set sender_localpart to a random string and keep the bot user in the exclusive \
             users namespace (see the README, \"Encrypted rooms\"), then restart the homeserver",
            registration.sender_localpart
        ));
    }
    Ok(())
}

/// The exclusive user-namespace regex that covers exactly the bot user.
pub fn bot_user_regex(localpart: &str, server_name: &str) -> String {
    format!(
        "^{}$",
        regex::escape(&format!("@{localpart}:{server_name}"))
    )
}

/// Builds a registration with fresh tokens, an exclusive namespace for the bot user and a
/// random `sender_localpart`: the homeserver's own appservice user stays apart from the bot,
/// so the registration works with encryption on or off.
pub fn generate(server_name: &str, url: &str, localpart: &str) -> Registration {
    let mut namespaces = Namespaces::new();
    namespaces
        .users
        .push(Namespace::new(true, bot_user_regex(localpart, server_name)));
    // Not in the namespace: the homeserver knows its appservice user without one.
    let sender = format!("_grok_as_{}", hex::encode(rand::random::<[u8; 8]>()));
    let mut registration: Registration = RegistrationInit {
        id: localpart.to_string(),
        url: Some(url.trim_end_matches('/').to_string()),
        as_token: random_token(),
        hs_token: random_token(),
        sender_localpart: sender,
        namespaces,
        rate_limited: Some(false),
        protocols: None,
    }
    .into();
    registration.receive_ephemeral = false;
    registration
}

/// Serialises a registration to YAML.
pub fn to_yaml(registration: &Registration) -> String {
    serde_norway::to_string(registration).expect("a registration always serialises")
}

/// Writes the registration readable by its owner only: it holds both tokens.
pub fn write(registration: &Registration, path: &Path) -> Result<(), RegistrationError> {
    let write_err = |source| RegistrationError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(write_err)?;
    // `mode` applies only to a new file: an existing one (the shipped 0644 example) keeps its
    // mode, so it is narrowed before the tokens go in.
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(write_err)?;
    std::io::Write::write_all(&mut file, to_yaml(registration).as_bytes()).map_err(write_err)
}

/// Reads and checks a registration file.
pub fn load(path: &Path) -> Result<Registration, RegistrationError> {
    let text = std::fs::read_to_string(path).map_err(|source| RegistrationError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text).map_err(|message| RegistrationError::Invalid {
        path: path.display().to_string(),
        message,
    })
}

/// Parses registration YAML and rejects the values that would make the bot insecure or broken.
pub fn parse(text: &str) -> Result<Registration, String> {
    let registration: Registration = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    for (key, token) in [
        ("as_token", &registration.as_token),
        ("hs_token", &registration.hs_token),
    ] {
        if token.starts_with("CHANGE_ME") {
            return Err(format!(
                "`{key}` is the example placeholder; run generate-registration for fresh tokens"
            ));
        }
        if token.len() < 32 {
            return Err(format!(
                "`{key}` is shorter than 32 characters; run generate-registration for fresh tokens"
            ));
        }
    }
    if registration.as_token == registration.hs_token {
        return Err("`as_token` and `hs_token` must differ".into());
    }
    if registration.sender_localpart.is_empty() {
        return Err("`sender_localpart` is empty".into());
    }
    for ns in &registration.namespaces.users {
        regex::Regex::new(&ns.regex)
            .map_err(|e| format!("namespaces.users regex `{}`: {e}", ns.regex))?;
    }
    Ok(registration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_registration_round_trips_and_is_exclusive() {
        let reg = generate("example.org", "http://127.0.0.1:9000/", "grok");
        let back = parse(&to_yaml(&reg)).unwrap();
        assert_eq!(back.id, "grok");
        assert_ne!(back.sender_localpart, "grok");
        assert_eq!(bot_user_id(&back, "example.org"), "@grok:example.org");
        assert!(check_for_encryption(&back, "example.org").is_ok());
        assert_eq!(back.url.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(back.rate_limited, Some(false));
        let ns = &back.namespaces.users[0];
        assert!(ns.exclusive);
        let re = regex::Regex::new(&ns.regex).unwrap();
        assert!(re.is_match("@grok:example.org"));
        assert!(!re.is_match("@grok:exampleXorg"));
        assert!(!re.is_match("@grokker:example.org"));
    }

    fn with(sender: &str, regexes: &[&str]) -> Registration {
        let mut reg = generate("example.org", "http://x", "grok");
        reg.sender_localpart = sender.into();
        reg.namespaces.users = regexes
            .iter()
            .map(|r| Namespace::new(true, r.to_string()))
            .collect();
        reg
    }

    #[test]
    fn the_bot_is_the_one_user_a_namespace_names() {
        let bot = |reg: &Registration| bot_localpart(reg, "example.org");
        // Registrations written before the random sender_localpart: the sender is the bot.
        let old = with("grok", &[r"^@grok:example\.org$"]);
        assert_eq!(bot(&old), "grok");
        assert!(check_for_encryption(&old, "example.org")
            .unwrap_err()
            .contains("generate-registration"));
        // Hand-edited as the README says: a random sender, the bot named by its namespace.
        assert_eq!(bot(&with("xyz", &[r"^@grok:example\.org$"])), "grok");
        // A pattern names no single user; another server's user is not ours.
        assert_eq!(bot(&with("xyz", &[r"^@grok_.*:example\.org$"])), "xyz");
        assert_eq!(bot(&with("xyz", &[r"^@grok:other\.org$"])), "xyz");
        assert_eq!(bot(&with("xyz", &["@grok:example\\.org"])), "xyz");
        // Two named users and neither is the sender: ambiguous, so the sender.
        assert_eq!(
            bot(&with("xyz", &[r"^@a:example\.org$", r"^@b:example\.org$"])),
            "xyz"
        );
        let mut shared = with("xyz", &[r"^@grok:example\.org$"]);
        shared.namespaces.users[0].exclusive = false;
        assert_eq!(bot(&shared), "xyz");
    }

    #[test]
    fn tokens_are_fresh_and_long() {
        let a = generate("example.org", "http://x", "grok");
        let b = generate("example.org", "http://x", "grok");
        assert_ne!(a.as_token, b.as_token);
        assert_ne!(a.as_token, a.hs_token);
        // 32 bytes in unpadded base64 are 43 characters.
        assert_eq!(a.hs_token.len(), 43);
    }

    #[test]
    fn the_shipped_example_is_refused() {
        let example = include_str!("../registration.yaml");
        assert!(parse(example).unwrap_err().contains("placeholder"));
    }

    #[cfg(unix)]
    #[test]
    fn an_existing_file_ends_up_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("grok-reg-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("registration.yaml");
        std::fs::write(&path, "placeholder").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write(&generate("example.org", "http://x", "grok"), &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn weak_tokens_are_rejected() {
        let text = "id: grok\nurl: null\nas_token: short\nhs_token: alsoshort\n\
                    sender_localpart: grok\nnamespaces: {users: []}\n";
        assert!(parse(text).unwrap_err().contains("as_token"));
    }
}
