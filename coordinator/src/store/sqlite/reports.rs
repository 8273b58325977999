//! Outcome reports of the SQLite store, grouped: every report of a batch runs
//! in one transaction (group commit: one fsync for many outcomes), each inside
//! its own savepoint so a rejected report changes nothing while the others of
//! the batch still commit. Every update names the fencing token
//! `(task id, attempt)`, the lease's secret (checked, or for a sweep's
//! failure as read, in the same transaction) and the state it expects in
//! its `WHERE` (I4); a wrong secret is a stale token.

use sqlx::{Row, SqliteConnection, SqlitePool};

use super::bulk;
use super::machine::{self, EventAt, event};
use crate::clock::now_ms;
use crate::domain::{
    Completion, EventKind, Failure, LeaseSecret, LeaseToken, MigrationState, ReportAck, shown,
};
use crate::error::{Error, Result};
use crate::store::common::{
    NewEvent, NewTaskState, StageRow, backoff_ms, dead_reason, past_deadline, plain_completions,
    plan_added_tasks,
};
use crate::store::{Effects, Limits, Report};

/// Records a batch of reports in one transaction. A database failure fails
/// the whole batch (nothing is committed); every other outcome is per report.
pub(super) async fn report_many(
    db: &SqlitePool,
    reports: &[(String, Report)],
    limits: Limits,
) -> Result<Vec<Result<(ReportAck, Effects)>>> {
    let mut tx = db.begin().await?;
    let out = record(&mut tx, reports, limits).await?;
    tx.commit().await?;
    Ok(out)
}

/// Records a batch of reports inside the caller's transaction.
pub(super) async fn record(
    tx: &mut SqliteConnection,
    reports: &[(String, Report)],
    limits: Limits,
) -> Result<Vec<Result<(ReportAck, Effects)>>> {
    // Plain completions of live leases go set at a time; everything else
    // (failures, fan-out, stale or repeated reports) one by one below.
    let plain = plain_completions(reports);
    let mut bulk = bulk::complete_plain(&mut *tx, &plain).await?;
    let mut out = Vec::with_capacity(reports.len());
    for (i, (worker_id, report)) in reports.iter().enumerate() {
        if let Some(done) = bulk.remove(&i) {
            out.push(Ok(done));
            continue;
        }
        let mut fx = Effects::default();
        sqlx::query("SAVEPOINT report").execute(&mut *tx).await?;
        let outcome = match report {
            Report::Complete(c) => complete(&mut *tx, worker_id, c, limits, &mut fx).await,
            Report::Fail(f) => fail(&mut *tx, worker_id, f, &mut fx).await,
        };
        let keep = matches!(outcome, Ok(Outcome::Ack(_)));
        let undo = if keep {
            "RELEASE report"
        } else {
            "ROLLBACK TO report"
        };
        sqlx::query(undo).execute(&mut *tx).await?;
        if !keep {
            sqlx::query("RELEASE report").execute(&mut *tx).await?;
        }
        out.push(match outcome {
            Ok(Outcome::Ack(ack)) => Ok((ack, fx)),
            Ok(Outcome::Stale { task, why }) => {
                reject(&mut *tx, worker_id, report.lease(), &task, &why).await?;
                Err(Error::LeaseNotHeld(why))
            }
            Err(e @ (Error::Database(_) | Error::Corrupt(_))) => return Err(e),
            Err(e) => Err(e),
        });
    }
    Ok(out)
}

/// How a report turned out, before the batch commits.
enum Outcome {
    Ack(ReportAck),
    /// Not the live lease: the report changes nothing.
    Stale {
        task: Reported,
        why: String,
    },
}

/// The task row a report is about.
pub(super) struct Reported {
    pub(super) migration_id: i64,
    pub(super) stage: i64,
    pub(super) kind: String,
    pub(super) state: String,
    pub(super) attempt: i64,
    pub(super) failures: i64,
    pub(super) max_attempts: i64,
    pub(super) worker: Option<String>,
    /// The secret of its current or last lease (none before migration 0007).
    pub(super) secret: Option<LeaseSecret>,
    /// How long ago its migration's deadline passed, if it has (I10).
    pub(super) late_ms: Option<i64>,
}

