//! Client-server API calls as the bot: register, ping, join/leave, send, typing, members,
//! fetch an event, read a room's recent messages or a thread, download an image. A homeserver
//! 429 is waited out (`Retry-After`) a bounded number of times.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::crypto::Crypto;

/// A failed client-server call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MatrixError {
    /// The homeserver answered with an error.
    #[error("homeserver answered {status} {errcode}: {error}")]
    Http {
        status: u16,
        errcode: String,
        error: String,
    },
    /// The homeserver could not be reached or its answer could not be read.
    #[error("homeserver unreachable: {0}")]
    Transport(String),
}

impl MatrixError {
    /// The Matrix errcode, if the homeserver sent one.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            MatrixError::Http { errcode, .. } => Some(errcode),
            MatrixError::Transport(_) => None,
        }
    }
}

/// A failed media download.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MediaError {
    /// The file is larger than the cap: reading stopped there.
    #[error("media larger than {0} bytes")]
    TooLarge(u64),
    #[error(transparent)]
    Matrix(#[from] MatrixError),
}

/// A downloaded file, held in memory only.
#[derive(Clone)]
pub struct Downloaded {
    /// The `Content-Type` the homeserver served it with.
    pub content_type: String,
    pub bytes: Vec<u8>,
}

/// The deterministic send txnId for a reply to `source_event_id`: Synapse's send-txnId cache
/// ignores the user, so the id must be unique across users, and a re-run after a crash must
/// reuse it so the homeserver deduplicates the send.
pub fn reply_txn_id(source_event_id: &str, purpose: &str) -> String {
    let digest = Sha256::digest(format!("{purpose}|{source_event_id}").as_bytes());
    format!(
        "grok.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..24])
    )
}

/// The events of a paginated answer's `chunk`.
fn chunk(mut v: Value) -> Vec<Value> {
    match v["chunk"].take() {
        Value::Array(events) => events,
        _ => Vec::new(),
    }
}

/// A homeserver without the endpoint: 404, or `M_UNRECOGNIZED` (405 on some servers).
fn is_unknown_endpoint(e: &MatrixError) -> bool {
    matches!(e, MatrixError::Http { status: 404, .. }) || e.errcode() == Some("M_UNRECOGNIZED")
}

fn enc(segment: &str) -> String {
    utf8_percent_encode(segment, NON_ALPHANUMERIC).to_string()
}

/// How many times a 429 is waited out before giving up.
const MAX_RATE_LIMIT_WAITS: u32 = 5;

/// The client-server API as the appservice bot.
#[derive(Clone)]
pub struct MatrixClient {
    http: reqwest::Client,
    base_url: String,
    as_token: String,
    /// The bot's full user id.
    pub user_id: String,
    /// Encryption, when this replica owns the crypto machine (shared by every clone).
    crypto: Arc<RwLock<Option<Arc<Crypto>>>>,
    /// `encryption.enabled`: a send into an encrypted room needs the crypto machine.
    encryption: bool,
}

