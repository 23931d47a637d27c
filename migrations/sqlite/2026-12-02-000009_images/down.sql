ALTER TABLE request_log DROP COLUMN images;
