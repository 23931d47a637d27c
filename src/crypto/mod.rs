//! End-to-end encryption: one bot device driven by `matrix-sdk-crypto`'s `OlmMachine`.
//!
//! - [`device`] creates the device once (`PUT /devices`, MSC4190), keeps its id in the
//!   database and its keys in an encrypted SQLite crypto store, and cross-signs it;
//! - [`sync`] long-polls a filtered `/sync` for the device's to-device messages, device-list
//!   changes and one-time-key counts (room events keep arriving by transaction);
//! - [`owner`] holds the database lease that lets exactly one replica run the machine;
//! - this module decrypts events (waiting, bounded, for a room key still on its way) and
//!   encrypts the bot's messages for every device of the room's members (trust on first use).
//!
//! Nothing here logs key material, plaintext or the passphrase.

pub mod device;
pub mod http;
pub mod owner;
pub mod sync;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use matrix_sdk_crypto::types::events::room::encrypted::EncryptedEvent;
use matrix_sdk_crypto::{
    CollectStrategy, DecryptionSettings, EncryptionSettings, MegolmError, OlmMachine,
    TrustRequirement,
};
use matrix_sdk_store_encryption::StoreCipher;
use ruma::events::room::encryption::RoomEncryptionEventContent;
use ruma::events::room::history_visibility::HistoryVisibility;
use ruma::serde::Raw;
use ruma::{OwnedRoomId, OwnedUserId, RoomId};
use serde_json::Value;
use tokio::sync::watch;
use tracing::Instrument;

use crate::matrix::{MatrixClient, MatrixError};
use http::DeviceHttp;

/// A failure of the crypto machine or of one of its requests.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("cannot build the request: {0}")]
    Request(String),
    #[error("homeserver unreachable: {0}")]
    Transport(String),
    #[error("homeserver answered {status}: {message}")]
    Homeserver {
        status: u16,
        /// The Matrix `errcode` of the answer, when it had one.
        errcode: Option<String>,
        message: String,
    },
    #[error("crypto store: {0}")]
    Store(#[from] matrix_sdk_crypto::store::CryptoStoreError),
    #[error("olm: {0}")]
    Olm(#[from] matrix_sdk_crypto::OlmError),
    #[error("megolm: {0}")]
    Megolm(#[from] MegolmError),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot open the crypto store: {0}")]
    Open(String),
    #[error(transparent)]
    Matrix(#[from] MatrixError),
    #[error("the database: {0}")]
    Database(#[from] crate::store::StoreError),
    #[error("invalid id: {0}")]
    Id(String),
    #[error("sealing a stored reply: {0}")]
    Seal(String),
}

impl CryptoError {
    /// Whether the homeserver no longer knows the bot's device (deleted by an admin, or pruned
    /// by `delete_stale_devices_after`): every request as the device fails until a new one
    /// is made.
    pub fn device_gone(&self) -> bool {
        matches!(self, Self::Homeserver { errcode: Some(code), .. } if code == "M_UNKNOWN_DEVICE")
    }
}

/// Why an encrypted event could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Undecryptable {
    /// The room key has not arrived (yet, or ever).
    #[error("the room key is missing")]
    MissingKey,
    /// The event is malformed or its ciphertext does not decrypt.
    #[error("the event cannot be decrypted: {0}")]
    Broken(String),
}

impl Undecryptable {
    /// The stable `result` label of `grok_decrypted_total`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::MissingKey => "missing_key",
            Self::Broken(_) => "broken",
        }
    }
}

/// What the bot knows of a room's encryption, read once from its state.
#[derive(Debug, Clone)]
struct RoomCrypto {
    encryption: Option<RoomEncryptionEventContent>,
    history_visibility: HistoryVisibility,
}

/// The prefix of a sealed stored reply (see [`Crypto::seal`]).
const SEALED: &str = "sealed:v1:";

/// Whether a stored reply is sealed: only the replica that owns the crypto machine reads it.
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(SEALED)
}

