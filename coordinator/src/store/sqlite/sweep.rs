//! The SQLite store's sweeper: expired leases, attempt timeouts, deadlines
//! and retries whose backoff ended. Safe to run at any time; every step
//! re-checks the lease it acts on.

use sqlx::{Row, SqliteConnection, SqlitePool};

use super::machine::{self, EventAt, event};
use super::reports::{Dead, kill_task, record_failure, reported};
use crate::clock::now_ms;
use crate::domain::{EventKind, Failure, LeaseToken, MigrationState, Revoked, SweepReport};
use crate::error::Result;
use crate::store::common;
use crate::store::{Effects, Limits};

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
    // An existence check, not a count: a stage that just made a million
    // tasks ready must not cost a million-row scan per sweep.
    let due: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM tasks WHERE state = 'ready' AND (failures > 0 OR expiries > 0)
           AND ready_at <= ? AND ready_at > ? LIMIT 1",
    )
    .bind(now)
    .bind(now - 2 * limits.lease_ms.max(1000))
    .fetch_optional(&mut *tx)
    .await?;
    fx.dispatch |= due.is_some();
    tx.commit().await?;
    Ok((report, fx))
}

/// Leases past their expiry go back to `ready` (I6), remembering the worker
/// they expired on (`expired_worker`: a pass deals the task to another one
/// first), and the effects name that worker (`Effects::lost`: it gets no
/// new work until it heartbeats again). A task survives `max_reassignments`
/// expiries; the next one makes it dead instead of looping forever (I7).
async fn expire_leases(
    conn: &mut SqliteConnection,
    now: i64,
    limits: Limits,
    report: &mut SweepReport,
    fx: &mut Effects,
) -> Result<()> {
    let expired = sqlx::query(
        "SELECT id, attempt, migration_id, stage_idx, kind, expiries, failures, lease_worker
         FROM tasks WHERE state = 'leased' AND lease_expires_at < ?
         -- by expiry, so the partial index serves both the filter and the order
         ORDER BY lease_expires_at",
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
        let (dead, message) = common::expiry(&worker, expiries, limits.max_reassignments);
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
        fx.lost.insert(worker.clone());
        if dead {
            let reason =
                common::lost_reason(lease.task_id, &kind, expiries, limits.max_reassignments);
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
                "UPDATE tasks SET state = 'ready', expiries = ?, ready_at = ?, expired_worker = ?,
                                  lease_worker = NULL, lease_expires_at = NULL, attempt_deadline = NULL
                 WHERE id = ? AND attempt = ? AND state = 'leased'",
            )
            .bind(expiries)
            .bind(now)
            .bind(&worker)
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
         WHERE state = 'leased' AND attempt_deadline IS NOT NULL AND attempt_deadline < ? ORDER BY attempt_deadline",
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
            secret: t.secret.unwrap_or_default(),
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
