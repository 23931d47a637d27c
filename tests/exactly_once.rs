//! The exactly-once answer pipeline: fenced claims, the stored outbox, classified send errors.
//! Each test counts what the user would see (replies in the room) and what the provider was
//! paid (model calls).

mod common;

use std::time::Duration;

use common::{text_event, Harness, Scripted, ALICE, BOT};
use grok_appservice::answer::recover::recover_once;
use grok_appservice::answer::render::{Outbox, ReplyTarget};
use grok_appservice::claims::ClaimState;
use grok_appservice::config::ReplyMsgtype;
use grok_appservice::telemetry::RequestLog;
use serde_json::json;

const DM: &str = "!dm:example.org";

async fn dm_harness(tweak: impl FnOnce(&mut grok_appservice::config::Config)) -> Harness {
    let h = Harness::with(common::db::sqlite(), tweak).await;
    h.known_room(DM, true, &[BOT, ALICE]).await;
    h
}

/// Runs raw SQL against the harness's SQLite file (simulating another replica's writes).
fn sql(h: &Harness, statement: &str) {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    let path = h.db.url.trim_start_matches("sqlite://").to_string();
    let mut conn = diesel::SqliteConnection::establish(&path).unwrap();
    conn.batch_execute(statement).unwrap();
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_send_error_ends_the_claim_with_one_model_call() {
    let h = dm_harness(|_| {}).await;
    h.hs.script_send(Scripted {
        status: 403,
        body: json!({"errcode": "M_FORBIDDEN", "error": "You don't have permission to post"}),
        headers: vec![],
    });
    let event = text_event("$nopost", DM, ALICE, "what is a good name for a cat?");
    h.hs.add_event(event.clone());
    h.put_txn("p1", vec![event]).await;
    h.settle().await;
    assert_eq!(h.xai.seen().len(), 1, "the model is paid once");
    assert!(h.hs.sent().is_empty(), "nothing reached the room");
    let row = h.row("$nopost").await;
    assert_eq!(
        (row.degraded.as_str(), row.ok),
        ("send_failed", false),
        "{row:?}"
    );
    assert!(row.cost_total_ticks > 0, "the paid answer is on the books");
    let claim = h
        .state
        .store
        .claim("$nopost".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.claim_state(), ClaimState::Failed);
    assert!(
        claim.outbox.is_none(),
        "a finished claim keeps no reply text"
    );

    // No replica answers it again, however often recovery runs.
    h.state
        .store
        .release_claims(h.state.instance_id.clone())
        .await
        .unwrap();
    let other = h.restart().await;
    assert_eq!(recover_once(&other.state).await, 0);
    assert_eq!(h.xai.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transient_send_error_is_retried_from_the_stored_reply() {
    let h = dm_harness(|_| {}).await;
    for status in [500, 502] {
        h.hs.script_send(Scripted {
            status,
            body: json!({"errcode": "M_UNKNOWN", "error": "try later"}),
            headers: vec![],
        });
    }
    h.put_txn(
        "t1",
        vec![text_event("$flaky", DM, ALICE, "tell me about otters")],
    )
    .await;
    h.settle().await;
    assert_eq!(h.xai.seen().len(), 1, "one model call");
    assert_eq!(h.hs.sent().len(), 1, "one reply");
    assert_eq!(h.hs.calls_to("/send/"), 3, "two failures then the send");
    let row = h.row("$flaky").await;
    assert!(row.ok, "{row:?}");
    let claim = h.state.store.claim("$flaky".into()).await.unwrap().unwrap();
    assert_eq!(claim.claim_state(), ClaimState::Answered);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_claim_is_taken_mid_answer_stops_before_paying_or_sending() {
    let h = dm_harness(|c| c.appservice.claim_lease = Duration::from_secs(3)).await;
    h.xai.set_delay(Duration::from_secs(6));
    let event = text_event("$race", DM, ALICE, "tell me about otters");
    h.hs.add_event(event.clone());
    h.put_txn("r1", vec![event]).await;
    let first = h.state.store.claim("$race".into()).await.unwrap().unwrap();
    wait_for_claim(&h, "$race", ClaimState::Answering).await;
    assert_eq!(first.generation, 1);
    // Another replica takes the claim over (as after a lapse of this one's lease).
    sql(
        &h,
        "UPDATE processed_events SET lease_owner = 'other', generation = generation + 1 \
         WHERE event_id = '$race'",
    );
    h.settle().await;
    assert_eq!(h.hs.sent().len(), 0, "the first worker never sends");
    assert_eq!(
        h.xai.seen().len(),
        0,
        "its call in flight was dropped; it made no other"
    );
    let claim = h.state.store.claim("$race".into()).await.unwrap().unwrap();
    assert_eq!((claim.lease_owner.as_str(), claim.generation), ("other", 2));
    assert!(
        claim.outbox.is_none(),
        "nothing was stored under a lost fence"
    );

    // The new holder dies too; recovery answers it, once.
    h.xai.set_delay(Duration::ZERO);
    sql(
        &h,
        "UPDATE processed_events SET lease_expires_at = '2000-01-01 00:00:00' \
         WHERE event_id = '$race'",
    );
    let other = h.restart().await;
    assert_eq!(recover_once(&other.state).await, 1);
    other.settle().await;
    assert_eq!(h.hs.sent().len(), 1, "one reply in the room");
    assert_eq!(
        h.xai.seen().len(),
        1,
        "paid once after the call that was in flight"
    );
    let claim = h.state.store.claim("$race".into()).await.unwrap().unwrap();
    assert_eq!(
        (claim.claim_state(), claim.generation),
        (ClaimState::Answered, 3)
    );
}

/// Waits until the claim reaches `state`.
async fn wait_for_claim(h: &Harness, event_id: &str, state: ClaimState) {
    for _ in 0..1000 {
        let claim = h.state.store.claim(event_id.into()).await.unwrap();
        if claim.is_some_and(|c| c.claim_state() == state) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{event_id} never reached {state:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn recovery_sends_the_rest_of_a_stored_reply_without_asking_the_model() {
    let h = dm_harness(|_| {}).await;
    h.claim_directly(
        "o1",
        "$stored",
        h.state.instance_id.clone(),
        Duration::from_secs(60),
    )
    .await;
    let claim = h
        .state
        .store
        .claim("$stored".into())
        .await
        .unwrap()
        .unwrap();
    let text = (0..3000)
        .map(|i| {
            format!("Paragraph {i}: otters hold hands while they sleep, so they do not drift.")
        })
        .collect::<Vec<_>>()
        .join("\n\n");
    let target = ReplyTarget {
        event_id: "$stored",
        sender: ALICE,
        thread_root: None,
    };
    let row = RequestLog {
        id: "$stored".into(),
        room_id: DM.into(),
        sender: ALICE.into(),
        route: "grok_direct".into(),
        ok: true,
        cost_total_ticks: 1234,
        ..RequestLog::default()
    };
    let outbox = Outbox::new(ReplyMsgtype::Notice, &text, &target, "reply", row);
    assert!(outbox.parts.len() >= 3, "a long answer is split");
    assert!(h
        .state
        .store
        .claim_store_outbox(
            claim.fence(),
            serde_json::to_string(&outbox).unwrap(),
            Duration::from_secs(60)
        )
        .await
        .unwrap());
    // The worker sent the first part, then died; the homeserver has forgotten the txnId.
    h.state
        .matrix
        .send_message(DM, &outbox.parts[0].txn_id, &outbox.parts[0].content)
        .await
        .unwrap();
    h.hs.forget_txn_ids();
    h.state
        .store
        .release_claims(h.state.instance_id.clone())
        .await
        .unwrap();

    let other = h.restart().await;
    assert_eq!(recover_once(&other.state).await, 1);
    other.settle().await;
    assert_eq!(h.xai.seen().len(), 0, "the model is not asked again");
    let sent = h.hs.sent();
    assert_eq!(
        sent.len(),
        outbox.parts.len(),
        "each part once, the first not again"
    );
    let bodies: Vec<String> = sent
        .iter()
        .map(|s| s.body["body"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(bodies.join("\n\n"), text, "in order, nothing lost");
    let row = other.row("$stored").await;
    assert_eq!(
        (row.ok, row.cost_total_ticks),
        (true, 1234),
        "the stored row is written"
    );
    let claim = h
        .state
        .store
        .claim("$stored".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.claim_state(), ClaimState::Answered);
    assert!(claim.reply_event_id.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn claims_beyond_the_worker_slots_wait_in_the_database() {
    let h = dm_harness(|c| c.bot.max_concurrent_answers = 1).await;
    h.xai.set_delay(Duration::from_millis(300));
    let events: Vec<_> = (0..4)
        .map(|i| {
            text_event(
                &format!("$q{i}"),
                DM,
                ALICE,
                &format!("question number {i} about otters"),
            )
        })
        .collect();
    for e in &events {
        h.hs.add_event(e.clone());
    }
    h.put_txn("q1", events).await;
    assert_eq!(h.state.tasks.len(), 1, "one worker, the rest queued");
    let queued = h.state.store.claim("$q3".into()).await.unwrap().unwrap();
    assert_eq!(
        (queued.claim_state(), queued.attempts),
        (ClaimState::Claimed, 0)
    );
    let recovery = tokio::spawn(grok_appservice::answer::recover::recovery_loop(
        h.state.clone(),
    ));
    wait_for("every queued claim to be answered", || {
        h.hs.sent().len() == 4
    })
    .await;
    recovery.abort();
    assert_eq!(h.xai.seen().len(), 4, "each paid once");
}

/// The byte range of `host:port` in a PostgreSQL URL.
fn authority(url: &str) -> std::ops::Range<usize> {
    let at = url.find('@').map_or("postgres://".len(), |i| i + 1);
    let end = url[at..].find('/').map_or(url.len(), |i| at + i);
    at..end
}

/// `url` with its `host:port` replaced by `addr`.
fn via(url: &str, addr: std::net::SocketAddr) -> String {
    let r = authority(url);
    format!("{}{addr}{}", &url[..r.start], &url[r.end..])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_cut_off_from_the_database_past_its_lease_never_sends() {
    let Some(db) = common::db::postgres() else {
        eprintln!("TEST_DATABASE_URL unset: skipping the database outage test");
        return;
    };
    let direct = db.url.clone();
    let upstream = tokio::net::lookup_host(&direct[authority(&direct)])
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = common::proxy::CutProxy::start(upstream).await;
    let proxied = via(&direct, proxy.addr);
    let lease = Duration::from_secs(3);
    let h = Harness::with(db, |c| {
        c.database.url = proxied.clone();
        c.appservice.claim_lease = lease;
    })
    .await;
    h.known_room(DM, true, &[BOT, ALICE]).await;
    // Another replica that still reaches the database.
    let other = h.replica(|c| c.database.url = direct.clone()).await;

    h.xai.set_delay(Duration::from_secs(5));
    let event = text_event("$cut", DM, ALICE, "tell me about otters");
    h.hs.add_event(event.clone());
    h.put_txn("c1", vec![event]).await;
    wait_for_claim(&other, "$cut", ClaimState::Answering).await;
    wait_for("the first model call", || h.xai.arrived() == 1).await;
    proxy.cut();

    // Past the lease the other replica takes the claim and answers it.
    h.xai.set_delay(Duration::ZERO);
    tokio::time::sleep(lease + Duration::from_millis(500)).await;
    assert_eq!(recover_once(&other.state).await, 1);
    other.settle().await;
    assert_eq!(h.hs.sent().len(), 1, "the new holder replied");

    // The first worker's call returns into an outage that outlasts its lease; then the
    // database comes back and its renewal finds the claim taken.
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.restore();
    h.settle().await;
    assert_eq!(h.hs.sent().len(), 1, "the cut-off worker never sent");
    assert_eq!(
        (h.xai.arrived(), h.xai.seen().len()),
        (2, 2),
        "its call in flight, then the new holder's: no other call"
    );
    assert_eq!(h.state.metrics.get("claims_lost_total", &[]), 1);
    let claim = other
        .state
        .store
        .claim("$cut".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (claim.claim_state(), claim.generation),
        (ClaimState::Answered, 2)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_cancels_answers_past_the_grace_and_hands_them_over() {
    use grok_appservice::shutdown::{drain, Drained};
    let h = dm_harness(|_| {}).await;
    h.xai.set_delay(Duration::from_secs(60));
    let event = text_event("$slow", DM, ALICE, "tell me about otters");
    h.hs.add_event(event.clone());
    h.put_txn("s1", vec![event]).await;
    wait_for("the model call", || h.xai.arrived() == 1).await;

    let drained = drain(&h.state, Duration::from_millis(300)).await;
    assert_eq!(
        drained,
        Drained {
            cancelled: true,
            released: 1
        }
    );
    assert!(h.state.tasks.is_empty(), "no worker outlives the shutdown");
    assert!(h.hs.sent().is_empty());
    let claim = h.state.store.claim("$slow".into()).await.unwrap().unwrap();
    assert!(!claim.claim_state().is_final(), "{claim:?}");
    assert!(claim.lease_expires_at < grok_appservice::store::now());

    // Another replica takes it at its next sweep, not after a lease, and answers once.
    h.xai.set_delay(Duration::ZERO);
    let other = h.restart().await;
    assert_eq!(recover_once(&other.state).await, 1);
    other.settle().await;
    assert_eq!(h.hs.sent().len(), 1);

    // With nothing outlasting the grace, nothing is cancelled.
    let quiet = dm_harness(|_| {}).await;
    quiet
        .put_txn(
            "q1",
            vec![text_event("$q", DM, ALICE, "tell me about otters")],
        )
        .await;
    let drained = drain(&quiet.state, Duration::from_secs(20)).await;
    assert_eq!(
        drained,
        Drained {
            cancelled: false,
            released: 0
        }
    );
    assert_eq!(quiet.hs.sent().len(), 1, "the answer in flight finished");
}
