-- One live Subscribe stream per worker id, kept in the database as on
-- PostgreSQL (postgres/0014_worker_streams.sql says why there): one rule on
-- both backends, though an SQLite file has one coordinator at a time.

-- The coordinators, each renewing its row every heartbeat interval.
CREATE TABLE stream_coordinators (
    -- Random, drawn at the coordinator's start.
    id            TEXT    PRIMARY KEY,
    -- Past this (the coordinator's clock) the coordinator counts as gone and
    -- its streams' worker ids are free.
    expires_at_ms INTEGER NOT NULL
);

-- The open stream of each worker id: which process (instance) holds it,
-- through which coordinator. A row whose coordinator is gone (its row
-- expired or deleted) is free; a row is deleted when its stream ends.
CREATE TABLE worker_streams (
    worker_id   TEXT    PRIMARY KEY,
    -- The worker process's random instance (u64 as its bits; 0: none).
    instance    INTEGER NOT NULL,
    coordinator TEXT    NOT NULL,
    -- The stream's connection number inside its coordinator: a stream's
    -- end deletes its own row, never a newer stream's of the same process.
    stream      INTEGER NOT NULL
);
-- A coordinator's streams, for its shutdown and its recovery after a
-- lapsed renewal.
CREATE INDEX worker_streams_coordinator ON worker_streams (coordinator);