pub(super) async fn reported(conn: &mut SqliteConnection, lease: LeaseToken) -> Result<Reported> {
    let row = sqlx::query(
        "SELECT migration_id, stage_idx, kind, state, attempt, failures, max_attempts, lease_worker,
                (SELECT ?1 - m.deadline FROM migrations m
                 WHERE m.id = tasks.migration_id AND m.deadline < ?1),
                lease_secret
         FROM tasks WHERE id = ?2",
    )
    .bind(now_ms())
    .bind(lease.task_id)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| {
        Error::LeaseNotHeld(format!(
            "lease {lease} is not held: task {} does not exist",
            lease.task_id
        ))
    })?;
    Ok(Reported {
        migration_id: row.get(0),
        stage: row.get(1),
        kind: row.get(2),
        state: row.get(3),
        attempt: row.get(4),
        failures: row.get(5),
        max_attempts: row.get(6),
        worker: row.get(7),
        late_ms: row.get(8),
        secret: row.get::<Option<i64>, _>(9).map(LeaseSecret::from_db),
    })
}
/// Whether a report names the live lease of this worker (`Ok(None)`: it is
/// stale), or repeats an outcome recorded for this very attempt. A wrong
/// secret makes the token another attempt's: answered as stale, in the same
/// words, so a guesser learns nothing of which part was wrong.
async fn check_lease(
    conn: &mut SqliteConnection,
    worker_id: &str,
    lease: LeaseToken,
    secret: LeaseSecret,
    repeat_state: &str,
) -> Result<std::result::Result<Option<Reported>, Outcome>> {
    let t = reported(conn, lease).await?;
    let same_attempt = t.attempt == lease.attempt as i64 && t.secret == Some(secret);
    if same_attempt && t.state == "leased" && t.worker.as_deref() == Some(worker_id) {
        if let Some(late_ms) = t.late_ms {
            let why = past_deadline(t.migration_id, late_ms);
            return Ok(Err(Outcome::Stale { task: t, why }));
        }
        return Ok(Ok(Some(t)));
    }
    if same_attempt && t.state == repeat_state {
        return Ok(Ok(None));
    }
    let why = format!(
        "lease {lease} is no longer held by worker {} (the task is {} at attempt {}); the report changed nothing, drop it",
        shown(worker_id),
        t.state,
        t.attempt
    );
    Ok(Err(Outcome::Stale { task: t, why }))
}

/// Logs a rejected report (I4), after its savepoint was rolled back.
async fn reject(
    conn: &mut SqliteConnection,
    worker_id: &str,
    lease: LeaseToken,
    task: &Reported,
    why: &str,
) -> Result<()> {
    let at = EventAt {
        stage: Some(task.stage),
        task_id: lease.task_id,
        attempt: lease.attempt as i64,
        worker: worker_id,
        message: why,
    };
    event(conn, task.migration_id, EventKind::ReportRejected, at).await
}

/// The live lease a report names, or the outcome to answer with at once.
macro_rules! live_lease {
    ($conn:expr, $worker:expr, $lease:expr, $secret:expr, $repeat:expr) => {
        match check_lease($conn, $worker, $lease, $secret, $repeat).await? {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(Outcome::Ack(ReportAck::Duplicate)),
            Err(stale) => return Ok(stale),
        }
    };
}

