//! The bot's encryption device: created once as the appservice (`PUT /devices/{id}`,
//! MSC4190), its id kept in the database and its keys in the passphrase-encrypted crypto
//! store, its keys uploaded and cross-signed. On every start the homeserver's copy of the
//! device keys is compared with the store's: a lost or replaced store gets a new device.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use matrix_sdk_crypto::store::CryptoStore;
use matrix_sdk_crypto::{CrossSigningKeyExport, OlmMachine};
use matrix_sdk_sqlite::{OpenStoreError, SqliteCryptoStore};
use matrix_sdk_store_encryption::StoreCipher;
use ruma::api::client::keys::get_keys;
use ruma::{OwnedDeviceId, OwnedUserId, UserId};

use super::http::DeviceHttp;
use super::{Crypto, CryptoError};
use crate::matrix::MatrixClient;
use crate::store::Store;

/// The display name of the bot's device in clients' device lists.
const DEVICE_NAME: &str = "grok-appservice";

/// What `open` needs to find or make the device.
pub struct DeviceSetup<'a> {
    pub homeserver_url: &'a str,
    pub as_token: &'a str,
    pub user_id: &'a str,
    pub store_path: &'a Path,
    pub passphrase: &'a str,
    pub store: &'a Store,
}

/// Opens the crypto store and the device it belongs to, making a new device when there is
/// none or the homeserver no longer has this one's keys; uploads keys and cross-signs.
pub async fn open(setup: DeviceSetup<'_>) -> Result<Arc<Crypto>, CryptoError> {
    let user: OwnedUserId =
        UserId::parse(setup.user_id).map_err(|e| CryptoError::Id(e.to_string()))?;
    let matrix = MatrixClient::new(setup.homeserver_url, setup.as_token, setup.user_id);
    let known = setup.store.crypto_device(setup.user_id.to_string()).await?;
    let sqlite = open_store(setup.store_path, setup.passphrase).await?;
    let account_device = sqlite
        .load_account()
        .await
        .map_err(|e| CryptoError::Open(e.to_string()))?
        .map(|a| a.device_id().to_owned());
    match (known, account_device.clone()) {
        (Some(known), Some(device)) if known == device.as_str() => {
            let machine = OlmMachine::with_store(&user, &device, sqlite, None).await?;
            let sealer = load_sealer(setup.store_path, setup.passphrase).await?;
            let http = DeviceHttp::new(
                setup.homeserver_url,
                setup.as_token,
                user.clone(),
                device.clone(),
            );
            let on_server = device_on_server(&http, &machine).await?;
            if on_server != OnServer::Missing {
                tracing::info!(device_id = %device, "encryption device reused");
                // An earlier start may have stopped between making the device and signing it.
                let sign = on_server == OnServer::Unsigned;
                return finish(Crypto::new(machine, sealer, http, matrix), sign).await;
            }
            tracing::warn!(device_id = %device, "the homeserver no longer has this device's keys (deleted, pruned as stale, or the store is from elsewhere); creating a new device");
            // The bot's identity survives its device: the new device is signed by the same
            // cross-signing keys, so clients that trusted the bot keep trusting it.
            let identity = machine.export_cross_signing_keys().await?;
            drop(machine);
            retire(&matrix, &known).await;
            let sqlite = fresh_store(setup.store_path, setup.passphrase).await?;
            return create(&setup, &matrix, &user, sqlite, identity).await;
        }
        (Some(known), None) => {
            tracing::warn!(
                old_device_id = %known,
                "the crypto store is empty but device {known} was created before: the store \
                 was lost; creating a new device (messages encrypted for the old one stay \
                 unreadable)"
            );
            retire(&matrix, &known).await;
        }
        (known, Some(device)) => {
            tracing::warn!(
                store_device_id = %device,
                recorded = ?known,
                "the crypto store belongs to another device than the database records; creating a new device"
            );
            if let Some(known) = known {
                retire(&matrix, &known).await;
            }
        }
        (None, None) => tracing::info!("creating the encryption device"),
    }
    // A store without an account is empty and serves as it is; one with another device's
    // account is moved aside.
    let sqlite = match account_device {
        None => sqlite,
        Some(_) => fresh_store(setup.store_path, setup.passphrase).await?,
    };
    create(&setup, &matrix, &user, sqlite, None).await
}

