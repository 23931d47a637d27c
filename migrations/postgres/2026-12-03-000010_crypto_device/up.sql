-- The bot's one end-to-end encryption device per user id: created once, reused across
-- restarts and replicas (its keys live in the crypto store, never here).
CREATE TABLE crypto_devices (
    user_id TEXT PRIMARY KEY NOT NULL,
    device_id TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
