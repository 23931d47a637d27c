//! The router on any message text, with any cutoff year and long-input threshold.
#![no_main]

use grok_appservice::cascade::router::{decide, normalise, RouterOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (head, text) = data.split_at(data.len().min(3));
    let mut options = RouterOptions::default();
    if let [a, b, c] = *head {
        options.cutoff_year = 1990 + i32::from(a);
        options.long_input_chars = usize::from(u16::from_le_bytes([b, c]));
    }
    let text = String::from_utf8_lossy(text);
    // The library call.
    let decision = decide(&text, &options);
    let _ = normalise(&text);

    assert!(
        (0.0..=1.0).contains(&decision.confidence),
        "confidence {} out of [0, 1]",
        decision.confidence
    );
    assert!(
        decision.text.len() <= text.len(),
        "the text only loses a prefix"
    );
    assert_eq!(decide(&text, &options), decision, "not deterministic");
});
