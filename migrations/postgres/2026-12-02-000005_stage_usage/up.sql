-- Per-stage tokens (`{"final": {"input": .., "cached": .., "output": .., "reasoning": ..,
-- "web_search_calls": ..}}`) and what grok_direct alone would have sent and written, so the
-- stats counterfactual prices both sides from tokens. -1 = unknown (rows from before).
ALTER TABLE request_log ADD COLUMN stage_usage TEXT NOT NULL DEFAULT '{}';
ALTER TABLE request_log ADD COLUMN direct_input_tokens BIGINT NOT NULL DEFAULT -1;
ALTER TABLE request_log ADD COLUMN direct_output_tokens BIGINT NOT NULL DEFAULT -1;
