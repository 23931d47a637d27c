//! Images sent to the bot, end to end through the real router with the fake homeserver (its
//! media repository) and the fake xAI: what is downloaded, what reaches the model, and what
//! is refused before any download.

mod common;

use base64::Engine;
use serde_json::{json, Value};

use common::*;
use grok_appservice::config::Config;

const DM: &str = "!dm:example.org";
const DM2: &str = "!dm2:example.org";
const VISION: &str = "grok-vision-test";

/// Bytes that start like a PNG; the model side only sees them as base64.
fn png_bytes(len: usize) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    b.extend((0..len).map(|i| (i % 251) as u8));
    b
}

async fn harness(tweak: impl FnOnce(&mut Config)) -> Harness {
    let h = Harness::with(db::sqlite(), |c| {
        c.models.vision = Some(VISION.into());
        tweak(c);
    })
    .await;
    h.known_room(DM, true, &[BOT, ALICE]).await;
    h.known_room(DM2, true, &[BOT, ALICE]).await;
    h
}

fn image_event(id: &str, room: &str, content: Value) -> Value {
    json!({"event_id": id, "room_id": room, "sender": ALICE, "type": "m.room.message",
           "origin_server_ts": now_ms(), "content": content})
}

fn image_content(url: &str, caption: Option<&str>, mimetype: &str, size: Option<usize>) -> Value {
    let mut info = json!({"mimetype": mimetype});
    if let Some(s) = size {
        info["size"] = json!(s);
    }
    let mut c = json!({"msgtype": "m.image", "body": "error.png", "url": url, "info": info});
    if let Some(text) = caption {
        c["body"] = json!(text);
        c["filename"] = json!("error.png");
    }
    c
}

/// The image parts of the last user turn of a Responses API body, decoded.
fn image_parts(body: &Value) -> Vec<Vec<u8>> {
    let input = body["input"].as_array().unwrap();
    let Some(parts) = input.last().unwrap()["content"].as_array() else {
        return vec![];
    };
    parts
        .iter()
        .filter(|p| p["type"] == "input_image")
        .map(|p| {
            let url = p["image_url"].as_str().unwrap();
            let b64 = url.split_once(";base64,").unwrap().1;
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap()
        })
        .collect()
}

