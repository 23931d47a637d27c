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
use super::sync::SyncEnd;
use super::{Crypto, CryptoError};
use crate::state::AppState;

/// The lease's name in the `leases` table.
pub const LEASE: &str = "crypto";

/// Runs for the life of the process: tries to take the lease every third of its length and,
/// while it holds it, opens the device and runs the machine.
pub async fn run(state: Arc<AppState>) {
    let every = state.config.encryption.lease / 3;
    while state.accepting.load(Ordering::SeqCst) {
        match state
            .store
            .take_lease(
                LEASE.into(),
                state.instance_id.clone(),
                state.config.encryption.lease,
            )
            .await
        {
            Ok(true) => hold(&state).await,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not take the encryption lease"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Holds the lease just taken: renews it in the background from this moment (opening a new
/// device can outlast the lease), opens the device, serves it until the lease is lost or
/// shutdown releases it, then gives the lease back. A device the homeserver forgot while it
/// served is replaced at once, still under the lease.
async fn hold(state: &Arc<AppState>) {
    let lost = CancellationToken::new();
    let keeper = tokio::spawn(keep(state.clone(), lost.clone()));
    loop {
        let setup = DeviceSetup {
            homeserver_url: &state.config.homeserver.url,
            as_token: &state.registration.as_token,
            user_id: &state.identity.user_id,
            store_path: &state.config.encryption.store_path,
            passphrase: state.config.encryption.passphrase.as_deref().unwrap_or(""),
            store: &state.store,
        };
        // A lease lost mid-open abandons the open: another replica may be opening the store now.
        let opened = tokio::select! {
            opened = device::open(setup) => Some(opened),
            () = lost.cancelled() => None,
        };
        match opened {
            Some(Ok(crypto)) => {
                tracing::info!(
                    device_id = crypto.device_id(),
                    "this replica owns the encryption device"
                );
                if serve(state, crypto, &lost).await == SyncEnd::DeviceGone
                    && state.accepting.load(Ordering::SeqCst)
                {
                    continue;
                }
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "cannot open the encryption device; encrypted rooms wait")
            }
            None => tracing::warn!("the encryption lease was lost while the device opened"),
        }
        break;
    }
    lost.cancel();
    let _ = keeper.await;
    // Only this replica's own lease is deleted: one another replica took stays.
    if let Err(e) = release_lease(state).await {
        tracing::warn!(error = %e, "could not release the encryption lease; it expires");
    }
}

/// Renews the lease every third of its length until `lost` is cancelled; cancels it itself
/// when another replica holds the lease or a renewal has failed for so long that the lease
/// could run out before the next.
async fn keep(state: Arc<AppState>, lost: CancellationToken) {
    let lease = state.config.encryption.lease;
    let every = lease / 3;
    let mut confirmed = Instant::now();
    loop {
        tokio::select! {
            () = lost.cancelled() => return,
            () = tokio::time::sleep(every) => {}
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
        if confirmed.elapsed() + every >= lease {
            tracing::warn!(
                "the encryption lease could not be renewed in time; dropping the device"
            );
            break;
        }
    }
    lost.cancel();
}

/// Installs the machine and runs its sync loop until the lease is lost, shutdown's
/// [`release`] takes the machine away, or the homeserver forgets the device (`DeviceGone`).
/// Shutdown alone keeps it: answers finishing in the grace period still encrypt.
async fn serve(state: &AppState, crypto: Arc<Crypto>, lost: &CancellationToken) -> SyncEnd {
    let every = state.config.encryption.lease / 3;
    state.matrix.set_crypto(Some(crypto.clone()));
    // Encrypted claims queued while nobody owned the machine are taken at the next sweep.
    state.queued.store(true, Ordering::SeqCst);
    let stop = CancellationToken::new();
    let mut sync = tokio::spawn(super::sync::run(crypto, stop.clone()));
    let end = loop {
        tokio::select! {
            () = lost.cancelled() => break SyncEnd::Stopped,
            ended = &mut sync => break ended.unwrap_or(SyncEnd::Stopped),
            () = tokio::time::sleep(every) => {
                if state.matrix.crypto().is_none() {
                    break SyncEnd::Stopped;
                }
            }
        }
    };
    state.matrix.set_crypto(None);
    stop.cancel();
    if !sync.is_finished() {
        let _ = sync.await;
    }
    end
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