/// The bot's device and its crypto machine; owned by one replica at a time.
pub struct Crypto {
    machine: OlmMachine,
    /// Seals what the database keeps of encrypted rooms' replies (the outbox), with a key
    /// kept beside the crypto store under the passphrase.
    sealer: StoreCipher,
    http: DeviceHttp,
    /// The client-server API as the bot (members, state), without encryption of its own.
    matrix: MatrixClient,
    /// Bumped whenever `/sync` brings room keys: waiting decryptions try again.
    keys_arrived: watch::Sender<u64>,
    rooms: Mutex<HashMap<String, RoomCrypto>>,
    /// One key share and encryption at a time: the machine's group sessions are per room and
    /// the bot sends little, so one lock keeps the order of share and send simple.
    sending: tokio::sync::Mutex<()>,
}

fn decryption_settings() -> DecryptionSettings {
    // Trust on first use: the bot reads what any device of a room member sends it.
    DecryptionSettings {
        sender_device_trust_requirement: TrustRequirement::Untrusted,
    }
}

fn room_id(room: &str) -> Result<OwnedRoomId, CryptoError> {
    RoomId::parse(room).map_err(|e| CryptoError::Id(e.to_string()))
}

impl Crypto {
    fn new(
        machine: OlmMachine,
        sealer: StoreCipher,
        http: DeviceHttp,
        matrix: MatrixClient,
    ) -> Self {
        Self {
            machine,
            sealer,
            http,
            matrix,
            keys_arrived: watch::channel(0).0,
            rooms: Mutex::new(HashMap::new()),
            sending: tokio::sync::Mutex::new(()),
        }
    }

    /// The device id the bot sends with.
    pub fn device_id(&self) -> &str {
        self.http.device_id.as_str()
    }

    /// Encrypts a reply to an encrypted message for the database (the stored outbox), so
    /// that it holds no plaintext of encrypted rooms.
    pub fn seal(&self, plain: &str) -> Result<String, CryptoError> {
        let sealed = self
            .sealer
            .encrypt_value_base64_data(plain.as_bytes().to_vec())
            .map_err(|e| CryptoError::Seal(e.to_string()))?;
        Ok(format!("{SEALED}{}", serde_json::to_string(&sealed)?))
    }

    /// The plaintext of a [`Crypto::seal`]ed reply.
    pub fn unseal(&self, stored: &str) -> Result<String, CryptoError> {
        let sealed = stored
            .strip_prefix(SEALED)
            .ok_or_else(|| CryptoError::Seal("not a sealed value".into()))?;
        let plain = self
            .sealer
            .decrypt_value_base64_data(serde_json::from_str(sealed)?)
            .map_err(|e| CryptoError::Seal(e.to_string()))?;
        String::from_utf8(plain).map_err(|e| CryptoError::Seal(e.to_string()))
    }

    /// Decrypts an `m.room.encrypted` event once: the event as the room would show it in
    /// plaintext (type and content replaced, ids and sender kept).
    pub async fn decrypt(&self, room: &str, event: &Value) -> Result<Value, Undecryptable> {
        let broken = |e: &dyn std::fmt::Display| Undecryptable::Broken(e.to_string());
        let room_id = room_id(room).map_err(|e| broken(&e))?;
        let mut outer = event.clone();
        if outer.get("room_id").is_none() {
            outer["room_id"] = Value::String(room.to_string());
        }
        let raw: Raw<EncryptedEvent> =
            Raw::from_json(serde_json::value::to_raw_value(&outer).map_err(|e| broken(&e))?);
        // A span of its own without fields: the machine records the event's ids into the
        // current span, which would otherwise be the worker's (once per retry).
        let settings = decryption_settings();
        let decrypting = self
            .machine
            .decrypt_room_event(&raw, &room_id, &settings)
            .instrument(tracing::info_span!("decrypt"));
        let decrypted = match decrypting.await {
            Ok(d) => d,
            Err(MegolmError::MissingRoomKey(_)) => return Err(Undecryptable::MissingKey),
            Err(e) => return Err(broken(&e)),
        };
        let inner: Value = serde_json::from_str(decrypted.event.json().get())
            .map_err(|e| Undecryptable::Broken(e.to_string()))?;
        Ok(merge_decrypted(outer, inner))
    }

