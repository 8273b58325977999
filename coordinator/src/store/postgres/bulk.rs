//! Set-at-a-time SQL of the PostgreSQL store: a plan's or a fan-out's tasks
//! and every batch of events go in as arrays, one statement per chunk, and a
//! batch of plain completions is a handful of statements, instead of one
//! round trip (or one transaction) per row.

use std::collections::HashMap;

use sqlx::PgConnection;

use super::machine;
use crate::domain::{EventKind, ReportAck, TaskSpec, task_override};
use crate::error::Result;
use crate::store::Effects;
use crate::store::common::{NewEvent, Plain, recorded};

/// Rows per statement: big enough that round trips stop mattering, small
/// enough that one statement's arrays stay a few megabytes.
const ROWS_PER_STATEMENT: usize = 10_000;

/// Inserts `tasks` as pending tasks of one stage and returns their ids in
/// the order given. A task's `max_attempts` is resolved against
/// `stage_attempts` now; the rest of its override is kept as is, NULL
/// meaning "the stage's".
pub(super) async fn insert_tasks(
    conn: &mut PgConnection,
    migration_id: i64,
    stage: i64,
    stage_attempts: i64,
    tasks: &[&TaskSpec],
) -> Result<Vec<i64>> {
    let set = |v: u32| (v != 0).then_some(v as i64);
    let mut ids = Vec::with_capacity(tasks.len());
    for chunk in tasks.chunks(ROWS_PER_STATEMENT) {
        let overrides: Vec<_> = chunk
            .iter()
            .map(|t| task_override(t.max_attempts, t.retry))
            .collect();
        let kinds: Vec<&str> = chunk.iter().map(|t| t.kind.as_str()).collect();
        let payloads: Vec<String> = chunk.iter().map(|t| t.payload.to_string()).collect();
        let column = |f: fn(&crate::domain::RetryPolicy) -> u32| -> Vec<Option<i64>> {
            overrides.iter().map(|o| set(f(o))).collect()
        };
        let attempts: Vec<i64> = overrides
            .iter()
            .map(|o| set(o.max_attempts).unwrap_or(stage_attempts))
            .collect();
        let mut chunk_ids: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO tasks (migration_id, stage_idx, kind, payload, state, max_attempts,
                                initial_backoff_ms, max_backoff_ms, attempt_timeout_ms,
                                heartbeat_timeout_ms)
             SELECT $1, $2, u.kind, u.payload, 'pending', u.attempts, u.ib, u.mb, u.at, u.ht
             FROM UNNEST($3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[],
                         $8::bigint[], $9::bigint[])
                  WITH ORDINALITY AS u(kind, payload, attempts, ib, mb, at, ht, n)
             ORDER BY u.n
             RETURNING id",
        )
        .bind(migration_id)
        .bind(stage)
        .bind(&kinds)
        .bind(&payloads)
        .bind(&attempts)
        .bind(column(|o| o.initial_backoff_ms))
        .bind(column(|o| o.max_backoff_ms))
        .bind(column(|o| o.attempt_timeout_ms))
        .bind(column(|o| o.heartbeat_timeout_ms))
        .fetch_all(&mut *conn)
        .await?;
        // Identity values are drawn in insert order, which is `n`'s order.
        chunk_ids.sort_unstable();
        ids.extend(chunk_ids);
    }
    Ok(ids)
}

