-- Only a retry waits: a task is ready with a future ready_at only after a
-- failure's backoff or a lease expiry. The sweeper's "did a retry come due"
-- check needs just those; an index on every ready task by time alone is one
-- the planner took for claims, and then filtered every ready task by kind.
DROP INDEX tasks_ready;
CREATE INDEX tasks_retry_due ON tasks (ready_at)
    WHERE state = 'ready' AND (failures > 0 OR expiries > 0);
