-- What a room's moderators chose with room commands (shared by every replica); NULL keeps the
-- config's default.
CREATE TABLE room_settings (
    room_id TEXT PRIMARY KEY NOT NULL,
    context_mode TEXT,
    route TEXT,
    updated_by TEXT NOT NULL,
    updated_at TIMESTAMP NOT NULL
);

-- Replies per room per UTC minute (bot.room_answers_per_minute), so two bots cannot loop.
CREATE TABLE room_answer_windows (
    room_id TEXT NOT NULL,
    window_start TIMESTAMP NOT NULL,
    answers INTEGER NOT NULL,
    PRIMARY KEY (room_id, window_start)
);
CREATE INDEX room_answer_windows_window_start ON room_answer_windows (window_start);
