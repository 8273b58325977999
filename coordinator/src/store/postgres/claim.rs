//! Claims: leasing ready tasks to a worker, several coordinators at once.
//! A claim takes the worker's advisory lock (I12), then the row locks of the
//! migrations whose tasks it leases, in id order, then the task rows with
//! `FOR UPDATE SKIP LOCKED` (I4): the lock order of the module doc.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use super::bulk::{self, NewEvent};
use super::notify;
use crate::domain::{Assignment, EventKind, LeaseToken};
use crate::error::{Error, Result};
use crate::store::{Effects, Limits};

/// Advisory-lock namespace of worker ids (`pg_advisory_xact_lock(ns, key)`).
const WORKER_LOCK: i32 = 0x5C_01;

/// Rounds of a claim: the first waits for the migrations it needs, later
/// ones take only migrations nobody holds (see [`lock_claimable`]).
const CLAIM_ROUNDS: usize = 3;

pub(super) async fn claim(
    db: &PgPool,
    origin: &str,
    worker_id: &str,
    kinds: &[String],
    slots: u32,
    limits: Limits,
) -> Result<Vec<Assignment>> {
    if kinds.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = db.begin().await?;
    // I12 across coordinators: one worker id's claims queue behind each
    // other, even from two coordinators, so both never count the same free
    // slots. hashtext collisions only make two workers wait for each other.
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(WORKER_LOCK)
        .bind(worker_id)
        .execute(&mut *tx)
        .await?;
    // A statement of its own, after the lock: sees the previous claim's leases.
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE state = 'leased' AND lease_worker = $1",
    )
    .bind(worker_id)
    .fetch_one(&mut *tx)
    .await?;
    let mut free = slots as i64 - held;
    if free <= 0 {
        tx.rollback().await?;
        return Ok(Vec::new());
    }
    let mut fx = Effects::default();
    let mut out = Vec::new();
    let mut locked: Vec<i64> = Vec::new();
    for round in 0..CLAIM_ROUNDS {
        let ids = lock_claimable(&mut tx, kinds, free, &locked, round == 0).await?;
        if ids.is_empty() {
            break;
        }
        locked.extend(&ids);
        let rows = lease_ready(&mut tx, worker_id, kinds, free, &ids, limits).await?;
        let mut leased = rows.iter().map(assignment).collect::<Result<Vec<_>>>()?;
        leased.sort_by_key(|a| a.lease.task_id);
        let events: Vec<NewEvent> = leased
            .iter()
            .map(|a| NewEvent {
                migration_id: a.migration_id,
                kind: EventKind::TaskAssigned,
                stage: Some(a.stage_index as i64),
                task_id: a.lease.task_id,
                attempt: a.lease.attempt as i64,
                worker: worker_id.to_string(),
                message: String::new(),
            })
            .collect();
        bulk::insert_events(&mut tx, &events).await?;
        for a in &leased {
            fx.touch(a.migration_id);
        }
        free -= leased.len() as i64;
        out.extend(leased);
        if free <= 0 {
            break;
        }
    }
    // Other coordinators' watchers see the assignments at once.
    notify::commit(tx, origin, &fx).await?;
    Ok(out)
}

/// The oldest claimable tasks of each kind in `$1`, at most `$2` per kind:
/// each kind is a range of
/// the `(kind, ready_at, id)` index, so a claim never sorts every ready task
/// of a big migration, and kinds with no ready work cost nothing.
const READY_BY_KIND: &str = "
    SELECT r.id, r.migration_id, r.ready_at FROM unnest($1::text[]) AS k(kind)
    CROSS JOIN LATERAL (
        SELECT t.id, t.migration_id, t.ready_at FROM tasks t
        JOIN stages s ON s.migration_id = t.migration_id AND s.idx = t.stage_idx
        WHERE t.state = 'ready' AND t.kind = k.kind AND t.ready_at <= stagecoach_now_ms()
          AND s.state = 'running'
        ORDER BY t.ready_at, t.id LIMIT $2) r";

