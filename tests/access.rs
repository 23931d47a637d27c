//! Who may use the bot (`rooms.allowed_users`, `rooms.denied_users`, `rooms.allowed_rooms`,
//! a per-user cap of 0), end to end through the real router with a fake homeserver and a
//! fake xAI server.

mod common;

use serde_json::json;

use common::*;
use grok_appservice::config::UserLimitConfig;
use grok_appservice::store::budget::user_scope;

const GROUP: &str = "!group:example.org";
const UNLISTED: &str = "!unlisted:example.org";
const LEAD: &str = "@team-lead:example.org";
const INTERN: &str = "@team-intern:example.org";
const BOB: &str = "@bob:example.org";

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn invite(id: &str, room: &str, sender: &str) -> serde_json::Value {
    json!({"event_id": id, "room_id": room, "sender": sender, "type": "m.room.member",
           "state_key": BOT, "content": {"membership": "invite"}})
}

/// The bodies of what the bot posted in reply to `event_id`.
fn replies_to(h: &Harness, event_id: &str) -> Vec<String> {
    h.hs.sent()
        .iter()
        .filter(|s| s.body["m.relates_to"]["m.in_reply_to"]["event_id"] == event_id)
        .map(|s| s.body["body"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn only_listed_users_in_listed_rooms_reach_the_model() {
    let h = Harness::with(db::sqlite(), |c| {
        c.rooms.allowed_users = strings(&[ALICE, "/^@team-.*:example\\.org$/"]);
        c.rooms.denied_users = strings(&["@team-int?rn:example.org"]);
        c.rooms.allowed_rooms = strings(&[GROUP]);
    })
    .await;
    let members = [BOT, ALICE, LEAD, INTERN, BOB];
    h.known_room(GROUP, false, &members).await;
    h.known_room(UNLISTED, false, &members).await;
    h.put_txn(
        "a1",
        vec![
            mention_event("$alice", GROUP, ALICE, "what do otters eat?"),
            mention_event("$lead", GROUP, LEAD, "how do tides work?"),
            mention_event("$bob", GROUP, BOB, "tell me a joke"),
            mention_event("$intern", GROUP, INTERN, "write my essay"),
            mention_event("$elsewhere", UNLISTED, ALICE, "is anyone here?"),
            invite("$inv-room", "!new:example.org", ALICE),
            invite("$inv-user", GROUP, BOB),
        ],
    )
    .await;
    h.settle().await;
    h.put_txn(
        "a2",
        vec![mention_event("$bob2", GROUP, BOB, "and another joke")],
    )
    .await;
    h.settle().await;

    let mut asked: Vec<String> = h
        .xai
        .seen()
        .iter()
        .map(|s| s.body["input"][0]["content"].as_str().unwrap().to_string())
        .collect();
    asked.sort();
    assert_eq!(asked, ["how do tides work?", "what do otters eat?"]);
    assert_eq!(replies_to(&h, "$alice").len(), 1);
    assert_eq!(replies_to(&h, "$lead").len(), 1);

    // Each refused user is told once a day, never per message.
    for id in ["$bob", "$intern"] {
        let told = replies_to(&h, id);
        assert_eq!(told.len(), 1, "{id}: {told:?}");
        assert!(told[0].contains("not allowed your account"), "{told:?}");
        let row = h.row(id).await;
        assert_eq!(
            (row.route.as_str(), row.degraded.as_str()),
            ("none", "not_allowed")
        );
    }
    assert!(
        replies_to(&h, "$bob2").is_empty(),
        "one notice per user and day"
    );
    assert_eq!(h.row("$bob2").await.degraded, "not_allowed");

    // An unlisted room is ignored: no reply, no row.
    assert!(replies_to(&h, "$elsewhere").is_empty());
    let row = h
        .state
        .store
        .request_log("$elsewhere".into())
        .await
        .unwrap();
    assert!(row.is_none(), "{row:?}");

    // Invites: into an unlisted room, or from an unlisted user, are declined.
    assert_eq!(h.hs.calls_to("/join/"), 0);
    assert_eq!(h.hs.calls_to("/rooms/!new:example.org/leave"), 1);
    assert_eq!(h.hs.calls_to(&format!("/rooms/{GROUP}/leave")), 1);
    assert_eq!(h.row("$inv-room").await.degraded, "not_allowed");
    assert_eq!(h.row("$inv-user").await.degraded, "not_allowed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_per_user_cap_of_zero_blocks_the_user_and_says_so_once() {
    const DM: &str = "!dm-carol:example.org";
    const CAROL: &str = "@carol:example.org";
    const DAVE: &str = "@dave:example.org";
    const ERIN: &str = "@erin:example.org";
    let h = Harness::with(db::sqlite(), |c| {
        let zero_spend = UserLimitConfig {
            daily_usd: Some(0.0),
            requests_per_hour: None,
        };
        let zero_requests = UserLimitConfig {
            daily_usd: None,
            requests_per_hour: Some(0),
        };
        let o = &mut c.limits.per_user_overrides;
        o.insert(CAROL.into(), zero_spend.clone());
        o.insert(ERIN.into(), zero_requests);
        // Admins are exempt from per-user caps, so an override of 0 does not block them.
        o.insert(DAVE.into(), zero_spend);
        c.limits.admins = vec![DAVE.into()];
    })
    .await;
    h.known_room(DM, true, &[BOT, CAROL]).await;
    h.known_room(GROUP, false, &[BOT, CAROL, DAVE, ERIN]).await;
    h.put_txn(
        "z1",
        vec![
            text_event("$c1", DM, CAROL, "hello?"),
            text_event("$c2", DM, CAROL, "why no answer?"),
            mention_event("$e1", GROUP, ERIN, "what is 2+2"),
            mention_event("$d1", GROUP, DAVE, "what do otters eat?"),
        ],
    )
    .await;
    h.settle().await;
    h.put_txn("z2", vec![text_event("$c3", DM, CAROL, "!usage")])
        .await;
    h.settle().await;

    assert_eq!(h.xai.seen().len(), 1, "only the admin reached the model");
    assert_eq!(replies_to(&h, "$d1").len(), 1);
    let told: Vec<String> = ["$c1", "$c2", "$c3"]
        .iter()
        .flat_map(|id| replies_to(&h, id))
        .collect();
    assert_eq!(told.len(), 1, "told once, not per message: {told:?}");
    assert!(told[0].contains("set your limit to zero"), "{told:?}");
    assert_eq!(
        replies_to(&h, "$e1").len(),
        1,
        "a zero hourly cap blocks too"
    );
    for id in ["$c1", "$c2", "$c3", "$e1"] {
        let row = h.row(id).await;
        assert_eq!(
            (row.route.as_str(), row.degraded.as_str()),
            ("none", "user_blocked")
        );
        assert_eq!(row.cost_total_ticks, 0);
    }
    // Nothing was reserved for the blocked users: they never reached the limiter.
    let day = h.state.limiter.now().format("%Y-%m-%d").to_string();
    let scopes = vec![user_scope(CAROL), user_scope(ERIN)];
    let counters = h.state.store.budget_counters(day, scopes).await.unwrap();
    assert!(counters.iter().all(|c| c.requests == 0), "{counters:?}");
}
