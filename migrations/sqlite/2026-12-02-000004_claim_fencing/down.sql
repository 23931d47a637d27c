ALTER TABLE processed_events DROP COLUMN sent_parts;
ALTER TABLE processed_events DROP COLUMN outbox;
ALTER TABLE processed_events DROP COLUMN generation;
