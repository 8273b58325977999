-- A stage's heartbeat timeout, and a task's own override of its stage's
-- retry policy. A NULL task column means "the stage's value".
ALTER TABLE stages ADD COLUMN heartbeat_timeout_ms BIGINT NOT NULL DEFAULT 0;  -- 0: the coordinator's lease duration
ALTER TABLE tasks ADD COLUMN initial_backoff_ms BIGINT;
ALTER TABLE tasks ADD COLUMN max_backoff_ms BIGINT;
ALTER TABLE tasks ADD COLUMN attempt_timeout_ms BIGINT;
ALTER TABLE tasks ADD COLUMN heartbeat_timeout_ms BIGINT;
