-- The random secret of the task's current (or last) lease, given to its
-- worker with the assignment. Every report and heartbeat must name it
-- beside the fencing token `(id, attempt)`, which is easy to guess: a
-- report with another secret is answered like a stale one. Written by each
-- claim, never cleared (a repeated report of a recorded outcome is told
-- apart from a forged one by it). Leases taken before this migration have
-- none (NULL matches no secret): their workers' reports are refused, the
-- leases expire and their tasks are leased again, with a secret.
ALTER TABLE tasks ADD COLUMN lease_secret INTEGER;
