//! Images sent to the bot: which ones it reads (the caption rule, the limits), how many a
//! request carries, and how one is sent to the model. Pure; the download is
//! [`crate::matrix::MatrixClient::download`], and the bytes live only for the request.

use std::sync::Arc;

use base64::Engine;
use matrix_sdk_crypto::{AttachmentDecryptor, MediaEncryptionInfo};
use serde_json::Value;

use crate::cascade::router::Decision;
use crate::cascade::{Route, RouterSource};
use crate::config::VisionConfig;

/// The image types xAI's vision models accept (a GIF is read as its first frame).
pub const ACCEPTED_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/webp", "image/gif"];

/// Input tokens reserved per image: xAI's consumption docs give 256 to 1,792 tokens per image
/// depending on its size (docs.x.ai, "Consumption and rate limits"); the worst case is reserved,
/// since the limiter must not undercount.
pub const IMAGE_TOKENS: i64 = 1_792;

/// The question asked of an image sent without a caption.
pub const DESCRIBE: &str = "Describe this image.";

/// An image a message points at (`url` or, in an encrypted room, `file`; and `info`), before
/// it is downloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The media's origin server (`mxc://{server}/{media_id}`).
    pub server: String,
    pub media_id: String,
    /// `info.mimetype`, as the sender's client declared it.
    pub mimetype: Option<String>,
    /// `info.size` in bytes, as declared.
    pub size: Option<u64>,
    /// The key of an encrypted attachment; `None` for plain media.
    pub key: Option<AttachmentKey>,
}

/// The key of an encrypted attachment: `content.file` (Matrix's `EncryptedFile`: AES-256-CTR
/// key, IV and the ciphertext's SHA-256). It is key material: it lives only in memory for the
/// request, and its `Debug` shows none of it.
#[derive(Clone, PartialEq, Eq)]
pub struct AttachmentKey(Value);

impl std::fmt::Debug for AttachmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AttachmentKey(..)")
    }
}

impl AttachmentKey {
    /// The plaintext of a downloaded encrypted attachment, after its hash is checked.
    pub fn decrypt(&self, ciphertext: &[u8]) -> Result<Vec<u8>, Rejection> {
        use std::io::Read;
        let info: MediaEncryptionInfo = serde_json::from_value(self.0.clone())
            .map_err(|e| Rejection::Undecryptable(format!("its key is malformed: {e}")))?;
        let mut input = std::io::Cursor::new(ciphertext);
        let mut decryptor = AttachmentDecryptor::new(&mut input, info)
            .map_err(|e| Rejection::Undecryptable(e.to_string()))?;
        let mut plain = Vec::with_capacity(ciphertext.len());
        decryptor
            .read_to_end(&mut plain)
            .map_err(|e| Rejection::Undecryptable(e.to_string()))?;
        Ok(plain)
    }
}

/// Why an image is not read (the request then gets the media notice, `image_rejected`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("reading images is turned off (vision.enabled)")]
    Disabled,
    #[error("image type {0:?} is not one the model reads")]
    Type(String),
    #[error("image is larger than vision.max_bytes ({0} bytes)")]
    TooLarge(u64),
    #[error("the encrypted image cannot be decrypted: {0}")]
    Undecryptable(String),
}

/// The caption of a media message (Matrix 1.10): when `filename` is present and differs
/// from `body`, `body` is the caption; otherwise `body` is only the file's name.
pub fn caption(content: &Value) -> Option<&str> {
    let body = content.get("body").and_then(Value::as_str)?;
    let filename = content.get("filename").and_then(Value::as_str)?;
    (filename != body && !body.trim().is_empty()).then_some(body)
}

/// The image an `m.image` or `m.sticker` content points at: `url`, or in an encrypted room
/// `file` (the attachment and its key); `None` for a malformed `mxc://` URI.
pub fn image_ref(content: &Value) -> Option<ImageRef> {
    let (url, key) = match (content.get("url"), content.get("file")) {
        (Some(url), _) => (url.as_str()?, None),
        (None, Some(file)) => (
            file.get("url")?.as_str()?,
            Some(AttachmentKey(file.clone())),
        ),
        (None, None) => return None,
    };
    let (server, media_id) = url.strip_prefix("mxc://")?.split_once('/')?;
    let valid = |s: &str| !s.is_empty() && !s.contains('/');
    if !valid(server) || !valid(media_id) {
        return None;
    }
    let info = content.get("info");
    Some(ImageRef {
        server: server.to_string(),
        media_id: media_id.to_string(),
        mimetype: info
            .and_then(|i| i.get("mimetype"))
            .and_then(Value::as_str)
            .map(str::to_string),
        size: info.and_then(|i| i.get("size")).and_then(Value::as_u64),
        key,
    })
}

