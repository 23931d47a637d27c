//! The provider's streamed answer: server-sent events in any chunking, then each interpreted.
#![no_main]

use grok_appservice::provider::stream::{step, SseParser};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&size, stream)) = data.split_first() else {
        return;
    };
    // The library calls: the stream whole, then cut into chunks of `size` bytes.
    let whole = SseParser::default().push(stream);
    let mut parser = SseParser::default();
    let chunked: Vec<_> = stream
        .chunks(usize::from(size).max(1))
        .flat_map(|chunk| parser.push(chunk))
        .collect();
    assert_eq!(whole, chunked, "events depend on how the stream was cut");
    for event in &whole {
        let _ = step(event);
    }
});
