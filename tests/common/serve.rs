//! The real binary's `serve`, run until it exits or answers `/health`: for the start-up
//! refusals (a wrong key, a wrong registration for encryption, a missing passphrase).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_grok-appservice");

/// Writes a registration with `generate-registration` into `dir`.
pub fn generated_registration(dir: &Path) -> PathBuf {
    let reg = dir.join("registration.yaml");
    let out = std::process::Command::new(BIN)
        .args(["generate-registration", "--server-name", "example.org"])
        .args(["--url", "http://127.0.0.1:1", "-o"])
        .arg(&reg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    reg
}

/// Runs `serve` with a config of `registration`, a SQLite database in `dir` and `extra` YAML
/// (more top-level sections), and `env`; returns (exited before serving, stderr + stdout).
pub async fn run_serve(
    dir: &Path,
    registration: &Path,
    extra: &str,
    env: &[(&str, &str)],
) -> (bool, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "homeserver: {{url: 'http://127.0.0.1:9', server_name: example.org}}\n\
             appservice: {{registration: '{}', listen: '127.0.0.1:{port}'}}\n\
             database: {{url: 'sqlite://{}'}}\n{extra}",
            registration.display(),
            dir.join("bot.db").display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "-c"])
        .arg(&config)
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let exited = loop {
        if child.try_wait().unwrap().is_some() {
            break true;
        }
        let health = reqwest::get(format!("http://127.0.0.1:{port}/health")).await;
        if health.is_ok_and(|r| r.status().is_success()) {
            break false;
        }
        if started.elapsed() > Duration::from_secs(60) {
            panic!("serve neither exited nor served within a minute");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    (exited, text)
}
