//! The provider's non-streamed answer: a Responses API body, whatever the server sent.
#![no_main]

use grok_appservice::provider::parse_response;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The library call.
    if let Ok(parsed) = parse_response(data) {
        for url in &parsed.citations {
            assert!(
                url.starts_with("https://") || url.starts_with("http://"),
                "{url}"
            );
        }
        let unique: std::collections::HashSet<&String> = parsed.citations.iter().collect();
        assert_eq!(unique.len(), parsed.citations.len(), "duplicate citations");
    }
});
