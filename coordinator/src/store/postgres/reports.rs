//! The worker-facing transitions of the PostgreSQL store: releases,
//! heartbeats and outcome reports (claims are in `claim`). Every update names the fencing token
//! `(task id, attempt)` and the state it expects in its `WHERE` (I4), as on
//! SQLite, and every report and heartbeat the lease's secret too (a wrong
//! one is a stale token; a release needs none: its assignment never left
//! the coordinator); on top of that each transaction takes its locks in the one order
//! of the module doc (worker, migrations by id, pool, tasks), so coordinators
//! running the same transitions at once never deadlock.

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool, Row};

use super::bulk;
use super::machine::{self, EventAt, event};
use super::notify;
use crate::domain::{
    Completion, EventKind, Failure, HeartbeatOutcome, LeaseSecret, LeaseStatus, LeaseToken,
    MigrationState, ReportAck, shown,
};
use crate::error::{Error, Result};
use crate::store::common::{
    HANDED_BACK, NewEvent, NewTaskState, StageRow, backoff_ms, dead_reason, past_deadline,
    plan_added_tasks,
};
use crate::store::{Effects, Limits};

pub(super) async fn release(
    db: &PgPool,
    origin: &str,
    worker_id: &str,
    lease: LeaseToken,
) -> Result<Effects> {
    let mut fx = Effects::default();
    let mut tx = db.begin().await?;
    let migration: Option<i64> = sqlx::query_scalar("SELECT migration_id FROM tasks WHERE id = $1")
        .bind(lease.task_id)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(migration_id) = migration else {
        return Ok(fx);
    };
    // The event goes in under the migration's lock, like every other.
    machine::lock_migration(&mut tx, migration_id).await?;
    let released = sqlx::query(
        "WITH released AS (
             UPDATE tasks SET state = 'ready', attempt = attempt - 1, lease_worker = NULL,
                              lease_expires_at = NULL, attempt_deadline = NULL
             WHERE id = $1 AND attempt = $2 AND state = 'leased' AND lease_worker = $3
             RETURNING migration_id, stage_idx)
         INSERT INTO events (migration_id, at, kind, stage_idx, task_id, attempt, worker_id, message)
         SELECT migration_id, stagecoach_now_ms(), $4, stage_idx, $1, $2, $3, $5 FROM released",
    )
    .bind(lease.task_id)
    .bind(lease.attempt as i64)
    .bind(worker_id)
    .bind(EventKind::TaskHandedBack.as_str())
    .bind(HANDED_BACK)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if released > 0 {
        fx.touch(migration_id);
        fx.dispatch = true;
    }
    notify::commit(tx, origin, &fx).await?;
    Ok(fx)
}

