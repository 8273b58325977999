-- Only a retry waits: a task is ready with a future ready_at only after a
-- failure's backoff or a lease expiry. The sweeper's "did a retry come due"
-- check needs just those, and every claim and completion then maintains one
-- index fewer on every ready task.
DROP INDEX tasks_ready;
CREATE INDEX tasks_retry_due ON tasks (ready_at)
    WHERE state = 'ready' AND (failures > 0 OR expiries > 0);
