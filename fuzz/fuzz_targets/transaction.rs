//! A transaction body as Synapse PUTs it, through the webhook's parse and classify steps:
//! JSON, then each event parsed and classified on its own (a bad event is skipped alone).
#![no_main]

use std::sync::LazyLock;

use grok_appservice::access::Access;
use grok_appservice::classify::{classify, prompt_text, Facts, Identity, Verdict};
use grok_appservice::ingest::{facts_query, parse_transaction};
use libfuzzer_sys::fuzz_target;

static ME: LazyLock<Identity> = LazyLock::new(|| Identity {
    user_id: "@grok:example.org".into(),
    localpart: "grok".into(),
    display_name: "Grok".into(),
    namespaces: vec![
        regex(r"^@grok:example\.org$"),
        regex(r"^@_bridge_.*:example\.org$"),
    ],
    ignored_senders: vec![regex(r"^@spam.*:.*$")],
    allowed_servers: vec!["example.org".into()],
    access: Access::compile(&["@*:example.org".into()], &["/^@blocked/".into()], &[]).unwrap(),
});

fn regex(re: &str) -> regex::Regex {
    regex::Regex::new(re).unwrap()
}

fuzz_target!(|data: &[u8]| {
    // The library call: the webhook's own parse, then classify as its plan does.
    let Ok(parsed) = parse_transaction(data) else {
        return;
    };
    let _ = facts_query(&parsed.events);
    for (i, event) in parsed.events.iter().enumerate() {
        let _ = (event.in_reply_to(), event.membership());
        // Every combination of room facts, spread over the events.
        let facts = Facts {
            direct_room: i % 2 == 0,
            replies_to_bot: i % 4 < 2,
            sender_blocked: i % 8 == 7,
            decrypts: i % 16 >= 8,
        };
        if let Verdict::Addressed(request) = classify(event, &ME, facts) {
            assert_eq!(request.direct, facts.direct_room);
            assert_eq!(request.text.trim(), request.text, "the text is trimmed");
        }
        let _ = prompt_text(&event.content, &ME);
    }
});
