-- A lease rewrites its task's row, and the new row takes an entry in every
-- index whose predicate it meets: the primary key, tasks_stage, and each
-- lease index. One index serves both lease lookups: by worker (its live
-- leases, counted by every claim, I12) as a prefix, and by expiry (the
-- sweeper's expired leases) as a scan of the live leases only — a few
-- hundred entries per thousand slots, once per sweep.
DROP INDEX tasks_lease_worker;
DROP INDEX tasks_lease_expiry;
CREATE INDEX tasks_lease ON tasks (lease_worker, lease_expires_at) WHERE state = 'leased';
