//! `leave-all` (uninstalling) against the fake homeserver: every joined room is left and
//! forgotten, a refused leave is reported and kept for a re-run, and the database forgets the
//! rooms.

mod common;

use common::*;
use grok_appservice::leave_all::leave_all;

#[tokio::test(flavor = "multi_thread")]
async fn the_bot_leaves_and_forgets_every_room_and_the_database_clears_them() {
    let h = Harness::new().await;
    let rooms = ["!a:example.org", "!b:example.org", "!stuck:example.org"];
    for room in rooms {
        h.hs.set_members(room, &[BOT, ALICE]);
        h.known_room(room, false, &[BOT, ALICE]).await;
    }
    // Known to the database only: the bot was removed while it was down.
    h.known_room("!stale:example.org", true, &[BOT, ALICE])
        .await;
    // Joined, but never recorded.
    h.hs.set_members("!unrecorded:example.org", &[BOT]);
    // Alice's room without the bot is not touched.
    h.hs.set_members("!other:example.org", &[ALICE]);
    h.hs.refuse_leave("!stuck:example.org");

    let report = leave_all(&h.state.matrix, &h.state.store).await.unwrap();
    assert_eq!(report.joined, 4);
    assert_eq!(report.left, 3);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, "!stuck:example.org");
    assert!(report.failed[0].1.contains("403"), "{:?}", report.failed);
    assert_eq!(report.cleared, 3, "!a, !b and the stale room");
    for room in [
        "!a:example.org",
        "!b:example.org",
        "!unrecorded:example.org",
    ] {
        assert_eq!(h.hs.calls_to(&format!("/rooms/{room}/leave")), 1, "{room}");
        assert_eq!(h.hs.calls_to(&format!("/rooms/{room}/forget")), 1, "{room}");
    }
    assert_eq!(h.hs.calls_to("/rooms/!stuck:example.org/forget"), 0);
    assert_eq!(h.hs.calls_to("/rooms/!other:example.org/"), 0);
    assert_eq!(h.hs.calls_to("/rooms/!stale:example.org/"), 0);
    assert_eq!(
        h.state.store.room_ids().await.unwrap(),
        ["!stuck:example.org"],
        "only the room it could not leave"
    );
}
