//! The command stage: answers a room command ([`crate::commands`]) without a model or budget.

use crate::cascade::Degrade;
use crate::commands::{self, Change, Command, HelpFacts};
use crate::state::AppState;
use crate::store::room_state::RoomSetting;
use crate::telemetry::RequestLog;

use super::run::{context_mode, room_settings, Response, UNAVAILABLE};
use super::Job;

const NOT_A_MODERATOR: &str =
    "Only room moderators (those who may change the room's settings) can change how I work here.";

/// Answers `command` for `job`; `row` is the request's base row.
pub async fn answer(
    state: &AppState,
    job: &Job,
    command: Command,
    mut row: Box<RequestLog>,
) -> Response {
    row.ok = true;
    let text = match command {
        Command::Usage => match state.limiter.usage(&job.sender).await {
            Ok(u) => crate::limiter::usage_text(&u),
            Err(e) => {
                row.ok = false;
                row.degraded = Degrade::ReserveError.as_str().into();
                row.err = e.to_string();
                UNAVAILABLE.to_string()
            }
        },
        Command::Help | Command::Unknown => help(state, job).await,
        Command::Set(change) => match set(state, job, change).await {
            Ok(text) => text,
            Err(text) => {
                row.ok = false;
                text
            }
        },
    };
    Response::Reply(text, row, None)
}

/// The help text with the room's settings and the asker's limits.
async fn help(state: &AppState, job: &Job) -> String {
    let settings = room_settings(state, &job.room_id).await;
    let usage = state
        .limiter
        .usage(&job.sender)
        .await
        .ok()
        .map(|u| crate::limiter::usage_text(&u));
    let config = &state.config;
    let mode = context_mode(state, job, &settings);
    commands::help_text(&HelpFacts {
        bot_name: &config.bot.display_name,
        prefix: &config.bot.command_prefix,
        usage_command: &config.limits.usage_command,
        context_mode: mode.as_str(),
        context_set: settings.context_mode.is_some(),
        route: settings.route.as_deref(),
        usage,
    })
}

/// Applies a moderator's change; the error is the text to reply with.
async fn set(state: &AppState, job: &Job, change: Change) -> Result<String, String> {
    let room_state = state.matrix.room_state(&job.room_id).await.map_err(|e| {
        tracing::warn!(error = %e, "could not read the room's power levels");
        UNAVAILABLE.to_string()
    })?;
    if !commands::is_moderator(&room_state, &job.sender) {
        return Err(NOT_A_MODERATOR.to_string());
    }
    let (setting, done) = match change {
        Change::Context(mode) => {
            let done = match mode {
                Some(m) => format!("From now on I read context `{}` in this room.", m.as_str()),
                None => "This room is back to the default context.".to_string(),
            };
            let token = mode.map(|m| m.as_str().to_string());
            (RoomSetting::ContextMode(token), done)
        }
        Change::Route(route) => {
            let token = route.map(|r| r.as_str().to_string());
            let done = match &token {
                Some(r) => format!("From now on every question here takes the `{r}` route."),
                None => "I choose the route for each question again.".to_string(),
            };
            (RoomSetting::Route(token), done)
        }
    };
    state
        .store
        .set_room_setting(job.room_id.clone(), setting, job.sender.clone())
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "could not store the room setting");
            UNAVAILABLE.to_string()
        })?;
    tracing::info!(room_id = %job.room_id, "a moderator changed the room's settings");
    Ok(done)
}
