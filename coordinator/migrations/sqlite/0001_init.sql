-- Stagecoach schema, SQLite flavour. Times are milliseconds since the Unix
-- epoch (coordinator clock); JSON columns hold serde_json text.

CREATE TABLE plans (
    name       TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    spec       TEXT    NOT NULL,   -- the PlanSpec as JSON
    created_at INTEGER NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE pools (
    name   TEXT    PRIMARY KEY,
    slots  INTEGER NOT NULL CHECK (slots >= 0),
    paused INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE migrations (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    plan_name       TEXT    NOT NULL,
    plan_version    INTEGER NOT NULL,
    subject         TEXT    NOT NULL,
    parameters      TEXT    NOT NULL,
    pool            TEXT    NOT NULL REFERENCES pools (name),
    state           TEXT    NOT NULL,
    reason          TEXT    NOT NULL DEFAULT '',
    idempotency_key TEXT,
    deadline        INTEGER,
    created_at      INTEGER NOT NULL,
    queued_at       INTEGER NOT NULL,  -- admission order: oldest first
    admitted_at     INTEGER,
    finished_at     INTEGER
);
-- I8 in the schema: at most one unfinished migration per subject.
CREATE UNIQUE INDEX migrations_one_unfinished_per_subject
    ON migrations (subject) WHERE state IN ('queued', 'running');
CREATE UNIQUE INDEX migrations_idempotency_key
    ON migrations (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX migrations_admission ON migrations (pool, state, queued_at, id);
CREATE INDEX migrations_subject ON migrations (subject, id);
CREATE INDEX migrations_deadline ON migrations (deadline)
    WHERE deadline IS NOT NULL AND state IN ('queued', 'running');

CREATE TABLE stages (
    migration_id       INTEGER NOT NULL REFERENCES migrations (id),
    idx                INTEGER NOT NULL,
    name               TEXT    NOT NULL,
    serial             INTEGER NOT NULL,
    state              TEXT    NOT NULL,
    total              INTEGER NOT NULL DEFAULT 0,
    succeeded          INTEGER NOT NULL DEFAULT 0,
    failed             INTEGER NOT NULL DEFAULT 0,
    canceled           INTEGER NOT NULL DEFAULT 0,
    max_attempts       INTEGER NOT NULL,
    initial_backoff_ms INTEGER NOT NULL,
    max_backoff_ms     INTEGER NOT NULL,
    attempt_timeout_ms INTEGER NOT NULL DEFAULT 0,  -- 0: no start-to-close limit
    started_at         INTEGER,
    finished_at        INTEGER,
    PRIMARY KEY (migration_id, idx)
);

CREATE TABLE tasks (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    migration_id     INTEGER NOT NULL REFERENCES migrations (id),
    stage_idx        INTEGER NOT NULL,
    kind             TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    state            TEXT    NOT NULL,
    attempt          INTEGER NOT NULL DEFAULT 0,  -- fencing: bumped by every lease
    failures         INTEGER NOT NULL DEFAULT 0,  -- counted against max_attempts
    expiries         INTEGER NOT NULL DEFAULT 0,  -- counted against the reassignment cap
    max_attempts     INTEGER NOT NULL,
    ready_at         INTEGER NOT NULL DEFAULT 0,  -- retry backoff: not claimable before
    lease_worker     TEXT,
    lease_expires_at INTEGER,
    attempt_deadline INTEGER,                     -- start-to-close timeout of the live attempt
    progress_done    INTEGER NOT NULL DEFAULT 0,
    progress_total   INTEGER NOT NULL DEFAULT 0,
    checkpoint       BLOB,
    output           TEXT,
    error            TEXT,
    finished_at      INTEGER
);
-- The claim query: ready tasks in readiness order.
CREATE INDEX tasks_ready ON tasks (ready_at, id) WHERE state = 'ready';
-- The sweeper: leases by expiry.
CREATE INDEX tasks_lease_expiry ON tasks (lease_expires_at) WHERE state = 'leased';
-- A worker's live leases (slot check, I12).
CREATE INDEX tasks_lease_worker ON tasks (lease_worker) WHERE state = 'leased';
CREATE INDEX tasks_stage ON tasks (migration_id, stage_idx, state);

CREATE TABLE events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    migration_id INTEGER NOT NULL,
    at           INTEGER NOT NULL,
    kind         TEXT    NOT NULL,
    stage_idx    INTEGER,
    task_id      INTEGER NOT NULL DEFAULT 0,
    attempt      INTEGER NOT NULL DEFAULT 0,
    worker_id    TEXT    NOT NULL DEFAULT '',
    message      TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX events_migration ON events (migration_id, id);
