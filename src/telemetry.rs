//! The `request_log` analytics rows, written off the answer path, plus the process counters
//! served at `/metrics`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::NaiveDateTime;
use tokio::sync::{mpsc, Notify};

use crate::cascade::Stage;
use crate::config::TelemetryConfig;
use crate::provider::Usage;
use crate::store::{self, Store, StoreError};

/// One analytics row (DESIGN section 5); zero values mean "did not apply".
pub type RequestLog = store::RequestLogRow;

/// One stage's tokens, as stored per stage in `request_log.stage_usage`
/// (`{"final": {"input": .., "cached": .., "output": .., "reasoning": .., "web_search_calls": ..}}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StageUsage {
    /// Input tokens, cached ones included.
    pub input: i64,
    /// Cached input tokens.
    pub cached: i64,
    /// Output tokens, reasoning ones included.
    pub output: i64,
    /// Reasoning tokens (part of `output`).
    pub reasoning: i64,
    /// Server-side web-search calls.
    pub web_search_calls: i64,
}

impl StageUsage {
    /// Adds one call's usage.
    pub fn add(&mut self, u: &Usage) {
        self.input += u.input_tokens;
        self.cached += u.cached_tokens;
        self.output += u.output_tokens;
        self.reasoning += u.reasoning_tokens;
        self.web_search_calls += u.web_search_calls;
    }

    /// The same tokens as provider usage (no reported cost), to price them.
    pub fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.input,
            cached_tokens: self.cached,
            output_tokens: self.output,
            reasoning_tokens: self.reasoning,
            web_search_calls: self.web_search_calls,
            reported_cost_ticks: None,
        }
    }
}

/// The stage whose output the user got: `final` when it ran, else the route's own stage
/// (`web`, `reason` or `trivial`; a route runs at most one of them). The router never answers.
/// `get` looks a stage up in whatever map holds them.
pub fn answer_stage<'a>(get: impl Fn(Stage) -> Option<&'a StageUsage>) -> Option<&'a StageUsage> {
    [Stage::Final, Stage::Web, Stage::Reason, Stage::Trivial]
        .into_iter()
        .find_map(get)
}

/// How often (in writes) the retention trim runs.
pub const TRIM_EVERY: u64 = 200;

/// Most rows written in one database transaction.
const MAX_BATCH: usize = 256;

/// A boxed future of a sink operation.
pub type SinkFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// Where rows go: the store in production; tests substitute failing or panicking sinks.
pub trait LogSink: Send + Sync + 'static {
    /// Writes (or replaces) rows, all or none.
    fn write_batch(&self, rows: Vec<RequestLog>) -> SinkFuture<()>;
    /// Deletes rows created before `cutoff`.
    fn trim(&self, cutoff: NaiveDateTime) -> SinkFuture<usize>;
}

impl LogSink for Store {
    fn write_batch(&self, rows: Vec<RequestLog>) -> SinkFuture<()> {
        let store = self.clone();
        Box::pin(async move { store.upsert_request_logs(rows).await })
    }

    fn trim(&self, cutoff: NaiveDateTime) -> SinkFuture<usize> {
        let store = self.clone();
        Box::pin(async move { store.trim_request_log(cutoff).await })
    }
}

