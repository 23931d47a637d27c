-- Transactions (txnIds) already handled; a repeat PUT is a no-op, also across restarts.
CREATE TABLE appservice_transactions (
    txn_id TEXT PRIMARY KEY NOT NULL,
    event_count INTEGER NOT NULL,
    received_at TIMESTAMP NOT NULL
);

-- The durable dedupe claim per actionable event_id.
CREATE TABLE processed_events (
    event_id TEXT PRIMARY KEY NOT NULL,
    room_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    kind TEXT NOT NULL,            -- addressed | skip | invite
    state TEXT NOT NULL,           -- claimed | sending | answered | done | failed
    lease_owner TEXT NOT NULL,
    lease_expires_at TIMESTAMP NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reply_event_id TEXT,
    origin_ts TIMESTAMP NOT NULL,  -- when the homeserver says the event was sent
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE INDEX processed_events_pending ON processed_events (state, lease_expires_at);

-- Events the bot itself sent: a reply to one of them addresses the bot.
CREATE TABLE bot_events (
    event_id TEXT PRIMARY KEY NOT NULL,
    room_id TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL
);

-- Rooms the bot is in, and who is joined (a room of two is a direct chat).
CREATE TABLE rooms (
    room_id TEXT PRIMARY KEY NOT NULL,
    is_direct BOOLEAN NOT NULL DEFAULT 0,
    updated_at TIMESTAMP NOT NULL
);
CREATE TABLE room_members (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);

-- Last time a notice of a kind was posted in a room (rate limit for skip notices).
CREATE TABLE room_notices (
    room_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    last_sent_at TIMESTAMP NOT NULL,
    PRIMARY KEY (room_id, reason)
);

-- One row per engaged request (DESIGN section 5).
CREATE TABLE request_log (
    id TEXT PRIMARY KEY NOT NULL,
    room_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    route TEXT NOT NULL,
    router_source TEXT NOT NULL,
    router_confidence DOUBLE NOT NULL DEFAULT 0,
    models TEXT NOT NULL DEFAULT '{}',
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    cached_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens BIGINT NOT NULL DEFAULT 0,
    cost_router_ticks BIGINT NOT NULL DEFAULT 0,
    cost_web_ticks BIGINT NOT NULL DEFAULT 0,
    cost_reason_ticks BIGINT NOT NULL DEFAULT 0,
    cost_final_ticks BIGINT NOT NULL DEFAULT 0,
    cost_total_ticks BIGINT NOT NULL DEFAULT 0,
    cost_source TEXT NOT NULL DEFAULT '',
    latency_ms BIGINT NOT NULL DEFAULT 0,
    stage_ms TEXT NOT NULL DEFAULT '{}',
    escalated BOOLEAN NOT NULL DEFAULT 0,
    fallback_fired BOOLEAN NOT NULL DEFAULT 0,
    cache_hit BOOLEAN NOT NULL DEFAULT 0,
    ceiling_hit BOOLEAN NOT NULL DEFAULT 0,
    per_user_cap_hit BOOLEAN NOT NULL DEFAULT 0,
    prompt_version TEXT NOT NULL DEFAULT '',
    provider_request_id TEXT NOT NULL DEFAULT '',
    degraded TEXT NOT NULL DEFAULT '',
    err TEXT NOT NULL DEFAULT '',
    ok BOOLEAN NOT NULL DEFAULT 0,
    query_text TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX request_log_created_at ON request_log (created_at);