/// A successful attempt; the last success of a stage starts the next one.
async fn complete(
    conn: &mut SqliteConnection,
    worker_id: &str,
    c: &Completion,
    limits: Limits,
    fx: &mut Effects,
) -> Result<Outcome> {
    let t = live_lease!(conn, worker_id, c.lease, c.secret, "succeeded");
    if !c.add_tasks.is_empty() {
        add_tasks(conn, &t, c, limits, fx).await?;
    }
    let done = sqlx::query(
        "UPDATE tasks SET state = 'succeeded', output = ?, finished_at = ?, lease_worker = NULL, lease_expires_at = NULL
         WHERE id = ? AND attempt = ? AND lease_secret = ? AND state = 'leased'",
    )
    .bind(c.output.to_string())
    .bind(now_ms())
    .bind(c.lease.task_id)
    .bind(c.lease.attempt as i64)
    .bind(c.secret.db())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if done == 0 {
        return Err(Error::LeaseNotHeld(format!(
            "lease {} was lost while the report was processed",
            c.lease
        )));
    }
    event(
        conn,
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
    machine::count_successes(conn, t.migration_id, t.stage, 1, fx).await?;
    Ok(Outcome::Ack(ReportAck::Recorded))
}

/// Adds a completing task's new tasks to later, not yet started stages.
async fn add_tasks(
    conn: &mut SqliteConnection,
    t: &Reported,
    c: &Completion,
    limits: Limits,
    fx: &mut Effects,
) -> Result<()> {
    let stages: Vec<StageRow> = sqlx::query_as(
        "SELECT idx, name, state, max_attempts FROM stages WHERE migration_id = ? ORDER BY idx",
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
    let mut events = Vec::with_capacity(c.add_tasks.len());
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
        sqlx::query("UPDATE stages SET total = total + ? WHERE migration_id = ? AND idx = ?")
            .bind(ids.len() as i64)
            .bind(t.migration_id)
            .bind(idx)
            .execute(&mut *conn)
            .await?;
        events.extend(ids.into_iter().zip(tasks).map(|(id, task)| {
            NewEvent::added(t.migration_id, idx, id, &task.kind, c.lease.task_id)
        }));
    }
    bulk::insert_events(conn, &events).await?;
    fx.touch(t.migration_id);
    Ok(())
}

/// A failed attempt: retried after a backoff, or the task dies (I7).
async fn fail(
    conn: &mut SqliteConnection,
    worker_id: &str,
    f: &Failure,
    fx: &mut Effects,
) -> Result<Outcome> {
    // A repeated Fail finds the task ready again (retrying) or dead.
    let repeat = if f.retryable { "ready" } else { "failed" };
    let t = live_lease!(conn, worker_id, f.lease, f.secret, repeat);
    record_failure(conn, &t, f, worker_id, fx).await?;
    Ok(Outcome::Ack(ReportAck::Recorded))
}

/// A failed attempt of a live lease: ready again after a backoff while
/// attempts remain (I7), otherwise the task is dead and the migration fails.
pub(super) async fn record_failure(
    conn: &mut SqliteConnection,
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
         WHERE t.id = ?",
    )
    .bind(f.lease.task_id)
    .fetch_one(&mut *conn)
    .await?;
    let delay = backoff_ms(initial, max, failures);
    sqlx::query(
        "UPDATE tasks SET state = 'ready', failures = ?, error = ?, ready_at = ?,
                          lease_worker = NULL, lease_expires_at = NULL, attempt_deadline = NULL
         WHERE id = ? AND attempt = ? AND lease_secret IS ? AND state = 'leased'",
    )
    .bind(failures)
    .bind(&f.error)
    .bind(now_ms() + delay)
    .bind(f.lease.task_id)
    .bind(f.lease.attempt as i64)
    // the secret checked (a report's) or read (a sweep's) in this transaction
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
    pub(super) stage: i64,
    pub(super) lease: LeaseToken,
    pub(super) failures: i64,
    pub(super) error: &'a str,
    pub(super) reason: &'a str,
}

/// Makes a task dead and fails its migration with the reason (I7).
pub(super) async fn kill_task(
    conn: &mut SqliteConnection,
    migration_id: i64,
    d: Dead<'_>,
    at: EventAt<'_>,
    fx: &mut Effects,
) -> Result<()> {
    let killed = sqlx::query(
        "UPDATE tasks SET state = 'failed', failures = ?, error = ?, finished_at = ?,
                          lease_worker = NULL, lease_expires_at = NULL, attempt_deadline = NULL
         WHERE id = ? AND attempt = ? AND state IN ('leased', 'ready')",
    )
    .bind(d.failures)
    .bind(d.error)
    .bind(now_ms())
    .bind(d.lease.task_id)
    .bind(d.lease.attempt as i64)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if killed == 0 {
        // Already ended by an earlier step of the same transaction (I5).
        return Ok(());
    }
    sqlx::query("UPDATE stages SET failed = failed + 1 WHERE migration_id = ? AND idx = ?")
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