impl MatrixClient {
    /// A client for `base_url` (no trailing slash) authenticating with the `as_token`.
    pub fn new(base_url: &str, as_token: &str, user_id: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("the TLS backend initialises");
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            as_token: as_token.to_string(),
            user_id: user_id.to_string(),
            crypto: Arc::default(),
            encryption: false,
        }
    }

    /// This client with `encryption.enabled`: sends into encrypted rooms are encrypted once a
    /// crypto machine is installed, and refused (a transient error) until then.
    pub fn with_encryption(mut self) -> Self {
        self.encryption = true;
        self
    }

    /// Installs (or, with `None`, removes) the crypto machine this replica owns.
    pub fn set_crypto(&self, crypto: Option<Arc<Crypto>>) {
        *self.crypto.write().unwrap_or_else(|p| p.into_inner()) = crypto;
    }

    /// The crypto machine, when this replica owns it.
    pub fn crypto(&self) -> Option<Arc<Crypto>> {
        self.crypto
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The event types that can hold a message: encrypted ones too when encryption is on.
    fn message_types(&self) -> &'static [&'static str] {
        if self.encryption {
            &["m.room.message", "m.room.encrypted"]
        } else {
            &["m.room.message"]
        }
    }

    /// Decrypts what it can of `events` in place (when encryption is on and owned here).
    async fn decrypt_all(&self, room_id: &str, events: &mut [Value]) {
        if let Some(crypto) = self.crypto() {
            crypto.decrypt_all(room_id, events).await;
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, MatrixError> {
        // Every call names the bot user: it is not the registration's sender_localpart.
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{sep}user_id={}", self.base_url, enc(&self.user_id));
        let mut waits = 0;
        loop {
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(&self.as_token);
            if let Some(b) = body {
                req = req.json(b);
            }
            let response = req
                .send()
                .await
                .map_err(|e| MatrixError::Transport(e.without_url().to_string()))?;
            let status = response.status().as_u16();
            let retry_after = crate::backoff::retry_after(response.headers());
            let bytes = response
                .bytes()
                .await
                .map_err(|e| MatrixError::Transport(e.without_url().to_string()))?;
            let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if (200..300).contains(&status) {
                return Ok(value);
            }
            let errcode = value["errcode"].as_str().unwrap_or("").to_string();
            if status == 429 && waits < MAX_RATE_LIMIT_WAITS {
                waits += 1;
                let wait = retry_after
                    .or_else(|| value["retry_after_ms"].as_u64().map(Duration::from_millis))
                    .unwrap_or(Duration::from_secs(2))
                    .min(Duration::from_secs(60));
                tracing::warn!(path, ?wait, "homeserver rate limit, waiting");
                tokio::time::sleep(wait).await;
                continue;
            }
            return Err(MatrixError::Http {
                status,
                errcode,
                error: value["error"].as_str().unwrap_or("").to_string(),
            });
        }
    }

    /// Registers the bot user; an existing user is success.
    pub async fn register(&self, localpart: &str) -> Result<(), MatrixError> {
        let body = json!({"type": "m.login.application_service", "username": localpart,
                          "inhibit_login": true});
        match self
            .call(
                reqwest::Method::POST,
                "/_matrix/client/v3/register",
                Some(&body),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.errcode() == Some("M_USER_IN_USE") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sets the bot's display name.
    pub async fn set_display_name(&self, name: &str) -> Result<(), MatrixError> {
        let path = format!(
            "/_matrix/client/v3/profile/{}/displayname",
            enc(&self.user_id)
        );
        self.call(
            reqwest::Method::PUT,
            &path,
            Some(&json!({"displayname": name})),
        )
        .await
        .map(|_| ())
    }

    /// Sets the bot's avatar (an `mxc://` URI).
    pub async fn set_avatar_url(&self, mxc: &str) -> Result<(), MatrixError> {
        let path = format!(
            "/_matrix/client/v3/profile/{}/avatar_url",
            enc(&self.user_id)
        );
        self.call(
            reqwest::Method::PUT,
            &path,
            Some(&json!({"avatar_url": mxc})),
        )
        .await
        .map(|_| ())
    }

    /// Asks the homeserver to ping the appservice; returns the round trip in ms. A success
    /// also makes Synapse resend transactions it queued while the appservice was down.
    pub async fn ping(&self, appservice_id: &str) -> Result<u64, MatrixError> {
        let path = format!("/_matrix/client/v1/appservice/{}/ping", enc(appservice_id));
        let v = self
            .call(reqwest::Method::POST, &path, Some(&json!({})))
            .await?;
        Ok(v["duration_ms"].as_u64().unwrap_or(0))
    }

    /// Joins a room.
    pub async fn join(&self, room_id: &str) -> Result<(), MatrixError> {
        let path = format!("/_matrix/client/v3/rooms/{}/join", enc(room_id));
        self.call(reqwest::Method::POST, &path, Some(&json!({})))
            .await
            .map(|_| ())
    }

    /// Leaves a room (also declines an invite).
    pub async fn leave(&self, room_id: &str) -> Result<(), MatrixError> {
        let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(room_id));
        self.call(reqwest::Method::POST, &path, Some(&json!({})))
            .await
            .map(|_| ())
    }

    /// The rooms the bot is joined to (`/joined_rooms`).
    pub async fn joined_rooms(&self) -> Result<Vec<String>, MatrixError> {
        let v = self
            .call(
                reqwest::Method::GET,
                "/_matrix/client/v3/joined_rooms",
                None,
            )
            .await?;
        Ok(v["joined_rooms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(str::to_string))
            .collect())
    }

    /// Forgets a room the bot is no longer in, so it leaves the bot's room list for good.
    pub async fn forget(&self, room_id: &str) -> Result<(), MatrixError> {
        let path = format!("/_matrix/client/v3/rooms/{}/forget", enc(room_id));
        self.call(reqwest::Method::POST, &path, Some(&json!({})))
            .await
            .map(|_| ())
    }

    /// The room's current state events (power levels and creators, for room commands).
    pub async fn room_state(&self, room_id: &str) -> Result<Vec<Value>, MatrixError> {
        let path = format!("/_matrix/client/v3/rooms/{}/state", enc(room_id));
        let v = self.call(reqwest::Method::GET, &path, None).await?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    async fn joined(&self, room_id: &str) -> Result<Value, MatrixError> {
        let path = format!("/_matrix/client/v3/rooms/{}/joined_members", enc(room_id));
        let v = self.call(reqwest::Method::GET, &path, None).await?;
        Ok(v["joined"].clone())
    }

    /// The user ids joined to a room.
    pub async fn joined_members(&self, room_id: &str) -> Result<Vec<String>, MatrixError> {
        let joined = self.joined(room_id).await?;
        Ok(joined
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default())
    }

    /// The user ids joined to a room and, with `invited`, those invited too: one request
    /// either way (the members that have not left, when the invited are wanted).
    pub async fn members(&self, room_id: &str, invited: bool) -> Result<Vec<String>, MatrixError> {
        if !invited {
            return self.joined_members(room_id).await;
        }
        let path = format!(
            "/_matrix/client/v3/rooms/{}/members?not_membership=leave",
            enc(room_id)
        );
        let v = self.call(reqwest::Method::GET, &path, None).await?;
        Ok(chunk(v)
            .iter()
            .filter(|m| matches!(m["content"]["membership"].as_str(), Some("join" | "invite")))
            .filter_map(|m| m["state_key"].as_str().map(str::to_string))
            .collect())
    }

    /// The display names of a room's joined members (members without one are left out).
    pub async fn member_names(
        &self,
        room_id: &str,
    ) -> Result<HashMap<String, String>, MatrixError> {
        let joined = self.joined(room_id).await?;
        Ok(joined
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(user, m)| Some((user.clone(), m["display_name"].as_str()?.to_string())))
            .collect())
    }

    /// The room's latest `limit` messages, newest first (`/messages`, backwards from now).
    pub async fn recent_messages(
        &self,
        room_id: &str,
        limit: u32,
    ) -> Result<Vec<Value>, MatrixError> {
        let filter = json!({ "types": self.message_types() }).to_string();
        let path = format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit={limit}&filter={}",
            enc(room_id),
            enc(&filter)
        );
        let v = self.call(reqwest::Method::GET, &path, None).await?;
        let mut events = chunk(v);
        self.decrypt_all(room_id, &mut events).await;
        Ok(events)
    }

    /// The latest `limit` messages of the thread under `root` (the root itself not included),
    /// newest first.
    pub async fn thread_messages(
        &self,
        room_id: &str,
        root: &str,
        limit: u32,
    ) -> Result<Vec<Value>, MatrixError> {
        let path = format!(
            "/_matrix/client/v1/rooms/{}/relations/{}/m.thread?dir=b&limit={limit}",
            enc(room_id),
            enc(root)
        );
        let v = self.call(reqwest::Method::GET, &path, None).await?;
        let mut events = chunk(v);
        self.decrypt_all(room_id, &mut events).await;
        Ok(events)
    }

    /// Sends an `m.room.message`, encrypted in an encrypted room; the txnId makes a repeated
    /// send a no-op at the homeserver.
    pub async fn send_message(
        &self,
        room_id: &str,
        txn_id: &str,
        content: &Value,
    ) -> Result<String, MatrixError> {
        let (event_type, body) = match self.crypto() {
            Some(crypto) => {
                let crypt = |e: crate::crypto::CryptoError| {
                    MatrixError::Transport(format!("encrypting the message: {e}"))
                };
                if crypto.is_encrypted(room_id).await.map_err(crypt)? {
                    let sealed = crypto
                        .encrypt(room_id, "m.room.message", content)
                        .await
                        .map_err(crypt)?;
                    ("m.room.encrypted", std::borrow::Cow::Owned(sealed))
                } else {
                    ("m.room.message", std::borrow::Cow::Borrowed(content))
                }
            }
            None if self.encryption && self.is_encrypted(room_id).await? => {
                // Another replica owns the crypto machine; a retry may find it here.
                return Err(MatrixError::Transport(
                    "the room is encrypted and this replica does not own the crypto machine".into(),
                ));
            }
            None => ("m.room.message", std::borrow::Cow::Borrowed(content)),
        };
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/{event_type}/{}",
            enc(room_id),
            enc(txn_id)
        );
        let v = self.call(reqwest::Method::PUT, &path, Some(&body)).await?;
        v["event_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| MatrixError::Transport("send answered without an event_id".into()))
    }

    /// Turns the bot's typing notification on (for `timeout`) or off.
    pub async fn typing(
        &self,
        room_id: &str,
        on: bool,
        timeout: Duration,
    ) -> Result<(), MatrixError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/typing/{}",
            enc(room_id),
            enc(&self.user_id)
        );
        let body = if on {
            json!({"typing": true, "timeout": timeout.as_millis() as u64})
        } else {
            json!({"typing": false})
        };
        self.call(reqwest::Method::PUT, &path, Some(&body))
            .await
            .map(|_| ())
    }

    /// Looks back through the room's last `limit` messages from the bot for the parts of its
    /// reply to `source_event_id`: `(part index, event id)`. Used before re-sending a reply
    /// whose send may have landed: after 30-60 min the homeserver has forgotten the send's
    /// txnId and would post it again. A reply without a part marker (older versions) is part 0.
    pub async fn find_reply_parts(
        &self,
        room_id: &str,
        source_event_id: &str,
        limit: u32,
    ) -> Result<Vec<(usize, String)>, MatrixError> {
        let filter = json!({"senders": [self.user_id], "types": self.message_types()}).to_string();
        let path = format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit={limit}&filter={}",
            enc(room_id),
            enc(&filter)
        );
        let v = self.call(reqwest::Method::GET, &path, None).await?;
        let mut events = chunk(v);
        self.decrypt_all(room_id, &mut events).await;
        let marker = crate::answer::render::PART_KEY;
        let found = events
            .iter()
            .filter(|e| e["sender"] == self.user_id.as_str())
            .filter_map(|e| {
                let content = &e["content"];
                let part = if content[marker]["source"] == source_event_id {
                    content[marker]["part"].as_u64()? as usize
                } else if content
                    .pointer("/m.relates_to/m.in_reply_to/event_id")
                    .and_then(Value::as_str)
                    == Some(source_event_id)
                    && content.get(marker).is_none()
                {
                    0
                } else {
                    return None;
                };
                Some((part, e["event_id"].as_str()?.to_string()))
            })
            .collect();
        Ok(found)
    }

    /// Downloads `mxc://{server}/{media_id}` as the bot, reading at most `max_bytes`:
    /// authenticated media (Matrix 1.11) first, the legacy unauthenticated endpoint when the
    /// homeserver does not know it (404 or `M_UNRECOGNIZED`).
    pub async fn download(
        &self,
        server: &str,
        media_id: &str,
        max_bytes: u64,
    ) -> Result<Downloaded, MediaError> {
        let tail = format!("{}/{}", enc(server), enc(media_id));
        let authenticated = format!("/_matrix/client/v1/media/download/{tail}");
        match self.download_from(&authenticated, max_bytes).await {
            Err(MediaError::Matrix(e)) if is_unknown_endpoint(&e) => {
                tracing::debug!("no authenticated media; trying the legacy endpoint");
                let legacy = format!("/_matrix/media/v3/download/{tail}");
                self.download_from(&legacy, max_bytes).await
            }
            other => other,
        }
    }

    async fn download_from(&self, path: &str, max_bytes: u64) -> Result<Downloaded, MediaError> {
        let transport = |e: reqwest::Error| MatrixError::Transport(e.without_url().to_string());
        let mut response = self
            .http
            .get(format!("{}{}", self.base_url, path))
            .bearer_auth(&self.as_token)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let value: Value = response.json().await.unwrap_or(Value::Null);
            return Err(MatrixError::Http {
                status,
                errcode: value["errcode"].as_str().unwrap_or("").to_string(),
                error: value["error"].as_str().unwrap_or("").to_string(),
            }
            .into());
        }
        if response.content_length().is_some_and(|n| n > max_bytes) {
            return Err(MediaError::TooLarge(max_bytes));
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        // The declared length may be absent or wrong: count what actually arrives.
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if (bytes.len() + chunk.len()) as u64 > max_bytes {
                return Err(MediaError::TooLarge(max_bytes));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Downloaded {
            content_type,
            bytes,
        })
    }

    /// Fetches one event (recovering a claim whose worker died; a reply chain's links).
    pub async fn event(&self, room_id: &str, event_id: &str) -> Result<Value, MatrixError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/event/{}",
            enc(room_id),
            enc(event_id)
        );
        let event = self.call(reqwest::Method::GET, &path, None).await?;
        let mut one = [event];
        self.decrypt_all(room_id, &mut one).await;
        let [event] = one;
        Ok(event)
    }

    /// One state event's content; `None` when the room has none of that type and key.
    pub async fn state_event(
        &self,
        room_id: &str,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<Value>, MatrixError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/state/{}/{}",
            enc(room_id),
            enc(event_type),
            enc(state_key)
        );
        match self.call(reqwest::Method::GET, &path, None).await {
            Ok(content) => Ok(Some(content)),
            Err(e) if e.errcode() == Some("M_NOT_FOUND") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether the room has `m.room.encryption` in its state.
    async fn is_encrypted(&self, room_id: &str) -> Result<bool, MatrixError> {
        Ok(self
            .state_event(room_id, "m.room.encryption", "")
            .await?
            .is_some())
    }

    /// Creates the bot user's device `device_id` as the appservice (MSC4190: no login, no
    /// interactive auth); an existing device is kept.
    pub async fn create_device(&self, device_id: &str, name: &str) -> Result<(), MatrixError> {
        let path = format!("/_matrix/client/v3/devices/{}", enc(device_id));
        self.call(
            reqwest::Method::PUT,
            &path,
            Some(&json!({ "display_name": name })),
        )
        .await
        .map(|_| ())
    }

    /// Deletes the bot user's device `device_id` as the appservice (MSC4190: no interactive
    /// auth); a device already gone counts as deleted.
    pub async fn delete_device(&self, device_id: &str) -> Result<(), MatrixError> {
        let path = format!("/_matrix/client/v3/devices/{}", enc(device_id));
        match self.call(reqwest::Method::DELETE, &path, None).await {
            Err(e) if e.errcode() == Some("M_NOT_FOUND") => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_txn_ids_are_deterministic_and_distinct() {
        let a = reply_txn_id("$abc:example.org", "reply");
        assert_eq!(a, reply_txn_id("$abc:example.org", "reply"));
        assert_ne!(a, reply_txn_id("$abd:example.org", "reply"));
        assert_ne!(a, reply_txn_id("$abc:example.org", "notice"));
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)));
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(enc("!r:example.org"), "%21r%3Aexample%2Eorg");
        assert_eq!(enc("$ev/ent"), "%24ev%2Fent");
    }
}
