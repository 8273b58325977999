-- Stagecoach schema, PostgreSQL flavour. Several coordinators share this
-- database, so every time is taken from ONE clock, the database's:
-- stagecoach_now_ms(), never a coordinator's (DESIGN.md, "Leases"). Times are
-- milliseconds since the Unix epoch; JSON columns hold serde_json text, as on
-- SQLite (text keeps every value byte for byte; JSONB would reorder keys).

-- clock_timestamp(), not now(): now() is frozen at the start of the
-- transaction, and a transaction that waited for a row lock would stamp
-- leases and events with the time it started waiting.
CREATE FUNCTION stagecoach_now_ms() RETURNS BIGINT
    LANGUAGE sql VOLATILE
    AS $$ SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;

CREATE TABLE plans (
    name       TEXT   NOT NULL,
    version    BIGINT NOT NULL,
    spec       TEXT   NOT NULL,   -- the PlanSpec as JSON
    created_at BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE pools (
    name   TEXT    PRIMARY KEY,
    slots  BIGINT  NOT NULL CHECK (slots >= 0),
    paused BOOLEAN NOT NULL DEFAULT false
);

CREATE TABLE migrations (
    id              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    plan_name       TEXT    NOT NULL,
    plan_version    BIGINT  NOT NULL,
    subject         TEXT    NOT NULL,
    parameters      TEXT    NOT NULL,
    pool            TEXT    NOT NULL REFERENCES pools (name),
    state           TEXT    NOT NULL,
    reason          TEXT    NOT NULL DEFAULT '',
    idempotency_key TEXT,
    deadline        BIGINT,
    created_at      BIGINT  NOT NULL,
    queued_at       BIGINT  NOT NULL,  -- admission order: oldest first
    admitted_at     BIGINT,
    finished_at     BIGINT
);
-- I8 in the schema: at most one unfinished migration per subject. The store
-- maps a violation (two coordinators creating at once) to AlreadyExists.
CREATE UNIQUE INDEX migrations_one_unfinished_per_subject
    ON migrations (subject) WHERE state IN ('queued', 'running');
CREATE UNIQUE INDEX migrations_idempotency_key
    ON migrations (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX migrations_admission ON migrations (pool, state, queued_at, id);
CREATE INDEX migrations_subject ON migrations (subject, id);
CREATE INDEX migrations_deadline ON migrations (deadline)
    WHERE deadline IS NOT NULL AND state IN ('queued', 'running');

CREATE TABLE stages (
    migration_id       BIGINT  NOT NULL REFERENCES migrations (id),
    idx                BIGINT  NOT NULL,
    name               TEXT    NOT NULL,
    serial             BOOLEAN NOT NULL,
    state              TEXT    NOT NULL,
    total              BIGINT  NOT NULL DEFAULT 0,
    succeeded          BIGINT  NOT NULL DEFAULT 0,
    failed             BIGINT  NOT NULL DEFAULT 0,
    canceled           BIGINT  NOT NULL DEFAULT 0,
    max_attempts       BIGINT  NOT NULL,
    initial_backoff_ms BIGINT  NOT NULL,
    max_backoff_ms     BIGINT  NOT NULL,
    attempt_timeout_ms BIGINT  NOT NULL DEFAULT 0,  -- 0: no start-to-close limit
    started_at         BIGINT,
    finished_at        BIGINT,
    PRIMARY KEY (migration_id, idx)
);

CREATE TABLE tasks (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    migration_id     BIGINT NOT NULL REFERENCES migrations (id),
    stage_idx        BIGINT NOT NULL,
    kind             TEXT   NOT NULL,
    payload          TEXT   NOT NULL,
    state            TEXT   NOT NULL,
    attempt          BIGINT NOT NULL DEFAULT 0,  -- fencing: bumped by every lease
    failures         BIGINT NOT NULL DEFAULT 0,  -- counted against max_attempts
    expiries         BIGINT NOT NULL DEFAULT 0,  -- counted against the reassignment cap
    max_attempts     BIGINT NOT NULL,
    ready_at         BIGINT NOT NULL DEFAULT 0,  -- retry backoff: not claimable before
    lease_worker     TEXT,
    lease_expires_at BIGINT,
    attempt_deadline BIGINT,                     -- start-to-close timeout of the live attempt
    progress_done    BIGINT NOT NULL DEFAULT 0,
    progress_total   BIGINT NOT NULL DEFAULT 0,
    checkpoint       BYTEA,
    output           TEXT,
    error            TEXT,
    finished_at      BIGINT
);
-- The claim query: ready tasks in readiness order.
CREATE INDEX tasks_ready ON tasks (ready_at, id) WHERE state = 'ready';
-- The sweeper: leases by expiry, attempts by their start-to-close deadline.
CREATE INDEX tasks_lease_expiry ON tasks (lease_expires_at) WHERE state = 'leased';
CREATE INDEX tasks_attempt_deadline ON tasks (attempt_deadline)
    WHERE state = 'leased' AND attempt_deadline IS NOT NULL;
-- A worker's live leases (slot check, I12).
CREATE INDEX tasks_lease_worker ON tasks (lease_worker) WHERE state = 'leased';
CREATE INDEX tasks_stage ON tasks (migration_id, stage_idx, state);

-- Event ids are the watch cursor (`after_id`). Every transaction that appends
-- events for a migration holds that migration's row lock from before its
-- first insert until it commits, so one migration's event ids become visible
-- in id order and a reader never skips one that commits late.
CREATE TABLE events (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    migration_id BIGINT NOT NULL,
    at           BIGINT NOT NULL,
    kind         TEXT   NOT NULL,
    stage_idx    BIGINT,
    task_id      BIGINT NOT NULL DEFAULT 0,
    attempt      BIGINT NOT NULL DEFAULT 0,
    worker_id    TEXT   NOT NULL DEFAULT '',
    message      TEXT   NOT NULL DEFAULT ''
);
CREATE INDEX events_migration ON events (migration_id, id);