/// Renews the worker's leases in one statement. A task row another
/// transaction holds is skipped, not waited for: that transaction (a report
/// or a sweep ending the lease, which took the task's migration first) could
/// in turn wait for a row this statement already renewed. A skipped lease
/// is neither renewed nor canceled — the next heartbeat settles it — unless
/// by then it is no longer this worker's. Each renewal commits before the
/// reply (I11).
pub(super) async fn heartbeat(
    db: &PgPool,
    worker_id: &str,
    leases: &[LeaseStatus],
    limits: Limits,
) -> Result<HeartbeatOutcome> {
    let mut out = HeartbeatOutcome::default();
    if leases.is_empty() {
        return Ok(out);
    }
    let column = |f: fn(&LeaseStatus) -> i64| -> Vec<i64> { leases.iter().map(f).collect() };
    let ids = column(|l| l.lease.task_id);
    let checkpoints: Vec<Option<&[u8]>> = leases.iter().map(|l| l.checkpoint.as_deref()).collect();
    let renewed: HashMap<i64, i64> = sqlx::query_as(
        "WITH held AS (
             SELECT id FROM tasks WHERE id = ANY($1) AND state = 'leased' AND lease_worker = $2
             FOR UPDATE SKIP LOCKED)
         UPDATE tasks SET
             -- the task's heartbeat timeout, else its stage's, else the default
             lease_expires_at = stagecoach_now_ms() + coalesce(
                 tasks.heartbeat_timeout_ms,
                 (SELECT nullif(s.heartbeat_timeout_ms, 0) FROM stages s
                  WHERE s.migration_id = tasks.migration_id AND s.idx = tasks.stage_idx),
                 $3),
             progress_done = u.done, progress_total = u.total,
             checkpoint = coalesce(u.checkpoint, tasks.checkpoint)
         FROM held, unnest($1::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bytea[],
                           $8::bigint[])
                    AS u(id, attempt, done, total, checkpoint, secret)
         WHERE tasks.id = held.id AND u.id = tasks.id AND tasks.attempt = u.attempt
           AND tasks.lease_secret = u.secret
         RETURNING tasks.id, tasks.lease_expires_at",
    )
    .bind(&ids)
    .bind(worker_id)
    .bind(limits.lease_ms)
    .bind(column(|l| l.lease.attempt as i64))
    .bind(column(|l| l.done as i64))
    .bind(column(|l| l.total as i64))
    .bind(&checkpoints)
    .bind(column(|l| l.secret.db()))
    .fetch_all(db)
    .await?
    .into_iter()
    .collect();
    let rest: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|id| !renewed.contains_key(id))
        .collect();
    // Of the rest, the ones still this worker's were skipped; not waiting.
    // A wrong secret names no lease of this worker's: canceled, like a
    // stale token.
    let still: Vec<(i64, i64, Option<i64>)> = if rest.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as(
            "SELECT id, attempt, lease_secret FROM tasks
             WHERE id = ANY($1) AND state = 'leased' AND lease_worker = $2",
        )
        .bind(&rest)
        .bind(worker_id)
        .fetch_all(db)
        .await?
    };
    for l in leases {
        let token = (l.lease.task_id, l.lease.attempt as i64, Some(l.secret.db()));
        if let Some(&expires) = renewed.get(&l.lease.task_id) {
            out.renewed.push((l.lease, expires));
        } else if !still.contains(&token) {
            out.cancel.push((
                l.lease,
                format!("lease {} is no longer held by this worker", l.lease),
            ));
        }
    }
    Ok(out)
}

/// The task row a report is about.
pub(super) struct Reported {
    pub migration_id: i64,
    pub stage: i64,
    pub kind: String,
    pub state: String,
    pub attempt: i64,
    pub failures: i64,
    pub max_attempts: i64,
    pub worker: Option<String>,
    /// The secret of its current or last lease (none before migration 0013).
    pub secret: Option<LeaseSecret>,
    /// How long ago its migration's deadline passed, if it has (I10).
    pub late_ms: Option<i64>,
}

