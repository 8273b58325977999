-- A completion rewrites its task's row, and a rewritten row takes a new
-- entry in every index whose predicate it meets. Every query that looks a
-- stage's tasks up by state looks for unfinished ones (or failed and
-- canceled ones, to retry them); a succeeded task is counted on its stage
-- row and never looked up by stage again. Leaving succeeded tasks out of
-- this index spares every completion an index entry and its WAL record.
DROP INDEX tasks_stage;
CREATE INDEX tasks_stage ON tasks (migration_id, stage_idx, state) WHERE state <> 'succeeded';
