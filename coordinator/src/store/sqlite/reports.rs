//! The worker-facing transitions of the SQLite store: claims, heartbeats,
//! outcome reports and the sweeper. Every update names the fencing token
//! `(task id, attempt)` and the state it expects in its `WHERE` (I4).

use rand::Rng;
use sqlx::{Row, SqliteConnection, SqlitePool};

use super::machine::{self, EventAt, event};
use crate::clock::now_ms;
use crate::domain::{
    Assignment, Completion, EventKind, Failure, HeartbeatOutcome, LeaseStatus, LeaseToken,
    MigrationState, ReportAck, Revoked, SweepReport, validate_task,
};
use crate::error::{Error, Result};
use crate::store::{Effects, Limits};

pub(super) async fn claim(
    db: &SqlitePool,
    worker_id: &str,
    kinds: &[String],
    slots: u32,
    limits: Limits,
) -> Result<Vec<Assignment>> {
    if kinds.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = db.begin().await?;
    // I12: never more live leases than the worker declared slots.
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE state = 'leased' AND lease_worker = ?",
    )
    .bind(worker_id)
    .fetch_one(&mut *tx)
    .await?;
    let free = slots as i64 - held;
    if free <= 0 {
        return Ok(Vec::new());
    }
    let now = now_ms();
    let expires = now + limits.lease_ms;
    let placeholders = vec!["?"; kinds.len()].join(", ");
    // Kinds are bound, not interpolated: only the placeholder list is built.
    let sql = sqlx::AssertSqlSafe(format!(
        "UPDATE tasks SET state = 'leased', attempt = attempt + 1, lease_worker = ?, lease_expires_at = ?,
                          progress_done = 0, progress_total = 0,
                          attempt_deadline = (SELECT CASE WHEN s.attempt_timeout_ms > 0
                                                          THEN ? + s.attempt_timeout_ms END
                                              FROM stages s WHERE s.migration_id = tasks.migration_id
                                                              AND s.idx = tasks.stage_idx)
         WHERE id IN (
             SELECT t.id FROM tasks t
             JOIN stages s ON s.migration_id = t.migration_id AND s.idx = t.stage_idx
             JOIN migrations m ON m.id = t.migration_id
             WHERE t.state = 'ready' AND t.ready_at <= ? AND t.kind IN ({placeholders})
               -- I1/I9: only tasks of a running stage of a running migration
               AND s.state = 'running' AND m.state = 'running'
             ORDER BY t.ready_at, t.id LIMIT ?)
         RETURNING id, attempt, migration_id, stage_idx, kind, payload, checkpoint, max_attempts"
    ));
    let mut q = sqlx::query(sql)
        .bind(worker_id)
        .bind(expires)
        .bind(now)
        .bind(now);
    for k in kinds {
        q = q.bind(k);
    }
    let rows = q.bind(free).fetch_all(&mut *tx).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let (task_id, attempt, migration_id, stage): (i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let (subject, parameters, stage_name): (String, String, String) = sqlx::query_as(
            "SELECT m.subject, m.parameters, s.name FROM migrations m
             JOIN stages s ON s.migration_id = m.id AND s.idx = ? WHERE m.id = ?",
        )
        .bind(stage)
        .bind(migration_id)
        .fetch_one(&mut *tx)
        .await?;
        event(
            &mut tx,
            migration_id,
            EventKind::TaskAssigned,
            EventAt {
                stage: Some(stage),
                task_id,
                attempt,
                worker: worker_id,
                ..Default::default()
            },
        )
        .await?;
        let payload: String = row.get(5);
        out.push(Assignment {
            lease: LeaseToken {
                task_id,
                attempt: attempt as u32,
            },
            migration_id,
            subject,
            stage_index: stage as u32,
            stage_name,
            kind: row.get(4),
            payload: serde_json::from_str(&payload)
                .map_err(|e| Error::Corrupt(format!("payload: {e}")))?,
            parameters: serde_json::from_str(&parameters)
                .map_err(|e| Error::Corrupt(format!("parameters: {e}")))?,
            lease_expires_at_ms: expires,
            checkpoint: row.get(6),
            max_attempts: row.get::<i64, _>(7) as u32,
        });
    }
    tx.commit().await?;
    Ok(out)
}

