//! Progress while answering, through the real webhook and a streaming fake xAI: a streamed
//! answer is one message plus bounded edits, a slow answer's placeholder becomes the answer, a
//! broken stream says so, and a replica that takes over edits the first event instead of
//! posting a second message.

mod common;

use std::time::Duration;

use serde_json::{json, Value};

use common::{text_event, Harness, ALICE, BOT};
use grok_appservice::answer::recover::recover_once;
use grok_appservice::answer::render::PART_KEY;

const DM: &str = "!dm:example.org";

async fn dm_harness(tweak: impl FnOnce(&mut grok_appservice::config::Config)) -> Harness {
    let h = Harness::with(common::db::sqlite(), tweak).await;
    h.known_room(DM, true, &[BOT, ALICE]).await;
    h
}

fn answer_text(words: usize) -> String {
    (0..words)
        .map(|i| format!("word{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The sends of the bot: (content, event id), oldest first.
fn sends(h: &Harness) -> Vec<Value> {
    h.hs.sent().into_iter().map(|s| s.body).collect()
}

fn edit_target(content: &Value) -> Option<&str> {
    (content["m.relates_to"]["rel_type"] == "m.replace")
        .then(|| content["m.relates_to"]["event_id"].as_str())
        .flatten()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_answer_is_one_message_and_a_few_edits() {
    let max_edits = 4;
    let h = dm_harness(|c| {
        c.reply.streaming = true;
        c.reply.edit_interval = Duration::from_millis(200);
        c.reply.max_edits = max_edits;
    })
    .await;
    let full = answer_text(60);
    h.xai
        .set_stream(&full, 30, Duration::from_millis(60), false);
    h.put_txn(
        "s1",
        vec![text_event("$s", DM, ALICE, "tell me about otters")],
    )
    .await;
    h.settle().await;

    let sent = sends(&h);
    let first = &sent[0];
    assert!(
        edit_target(first).is_none(),
        "the first event is a new message"
    );
    assert_eq!(first["m.mentions"]["user_ids"], json!([ALICE]));
    assert_eq!(first[PART_KEY]["progress"], true);
    let first_id = h.state.store.claim("$s".into()).await.unwrap().unwrap();
    let first_id = first_id.progress_event_id.expect("stored with the claim");
    let edits = &sent[1..];
    assert!(
        edits.len() >= 2 && edits.len() <= max_edits as usize,
        "{} edits, want 2..={max_edits}",
        edits.len()
    );
    for e in edits {
        assert_eq!(edit_target(e), Some(first_id.as_str()), "{e}");
        assert_eq!(e["m.mentions"], json!({}), "nobody is pinged by an edit");
        assert_eq!(e["m.new_content"]["m.mentions"], json!({}));
    }
    let last = edits.last().unwrap();
    assert_eq!(
        last["m.new_content"]["body"],
        full.as_str(),
        "the last edit is the answer"
    );
    let body_before_last = edits[edits.len() - 2]["m.new_content"]["body"]
        .as_str()
        .unwrap();
    assert!(full.starts_with(body_before_last) && body_before_last.len() < full.len());
    assert_eq!(h.xai.seen()[0].body["stream"], true);
    let row = h.row("$s").await;
    assert!(row.ok, "{row:?}");
    assert_eq!(row.cost_source, "reported");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_answer_replaces_its_placeholder() {
    let h = dm_harness(|c| c.reply.placeholder_after = Some(Duration::from_millis(300))).await;
    h.xai.set_delay(Duration::from_millis(1_200));
    h.put_txn(
        "p1",
        vec![text_event("$p", DM, ALICE, "tell me about otters")],
    )
    .await;
    h.settle().await;
    let sent = sends(&h);
    assert_eq!(sent.len(), 2, "the placeholder, then one edit: {sent:?}");
    assert_eq!(sent[0]["body"], "Thinking...");
    assert_eq!(sent[0]["m.mentions"]["user_ids"], json!([ALICE]));
    assert!(edit_target(&sent[1]).is_some());
    assert_eq!(
        sent[1]["m.new_content"]["body"],
        "answer to: tell me about otters"
    );

    // A fast answer posts no placeholder.
    let quick = dm_harness(|c| c.reply.placeholder_after = Some(Duration::from_secs(5))).await;
    quick
        .put_txn(
            "p2",
            vec![text_event("$q", DM, ALICE, "tell me about otters")],
        )
        .await;
    quick.settle().await;
    let sent = sends(&quick);
    assert_eq!(sent.len(), 1);
    assert!(edit_target(&sent[0]).is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_stream_says_the_answer_is_incomplete() {
    let h = dm_harness(|c| {
        c.reply.streaming = true;
        c.reply.edit_interval = Duration::from_millis(200);
    })
    .await;
    h.xai
        .set_stream(&answer_text(40), 10, Duration::from_millis(30), true);
    h.put_txn(
        "b1",
        vec![text_event("$b", DM, ALICE, "tell me about otters")],
    )
    .await;
    h.settle().await;
    assert_eq!(
        h.xai.seen().len(),
        1,
        "a stream that showed text is not retried"
    );
    let last = sends(&h).pop().unwrap();
    let body = last["m.new_content"]["body"].as_str().unwrap();
    assert!(body.starts_with("word0 word1"), "{body}");
    assert!(body.contains("This answer is incomplete"), "{body}");
    let row = h.row("$b").await;
    assert_eq!(row.degraded, "stream_broken");
    assert_eq!(row.cost_source, "estimated", "charged its worst case");
    assert!(row.cost_total_ticks > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_takeover_edits_the_first_event_instead_of_posting_again() {
    let h = dm_harness(|c| c.reply.streaming = true).await;
    let event = text_event("$t", DM, ALICE, "tell me about otters");
    h.hs.add_event(event.clone());
    // A replica posted the first words, then died before the answer was stored.
    h.claim_directly("t1", "$t", "dead".into(), Duration::from_secs(1))
        .await;
    let path = h.db.url.trim_start_matches("sqlite://").to_string();
    {
        use diesel::connection::SimpleConnection;
        use diesel::Connection;
        let mut conn = diesel::SqliteConnection::establish(&path).unwrap();
        conn.batch_execute(
            "UPDATE processed_events SET progress_event_id = '$first', \
             lease_expires_at = '2000-01-01 00:00:00' WHERE event_id = '$t'",
        )
        .unwrap();
    }
    assert_eq!(recover_once(&h.state).await, 1);
    h.settle().await;
    let sent = sends(&h);
    assert!(!sent.is_empty());
    for s in &sent {
        assert_eq!(edit_target(s), Some("$first"), "no second message: {s}");
    }
    assert_eq!(
        sent.last().unwrap()["m.new_content"]["body"],
        "answer to: tell me about otters"
    );
}
