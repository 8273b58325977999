//! Set-at-a-time SQL for the hot paths of the SQLite store.
//!
//! sqlx runs each SQLite connection on its own thread and every statement is
//! a round trip to it, so at tens of thousands of tasks per second the cost
//! is the number of statements, not the work in each. Here a batch of plain
//! completions (no added tasks) is recorded with a handful of statements
//! whatever its size, events are appended many rows per `INSERT`, and task
//! events many per row.

use std::collections::{BTreeMap, HashMap};

use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

use super::machine;
use crate::clock::now_ms;
use crate::domain::{ReportAck, TaskSpec, task_override};
use crate::error::{Error, Result};
use crate::store::Effects;
use crate::store::common::{LiveLease, NewEvent, NewTaskState, Plain, live_completions, recorded};

/// Rows per multi-row `INSERT` (11 parameters each, far below SQLite's limit).
const ROWS_PER_INSERT: usize = 500;

/// Appends events in order, in one statement: the rows travel as one JSON
/// array, so the statement's text, and its prepared form, are the same
/// whatever the number of events.
pub(super) async fn insert_events(conn: &mut SqliteConnection, events: &[NewEvent]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let rows: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e.migration_id,
                e.kind.as_str(),
                e.stage,
                e.task_id,
                e.attempt,
                e.worker.as_str(),
                e.message.as_str(),
            )
        })
        .collect();
    let rows = serde_json::to_string(&rows).map_err(|e| Error::Corrupt(e.to_string()))?;
    sqlx::query(
        "INSERT INTO events (migration_id, at, kind, stage_idx, task_id, attempt, worker_id, message)
         SELECT value ->> 0, ?, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5,
                value ->> 6
         FROM json_each(?) ORDER BY key",
    )
    .bind(now_ms())
    .bind(rows)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Appends task events — TaskAssigned, TaskSucceeded: no message — as one
/// `event_batches` row per migration, stage and kind, in two statements
/// whatever their number: one takes a block of event ids from the `events`
/// table's counter, one inserts the rows, sent as one JSON array. Ids are
/// handed out in the order given, so each migration's events keep the order
/// they happened in; events appended after them get greater ids. `at` is the
/// time the caller computed its deadlines from, so an attempt's recorded
/// start is never later than the start its timeout counts from.
pub(super) async fn insert_task_events(
    conn: &mut SqliteConnection,
    events: &[NewEvent],
    at: i64,
) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    // Batches in the order of their first event; in a batch, events in
    // order. Keyed by (migration, stage, kind); each event (task, attempt, worker).
    type Key<'a> = (i64, Option<i64>, &'a str);
    type Batch<'a> = (Key<'a>, Vec<(i64, i64, &'a str)>);
    let mut batches: Vec<Batch<'_>> = Vec::new();
    let mut batch_of: HashMap<Key<'_>, usize> = HashMap::new();
    for e in events {
        debug_assert!(e.message.is_empty(), "a task event has no message");
        let key = (e.migration_id, e.stage, e.kind.as_str());
        let i = *batch_of.entry(key).or_insert_with(|| {
            batches.push((key, Vec::new()));
            batches.len() - 1
        });
        batches[i].1.push((e.task_id, e.attempt, e.worker.as_str()));
    }
    let n = events.len() as i64;
    let last: i64 = sqlx::query_scalar(
        "UPDATE sqlite_sequence SET seq = seq + ? WHERE name = 'events' RETURNING seq",
    )
    .bind(n)
    .fetch_one(&mut *conn)
    .await?;
    let mut next = last - n + 1;
    let rows: Vec<_> = batches
        .iter()
        .map(|((migration_id, stage, kind), tasks)| {
            let first = next;
            next += tasks.len() as i64;
            (migration_id, first, next - 1, kind, stage, tasks)
        })
        .collect();
    let rows = serde_json::to_string(&rows).map_err(|e| Error::Corrupt(e.to_string()))?;
    sqlx::query(
        "INSERT INTO event_batches (migration_id, first_id, last_id, at, kind, stage_idx, events)
         SELECT value ->> 0, value ->> 1, value ->> 2, ?, value ->> 3, value ->> 4, value -> 5
         FROM json_each(?)",
    )
    .bind(at)
    .bind(rows)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Inserts `tasks` into one stage in `state`, many rows per statement, and
/// returns their ids in the order given. A task's `max_attempts` is
/// resolved against `stage_attempts` now; the rest of its override is kept
/// as is, NULL meaning "the stage's".
pub(super) async fn insert_tasks(
    conn: &mut SqliteConnection,
    migration_id: i64,
    stage: i64,
    stage_attempts: i64,
    tasks: &[&TaskSpec],
    state: NewTaskState,
) -> Result<Vec<i64>> {
    let set = |v: u32| (v != 0).then_some(v as i64);
    // Ready from now, like the tasks a stage start makes ready: claims take
    // the oldest ready tasks first.
    let ready_at = match state {
        NewTaskState::Ready => now_ms(),
        NewTaskState::Pending => 0,
    };
    let mut ids = Vec::with_capacity(tasks.len());
    for chunk in tasks.chunks(ROWS_PER_INSERT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO tasks (migration_id, stage_idx, kind, payload, state, ready_at,
                                max_attempts, initial_backoff_ms, max_backoff_ms,
                                attempt_timeout_ms, heartbeat_timeout_ms) ",
        );
        q.push_values(chunk, |mut row, t| {
            let o = task_override(t.max_attempts, t.retry);
            row.push_bind(migration_id)
                .push_bind(stage)
                .push_bind(t.kind.as_str())
                .push_bind(t.payload.to_string())
                .push_bind(state.as_str())
                .push_bind(ready_at)
                .push_bind(set(o.max_attempts).unwrap_or(stage_attempts))
                .push_bind(set(o.initial_backoff_ms))
                .push_bind(set(o.max_backoff_ms))
                .push_bind(set(o.attempt_timeout_ms))
                .push_bind(set(o.heartbeat_timeout_ms));
        });
        q.push(" RETURNING id");
        let mut chunk_ids: Vec<i64> = q.build_query_scalar().fetch_all(&mut *conn).await?;
        // RETURNING has no order; rows get increasing ids in VALUES order.
        chunk_ids.sort_unstable();
        ids.extend(chunk_ids);
    }
    Ok(ids)
}

