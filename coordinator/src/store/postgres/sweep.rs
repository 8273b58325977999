//! The sweeper of the PostgreSQL store: expired leases, attempts past their
//! timeout, migrations past their deadline (I6, I7, I10) — and, as a safety
//! net for I3, pools left with a queued migration beside a free slot.
//!
//! Every coordinator sweeps. A pass reads the migrations that need it, then
//! handles each in a transaction of its own that takes the migration's row
//! lock with `SKIP LOCKED`: a migration another coordinator is sweeping (or a
//! transition holds) is left to that one or to the next pass, so many
//! sweepers work side by side without waiting for each other. One migration
//! per transaction also means a transaction holds at most one pool lock.

use sqlx::{PgConnection, PgPool};

use super::machine::{self, EventAt, event};
use super::reports::{Dead, kill_task, record_failure, reported};
use super::{merge, notify, transact};
use crate::domain::{EventKind, Failure, LeaseToken, MigrationState, Revoked, SweepReport};
use crate::error::Result;
use crate::store::common;
use crate::store::{Effects, Limits};

pub(super) async fn sweep(
    db: &PgPool,
    origin: &str,
    limits: Limits,
) -> Result<(SweepReport, Effects)> {
    let mut report = SweepReport::default();
    let mut fx = Effects::default();
    // One instant for the whole pass, from the database's clock.
    let now: i64 = sqlx::query_scalar("SELECT stagecoach_now_ms()")
        .fetch_one(db)
        .await?;
    let due: Vec<i64> = sqlx::query_scalar(
        "SELECT migration_id FROM tasks WHERE state = 'leased' AND lease_expires_at < $1
         UNION SELECT migration_id FROM tasks WHERE state = 'leased' AND attempt_deadline < $1
         UNION SELECT id FROM migrations WHERE state IN ('queued', 'running') AND deadline < $1
         ORDER BY 1",
    )
    .bind(now)
    .fetch_all(db)
    .await?;
    for id in due {
        let (part, part_fx) =
            transact("sweep", || sweep_migration(db, origin, id, now, limits)).await?;
        report.leases_expired += part.leases_expired;
        report.tasks_dead += part.tasks_dead;
        report.deadlines_exceeded += part.deadlines_exceeded;
        report.attempts_timed_out += part.attempts_timed_out;
        merge(&mut fx, part_fx);
    }
    // Retries whose backoff ended since the last sweep become claimable
    // without any write: tell the dispatcher.
    // An existence check, not a count: a stage that just made a million
    // tasks ready must not cost a million-row scan per sweep.
    let retries: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM tasks WHERE state = 'ready' AND (failures > 0 OR expiries > 0)
           AND ready_at <= $1 AND ready_at > $2 LIMIT 1",
    )
    .bind(now)
    .bind(now - 2 * limits.lease_ms.max(1000))
    .fetch_optional(db)
    .await?;
    fx.dispatch |= retries.is_some();
    // I3 safety net. Admission skips a queued migration whose row another
    // transaction holds at that moment (waiting could deadlock); when that
    // holder was only a rejected report, nothing else would admit it.
    let starved: Vec<String> = sqlx::query_scalar(
        "SELECT p.name FROM pools p
         WHERE NOT p.paused
           AND EXISTS (SELECT 1 FROM migrations m WHERE m.pool = p.name AND m.state = 'queued')
           AND (SELECT count(*) FROM migrations m WHERE m.pool = p.name AND m.state = 'running') < p.slots
         ORDER BY p.name",
    )
    .fetch_all(db)
    .await?;
    for pool in starved {
        let admitted = transact("admit", || admit_pool(db, origin, &pool)).await?;
        merge(&mut fx, admitted);
    }
    Ok((report, fx))
}

/// Sweeps one migration in one transaction, unless someone else holds it.
async fn sweep_migration(
    db: &PgPool,
    origin: &str,
    id: i64,
    now: i64,
    limits: Limits,
) -> Result<(SweepReport, Effects)> {
    let mut report = SweepReport::default();
    let mut fx = Effects::default();
    let mut tx = db.begin().await?;
    let mine: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM migrations WHERE id = $1
         -- held by another sweeper or a transition: theirs, or the next pass's
         FOR NO KEY UPDATE SKIP LOCKED",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    if mine.is_none() {
        tx.rollback().await?;
        return Ok((report, fx));
    }
    expire_leases(&mut tx, id, now, limits, &mut report, &mut fx).await?;
    time_out_attempts(&mut tx, id, now, &mut report, &mut fx).await?;
    let late: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM migrations WHERE id = $1 AND state IN ('queued', 'running')
                                     AND deadline IS NOT NULL AND deadline < $2",
    )
    .bind(id)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    if late.is_some()
        && machine::abort_migration(
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
    notify::commit(tx, origin, &fx).await?;
    Ok((report, fx))
}

