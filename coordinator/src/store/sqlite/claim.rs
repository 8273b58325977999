//! Claims, lease releases and heartbeats of the SQLite store.
//!
//! A dispatch pass claims for every eligible worker in one transaction of a
//! fixed handful of statements, however many workers and kinds there are:
//! one count of live leases for all workers, one lookup of the oldest ready
//! tasks of every kind asked for (with the worker each one's last lease
//! expired on, which the deal avoids: `common::deal`), one `UPDATE`
//! leasing them to all workers,
//! one read of what it leased, their events as one row per stage. sqlx hands
//! every statement, and every row a statement returns, to the connection's
//! thread and back, so at tens of thousands of tasks per second the number of
//! statements and rows is what costs: lists travel as one JSON parameter and
//! come back as one JSON row, which also keeps each statement's text, and so
//! its prepared form, the same whatever the list's length.
//!
//! `LIMIT (? + 0)`, not `LIMIT ?`: SQLite plans a bare bound LIMIT with its
//! value and re-prepares the statement whenever the value changes, which it
//! does on nearly every pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::{QueryBuilder, Sqlite, SqliteConnection, SqlitePool};

use super::bulk::insert_task_events;
use super::machine::{EventAt, event};
use crate::clock::now_ms;
use crate::domain::{
    Assignment, EventKind, HeartbeatOutcome, LeaseSecret, LeaseStatus, LeaseToken,
};
use crate::error::{Error, Result};
use crate::store::common::{self, HANDED_BACK, NewEvent, deal, wanted_per_kind};
use crate::store::{ClaimRequest, Effects, Limits, Pass};

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
) -> Result<Pass> {
    let mut tx = db.begin().await?;
    let pass = claim_in(&mut tx, requests, limits, contexts).await?;
    tx.commit().await?;
    Ok(pass)
}

