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

/// Runs the sync loop until `stop`: failures back off (jittered, at most 30 s) and retry.
pub async fn run(crypto: Arc<Crypto>, stop: CancellationToken) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let step = tokio::select! {
            r = crypto.sync_once(LONG_POLL) => r,
            () = stop.cancelled() => return,
        };
        match step {
            Ok(()) => backoff = Duration::from_secs(1),
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "the encryption device's /sync failed; retrying");
                let jitter = rand::random_range(0.75..1.25);
                tokio::select! {
                    () = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                    () = stop.cancelled() => return,
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
