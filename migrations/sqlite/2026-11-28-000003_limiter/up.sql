-- Spend counters per (UTC day, scope): scope is 'global' or 'user:<mxid>'. A new day is a new
-- row, so there is no reset job. Money in ticks (1 USD = 10^10).
CREATE TABLE budget_counters (
    day TEXT NOT NULL,
    scope TEXT NOT NULL,
    cap_ticks BIGINT NOT NULL,
    settled_ticks BIGINT NOT NULL DEFAULT 0,
    reserved_ticks BIGINT NOT NULL DEFAULT 0,
    requests BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (day, scope)
);

-- One row per reservation: counters can always be recomputed from these (the audit).
CREATE TABLE budget_reservations (
    id TEXT PRIMARY KEY NOT NULL,
    day TEXT NOT NULL,
    user_id TEXT NOT NULL,
    amount_ticks BIGINT NOT NULL,
    state TEXT NOT NULL,             -- held | settled | released | expired
    dispatched BOOLEAN NOT NULL DEFAULT 0,
    actual_ticks BIGINT NOT NULL DEFAULT 0,
    created_at TIMESTAMP NOT NULL,
    expires_at TIMESTAMP NOT NULL,
    finished_at TIMESTAMP
);
CREATE INDEX budget_reservations_held ON budget_reservations (state, expires_at);
CREATE INDEX budget_reservations_user ON budget_reservations (user_id, created_at);