/// One dispatch pass inside the caller's transaction. Never partial: the
/// one writer means no other transaction holds what the pass wants.
pub(super) async fn claim_in(
    tx: &mut SqliteConnection,
    requests: &[ClaimRequest],
    limits: Limits,
    contexts: &Contexts,
) -> Result<Pass> {
    let pass = |claimed| Pass {
        claimed,
        partial: false,
    };
    let nothing = || pass(requests.iter().map(|_| Vec::new()).collect());
    if requests.iter().all(|r| r.kinds.is_empty() || r.slots == 0) {
        return Ok(nothing());
    }
    let mut free = free_slots(&mut *tx, requests).await?;
    let now = now_ms();
    let candidates = oldest_ready(&mut *tx, requests, &free, now).await?;
    if candidates.is_empty() {
        return Ok(nothing());
    }
    let picked = deal(
        requests,
        &mut free,
        candidates
            .iter()
            .map(|(kind, id, lost_on)| (kind.as_str(), *id, lost_on.as_deref())),
    );
    let mut events = Vec::new();
    let out = lease(
        &mut *tx,
        requests,
        &picked,
        now,
        limits,
        contexts,
        &mut events,
    )
    .await?;
    insert_task_events(&mut *tx, &events, now).await?;
    Ok(pass(out))
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
/// first, each with the worker its last lease expired on (for [`deal`]).
/// Each kind is a range of the `(kind, ready_at, id)` index, so kinds
/// with no ready work cost nothing however many other tasks are ready.
async fn oldest_ready(
    conn: &mut SqliteConnection,
    requests: &[ClaimRequest],
    free: &[i64],
    now: i64,
) -> Result<Vec<(String, i64, Option<String>)>> {
    let wanted = wanted_per_kind(requests, free);
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    // One row holding every candidate as JSON: sqlx hands each result row
    // from its SQLite thread to ours separately, and a pass reads hundreds.
    // An aggregate's order is not the subquery's: sorted here.
    let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
        "SELECT json_group_array(json_array(kind, id, ready_at, expired_worker)) FROM (",
    );
    for (i, (kind, n)) in wanted.iter().enumerate() {
        if i > 0 {
            q.push(" UNION ALL ");
        }
        q.push(
            "SELECT * FROM (SELECT t.kind, t.id, t.ready_at, t.expired_worker FROM tasks t
             JOIN stages s ON s.migration_id = t.migration_id AND s.idx = t.stage_idx
             JOIN migrations m ON m.id = t.migration_id
             WHERE t.state = 'ready' AND t.kind = ",
        )
        .push_bind(*kind)
        .push(" AND t.ready_at <= ")
        .push_bind(now)
        // I1/I9: only tasks of a running stage of a running migration;
        // I10: not past its deadline
        .push(
            " AND s.state = 'running' AND m.state = 'running'
               AND (m.deadline IS NULL OR m.deadline >= ",
        )
        .push_bind(now)
        .push(
            ")
             ORDER BY t.ready_at, t.id LIMIT (",
        )
        .push_bind(*n)
        .push(" + 0))");
    }
    q.push(")");
    let packed: String = q.build_query_scalar().fetch_one(&mut *conn).await?;
    let mut ready: Vec<(String, i64, i64, Option<String>)> =
        serde_json::from_str(&packed).map_err(|e| Error::Corrupt(format!("ready tasks: {e}")))?;
    ready.sort_unstable_by_key(|&(_, id, ready_at, _)| (ready_at, id));
    Ok(ready
        .into_iter()
        .map(|(kind, id, _, lost_on)| (kind, id, lost_on))
        .collect())
}

/// A leased task, as the read after the lease returns it: one JSON array
/// per task, its fields in this order.
#[derive(serde::Deserialize)]
struct Leased {
    id: i64,
    attempt: i64,
    migration_id: i64,
    stage: i64,
    kind: String,
    payload: serde_json::Value,
    /// 1 or 0: the checkpoint itself is a BLOB, which JSON cannot hold.
    has_checkpoint: i64,
    max_attempts: i64,
    expires: i64,
    worker: String,
    secret: i64,
}

/// Leases the dealt tasks (`picked`, per request; all ready, picked in this
/// transaction) and returns each request's assignments in task order. One
/// `UPDATE` for every worker and one read of what it leased as a single
/// JSON row: sqlx hands every statement, and every row of a `RETURNING`,
/// to its SQLite thread and back.
async fn lease(
    conn: &mut SqliteConnection,
    requests: &[ClaimRequest],
    picked: &[Vec<i64>],
    now: i64,
    limits: Limits,
    contexts: &Contexts,
    events: &mut Vec<NewEvent>,
) -> Result<Vec<Vec<Assignment>>> {
    let mut out: Vec<Vec<Assignment>> = requests.iter().map(|_| Vec::new()).collect();
    // Each lease gets a fresh secret (drawn here: SQLite's `random()` is
    // not meant for secrets), written by the same statement.
    let dealt: Vec<(i64, &str, i64)> = requests
        .iter()
        .zip(picked)
        .flat_map(|(r, ids)| {
            ids.iter()
                .map(|&id| (id, r.worker_id.as_str(), LeaseSecret::random().db()))
        })
        .collect();
    if dealt.is_empty() {
        return Ok(out);
    }
    let dealt = serde_json::to_string(&dealt).map_err(|e| Error::Corrupt(e.to_string()))?;
    // The lease lasts the task's heartbeat timeout, else its stage's, else
    // the coordinator's; the attempt deadline likewise (0: none).
    sqlx::query(
        "UPDATE tasks SET state = 'leased', attempt = attempt + 1, progress_done = 0,
                          progress_total = 0, lease_worker = d.worker,
                          lease_expires_at = ?1 + coalesce(tasks.heartbeat_timeout_ms,
                                                           nullif(s.heartbeat_timeout_ms, 0), ?2),
                          attempt_deadline = ?1 + nullif(coalesce(tasks.attempt_timeout_ms,
                                                                  s.attempt_timeout_ms), 0),
                          lease_secret = d.secret
         FROM (SELECT value ->> 0 AS id, value ->> 1 AS worker, value ->> 2 AS secret
               FROM json_each(?3)) AS d,
              stages s
         WHERE tasks.id = d.id AND tasks.state = 'ready'
           AND s.migration_id = tasks.migration_id AND s.idx = tasks.stage_idx",
    )
    .bind(now)
    .bind(limits.lease_ms)
    .bind(&dealt)
    .execute(&mut *conn)
    .await?;
    let packed: String = sqlx::query_scalar(
        "SELECT json_group_array(json_array(id, attempt, migration_id, stage_idx, kind,
                                            json(payload), checkpoint IS NOT NULL, max_attempts,
                                            lease_expires_at, lease_worker, lease_secret))
         FROM tasks WHERE state = 'leased' AND id IN (SELECT value ->> 0 FROM json_each(?))",
    )
    .bind(&dealt)
    .fetch_one(&mut *conn)
    .await?;
    let mut rows: Vec<Leased> =
        serde_json::from_str(&packed).map_err(|e| Error::Corrupt(format!("leased tasks: {e}")))?;
    // Hand tasks out in the order they were created.
    rows.sort_unstable_by_key(|row| row.id);
    let slot_of: HashMap<&str, usize> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| (r.worker_id.as_str(), i))
        .collect();
    for t in rows {
        let Some(&i) = slot_of.get(t.worker.as_str()) else {
            return Err(Error::Corrupt(format!(
                "leased to unknown worker {:?}",
                t.worker
            )));
        };
        let ctx = context(conn, contexts, t.migration_id, t.stage).await?;
        let checkpoint = if t.has_checkpoint != 0 {
            sqlx::query_scalar("SELECT checkpoint FROM tasks WHERE id = ?")
                .bind(t.id)
                .fetch_one(&mut *conn)
                .await?
        } else {
            None
        };
        events.push(NewEvent::assigned(
            t.migration_id,
            t.stage,
            t.id,
            t.attempt,
            &t.worker,
        ));
        out[i].push(Assignment {
            lease: LeaseToken {
                task_id: t.id,
                attempt: t.attempt as u32,
            },
            secret: LeaseSecret::from_db(t.secret),
            migration_id: t.migration_id,
            subject: ctx.subject.clone(),
            stage_index: t.stage as u32,
            stage_name: ctx.stage_name.clone(),
            kind: t.kind,
            payload: t.payload,
            parameters: ctx.parameters.clone(),
            lease_expires_at_ms: t.expires,
            lease_ms: t.expires - now,
            checkpoint,
            max_attempts: t.max_attempts as u32,
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
    let mut tx = db.begin().await?;
    let released: Option<(i64, i64)> = sqlx::query_as(
        "UPDATE tasks SET state = 'ready', attempt = attempt - 1, lease_worker = NULL,
                          lease_expires_at = NULL, attempt_deadline = NULL
         WHERE id = ? AND attempt = ? AND state = 'leased' AND lease_worker = ?
         RETURNING migration_id, stage_idx",
    )
    .bind(lease.task_id)
    .bind(lease.attempt as i64)
    .bind(worker_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((migration_id, stage)) = released {
        let at = EventAt {
            stage: Some(stage),
            task_id: lease.task_id,
            attempt: lease.attempt as i64,
            worker: worker_id,
            message: HANDED_BACK,
        };
        event(&mut tx, migration_id, EventKind::TaskHandedBack, at).await?;
        fx.touch(migration_id);
        fx.dispatch = true;
    }
    tx.commit().await?;
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
             WHERE id = ? AND attempt = ? AND lease_secret = ? AND state = 'leased'
               AND lease_worker = ?
             RETURNING lease_expires_at",
        )
        .bind(now)
        .bind(limits.lease_ms)
        .bind(l.done as i64)
        .bind(l.total as i64)
        .bind(&l.checkpoint)
        .bind(l.lease.task_id)
        .bind(l.lease.attempt as i64)
        .bind(l.secret.db())
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
