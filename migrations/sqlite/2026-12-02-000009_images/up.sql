-- How many images a request sent to the model (0 for text; the bytes are never stored).
ALTER TABLE request_log ADD COLUMN images INTEGER NOT NULL DEFAULT 0;
