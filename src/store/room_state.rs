//! Per-room state that replicas share: moderators' settings (room commands) and the reply
//! counter that keeps the bot within `bot.room_answers_per_minute`.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::schema::{room_answer_windows, room_settings};
use super::{now, Conn, Store, StoreError};

/// What a room's moderators set; `None` keeps the config's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomSettings {
    /// The context mode token (`history`, `chain`, `off`).
    pub context_mode: Option<String>,
    /// The route token every message of the room takes.
    pub route: Option<String>,
}

/// One setting a room command changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomSetting {
    ContextMode(Option<String>),
    Route(Option<String>),
}

impl Store {
    /// The room's settings (the defaults when none were set).
    pub async fn room_settings(&self, room_id: String) -> Result<RoomSettings, StoreError> {
        self.run(move |conn| {
            let row: Option<(Option<String>, Option<String>)> =
                db!(conn, |c| room_settings::table
                    .find(&room_id)
                    .select((room_settings::context_mode, room_settings::route))
                    .first(c)
                    .optional())?;
            Ok(
                row.map_or_else(RoomSettings::default, |(context_mode, route)| {
                    RoomSettings {
                        context_mode,
                        route,
                    }
                }),
            )
        })
        .await
    }

    /// Changes one setting of a room, keeping the other.
    pub async fn set_room_setting(
        &self,
        room_id: String,
        setting: RoomSetting,
        by: String,
    ) -> Result<(), StoreError> {
        self.run(move |conn| {
            let now = now();
            db_tx!(conn, |c| {
                diesel::insert_into(room_settings::table)
                    .values((
                        room_settings::room_id.eq(&room_id),
                        room_settings::updated_by.eq(&by),
                        room_settings::updated_at.eq(now),
                    ))
                    .on_conflict_do_nothing()
                    .execute(c)?;
                let row = room_settings::table.find(&room_id);
                let meta = (
                    room_settings::updated_by.eq(&by),
                    room_settings::updated_at.eq(now),
                );
                match &setting {
                    RoomSetting::ContextMode(mode) => diesel::update(row)
                        .set((room_settings::context_mode.eq(mode), meta))
                        .execute(c)?,
                    RoomSetting::Route(route) => diesel::update(row)
                        .set((room_settings::route.eq(route), meta))
                        .execute(c)?,
                };
                Ok::<_, StoreError>(())
            })
        })
        .await
    }

    /// Counts one reply in the room's window starting at `window_start`; returns whether it is
    /// within `limit`. One upsert, so replicas replying in the same room share the count.
    pub async fn take_room_answer(
        &self,
        room_id: String,
        window_start: NaiveDateTime,
        limit: u32,
    ) -> Result<bool, StoreError> {
        self.run(move |conn| {
            let answers: i32 = db!(conn, |c| diesel::insert_into(room_answer_windows::table)
                .values((
                    room_answer_windows::room_id.eq(&room_id),
                    room_answer_windows::window_start.eq(window_start),
                    room_answer_windows::answers.eq(1),
                ))
                .on_conflict((
                    room_answer_windows::room_id,
                    room_answer_windows::window_start,
                ))
                .do_update()
                .set(room_answer_windows::answers.eq(room_answer_windows::answers + 1))
                .returning(room_answer_windows::answers)
                .get_result(c))?;
            Ok(i64::from(answers) <= i64::from(limit))
        })
        .await
    }
}
