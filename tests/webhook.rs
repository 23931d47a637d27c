//! The appservice API driven in-process through the real router, with a fake homeserver and a
//! fake xAI server on loopback.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};

use common::*;
use grok_appservice::matrix::reply_txn_id;

const DM: &str = "!dm:example.org";
const GROUP: &str = "!group:example.org";

async fn dm_harness() -> Harness {
    let h = Harness::new().await;
    h.known_room(DM, true, &[BOT, ALICE]).await;
    h
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_accepts_only_the_hs_token() {
    let h = Harness::new().await;
    let body = || Body::from(r#"{"events": []}"#);
    let put = |auth: Option<String>, query: &str| {
        let mut r = Request::put(format!("/_matrix/app/v1/transactions/t1{query}"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.body(body()).unwrap()
    };
    let good = format!("Bearer {}", h.hs_token);

    let (s, b) = h.call(put(None, "")).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_MISSING_TOKEN"))
    );
    let (s, b) = h.call(put(Some("Bearer wrong".into()), "")).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::FORBIDDEN, Some("M_FORBIDDEN"))
    );
    let (s, _) = h.call(put(Some(format!("Basic {}", h.hs_token)), "")).await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "a non-Bearer scheme is not a token"
    );
    // Legacy query parameter alone.
    let (s, b) = h
        .call(put(None, &format!("?access_token={}", h.hs_token)))
        .await;
    assert_eq!((s, b), (StatusCode::OK, json!({})));
    let (s, _) = h.call(put(None, "?access_token=nope")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Both present: both must match.
    let (s, _) = h.call(put(Some(good.clone()), "?access_token=nope")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = h
        .call(put(
            Some(good.clone()),
            &format!("?access_token={}", h.hs_token),
        ))
        .await;
    assert_eq!(s, StatusCode::OK);
    // The as_token is not the hs_token.
    let (s, _) = h
        .call(put(
            Some(format!("Bearer {}", h.state.registration.as_token)),
            "",
        ))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread")]
async fn query_ping_health_and_unknown_paths() {
    let h = Harness::new().await;
    let authed = |method: &str, path: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {}", h.hs_token))
            .body(Body::from("{}"))
            .unwrap()
    };
    let bot = "/_matrix/app/v1/users/%40grok%3Aexample.org";
    assert_eq!(
        h.call(authed("GET", bot)).await,
        (StatusCode::OK, json!({}))
    );
    let (s, b) = h
        .call(authed("GET", "/_matrix/app/v1/users/%40bob%3Aexample.org"))
        .await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::NOT_FOUND, Some("M_NOT_FOUND"))
    );
    let (s, b) = h
        .call(authed("GET", "/_matrix/app/v1/rooms/%23any%3Aexample.org"))
        .await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::NOT_FOUND, Some("M_NOT_FOUND"))
    );
    assert_eq!(
        h.call(authed("POST", "/_matrix/app/v1/ping")).await,
        (StatusCode::OK, json!({}))
    );
    let (s, _) = h.call(get(bot)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "queries need the token too");

    let (s, b) = h.call(authed("GET", "/_matrix/app/v1/nothing")).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::NOT_FOUND, Some("M_UNRECOGNIZED"))
    );
    let (s, b) = h
        .call(authed("GET", "/_matrix/app/v1/transactions/x"))
        .await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("M_UNRECOGNIZED"))
    );

    let (status, health) = h.call(get("/health")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        h.call(get("/ready")).await,
        (StatusCode::OK, json!({"ready": true}))
    );
    h.state
        .accepting
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        h.call(get("/ready")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let (s, b) = h.call(get("/metrics")).await;
    assert_eq!(s, StatusCode::OK);
    let text = b["raw"].as_str().unwrap();
    assert!(text.contains("grok_transactions_total"));
    // The default 10 USD ceiling, and nothing spent yet: what the spend alert compares.
    assert!(
        text.contains("grok_budget_ceiling_ticks 100000000000"),
        "{text}"
    );
    assert!(text.contains("grok_budget_spent_today_ticks 0"), "{text}");
}

