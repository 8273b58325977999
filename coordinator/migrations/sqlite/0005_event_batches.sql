-- The task events a set-at-a-time statement writes — the TaskAssigned events
-- of a claim, the TaskSucceeded events of a group commit — go in one row per
-- migration and stage, whose JSON array holds one event each. A row per event
-- cost a B-tree insert in `events` and another in its index apiece, about a
-- quarter of a no-op task's coordinator time; a row per batch costs one of
-- each for them all.
--
-- They are events like the rows of `events`, and their ids are `events` ids:
-- a batch takes a block of them, first_id..last_id, by raising the table's
-- AUTOINCREMENT counter in `sqlite_sequence` (which SQLite documents as an
-- ordinary table a program may update); rows inserted into `events` later
-- get ids above the block. The event log reads both tables as one.
CREATE TABLE event_batches (
    migration_id INTEGER NOT NULL,
    last_id      INTEGER NOT NULL,  -- a cursor's key
    first_id     INTEGER NOT NULL,  -- element k of the `events` array has id first_id + k
    at           INTEGER NOT NULL,
    kind         TEXT    NOT NULL,
    stage_idx    INTEGER NOT NULL,
    events       TEXT    NOT NULL,  -- JSON [[task_id, attempt, worker_id], ...]
    PRIMARY KEY (migration_id, last_id)
);
-- The counter's row exists once `events` has had a row; make sure of it.
INSERT INTO sqlite_sequence (name, seq)
SELECT 'events', coalesce((SELECT max(id) FROM events), 0)
WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'events');