/// Deletes a device whose keys are lost, so that users' clients stop listing (and warning
/// about) a bot session nobody can use; a failure only costs that warning.
async fn retire(matrix: &MatrixClient, device_id: &str) {
    match matrix.delete_device(device_id).await {
        Ok(()) => tracing::info!(device_id, "the old encryption device was deleted"),
        Err(e) => {
            tracing::warn!(device_id, error = %e, "could not delete the old encryption device")
        }
    }
}

/// Creates a new device on the homeserver, records it and opens its machine on `sqlite`;
/// cross-signs it with `identity` when the bot's cross-signing keys survived, else with a new
/// identity.
async fn create(
    setup: &DeviceSetup<'_>,
    matrix: &MatrixClient,
    user: &OwnedUserId,
    sqlite: SqliteCryptoStore,
    identity: Option<CrossSigningKeyExport>,
) -> Result<Arc<Crypto>, CryptoError> {
    let device: OwnedDeviceId = new_device_id().into();
    matrix.create_device(device.as_str(), DEVICE_NAME).await?;
    setup
        .store
        .set_crypto_device(setup.user_id.to_string(), device.to_string())
        .await?;
    let machine = OlmMachine::with_store(user, &device, sqlite, None).await?;
    tracing::info!(device_id = %device, "encryption device created");
    let sealer = load_sealer(setup.store_path, setup.passphrase).await?;
    let http = DeviceHttp::new(setup.homeserver_url, setup.as_token, user.clone(), device);
    let crypto = Crypto::new(machine, sealer, http, matrix.clone());
    if let Some(keys) = identity {
        keep_identity(&crypto, keys).await?;
    }
    finish(crypto, true).await
}

/// Imports the bot's surviving cross-signing keys into a new device's machine. When the
/// homeserver's published identity does not match them, nothing is imported and [`finish`]
/// makes a new identity.
async fn keep_identity(crypto: &Crypto, keys: CrossSigningKeyExport) -> Result<(), CryptoError> {
    // The import checks the keys against the published identity, which a key query fetches.
    let own = crypto.machine.user_id().to_owned();
    super::send_now(crypto.machine.update_tracked_users([own.as_ref()])).await?;
    crypto.http.flush(&crypto.machine).await?;
    if let Err(e) = crypto.machine.import_cross_signing_keys(keys).await {
        tracing::warn!(error = %e, "the bot's cross-signing keys could not be kept; making a new identity");
    }
    Ok(())
}

/// Uploads what the machine has queued (device and one-time keys) and makes sure the device
/// is cross-signed by the bot's own identity: a new identity when the store has none (first
/// start, a lost store), else, when `sign_device`, this device signed by the existing one.
async fn finish(crypto: Crypto, sign_device: bool) -> Result<Arc<Crypto>, CryptoError> {
    crypto.http.flush(&crypto.machine).await?;
    let status = crypto.machine.cross_signing_status().await;
    let complete = status.has_master && status.has_self_signing && status.has_user_signing;
    if complete && !sign_device {
        return Ok(Arc::new(crypto));
    }
    // Bootstrap makes the identity if there is none, and signs this device either way.
    let requests = crypto.machine.bootstrap_cross_signing(false).await?;
    if let Some(upload) = &requests.upload_keys_req {
        crypto.http.execute(&crypto.machine, upload).await?;
    }
    // Bootstrap keeps a new identity in the store before it is uploaded, so "complete" does
    // not mean "published": what the homeserver has decides. An identity it has already is
    // not sent again (Synapse refuses the re-upload of one it holds: M_INVALID_SIGNATURE).
    let ours = first_key(serde_json::to_value(
        &requests.upload_signing_keys_req.master_key,
    )?);
    if ours.is_some() && ours != published_master_key(&crypto.http).await? {
        crypto
            .http
            .upload_signing_keys(requests.upload_signing_keys_req)
            .await?;
        tracing::info!("the bot's cross-signing identity was published");
    }
    let signed = crypto.http.send(requests.upload_signatures_req).await?;
    if !signed.failures.is_empty() {
        return Err(CryptoError::Homeserver {
            status: 200,
            errcode: None,
            message: format!(
                "the device's cross-signing signature was refused: {:?}",
                signed.failures
            ),
        });
    }
    tracing::info!("encryption device cross-signed");
    Ok(Arc::new(crypto))
}

/// The bot's master key as the homeserver publishes it, if any.
async fn published_master_key(http: &DeviceHttp) -> Result<Option<String>, CryptoError> {
    let mut query = get_keys::v3::Request::new();
    query.device_keys.insert(http.user_id.clone(), Vec::new());
    let response = http.send(query).await?;
    Ok(match response.master_keys.get(&http.user_id) {
        Some(key) => first_key(serde_json::from_str(key.json().get())?),
        None => None,
    })
}

