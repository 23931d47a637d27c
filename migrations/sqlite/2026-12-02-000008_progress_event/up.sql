-- The event a streamed or placeholder answer was first posted as: the final answer edits it, and
-- a replica that takes the claim over edits it too instead of posting a second message.
ALTER TABLE processed_events ADD COLUMN progress_event_id TEXT;
