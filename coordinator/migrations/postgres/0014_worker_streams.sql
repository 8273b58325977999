-- One live Subscribe stream per worker id across every coordinator sharing
-- this database (the in-memory registry holds the rule inside one).
--
-- A coordinator's claim on its streams lives as long as the coordinator
-- renews its row here: one row per coordinator, renewed every heartbeat
-- interval, rather than a renewal of every stream's row, which would be a
-- write per open stream per interval (20,000 streams: 20,000 row versions
-- a second for the vacuum to clean).
CREATE TABLE stream_coordinators (
    -- Random, drawn at the coordinator's start.
    id            TEXT PRIMARY KEY,
    -- Past this (stagecoach_now_ms()) the coordinator counts as gone and
    -- its streams' worker ids are free.
    expires_at_ms BIGINT NOT NULL
);

-- The open stream of each worker id: which process (instance) holds it,
-- through which coordinator. A row whose coordinator is gone (its row
-- expired or deleted) is free; a row is deleted when its stream ends.
CREATE TABLE worker_streams (
    worker_id   TEXT PRIMARY KEY,
    -- The worker process's random instance (u64 as its bits; 0: none).
    instance    BIGINT NOT NULL,
    coordinator TEXT NOT NULL,
    -- The stream's connection number inside its coordinator: a stream's
    -- end deletes its own row, never a newer stream's of the same process.
    stream      BIGINT NOT NULL
);
-- A coordinator's streams, for its shutdown and its recovery after a
-- lapsed renewal.
CREATE INDEX worker_streams_coordinator ON worker_streams (coordinator);
