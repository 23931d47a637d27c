//! Which replica runs the crypto machine: the holder of the `crypto` lease in the database.
//! Two machines on one store would fork Olm ratchets and reuse one-time keys, so a replica
//! opens the store only while it holds the lease, renews it every third of its length, and
//! drops the machine the moment a renewal fails. The others answer plaintext claims and leave
//! encrypted ones (queued in the database) to the owner.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::device::{self, DeviceSetup};
use super::{Crypto, CryptoError};
use crate::state::AppState;

/// The lease's name in the `leases` table.
pub const LEASE: &str = "crypto";

/// Takes the lease if it is free and opens the device; `Ok(None)` when another replica owns
/// it.
async fn try_open(state: &AppState) -> Result<Option<Arc<Crypto>>, CryptoError> {
    let lease = state.config.encryption.lease;
    if !state
        .store
        .take_lease(LEASE.into(), state.instance_id.clone(), lease)
        .await?
    {
        return Ok(None);
    }
    let setup = DeviceSetup {
        homeserver_url: &state.config.homeserver.url,
        as_token: &state.registration.as_token,
        user_id: &state.identity.user_id,
        store_path: &state.config.encryption.store_path,
        passphrase: state.config.encryption.passphrase.as_deref().unwrap_or(""),
        store: &state.store,
    };
    let opened = device::open(setup).await;
    if opened.is_err() {
        let _ = release_lease(state).await;
    }
    opened.map(Some)
}

/// Runs for the life of the process: owns the machine while it holds the lease, otherwise
/// tries to take the lease every third of its length.
pub async fn run(state: Arc<AppState>) {
    let every = state.config.encryption.lease / 3;
    while state.accepting.load(Ordering::SeqCst) {
        let crypto = match try_open(&state).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot open the encryption device; encrypted rooms wait");
                None
            }
        };
        if let Some(crypto) = crypto {
            tracing::info!(
                device_id = crypto.device_id(),
                "this replica owns the encryption device"
            );
            own(&state, crypto).await;
            state.matrix.set_crypto(None);
        }
        tokio::time::sleep(every).await;
    }
}

/// Installs the machine, runs its sync loop and renews the lease until the lease is lost or
/// shutdown's [`release`] takes the machine away. Shutdown alone keeps it: answers finishing
/// in the grace period still encrypt.
async fn own(state: &Arc<AppState>, crypto: Arc<Crypto>) {
    let lease = state.config.encryption.lease;
    let every = lease / 3;
    state.matrix.set_crypto(Some(crypto.clone()));
    // Encrypted claims queued while nobody owned the machine are taken at the next sweep.
    state.queued.store(true, Ordering::SeqCst);
    let stop = CancellationToken::new();
    let sync = tokio::spawn(super::sync::run(crypto, stop.clone()));
    let mut confirmed = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        if state.matrix.crypto().is_none() {
            break;
        }
        match state
            .store
            .take_lease(LEASE.into(), state.instance_id.clone(), lease)
            .await
        {
            Ok(true) => confirmed = Instant::now(),
            Ok(false) => {
                tracing::warn!("another replica took the encryption lease; dropping the device");
                break;
            }
            Err(e) => tracing::warn!(error = %e, "could not renew the encryption lease"),
        }
        if state.matrix.crypto().is_none() {
            // Released while renewing: give the renewed lease back too.
            let _ = release_lease(state).await;
            break;
        }
        // Stop before the lease can have run out: another replica may take it then.
        if confirmed.elapsed() + every >= lease {
            tracing::warn!(
                "the encryption lease could not be renewed in time; dropping the device"
            );
            break;
        }
    }
    state.matrix.set_crypto(None);
    stop.cancel();
    let _ = sync.await;
}

/// Drops the machine and gives up the lease (shutdown), so another replica takes over at its
/// next attempt instead of after the lease.
pub async fn release(state: &AppState) {
    if state.matrix.crypto().is_some() {
        state.matrix.set_crypto(None);
        if let Err(e) = release_lease(state).await {
            tracing::warn!(error = %e, "could not release the encryption lease; it expires");
        }
    }
}

async fn release_lease(state: &AppState) -> Result<(), CryptoError> {
    Ok(state
        .store
        .release_lease(LEASE.into(), state.instance_id.clone())
        .await?)
}
