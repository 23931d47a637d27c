//! The image stage: which images a request sends (its own, then its reply chain's), their
//! checks before any download, and the downloads as the bot. The bytes are only held in
//! memory for the request; neither they nor the message text are logged.

use crate::classify::SkipReason;
use crate::context::Conversation;
use crate::matrix::MediaError;
use crate::state::AppState;
use crate::telemetry::RequestLog;
use crate::vision::{self, ImageInput, ImageRef, Rejection};

use super::notice::{notice_window, skip_notice};
use super::run::Response;
use super::Job;

/// The `degraded` token of a request whose image the bot does not read.
pub const IMAGE_REJECTED: &str = "image_rejected";

const DOWNLOAD_APOLOGY: &str =
    "Sorry, I couldn't fetch that image from the homeserver. Please try sending it again.";

/// What the image stage leaves the request with.
pub enum Images {
    /// The images to send with the message (none for a plain text question).
    Ready(Vec<ImageInput>),
    /// The message's own image is refused: no download, no model call.
    Rejected(Rejection),
    /// A download failed.
    Failed(MediaError),
}

/// Checks and downloads the images of a request. The message's own image decides the
/// request (refused: [`Images::Rejected`]); a context image that is refused is left out.
pub async fn prepare(state: &AppState, job: &Job, conversation: Option<&Conversation>) -> Images {
    let config = &state.config.vision;
    let own = job.request.image.as_ref();
    let context = conversation.map_or(&[][..], |c| &c.images[..]);
    if let Some(image) = own {
        if let Err(r) = vision::admit(image, config) {
            return Images::Rejected(r);
        }
    }
    let mut ready = Vec::new();
    for image in vision::select(own, context, config.max_images) {
        let is_own = Some(&image) == own;
        match fetch(state, &image).await {
            Ok(input) => ready.push(input),
            Err(Fetch::Rejected(r)) if is_own => return Images::Rejected(r),
            Err(Fetch::Rejected(r)) => {
                tracing::info!(reason = %r, "leaving an image of the context out");
            }
            Err(Fetch::Failed(e)) => return Images::Failed(e),
        }
    }
    Images::Ready(ready)
}

enum Fetch {
    Rejected(Rejection),
    Failed(MediaError),
}

/// One image: its declared limits, the download (stopped past `vision.max_bytes`), and the
/// type the homeserver served it as.
async fn fetch(state: &AppState, image: &ImageRef) -> Result<ImageInput, Fetch> {
    let config = &state.config.vision;
    vision::admit(image, config).map_err(Fetch::Rejected)?;
    let downloaded = state
        .matrix
        .download(&image.server, &image.media_id, config.max_bytes)
        .await
        .map_err(|e| match e {
            MediaError::TooLarge(_) => Fetch::Rejected(Rejection::TooLarge(config.max_bytes)),
            other => Fetch::Failed(other),
        })?;
    if !vision::accepted_type(&downloaded.content_type) {
        return Err(Fetch::Rejected(Rejection::Type(downloaded.content_type)));
    }
    Ok(ImageInput::new(&downloaded.content_type, &downloaded.bytes))
}

/// The answer to a refused image: the media notice (at most one a minute per room, like the
/// other media notices) and a row marked `image_rejected`.
pub async fn rejected(
    state: &AppState,
    job: &Job,
    rejection: &Rejection,
    row: RequestLog,
) -> Response {
    tracing::info!(event_id = %job.event_id, reason = %rejection, "image not read");
    let mut row = Box::new(row);
    row.degraded = IMAGE_REJECTED.into();
    row.err = rejection.to_string();
    row.ok = false;
    let slot = state
        .store
        .take_notice_slot(
            job.room_id.clone(),
            IMAGE_REJECTED.into(),
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
pub fn failed(job: &Job, error: &MediaError, mut row: RequestLog) -> Response {
    tracing::warn!(event_id = %job.event_id, error = %error, "image download failed");
    row.err = format!("image download failed: {error}");
    Response::Reply(
        DOWNLOAD_APOLOGY.to_string(),
        Box::new(row),
        job.progress_event.clone(),
    )
}
