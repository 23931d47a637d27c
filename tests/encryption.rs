//! `serve` with `encryption.enabled`: the start-up refusals that name their fix (a registration
//! whose sender_localpart is the bot user, a missing or wrong passphrase), with the real binary.
//! The encrypted conversation itself is `tests/e2e/encryption.py` (a real Synapse and real
//! E2EE clients).

mod common;

use common::serve::{generated_registration, run_serve};

const NO_XAI_CHECK: &str = "provider: {check_at_start: false}\n";

fn encryption(store: &std::path::Path) -> String {
    format!(
        "{NO_XAI_CHECK}encryption: {{enabled: true, store_path: '{}'}}\n",
        store.display()
    )
}

/// A registration as written before the random sender_localpart: the bot is the sender.
fn old_registration(dir: &std::path::Path) -> std::path::PathBuf {
    let path = generated_registration(dir);
    let text = std::fs::read_to_string(&path).unwrap();
    let sender = text
        .lines()
        .find_map(|l| l.strip_prefix("sender_localpart: "))
        .unwrap()
        .to_string();
    assert_ne!(
        sender, "grok",
        "generate-registration writes a random sender"
    );
    std::fs::write(
        &path,
        text.replace(
            &format!("sender_localpart: {sender}"),
            "sender_localpart: grok",
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_registration_serves_without_encryption_and_is_refused_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let reg = old_registration(dir.path());
    let (exited, out) = run_serve(dir.path(), &reg, NO_XAI_CHECK, &[]).await;
    assert!(
        !exited,
        "without encryption the old registration serves: {out}"
    );
    assert!(out.contains("@grok:example.org"), "{out}");

    let store = dir.path().join("crypto");
    let env = [("GROK_CRYPTO_PASSPHRASE", "a long secret passphrase")];
    let (exited, out) = run_serve(dir.path(), &reg, &encryption(&store), &env).await;
    assert!(exited, "with encryption it is refused: {out}");
    assert!(
        out.contains("sender_localpart") && out.contains("generate-registration"),
        "the refusal names the fix: {out}"
    );
    assert!(!store.exists(), "nothing was created before the refusal");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_passphrase_is_required_and_must_open_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let reg = generated_registration(dir.path());
    let store = dir.path().join("crypto");
    let (exited, out) = run_serve(dir.path(), &reg, &encryption(&store), &[]).await;
    assert!(exited, "no passphrase, no start: {out}");
    assert!(out.contains("GROK_CRYPTO_PASSPHRASE"), "{out}");

    let first = "correct horse battery staple";
    let (exited, out) = run_serve(
        dir.path(),
        &reg,
        &encryption(&store),
        &[("GROK_CRYPTO_PASSPHRASE", first)],
    )
    .await;
    assert!(
        !exited,
        "a new store opens (the homeserver is not needed): {out}"
    );
    assert!(store.is_dir(), "the store was created");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&store).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the store directory is the owner's only");
    }

    let wrong = "another passphrase entirely";
    let (exited, out) = run_serve(
        dir.path(),
        &reg,
        &encryption(&store),
        &[("GROK_CRYPTO_PASSPHRASE", wrong)],
    )
    .await;
    assert!(exited, "a wrong passphrase stops the start: {out}");
    assert!(
        out.contains("GROK_CRYPTO_PASSPHRASE") && out.contains("encryption.store_path"),
        "{out}"
    );
    for secret in [first, wrong] {
        assert!(
            !out.contains(secret),
            "the passphrase never reaches the output"
        );
    }
}
