//! The `request_log` analytics rows, written off the answer path, plus the process counters
//! served at `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::TelemetryConfig;
use crate::store::{self, Store};

/// One analytics row (DESIGN section 5); zero values mean "did not apply".
pub type RequestLog = store::RequestLogRow;

/// How often (in writes) the retention trim runs.
pub const TRIM_EVERY: u64 = 200;

/// Records `request_log` rows without ever delaying or failing a reply.
pub struct Telemetry {
    store: Store,
    config: TelemetryConfig,
    writes: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Telemetry {
    /// A recorder over `store` with the given settings.
    pub fn new(store: Store, config: TelemetryConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            config,
            writes: AtomicU64::new(0),
            metrics,
        }
    }

    /// Writes `row` from a spawned task on the blocking pool. Nothing is written unless
    /// telemetry is enabled; `query_text` is emptied unless `store_text`. A failure logs one
    /// WARN with the row id; a panic in the write is caught the same way. Returns the task so
    /// tests can wait for it.
    pub fn record(&self, mut row: RequestLog) -> Option<tokio::task::JoinHandle<()>> {
        if !self.config.enabled {
            return None;
        }
        if !self.config.store_text {
            row.query_text.clear();
        }
        let n = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
        let trim_before = (n % TRIM_EVERY == 0 && !self.config.retention.is_zero()).then(|| {
            store::now()
                - chrono::Duration::from_std(self.config.retention).unwrap_or(chrono::Duration::MAX)
        });
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        Some(tokio::spawn(async move {
            let id = row.id.clone();
            if let Err(e) = store.upsert_request_log(row).await {
                metrics.inc("telemetry_write_failures_total", "");
                tracing::warn!(event_id = %id, error = %e, "request_log write failed");
            }
            if let Some(cutoff) = trim_before {
                match store.trim_request_log(cutoff).await {
                    Ok(n) => tracing::debug!(deleted = n, "request_log retention trim"),
                    Err(e) => tracing::warn!(error = %e, "request_log retention trim failed"),
                }
            }
        }))
    }
}

/// Prometheus counters and gauges, labelled by one value each.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, String), u64>>,
    provider_latency_ms_sum: AtomicU64,
    provider_calls: AtomicU64,
}

const HELP: &[(&str, &str, &str)] = &[
    (
        "transactions_total",
        "result",
        "Appservice transactions received, by result.",
    ),
    (
        "events_total",
        "verdict",
        "Events received, by classification verdict.",
    ),
    (
        "requests_total",
        "outcome",
        "Addressed requests finished, by outcome.",
    ),
    (
        "degraded_total",
        "reason",
        "Requests that ended degraded or skipped, by reason.",
    ),
    (
        "spend_ticks_total",
        "model",
        "Provider spend in ticks (1 USD = 1e10), by model.",
    ),
    (
        "telemetry_write_failures_total",
        "",
        "request_log writes that failed.",
    ),
];

impl Metrics {
    /// Adds one to a counter with one label value ("" for none).
    pub fn inc(&self, name: &'static str, label: &str) {
        self.add(name, label, 1);
    }

    /// Adds `n` to a counter with one label value.
    pub fn add(&self, name: &'static str, label: &str, n: u64) {
        let mut map = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((name, label.to_string())).or_default() += n;
    }

    /// Records one provider call's latency.
    pub fn observe_provider(&self, latency: Duration) {
        self.provider_calls.fetch_add(1, Ordering::Relaxed);
        self.provider_latency_ms_sum
            .fetch_add(latency.as_millis() as u64, Ordering::Relaxed);
    }

    /// The current value of a counter (tests and `/metrics`).
    pub fn get(&self, name: &'static str, label: &str) -> u64 {
        let map = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(name, label.to_string())).copied().unwrap_or(0)
    }

    /// Renders the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let map = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for (name, label, help) in HELP {
            out.push_str(&format!(
                "# HELP grok_{name} {help}\n# TYPE grok_{name} counter\n"
            ));
            let mut any = false;
            for ((n, value), count) in map.iter().filter(|((n, _), _)| n == name) {
                any = true;
                if label.is_empty() {
                    out.push_str(&format!("grok_{n} {count}\n"));
                } else {
                    let v = value.replace('\\', "\\\\").replace('"', "\\\"");
                    out.push_str(&format!("grok_{n}{{{label}=\"{v}\"}} {count}\n"));
                }
            }
            if !any && label.is_empty() {
                out.push_str(&format!("grok_{name} 0\n"));
            }
        }
        out.push_str("# HELP grok_provider_latency_ms Provider call latency.\n");
        out.push_str("# TYPE grok_provider_latency_ms summary\n");
        out.push_str(&format!(
            "grok_provider_latency_ms_sum {}\ngrok_provider_latency_ms_count {}\n",
            self.provider_latency_ms_sum.load(Ordering::Relaxed),
            self.provider_calls.load(Ordering::Relaxed)
        ));
        out
    }
}