/// The accepted image type that `bytes` start with: the type of an encrypted attachment,
/// which the homeserver can only serve as `application/octet-stream`.
pub fn sniff(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

/// The media type without parameters, lowercased (`image/PNG; x=1` -> `image/png`).
fn essence(mime: &str) -> String {
    mime.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Whether a (declared or downloaded) media type is one the model reads.
pub fn accepted_type(mime: &str) -> bool {
    ACCEPTED_TYPES.contains(&essence(mime).as_str())
}

/// Checks an image before its download: vision on, a declared accepted type, and a declared
/// size within `vision.max_bytes`. A missing size passes here; the download stops at the cap.
pub fn admit(image: &ImageRef, config: &VisionConfig) -> Result<(), Rejection> {
    if !config.enabled {
        return Err(Rejection::Disabled);
    }
    let mime = image.mimetype.as_deref().unwrap_or("");
    if !accepted_type(mime) {
        return Err(Rejection::Type(mime.to_string()));
    }
    match image.size {
        Some(size) if size > config.max_bytes => Err(Rejection::TooLarge(size)),
        _ => Ok(()),
    }
}

/// The images one request carries: the message's own first, then the context's (newest
/// first), at most `max_images`; the oldest context images are left out, like old turns.
pub fn select(own: Option<&ImageRef>, context: &[ImageRef], max_images: usize) -> Vec<ImageRef> {
    own.into_iter()
        .chain(context.iter().filter(|c| Some(*c) != own))
        .take(max_images)
        .cloned()
        .collect()
}

/// The route of a request with images: `reason_then_grok` when the user forced `!think`,
/// else `grok_direct` (the cheap model, the web stage and the classifier do not read images).
pub fn image_route(decision: &mut Decision) {
    let forced_think =
        decision.source == RouterSource::Forced && decision.route == Route::ReasonThenGrok;
    decision.ambiguous = false;
    if !forced_think && decision.route != Route::GrokDirect {
        decision.route = Route::GrokDirect;
        decision.source = RouterSource::Forced;
        decision.confidence = 1.0;
        decision.rules = vec!["forced:image"];
    }
}

/// A downloaded image as the Responses API takes it: a base64 `data:` URL (cheap to clone
/// into every stage's request).
#[derive(Clone, PartialEq, Eq)]
pub struct ImageInput {
    pub data_url: Arc<str>,
}

/// Only the size: a request's debug output must never carry the image itself.
impl std::fmt::Debug for ImageInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImageInput({} base64 bytes)", self.data_url.len())
    }
}