/// Locks the task's migration, then the task, and reads the task. The
/// migration lock comes first: it is the lock order of every transition.
pub(super) async fn reported(conn: &mut PgConnection, lease: LeaseToken) -> Result<Reported> {
    let not_found = || {
        Error::LeaseNotHeld(format!(
            "lease {lease} is not held: task {} does not exist",
            lease.task_id
        ))
    };
    // A task never moves to another migration: reading it unlocked is safe.
    let migration_id: i64 = sqlx::query_scalar("SELECT migration_id FROM tasks WHERE id = $1")
        .bind(lease.task_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(not_found)?;
    machine::lock_migration(conn, migration_id).await?;
    let row = sqlx::query(
        "SELECT migration_id, stage_idx, kind, state, attempt, failures, max_attempts, lease_worker,
                (SELECT stagecoach_now_ms() - m.deadline FROM migrations m
                 WHERE m.id = tasks.migration_id AND m.deadline < stagecoach_now_ms()),
                lease_secret
         FROM tasks WHERE id = $1 FOR UPDATE OF tasks",
    )
    .bind(lease.task_id)
    .fetch_optional(conn)
    .await?
    .ok_or_else(not_found)?;
    Ok(Reported {
        migration_id: row.try_get(0)?,
        stage: row.try_get(1)?,
        kind: row.try_get(2)?,
        state: row.try_get(3)?,
        attempt: row.try_get(4)?,
        failures: row.try_get(5)?,
        max_attempts: row.try_get(6)?,
        worker: row.try_get(7)?,
        late_ms: row.try_get(8)?,
        secret: row.try_get::<Option<i64>, _>(9)?.map(LeaseSecret::from_db),
    })
}

/// What a report's lease token is, against the task as stored.
enum LeaseCheck {
    /// The live lease of this worker: the report applies.
    Live(Reported),
    /// This very attempt's outcome was recorded before: answer as the first time.
    Repeat,
    /// Not the live lease: the report changes nothing.
    Stale { task: Reported, why: String },
}

/// A wrong secret makes the token another attempt's: answered as stale, in
/// the same words, so a guesser learns nothing of which part was wrong.
async fn check_lease(
    conn: &mut PgConnection,
    worker_id: &str,
    lease: LeaseToken,
    secret: LeaseSecret,
    repeat_state: &str,
) -> Result<LeaseCheck> {
    let t = reported(conn, lease).await?;
    let same_attempt = t.attempt == lease.attempt as i64 && t.secret == Some(secret);
    if same_attempt && t.state == "leased" && t.worker.as_deref() == Some(worker_id) {
        if let Some(late_ms) = t.late_ms {
            let why = past_deadline(t.migration_id, late_ms);
            return Ok(LeaseCheck::Stale { task: t, why });
        }
        return Ok(LeaseCheck::Live(t));
    }
    if same_attempt && t.state == repeat_state {
        return Ok(LeaseCheck::Repeat);
    }
    let why = format!(
        "lease {lease} is no longer held by worker {} (the task is {} at attempt {}); the report changed nothing, drop it",
        shown(worker_id),
        t.state,
        t.attempt
    );
    Ok(LeaseCheck::Stale { task: t, why })
}

/// Logs a rejected report (I4) in its own transaction, after the caller's
/// has been rolled back, and returns the error to answer with.
async fn reject(
    db: &PgPool,
    worker_id: &str,
    lease: LeaseToken,
    task: Reported,
    why: String,
) -> Result<Error> {
    let mut tx = db.begin().await?;
    machine::lock_migration(&mut tx, task.migration_id).await?;
    let at = EventAt {
        stage: Some(task.stage),
        task_id: lease.task_id,
        attempt: lease.attempt as i64,
        worker: worker_id,
        message: &why,
    };
    event(&mut tx, task.migration_id, EventKind::ReportRejected, at).await?;
    tx.commit().await?;
    Ok(Error::LeaseNotHeld(why))
}

/// Runs `check_lease` in `tx`; on a stale lease rolls `tx` back (releasing
/// its locks before `reject` takes them again) and records the rejection.
macro_rules! live_lease {
    ($db:expr, $tx:ident, $worker:expr, $lease:expr, $secret:expr, $repeat:expr) => {
        match check_lease(&mut $tx, $worker, $lease, $secret, $repeat).await? {
            LeaseCheck::Live(t) => t,
            LeaseCheck::Repeat => {
                $tx.rollback().await?;
                return Ok((ReportAck::Duplicate, Effects::default()));
            }
            LeaseCheck::Stale { task, why } => {
                $tx.rollback().await?;
                return Err(reject($db, $worker, $lease, task, why).await?);
            }
        }
    };
}

pub(super) async fn complete(
    db: &PgPool,
    origin: &str,
    worker_id: &str,
    c: &Completion,
    limits: Limits,
) -> Result<(ReportAck, Effects)> {
    let mut fx = Effects::default();
    let mut tx = db.begin().await?;
    let t = live_lease!(db, tx, worker_id, c.lease, c.secret, "succeeded");
    if !c.add_tasks.is_empty() {
        add_tasks(&mut tx, &t, c, limits, &mut fx).await?;
    }
    let done = sqlx::query(
        "UPDATE tasks SET state = 'succeeded', output = $1, finished_at = stagecoach_now_ms(),
                          lease_worker = NULL, lease_expires_at = NULL
         WHERE id = $2 AND attempt = $3 AND lease_secret = $4 AND state = 'leased'",
    )
    .bind(c.output.to_string())
    .bind(c.lease.task_id)
    .bind(c.lease.attempt as i64)
    .bind(c.secret.db())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if done == 0 {
        return Err(Error::LeaseNotHeld(format!(
            "lease {} was lost while the report was processed",
            c.lease
        )));
    }
    event(
        &mut tx,
        t.migration_id,
        EventKind::TaskSucceeded,
        EventAt {
            stage: Some(t.stage),
            task_id: c.lease.task_id,
            attempt: c.lease.attempt as i64,
            worker: worker_id,
            ..Default::default()
        },
    )
    .await?;
    fx.dispatch = true;
    // I1/I2: the migration lock taken in `reported` makes this the only
    // transaction that can see the stage's last success and start the next.
    machine::count_successes(&mut tx, t.migration_id, t.stage, 1, &mut fx).await?;
    notify::commit(tx, origin, &fx).await?;
    Ok((ReportAck::Recorded, fx))
}

/// Adds a completing task's new tasks to later, not yet started stages.
async fn add_tasks(
    conn: &mut PgConnection,
    t: &Reported,
    c: &Completion,
    limits: Limits,
    fx: &mut Effects,
) -> Result<()> {
    let stages: Vec<StageRow> = sqlx::query_as(
        "SELECT idx, name, state, max_attempts FROM stages WHERE migration_id = $1 ORDER BY idx",
    )
    .bind(t.migration_id)
    .fetch_all(&mut *conn)
    .await?;
    let per_stage = plan_added_tasks(
        &stages,
        t.stage,
        &c.add_tasks,
        limits.min_heartbeat_timeout_ms(),
    )?;
    for (idx, (stage_attempts, tasks)) in per_stage {
        let ids = bulk::insert_tasks(
            conn,
            t.migration_id,
            idx,
            stage_attempts,
            &tasks,
            NewTaskState::Pending,
        )
        .await?;
        // One counter update per stage, not per task: a fan-out of thousands.
        sqlx::query("UPDATE stages SET total = total + $1 WHERE migration_id = $2 AND idx = $3")
            .bind(ids.len() as i64)
            .bind(t.migration_id)
            .bind(idx)
            .execute(&mut *conn)
            .await?;
        let events: Vec<NewEvent> = ids
            .into_iter()
            .zip(tasks)
            .map(|(id, task)| NewEvent::added(t.migration_id, idx, id, &task.kind, c.lease.task_id))
            .collect();
        bulk::insert_events(conn, &events).await?;
    }
    fx.touch(t.migration_id);
    Ok(())
}

pub(super) async fn fail(
    db: &PgPool,
    origin: &str,
    worker_id: &str,
    f: &Failure,
) -> Result<(ReportAck, Effects)> {
    let mut fx = Effects::default();
    let mut tx = db.begin().await?;
    // A repeated Fail finds the task ready again (retrying) or dead.
    let repeat = if f.retryable { "ready" } else { "failed" };
    let t = live_lease!(db, tx, worker_id, f.lease, f.secret, repeat);
    record_failure(&mut tx, &t, f, worker_id, &mut fx).await?;
    notify::commit(tx, origin, &fx).await?;
    Ok((ReportAck::Recorded, fx))
}

/// A failed attempt of a live lease: ready again after a backoff while
/// attempts remain (I7), otherwise the task is dead and the migration fails.
pub(super) async fn record_failure(
    conn: &mut PgConnection,
    t: &Reported,
    f: &Failure,
    worker_id: &str,
    fx: &mut Effects,
) -> Result<()> {
    let failures = t.failures + 1;
    let at = EventAt {
        stage: Some(t.stage),
        task_id: f.lease.task_id,
        attempt: f.lease.attempt as i64,
        worker: worker_id,
        message: &f.error,
    };
    if !(f.retryable && failures < t.max_attempts) {
        let reason = dead_reason(f.lease.task_id, &t.kind, failures, &f.error, f.retryable);
        let dead = Dead {
            stage: t.stage,
            lease: f.lease,
            failures,
            error: &f.error,
            reason: &reason,
        };
        return kill_task(conn, t.migration_id, dead, at, fx).await;
    }
    // The task's own backoff where it set one, else its stage's.
    let (initial, max): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(t.initial_backoff_ms, s.initial_backoff_ms),
                coalesce(t.max_backoff_ms, s.max_backoff_ms)
         FROM tasks t JOIN stages s ON s.migration_id = t.migration_id AND s.idx = t.stage_idx
         WHERE t.id = $1",
    )
    .bind(f.lease.task_id)
    .fetch_one(&mut *conn)
    .await?;
    let delay = backoff_ms(initial, max, failures);
    sqlx::query(
        "UPDATE tasks SET state = 'ready', failures = $1, error = $2,
                          ready_at = stagecoach_now_ms() + $3,
                          lease_worker = NULL, lease_expires_at = NULL, attempt_deadline = NULL
         WHERE id = $4 AND attempt = $5 AND lease_secret IS NOT DISTINCT FROM $6
           AND state = 'leased'",
    )
    .bind(failures)
    .bind(&f.error)
    .bind(delay)
    .bind(f.lease.task_id)
    .bind(f.lease.attempt as i64)
    // the secret checked (a report's) or read (a sweep's) under the row lock
    .bind(t.secret.map(LeaseSecret::db))
    .execute(&mut *conn)
    .await?;
    let message = format!(
        "attempt {failures} of {} failed: {}; retrying in {delay} ms",
        t.max_attempts, f.error
    );
    event(
        conn,
        t.migration_id,
        EventKind::TaskRetrying,
        EventAt {
            message: &message,
            ..at
        },
    )
    .await?;
    fx.counted.retries += 1;
    fx.touch(t.migration_id);
    fx.dispatch = true;
    Ok(())
}

