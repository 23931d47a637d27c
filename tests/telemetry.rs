//! Telemetry never delays or drops a reply: failing and panicking sinks, text stripping, the
//! retention trim cadence, and the switch.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chrono::NaiveDateTime;

use common::*;
use grok_appservice::config::TelemetryConfig;
use grok_appservice::state::Overrides;
use grok_appservice::store::StoreError;
use grok_appservice::telemetry::{LogSink, Metrics, RequestLog, SinkFuture, Telemetry, TRIM_EVERY};

/// Remembers what it was given; fails or panics on demand.
#[derive(Default)]
struct TestSink {
    rows: Mutex<Vec<RequestLog>>,
    trims: AtomicUsize,
    batches: Mutex<Vec<usize>>,
    fail: bool,
    panic: bool,
}

impl LogSink for TestSink {
    fn write_batch(&self, rows: Vec<RequestLog>) -> SinkFuture<()> {
        if self.panic {
            panic!("sink exploded");
        }
        let fail = self.fail;
        if !fail {
            self.batches.lock().unwrap().push(rows.len());
            self.rows.lock().unwrap().extend(rows);
        }
        Box::pin(async move {
            if fail {
                Err(StoreError::Unavailable("disk on fire".into()))
            } else {
                Ok(())
            }
        })
    }

    fn trim(&self, _cutoff: NaiveDateTime) -> SinkFuture<usize> {
        self.trims.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(0) })
    }
}

fn row(id: &str, text: &str) -> RequestLog {
    RequestLog {
        id: id.into(),
        query_text: text.into(),
        created_at: grok_appservice::store::now(),
        ..RequestLog::default()
    }
}

fn telemetry(sink: Arc<TestSink>, config: TelemetryConfig) -> (Telemetry, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    (Telemetry::new(sink, config, metrics.clone()), metrics)
}

#[tokio::test]
async fn text_is_stripped_unless_stored_on_purpose() {
    for (store_text, want) in [(false, ""), (true, "the question")] {
        let sink = Arc::new(TestSink::default());
        let (t, _) = telemetry(
            sink.clone(),
            TelemetryConfig {
                store_text,
                ..TelemetryConfig::default()
            },
        );
        assert!(t.record(row("$a", "the question")));
        t.flush().await;
        assert_eq!(sink.rows.lock().unwrap()[0].query_text, want);
    }
}

#[tokio::test]
async fn rows_queued_together_are_written_in_one_batch() {
    let sink = Arc::new(TestSink::default());
    let (t, _) = telemetry(sink.clone(), TelemetryConfig::default());
    for i in 0..300 {
        assert!(t.record(row(&format!("$b{i}"), "")));
    }
    t.flush().await;
    assert_eq!(t.pending(), 0);
    let batches = sink.batches.lock().unwrap().clone();
    assert_eq!(batches.iter().sum::<usize>(), 300, "every row written once");
    assert!(
        batches.len() < 300,
        "rows that queued up share a transaction: {batches:?}"
    );
    assert!(batches.iter().all(|b| *b <= 256), "{batches:?}");
}

#[tokio::test]
async fn disabled_telemetry_writes_nothing() {
    let sink = Arc::new(TestSink::default());
    let (t, _) = telemetry(
        sink.clone(),
        TelemetryConfig {
            enabled: false,
            ..TelemetryConfig::default()
        },
    );
    assert!(!t.record(row("$a", "x")));
    t.flush().await;
    assert!(sink.rows.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_retention_trim_runs_once_per_200_writes() {
    let sink = Arc::new(TestSink::default());
    let (t, _) = telemetry(sink.clone(), TelemetryConfig::default());
    let writes = 2 * TRIM_EVERY as usize + 50;
    for i in 0..writes {
        t.record(row(&format!("$r{i}"), ""));
        t.flush().await;
    }
    assert_eq!(sink.rows.lock().unwrap().len(), writes);
    assert_eq!(sink.trims.load(Ordering::SeqCst), 2);

    let sink = Arc::new(TestSink::default());
    let (t, _) = telemetry(
        sink.clone(),
        TelemetryConfig {
            retention: std::time::Duration::ZERO,
            ..TelemetryConfig::default()
        },
    );
    for i in 0..TRIM_EVERY {
        t.record(row(&format!("$z{i}"), ""));
        t.flush().await;
    }
    assert_eq!(
        sink.trims.load(Ordering::SeqCst),
        0,
        "retention 0 keeps rows forever"
    );
}

#[tokio::test]
async fn failures_and_panics_are_contained_and_counted() {
    for sink in [
        TestSink {
            fail: true,
            ..TestSink::default()
        },
        TestSink {
            panic: true,
            ..TestSink::default()
        },
    ] {
        let (t, metrics) = telemetry(Arc::new(sink), TelemetryConfig::default());
        t.record(row("$a", ""));
        t.flush().await;
        assert_eq!(metrics.get("telemetry_write_failures_total", &[]), 1);
        // The writer survives and keeps going.
        t.record(row("$b", ""));
        t.flush().await;
        assert_eq!(metrics.get("telemetry_write_failures_total", &[]), 2);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn users_get_their_answer_whatever_the_sink_does() {
    for sink in [
        TestSink {
            fail: true,
            ..TestSink::default()
        },
        TestSink {
            panic: true,
            ..TestSink::default()
        },
    ] {
        let overrides = Overrides {
            log_sink: Some(Arc::new(sink)),
            ..Overrides::default()
        };
        let h = Harness::with_overrides(db::sqlite(), |_| {}, overrides).await;
        h.known_room("!dm:example.org", true, &[BOT, ALICE]).await;
        h.put_txn(
            "t1",
            vec![text_event(
                "$t1",
                "!dm:example.org",
                ALICE,
                "tell me about otters",
            )],
        )
        .await;
        h.settle().await;
        let sent = h.hs.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].body["body"], "answer to: tell me about otters");
        assert_eq!(
            h.state
                .store
                .claim("$t1".into())
                .await
                .unwrap()
                .unwrap()
                .state,
            "answered"
        );
        assert_eq!(
            h.state.metrics.get("telemetry_write_failures_total", &[]),
            1
        );
    }
}
