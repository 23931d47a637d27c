-- Answers shared by all replicas, keyed by a hash of (normalised text, route, model,
-- prompt version): never by raw text.
CREATE TABLE response_cache (
    cache_key TEXT PRIMARY KEY NOT NULL,
    route TEXT NOT NULL,
    answer TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    expires_at TIMESTAMP NOT NULL
);
CREATE INDEX response_cache_expires ON response_cache (expires_at);

-- Web-search calls per UTC day (YYYY-MM-DD), for the grounding cap across replicas.
CREATE TABLE grounding_usage (
    day TEXT PRIMARY KEY NOT NULL,
    calls BIGINT NOT NULL
);

ALTER TABLE request_log ADD COLUMN cost_trivial_ticks BIGINT NOT NULL DEFAULT 0;
