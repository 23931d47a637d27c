//! The fault matrix: each provider fault injected through the real webhook, asserting what the
//! user sees, how many calls xAI got, the `request_log` row and the operator's metric; and the
//! start-up check of the key and the model ids. (Homeserver send faults, a database down
//! during the claim, telemetry and the reservation are in exactly_once.rs, webhook.rs,
//! telemetry.rs and limiter.rs; a broken stream in progress.rs.)

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use common::*;
use grok_appservice::config::ProviderConfig;
use grok_appservice::provider::{AccountCheck, Provider};

const DM: &str = "!dm:example.org";
const QUESTION: &str = "tell me about otters";
const CREDITS: &str =
    "Your team has either used all available credits or reached its monthly spending limit";

async fn dm_harness(tweak: impl FnOnce(&mut grok_appservice::config::Config)) -> Harness {
    let h = Harness::with(db::sqlite(), tweak).await;
    h.known_room(DM, true, &[BOT, ALICE]).await;
    h
}

/// Sends Alice's question and waits for everything to settle; returns what the bot said.
async fn ask(h: &Harness, id: &str) -> String {
    h.put_txn(id, vec![text_event(id, DM, ALICE, QUESTION)])
        .await;
    h.settle().await;
    let sent = h.hs.sent();
    assert_eq!(sent.len(), 1, "exactly one reply: {sent:?}");
    sent[0].body["body"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn failures(h: &Harness, kind: &str) -> u64 {
    h.state
        .metrics
        .get("provider_failures_total", &[("kind", kind)])
}

fn is_apology(text: &str) -> bool {
    text.starts_with("Sorry")
}

#[tokio::test(flavor = "multi_thread")]
async fn account_problems_end_at_the_first_call() {
    // 401 (revoked key), 403 (blocked), 400 about the key, 429 for credits: the user gets the
    // apology, xAI one call (no retry, no fallback, no escalation), the operator the metric.
    let cases = [
        (
            401,
            json!({"error": "Incorrect API key provided"}),
            "api_key",
        ),
        (403, json!({"error": "The team is blocked"}), "api_key"),
        (
            400,
            json!({"code": "Client specified an invalid argument", "error": "Incorrect API key provided: xa***ey."}),
            "api_key",
        ),
        (429, json!({"error": CREDITS}), "credits"),
    ];
    for (status, body, kind) in cases {
        // A short greeting routes to the trivial model, which would escalate on other failures.
        for text in [QUESTION, "hi"] {
            let h = dm_harness(|_| {}).await;
            h.xai.script(status, body.clone());
            h.put_txn("t", vec![text_event("$t", DM, ALICE, text)])
                .await;
            h.settle().await;
            let sent = h.hs.sent();
            let reply = sent[0].body["body"].as_str().unwrap();
            assert!(is_apology(reply), "{status} {text}: {reply}");
            assert!(
                !reply.contains("key") && !reply.contains("credit"),
                "{reply}"
            );
            assert_eq!(h.xai.seen().len(), 1, "{status} {text}: one call only");
            let row = h.row("$t").await;
            assert!(
                !row.ok && row.err.contains(&status.to_string()),
                "{}",
                row.err
            );
            assert_eq!(row.cost_total_ticks, 0, "a refusal is not billed");
            assert_eq!(failures(&h, kind), 1, "{status} {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limit_is_waited_out_for_its_retry_after() {
    let h = dm_harness(|_| {}).await;
    h.xai.script_with_headers(
        429,
        json!({"error": "Too many requests: 61 RPM over the limit of 60"}),
        vec![("retry-after", "1".into())],
    );
    let reply = ask(&h, "$r").await;
    assert!(!is_apology(&reply), "{reply}");
    let seen = h.xai.seen();
    assert_eq!(seen.len(), 2, "one refusal, one retry");
    let waited = seen[1].at.duration_since(seen[0].at);
    assert!(waited >= Duration::from_millis(950), "waited {waited:?}");
    let row = h.row("$r").await;
    assert!(row.ok);
    assert_eq!(row.cost_source, "reported", "a 429 costs nothing extra");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_are_retried_then_fall_back_then_apologise() {
    for status in [500, 503] {
        let h = dm_harness(|_| {}).await;
        // Three attempts of the final model and three of the fallback: all fail.
        for _ in 0..6 {
            h.xai.script(status, json!({"error": "upstream trouble"}));
        }
        let reply = ask(&h, "$s").await;
        assert!(is_apology(&reply), "{reply}");
        assert_eq!(h.xai.seen().len(), 6, "{status}");
        let row = h.row("$s").await;
        assert!(!row.ok && row.fallback_fired);
        // A 5xx may come after the model ran: each attempt is charged at its worst case.
        assert_eq!(row.cost_source, "estimated");
        assert!(row.cost_total_ticks > 0);
        assert_eq!(failures(&h, "server"), 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gone_endpoint_is_not_retried() {
    let h = dm_harness(|_| {}).await;
    h.xai.script(
        410,
        json!({"error": "Live search is deprecated. Please switch to the Agent Tools API"}),
    );
    let reply = ask(&h, "$g").await;
    assert!(is_apology(&reply));
    assert_eq!(h.xai.seen().len(), 1);
    assert_eq!(failures(&h, "gone"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_answer_is_retried_and_charged_at_its_worst_case() {
    let h = dm_harness(|_| {}).await;
    h.xai.script(200, json!("this is not a Responses API body"));
    let reply = ask(&h, "$m").await;
    assert!(!is_apology(&reply), "the retry answers: {reply}");
    assert_eq!(h.xai.seen().len(), 2);
    let row = h.row("$m").await;
    assert!(row.ok);
    assert_eq!(
        row.cost_source, "estimated",
        "the unreadable attempt may be billed"
    );
    assert!(row.cost_total_ticks > FAKE_COST_TICKS);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_is_retried_then_apologised_for() {
    let h = dm_harness(|c| {
        c.provider.timeout_secs = 1;
        c.provider.max_retries = 1;
        c.models.fallback = None;
    })
    .await;
    h.xai.set_delay(Duration::from_secs(3));
    let reply = ask(&h, "$o").await;
    assert!(is_apology(&reply), "{reply}");
    assert_eq!(h.xai.arrived(), 2, "the call and one retry");
    let row = h.row("$o").await;
    assert!(!row.ok);
    assert_eq!(
        row.cost_source, "estimated",
        "a timed-out call may still be billed"
    );
    assert_eq!(failures(&h, "transport"), 1);
}

/// A provider that reads each request and resets the connection: a TCP RST, no answer.
async fn resetting_provider() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                // Linger 0: close sends a reset instead of a clean end.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                drop(stream);
            });
        }
    });
    (format!("http://{addr}/v1"), accepted)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reset_connection_is_retried_then_apologised_for() {
    let (url, accepted) = resetting_provider().await;
    let h = dm_harness(move |c| {
        c.provider.base_url = url;
        c.provider.max_retries = 1;
        c.models.fallback = None;
    })
    .await;
    let reply = ask(&h, "$c").await;
    assert!(is_apology(&reply), "{reply}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "the call and one retry");
    let row = h.row("$c").await;
    assert!(!row.ok);
    assert_eq!(failures(&h, "transport"), 1);
}

/// An xAI stand-in for the start-up check: `/api-key` answers `key_status` with `key_body`;
/// `/models/{id}` knows the ids in `known`.
async fn account_fake(key_status: u16, key_body: Value, known: &'static [&'static str]) -> String {
    let app = Router::new()
        .route(
            "/v1/api-key",
            get(move || async move {
                (
                    StatusCode::from_u16(key_status).unwrap(),
                    Json(key_body.clone()),
                )
            }),
        )
        .route(
            "/v1/models/{id}",
            get(move |Path(id): Path<String>| async move {
                if known.contains(&id.as_str()) {
                    (StatusCode::OK, Json(json!({"id": id, "object": "model"})))
                } else {
                    (
                        StatusCode::NOT_FOUND,
                        Json(json!({"error": format!("The model {id} does not exist")})),
                    )
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}

fn provider(url: &str, key: Option<&str>) -> Provider {
    let config = ProviderConfig {
        base_url: url.into(),
        api_key: key.map(str::to_string),
        ..ProviderConfig::default()
    };
    Provider::new(&config, &Default::default())
}

fn good_key() -> Value {
    json!({"redacted_api_key": "xai-...abcd", "api_key_blocked": false,
           "api_key_disabled": false, "team_blocked": false, "acls": ["api-key:model:*"]})
}

#[tokio::test(flavor = "multi_thread")]
async fn the_start_up_check_names_what_is_wrong() {
    let models = ["grok-4.3", "grok-4.20-non-reasoning"];
    let url = account_fake(200, good_key(), &["grok-4.3", "grok-4.20-non-reasoning"]).await;
    assert_eq!(
        provider(&url, Some("k")).check_account(&models).await,
        AccountCheck::Ok
    );

    let url = account_fake(200, good_key(), &["grok-4.3"]).await;
    assert_eq!(
        provider(&url, Some("k")).check_account(&models).await,
        AccountCheck::UnknownModels(vec!["grok-4.20-non-reasoning".into()])
    );

    let url = account_fake(
        400,
        json!({"error": "Incorrect API key provided: xa***ey."}),
        &[],
    )
    .await;
    let AccountCheck::KeyRefused(why) = provider(&url, Some("k")).check_account(&models).await
    else {
        panic!("a refused key must be named");
    };
    assert!(why.contains("Incorrect API key"), "{why}");

    let mut blocked = good_key();
    blocked["api_key_blocked"] = json!(true);
    let url = account_fake(200, blocked, &["grok-4.3"]).await;
    assert_eq!(
        provider(&url, Some("k")).check_account(&models).await,
        AccountCheck::KeyRefused("the key is blocked".into())
    );

    let url = account_fake(503, json!({"error": "overloaded"}), &[]).await;
    assert!(matches!(
        provider(&url, Some("k")).check_account(&models).await,
        AccountCheck::Unchecked(_)
    ));
    // Nothing listens on port 9 of loopback: unreachable, so unchecked, not refused.
    assert!(matches!(
        provider("http://127.0.0.1:9/v1", Some("k"))
            .check_account(&models)
            .await,
        AccountCheck::Unchecked(_)
    ));
}

/// Runs `serve` against `xai_url` until it exits or has served for a while; returns
/// (exited, stderr + stdout).
async fn run_serve(xai_url: &str, models_final: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let reg = common::serve::generated_registration(dir.path());
    let extra = format!("provider: {{base_url: '{xai_url}'}}\nmodels: {{final: {models_final}}}\n");
    common::serve::run_serve(dir.path(), &reg, &extra, &[("XAI_API_KEY", "xai-test")]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_refuses_a_wrong_key_or_model_and_starts_when_xai_is_unreachable() {
    let url = account_fake(
        400,
        json!({"error": "Incorrect API key provided: xa***st."}),
        &[],
    )
    .await;
    let (exited, out) = run_serve(&url, "grok-4.3").await;
    assert!(exited, "a refused key stops the start: {out}");
    assert!(
        out.contains("XAI_API_KEY") && out.contains("Incorrect API key"),
        "{out}"
    );
    assert!(
        !out.contains("xai-test"),
        "the key itself never reaches the output"
    );

    let all = &["grok-4.3", "grok-4.20-non-reasoning", "grok-4.5"];
    let url = account_fake(200, good_key(), all).await;
    let (exited, out) = run_serve(&url, "grok-4.3-typo").await;
    assert!(exited, "an unknown model stops the start: {out}");
    assert!(
        out.contains("grok-4.3-typo") && out.contains("models."),
        "{out}"
    );

    let (exited, out) = run_serve("http://127.0.0.1:9/v1", "grok-4.3").await;
    assert!(!exited, "an unreachable xAI does not stop the start: {out}");
}