/// Runs a sink operation in its own task, so a panic in it is caught and reported like an
/// error instead of unwinding into anything else.
async fn guarded<T: Send + 'static>(
    op: impl FnOnce() -> SinkFuture<T> + Send + 'static,
) -> Result<T, String> {
    match tokio::spawn(async move { op().await }).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) if e.is_panic() => Err("the telemetry write panicked".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Rows handed over but not yet written, and a wake-up for whoever waits for zero.
#[derive(Default)]
struct Pending {
    rows: AtomicUsize,
    drained: Notify,
}

/// Records `request_log` rows without ever delaying or failing a reply: rows go to a queue,
/// and one writer task writes whatever has queued up in one transaction, so under load the
/// analytics cost one database write per batch instead of one per reply.
pub struct Telemetry {
    queue: mpsc::UnboundedSender<RequestLog>,
    pending: Arc<Pending>,
    config: TelemetryConfig,
}

impl Telemetry {
    /// A recorder writing to `sink` with the given settings; starts its writer task.
    pub fn new(sink: Arc<dyn LogSink>, config: TelemetryConfig, metrics: Arc<Metrics>) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(Pending::default());
        tokio::spawn(writer(rx, sink, config.retention, metrics, pending.clone()));
        Self {
            queue,
            pending,
            config,
        }
    }

    /// Queues `row` for writing. Nothing is written unless telemetry is enabled;
    /// `query_text` is emptied unless `store_text`. Returns whether the row was queued.
    pub fn record(&self, mut row: RequestLog) -> bool {
        if !self.config.enabled {
            return false;
        }
        if !self.config.store_text {
            row.query_text.clear();
        }
        self.pending.rows.fetch_add(1, Ordering::SeqCst);
        if self.queue.send(row).is_err() {
            // The writer is gone (runtime shutting down): nothing left to wait for.
            self.pending.rows.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Rows queued or being written.
    pub fn pending(&self) -> usize {
        self.pending.rows.load(Ordering::SeqCst)
    }

    /// Waits until every queued row is written (or has failed): shutdown and tests.
    pub async fn flush(&self) {
        loop {
            let drained = self.pending.drained.notified();
            if self.pending() == 0 {
                return;
            }
            drained.await;
        }
    }
}

/// Writes a batch, trying again twice after a short pause: a cut database connection is
/// replaced by the pool within moments, and the rows are upserts, so a retry is safe.
async fn write_with_retries(sink: &Arc<dyn LogSink>, batch: Vec<RequestLog>) -> Result<(), String> {
    let mut last = String::new();
    for pause_ms in [0, 100, 500] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        let (writer, rows) = (sink.clone(), batch.clone());
        match guarded(move || writer.write_batch(rows)).await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The writer task: batches what is queued, writes it, trims by retention once per
/// [`TRIM_EVERY`] rows. A failure logs one WARN per row id; a panic in the sink is caught.
async fn writer(
    mut rx: mpsc::UnboundedReceiver<RequestLog>,
    sink: Arc<dyn LogSink>,
    retention: Duration,
    metrics: Arc<Metrics>,
    pending: Arc<Pending>,
) {
    let mut written: u64 = 0;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(row) => batch.push(row),
                Err(_) => break,
            }
        }
        let n = batch.len();
        let ids: Vec<String> = batch.iter().map(|r| r.id.clone()).collect();
        if let Err(e) = write_with_retries(&sink, batch).await {
            metrics.add("telemetry_write_failures_total", &[], n as u64);
            for id in ids {
                tracing::warn!(event_id = %id, error = %e, "request_log write failed");
            }
        }
        let before = written / TRIM_EVERY;
        written += n as u64;
        if written / TRIM_EVERY > before && !retention.is_zero() {
            let cutoff = store::now()
                - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
            let trimmer = sink.clone();
            match guarded(move || trimmer.trim(cutoff)).await {
                Ok(deleted) => tracing::debug!(deleted, "request_log retention trim"),
                Err(e) => tracing::warn!(error = %e, "request_log retention trim failed"),
            }
        }
        if pending.rows.fetch_sub(n, Ordering::SeqCst) == n {
            pending.drained.notify_waiters();
        }
    }
}

/// Upper bounds (ms) of the provider latency histogram buckets.
const LATENCY_BUCKETS_MS: [u64; 9] = [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000];

/// Counter names with their help text, in the order `/metrics` lists them.
const COUNTERS: &[(&str, &str)] = &[
    (
        "transactions_total",
        "Appservice transactions received, by result.",
    ),
    (
        "events_total",
        "Events received, by classification verdict.",
    ),
    (
        "requests_total",
        "Addressed requests finished, by route and outcome.",
    ),
    (
        "degraded_total",
        "Requests that ended degraded or skipped, by reason.",
    ),
    (
        "spend_ticks_total",
        "Provider spend in ticks (1 USD = 1e10), by model.",
    ),
    (
        "context_turns_total",
        "Earlier conversation turns sent with answers, by context mode.",
    ),
    (
        "provider_unconfirmed_attempts_total",
        "Failed provider attempts that may have been billed, charged at their worst case.",
    ),
    (
        "provider_failures_total",
        "Requests whose answer failed at the provider, by kind (api_key, credits, rate_limited, server, transport, gone, rejected).",
    ),
    (
        "claims_lost_total",
        "Workers that stopped because another replica took their claim.",
    ),
    (
        "decrypted_total",
        "Encrypted claimed events, by result (ok, missing_key, broken).",
    ),
    (
        "telemetry_write_failures_total",
        "request_log writes that failed.",
    ),
    (
        "housekeeping_deleted_total",
        "Rows deleted by housekeeping, by table.",
    ),
];

/// Labels of one series, e.g. `[("route", "grok_direct"), ("outcome", "ok")]`.
pub type Labels<'a> = &'a [(&'static str, &'a str)];

fn render_labels(labels: Labels<'_>) -> String {
    let parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    parts.join(",")
}

#[derive(Default)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS_MS.len()],
    count: u64,
    sum_ms: u64,
}

