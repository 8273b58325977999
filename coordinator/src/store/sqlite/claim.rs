//! Claims, lease releases and heartbeats of the SQLite store.
//!
//! A dispatch pass claims for every eligible worker in one transaction of a
//! fixed handful of statements, however many workers and kinds there are:
//! one count of live leases for all workers, one lookup of the oldest ready
//! tasks of every kind asked for, one `UPDATE … RETURNING` per worker that
//! gets tasks, one multi-row insert of their events. sqlx hands every
//! statement to the connection's thread and back, so at tens of thousands of
//! tasks per second the number of statements is what costs.
//!
//! `LIMIT (? + 0)`, not `LIMIT ?`: SQLite plans a bare bound LIMIT with its
//! value and re-prepares the statement whenever the value changes, which it
//! does on nearly every pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};

use super::bulk::insert_events;
use crate::clock::now_ms;
use crate::domain::{Assignment, HeartbeatOutcome, LeaseStatus, LeaseToken};
use crate::error::{Error, Result};
use crate::store::common::{self, NewEvent, deal, wanted_per_kind};
use crate::store::{ClaimRequest, Effects, Limits};

/// What every assignment of one stage of one migration shares, read once
/// and kept: a migration's subject, parameters and stage names never change.
pub(super) struct StageContext {
    subject: String,
    parameters: serde_json::Value,
    stage_name: String,
}

/// Stage contexts by `(migration, stage)`; cleared when it grows past
/// [`MAX_CONTEXTS`], so memory stays bounded however many migrations run.
pub(super) type Contexts = Mutex<HashMap<(i64, i64), Arc<StageContext>>>;

const MAX_CONTEXTS: usize = 4096;

/// Claims for several workers in one transaction (one dispatch pass).
pub(super) async fn claim_many(
    db: &SqlitePool,
    requests: &[ClaimRequest],
    limits: Limits,
    contexts: &Contexts,
) -> Result<Vec<Vec<Assignment>>> {
    let mut tx = db.begin().await?;
    let out = claim_in(&mut tx, requests, limits, contexts).await?;
    tx.commit().await?;
    Ok(out)
}

/// One dispatch pass inside the caller's transaction.
pub(super) async fn claim_in(
    tx: &mut SqliteConnection,
    requests: &[ClaimRequest],
    limits: Limits,
    contexts: &Contexts,
) -> Result<Vec<Vec<Assignment>>> {
    let mut out: Vec<Vec<Assignment>> = requests.iter().map(|_| Vec::new()).collect();
    if requests.iter().all(|r| r.kinds.is_empty() || r.slots == 0) {
        return Ok(out);
    }
    let mut free = free_slots(&mut *tx, requests).await?;
    let now = now_ms();
    let candidates = oldest_ready(&mut *tx, requests, &free, now).await?;
    if candidates.is_empty() {
        return Ok(out);
    }
    let picked = deal(requests, &mut free, candidates);
    let mut events = Vec::new();
    for ((r, ids), assigned) in requests.iter().zip(&picked).zip(&mut out) {
        if !ids.is_empty() {
            *assigned = lease(&mut *tx, r, ids, now, limits, contexts, &mut events).await?;
        }
    }
    insert_events(&mut *tx, &events).await?;
    Ok(out)
}

/// Free slots of each requesting worker: its declared slots less its live
/// leases (I12), counted for all of them in one statement.
async fn free_slots(conn: &mut SqliteConnection, requests: &[ClaimRequest]) -> Result<Vec<i64>> {
    let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
        "SELECT lease_worker, count(*) FROM tasks WHERE state = 'leased' AND lease_worker IN (",
    );
    let mut ids = q.separated(", ");
    for r in requests {
        ids.push_bind(&r.worker_id);
    }
    q.push(") GROUP BY lease_worker");
    let held: HashMap<String, i64> = q
        .build_query_as()
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    Ok(common::free_slots(requests, &held))
}

