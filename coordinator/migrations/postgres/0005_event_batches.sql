-- The task events a set-at-a-time statement writes — the TaskAssigned events
-- of a claim, the TaskSucceeded events of a group commit — go in one row per
-- migration and stage, whose arrays hold one event each. They are events
-- like the rows of `events`: their ids come from the same sequence, under
-- the same migration lock, and the event log reads both tables as one.
-- A row per event cost a heap tuple and two index entries apiece, a quarter
-- of a no-op task's database time; a row per batch costs one of each for
-- them all.
CREATE TABLE event_batches (
    migration_id BIGINT   NOT NULL,
    last_id      BIGINT   NOT NULL,  -- the greatest of `ids`: a cursor's key
    at           BIGINT   NOT NULL,
    kind         TEXT     NOT NULL,
    stage_idx    BIGINT   NOT NULL,
    ids          BIGINT[] NOT NULL,  -- from events.id's sequence (events_id_seq), ascending
    task_ids     BIGINT[] NOT NULL,
    attempts     BIGINT[] NOT NULL,
    worker_ids   TEXT[]   NOT NULL,
    PRIMARY KEY (migration_id, last_id)
);
