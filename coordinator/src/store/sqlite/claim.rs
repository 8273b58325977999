//! Claims, lease releases and heartbeats of the SQLite store.
//!
//! Claims for every worker of one dispatch pass run in one transaction, so a
//! pass costs one commit however many workers it serves.

use std::collections::HashMap;

use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};

use super::bulk::{NewEvent, insert_events};
use crate::clock::now_ms;
use crate::domain::{Assignment, EventKind, HeartbeatOutcome, LeaseStatus, LeaseToken};
use crate::error::{Error, Result};
use crate::store::{ClaimRequest, Effects, Limits};

/// Claims for several workers in one transaction (one dispatch pass).
pub(super) async fn claim_many(
    db: &SqlitePool,
    requests: &[ClaimRequest],
    limits: Limits,
) -> Result<Vec<Vec<Assignment>>> {
    let mut tx = db.begin().await?;
    let mut context = HashMap::new();
    let mut out = Vec::with_capacity(requests.len());
    for r in requests {
        out.push(claim(&mut tx, r, limits, &mut context).await?);
    }
    tx.commit().await?;
    Ok(out)
}

/// What every assignment of one stage of one migration shares, decoded once
/// per pass instead of once per task.
#[derive(Clone)]
struct StageContext {
    subject: String,
    parameters: serde_json::Value,
    stage_name: String,
}

async fn claim(
    conn: &mut SqliteConnection,
    r: &ClaimRequest,
    limits: Limits,
    context: &mut HashMap<(i64, i64), StageContext>,
) -> Result<Vec<Assignment>> {
    if r.kinds.is_empty() {
        return Ok(Vec::new());
    }
    // I12: never more live leases than the worker declared slots.
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE state = 'leased' AND lease_worker = ?",
    )
    .bind(&r.worker_id)
    .fetch_one(&mut *conn)
    .await?;
    let free = r.slots as i64 - held;
    if free <= 0 {
        return Ok(Vec::new());
    }
    let now = now_ms();
    // The oldest ready tasks, kind by kind: each lookup is a range of the
    // (kind, ready_at, id) index bounded by `free`, so a worker whose kinds
    // have no ready work costs nothing however many other tasks are ready.
    let mut candidates: Vec<(i64, i64)> = Vec::new();
    for kind in &r.kinds {
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT t.ready_at, t.id FROM tasks t
             JOIN stages s ON s.migration_id = t.migration_id AND s.idx = t.stage_idx
             JOIN migrations m ON m.id = t.migration_id
             WHERE t.state = 'ready' AND t.kind = ? AND t.ready_at <= ?
               -- I1/I9: only tasks of a running stage of a running migration
               AND s.state = 'running' AND m.state = 'running'
             ORDER BY t.ready_at, t.id LIMIT ?",
        )
        .bind(kind)
        .bind(now)
        .bind(free)
        .fetch_all(&mut *conn)
        .await?;
        candidates.extend(rows);
    }
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    candidates.sort_unstable();
    candidates.truncate(free as usize);
    // The lease lasts the task's heartbeat timeout, else its stage's, else
    // the coordinator's; the attempt deadline likewise (0: none).
    let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
        "UPDATE tasks SET state = 'leased', attempt = attempt + 1, progress_done = 0, progress_total = 0, lease_worker = ",
    );
    q.push_bind(&r.worker_id)
        .push(", lease_expires_at = ")
        .push_bind(now)
        .push(" + coalesce(tasks.heartbeat_timeout_ms, nullif(s.heartbeat_timeout_ms, 0), ")
        .push_bind(limits.lease_ms)
        .push("), attempt_deadline = ")
        .push_bind(now)
        .push(
            " + nullif(coalesce(tasks.attempt_timeout_ms, s.attempt_timeout_ms), 0)
             FROM stages s
             WHERE s.migration_id = tasks.migration_id AND s.idx = tasks.stage_idx
               AND tasks.state = 'ready' AND tasks.id IN (",
        );
    let mut ids = q.separated(", ");
    for (_, id) in &candidates {
        ids.push_bind(*id);
    }
    q.push(
        ") RETURNING id, attempt, migration_id, stage_idx, kind, payload, checkpoint, max_attempts, lease_expires_at",
    );
    let mut rows = q.build().fetch_all(&mut *conn).await?;
    // RETURNING has no order: hand tasks out in the order they were created.
    rows.sort_by_key(|row| row.get::<i64, _>(0));
    let mut out = Vec::with_capacity(rows.len());
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let (task_id, attempt, migration_id, stage): (i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let ctx = match context.get(&(migration_id, stage)) {
            Some(c) => c.clone(),
            None => {
                let (subject, parameters, stage_name): (String, String, String) = sqlx::query_as(
                    "SELECT m.subject, m.parameters, s.name FROM migrations m
                     JOIN stages s ON s.migration_id = m.id AND s.idx = ? WHERE m.id = ?",
                )
                .bind(stage)
                .bind(migration_id)
                .fetch_one(&mut *conn)
                .await?;
                let parameters = serde_json::from_str(&parameters)
                    .map_err(|e| Error::Corrupt(format!("parameters: {e}")))?;
                let c = StageContext {
                    subject,
                    parameters,
                    stage_name,
                };
                context.insert((migration_id, stage), c.clone());
                c
            }
        };
        events.push(NewEvent {
            migration_id,
            kind: EventKind::TaskAssigned,
            stage: Some(stage),
            task_id,
            attempt,
            worker: r.worker_id.clone(),
            message: String::new(),
        });
        let payload: String = row.get(5);
        out.push(Assignment {
            lease: LeaseToken {
                task_id,
                attempt: attempt as u32,
            },
            migration_id,
            subject: ctx.subject,
            stage_index: stage as u32,
            stage_name: ctx.stage_name,
            kind: row.get(4),
            payload: serde_json::from_str(&payload)
                .map_err(|e| Error::Corrupt(format!("payload: {e}")))?,
            parameters: ctx.parameters,
            lease_expires_at_ms: row.get(8),
            lease_ms: row.get::<i64, _>(8) - now,
            checkpoint: row.get(6),
            max_attempts: row.get::<i64, _>(7) as u32,
        });
    }
    insert_events(conn, &events).await?;
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
    let now = now_ms();
    for l in leases {
        // The task's heartbeat timeout, else its stage's, else the default.
        let renewed: Option<i64> = sqlx::query_scalar(
            "UPDATE tasks SET lease_expires_at = ? + coalesce(
                                  heartbeat_timeout_ms,
                                  (SELECT nullif(s.heartbeat_timeout_ms, 0) FROM stages s
                                   WHERE s.migration_id = tasks.migration_id AND s.idx = tasks.stage_idx),
                                  ?),
                              progress_done = ?, progress_total = ?,
                              checkpoint = coalesce(?, checkpoint)
             WHERE id = ? AND attempt = ? AND state = 'leased' AND lease_worker = ?
             RETURNING lease_expires_at",
        )
        .bind(now)
        .bind(limits.lease_ms)
        .bind(l.done as i64)
        .bind(l.total as i64)
        .bind(&l.checkpoint)
        .bind(l.lease.task_id)
        .bind(l.lease.attempt as i64)
        .bind(worker_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(expires) = renewed {
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