/// The (only) public key of a cross-signing key object: `keys` holds one `ed25519:` entry.
fn first_key(cross_signing_key: serde_json::Value) -> Option<String> {
    cross_signing_key["keys"]
        .as_object()?
        .values()
        .next()?
        .as_str()
        .map(str::to_string)
}

/// What the homeserver holds of the bot's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnServer {
    /// Not the device, or not with the store's identity key.
    Missing,
    /// The device's keys, signed by the device only.
    Unsigned,
    /// The device's keys, signed by the bot's self-signing key too.
    CrossSigned,
}

/// Whether the homeserver holds this device with the store's identity key, and cross-signed.
async fn device_on_server(
    http: &DeviceHttp,
    machine: &OlmMachine,
) -> Result<OnServer, CryptoError> {
    let mut query = get_keys::v3::Request::new();
    query
        .device_keys
        .insert(http.user_id.clone(), vec![http.device_id.clone()]);
    // Asked as the device itself: a deleted device is refused outright (M_UNKNOWN_DEVICE).
    let response = match http.send(query).await {
        Err(e) if e.device_gone() => return Ok(OnServer::Missing),
        other => other?,
    };
    let Some(keys) = response
        .device_keys
        .get(&http.user_id)
        .and_then(|devices| devices.get(&http.device_id))
    else {
        return Ok(OnServer::Missing);
    };
    let keys: serde_json::Value = serde_json::from_str(keys.json().get())?;
    let own_key = format!("ed25519:{}", http.device_id);
    let ours = machine.identity_keys().ed25519.to_base64();
    if keys["keys"][&own_key] != ours.as_str() {
        return Ok(OnServer::Missing);
    }
    let signed_by_others = keys["signatures"][http.user_id.as_str()]
        .as_object()
        .is_some_and(|sigs| sigs.keys().any(|k| *k != own_key));
    Ok(if signed_by_others {
        OnServer::CrossSigned
    } else {
        OnServer::Unsigned
    })
}

/// Opens the store once and closes it: a wrong passphrase or an unreadable store is found at
/// start, before the replica serves.
pub async fn check_store(path: &Path, passphrase: &str) -> Result<(), CryptoError> {
    open_store(path, passphrase).await.map(drop)
}

/// Opens (and on first use creates) the store while holding its lock file: replicas sharing
/// the store's volume would otherwise run its migrations, or make its cipher, at once, and a
/// store whose cipher two processes wrote cannot be read again.
async fn open_store(path: &Path, passphrase: &str) -> Result<SqliteCryptoStore, CryptoError> {
    create_private_dir(path)?;
    let _lock = lock_store(path).await?;
    SqliteCryptoStore::open(path, Some(passphrase))
        .await
        .map_err(|e| match e {
            OpenStoreError::InitCipher(_) => CryptoError::Open(format!(
                "{e} (is GROK_CRYPTO_PASSPHRASE the one the store was made with?)"
            )),
            other => CryptoError::Open(other.to_string()),
        })
}

/// The key that seals stored replies of encrypted rooms: `<store>.outbox-key` beside the
/// store (beside, so that a replaced store leaves it in place), made on first use and kept
/// encrypted with the passphrase. Only the lease holder calls this, so one process makes it.
async fn load_sealer(path: &Path, passphrase: &str) -> Result<StoreCipher, CryptoError> {
    let file = sibling(path, ".outbox-key");
    let passphrase = passphrase.to_string();
    let open = |e: &dyn std::fmt::Display| CryptoError::Open(format!("{}: {e}", file.display()));
    // The passphrase's key derivation is a moment of CPU: off the async workers.
    let loaded = tokio::task::spawn_blocking({
        let file = file.clone();
        move || match std::fs::read(&file) {
            Ok(bytes) => StoreCipher::import(&passphrase, &bytes)
                .map_err(|e| format!("{e} (is GROK_CRYPTO_PASSPHRASE the one it was made with?)")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let cipher = StoreCipher::new().map_err(|e| e.to_string())?;
                let exported = cipher.export(&passphrase).map_err(|e| e.to_string())?;
                write_private(&file, &exported).map_err(|e| e.to_string())?;
                Ok(cipher)
            }
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .map_err(|e| open(&e))?;
    loaded.map_err(|e| open(&e))
}

/// Writes a new file readable by its owner only, whole or not at all (a temporary beside it,
/// then renamed).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let temporary = sibling(path, ".new");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

/// Takes the exclusive lock on `<store>.lock` beside the store (beside, so a store moved
/// aside does not take its lock along); released when the file is dropped.
async fn lock_store(path: &Path) -> Result<std::fs::File, CryptoError> {
    let lock = lock_path(path);
    let taken = tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)?;
        file.lock()?;
        Ok::<_, std::io::Error>(file)
    })
    .await
    .map_err(|e| CryptoError::Open(format!("the store lock task failed: {e}")))?;
    taken.map_err(|e| CryptoError::Open(format!("cannot lock {}: {e}", lock_path(path).display())))
}

