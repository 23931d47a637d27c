//! Benchmark of the heuristic router alone (no I/O, no model): short, medium and 4 KiB inputs.
//!
//! Every benchmark sets `Throughput::Elements(1)`, so criterion's `thrpt` line reads directly as
//! decisions per second on one core. After the criterion run (only under `cargo bench`), a short
//! summary prints decisions/second and microseconds/decision (fastest and median batch) per
//! input and checks the 20 µs budget for messages up to 4 KiB against the fastest batch.
//!
//! Run briefly: `cargo bench --bench router -- --warm-up-time 1 --measurement-time 2`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use grok_appservice::cascade::router::{decide, normalise, RouterOptions};

/// Per-message budget from the issue.
const BUDGET: Duration = Duration::from_micros(20);
const KIB4: usize = 4096;

fn short_inputs() -> Vec<(&'static str, String)> {
    vec![
        ("greeting", "hello there!".to_string()),
        ("thanks_emoji", "thanks grok 🙏".to_string()),
    ]
}

fn medium_inputs() -> Vec<(&'static str, String)> {
    vec![
        (
            "question",
            "what's the difference between a mutex and a rwlock in rust, and when should I use \
             each one?"
                .to_string(),
        ),
        (
            "web_question",
            "who won the champions league final this year, and what was the score?".to_string(),
        ),
    ]
}

/// Repeat `unit` and cut at a char boundary at or below `len` bytes.
fn fill(unit: &str, len: usize) -> String {
    let mut s = String::with_capacity(len + unit.len());
    while s.len() < len {
        s.push_str(unit);
    }
    let mut end = len;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

fn large_inputs() -> Vec<(&'static str, String)> {
    let prose = fill(
        "The committee met on Tuesday to review the proposal for the new community garden. \
         Several members raised concerns about the water supply, the cost of fencing and the \
         schedule for volunteers, while others argued that the benefits for the neighbourhood \
         outweigh the effort. In the end they agreed to ask for more detail before voting. ",
        KIB4,
    );
    let head = "why does this fail to build?\n```toml\n";
    let foot = "\n```\n";
    let code = format!(
        "{head}{}{foot}",
        fill(
            "[dependencies]\nserde = { version = \"1\", features = [\"derive\"] }\n\
             foo = { git = \"https://github.com/example/foo\", branch = \"main\" }\n",
            KIB4 - head.len() - foot.len(),
        )
    );
    // Code pasted without a fence: every code pattern fires, so this is the slowest case.
    let unfenced = fill(
        "impl Router {\n    pub fn route(&self, text: &str) -> Result<Decision, Error> {\n        \
         let norm = text.trim().to_lowercase();\n        if norm.is_empty() {\n            \
         return Err(Error::Empty);\n        }\n        let hits = self.set.matches(norm.as_bytes());\n        \
         println!(\"{} hits\", hits.len());\n        Ok(Decision::new(hits))\n    }\n}\n",
        KIB4,
    );
    let unicode = fill(
        "Привет! Сегодня 🌞 мы обсуждали проект, 数据 和 模型, and the café’s menu 🍰🍵. ",
        KIB4,
    );
    vec![
        ("prose", prose),
        ("code_fence", code),
        ("code_unfenced", unfenced),
        ("unicode", unicode),
    ]
}

fn bench_group(c: &mut Criterion, name: &str, inputs: &[(&'static str, String)]) {
    let options = RouterOptions::default();
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    for (label, text) in inputs {
        group.bench_with_input(
            BenchmarkId::new("decide", format!("{label}/{}B", text.len())),
            text,
            |b, text| b.iter(|| decide(black_box(text), black_box(&options))),
        );
    }
    if name == "large_4kib" {
        let (_, text) = &inputs[0];
        group.bench_with_input(BenchmarkId::new("normalise_only", "prose"), text, |b, t| {
            b.iter(|| normalise(black_box(t)))
        });
    }
    group.finish();
}

/// Decisions per second and microseconds per decision, measured directly: 200 batches of 50
/// decisions per input. The fastest batch shows the router's own cost with the least
/// interference from other processes (the budget check uses it); the median shows what a busy
/// machine gives.
fn summary(inputs: &[(&'static str, String)]) {
    let options = RouterOptions::default();
    println!();
    println!("router summary (one core):");
    println!(
        "{:<16} {:>6} {:>16} {:>14} {:>16}",
        "input", "bytes", "decisions/s", "us (fastest)", "us (median)"
    );
    let mut over_budget = Vec::new();
    for (label, text) in inputs {
        // Warm the lazily compiled regexes and the DFA caches.
        for _ in 0..100 {
            black_box(decide(black_box(text), &options));
        }
        let mut batches: Vec<Duration> = (0..200)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..50 {
                    black_box(decide(black_box(text), &options));
                }
                start.elapsed() / 50
            })
            .collect();
        batches.sort_unstable();
        let (fastest, median) = (batches[0], batches[batches.len() / 2]);
        println!(
            "{:<16} {:>6} {:>16.0} {:>14.2} {:>16.2}",
            label,
            text.len(),
            1.0 / fastest.as_secs_f64(),
            fastest.as_secs_f64() * 1e6,
            median.as_secs_f64() * 1e6
        );
        if text.len() <= KIB4 && fastest > BUDGET {
            over_budget.push(*label);
        }
    }
    if over_budget.is_empty() {
        println!("all inputs up to 4 KiB within the {BUDGET:?} budget (fastest batch)");
    } else {
        println!("OVER the {BUDGET:?} budget (fastest batch): {over_budget:?}");
    }
}

fn main() {
    let short = short_inputs();
    let medium = medium_inputs();
    let large = large_inputs();
    for (label, text) in &large {
        assert!(text.len() <= KIB4, "{label} is {} bytes", text.len());
    }

    let mut c = Criterion::default().configure_from_args();
    bench_group(&mut c, "short", &short);
    bench_group(&mut c, "medium", &medium);
    bench_group(&mut c, "large_4kib", &large);
    c.final_summary();

    // Only under `cargo bench` (criterion's test mode via `cargo test --benches` skips this).
    if std::env::args().any(|a| a == "--bench") {
        let all: Vec<(&'static str, String)> = short
            .iter()
            .map(|(l, t)| (*l, t.clone()))
            .chain(medium.iter().map(|(l, t)| (*l, t.clone())))
            .chain(large.iter().map(|(l, t)| (*l, t.clone())))
            .collect();
        summary(&all);
    }
}
