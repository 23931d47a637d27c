//! The config loader on any YAML text: parse, then the start-up validation.
#![no_main]

use grok_appservice::config::{parse_duration, Config};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The library calls.
    if let Ok(mut config) = Config::parse(text) {
        let _ = config.validate();
    }
    // Durations are deep in the YAML; the lines on their own reach the parser directly.
    for line in text.lines().take(8) {
        let _ = parse_duration(line);
    }
});
