ALTER TABLE request_log DROP COLUMN cost_trivial_ticks;
DROP TABLE grounding_usage;
DROP TABLE response_cache;
