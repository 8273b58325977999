-- Claims look up ready tasks kind by kind, oldest first: without this index a
-- worker whose kinds have no ready work scanned every ready task of other
-- kinds on each dispatch pass.
CREATE INDEX tasks_ready_kind ON tasks (kind, ready_at, id) WHERE state = 'ready';

-- The sweeper's attempt-timeout lookup.
CREATE INDEX tasks_attempt_deadline ON tasks (attempt_deadline)
    WHERE state = 'leased' AND attempt_deadline IS NOT NULL;