pub(super) async fn release(
    db: &SqlitePool,
    worker_id: &str,
    lease: LeaseToken,
) -> Result<Effects> {
    let mut fx = Effects::default();
    // The attempt number stays bumped so the undelivered token stays stale.
    let released = sqlx::query(
        "UPDATE tasks SET state = 'ready', lease_worker = NULL, lease_expires_at = NULL
         WHERE id = ? AND attempt = ? AND state = 'leased' AND lease_worker = ?",
    )
    .bind(lease.task_id)
    .bind(lease.attempt as i64)
    .bind(worker_id)
    .execute(db)
    .await?
    .rows_affected();
    fx.dispatch = released > 0;
    Ok(fx)
}

pub(super) async fn heartbeat(
    db: &SqlitePool,
    worker_id: &str,
    leases: &[LeaseStatus],
    limits: Limits,
) -> Result<HeartbeatOutcome> {
    let mut out = HeartbeatOutcome::default();
    if leases.is_empty() {
        return Ok(out);
    }
    let mut tx = db.begin().await?;
    let expires = now_ms() + limits.lease_ms;
    for l in leases {
        let renewed = sqlx::query(
            "UPDATE tasks SET lease_expires_at = ?, progress_done = ?, progress_total = ?,
                              checkpoint = coalesce(?, checkpoint)
             WHERE id = ? AND attempt = ? AND state = 'leased' AND lease_worker = ?",
        )
        .bind(expires)
        .bind(l.done as i64)
        .bind(l.total as i64)
        .bind(&l.checkpoint)
        .bind(l.lease.task_id)
        .bind(l.lease.attempt as i64)
        .bind(worker_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if renewed == 1 {
            out.renewed.push((l.lease, expires));
        } else {
            out.cancel.push((
                l.lease,
                format!("lease {} is no longer held by this worker", l.lease),
            ));
        }
    }
    tx.commit().await?;
    Ok(out)
}

/// The task row a report is about.
struct Reported {
    migration_id: i64,
    stage: i64,
    kind: String,
    state: String,
    attempt: i64,
    failures: i64,
    max_attempts: i64,
    worker: Option<String>,
}

async fn reported(conn: &mut SqliteConnection, lease: LeaseToken) -> Result<Reported> {
    let row = sqlx::query(
        "SELECT migration_id, stage_idx, kind, state, attempt, failures, max_attempts, lease_worker
         FROM tasks WHERE id = ?",
    )
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

async fn check_lease(
    conn: &mut SqliteConnection,
    worker_id: &str,
    lease: LeaseToken,
    repeat_state: &str,
) -> Result<LeaseCheck> {
    let t = reported(conn, lease).await?;
    let same_attempt = t.attempt == lease.attempt as i64;
    if same_attempt && t.state == "leased" && t.worker.as_deref() == Some(worker_id) {
        return Ok(LeaseCheck::Live(t));
    }
    if same_attempt && t.state == repeat_state {
        return Ok(LeaseCheck::Repeat);
    }
    let why = format!(
        "lease {lease} is no longer held by worker {worker_id:?} (the task is {} at attempt {}); the report changed nothing, drop it",
        t.state, t.attempt
    );
    Ok(LeaseCheck::Stale { task: t, why })
}

/// Logs a rejected report (I4) in its own transaction, after the caller's
/// has been rolled back, and returns the error to answer with.
async fn reject(
    db: &SqlitePool,
    worker_id: &str,
    lease: LeaseToken,
    task: Reported,
    why: String,
) -> Result<Error> {
    let mut tx = db.begin().await?;
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

/// Runs `check_lease` in `tx`; on a stale lease rolls `tx` back and records the rejection.
macro_rules! live_lease {
    ($db:expr, $tx:ident, $worker:expr, $lease:expr, $repeat:expr) => {
        match check_lease(&mut $tx, $worker, $lease, $repeat).await? {
            LeaseCheck::Live(t) => t,
            LeaseCheck::Repeat => return Ok((ReportAck::Duplicate, Effects::default())),
            LeaseCheck::Stale { task, why } => {
                drop($tx);
                return Err(reject($db, $worker, $lease, task, why).await?);
            }
        }
    };
}

pub(super) async fn complete(
    db: &SqlitePool,
    worker_id: &str,
    c: &Completion,
) -> Result<(ReportAck, Effects)> {
    let mut fx = Effects::default();
    let mut tx = db.begin().await?;
    let t = live_lease!(db, tx, worker_id, c.lease, "succeeded");
    if !c.add_tasks.is_empty() {
        add_tasks(&mut tx, &t, c, &mut fx).await?;
    }
    let done = sqlx::query(
        "UPDATE tasks SET state = 'succeeded', output = ?, finished_at = ?, lease_worker = NULL, lease_expires_at = NULL
         WHERE id = ? AND attempt = ? AND state = 'leased'",
    )
    .bind(c.output.to_string())
    .bind(now_ms())
    .bind(c.lease.task_id)
    .bind(c.lease.attempt as i64)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if done == 0 {
        return Err(Error::LeaseNotHeld(format!(
            "lease {} was lost while the report was processed",
            c.lease
        )));
    }
    sqlx::query("UPDATE stages SET succeeded = succeeded + 1 WHERE migration_id = ? AND idx = ?")
        .bind(t.migration_id)
        .bind(t.stage)
        .execute(&mut *tx)
        .await?;
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
    fx.touch(t.migration_id);
    fx.dispatch = true;
    if machine::after_task_success(&mut tx, t.migration_id, t.stage, &mut fx).await? {
        let pool: String = sqlx::query_scalar("SELECT pool FROM migrations WHERE id = ?")
            .bind(t.migration_id)
            .fetch_one(&mut *tx)
            .await?;
        machine::admit(&mut tx, &pool, &mut fx).await?;
    }
    tx.commit().await?;
    Ok((ReportAck::Recorded, fx))
}

/// Adds a completing task's new tasks to later, not yet started stages.
async fn add_tasks(
    conn: &mut SqliteConnection,
    t: &Reported,
    c: &Completion,
    fx: &mut Effects,
) -> Result<()> {
    let stages: Vec<(i64, String, String, i64)> = sqlx::query_as(
        "SELECT idx, name, state, max_attempts FROM stages WHERE migration_id = ? ORDER BY idx",
    )
    .bind(t.migration_id)
    .fetch_all(&mut *conn)
    .await?;
    for (j, task) in c.add_tasks.iter().enumerate() {
        let field = format!("add_tasks[{j}]");
        validate_task(&field, &task.kind, &task.payload, task.max_attempts)?;
        let Some((idx, name, state, stage_attempts)) = stages.iter().find(|s| s.1 == task.stage)
        else {
            let names: Vec<&str> = stages.iter().map(|s| s.1.as_str()).collect();
            return Err(Error::invalid(
                format!("{field}.stage"),
                format!(
                    "the plan has no stage {:?}; its stages are {names:?}",
                    task.stage
                ),
            ));
        };
        if *idx <= t.stage || state != "pending" {
            return Err(Error::FailedPrecondition(format!(
                "{field}.stage: stage {name:?} (index {idx}) has already started or is not after this task's stage (index {}); tasks can only be added to later stages that have not started",
                t.stage
            )));
        }
        let attempts = if task.max_attempts == 0 {
            *stage_attempts
        } else {
            task.max_attempts as i64
        };
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO tasks (migration_id, stage_idx, kind, payload, state, max_attempts)
             VALUES (?, ?, ?, ?, 'pending', ?) RETURNING id",
        )
        .bind(t.migration_id)
        .bind(idx)
        .bind(&task.kind)
        .bind(task.payload.to_string())
        .bind(attempts)
        .fetch_one(&mut *conn)
        .await?;
        sqlx::query("UPDATE stages SET total = total + 1 WHERE migration_id = ? AND idx = ?")
            .bind(t.migration_id)
            .bind(idx)
            .execute(&mut *conn)
            .await?;
        let message = format!("{} added by task {}", task.kind, c.lease.task_id);
        event(
            conn,
            t.migration_id,
            EventKind::TaskAdded,
            EventAt {
                stage: Some(*idx),
                task_id: id,
                message: &message,
                ..Default::default()
            },
        )
        .await?;
    }
    fx.touch(t.migration_id);
    Ok(())
}

pub(super) async fn fail(
    db: &SqlitePool,
    worker_id: &str,
    f: &Failure,
) -> Result<(ReportAck, Effects)> {
    let mut fx = Effects::default();
    let mut tx = db.begin().await?;
    // A repeated Fail finds the task ready again (retrying) or dead.
    let repeat = if f.retryable { "ready" } else { "failed" };
    let t = live_lease!(db, tx, worker_id, f.lease, repeat);
    record_failure(&mut tx, &t, f, worker_id, &mut fx).await?;
    tx.commit().await?;
    Ok((ReportAck::Recorded, fx))
}

/// A failed attempt of a live lease: ready again after a backoff while
/// attempts remain (I7), otherwise the task is dead and the migration fails.
async fn record_failure(
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
        let reason = if f.retryable {
            format!(
                "task {} ({}) failed after {failures} attempts: {}",
                f.lease.task_id, t.kind, f.error
            )
        } else {
            format!("task {} ({}) failed: {}", f.lease.task_id, t.kind, f.error)
        };
        let dead = Dead {
            stage: t.stage,
            lease: f.lease,
            failures,
            error: &f.error,
            reason: &reason,
        };
        return kill_task(conn, t.migration_id, dead, at, fx).await;
    }
    let (initial, max): (i64, i64) = sqlx::query_as(
        "SELECT initial_backoff_ms, max_backoff_ms FROM stages WHERE migration_id = ? AND idx = ?",
    )
    .bind(t.migration_id)
    .bind(t.stage)
    .fetch_one(&mut *conn)
    .await?;
    let delay = backoff_ms(initial, max, failures);
    sqlx::query(
        "UPDATE tasks SET state = 'ready', failures = ?, error = ?, ready_at = ?,
                          lease_worker = NULL, lease_expires_at = NULL, attempt_deadline = NULL
         WHERE id = ? AND attempt = ? AND state = 'leased'",
    )
    .bind(failures)
    .bind(&f.error)
    .bind(now_ms() + delay)
    .bind(f.lease.task_id)
    .bind(f.lease.attempt as i64)
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
    fx.touch(t.migration_id);
    fx.dispatch = true;
    Ok(())
}

/// Why and how a task dies.
struct Dead<'a> {
    stage: i64,
    lease: LeaseToken,
    failures: i64,
    error: &'a str,
    reason: &'a str,
}