/// Why and how a task dies.
pub(super) struct Dead<'a> {
    pub stage: i64,
    pub lease: LeaseToken,
    pub failures: i64,
    pub error: &'a str,
    pub reason: &'a str,
}

/// Makes a task dead and fails its migration with the reason (I7).
pub(super) async fn kill_task(
    conn: &mut PgConnection,
    migration_id: i64,
    d: Dead<'_>,
    at: EventAt<'_>,
    fx: &mut Effects,
) -> Result<()> {
    let killed = sqlx::query(
        "UPDATE tasks SET state = 'failed', failures = $1, error = $2,
                          finished_at = stagecoach_now_ms(),
                          lease_worker = NULL, lease_expires_at = NULL, attempt_deadline = NULL
         WHERE id = $3 AND attempt = $4 AND state IN ('leased', 'ready')",
    )
    .bind(d.failures)
    .bind(d.error)
    .bind(d.lease.task_id)
    .bind(d.lease.attempt as i64)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if killed == 0 {
        // Already ended in this transaction (its migration was aborted by an
        // earlier task of the same sweep): counting it again would break I5.
        return Ok(());
    }
    sqlx::query("UPDATE stages SET failed = failed + 1 WHERE migration_id = $1 AND idx = $2")
        .bind(migration_id)
        .bind(d.stage)
        .execute(&mut *conn)
        .await?;
    event(
        conn,
        migration_id,
        EventKind::TaskDead,
        EventAt {
            message: d.reason,
            ..at
        },
    )
    .await?;
    fx.counted.dead += 1;
    machine::abort_migration(conn, migration_id, MigrationState::Failed, d.reason, fx).await?;
    Ok(())
}
