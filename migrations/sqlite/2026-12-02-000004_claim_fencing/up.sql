-- Fenced claims: every takeover increments the generation, and every transition and lease
-- renewal is conditional on (lease_owner, generation). The outbox holds the rendered reply
-- (all parts with their send txnIds) and its request_log row, stored before anything is sent,
-- so recovery re-sends instead of calling the model again.
ALTER TABLE processed_events ADD COLUMN generation BIGINT NOT NULL DEFAULT 1;
ALTER TABLE processed_events ADD COLUMN outbox TEXT;
ALTER TABLE processed_events ADD COLUMN sent_parts INTEGER NOT NULL DEFAULT 0;
