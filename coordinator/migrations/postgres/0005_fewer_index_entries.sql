-- Fewer index entries per task: every transition of a task or event writes
-- one entry into each index whose predicate the new row matches, and on a
-- busy migration those writes are much of what a commit costs.

-- Events are read one migration at a time (`migration_id = $1 AND id > $2`),
-- never by id alone: one index on (migration_id, id) serves every read, and
-- each event (two per task) maintains one index instead of two. The
-- identity column keeps ids unique.
ALTER TABLE events DROP CONSTRAINT events_pkey;
DROP INDEX events_migration;
ALTER TABLE events ADD PRIMARY KEY (migration_id, id);

-- No query looks for succeeded tasks by stage: each one asks for pending,
-- ready, leased, failed or canceled tasks, with the state spelled out, which
-- the planner proves implies this predicate. A task's success then adds no
-- entry here, and the index holds only the unfinished and the failed.
DROP INDEX tasks_stage;
CREATE INDEX tasks_stage ON tasks (migration_id, stage_idx, state) WHERE state <> 'succeeded';