fn text_part(body: &Value) -> String {
    let input = body["input"].as_array().unwrap();
    let parts = input.last().unwrap()["content"].as_array().unwrap();
    parts
        .iter()
        .find(|p| p["type"] == "input_text")
        .and_then(|p| p["text"].as_str())
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_captioned_image_in_a_direct_chat_is_answered_with_its_bytes() {
    let h = harness(|_| {}).await;
    let bytes = png_bytes(3_000);
    let url = h.hs.upload("image/png", &bytes);
    let content = image_content(
        &url,
        Some("what does this mean?"),
        "image/png",
        Some(bytes.len()),
    );
    h.put_txn("t1", vec![image_event("$img", DM, content)])
        .await;
    h.settle().await;

    let calls = h.xai.seen();
    assert_eq!(calls.len(), 1, "one provider request");
    let body = &calls[0].body;
    assert_eq!(body["model"], VISION, "models.vision answers images");
    assert_eq!(
        image_parts(body),
        vec![bytes],
        "the upload's bytes, unchanged"
    );
    assert!(text_part(body).ends_with("what does this mean?"));
    let downloads = h.hs.downloads();
    assert_eq!(downloads.len(), 1);
    assert!(downloads[0]
        .path
        .starts_with("/_matrix/client/v1/media/download/example.org/"));
    assert_eq!(
        downloads[0].headers["authorization"],
        format!("Bearer {}", h.state.registration.as_token),
        "downloaded as the bot"
    );

    let sent = h.hs.sent();
    assert_eq!(sent.len(), 1, "one reply");
    assert!(sent[0].body["body"]
        .as_str()
        .unwrap()
        .starts_with("answer to:"));
    let row = h.row("$img").await;
    assert_eq!(
        (row.route.as_str(), row.images, row.ok, row.cache_hit),
        ("grok_direct", 1, true, false)
    );
    assert!(row.models.contains(VISION), "{}", row.models);
}

/// An attachment encrypted as a client in an encrypted room does it: (ciphertext, the `file`
/// content without its `url`).
fn encrypt_attachment(plain: &[u8]) -> (Vec<u8>, Value) {
    use std::io::Read;
    let mut input = std::io::Cursor::new(plain.to_vec());
    let mut encryptor = matrix_sdk_crypto::AttachmentEncryptor::new(&mut input);
    let mut ciphertext = Vec::new();
    encryptor.read_to_end(&mut ciphertext).unwrap();
    (
        ciphertext,
        serde_json::to_value(encryptor.finish()).unwrap(),
    )
}

/// In an encrypted room an image is an encrypted attachment (`file`, not `url`): the
/// homeserver serves ciphertext as `application/octet-stream`; the bot decrypts it with the
/// key from the (decrypted) event, checks its hash and sends the model the plaintext image.
#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_image_is_decrypted_with_its_key_and_its_hash_checked() {
    let h = harness(|_| {}).await;
    let bytes = png_bytes(2_000);
    let (ciphertext, file) = encrypt_attachment(&bytes);
    let content_for = |url: String| {
        let mut file = file.clone();
        file["url"] = json!(url);
        json!({"msgtype": "m.image", "body": "what is this?", "filename": "x.png",
               "file": file, "info": {"mimetype": "image/png", "size": bytes.len()}})
    };
    let good = h.hs.upload("application/octet-stream", &ciphertext);
    let mut tampered = ciphertext.clone();
    tampered[10] ^= 0x55;
    let bad = h.hs.upload("application/octet-stream", &tampered);
    h.put_txn("t1", vec![image_event("$enc", DM, content_for(good))])
        .await;
    h.put_txn("t2", vec![image_event("$bad", DM2, content_for(bad))])
        .await;
    h.settle().await;

    assert_eq!(h.hs.downloads().len(), 2);
    let calls = h.xai.seen();
    assert_eq!(
        calls.len(),
        1,
        "only the image that decrypts reaches the model"
    );
    assert_eq!(
        image_parts(&calls[0].body),
        vec![bytes],
        "the plaintext image"
    );
    let input = calls[0].body["input"].to_string();
    assert!(
        input.contains("data:image/png;base64,"),
        "its type read from its bytes"
    );
    assert!(text_part(&calls[0].body).ends_with("what is this?"));
    let row = h.row("$enc").await;
    assert_eq!(
        (row.route.as_str(), row.images, row.ok),
        ("grok_direct", 1, true)
    );
    let row = h.row("$bad").await;
    assert_eq!(
        (row.route.as_str(), row.degraded.as_str()),
        ("none", "image_rejected")
    );
    assert!(row.err.contains("cannot be decrypted"), "{}", row.err);
    let sent = h.hs.sent();
    assert_eq!(sent.len(), 2, "the answer and the apology");
    assert!(sent.iter().any(|s| s.body["body"]
        .as_str()
        .unwrap()
        .contains("couldn't decrypt that image")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bare_image_is_described_and_never_cached() {
    let h = harness(|_| {}).await;
    let bytes = png_bytes(100);
    let url = h.hs.upload("image/png", &bytes);
    for (i, room) in [DM, DM2].into_iter().enumerate() {
        let content = image_content(&url, None, "image/png", Some(bytes.len()));
        let id = format!("$bare{i}");
        h.put_txn(&format!("t{i}"), vec![image_event(&id, room, content)])
            .await;
        h.settle().await;
    }
    let calls = h.xai.seen();
    assert_eq!(calls.len(), 2, "the same image twice: no cached answer");
    assert_eq!(text_part(&calls[0].body), "Describe this image.");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_text_reply_to_an_earlier_image_carries_it() {
    let h = harness(|_| {}).await;
    let bytes = png_bytes(500);
    let url = h.hs.upload("image/jpeg", &bytes);
    // The image was sent earlier (not to the bot); the question replies to it.
    h.hs.add_event(image_event(
        "$earlier",
        DM,
        image_content(&url, None, "image/jpeg", None),
    ));
    let mut question = text_event("$q", DM, ALICE, "what breed is this cat?");
    question["content"]["m.relates_to"] = json!({"m.in_reply_to": {"event_id": "$earlier"}});
    h.put_txn("t1", vec![question]).await;
    h.settle().await;

    let calls = h.xai.seen();
    assert_eq!(calls.len(), 1);
    assert_eq!(image_parts(&calls[0].body), vec![bytes]);
    assert!(text_part(&calls[0].body).contains("what breed is this cat?"));
    assert!(
        calls[0].body["input"].as_array().unwrap().last().unwrap()["content"][0]["image_url"]
            .as_str()
            .unwrap()
            .starts_with("data:image/jpeg;base64,")
    );
    let row = h.row("$q").await;
    assert_eq!((row.images, row.ok), (1, true));
}

#[tokio::test(flavor = "multi_thread")]
async fn oversize_and_unsupported_images_get_the_notice_without_a_download() {
    let h = harness(|c| c.vision.max_bytes = 1_000).await;
    let big = h.hs.upload("image/png", &png_bytes(5_000));
    let tiff = h.hs.upload("image/tiff", &png_bytes(10));
    let too_big = image_content(&big, Some("what is it?"), "image/png", Some(5_008));
    let wrong_type = image_content(&tiff, Some("and this?"), "image/tiff", Some(18));
    h.put_txn("t1", vec![image_event("$big", DM, too_big)])
        .await;
    h.put_txn("t2", vec![image_event("$tiff", DM2, wrong_type)])
        .await;
    h.settle().await;

    assert!(h.hs.downloads().is_empty(), "refused before any download");
    assert!(h.xai.seen().is_empty(), "no model call");
    let sent = h.hs.sent();
    assert_eq!(sent.len(), 2, "one notice per room");
    for s in &sent {
        assert_eq!(s.body["msgtype"], "m.notice");
        assert!(s.body["body"].as_str().unwrap().contains("JPEG, PNG"));
    }
    for id in ["$big", "$tiff"] {
        let row = h.row(id).await;
        assert_eq!(
            (row.route.as_str(), row.degraded.as_str(), row.images),
            ("none", "image_rejected", 0),
            "{id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_download_stops_past_max_bytes_and_checks_the_served_type() {
    let h = harness(|c| c.vision.max_bytes = 1_000).await;
    // The sender's client declared no size (or a wrong one): the stream is cut at the cap.
    let big = h.hs.upload("image/png", &png_bytes(200_000));
    let html = h.hs.upload("text/html", &png_bytes(10));
    let undeclared = image_content(&big, Some("what is it?"), "image/png", None);
    let mislabelled = image_content(&html, Some("and this?"), "image/png", Some(18));
    h.put_txn("t1", vec![image_event("$big", DM, undeclared)])
        .await;
    h.put_txn("t2", vec![image_event("$html", DM2, mislabelled)])
        .await;
    h.settle().await;

    assert_eq!(h.hs.downloads().len(), 2);
    assert!(h.xai.seen().is_empty());
    assert_eq!(h.row("$big").await.degraded, "image_rejected");
    assert_eq!(h.row("$html").await.degraded, "image_rejected");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_download_gets_the_apology() {
    let h = harness(|_| {}).await;
    let missing = image_content(
        "mxc://example.org/gone",
        Some("what is it?"),
        "image/png",
        Some(10),
    );
    h.put_txn("t1", vec![image_event("$gone", DM, missing)])
        .await;
    h.settle().await;

    assert!(h.xai.seen().is_empty());
    let sent = h.hs.sent();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].body["body"]
        .as_str()
        .unwrap()
        .contains("couldn't fetch that image"));
    let row = h.row("$gone").await;
    assert!(!row.ok);
    assert!(row.err.contains("image download failed"), "{}", row.err);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_homeserver_is_read_through_the_legacy_media_endpoint() {
    let h = harness(|_| {}).await;
    h.hs.legacy_media_only();
    let bytes = png_bytes(64);
    let url = h.hs.upload("image/webp", &bytes);
    let content = image_content(&url, Some("grok: what is it?"), "image/webp", Some(72));
    h.put_txn("t1", vec![image_event("$old", DM, content)])
        .await;
    h.settle().await;

    let paths: Vec<String> = h.hs.downloads().into_iter().map(|s| s.path).collect();
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert!(paths[1].starts_with("/_matrix/media/v3/download/"));
    let calls = h.xai.seen();
    assert_eq!(calls.len(), 1);
    assert_eq!(image_parts(&calls[0].body), vec![bytes]);
}

#[tokio::test(flavor = "multi_thread")]
async fn thinking_about_an_image_runs_both_stages_with_it_and_reserves_its_tokens() {
    let h = harness(|_| {}).await;
    let bytes = png_bytes(64);
    let url = h.hs.upload("image/gif", &bytes);
    let content = image_content(
        &url,
        Some("!think is this proof right?"),
        "image/gif",
        Some(72),
    );
    h.put_txn("t1", vec![image_event("$think", DM, content)])
        .await;
    h.settle().await;

    let calls = h.xai.seen();
    assert_eq!(calls.len(), 2, "reasoning, then the answer");
    assert_eq!(calls[1].body["model"], VISION);
    for c in &calls {
        assert_eq!(image_parts(&c.body), vec![bytes.clone()]);
    }
    let row = h.row("$think").await;
    assert_eq!((row.route.as_str(), row.images), ("reason_then_grok", 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn with_vision_off_images_get_the_text_only_notice() {
    let h = harness(|c| c.vision.enabled = false).await;
    let url = h.hs.upload("image/png", &png_bytes(10));
    let content = image_content(&url, Some("what is it?"), "image/png", Some(18));
    h.put_txn("t1", vec![image_event("$off", DM, content)])
        .await;
    h.settle().await;

    assert!(h.hs.downloads().is_empty() && h.xai.seen().is_empty());
    let sent = h.hs.sent();
    assert!(sent[0].body["body"]
        .as_str()
        .unwrap()
        .contains("only read text"));
    assert_eq!(h.row("$off").await.degraded, "image_rejected");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_over_their_cap_is_refused_before_the_download() {
    let h = harness(|c| c.limits.per_user_daily_usd = 0.000_001).await;
    let url = h.hs.upload("image/png", &png_bytes(10));
    let content = image_content(&url, Some("what is it?"), "image/png", Some(18));
    h.put_txn("t1", vec![image_event("$capped", DM, content)])
        .await;
    h.settle().await;

    assert!(
        h.hs.downloads().is_empty(),
        "nothing is fetched for a refusal"
    );
    assert!(h.xai.seen().is_empty());
    let row = h.row("$capped").await;
    assert!(row.per_user_cap_hit);
}