async fn admit_pool(db: &PgPool, origin: &str, pool: &str) -> Result<Effects> {
    let mut fx = Effects::default();
    let mut tx = db.begin().await?;
    machine::admit(&mut tx, pool, &mut fx).await?;
    notify::commit(tx, origin, &fx).await?;
    Ok(fx)
}

/// Whether a task is still at this attempt's live lease, in this transaction.
async fn still_leased(conn: &mut PgConnection, lease: LeaseToken) -> Result<bool> {
    let live: Option<bool> =
        sqlx::query_scalar("SELECT state = 'leased' AND attempt = $2 FROM tasks WHERE id = $1")
            .bind(lease.task_id)
            .bind(lease.attempt as i64)
            .fetch_optional(conn)
            .await?;
    Ok(live == Some(true))
}

/// Leases past their expiry go back to `ready` (I6), remembering the worker
/// they expired on (`expired_worker`: a pass deals the task to another one
/// first), and the effects name that worker (`Effects::lost`, published to
/// every coordinator: the one holding its stream gives it no new work until
/// it heartbeats again). A task survives `max_reassignments` expiries; the
/// next one makes it dead instead of looping forever (I7).
async fn expire_leases(
    conn: &mut PgConnection,
    migration_id: i64,
    now: i64,
    limits: Limits,
    report: &mut SweepReport,
    fx: &mut Effects,
) -> Result<()> {
    type Expired = (i64, i64, i64, String, i64, i64, Option<String>);
    let expired: Vec<Expired> = sqlx::query_as(
        "SELECT id, attempt, stage_idx, kind, expiries, failures, lease_worker
         FROM tasks WHERE migration_id = $1 AND state = 'leased' AND lease_expires_at < $2
         ORDER BY id
         -- a lease row another transaction holds is being renewed or ended
         FOR UPDATE SKIP LOCKED",
    )
    .bind(migration_id)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    for (task_id, attempt, stage, kind, expiries, failures, worker) in expired {
        let lease = LeaseToken {
            task_id,
            attempt: attempt as u32,
        };
        // An earlier dead task of this migration may have canceled this one.
        if !still_leased(conn, lease).await? {
            continue;
        }
        let expiries = expiries + 1;
        let worker = worker.unwrap_or_default();
        let (dead, message) = common::expiry(&worker, expiries, limits.max_reassignments);
        let at = EventAt {
            stage: Some(stage),
            task_id,
            attempt,
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
        fx.lost.insert(worker.clone());
        if dead {
            let reason = common::lost_reason(task_id, &kind, expiries, limits.max_reassignments);
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
                "UPDATE tasks SET state = 'ready', expiries = $1, ready_at = $2, expired_worker = $5,
                                  lease_worker = NULL, lease_expires_at = NULL, attempt_deadline = NULL
                 WHERE id = $3 AND attempt = $4 AND state = 'leased'",
            )
            .bind(expiries)
            .bind(now)
            .bind(task_id)
            .bind(attempt)
            .bind(&worker)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

/// Attempts running longer than their stage's `attempt_timeout_ms` fail as
/// retryable (start-to-close timeout); the worker is told to stop.
async fn time_out_attempts(
    conn: &mut PgConnection,
    migration_id: i64,
    now: i64,
    report: &mut SweepReport,
    fx: &mut Effects,
) -> Result<()> {
    let late: Vec<(i64, i64, Option<String>)> = sqlx::query_as(
        "SELECT id, attempt, lease_worker FROM tasks
         WHERE migration_id = $1 AND state = 'leased'
           AND attempt_deadline IS NOT NULL AND attempt_deadline < $2
         ORDER BY id
         FOR UPDATE SKIP LOCKED",
    )
    .bind(migration_id)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    for (task_id, attempt, worker) in late {
        let lease = LeaseToken {
            task_id,
            attempt: attempt as u32,
        };
        let worker = worker.unwrap_or_default();
        let t = reported(conn, lease).await?;
        if t.state != "leased" || t.attempt != attempt {
            continue;
        }
        let timeout: i64 = sqlx::query_scalar(
            "SELECT attempt_timeout_ms FROM stages WHERE migration_id = $1 AND idx = $2",
        )
        .bind(t.migration_id)
        .bind(t.stage)
        .fetch_one(&mut *conn)
        .await?;
        let f = Failure {
            lease,
            secret: t.secret.unwrap_or_default(),
            error: format!("attempt timed out after {timeout} ms"),
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
