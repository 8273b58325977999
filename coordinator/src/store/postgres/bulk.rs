//! Set-at-a-time inserts of the PostgreSQL store: a plan's or a fan-out's
//! tasks and their events go in as arrays, one statement per chunk, instead
//! of one round trip per row.

use sqlx::PgConnection;

use crate::domain::{EventKind, TaskSpec, task_override};
use crate::error::Result;

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

/// Appends one event of `kind` per `(task_id, message)` of one stage, in
/// order. The caller holds the migration's row lock, as for every event.
pub(super) async fn insert_task_events(
    conn: &mut PgConnection,
    migration_id: i64,
    kind: EventKind,
    stage: i64,
    events: &[(i64, String)],
) -> Result<()> {
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        let ids: Vec<i64> = chunk.iter().map(|e| e.0).collect();
        let messages: Vec<&str> = chunk.iter().map(|e| e.1.as_str()).collect();
        sqlx::query(
            "INSERT INTO events (migration_id, at, kind, stage_idx, task_id, attempt, worker_id, message)
             SELECT $1, stagecoach_now_ms(), $2, $3, u.task_id, 0, '', u.message
             FROM UNNEST($4::bigint[], $5::text[]) WITH ORDINALITY AS u(task_id, message, n)
             ORDER BY u.n",
        )
        .bind(migration_id)
        .bind(kind.as_str())
        .bind(stage)
        .bind(&ids)
        .bind(&messages)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