/// Records the completions of `batch` (indexes into `reports`) whose lease is
/// live, set at a time, and returns their results by index. The rest —
/// stale, repeated, or with tasks to add — are left to the one-by-one path.
pub(super) async fn complete_plain(
    conn: &mut SqliteConnection,
    batch: &[Plain<'_>],
) -> Result<HashMap<usize, (ReportAck, Effects)>> {
    if batch.is_empty() {
        return Ok(HashMap::new());
    }
    // Which leases are live right now, in this transaction.
    // Ids in and rows out as one JSON value each: one statement text for
    // every batch size (prepared once), and one row to hand over from
    // sqlx's SQLite thread instead of one per task.
    // A migration past its deadline records nothing more (I10): its
    // reports go the one-by-one way, which rejects them and says why.
    let ids: Vec<i64> = batch.iter().map(|(_, _, c)| c.lease.task_id).collect();
    let now = now_ms();
    let packed: String = sqlx::query_scalar(
        "SELECT json_group_array(json_array(id, attempt, lease_worker, migration_id, stage_idx,
                                            lease_secret))
         FROM tasks WHERE state = 'leased' AND id IN (SELECT value FROM json_each(?1))
           AND NOT EXISTS (SELECT 1 FROM migrations m
                           WHERE m.id = tasks.migration_id AND m.deadline < ?2)",
    )
    .bind(serde_json::Value::from(ids).to_string())
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    type Row = (i64, i64, Option<String>, i64, i64, Option<i64>);
    let rows: Vec<Row> =
        serde_json::from_str(&packed).map_err(|e| Error::Corrupt(format!("live leases: {e}")))?;
    let live: HashMap<i64, LiveLease> = rows
        .into_iter()
        .map(|(id, attempt, worker, m, s, secret)| (id, (attempt, secret, worker, m, s)))
        .collect();
    let taken = live_completions(batch, &live);
    if taken.is_empty() {
        return Ok(HashMap::new());
    }

    // One UPDATE for every task, from one JSON array of [id, output, secret].
    let done: Vec<(i64, &serde_json::Value, i64)> = taken
        .iter()
        .map(|t| {
            let c = t.completion;
            (c.lease.task_id, &c.output, c.secret.db())
        })
        .collect();
    let done = serde_json::to_string(&done).map_err(|e| Error::Corrupt(e.to_string()))?;
    sqlx::query(
        "UPDATE tasks SET state = 'succeeded', output = d.output, finished_at = ?1,
                          lease_worker = NULL, lease_expires_at = NULL, attempt_deadline = NULL
         FROM (SELECT value ->> 0 AS id, value -> 1 AS output, value ->> 2 AS secret
               FROM json_each(?2)) AS d
         WHERE tasks.id = d.id AND tasks.state = 'leased' AND tasks.lease_secret = d.secret",
    )
    .bind(now)
    .bind(done)
    .execute(&mut *conn)
    .await?;

    let mut per_stage: BTreeMap<(i64, i64), i64> = BTreeMap::new();
    let mut events = Vec::with_capacity(taken.len());
    for t in &taken {
        *per_stage.entry((t.migration_id, t.stage)).or_insert(0) += 1;
        events.push(NewEvent::succeeded(t));
    }
    insert_task_events(conn, &events, now).await?;

    // Stage counters and transitions once per stage.
    let mut fx = Effects {
        dispatch: true,
        ..Effects::default()
    };
    for (&(migration_id, stage), &n) in &per_stage {
        machine::count_successes(conn, migration_id, stage, n, &mut fx).await?;
    }
    Ok(recorded(&taken, fx))
}