/// Makes a task dead and fails its migration with the reason (I7).
async fn kill_task(
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
    machine::abort_migration(conn, migration_id, MigrationState::Failed, d.reason, fx).await?;
    Ok(())
}

/// Exponential backoff with equal jitter: half the delay is fixed, half random,
/// so retries of many tasks that failed together spread out.
fn backoff_ms(initial: i64, max: i64, failures: i64) -> i64 {
    let exp = initial.saturating_mul(1i64 << (failures - 1).clamp(0, 30));
    let delay = exp.min(max).max(1);
    delay / 2 + rand::rng().random_range(0..=delay / 2)
}

pub(super) async fn sweep(db: &SqlitePool, limits: Limits) -> Result<(SweepReport, Effects)> {
    let mut fx = Effects::default();
    let mut report = SweepReport::default();
    let mut tx = db.begin().await?;
    let now = now_ms();
    expire_leases(&mut tx, now, limits, &mut report, &mut fx).await?;
    time_out_attempts(&mut tx, now, &mut report, &mut fx).await?;
    let late: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM migrations WHERE state IN ('queued', 'running') AND deadline IS NOT NULL AND deadline < ?",
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    for id in late {
        if machine::abort_migration(
            &mut tx,
            id,
            MigrationState::Failed,
            "deadline exceeded",
            &mut fx,
        )
        .await?
        {
            report.deadlines_exceeded += 1;
        }
    }
    // Retries whose backoff ended since the last sweep become claimable
    // without any write: tell the dispatcher.
    let due: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE state = 'ready' AND ready_at <= ? AND ready_at > ?",
    )
    .bind(now)
    .bind(now - 2 * limits.lease_ms.max(1000))
    .fetch_one(&mut *tx)
    .await?;
    fx.dispatch |= due > 0;
    tx.commit().await?;
    Ok((report, fx))
}

