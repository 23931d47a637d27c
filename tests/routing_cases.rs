//! Runs the heuristic router over the labelled messages in
//! `tests/data/routing-cases.jsonl` (a copy of the shared labelled set) and requires at least 95% of routes right.

use std::collections::BTreeMap;
use std::path::PathBuf;

use grok_appservice::cascade::router::{decide, RouterOptions};
use grok_appservice::cascade::Route;

const MIN_ACCURACY: f64 = 0.95;

const ROUTES: [Route; 4] = [
    Route::GrokDirect,
    Route::TrivialDirect,
    Route::WebThenGrok,
    Route::ReasonThenGrok,
];

fn cases_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/routing-cases.jsonl")
}

#[test]
fn routing_cases_accuracy() {
    let path = cases_path();
    let body = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "routing cases file {} is missing or unreadable ({e}); it holds the labelled \
             messages this test scores the router on",
            path.display()
        )
    });

    let options = RouterOptions::default();
    // (expected, predicted) -> count
    let mut matrix: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut misrouted = Vec::new();
    let mut total = 0usize;
    let mut right = 0usize;
    for (n, line) in body.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let case: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{}:{}: bad JSON: {e}", path.display(), n + 1));
        let text = case["text"]
            .as_str()
            .unwrap_or_else(|| panic!("{}:{}: no \"text\"", path.display(), n + 1));
        let want = case["route"]
            .as_str()
            .unwrap_or_else(|| panic!("{}:{}: no \"route\"", path.display(), n + 1));
        let want_source = case["source"].as_str();

        let decision = decide(text, &options);
        let got = decision.route.as_str();
        let ok = got == want && want_source.is_none_or(|s| s == decision.source.as_str());
        total += 1;
        if ok {
            right += 1;
        } else {
            misrouted.push(format!(
                "  want {want:<16} got {got:<16} ({}, {:.2}, {:?}) {text:?}",
                decision.source.as_str(),
                decision.confidence,
                decision.rules
            ));
        }
        *matrix
            .entry((want_key(want), got_key(decision.route)))
            .or_default() += 1;
    }
    assert!(total > 0, "{} holds no cases", path.display());

    let accuracy = right as f64 / total as f64;
    println!("routing cases: {right}/{total} right, accuracy {accuracy:.3}");
    println!("confusion matrix (rows: expected, columns: predicted)");
    print!("{:>18}", "");
    for r in ROUTES {
        print!("{:>18}", r.as_str());
    }
    println!();
    for want in ROUTES {
        print!("{:>18}", want.as_str());
        for got in ROUTES {
            print!(
                "{:>18}",
                matrix.get(&(want.as_str(), got.as_str())).unwrap_or(&0)
            );
        }
        println!();
    }
    if misrouted.is_empty() {
        println!("misrouted: none");
    } else {
        println!("misrouted:");
        for m in &misrouted {
            println!("{m}");
        }
    }
    assert!(
        accuracy >= MIN_ACCURACY,
        "router accuracy {accuracy:.3} < {MIN_ACCURACY}; misrouted:\n{}",
        misrouted.join("\n")
    );
}

/// The expected route as one of the matrix keys (unknown labels keep their own text).
fn want_key(want: &str) -> &'static str {
    ROUTES
        .iter()
        .find(|r| r.as_str() == want)
        .map(|r| r.as_str())
        .unwrap_or("unknown")
}

fn got_key(route: Route) -> &'static str {
    route.as_str()
}