fn lock_path(path: &Path) -> PathBuf {
    sibling(path, ".lock")
}

/// Moves an unusable store aside (never deletes key material) and opens an empty one.
async fn fresh_store(path: &Path, passphrase: &str) -> Result<SqliteCryptoStore, CryptoError> {
    if path.exists() && std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_some()) {
        let aside = aside_path(path);
        std::fs::rename(path, &aside)
            .map_err(|e| CryptoError::Open(format!("cannot move {} aside: {e}", path.display())))?;
        tracing::warn!(path = %aside.display(), "the old crypto store was moved aside");
    }
    open_store(path, passphrase).await
}

fn aside_path(path: &Path) -> PathBuf {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S");
    sibling(path, &format!(".replaced-{stamp}"))
}

/// `path` with `suffix` appended to its last component.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn create_private_dir(path: &Path) -> Result<(), CryptoError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(path)
        .map_err(|e| CryptoError::Open(format!("cannot create {}: {e}", path.display())))
}

/// A fresh device id: ten random capital letters, as clients make them.
fn new_device_id() -> String {
    (0..10)
        .map(|_| char::from(b'A' + rand::random_range(0..26u8)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_look_like_clients_ones() {
        let a = new_device_id();
        assert_eq!(a.len(), 10);
        assert!(a.chars().all(|c| c.is_ascii_uppercase()));
        assert_ne!(a, new_device_id());
    }

    #[test]
    fn a_cross_signing_key_is_read_by_its_one_public_key() {
        let master = serde_json::json!({"user_id": "@grok:example.org", "usage": ["master"],
            "keys": {"ed25519:AbC": "AbC"}, "signatures": {}});
        assert_eq!(first_key(master).as_deref(), Some("AbC"));
        assert_eq!(first_key(serde_json::Value::Null), None);
        assert_eq!(first_key(serde_json::json!({"keys": {}})), None);
    }

    #[test]
    fn a_replaced_store_is_kept_beside_the_new_one() {
        let aside = aside_path(Path::new("/var/lib/grok/crypto-store"));
        assert_eq!(aside.parent(), Some(Path::new("/var/lib/grok")));
        assert!(aside
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("crypto-store.replaced-"));
    }

    /// The sealing key is made once beside the store, readable by its owner only, and read
    /// back on the next open with the same passphrase; another passphrase is refused by name.
    #[tokio::test]
    async fn the_outbox_key_outlives_the_process_and_needs_the_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("crypto-store");
        let first = load_sealer(&store, "correct horse").await.unwrap();
        let key = dir.path().join("crypto-store.outbox-key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let sealed = first
            .encrypt_value_base64_data(b"a reply".to_vec())
            .unwrap();
        let again = load_sealer(&store, "correct horse").await.unwrap();
        assert_eq!(again.decrypt_value_base64_data(sealed).unwrap(), b"a reply");
        let wrong = load_sealer(&store, "battery staple").await.err().unwrap();
        assert!(
            wrong.to_string().contains("GROK_CRYPTO_PASSPHRASE"),
            "{wrong}"
        );
    }

    /// Replicas starting together on an empty shared store: each open waits for the lock, so
    /// one creates the store and the others open what it made.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_opening_an_empty_store_together_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("crypto-store");
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { check_store(&store, "correct horse").await })
            })
            .collect();
        for open in opens {
            open.await.unwrap().expect("every concurrent open succeeds");
        }
        check_store(&store, "correct horse")
            .await
            .expect("the store opens again");
        let wrong = check_store(&store, "wrong").await.unwrap_err().to_string();
        assert!(wrong.contains("GROK_CRYPTO_PASSPHRASE"), "{wrong}");
        assert!(dir.path().join("crypto-store.lock").exists());
    }
}