/// `grok_encryption_device_owned` is reported only with encryption on (the alert sums it over
/// the replicas), and says 0 while this replica does not run the device.
#[tokio::test(flavor = "multi_thread")]
async fn the_encryption_owner_gauge_is_reported_with_encryption_on() {
    let metrics = |h: Harness| async move {
        let (s, b) = h.call(get("/metrics")).await;
        assert_eq!(s, StatusCode::OK);
        b["raw"].as_str().unwrap().to_string()
    };
    let off = metrics(Harness::new().await).await;
    assert!(!off.contains("grok_encryption_device_owned"), "{off}");
    let on = metrics(Harness::with(db::sqlite(), |c| c.encryption.enabled = true).await).await;
    assert!(
        on.contains("# TYPE grok_encryption_device_owned gauge\ngrok_encryption_device_owned 0\n"),
        "{on}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_bodies_get_matrix_errors() {
    let h = Harness::new().await;
    let (s, b) = h.put_raw("b1", "not json").await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::BAD_REQUEST, Some("M_NOT_JSON"))
    );
    let (s, b) = h.put_raw("b2", r#"{"events": 5}"#).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::BAD_REQUEST, Some("M_BAD_JSON"))
    );
    let (s, b) = h.put_raw("b3", r#"["events"]"#).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::BAD_REQUEST, Some("M_BAD_JSON"))
    );
    let (s, b) = h.put_raw("b4", vec![0xff_u8, 0xfe, 0x7b]).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::BAD_REQUEST, Some("M_NOT_JSON"))
    );
    let garbage: Vec<u8> = (0..10 * 1024 * 1024)
        .map(|i| b"abc{}[]\"\\"[i % 9])
        .collect();
    let (s, b) = h.put_raw("b5", garbage).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::BAD_REQUEST, Some("M_NOT_JSON"))
    );
    let huge = vec![b' '; grok_appservice::webhook::MAX_BODY_BYTES + 1];
    let (s, b) = h.put_raw("b6", huge).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("M_TOO_LARGE"))
    );
    // An 8 MiB transaction of valid events is accepted.
    let filler = "x".repeat(60_000);
    let events: Vec<Value> = (0..140)
        .map(|i| text_event(&format!("$big{i}"), GROUP, ALICE, &filler))
        .collect();
    let (s, _) = h.put_txn("b7", events).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h.xai.seen().is_empty(), "nothing there addressed the bot");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_event_is_skipped_alone() {
    let h = dm_harness().await;
    let events = vec![
        json!({"type": "m.room.message", "room_id": DM, "sender": ALICE, "content": {"body": "no id"}}),
        json!("not an object"),
        json!({"event_id": "$bad", "room_id": DM, "sender": ALICE, "type": "m.room.message", "content": 7}),
        text_event("$good", DM, ALICE, "what is the speed of light?"),
    ];
    let (s, b) = h.put_txn("m1", events).await;
    assert_eq!((s, b), (StatusCode::OK, json!({})));
    h.settle().await;
    assert_eq!(h.xai.seen().len(), 1);
    assert_eq!(h.hs.sent().len(), 1);
    assert_eq!(
        h.state
            .metrics
            .get("events_total", &[("verdict", "malformed")]),
        3
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_direct_message_is_answered_as_a_rich_reply() {
    let h = dm_harness().await;
    let (s, b) = h
        .put_txn(
            "a1",
            vec![text_event(
                "$q1",
                DM,
                ALICE,
                "What is the capital of France?",
            )],
        )
        .await;
    assert_eq!((s, b), (StatusCode::OK, json!({})));
    h.settle().await;

    let calls = h.xai.seen();
    assert_eq!(calls.len(), 1);
    let req = &calls[0];
    assert_eq!(req.headers["authorization"], "Bearer xai-test-key");
    assert_eq!(req.body["model"], "grok-4.3");
    assert_eq!(
        req.body["input"][0]["content"],
        "What is the capital of France?"
    );
    assert_eq!(req.body["prompt_cache_key"], DM);
    assert!(req.body["instructions"].as_str().unwrap().contains("Grok"));
    assert!(
        !req.body["user"].as_str().unwrap().contains("alice"),
        "the user id is hashed"
    );

    let sent = h.hs.sent();
    assert_eq!(sent.len(), 1);
    let reply = &sent[0];
    assert!(
        reply.path.ends_with(&reply_txn_id("$q1", "reply")),
        "{}",
        reply.path
    );
    assert_eq!(reply.body["msgtype"], "m.notice");
    assert_eq!(
        reply.body["body"],
        "answer to: What is the capital of France?"
    );
    assert_eq!(
        reply.body["m.relates_to"]["m.in_reply_to"]["event_id"],
        "$q1"
    );
    assert_eq!(reply.body["m.mentions"]["user_ids"], json!([ALICE]));
    assert_eq!(
        reply.headers["authorization"],
        format!("Bearer {}", h.state.registration.as_token)
    );
    assert!(h.hs.calls_to("/typing/") >= 2, "typing on, then off");

    let row = h.row("$q1").await;
    assert_eq!(row.route, "grok_direct");
    assert_eq!(row.router_source, "default");
    assert!(row.ok);
    assert_eq!(row.cost_total_ticks, FAKE_COST_TICKS);
    assert_eq!(row.cost_final_ticks, FAKE_COST_TICKS);
    assert_eq!(row.cost_source, "reported");
    assert_eq!(
        (row.prompt_tokens, row.cached_tokens, row.completion_tokens),
        (120, 20, 30)
    );
    assert_eq!(row.provider_request_id, "req-fake-1");
    assert_eq!(row.query_text, "", "message text is not stored by default");
    assert_eq!(row.degraded, "");
    let models: Value = serde_json::from_str(&row.models).unwrap();
    assert_eq!(models["final"], "grok-4.3");
    let stages: Value = serde_json::from_str(&row.stage_ms).unwrap();
    assert!(stages["final"].is_u64());
    // Per-stage tokens, and grok_direct's own estimate: its final call's real tokens.
    let usage: Value = serde_json::from_str(&row.stage_usage).unwrap();
    assert_eq!(
        usage,
        json!({"final": {"input": 120, "cached": 20, "output": 30, "reasoning": 0,
                         "web_search_calls": 0}})
    );
    assert_eq!(
        (row.direct_input_tokens, row.direct_output_tokens),
        (120, 30)
    );

    let claim = h.state.store.claim("$q1".into()).await.unwrap().unwrap();
    assert_eq!(claim.state, "answered");
    assert_eq!(claim.reply_event_id.as_deref(), Some("$reply1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_txn_id_does_nothing_also_after_a_restart() {
    let h = dm_harness().await;
    let events = vec![text_event("$q1", DM, ALICE, "hello?")];
    assert_eq!(h.put_txn("r1", events.clone()).await.0, StatusCode::OK);
    assert_eq!(
        h.put_txn("r1", events.clone()).await,
        (StatusCode::OK, json!({}))
    );
    h.settle().await;
    assert_eq!(h.xai.seen().len(), 1);

    let again = h.restart().await;
    assert_eq!(
        again.put_txn("r1", events).await,
        (StatusCode::OK, json!({}))
    );
    again.settle().await;
    assert_eq!(h.xai.seen().len(), 1);
    assert_eq!(h.hs.sent().len(), 1);
    assert_eq!(
        again
            .state
            .metrics
            .get("transactions_total", &[("result", "duplicate")]),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_puts_of_one_txn_are_processed_once() {
    let h = dm_harness().await;
    let events: Vec<Value> = (0..5)
        .map(|i| text_event(&format!("$c{i}"), DM, ALICE, &format!("question {i}")))
        .collect();
    let puts = (0..6).map(|_| h.put_txn("same", events.clone()));
    for (status, body) in futures_join_all(puts).await {
        assert_eq!((status, body), (StatusCode::OK, json!({})));
    }
    h.settle().await;
    assert_eq!(h.xai.seen().len(), 5);
    assert_eq!(h.hs.sent().len(), 5);
}

async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut out = Vec::new();
    let handles: Vec<_> = futures.collect();
    // Poll them together so they really race.
    let mut pinned: Vec<_> = handles.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if done[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => done[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.extend(done.into_iter().map(Option::unwrap));
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_event_in_a_later_transaction_is_answered_once() {
    let h = dm_harness().await;
    let event = text_event("$dup", DM, ALICE, "tell me a joke");
    h.put_txn("d1", vec![event.clone()]).await;
    h.put_txn(
        "d2",
        vec![
            event.clone(),
            text_event("$other", DM, ALICE, "and another"),
        ],
    )
    .await;
    h.settle().await;
    assert_eq!(h.xai.seen().len(), 2);
    let mut replies: Vec<String> =
        h.hs.sent()
            .iter()
            .map(|s| {
                s.body["m.relates_to"]["m.in_reply_to"]["event_id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
    // Answers run concurrently: compare as a set.
    replies.sort();
    assert_eq!(replies, vec!["$dup", "$other"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn group_chatter_is_ignored_and_mentions_are_answered_in_threads() {
    let h = Harness::new().await;
    h.known_room(GROUP, false, &[BOT, ALICE, "@bob:example.org"])
        .await;
    let mut threaded = mention_event("$t", GROUP, ALICE, "grok: in a thread");
    threaded["content"]["m.relates_to"] = json!({"rel_type": "m.thread", "event_id": "$root",
        "is_falling_back": true, "m.in_reply_to": {"event_id": "$root"}});
    h.put_txn(
        "g1",
        vec![
            text_event("$chat", GROUP, "@bob:example.org", "lunch at noon?"),
            mention_event("$m", GROUP, ALICE, "what do otters eat?"),
            threaded,
        ],
    )
    .await;
    h.settle().await;
    let inputs: Vec<String> = h
        .xai
        .seen()
        .iter()
        .map(|s| s.body["input"][0]["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(inputs.len(), 2);
    assert!(inputs.contains(&"what do otters eat?".to_string()));
    assert!(
        inputs.contains(&"in a thread".to_string()),
        "the name prefix is stripped"
    );
    let sent = h.hs.sent();
    let in_thread = sent
        .iter()
        .find(|s| s.body["m.relates_to"]["m.in_reply_to"]["event_id"] == "$t")
        .unwrap();
    assert_eq!(in_thread.body["m.relates_to"]["rel_type"], "m.thread");
    assert_eq!(in_thread.body["m.relates_to"]["event_id"], "$root");
    assert!(
        h.state
            .store
            .request_log("$chat".into())
            .await
            .unwrap()
            .is_none(),
        "chatter leaves no row"
    );

    // A reply to the bot's answer addresses it without a mention.
    let bot_reply = h
        .state
        .store
        .claim("$m".into())
        .await
        .unwrap()
        .unwrap()
        .reply_event_id
        .unwrap();
    let mut follow_up = text_event("$f", GROUP, ALICE, "and sea otters");
    follow_up["content"]["m.relates_to"] = json!({"m.in_reply_to": {"event_id": bot_reply}});
    h.put_txn("g2", vec![follow_up]).await;
    h.settle().await;
    assert_eq!(h.xai.seen().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn membership_changes_make_and_unmake_a_direct_room() {
    let h = Harness::new().await;
    h.known_room(GROUP, false, &[BOT, ALICE, "@bob:example.org"])
        .await;
    let leave = json!({"event_id": "$leave", "room_id": GROUP, "sender": "@bob:example.org",
        "type": "m.room.member", "state_key": "@bob:example.org", "content": {"membership": "leave"},
        "unsigned": {"prev_content": {"membership": "join"}}});
    // Bob leaves, then Alice talks without a mention in the same transaction: now a room of two.
    h.put_txn(
        "mm1",
        vec![leave, text_event("$after", GROUP, ALICE, "just us now")],
    )
    .await;
    h.settle().await;
    assert_eq!(h.xai.seen().len(), 1);
    let join = json!({"event_id": "$join", "room_id": GROUP, "sender": "@carol:example.org",
        "type": "m.room.member", "state_key": "@carol:example.org", "content": {"membership": "join"}});
    h.put_txn("mm2", vec![join]).await;
    h.put_txn(
        "mm3",
        vec![text_event("$later", GROUP, ALICE, "chatting with carol")],
    )
    .await;
    h.settle().await;
    assert_eq!(h.xai.seen().len(), 1, "three members again: not addressed");
}

#[tokio::test(flavor = "multi_thread")]
async fn addressed_media_gets_a_notice_and_no_model_call() {
    let h = dm_harness().await;
    // Files, audio and video are not read (images are: tests/images.rs).
    let file = |id: &str| {
        json!({"event_id": id, "room_id": DM, "sender": ALICE, "type": "m.room.message",
        "origin_server_ts": now_ms(), "content": {"msgtype": "m.file", "body": "report.pdf",
        "url": "mxc://x/y", "info": {"mimetype": "application/pdf"}}})
    };
    h.put_txn("i1", vec![file("$img1"), file("$img2")]).await;
    h.settle().await;
    assert!(h.xai.seen().is_empty());
    let sent = h.hs.sent();
    assert_eq!(sent.len(), 1, "the notice is rate limited per room");
    assert_eq!(sent[0].body["msgtype"], "m.notice");
    assert!(sent[0].body["body"].as_str().unwrap().contains("text"));
    let row = h.row("$img1").await;
    assert_eq!(
        (
            row.route.as_str(),
            row.router_source.as_str(),
            row.degraded.as_str(),
            row.ok
        ),
        ("none", "default", "media", false)
    );
    assert_eq!(h.row("$img2").await.degraded, "media");
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_direct_messages_get_one_notice_a_day() {
    let h = dm_harness().await;
    let enc = |id: &str| {
        json!({"event_id": id, "room_id": DM, "sender": ALICE, "type": "m.room.encrypted",
        "content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AAAA"}})
    };
    h.put_txn("e1", vec![enc("$e1")]).await;
    h.put_txn("e2", vec![enc("$e2")]).await;
    h.settle().await;
    assert_eq!(h.hs.sent().len(), 1);
    assert!(h.hs.sent()[0].body["body"]
        .as_str()
        .unwrap()
        .contains("encrypted"));
    assert_eq!(h.row("$e2").await.degraded, "encrypted_room");
}

#[tokio::test(flavor = "multi_thread")]
async fn invites_are_accepted_or_declined_by_the_inviters_server() {
    let h = Harness::new().await;
    h.hs.set_members("!new:example.org", &[BOT, ALICE]);
    let invite = |id: &str, room: &str, sender: &str| {
        json!({"event_id": id, "room_id": room, "sender": sender,
        "type": "m.room.member", "state_key": BOT, "content": {"membership": "invite", "is_direct": true}})
    };
    h.put_txn(
        "v1",
        vec![
            invite("$inv1", "!new:example.org", ALICE),
            // A room v12 id has no server part; the inviter's server decides.
            invite("$inv2", "!opaqueroomid", "@mallory:evil.net"),
        ],
    )
    .await;
    h.settle().await;
    assert_eq!(h.hs.calls_to("/join/!new:example.org"), 1);
    assert_eq!(h.hs.calls_to("/rooms/!opaqueroomid/leave"), 1);
    assert_eq!(h.hs.calls_to("/join/!opaqueroomid"), 0);
    let row = h.row("$inv2").await;
    assert_eq!(
        (row.route.as_str(), row.degraded.as_str()),
        ("none", "foreign_room")
    );
    // The joined DM is known now: a plain message is answered.
    h.put_txn(
        "v2",
        vec![text_event(
            "$hi",
            "!new:example.org",
            ALICE,
            "how do tides work",
        )],
    )
    .await;
    h.settle().await;
    assert_eq!(h.xai.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn own_echoes_are_remembered_and_never_answered() {
    let h = dm_harness().await;
    let mut echo = text_event("$mine", DM, BOT, "an earlier answer");
    echo["content"]["msgtype"] = json!("m.notice");
    h.put_txn("o1", vec![echo]).await;
    let mut reply = text_event("$re", GROUP, ALICE, "why so?");
    reply["content"]["m.relates_to"] = json!({"m.in_reply_to": {"event_id": "$mine"}});
    h.known_room(GROUP, false, &[BOT, ALICE, "@bob:example.org"])
        .await;
    h.put_txn("o2", vec![reply]).await;
    h.settle().await;
    assert_eq!(h.xai.seen().len(), 1, "only the reply to the bot's echo");
}

#[tokio::test(flavor = "multi_thread")]
async fn provider_failures_end_in_an_apology_and_a_row() {
    let h = dm_harness().await;
    h.xai.script(
        401,
        json!({"code": "unauthenticated", "error": "Incorrect API key provided"}),
    );
    h.put_txn(
        "p1",
        vec![text_event("$p1", DM, ALICE, "tell me about otters")],
    )
    .await;
    h.settle().await;
    assert_eq!(
        h.xai.seen().len(),
        1,
        "a 401 is not retried, and no fallback for fatal errors"
    );
    let sent = h.hs.sent();
    let body = sent[0].body["body"].as_str().unwrap();
    assert!(body.starts_with("Sorry"), "{body}");
    assert!(
        !body.contains("API key"),
        "internal errors never reach the user"
    );
    let row = h.row("$p1").await;
    assert!(!row.ok);
    assert!(
        row.err.contains("401") || row.err.contains("Incorrect"),
        "{}",
        row.err
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retryable_failures_are_retried_then_fall_back() {
    let h = dm_harness().await;
    // Three 503s exhaust the final model's retries; the fallback model answers.
    for _ in 0..3 {
        h.xai.script(503, json!({"error": "overloaded"}));
    }
    h.put_txn(
        "f1",
        vec![text_event("$f1", DM, ALICE, "tell me about otters")],
    )
    .await;
    h.settle().await;
    let models: Vec<String> = h
        .xai
        .seen()
        .iter()
        .map(|s| s.body["model"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        models,
        vec![
            "grok-4.3",
            "grok-4.3",
            "grok-4.3",
            "grok-4.20-non-reasoning"
        ]
    );
    let row = h.row("$f1").await;
    assert!(row.ok && row.fallback_fired);
    assert_eq!(
        serde_json::from_str::<Value>(&row.models).unwrap()["final"],
        "grok-4.20-non-reasoning"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cost_is_computed_from_prices_when_not_reported() {
    let h = dm_harness().await;
    h.xai.omit_cost();
    h.put_txn(
        "c1",
        vec![text_event("$c1", DM, ALICE, "tell me about otters")],
    )
    .await;
    h.settle().await;
    let row = h.row("$c1").await;
    // grok-4.3: 100 uncached * 12,500 + 20 cached * 2,000 + 30 out * 25,000 ticks.
    assert_eq!(
        row.cost_total_ticks,
        100 * 12_500 + 20 * 2_000 + 30 * 25_000
    );
    assert_eq!(row.cost_source, "computed");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_completion_ends_in_a_short_apology() {
    let h = dm_harness().await;
    h.xai
        .script(200, response_body("grok-4.3", "   ", Some(10)));
    h.put_txn(
        "x1",
        vec![text_event("$x1", DM, ALICE, "tell me about otters")],
    )
    .await;
    h.settle().await;
    assert!(h.hs.sent()[0].body["body"]
        .as_str()
        .unwrap()
        .starts_with("Sorry"));
    let row = h.row("$x1").await;
    assert_eq!(
        (row.degraded.as_str(), row.ok, row.cost_total_ticks),
        ("empty_completion", false, 10)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_homeserver_rate_limit_is_waited_out() {
    let h = dm_harness().await;
    h.hs.script_send(Scripted {
        status: 429,
        body: json!({"errcode": "M_LIMIT_EXCEEDED", "error": "slow down", "retry_after_ms": 1000}),
        headers: vec![("retry-after", "1".into())],
    });
    let started = std::time::Instant::now();
    h.put_txn(
        "l1",
        vec![text_event("$l1", DM, ALICE, "tell me about otters")],
    )
    .await;
    h.settle().await;
    assert_eq!(h.hs.sent().len(), 1);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited for Retry-After"
    );
    assert!(h.row("$l1").await.ok);
}

#[tokio::test(flavor = "multi_thread")]
async fn telemetry_can_be_off_or_keep_text() {
    let off = Harness::with(common::db::sqlite(), |c| c.telemetry.enabled = false).await;
    off.known_room(DM, true, &[BOT, ALICE]).await;
    off.put_txn("t1", vec![text_event("$t1", DM, ALICE, "secret question")])
        .await;
    off.settle().await;
    assert_eq!(off.hs.sent().len(), 1, "the answer still goes out");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(off
        .state
        .store
        .request_log("$t1".into())
        .await
        .unwrap()
        .is_none());

    let text = Harness::with(common::db::sqlite(), |c| c.telemetry.store_text = true).await;
    text.known_room(DM, true, &[BOT, ALICE]).await;
    text.put_txn("t2", vec![text_event("$t2", DM, ALICE, "keep me")])
        .await;
    text.settle().await;
    assert_eq!(text.row("$t2").await.query_text, "keep me");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_whose_worker_died_is_recovered_once() {
    let h = dm_harness().await;
    let event = text_event("$lost", DM, ALICE, "are you there?");
    h.hs.add_event(event.clone());
    // A replica claimed it and died before answering: the lease is already over.
    h.claim_directly("crashed", "$lost", "dead-replica".into(), Duration::ZERO)
        .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let other = h.restart().await;
    let (a, b) = tokio::join!(
        grok_appservice::answer::recover::recover_once(&h.state),
        grok_appservice::answer::recover::recover_once(&other.state)
    );
    assert_eq!(a + b, 1, "exactly one replica takes the claim");
    h.settle().await;
    other.settle().await;
    assert_eq!(h.xai.seen().len(), 1);
    assert_eq!(h.hs.sent().len(), 1);
    assert_eq!(
        h.hs.sent()[0].body["m.relates_to"]["m.in_reply_to"]["event_id"],
        "$lost"
    );
    assert_eq!(
        h.state
            .store
            .claim("$lost".into())
            .await
            .unwrap()
            .unwrap()
            .state,
        "answered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_database_makes_synapse_retry() {
    let broken =
        grok_appservice::store::Store::connect("postgres://nobody@127.0.0.1:1/none", 1).unwrap();
    let h = Harness::new().await;
    let state = grok_appservice::state::AppState::new(
        h.state.config.clone(),
        h.state.registration.clone(),
        broken,
        grok_appservice::state::Timings::from_config(&h.state.config),
    )
    .unwrap();
    let router = grok_appservice::webhook::router(state);
    let request = Request::put("/_matrix/app/v1/transactions/down")
        .header("authorization", format!("Bearer {}", h.hs_token))
        .body(Body::from(
            json!({"events": [text_event("$q", DM, ALICE, "hi")]}).to_string(),
        ))
        .unwrap();
    use tower::ServiceExt;
    let response = router.clone().oneshot(request).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "a 5xx, so the event is not lost"
    );
    let ready = router.oneshot(get("/ready")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread")]
async fn shutting_down_takes_no_new_claims_and_hands_over_unfinished_ones() {
    let h = dm_harness().await;
    let event = text_event("$inflight", DM, ALICE, "tell me about otters");
    h.hs.add_event(event.clone());
    // A claim this replica holds with a long lease, as if its answer were still running.
    h.claim_directly(
        "held",
        "$inflight",
        h.state.instance_id.clone(),
        Duration::from_secs(300),
    )
    .await;
    let other = h.restart().await;
    assert_eq!(
        grok_appservice::answer::recover::recover_once(&other.state).await,
        0,
        "the lease is live"
    );

    h.state
        .accepting
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (s, b) = h
        .put_txn("late", vec![text_event("$late", DM, ALICE, "one more?")])
        .await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "Synapse retries it elsewhere: {b}"
    );
    assert!(h.state.store.claim("$late".into()).await.unwrap().is_none());
    assert!(!h.state.store.txn_seen("late".into()).await.unwrap());

    assert_eq!(
        h.state
            .store
            .release_claims(h.state.instance_id.clone())
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        grok_appservice::answer::recover::recover_once(&other.state).await,
        1,
        "taken over at once"
    );
    other.settle().await;
    assert_eq!(h.hs.sent().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_answer_keeps_its_lease() {
    let h = dm_harness().await;
    h.state
        .store
        .record_bot_event("$x".into(), DM.into())
        .await
        .unwrap();
    let claim = |id: &str| grok_appservice::store::NewClaim {
        event_id: id.into(),
        room_id: DM.into(),
        sender: ALICE.into(),
        kind: grok_appservice::store::ClaimKind::Addressed,
        origin_ts: grok_appservice::store::now(),
        leased: true,
    };
    let write = grok_appservice::store::TxnWrite {
        txn_id: "l".into(),
        event_count: 1,
        claims: vec![claim("$l")],
        ..Default::default()
    };
    h.state
        .store
        .commit_transaction(write, "me".into(), Duration::ZERO)
        .await
        .unwrap();
    let fence = h
        .state
        .store
        .claim("$l".into())
        .await
        .unwrap()
        .unwrap()
        .fence();
    assert!(h
        .state
        .store
        .claim_renew(fence.clone(), Duration::from_secs(60))
        .await
        .unwrap());
    let stranger = grok_appservice::claims::Fence {
        owner: "someone-else".into(),
        ..fence
    };
    assert!(!h
        .state
        .store
        .claim_renew(stranger, Duration::from_secs(60))
        .await
        .unwrap());
    let other = h.restart().await;
    assert_eq!(
        grok_appservice::answer::recover::recover_once(&other.state).await,
        0,
        "an extended lease is not taken over"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_cannot_serve_the_same_sqlite_file() {
    let h = Harness::new().await;
    let url = h.db.url.clone();
    let first = h.state.store.lock_single_process(&url).unwrap();
    assert!(first.is_some());
    let err = h
        .state
        .store
        .lock_single_process(&url)
        .unwrap_err()
        .to_string();
    assert!(err.contains("PostgreSQL"), "{err}");
    drop(first);
    assert!(
        h.state.store.lock_single_process(&url).unwrap().is_some(),
        "free again after exit"
    );
    let pg = grok_appservice::store::Store::connect("postgres://u@127.0.0.1:1/x", 1).unwrap();
    assert!(pg
        .lock_single_process("postgres://u@127.0.0.1:1/x")
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_that_landed_before_a_crash_is_not_posted_again() {
    use grok_appservice::store::ClaimState;
    let h = dm_harness().await;
    let event = text_event("$sent", DM, ALICE, "tell me about otters");
    h.hs.add_event(event.clone());
    h.put_txn("s1", vec![event]).await;
    h.settle().await;
    assert_eq!(h.hs.sent().len(), 1);
    // The worker died after sending, before marking the claim; an hour later the homeserver
    // has forgotten the txnId.
    h.force_claim_state("$sent", ClaimState::Sending);
    h.state
        .store
        .release_claims(h.state.instance_id.clone())
        .await
        .unwrap();
    h.hs.forget_txn_ids();
    let before = h.xai.seen().len();
    assert_eq!(
        grok_appservice::answer::recover::recover_once(&h.state).await,
        1
    );
    h.settle().await;
    assert_eq!(h.hs.sent().len(), 1, "no second reply");
    assert_eq!(h.xai.seen().len(), before, "no second model call");
    // The row written before the crash is kept; had it been lost, recovery writes one.
    let row = h.row("$sent").await;
    assert!(row.ok && row.err.is_empty(), "{row:?}");
    let claim = h.state.store.claim("$sent".into()).await.unwrap().unwrap();
    assert_eq!(
        (claim.state.as_str(), claim.reply_event_id.as_deref()),
        ("answered", Some("$reply1"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recovered_reply_whose_row_died_with_its_replica_gets_one() {
    use grok_appservice::store::ClaimState;
    let h = dm_harness().await;
    let event = text_event("$norow", DM, ALICE, "tell me about otters");
    h.hs.add_event(event.clone());
    h.put_txn("n1", vec![event]).await;
    h.settle().await;
    // Simulate the crash between the send and the row: no row, claim still `sending`.
    let path = h.db.url.trim_start_matches("sqlite://").to_string();
    {
        use diesel::connection::SimpleConnection;
        use diesel::Connection;
        let mut conn = diesel::SqliteConnection::establish(&path).unwrap();
        conn.batch_execute("DELETE FROM request_log").unwrap();
    }
    h.force_claim_state("$norow", ClaimState::Sending);
    h.state
        .store
        .release_claims(h.state.instance_id.clone())
        .await
        .unwrap();
    assert_eq!(
        grok_appservice::answer::recover::recover_once(&h.state).await,
        1
    );
    h.settle().await;
    assert_eq!(h.hs.sent().len(), 1, "not posted again");
    let row = h.row("$norow").await;
    assert!(row.ok, "{row:?}");
    assert_eq!(row.route, "grok_direct");
    assert_eq!(
        row.cost_total_ticks, FAKE_COST_TICKS,
        "the settled reservation's cost"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_can_require_a_token_and_probes_are_cached() {
    let h = Harness::with(common::db::sqlite(), |c| {
        c.appservice.metrics_token = Some("scrape-secret".into())
    })
    .await;
    let with = |token: &str| {
        Request::get("/metrics")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap()
    };
    let (s, b) = h.call(get("/metrics")).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_MISSING_TOKEN"))
    );
    let (s, b) = h.call(with("wrong")).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::FORBIDDEN, Some("M_FORBIDDEN"))
    );
    let (s, b) = h.call(with("scrape-secret")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(b["raw"].as_str().unwrap().contains("grok_claims_pending 0"));

    // A claim written after the probe ran shows only once the cached figure is stale.
    h.claim_directly("m1", "$m1", "other".into(), Duration::from_secs(60))
        .await;
    let (_, b) = h.call(with("scrape-secret")).await;
    assert!(
        b["raw"].as_str().unwrap().contains("grok_claims_pending 0"),
        "cached"
    );
    tokio::time::sleep(grok_appservice::probes::PROBE_TTL).await;
    let (_, b) = h.call(with("scrape-secret")).await;
    assert!(
        b["raw"].as_str().unwrap().contains("grok_claims_pending 1"),
        "re-read"
    );
    assert_eq!(
        h.call(get("/ready")).await.0,
        StatusCode::OK,
        "/ready needs no token"
    );
}
