//! Set-at-a-time SQL of the PostgreSQL store: a plan's or a fan-out's tasks
//! and every batch of events go in as arrays, one statement per chunk, and a
//! batch of plain completions is a handful of statements, instead of one
//! round trip (or one transaction) per row.

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::PgConnection;

use super::machine;
use crate::domain::{EventKind, ReportAck, TaskSpec, task_override};
use crate::error::Result;
use crate::store::Effects;
use crate::store::common::{LiveLease, NewEvent, NewTaskState, Plain, live_completions, recorded};

/// The end of a statement that leases or ends tasks set at a time: appends
/// their events, of kind `$5`, from the `numbered` rows the statement
/// defines before it (`migration_id`, `stage_idx`, `task_id`, `attempt`,
/// `worker_id`, and `event_id` drawn from the sequence of `events.id`, in
/// the order the events happened), as one `event_batches` row per migration
/// and stage, at the time in the statement's `now` (read once, so the
/// events carry the instant the rows' deadlines and end times were computed
/// from). `list_events` reads them back one event per array element.
pub(super) const LOG_EVENT_BATCHES: &str = "logged AS (
             INSERT INTO event_batches (migration_id, last_id, at, kind, stage_idx,
                                        ids, task_ids, attempts, worker_ids)
             SELECT migration_id, max(event_id), (SELECT ms FROM now), $5, stage_idx,
                    array_agg(event_id ORDER BY event_id), array_agg(task_id ORDER BY event_id),
                    array_agg(attempt ORDER BY event_id), array_agg(worker_id ORDER BY event_id)
             FROM numbered GROUP BY migration_id, stage_idx)";

/// Rows per statement: big enough that round trips stop mattering, small
/// enough that one statement's arrays stay a few megabytes.
const ROWS_PER_STATEMENT: usize = 10_000;

/// Inserts `tasks` into one stage in `state` and returns their ids in the
/// order given. A task's `max_attempts` is resolved against
/// `stage_attempts` now; the rest of its override is kept as is, NULL
/// meaning "the stage's".
pub(super) async fn insert_tasks(
    conn: &mut PgConnection,
    migration_id: i64,
    stage: i64,
    stage_attempts: i64,
    tasks: &[&TaskSpec],
    state: NewTaskState,
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
            // Ready from now (read once), like the tasks a stage start makes
            // ready: claims take the oldest ready tasks first.
            "WITH now AS (SELECT stagecoach_now_ms() AS ms)
             INSERT INTO tasks (migration_id, stage_idx, kind, payload, state, ready_at,
                                max_attempts, initial_backoff_ms, max_backoff_ms,
                                attempt_timeout_ms, heartbeat_timeout_ms)
             SELECT $1, $2, u.kind, u.payload, $10,
                    CASE WHEN $10 = 'ready' THEN now.ms ELSE 0 END,
                    u.attempts, u.ib, u.mb, u.at, u.ht
             FROM now, UNNEST($3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[],
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
        .bind(state.as_str())
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
/// tasks — are left to the one-by-one path.
///
/// The leases are read first, unlocked and by primary key: that read names
/// the batch's migrations, whose row locks are taken next in id order (the
/// lock order; the transaction holds no migration lock yet), so the stage
/// transitions this makes are the only ones of those migrations (I1, I2).
/// A lease can end between the read and the lock (a sweep, a release), so
/// the update checks each token again in its `WHERE` (I4), and only what
/// it changed is recorded. Reading by primary key matters: with
/// `state = 'leased'` in a read's `WHERE`, the planner walked every live
/// lease through a lease index and tested each against the whole id array
/// — 3 µs per completion at 512 leases, growing with the fleet.
pub(super) async fn complete_live(
    conn: &mut PgConnection,
    batch: &[Plain<'_>],
) -> Result<HashMap<usize, (ReportAck, Effects)>> {
    if batch.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<i64> = batch.iter().map(|(_, _, c)| c.lease.task_id).collect();
    let rows: Vec<(i64, i64, Option<String>, i64, i64, String)> = sqlx::query_as(
        "SELECT id, attempt, lease_worker, migration_id, stage_idx, state FROM tasks
         WHERE id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let live: HashMap<i64, LiveLease> = rows
        .into_iter()
        .filter(|r| r.5 == "leased")
        .map(|(id, attempt, worker, m, s, _)| (id, (attempt, worker, m, s)))
        .collect();
    let mut taken = live_completions(batch, &live);
    if taken.is_empty() {
        return Ok(HashMap::new());
    }
    let mut migrations: Vec<i64> = taken.iter().map(|t| t.migration_id).collect();
    migrations.sort_unstable();
    migrations.dedup();
    sqlx::query("SELECT id FROM migrations WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .bind(&migrations)
        .execute(&mut *conn)
        .await?;
    let task_ids: Vec<i64> = taken.iter().map(|t| t.completion.lease.task_id).collect();
    let outputs: Vec<String> = taken
        .iter()
        .map(|t| t.completion.output.to_string())
        .collect();
    let attempts: Vec<i64> = taken
        .iter()
        .map(|t| t.completion.lease.attempt as i64)
        .collect();
    let workers: Vec<&str> = taken.iter().map(|t| t.worker).collect();
    // The TaskSucceeded events go in with the update, in batch order. A
    // task still leased at the attempt read above is still leased to the
    // worker read above: every lease bumps the attempt. The state test is
    // written so that no partial index's predicate matches it: with a plain
    // `state = 'leased'`, statistics from before any lease (the ANALYZE
    // after a big insert) made the planner walk the lease index — every
    // lease since the last vacuum — and test each entry against the whole
    // batch: 51 ms instead of 2 for 250 completions in a 1,000,000-task
    // migration, the fan-out's throughput cut by a third. By primary key,
    // nothing else is looked at.
    let sql = sqlx::AssertSqlSafe(format!(
        "WITH now AS (SELECT stagecoach_now_ms() AS ms),
         done AS (
             UPDATE tasks SET state = 'succeeded', output = u.output,
                              finished_at = (SELECT ms FROM now), lease_worker = NULL,
                              lease_expires_at = NULL, attempt_deadline = NULL
             FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::text[])
                  WITH ORDINALITY AS u(id, output, attempt, worker, n)
             WHERE tasks.id = u.id AND (tasks.state = 'leased') IS TRUE
               AND tasks.attempt = u.attempt
             RETURNING tasks.id, tasks.migration_id, tasks.stage_idx, u.attempt, u.worker, u.n),
         numbered AS (
             SELECT e.*, nextval('events_id_seq') AS event_id
             FROM (SELECT migration_id, stage_idx, id AS task_id, attempt, worker AS worker_id
                   FROM done ORDER BY migration_id, stage_idx, n) AS e),
         {LOG_EVENT_BATCHES}
         SELECT id FROM done"
    ));
    let done: HashSet<i64> = sqlx::query_scalar(sql)
        .bind(&task_ids)
        .bind(&outputs)
        .bind(&attempts)
        .bind(&workers)
        .bind(EventKind::TaskSucceeded.as_str())
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    taken.retain(|t| done.contains(&t.completion.lease.task_id));
    let mut per_stage: BTreeMap<(i64, i64), i64> = BTreeMap::new();
    for t in &taken {
        *per_stage.entry((t.migration_id, t.stage)).or_insert(0) += 1;
    }
    // Stage counters and transitions once per stage.
    let mut fx = Effects {
        dispatch: true,
        ..Effects::default()
    };
    for (&(migration_id, stage), &n) in &per_stage {
        machine::count_successes(&mut *conn, migration_id, stage, n, &mut fx).await?;
    }
    Ok(recorded(&taken, fx))
}
