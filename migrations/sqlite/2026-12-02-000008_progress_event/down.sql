ALTER TABLE processed_events DROP COLUMN progress_event_id;