/// The oldest claimable tasks of every kind some worker with free slots
/// runs, at most as many per kind as those workers have free slots, oldest
/// first. Each kind is a range of the `(kind, ready_at, id)` index, so kinds
/// with no ready work cost nothing however many other tasks are ready.
async fn oldest_ready(
    conn: &mut SqliteConnection,
    requests: &[ClaimRequest],
    free: &[i64],
    now: i64,
) -> Result<Vec<(String, i64)>> {
    let wanted = wanted_per_kind(requests, free);
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    // One row holding every candidate as JSON: sqlx hands each result row
    // from its SQLite thread to ours separately, and a pass reads hundreds.
    // An aggregate's order is not the subquery's: sorted here.
    let mut q: QueryBuilder<Sqlite> =
        QueryBuilder::new("SELECT json_group_array(json_array(kind, id, ready_at)) FROM (");
    for (i, (kind, n)) in wanted.iter().enumerate() {
        if i > 0 {
            q.push(" UNION ALL ");
        }
        q.push(
            "SELECT * FROM (SELECT t.kind, t.id, t.ready_at FROM tasks t
             JOIN stages s ON s.migration_id = t.migration_id AND s.idx = t.stage_idx
             JOIN migrations m ON m.id = t.migration_id
             WHERE t.state = 'ready' AND t.kind = ",
        )
        .push_bind(*kind)
        .push(" AND t.ready_at <= ")
        .push_bind(now)
        // I1/I9: only tasks of a running stage of a running migration
        .push(
            " AND s.state = 'running' AND m.state = 'running'
             ORDER BY t.ready_at, t.id LIMIT (",
        )
        .push_bind(*n)
        .push(" + 0))");
    }
    q.push(")");
    let packed: String = q.build_query_scalar().fetch_one(&mut *conn).await?;
    let mut ready: Vec<(String, i64, i64)> =
        serde_json::from_str(&packed).map_err(|e| Error::Corrupt(format!("ready tasks: {e}")))?;
    ready.sort_unstable_by_key(|&(_, id, ready_at)| (ready_at, id));
    Ok(ready.into_iter().map(|(kind, id, _)| (kind, id)).collect())
}

/// Leases the tasks `ids` (all ready, picked in this transaction) to one
/// worker and returns its assignments in task order.
async fn lease(
    conn: &mut SqliteConnection,
    r: &ClaimRequest,
    ids: &[i64],
    now: i64,
    limits: Limits,
    contexts: &Contexts,
    events: &mut Vec<NewEvent>,
) -> Result<Vec<Assignment>> {
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
    let mut list = q.separated(", ");
    for id in ids {
        list.push_bind(*id);
    }
    q.push(
        ") RETURNING id, attempt, migration_id, stage_idx, kind, payload, checkpoint, max_attempts, lease_expires_at",
    );
    let mut rows = q.build().fetch_all(&mut *conn).await?;
    // RETURNING has no order: hand tasks out in the order they were created.
    rows.sort_by_key(|row| row.get::<i64, _>(0));
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let (task_id, attempt, migration_id, stage): (i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let ctx = context(conn, contexts, migration_id, stage).await?;
        events.push(NewEvent::assigned(
            migration_id,
            stage,
            task_id,
            attempt,
            &r.worker_id,
        ));
        let payload: String = row.get(5);
        let expires: i64 = row.get(8);
        out.push(Assignment {
            lease: LeaseToken {
                task_id,
                attempt: attempt as u32,
            },
            migration_id,
            subject: ctx.subject.clone(),
            stage_index: stage as u32,
            stage_name: ctx.stage_name.clone(),
            kind: row.get(4),
            payload: serde_json::from_str(&payload)
                .map_err(|e| Error::Corrupt(format!("payload: {e}")))?,
            parameters: ctx.parameters.clone(),
            lease_expires_at_ms: expires,
            lease_ms: expires - now,
            checkpoint: row.get(6),
            max_attempts: row.get::<i64, _>(7) as u32,
        });
    }
    Ok(out)
}

/// The stage context of `(migration_id, stage)`, from the cache or read once.
async fn context(
    conn: &mut SqliteConnection,
    contexts: &Contexts,
    migration_id: i64,
    stage: i64,
) -> Result<Arc<StageContext>> {
    let key = (migration_id, stage);
    if let Some(c) = lock(contexts).get(&key) {
        return Ok(c.clone());
    }
    let (subject, parameters, stage_name): (String, String, String) = sqlx::query_as(
        "SELECT m.subject, m.parameters, s.name FROM migrations m
         JOIN stages s ON s.migration_id = m.id AND s.idx = ? WHERE m.id = ?",
    )
    .bind(stage)
    .bind(migration_id)
    .fetch_one(&mut *conn)
    .await?;
    let c = Arc::new(StageContext {
        subject,
        parameters: serde_json::from_str(&parameters)
            .map_err(|e| Error::Corrupt(format!("parameters: {e}")))?,
        stage_name,
    });
    let mut cache = lock(contexts);
    if cache.len() >= MAX_CONTEXTS {
        cache.clear();
    }
    cache.insert(key, c.clone());
    Ok(c)
}

fn lock(contexts: &Contexts) -> std::sync::MutexGuard<'_, HashMap<(i64, i64), Arc<StageContext>>> {
    contexts.lock().unwrap_or_else(|e| e.into_inner())
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