/// Prometheus counters and the provider latency histogram of one process.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, String), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
}

impl Metrics {
    /// Adds one to a counter series.
    pub fn inc(&self, name: &'static str, labels: Labels<'_>) {
        self.add(name, labels, 1);
    }

    /// Adds `n` to a counter series.
    pub fn add(&self, name: &'static str, labels: Labels<'_>, n: u64) {
        let mut map = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((name, render_labels(labels))).or_default() += n;
    }

    /// The current value of a counter series.
    pub fn get(&self, name: &'static str, labels: Labels<'_>) -> u64 {
        let map = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(name, render_labels(labels)))
            .copied()
            .unwrap_or(0)
    }

    /// Records one provider call's latency for a model.
    pub fn observe_provider(&self, model: &str, latency: Duration) {
        let ms = latency.as_millis() as u64;
        let mut map = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let h = map.entry(model.to_string()).or_default();
        for (i, bound) in LATENCY_BUCKETS_MS.iter().enumerate() {
            if ms <= *bound {
                h.buckets[i] += 1;
            }
        }
        h.count += 1;
        h.sum_ms += ms;
    }

    /// Renders the Prometheus text format, with `gauges` (name, help, value) read at scrape.
    pub fn render(&self, gauges: &[(&str, &str, i64)]) -> String {
        let mut out = String::new();
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        for (name, help) in COUNTERS {
            out.push_str(&format!(
                "# HELP grok_{name} {help}\n# TYPE grok_{name} counter\n"
            ));
            let mut any = false;
            for ((_, labels), value) in counters.iter().filter(|((n, _), _)| n == name) {
                any = true;
                if labels.is_empty() {
                    out.push_str(&format!("grok_{name} {value}\n"));
                } else {
                    out.push_str(&format!("grok_{name}{{{labels}}} {value}\n"));
                }
            }
            if !any {
                out.push_str(&format!("grok_{name} 0\n"));
            }
        }
        drop(counters);
        out.push_str("# HELP grok_provider_latency_ms Provider call latency by model.\n");
        out.push_str("# TYPE grok_provider_latency_ms histogram\n");
        let latency = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        for (model, h) in latency.iter() {
            let m = render_labels(&[("model", model)]);
            for (bound, n) in LATENCY_BUCKETS_MS.iter().zip(h.buckets) {
                out.push_str(&format!(
                    "grok_provider_latency_ms_bucket{{{m},le=\"{bound}\"}} {n}\n"
                ));
            }
            out.push_str(&format!(
                "grok_provider_latency_ms_bucket{{{m},le=\"+Inf\"}} {}\n",
                h.count
            ));
            out.push_str(&format!(
                "grok_provider_latency_ms_sum{{{m}}} {}\n",
                h.sum_ms
            ));
            out.push_str(&format!(
                "grok_provider_latency_ms_count{{{m}}} {}\n",
                h.count
            ));
        }
        for (name, help, value) in gauges {
            out.push_str(&format!(
                "# HELP grok_{name} {help}\n# TYPE grok_{name} gauge\ngrok_{name} {value}\n"
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_in_prometheus_text_format() {
        let m = Metrics::default();
        m.inc(
            "requests_total",
            &[("route", "grok_direct"), ("outcome", "ok")],
        );
        m.add("spend_ticks_total", &[("model", "grok-4.3")], 5);
        m.observe_provider("grok-4.3", Duration::from_millis(300));
        m.observe_provider("grok-4.3", Duration::from_millis(7_000));
        let text = m.render(&[("reservations_held", "Held reservations.", 2)]);
        assert!(
            text.contains("grok_requests_total{route=\"grok_direct\",outcome=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("grok_spend_ticks_total{model=\"grok-4.3\"} 5\n"));
        assert!(text.contains("grok_provider_latency_ms_bucket{model=\"grok-4.3\",le=\"250\"} 0\n"));
        assert!(text.contains("grok_provider_latency_ms_bucket{model=\"grok-4.3\",le=\"500\"} 1\n"));
        assert!(
            text.contains("grok_provider_latency_ms_bucket{model=\"grok-4.3\",le=\"+Inf\"} 2\n")
        );
        assert!(text.contains("grok_provider_latency_ms_sum{model=\"grok-4.3\"} 7300\n"));
        assert!(text.contains("# TYPE grok_reservations_held gauge\ngrok_reservations_held 2\n"));
        assert!(
            text.contains("grok_telemetry_write_failures_total 0\n"),
            "unused counters show 0"
        );
        assert_eq!(
            m.get(
                "requests_total",
                &[("route", "grok_direct"), ("outcome", "ok")]
            ),
            1
        );
    }
}
