-- Named leases: a job that must run on one replica at a time (housekeeping) takes the lease
-- of its name; another replica may take it over once it expired.
CREATE TABLE leases (
    name TEXT PRIMARY KEY NOT NULL,
    owner TEXT NOT NULL,
    expires_at TIMESTAMP NOT NULL
);

-- What the housekeeping deletes look up: rows older than a cutoff, oldest first.
CREATE INDEX appservice_transactions_received_at ON appservice_transactions (received_at);
CREATE INDEX processed_events_updated_at ON processed_events (updated_at);
CREATE INDEX bot_events_created_at ON bot_events (created_at);
CREATE INDEX budget_reservations_finished_at ON budget_reservations (finished_at);
CREATE INDEX room_notices_last_sent_at ON room_notices (last_sent_at);
