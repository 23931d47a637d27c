//! `grok-appservice estimate` with the real binary: typical token counts without a database,
//! `request_log` averages for a route with enough answered rows.

// Only the config writer is used here.
#[allow(dead_code)]
#[path = "common/db.rs"]
mod db;

use std::process::Command;

use grok_appservice::store::{RequestLogRow, Store};

fn estimate(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_grok-appservice"))
        .arg("estimate")
        .args(args)
        .arg("-c")
        .arg(config)
        .env_remove("DATABASE_URL")
        .env_remove("GROK_APPSERVICE_CONFIG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An answered `grok_direct` row: 1,000 tokens in and 1,000 out on grok-4.3 (12,500 + 25,000
/// ticks a token: $0.00375), and the same for the direct estimate.
fn direct_row(i: usize) -> RequestLogRow {
    RequestLogRow {
        id: format!("$e{i}"),
        room_id: "!r:example.org".into(),
        sender: "@alice:example.org".into(),
        route: "grok_direct".into(),
        router_source: "default".into(),
        models: r#"{"final":"grok-4.3"}"#.into(),
        stage_ms: "{}".into(),
        stage_usage: r#"{"final":{"input":1000,"cached":0,"output":1000,"reasoning":0,"web_search_calls":0}}"#.into(),
        direct_input_tokens: 1000,
        direct_output_tokens: 1000,
        cost_final_ticks: 37_500_000,
        cost_total_ticks: 37_500_000,
        ok: true,
        created_at: grok_appservice::store::now() - chrono::Duration::hours(1),
        ..RequestLogRow::default()
    }
}

#[test]
fn estimate_uses_request_log_averages_once_a_route_has_enough_rows() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("est.db").display());
    let config = db::config_file(dir.path(), &url);

    let (ok, typical, err) = estimate(&config, &["--mix", "direct=1"]);
    assert!(ok, "{err}");
    assert!(err.contains("typical token counts only"), "{err}");
    assert!(typical.contains("| `grok_direct` | 100% |"), "{typical}");
    assert!(typical.contains("typical tokens |"), "{typical}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::connect(&url, 1).unwrap();
        store.migrate().await.unwrap();
        for i in 0..25 {
            store.upsert_request_log(direct_row(i)).await.unwrap();
        }
    });
    let (ok, observed, err) = estimate(&config, &["--mix", "direct=1"]);
    assert!(ok, "{err}");
    assert!(
        observed.contains(
            "| `grok_direct` | 100% | $0.00375 | $0.00375 | same cost | request_log (25 rows) |"
        ),
        "{observed}"
    );
    // 100 a day for 30 days at $0.00375.
    assert!(
        observed.contains("| 100 | $11.25 | $11.25 | $0.00000 |"),
        "{observed}"
    );
    assert!(
        observed.contains("| `web_then_grok` | 0% |") && observed.contains("typical tokens |"),
        "routes without rows keep the typical counts: {observed}"
    );

    let (ok, _, err) = estimate(&config, &["--mix", "web=2"]);
    assert!(!ok && err.contains("--mix"), "{err}");
}