    /// Decrypts an event, waiting up to `patience` for its room key to arrive by `/sync`.
    pub async fn decrypt_waiting(
        &self,
        room: &str,
        event: &Value,
        patience: Duration,
    ) -> Result<Value, Undecryptable> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut arrived = self.keys_arrived.subscribe();
        loop {
            arrived.mark_unchanged();
            match self.decrypt(room, event).await {
                Err(Undecryptable::MissingKey) => {}
                other => return other,
            }
            // Keys come by /sync; a late key may also come with no signal (another path),
            // so look again every few seconds regardless.
            let wake = deadline.min(tokio::time::Instant::now() + Duration::from_secs(3));
            if tokio::time::Instant::now() >= deadline {
                return Err(Undecryptable::MissingKey);
            }
            let _ = tokio::time::timeout_at(wake, arrived.changed()).await;
        }
    }

    /// Replaces every `m.room.encrypted` event of `events` it can decrypt now by its
    /// plaintext (context, reply chains, recovery); the others stay as they are.
    pub async fn decrypt_all(&self, room: &str, events: &mut [Value]) {
        for event in events {
            if event["type"] == "m.room.encrypted" {
                if let Ok(plain) = self.decrypt(room, event).await {
                    *event = plain;
                }
            }
        }
    }

    /// Whether the room is encrypted (`m.room.encryption` in its state); read once per room:
    /// encryption cannot be turned off again.
    pub async fn is_encrypted(&self, room: &str) -> Result<bool, CryptoError> {
        Ok(self.room(room).await?.encryption.is_some())
    }

    async fn room(&self, room: &str) -> Result<RoomCrypto, CryptoError> {
        if let Some(known) = self.cached_room(room) {
            return Ok(known);
        }
        let encryption = self
            .matrix
            .state_event(room, "m.room.encryption", "")
            .await?
            .map(serde_json::from_value::<RoomEncryptionEventContent>)
            .transpose()?;
        // Only key sharing reads the visibility: a plaintext room's send costs one lookup.
        let history_visibility = match encryption {
            Some(_) => self
                .matrix
                .state_event(room, "m.room.history_visibility", "")
                .await?
                .and_then(|c| {
                    c["history_visibility"]
                        .as_str()
                        .map(HistoryVisibility::from)
                })
                .unwrap_or(HistoryVisibility::Shared),
            None => HistoryVisibility::Shared,
        };
        let known = RoomCrypto {
            encryption,
            history_visibility,
        };
        // Only an encrypted room is remembered for good; a plaintext one may turn on
        // encryption later, so it is read again next time.
        if known.encryption.is_some() {
            self.rooms
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(room.to_string(), known.clone());
        }
        Ok(known)
    }

    fn cached_room(&self, room: &str) -> Option<RoomCrypto> {
        let rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.get(room).cloned()
    }

    /// Forgets a room's encryption settings (an `m.room.encryption` event changed them).
    pub fn forget_room(&self, room: &str) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.remove(room);
    }

    /// Encrypts a message for the room: tracks its members' devices (the invited ones too,
    /// unless the history is for joined members only), opens Olm sessions to the new ones,
    /// shares the room key with every device (trust on first use) and returns the
    /// `m.room.encrypted` content.
    pub async fn encrypt(
        &self,
        room: &str,
        event_type: &str,
        content: &Value,
    ) -> Result<Value, CryptoError> {
        let room_id = room_id(room)?;
        let settings = self.room(room).await?;
        // Unless only joined members may read the history, the invited get the key too (as
        // clients do): they read the bot's messages once they join.
        let invited = settings.history_visibility != HistoryVisibility::Joined;
        let members: Vec<OwnedUserId> = self
            .matrix
            .members(room, invited)
            .await?
            .iter()
            .filter_map(|m| ruma::UserId::parse(m).ok())
            .collect();
        let members: Vec<&ruma::UserId> = members.iter().map(|u| u.as_ref()).collect();
        let _one_at_a_time = self.sending.lock().await;
        send_now(self.machine.update_tracked_users(members.iter().copied())).await?;
        // Key queries for new or changed members first, so their devices are known.
        self.http.flush(&self.machine).await?;
        if let Some((id, claim)) =
            send_now(self.machine.get_missing_sessions(members.iter().copied())).await?
        {
            let response = self.http.send(claim).await?;
            self.machine.mark_request_as_sent(&id, &response).await?;
        }
        let encryption = match settings.encryption {
            Some(e) => {
                EncryptionSettings::new(e, settings.history_visibility, CollectStrategy::AllDevices)
            }
            None => EncryptionSettings::default(),
        };
        let shares = send_now(self.machine.share_room_key(
            &room_id,
            members.iter().copied(),
            encryption,
        ))
        .await?;
        for request in shares {
            self.http
                .to_device(&self.machine, &request.txn_id, &request)
                .await?;
        }
        let raw = Raw::from_json(serde_json::value::to_raw_value(content)?);
        let encrypted = self
            .machine
            .encrypt_room_event_raw(&room_id, event_type, &raw)
            .await?;
        Ok(serde_json::from_str(encrypted.content.json().get())?)
    }

    /// Signals waiting decryptions that room keys arrived.
    fn keys_arrived(&self) {
        self.keys_arrived.send_modify(|n| *n += 1);
    }
}