/// Leases past their expiry go back to `ready` (I6); a task that lost its
/// worker `max_reassignments` times is dead instead of looping forever.
async fn expire_leases(
    conn: &mut SqliteConnection,
    now: i64,
    limits: Limits,
    report: &mut SweepReport,
    fx: &mut Effects,
) -> Result<()> {
    let expired = sqlx::query(
        "SELECT id, attempt, migration_id, stage_idx, kind, expiries, failures, lease_worker
         FROM tasks WHERE state = 'leased' AND lease_expires_at < ? ORDER BY id",
    )
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    for row in expired {
        let lease = LeaseToken {
            task_id: row.get(0),
            attempt: row.get::<i64, _>(1) as u32,
        };
        let (migration_id, stage, kind, expiries, failures): (i64, i64, String, i64, i64) = (
            row.get(2),
            row.get(3),
            row.get(4),
            row.get::<i64, _>(5) + 1,
            row.get(6),
        );
        // An earlier step of this sweep may have ended the task (its
        // migration failed): act only on a lease that is still live.
        if !still_leased(conn, lease).await? {
            continue;
        }
        let worker: String = row.get::<Option<String>, _>(7).unwrap_or_default();
        let message = format!(
            "lease expired on worker {worker:?} ({expiries} of {} allowed)",
            limits.max_reassignments
        );
        let at = EventAt {
            stage: Some(stage),
            task_id: lease.task_id,
            attempt: lease.attempt as i64,
            worker: &worker,
            message: &message,
        };
        event(
            conn,
            migration_id,
            EventKind::TaskLeaseExpired,
            EventAt { ..at },
        )
        .await?;
        report.leases_expired += 1;
        fx.touch(migration_id);
        fx.dispatch = true;
        if expiries >= limits.max_reassignments as i64 {
            let reason = format!(
                "task {} ({kind}) lost its worker {expiries} times",
                lease.task_id
            );
            let dead = Dead {
                stage,
                lease,
                failures,
                error: &reason,
                reason: &reason,
            };
            kill_task(conn, migration_id, dead, at, fx).await?;
            report.tasks_dead += 1;
        } else {
            sqlx::query(
                "UPDATE tasks SET state = 'ready', expiries = ?, ready_at = ?,
                                  lease_worker = NULL, lease_expires_at = NULL, attempt_deadline = NULL
                 WHERE id = ? AND attempt = ? AND state = 'leased'",
            )
            .bind(expiries)
            .bind(now)
            .bind(lease.task_id)
            .bind(lease.attempt as i64)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

/// Attempts running longer than their stage's `attempt_timeout_ms` fail as
/// retryable (start-to-close timeout); the worker is told to stop.
async fn time_out_attempts(
    conn: &mut SqliteConnection,
    now: i64,
    report: &mut SweepReport,
    fx: &mut Effects,
) -> Result<()> {
    let late: Vec<(i64, i64, Option<String>)> = sqlx::query_as(
        "SELECT id, attempt, lease_worker FROM tasks
         WHERE state = 'leased' AND attempt_deadline IS NOT NULL AND attempt_deadline < ? ORDER BY id",
    )
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    for (task_id, attempt, worker) in late {
        let lease = LeaseToken {
            task_id,
            attempt: attempt as u32,
        };
        let worker = worker.unwrap_or_default();
        if !still_leased(conn, lease).await? {
            continue;
        }
        let t = reported(conn, lease).await?;
        let timeout: i64 = sqlx::query_scalar(
            "SELECT attempt_timeout_ms FROM stages WHERE migration_id = ? AND idx = ?",
        )
        .bind(t.migration_id)
        .bind(t.stage)
        .fetch_one(&mut *conn)
        .await?;
        let error = format!("attempt timed out after {timeout} ms");
        let f = Failure {
            lease,
            error,
            retryable: true,
        };
        record_failure(conn, &t, &f, &worker, fx).await?;
        fx.revoked.push(Revoked {
            worker_id: worker,
            lease,
            reason: f.error.clone(),
        });
        report.attempts_timed_out += 1;
    }
    Ok(())
}

/// Whether `lease` is still the task's live lease, inside the transaction.
async fn still_leased(conn: &mut SqliteConnection, lease: LeaseToken) -> Result<bool> {
    let live: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM tasks WHERE id = ? AND attempt = ? AND state = 'leased'")
            .bind(lease.task_id)
            .bind(lease.attempt as i64)
            .fetch_optional(conn)
            .await?;
    Ok(live.is_some())
}