/// Locks the running migrations that hold the first `free` claimable tasks
/// (outside `locked`), in id order, and returns their ids. A claim appends
/// TaskAssigned events, so it holds the migration lock like every other
/// writer of a migration's events; claims of tasks of one migration queue
/// behind each other, and the task rows they lease are theirs alone.
async fn lock_claimable(
    conn: &mut PgConnection,
    kinds: &[String],
    free: i64,
    locked: &[i64],
    wait: bool,
) -> Result<Vec<i64>> {
    // The first round waits (in id order, like every transaction that locks
    // several migrations). Later rounds run while this claim already holds
    // migrations, so waiting could close a cycle; they skip what others hold,
    // and those others hand those tasks out.
    let skip = if wait { "" } else { "SKIP LOCKED" };
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT m.id FROM migrations m
         WHERE m.state = 'running'
           AND m.id IN (SELECT c.migration_id FROM ({READY_BY_KIND}) c
                        WHERE NOT (c.migration_id = ANY($3))
                        ORDER BY c.ready_at, c.id LIMIT $2)
         -- ORDER BY before the lock: rows are locked in this order
         ORDER BY m.id
         FOR NO KEY UPDATE OF m {skip}"
    ));
    Ok(sqlx::query_scalar(sql)
        .bind(kinds)
        .bind(free)
        .bind(locked)
        .fetch_all(conn)
        .await?)
}

/// Leases up to `free` ready tasks of the locked migrations, oldest ready
/// first, in one statement.
async fn lease_ready(
    conn: &mut PgConnection,
    worker_id: &str,
    kinds: &[String],
    free: i64,
    migrations: &[i64],
    limits: Limits,
) -> Result<Vec<PgRow>> {
    Ok(sqlx::query(
        "WITH picked AS (
             SELECT r.id FROM unnest($2::text[]) AS k(kind)
             -- kind by kind along the (kind, ready_at, id) index
             CROSS JOIN LATERAL (
                 SELECT t.id, t.ready_at FROM tasks t
                 JOIN stages s ON s.migration_id = t.migration_id AND s.idx = t.stage_idx
                 JOIN migrations m ON m.id = t.migration_id
                 WHERE t.state = 'ready' AND t.kind = k.kind AND t.migration_id = ANY($3)
                   AND t.ready_at <= stagecoach_now_ms()
                   -- I1/I9: only tasks of a running stage of a running migration
                   AND s.state = 'running' AND m.state = 'running'
                 ORDER BY t.ready_at, t.id
                 LIMIT $4
                 -- I4: a task row another transaction holds is being leased or
                 -- changed right now; never lease it twice, never wait for it
                 FOR UPDATE OF t SKIP LOCKED) r
             ORDER BY r.ready_at, r.id
             LIMIT $4)
         UPDATE tasks SET state = 'leased', attempt = tasks.attempt + 1, lease_worker = $1,
                          -- the task's heartbeat timeout and attempt timeout,
                          -- else its stage's, else the coordinator's lease
                          lease_expires_at = stagecoach_now_ms() + coalesce(
                              tasks.heartbeat_timeout_ms, nullif(s.heartbeat_timeout_ms, 0), $5),
                          progress_done = 0, progress_total = 0,
                          attempt_deadline = stagecoach_now_ms()
                              + nullif(coalesce(tasks.attempt_timeout_ms, s.attempt_timeout_ms), 0)
         FROM picked, stages s, migrations m
         WHERE tasks.id = picked.id AND tasks.state = 'ready'
           AND s.migration_id = tasks.migration_id AND s.idx = tasks.stage_idx
           AND m.id = tasks.migration_id
         RETURNING tasks.id, tasks.attempt, tasks.migration_id, tasks.stage_idx, tasks.kind,
                   tasks.payload, tasks.checkpoint, tasks.max_attempts, tasks.lease_expires_at,
                   m.subject, m.parameters, s.name,
                   coalesce(tasks.heartbeat_timeout_ms, nullif(s.heartbeat_timeout_ms, 0), $5)",
    )
    .bind(worker_id)
    .bind(kinds)
    .bind(migrations)
    .bind(free)
    .bind(limits.lease_ms)
    .fetch_all(conn)
    .await?)
}

fn assignment(row: &PgRow) -> Result<Assignment> {
    let payload: String = row.try_get(5)?;
    let parameters: String = row.try_get(10)?;
    Ok(Assignment {
        lease: LeaseToken {
            task_id: row.try_get(0)?,
            attempt: row.try_get::<i64, _>(1)? as u32,
        },
        migration_id: row.try_get(2)?,
        stage_index: row.try_get::<i64, _>(3)? as u32,
        kind: row.try_get(4)?,
        payload: serde_json::from_str(&payload)
            .map_err(|e| Error::Corrupt(format!("payload: {e}")))?,
        checkpoint: row.try_get(6)?,
        max_attempts: row.try_get::<i64, _>(7)? as u32,
        lease_expires_at_ms: row.try_get(8)?,
        subject: row.try_get(9)?,
        parameters: serde_json::from_str(&parameters)
            .map_err(|e| Error::Corrupt(format!("parameters: {e}")))?,
        stage_name: row.try_get(11)?,
        lease_ms: row.try_get(12)?,
    })
}