impl ImageInput {
    /// Encodes downloaded bytes of an accepted type.
    pub fn new(mime: &str, bytes: &[u8]) -> Self {
        let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
        Self {
            data_url: format!("data:{};base64,{encoded}", essence(mime)).into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> VisionConfig {
        VisionConfig::default()
    }

    fn png(size: Option<u64>) -> ImageRef {
        ImageRef {
            server: "example.org".into(),
            media_id: "abc".into(),
            mimetype: Some("image/png".into()),
            size,
            key: None,
        }
    }

    #[test]
    fn the_body_is_a_caption_only_beside_a_different_filename() {
        let c = json!({"body": "what does this mean?", "filename": "error.png"});
        assert_eq!(caption(&c), Some("what does this mean?"));
        assert_eq!(
            caption(&json!({"body": "error.png", "filename": "error.png"})),
            None
        );
        assert_eq!(
            caption(&json!({"body": "error.png"})),
            None,
            "no filename: body is the name"
        );
        assert_eq!(caption(&json!({"body": " ", "filename": "a.png"})), None);
    }

    #[test]
    fn only_mxc_images_are_read() {
        let c = json!({"url": "mxc://example.org/abc",
                       "info": {"mimetype": "image/png", "size": 42}});
        assert_eq!(image_ref(&c), Some(png(Some(42))));
        for bad in [
            "https://x/y",
            "mxc://example.org",
            "mxc:///abc",
            "mxc://a/b/c",
        ] {
            assert_eq!(image_ref(&json!({ "url": bad })), None, "{bad}");
        }
    }

    /// An encrypted attachment as a client makes it: the ciphertext and the `file` content.
    fn encrypt(plain: &[u8]) -> (Vec<u8>, Value) {
        use std::io::Read;
        let mut input = std::io::Cursor::new(plain.to_vec());
        let mut encryptor = matrix_sdk_crypto::AttachmentEncryptor::new(&mut input);
        let mut ciphertext = Vec::new();
        encryptor.read_to_end(&mut ciphertext).unwrap();
        let mut file = serde_json::to_value(encryptor.finish()).unwrap();
        file["url"] = json!("mxc://example.org/enc");
        (ciphertext, file)
    }

    #[test]
    fn an_encrypted_image_is_read_with_its_key_and_its_hash_checked() {
        let png_bytes = b"\x89PNG\r\n\x1a\n and the rest of the image";
        let (ciphertext, file) = encrypt(png_bytes);
        assert_ne!(&ciphertext[..], &png_bytes[..]);
        let content = json!({"msgtype": "m.image", "body": "cat.png", "file": file,
                             "info": {"mimetype": "image/png", "size": png_bytes.len()}});
        let image = image_ref(&content).expect("an encrypted image is read");
        assert_eq!(
            (image.server.as_str(), image.media_id.as_str()),
            ("example.org", "enc")
        );
        assert_eq!(image.size, Some(png_bytes.len() as u64));
        let key = image.key.clone().expect("with its key");
        let plain = key.decrypt(&ciphertext).unwrap();
        assert_eq!(plain, png_bytes);
        assert_eq!(sniff(&plain), Some("image/png"));
        // A changed byte fails the hash; another image's key does not decrypt this one.
        let mut tampered = ciphertext.clone();
        tampered[3] ^= 1;
        assert!(matches!(
            key.decrypt(&tampered),
            Err(Rejection::Undecryptable(_))
        ));
        let (_, other) = encrypt(png_bytes);
        let other = image_ref(&json!({ "file": other })).unwrap().key.unwrap();
        assert!(matches!(
            other.decrypt(&ciphertext),
            Err(Rejection::Undecryptable(_))
        ));
        let broken = image_ref(&json!({"file": {"url": "mxc://a/b", "v": "v2"}})).unwrap();
        assert!(matches!(
            broken.key.unwrap().decrypt(&ciphertext),
            Err(Rejection::Undecryptable(_))
        ));
        // The key never shows in debug output.
        let k = file["key"]["k"].as_str().unwrap();
        assert!(!format!("{image:?}").contains(k), "{image:?}");
        // A plain `url` wins: no key.
        let plain_ref = image_ref(&json!({"url": "mxc://a/b", "file": file})).unwrap();
        assert_eq!(plain_ref.key, None);
    }

    #[test]
    fn image_types_are_known_by_their_first_bytes() {
        for (bytes, mime) in [
            (&b"\x89PNG\r\n\x1a\nrest"[..], Some("image/png")),
            (&[0xFF, 0xD8, 0xFF, 0xE0, 0][..], Some("image/jpeg")),
            (b"GIF89a...", Some("image/gif")),
            (b"GIF87a...", Some("image/gif")),
            (b"RIFF\x10\0\0\0WEBPVP8 ", Some("image/webp")),
            (b"RIFF\x10\0\0\0WAVEfmt ", None),
            (b"%PDF-1.7", None),
            (b"", None),
        ] {
            assert_eq!(sniff(bytes), mime, "{bytes:?}");
        }
    }

    #[test]
    fn limits_are_checked_before_the_download() {
        let c = config();
        assert_eq!((c.max_bytes, c.max_images), (10 * 1024 * 1024, 4));
        assert_eq!(admit(&png(Some(1_000)), &c), Ok(()));
        assert_eq!(admit(&png(None), &c), Ok(()), "the download enforces it");
        assert_eq!(
            admit(&png(Some(c.max_bytes + 1)), &c),
            Err(Rejection::TooLarge(c.max_bytes + 1))
        );
        let mut tiff = png(Some(10));
        tiff.mimetype = Some("image/tiff".into());
        assert_eq!(admit(&tiff, &c), Err(Rejection::Type("image/tiff".into())));
        tiff.mimetype = None;
        assert_eq!(admit(&tiff, &c), Err(Rejection::Type(String::new())));
        let off = VisionConfig {
            enabled: false,
            ..config()
        };
        assert_eq!(admit(&png(Some(10)), &off), Err(Rejection::Disabled));
        assert!(accepted_type("image/JPEG; charset=binary"));
        assert!(!accepted_type("image/svg+xml"));
    }

    #[test]
    fn a_request_carries_its_own_image_first_and_at_most_max_images() {
        let own = png(None);
        let ctx: Vec<ImageRef> = (0..5)
            .map(|i| ImageRef {
                media_id: format!("c{i}"),
                ..png(None)
            })
            .collect();
        let picked = select(Some(&own), &ctx, 4);
        assert_eq!(picked.len(), 4);
        assert_eq!(picked[0], own);
        assert_eq!(picked[3].media_id, "c2");
        assert_eq!(select(None, &ctx, 2).len(), 2);
        assert_eq!(
            select(Some(&own), std::slice::from_ref(&own), 4).len(),
            1,
            "once each"
        );
    }

    #[test]
    fn images_go_direct_unless_the_user_forced_thinking() {
        let opts = crate::cascade::router::RouterOptions {
            cutoff_year: 2025,
            long_input_chars: 800,
        };
        let route = |text: &str| {
            let mut d = crate::cascade::router::decide(text, &opts);
            image_route(&mut d);
            (d.route, d.ambiguous)
        };
        assert_eq!(
            route("!think what is wrong here?"),
            (Route::ReasonThenGrok, false)
        );
        assert_eq!(route("!web what is this?"), (Route::GrokDirect, false));
        assert_eq!(route("thanks"), (Route::GrokDirect, false));
        assert_eq!(route(DESCRIBE), (Route::GrokDirect, false));
    }

    #[test]
    fn images_become_data_urls() {
        let img = ImageInput::new("image/PNG", b"\x89PNG");
        assert_eq!(&*img.data_url, "data:image/png;base64,iVBORw==");
        assert!(
            !format!("{img:?}").contains("iVBOR"),
            "never in debug output"
        );
    }
}
