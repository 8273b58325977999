//! Set-at-a-time SQL of the PostgreSQL store: a plan's or a fan-out's tasks
//! and every batch of events go in as arrays, one statement per chunk, and a
//! batch of plain completions is a handful of statements, instead of one
//! round trip (or one transaction) per row.

use std::collections::{HashMap, HashSet};

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, Row};

use super::{claim, machine, notify};
use crate::domain::{EventKind, ReportAck, TaskSpec, task_override};
use crate::error::Result;
use crate::store::common::{LiveLease, NewEvent, NewTaskState, Plain, live_completions, recorded};
use crate::store::{ClaimRequest, Effects};

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

/// The smallest batch of completions whose statement also counts the
/// dispatch pass's leases (see [`complete_live`]).
const COUNT_LEASES_FROM: usize = 64;

/// What [`complete_live`] did: the completions it recorded, by batch index,
/// what a dispatch pass after it need not ask again, and the effects it
/// published for other coordinators (delivered at commit).
#[derive(Default)]
pub(super) struct Completed {
    pub done: HashMap<usize, (ReportAck, Effects)>,
    pub known: claim::Known,
    pub published: Effects,
}

/// Records the completions of `batch` (indexes into the caller's reports)
/// whose lease is live, set at a time in the caller's transaction, and
/// returns their results by index. The rest — stale, repeated, or adding
/// tasks — are left to the one-by-one path. Takes the advisory locks of
/// `workers` first (for a dispatch pass after it, in the lock order).
///
/// Two statements. The first takes the worker locks, reads the leases by
/// primary key, unlocked, and locks the migrations that read names, in id
/// order, so the stage transitions this makes are the only ones of those
/// migrations (I1, I2). A lease can end between that read and the lock (a
/// sweep, a release), so the second, which records the completions and
/// counts them in their stages, checks each token again in its `WHERE`
/// (I4); only what it changed is recorded. The lease secrets come with the
/// first read (one more column) and are checked against the reports there. Reading by primary key matters:
/// with `state = 'leased'` in a read's `WHERE`, the planner walked every
/// live lease through a lease index and tested each against the whole id
/// array — 3 µs per completion at 512 leases, growing with the fleet.
/// Every round trip saved matters as much: on a busy machine each one
/// costs about as much as recording a few dozen completions.
pub(super) async fn complete_live(
    conn: &mut PgConnection,
    origin: &str,
    batch: &[Plain<'_>],
    workers: &[ClaimRequest],
) -> Result<Completed> {
    let ids: Vec<i64> = batch.iter().map(|(_, _, c)| c.lease.task_id).collect();
    // The locks happen as the final row is made: after the read (an
    // aggregate), the workers' (which `locked` waits for), then the
    // migrations'.
    let sql = sqlx::AssertSqlSafe(format!(
        "WITH {},
         leases AS (
             SELECT id, attempt, lease_worker, migration_id, stage_idx, state, lease_secret
             FROM tasks WHERE id = ANY($1)),
         locked AS (
             SELECT id, deadline < stagecoach_now_ms() AS late FROM migrations
             WHERE id IN (SELECT migration_id FROM leases WHERE state = 'leased')
               AND (SELECT n FROM workers) >= 0
             ORDER BY id
             FOR NO KEY UPDATE)
         SELECT (SELECT n FROM workers), (SELECT array_agg(id) FROM locked),
                array_agg(l.id), array_agg(l.attempt), array_agg(l.lease_worker),
                array_agg(l.migration_id), array_agg(l.stage_idx),
                (SELECT array_agg(id) FROM locked WHERE late), array_agg(l.lease_secret)
         FROM leases l WHERE l.state = 'leased'",
        claim::lock_workers_cte(2)
    ));
    let row = claim::bind_workers(sqlx::query(sql).bind(&ids), workers)
        .fetch_one(&mut *conn)
        .await?;
    let (ids, attempts): (Vec<i64>, Vec<i64>) = (column(&row, 2)?, column(&row, 3)?);
    let holders: Vec<Option<String>> = column(&row, 4)?;
    let (migrations, stages): (Vec<i64>, Vec<i64>) = (column(&row, 5)?, column(&row, 6)?);
    // A migration past its deadline records nothing more (I10): its reports
    // go the one-by-one way, which rejects them and says why.
    let late: HashSet<i64> = column(&row, 7)?.into_iter().collect();
    let secrets: Vec<Option<i64>> = column(&row, 8)?;
    let live: HashMap<i64, LiveLease> = ids
        .into_iter()
        .zip(attempts.into_iter().zip(secrets))
        .zip(holders)
        .zip(migrations.into_iter().zip(stages))
        .filter(|(_, (m, _))| !late.contains(m))
        .map(|(((id, (attempt, secret)), worker), (m, s))| (id, (attempt, secret, worker, m, s)))
        .collect();
    let mut completed = Completed::default();
    completed.known.locked = column(&row, 1)?;
    let mut taken = live_completions(batch, &live);
    if taken.is_empty() {
        return Ok(completed);
    }
    let task_ids: Vec<i64> = taken.iter().map(|t| t.completion.lease.task_id).collect();
    let outputs: Vec<String> = taken
        .iter()
        .map(|t| t.completion.output.to_string())
        .collect();
    let attempts: Vec<i64> = taken
        .iter()
        .map(|t| t.completion.lease.attempt as i64)
        .collect();
    let reporters: Vec<&str> = taken.iter().map(|t| t.worker).collect();
    // What this batch does, as other coordinators need to hear it: the
    // statement publishes it, and the commit need not unless more happens.
    completed.published = Effects {
        touched: taken.iter().map(|t| t.migration_id).collect(),
        dispatch: true,
        ..Effects::default()
    };
    let notices = notify::payloads(origin, &completed.published);
    // A big batch also counts the pass's workers' leases: the statement
    // runs after their locks. Not a small one: with that count in it,
    // PostgreSQL never settles on a generic plan for the statement when the
    // arrays are short (the count's estimate grows with an array it cannot
    // see), and planning it afresh takes 0.3 ms, more than a round trip
    // when the machine is quiet, which is when batches are small.
    let count_leases = !workers.is_empty() && taken.len() >= COUNT_LEASES_FROM;
    let (leases_cte, leases_columns) = if count_leases {
        (
            format!(",\n{}", claim::count_leases_cte(8)),
            ", (SELECT array_agg(id) FROM leases_held), (SELECT array_agg(n) FROM leases_held)",
        )
    } else {
        (String::new(), "")
    };
    // The TaskSucceeded events go in with the update, in batch order. A
    // task still leased at the attempt read above is still leased to the
    // worker read above, under the secret checked above: every lease bumps
    // the attempt and draws a new secret. The state test is
    // written so that no partial index's predicate matches it: with a plain
    // `state = 'leased'`, statistics from before any lease (the ANALYZE
    // after a big insert) made the planner walk the lease index — every
    // lease since the last vacuum — and test each entry against the whole
    // batch: 51 ms instead of 2 for 250 completions in a 1,000,000-task
    // migration, the fan-out's throughput cut by a third. By primary key,
    // nothing else is looked at. The stages' counters go up in the same
    // statement (the migration locks keep other writers of those rows
    // away); what the counts make happen is up to `machine::counted`.
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
         {LOG_EVENT_BATCHES},
         counted AS (
             UPDATE stages SET succeeded = stages.succeeded + c.n
             FROM (SELECT migration_id, stage_idx, count(*) AS n FROM done
                   GROUP BY migration_id, stage_idx) AS c
             WHERE stages.migration_id = c.migration_id AND stages.idx = c.stage_idx
             RETURNING stages.migration_id, stages.idx,
                       stages.state = 'running' AND stages.succeeded = stages.total AS last,
                       stages.serial),
         notified AS (SELECT count(pg_notify($6, p)) AS n FROM unnest($7::text[]) AS p){leases_cte}
         SELECT (SELECT array_agg(id) FROM done), array_agg(migration_id ORDER BY migration_id, idx),
                array_agg(idx ORDER BY migration_id, idx), array_agg(last ORDER BY migration_id, idx),
                array_agg(serial ORDER BY migration_id, idx), (SELECT n FROM notified)
                {leases_columns}
         FROM counted"
    ));
    let mut query = sqlx::query(sql)
        .bind(&task_ids)
        .bind(&outputs)
        .bind(&attempts)
        .bind(&reporters)
        .bind(EventKind::TaskSucceeded.as_str())
        .bind(notify::CHANNEL)
        .bind(&notices);
    if count_leases {
        let (ids, slots) = claim::worker_slots(workers);
        query = query.bind(ids).bind(slots);
    }
    let row = query.fetch_one(&mut *conn).await?;
    let done: HashSet<i64> = column(&row, 0)?.into_iter().collect();
    taken.retain(|t| done.contains(&t.completion.lease.task_id));
    if count_leases {
        // The count's snapshot is from before the update: the leases it
        // ended were live then.
        let mut leases: HashMap<String, i64> = column::<String>(&row, 6)?
            .into_iter()
            .zip(column::<i64>(&row, 7)?)
            .collect();
        for t in &taken {
            if let Some(n) = leases.get_mut(t.worker) {
                *n -= 1;
            }
        }
        completed.known.leases = Some(leases);
    }
    // Stage transitions once per stage, in (migration, stage) order.
    let mut fx = Effects {
        dispatch: true,
        ..Effects::default()
    };
    let (migrations, stages) = (column(&row, 1)?, column(&row, 2)?);
    let (last, serial): (Vec<bool>, Vec<bool>) = (column(&row, 3)?, column(&row, 4)?);
    for (((m, stage), last), serial) in migrations.into_iter().zip(stages).zip(last).zip(serial) {
        machine::counted(&mut *conn, m, stage, last, serial, &mut fx).await?;
    }
    completed.done = recorded(&taken, fx);
    Ok(completed)
}

/// Column `i` of `row`, an array that SQL's `array_agg` of no rows leaves
/// NULL: empty then.
fn column<T>(row: &PgRow, i: usize) -> Result<Vec<T>>
where
    for<'r> Vec<T>: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    Ok(row.try_get::<Option<Vec<T>>, _>(i)?.unwrap_or_default())
}
