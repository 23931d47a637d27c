//! Room commands and room etiquette through the real webhook: help and usage with no model
//! call, moderators' route changes (power levels), the per-room reply limit, and forgetting a
//! room the bot was removed from.

mod common;

use std::time::Duration;

use serde_json::{json, Value};

use common::{text_event, Harness, ALICE, BOT};

const DM: &str = "!dm:example.org";

async fn dm_harness(tweak: impl FnOnce(&mut grok_appservice::config::Config)) -> Harness {
    let h = Harness::with(common::db::sqlite(), tweak).await;
    h.known_room(DM, true, &[BOT, ALICE]).await;
    h
}

/// A room version 12 room created by `@creator`, with Alice at `alice_level`.
fn room_state(alice_level: i64) -> Vec<Value> {
    vec![
        json!({"type": "m.room.create", "state_key": "", "sender": "@creator:example.org",
               "content": {"room_version": "12"}}),
        json!({"type": "m.room.power_levels", "state_key": "",
               "content": {"users": {ALICE: alice_level}, "state_default": 50}}),
    ]
}

/// Sends Alice's `body` as event `id` and waits for the bot to finish with it.
async fn say(h: &Harness, id: &str, body: &str) {
    h.put_txn(&format!("t{id}"), vec![text_event(id, DM, ALICE, body)])
        .await;
    h.settle().await;
}

fn last_body(h: &Harness) -> String {
    h.hs.sent().last().unwrap().body["body"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn help_and_usage_cost_nothing() {
    let h = dm_harness(|_| {}).await;
    say(&h, "$help", "!grok help").await;
    let help = last_body(&h);
    assert!(help.contains("!grok context"), "{help}");
    assert!(help.contains("route automatic"), "{help}");
    say(&h, "$unknown", "!grok make me a sandwich").await;
    assert_eq!(last_body(&h), help, "an unknown command gets the help text");
    say(&h, "$usage", "!grok usage").await;
    assert!(last_body(&h).starts_with("Today (UTC) you have used"));
    say(&h, "$old", "!usage").await;
    assert!(last_body(&h).starts_with("Today (UTC) you have used"));
    assert!(h.xai.seen().is_empty(), "no command calls a model");
    let row = h.row("$help").await;
    assert_eq!(
        (row.route.as_str(), row.ok, row.cost_total_ticks),
        ("none", true, 0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn only_moderators_change_the_room_route() {
    let h = dm_harness(|_| {}).await;
    h.hs.set_state(DM, room_state(0));
    say(&h, "$try", "!grok route web_then_grok").await;
    assert!(last_body(&h).starts_with("Only room moderators"));
    say(&h, "$q1", "tell me about otters").await;
    assert!(
        h.xai.seen()[0].body.get("tools").is_none(),
        "the route did not change"
    );

    h.hs.set_state(DM, room_state(50));
    say(&h, "$set", "!grok route web_then_grok").await;
    assert!(last_body(&h).contains("`web_then_grok`"));
    say(&h, "$q2", "tell me about beavers").await;
    assert_eq!(h.xai.seen()[1].body["tools"][0]["type"], "web_search");
    assert_eq!(h.row("$q2").await.route, "web_then_grok");
    say(&h, "$help", "!grok help").await;
    assert!(last_body(&h).contains("route `web_then_grok`"));

    // Another replica sees the same setting; `auto` gives the choice back to the router.
    let other = h.restart().await;
    assert_eq!(
        other
            .state
            .store
            .room_settings(DM.into())
            .await
            .unwrap()
            .route
            .as_deref(),
        Some("web_then_grok")
    );
    say(&h, "$auto", "!grok route auto").await;
    say(&h, "$q3", "tell me about otters and beavers").await;
    assert!(h.xai.seen()[2].body.get("tools").is_none());
    assert_eq!(h.xai.seen().len(), 3, "commands never called the model");
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_room_limit_one_notice_then_silence() {
    let h = dm_harness(|c| c.bot.room_answers_per_minute = 3).await;
    // The limit counts per UTC minute: do not start right before one ends.
    while chrono::Utc::now().timestamp() % 60 > 45 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for i in 0..6 {
        say(
            &h,
            &format!("$m{i}"),
            &format!("question number {i} about otters"),
        )
        .await;
    }
    let sent = h.hs.sent();
    assert_eq!(h.xai.seen().len(), 3, "three answers were paid for");
    assert_eq!(sent.len(), 4, "three answers and one notice");
    assert_eq!(
        sent[3].body["msgtype"], "m.notice",
        "bots do not answer a notice"
    );
    for i in 3..6 {
        let row = h.row(&format!("$m{i}")).await;
        assert_eq!(row.degraded, "room_rate_limited");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kicked_bot_forgets_the_room() {
    let h = dm_harness(|_| {}).await;
    h.hs.set_state(DM, room_state(50));
    say(&h, "$set", "!grok route web_then_grok").await;
    let kick = json!({
        "event_id": "$kick", "room_id": DM, "sender": ALICE, "type": "m.room.member",
        "state_key": BOT, "origin_server_ts": common::now_ms(),
        "content": {"membership": "leave"}, "unsigned": {"prev_content": {"membership": "join"}},
    });
    h.put_txn("kick", vec![kick]).await;
    h.settle().await;
    assert_eq!(
        h.hs.calls_to("/forget"),
        1,
        "the room leaves the bot's list"
    );
    let settings = h.state.store.room_settings(DM.into()).await.unwrap();
    assert_eq!(settings, Default::default(), "a later invite starts afresh");
}