/// Appends events in order, one statement per chunk. The caller holds the
/// row lock of every migration they belong to, as for every event.
pub(super) async fn insert_events(conn: &mut PgConnection, events: &[NewEvent]) -> Result<()> {
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        let column = |f: fn(&NewEvent) -> i64| -> Vec<i64> { chunk.iter().map(f).collect() };
        let kinds: Vec<&str> = chunk.iter().map(|e| e.kind.as_str()).collect();
        let stages: Vec<Option<i64>> = chunk.iter().map(|e| e.stage).collect();
        let workers: Vec<&str> = chunk.iter().map(|e| e.worker.as_str()).collect();
        let messages: Vec<&str> = chunk.iter().map(|e| e.message.as_str()).collect();
        sqlx::query(
            "INSERT INTO events (migration_id, at, kind, stage_idx, task_id, attempt, worker_id, message)
             SELECT u.migration_id, stagecoach_now_ms(), u.kind, u.stage, u.task_id, u.attempt,
                    u.worker, u.message
             FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[],
                         $6::text[], $7::text[])
                  WITH ORDINALITY AS u(migration_id, kind, stage, task_id, attempt, worker, message, n)
             ORDER BY u.n",
        )
        .bind(column(|e| e.migration_id))
        .bind(&kinds)
        .bind(&stages)
        .bind(column(|e| e.task_id))
        .bind(column(|e| e.attempt))
        .bind(&workers)
        .bind(&messages)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Records the completions of `batch` (indexes into the caller's reports)
/// whose lease is live, set at a time in the caller's transaction, and
/// returns their results by index. The rest — stale, repeated, or adding
/// tasks — are left to the one-by-one path. Takes the row locks of the
/// batch's migrations in id order first (the lock order; the transaction
/// holds no migration lock yet), so the stage transitions it makes are the
/// only ones of those migrations (I1, I2).
///
/// After the locks, one statement does the rest: the update checks every
/// token against the row as the previous lock holders left it (I4; a task
/// reported twice in the batch is updated once), and appends the
/// TaskSucceeded events in batch order and counts the successes of each
/// stage with it, so a batch costs two round trips however many stages it
/// touches.
pub(super) async fn complete_live(
    conn: &mut PgConnection,
    batch: &[Plain<'_>],
) -> Result<HashMap<usize, (ReportAck, Effects)>> {
    if batch.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<i64> = batch.iter().map(|(_, _, c)| c.lease.task_id).collect();
    sqlx::query(
        "SELECT id FROM migrations
         WHERE id = ANY(ARRAY(SELECT migration_id FROM tasks WHERE id = ANY($1)))
         ORDER BY id FOR NO KEY UPDATE",
    )
    .bind(&ids)
    .execute(&mut *conn)
    .await?;
    let outputs: Vec<String> = batch.iter().map(|(_, _, c)| c.output.to_string()).collect();
    let attempts: Vec<i64> = batch
        .iter()
        .map(|(_, _, c)| c.lease.attempt as i64)
        .collect();
    let workers: Vec<&str> = batch.iter().map(|&(_, w, _)| w).collect();
    let indexes: Vec<i64> = batch.iter().map(|&(i, _, _)| i as i64).collect();
    // Rows of two kinds: (batch index, 0, 0, false, false) for a recorded
    // completion, (-1, migration, stage, last, serial) for a counted stage.
    let rows: Vec<(i64, i64, i64, bool, bool)> = sqlx::query_as(
        "WITH now AS MATERIALIZED (SELECT stagecoach_now_ms() AS ms),
         done AS (
             UPDATE tasks SET state = 'succeeded', output = u.output,
                              finished_at = (SELECT ms FROM now), lease_worker = NULL,
                              lease_expires_at = NULL, attempt_deadline = NULL
             FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::bigint[])
                  AS u(id, output, attempt, worker, n)
             WHERE tasks.id = u.id AND tasks.state = 'leased'
               AND tasks.attempt = u.attempt AND tasks.lease_worker = u.worker
             RETURNING tasks.id, tasks.migration_id, tasks.stage_idx, u.attempt, u.worker, u.n),
         logged AS (
             INSERT INTO events (migration_id, at, kind, stage_idx, task_id, attempt, worker_id)
             SELECT migration_id, (SELECT ms FROM now), $6, stage_idx, id, attempt, worker
             FROM done ORDER BY n),
         counted AS (
             UPDATE stages s SET succeeded = s.succeeded + c.n
             FROM (SELECT migration_id, stage_idx, count(*) AS n FROM done GROUP BY 1, 2) c
             WHERE s.migration_id = c.migration_id AND s.idx = c.stage_idx
             RETURNING s.migration_id, s.idx, s.state = 'running' AND s.succeeded = s.total,
                       s.serial)
         SELECT n, 0::bigint, 0::bigint, false, false FROM done
         UNION ALL SELECT -1, * FROM counted",
    )
    .bind(&ids)
    .bind(&outputs)
    .bind(&attempts)
    .bind(&workers)
    .bind(&indexes)
    .bind(EventKind::TaskSucceeded.as_str())
    .fetch_all(&mut *conn)
    .await?;
    let mut done: Vec<usize> = Vec::new();
    let mut stages: Vec<(i64, i64, bool, bool)> = Vec::new();
    for (n, migration_id, stage, last, serial) in rows {
        match usize::try_from(n) {
            Ok(index) => done.push(index),
            Err(_) => stages.push((migration_id, stage, last, serial)),
        }
    }
    if done.is_empty() {
        return Ok(HashMap::new());
    }
    done.sort_unstable();
    // Transitions in (migration, stage) order, as the locks were taken.
    stages.sort_unstable();
    let mut fx = Effects {
        dispatch: true,
        ..Effects::default()
    };
    for (migration_id, stage, last, serial) in stages {
        machine::counted(&mut *conn, migration_id, stage, last, serial, &mut fx).await?;
    }
    Ok(recorded(done, fx))
}
