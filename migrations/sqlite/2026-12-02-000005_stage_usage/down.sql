ALTER TABLE request_log DROP COLUMN direct_output_tokens;
ALTER TABLE request_log DROP COLUMN direct_input_tokens;
ALTER TABLE request_log DROP COLUMN stage_usage;
