//! The image stage: which images a request sends (its own, then its reply chain's) and their
//! checks before any download ([`select`], before the reservation), then the downloads as the
//! bot ([`download`], once the budget admitted the request). The bytes are only held in memory
//! for the request; neither they nor the message text are logged.

use crate::cascade::Degrade;
use crate::classify::SkipReason;
use crate::context::Conversation;
use crate::matrix::MediaError;
use crate::state::AppState;
use crate::telemetry::RequestLog;
use crate::vision::{self, ImageInput, ImageRef, Rejection};

use super::notice::{notice_window, skip_notice};
use super::run::Response;
use super::Job;

const DOWNLOAD_APOLOGY: &str =
    "Sorry, I couldn't fetch that image from the homeserver. Please try sending it again.";
const DECRYPT_APOLOGY: &str =
    "Sorry, I couldn't decrypt that image (it does not match its key). Please try sending it again.";

/// Why a request's images are not sent.
pub enum Unread {
    /// The message's own image is outside the limits: the media notice, no model call.
    Rejected(Rejection),
    /// A download failed: the apology.
    Failed(MediaError),
}

/// The images a request sends, checked against their declared type and size: the message's
/// own image decides the request ([`Unread::Rejected`]); a context image outside the limits
/// is left out. Nothing is downloaded yet.
pub fn select(
    state: &AppState,
    job: &Job,
    conversation: Option<&Conversation>,
) -> Result<Vec<ImageRef>, Unread> {
    let config = &state.config.vision;
    let own = job.request.image.as_ref();
    if let Some(image) = own {
        vision::admit(image, config).map_err(Unread::Rejected)?;
    }
    let context: Vec<ImageRef> = conversation
        .map_or(&[][..], |c| &c.images[..])
        .iter()
        .filter(|image| match vision::admit(image, config) {
            Ok(()) => true,
            Err(r) => {
                tracing::info!(reason = %r, "leaving an image of the context out");
                false
            }
        })
        .cloned()
        .collect();
    Ok(vision::select(own, &context, config.max_images))
}

/// Downloads the selected images. What the homeserver serves is checked again: a file past
/// `vision.max_bytes` or of another type is refused if it is the message's own image, else
/// left out.
pub async fn download(
    state: &AppState,
    job: &Job,
    selected: &[ImageRef],
) -> Result<Vec<ImageInput>, Unread> {
    let mut ready = Vec::new();
    for image in selected {
        match fetch(state, image).await {
            Ok(input) => ready.push(input),
            Err(Unread::Rejected(r)) if Some(image) == job.request.image.as_ref() => {
                return Err(Unread::Rejected(r));
            }
            Err(Unread::Rejected(r)) => {
                tracing::info!(reason = %r, "leaving an image of the context out");
            }
            Err(failed) => return Err(failed),
        }
    }
    Ok(ready)
}

/// One image: the download (stopped past `vision.max_bytes`) and the type the homeserver
/// served it as; an encrypted attachment is decrypted and its type read from its first bytes
/// (the homeserver only has ciphertext), or else taken as declared.
async fn fetch(state: &AppState, image: &ImageRef) -> Result<ImageInput, Unread> {
    let max_bytes = state.config.vision.max_bytes;
    let downloaded = state
        .matrix
        .download(&image.server, &image.media_id, max_bytes)
        .await
        .map_err(|e| match e {
            MediaError::TooLarge(_) => Unread::Rejected(Rejection::TooLarge(max_bytes)),
            other => Unread::Failed(other),
        })?;
    let (content_type, bytes) = match &image.key {
        Some(key) => {
            let plain = key.decrypt(&downloaded.bytes).map_err(Unread::Rejected)?;
            let declared = image.mimetype.clone().unwrap_or_default();
            let sniffed = vision::sniff(&plain).map_or(declared, str::to_string);
            (sniffed, plain)
        }
        None => (downloaded.content_type, downloaded.bytes),
    };
    if !vision::accepted_type(&content_type) {
        return Err(Unread::Rejected(Rejection::Type(content_type)));
    }
    Ok(ImageInput::new(&content_type, &bytes))
}

/// The answer when the images are not sent: the media notice or the apology, and the row.
pub async fn unread(state: &AppState, job: &Job, why: Unread, row: RequestLog) -> Response {
    match why {
        Unread::Rejected(r) => rejected(state, job, &r, row).await,
        Unread::Failed(e) => failed(job, &e, row),
    }
}

/// The answer to a refused image: the media notice (at most one a minute per room, like the
/// other media notices) and a row marked `image_rejected`.
async fn rejected(state: &AppState, job: &Job, rejection: &Rejection, row: RequestLog) -> Response {
    tracing::info!(event_id = %job.event_id, reason = %rejection, "image not read");
    let mut row = Box::new(row);
    row.degraded = Degrade::ImageRejected.as_str().into();
    row.err = rejection.to_string();
    row.ok = false;
    // Not a limit the user could read about in the media notice: the file itself is damaged.
    if let Rejection::Undecryptable(_) = rejection {
        return Response::Reply(DECRYPT_APOLOGY.to_string(), row, job.progress_event.clone());
    }
    let slot = state
        .store
        .take_notice_slot(
            job.room_id.clone(),
            Degrade::ImageRejected.as_str().into(),
            notice_window(SkipReason::Media),
        )
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "notice rate limit unavailable; not posting");
            false
        });
    if slot {
        Response::Notice(skip_notice(state, SkipReason::Media), row)
    } else {
        Response::Silent(row)
    }
}

/// The answer to a failed download: a short apology and the row.
fn failed(job: &Job, error: &MediaError, mut row: RequestLog) -> Response {
    tracing::warn!(event_id = %job.event_id, error = %error, "image download failed");
    row.err = format!("image download failed: {error}");
    Response::Reply(
        DOWNLOAD_APOLOGY.to_string(),
        Box::new(row),
        job.progress_event.clone(),
    )
}