/// Boxes a machine call that takes an iterator of borrowed user ids, so its `Send` is proven
/// here with concrete lifetimes; unboxed, the compiler cannot prove it for every lifetime
/// (rust-lang/rust#110338) and the answer worker could not be spawned.
fn send_now<'a, T>(
    call: impl std::future::Future<Output = T> + Send + 'a,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>> {
    Box::pin(call)
}

/// The plaintext event shown in place of an encrypted one: its type and content from the
/// decrypted payload, the rest (ids, sender, time, `unsigned`) from the event. A relation
/// sits in the clear (`m.relates_to` of the encrypted content) and is kept when the payload
/// has none.
fn merge_decrypted(mut outer: Value, inner: Value) -> Value {
    let relation = outer["content"].get("m.relates_to").cloned();
    let mut content = inner.get("content").cloned().unwrap_or(Value::Null);
    if !content.is_object() {
        content = Value::Object(Default::default());
    }
    if content.get("m.relates_to").is_none() {
        if let Some(rel) = relation {
            content["m.relates_to"] = rel;
        }
    }
    outer["type"] = inner.get("type").cloned().unwrap_or(Value::Null);
    outer["content"] = content;
    outer
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_plaintext_keeps_ids_and_the_clear_relation() {
        let outer = json!({"event_id": "$e", "sender": "@a:x", "room_id": "!r:x",
            "origin_server_ts": 5, "type": "m.room.encrypted",
            "content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "..",
                        "m.relates_to": {"m.in_reply_to": {"event_id": "$q"}}}});
        let inner = json!({"type": "m.room.message", "room_id": "!r:x",
            "content": {"msgtype": "m.text", "body": "hi"}});
        let plain = merge_decrypted(outer.clone(), inner);
        assert_eq!(plain["type"], "m.room.message");
        assert_eq!(plain["event_id"], "$e");
        assert_eq!(plain["sender"], "@a:x");
        assert_eq!(plain["content"]["body"], "hi");
        assert_eq!(
            plain["content"]["m.relates_to"]["m.in_reply_to"]["event_id"],
            "$q"
        );
        assert!(plain["content"].get("ciphertext").is_none());
        // The payload's own relation wins over the clear one.
        let inner = json!({"type": "m.room.message",
            "content": {"body": "edit", "m.relates_to": {"rel_type": "m.replace", "event_id": "$o"}}});
        let plain = merge_decrypted(outer, inner);
        assert_eq!(plain["content"]["m.relates_to"]["rel_type"], "m.replace");
    }

    #[tokio::test]
    async fn a_sealed_reply_holds_no_plaintext_and_opens_with_its_key_only() {
        let user = ruma::user_id!("@grok:example.org");
        let device = ruma::device_id!("BOTDEVICE");
        let crypto = |sealer| {
            let http = DeviceHttp::new(
                "http://127.0.0.1:9",
                "t",
                user.to_owned(),
                device.to_owned(),
            );
            let matrix = MatrixClient::new("http://127.0.0.1:9", "t", user.as_str());
            async move { Crypto::new(OlmMachine::new(user, device).await, sealer, http, matrix) }
        };
        let ours = crypto(StoreCipher::new().unwrap()).await;
        let reply = r#"{"parts":[{"body":"the capital of Peru is Lima"}]}"#;
        let sealed = ours.seal(reply).unwrap();
        assert!(is_sealed(&sealed) && !is_sealed(reply));
        assert!(
            !sealed.contains("Peru") && !sealed.contains("Lima"),
            "{sealed}"
        );
        assert_eq!(ours.unseal(&sealed).unwrap(), reply);
        let other = crypto(StoreCipher::new().unwrap()).await;
        assert!(other.unseal(&sealed).is_err(), "another key cannot open it");
        assert!(ours.unseal(reply).is_err(), "plain text is not sealed");
    }

    #[tokio::test]
    async fn a_missing_key_is_waited_for_then_given_up() {
        let user = ruma::user_id!("@grok:example.org");
        let machine = OlmMachine::new(user, ruma::device_id!("BOTDEVICE")).await;
        let http = DeviceHttp::new(
            "http://127.0.0.1:9",
            "token",
            user.to_owned(),
            ruma::device_id!("BOTDEVICE").to_owned(),
        );
        let matrix = MatrixClient::new("http://127.0.0.1:9", "token", user.as_str());
        let sealer = StoreCipher::new().unwrap();
        let crypto = std::sync::Arc::new(Crypto::new(machine, sealer, http, matrix));
        // A real Megolm message of a session nobody shared with the bot.
        let mut session =
            matrix_sdk_crypto::vodozemac::megolm::GroupSession::new(Default::default());
        let ciphertext = session.encrypt(r#"{"type":"m.room.message","content":{}}"#);
        let sender_key = matrix_sdk_crypto::vodozemac::Curve25519PublicKey::from_bytes([7; 32]);
        let event = json!({"event_id": "$e:x", "sender": "@a:example.org",
            "origin_server_ts": 1, "type": "m.room.encrypted",
            "content": {"algorithm": "m.megolm.v1.aes-sha2",
                "ciphertext": ciphertext.to_base64(),
                "device_id": "ALICE", "sender_key": sender_key.to_base64(),
                "session_id": session.session_id()}});
        assert_eq!(
            crypto.decrypt("!r:example.org", &event).await,
            Err(Undecryptable::MissingKey)
        );
        // A signal that keys arrived makes the waiter look again at once; still missing, it
        // gives up when its patience runs out, not before.
        let waiter = {
            let crypto = crypto.clone();
            let event = event.clone();
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let r = crypto
                    .decrypt_waiting("!r:example.org", &event, Duration::from_millis(700))
                    .await;
                (r, started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        crypto.keys_arrived();
        let (result, waited) = waiter.await.unwrap();
        assert_eq!(result, Err(Undecryptable::MissingKey));
        assert!(waited >= Duration::from_millis(700), "{waited:?}");
        assert!(matches!(
            crypto
                .decrypt(
                    "!r:example.org",
                    &json!({"type": "m.room.encrypted", "content": {}})
                )
                .await,
            Err(Undecryptable::Broken(_))
        ));
    }
}
