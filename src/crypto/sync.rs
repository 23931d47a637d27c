//! The device's own `/sync`, filtered down to what only `/sync` carries reliably: to-device
//! messages (room keys, Olm session setup), device-list changes and one-time-key counts. Room
//! events keep arriving by appservice transaction. The `since` token lives in the crypto store,
//! saved with the changes it acknowledges, so a crash never skips a room key.

use std::sync::Arc;
use std::time::Duration;

use matrix_sdk_crypto::EncryptionSyncChanges;
use ruma::api::client::filter::FilterDefinition;
use ruma::api::client::sync::sync_events::v3::{Filter, Request};
use ruma::presence::PresenceState;
use tokio_util::sync::CancellationToken;

use super::{decryption_settings, Crypto, CryptoError};

/// How long one `/sync` waits at the homeserver for something new.
const LONG_POLL: Duration = Duration::from_secs(30);

/// Why the sync loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncEnd {
    /// `stop` was cancelled.
    Stopped,
    /// The homeserver no longer knows the device: the machine must be replaced.
    DeviceGone,
}

/// Runs the sync loop until `stop` or until the homeserver no longer knows the device; other
/// failures back off (jittered, at most 30 s) and retry.
pub async fn run(crypto: Arc<Crypto>, stop: CancellationToken) -> SyncEnd {
    let mut backoff = Duration::from_secs(1);
    loop {
        let step = tokio::select! {
            r = crypto.sync_once(LONG_POLL) => r,
            () = stop.cancelled() => return SyncEnd::Stopped,
        };
        match step {
            Ok(()) => backoff = Duration::from_secs(1),
            Err(e) if e.device_gone() => {
                tracing::warn!(
                    device_id = crypto.device_id(),
                    "the homeserver no longer knows the encryption device (deleted, or pruned as \
                     stale); making a new one"
                );
                return SyncEnd::DeviceGone;
            }
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "the encryption device's /sync failed; retrying");
                let jitter = rand::random_range(0.75..1.25);
                tokio::select! {
                    () = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                    () = stop.cancelled() => return SyncEnd::Stopped,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

impl Crypto {
    /// One `/sync` round: feeds the machine, wakes decryptions waiting for keys, sends what
    /// the machine queued in answer (key uploads, queries, Olm messages).
    pub async fn sync_once(&self, long_poll: Duration) -> Result<(), CryptoError> {
        let since = self.machine.store().next_batch_token().await?;
        let mut request = Request::new();
        request.filter = Some(Filter::FilterDefinition(FilterDefinition::ignore_all()));
        // The first sync answers at once: the keys already waiting are needed now.
        request.timeout = since.is_some().then_some(long_poll);
        request.since = since;
        request.set_presence = PresenceState::Offline;
        let response = self.http.send(request).await?;
        let changes = EncryptionSyncChanges {
            to_device_events: response.to_device.events,
            changed_devices: &response.device_lists,
            one_time_keys_counts: &response.device_one_time_keys_count,
            unused_fallback_keys: response.device_unused_fallback_key_types.as_deref(),
            next_batch_token: Some(response.next_batch),
        };
        let (_, room_keys) = self
            .machine
            .receive_sync_changes(changes, &decryption_settings())
            .await?;
        if !room_keys.is_empty() {
            tracing::debug!(keys = room_keys.len(), "room keys arrived");
            self.keys_arrived();
        }
        self.http.flush(&self.machine).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::http::DeviceHttp;
    use crate::matrix::MatrixClient;
    use matrix_sdk_crypto::OlmMachine;

    /// A homeserver that answers every request with `status` and `body`.
    async fn homeserver(status: u16, body: &'static str) -> String {
        let app = axum::Router::new().fallback(move || async move {
            (
                axum::http::StatusCode::from_u16(status).unwrap(),
                [("content-type", "application/json")],
                body,
            )
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    async fn crypto(url: &str) -> Arc<Crypto> {
        let user = ruma::user_id!("@grok:example.org");
        let device = ruma::device_id!("BOTDEVICE");
        let machine = OlmMachine::new(user, device).await;
        let http = DeviceHttp::new(url, "token", user.to_owned(), device.to_owned());
        let matrix = MatrixClient::new(url, "token", user.as_str());
        let sealer = matrix_sdk_store_encryption::StoreCipher::new().unwrap();
        Arc::new(Crypto::new(machine, sealer, http, matrix))
    }

    #[tokio::test]
    async fn a_device_the_homeserver_forgot_ends_the_loop() {
        let url = homeserver(
            400,
            r#"{"errcode":"M_UNKNOWN_DEVICE","error":"Application service trying to use a device that doesn't exist"}"#,
        )
        .await;
        let ended = tokio::time::timeout(
            Duration::from_secs(20),
            run(crypto(&url).await, CancellationToken::new()),
        )
        .await
        .expect("the loop ends by itself");
        assert_eq!(ended, SyncEnd::DeviceGone);
    }

    #[tokio::test]
    async fn other_failures_are_retried_until_stopped() {
        let url = homeserver(400, r#"{"errcode":"M_UNKNOWN","error":"something else"}"#).await;
        let stop = CancellationToken::new();
        let looping = tokio::spawn(run(crypto(&url).await, stop.clone()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!looping.is_finished(), "a passing failure ended the loop");
        stop.cancel();
        assert_eq!(looping.await.unwrap(), SyncEnd::Stopped);
    }
}
