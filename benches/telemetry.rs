//! Load test: does recording `request_log` rows slow the answer path? Runs the real webhook
//! and workers in-process (fake homeserver and fake xAI on loopback, SQLite) with telemetry on
//! and off, interleaved, and prints the ratio of their times. Machines here are shared and
//! noisy, so only the ratio within one run means anything.
//!
//! `cargo bench --bench telemetry` (REQUESTS=10000 by default; on PostgreSQL when
//! `TEST_DATABASE_URL` is set, else SQLite).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

/// Sends `n` addressed messages in transactions of 50 and returns the time until every reply
/// reached the homeserver: the answer path. Telemetry writes finish after that, untimed.
async fn run(h: &Harness, n: usize, tag: &str) -> Duration {
    let target = h.hs.send_count() + n;
    let started = Instant::now();
    for batch in 0..n.div_ceil(50) {
        let events = (0..50)
            .map(|i| batch * 50 + i)
            .filter(|i| *i < n)
            .map(|i| {
                text_event(
                    &format!("${tag}{i}"),
                    "!dm:example.org",
                    ALICE,
                    &format!("tell me about otters, take {tag}{i}"),
                )
            })
            .collect();
        h.put_txn(&format!("{tag}-{batch}"), events).await;
    }
    while h.hs.send_count() < target {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    h.settle().await;
    elapsed
}

fn main() {
    let n: usize = std::env::var("REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Caps high enough that the limiter admits everything: it is not what is measured.
        let on = Harness::with(db::postgres().unwrap_or_else(db::sqlite), |c| {
            c.telemetry.enabled = true;
            c.cache.enabled = false;
            c.limits.daily_ceiling_usd = 1e6;
            c.limits.per_user_daily_usd = 1e6;
            c.limits.per_user_requests_per_hour = u32::MAX;
        })
        .await;
        let off = Harness::with(db::postgres().unwrap_or_else(db::sqlite), |c| {
            c.telemetry.enabled = false;
            c.cache.enabled = false;
            c.limits.daily_ceiling_usd = 1e6;
            c.limits.per_user_daily_usd = 1e6;
            c.limits.per_user_requests_per_hour = u32::MAX;
        })
        .await;
        for h in [&on, &off] {
            h.known_room("!dm:example.org", true, &[BOT, ALICE]).await;
        }
        let rounds = 4;
        let per_round = n / rounds;
        let (mut t_on, mut t_off) = (Duration::ZERO, Duration::ZERO);
        for r in 0..rounds {
            // Alternate the order so drift on a shared machine hits both sides.
            if r % 2 == 0 {
                t_on += run(&on, per_round, &format!("on{r}-")).await;
                t_off += run(&off, per_round, &format!("off{r}-")).await;
            } else {
                t_off += run(&off, per_round, &format!("off{r}-")).await;
                t_on += run(&on, per_round, &format!("on{r}-")).await;
            }
        }
        let total = per_round * rounds;
        println!("requests per side: {total} on {}", on.db.label);
        println!(
            "telemetry on : {:>8.1} ms total, {:>7.3} ms per request",
            t_on.as_secs_f64() * 1e3,
            t_on.as_secs_f64() * 1e3 / total as f64
        );
        println!(
            "telemetry off: {:>8.1} ms total, {:>7.3} ms per request",
            t_off.as_secs_f64() * 1e3,
            t_off.as_secs_f64() * 1e3 / total as f64
        );
        println!(
            "ratio on/off : {:.3}",
            t_on.as_secs_f64() / t_off.as_secs_f64()
        );
    });
}
