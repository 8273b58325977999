//! Claims: leasing ready tasks to workers, several coordinators at once.
//!
//! A dispatch pass claims for every eligible worker in one transaction of a
//! handful of statements, however many workers and kinds there are:
//!
//! 1. the workers' advisory locks, in key order (I12 across coordinators:
//!    one worker id's claims queue behind each other, so two never count the
//!    same free slots; hashtext collisions only make two workers wait);
//! 2. one count of live leases for all of them;
//! 3. the oldest ready tasks of every kind asked for, unlocked: a guess,
//!    with the worker each one's last lease expired on, so the deal gives
//!    it to another worker first (`common::deal`; the column is read from
//!    the heap rows this step reads anyway);
//! 4. the row locks of those tasks' migrations, in id order, with their
//!    state, subject and parameters. A claim appends TaskAssigned events, so
//!    it holds the migration lock like every other writer of a migration's
//!    events;
//! 5. the running stages of the running ones (I1, I9), read after the locks:
//!    their names and timeouts;
//! 6. one `UPDATE … RETURNING` for every task dealt, of those stages only,
//!    whose `WHERE` checks again that each is ready (I4): a task the
//!    previous lock holder leased or ended fails the check, and the next
//!    round looks again. The same statement appends their TaskAssigned
//!    events (a data-modifying `WITH`). It touches no other table: planning
//!    the joins it once had took longer than running it, for a few tasks.
//!
//! Fewer when the pass runs in a report batch's transaction: steps 1 and 2
//! are parts of the batch's statements ([`Known`]), and steps 4 and 5 are
//! one statement when the transaction holds those locks already, as it
//! does when the batch's completions were of the migrations whose tasks
//! the pass leases. On a busy machine each round trip costs about as much
//! as leasing a few dozen tasks.
//!
//! Only the first round waits for migration locks, and only when the
//! transaction holds none yet: waiting while holding some could close a
//! cycle with another coordinator. Later rounds skip migrations others
//! hold, and say so ([`Pass::partial`]), so their tasks are dispatched
//! again once those others commit.
//!
//! Step 3 reads nothing but the `(kind, ready_at, id)` index. Joins, or a
//! condition on `migration_id`, let the planner walk the `tasks_stage`
//! index instead and sort every ready task of a migration on every pass —
//! it did, at 100,000 tasks, planning with statistics from before the
//! tasks were inserted — so stage and migration states are checked in steps
//! 4 and 5, once per migration and stage.

use std::collections::HashMap;

use sqlx::postgres::{PgArguments, PgRow};
use sqlx::{PgConnection, PgPool, Postgres, Row};

use super::bulk::LOG_EVENT_BATCHES;
use super::notify;
use crate::domain::{Assignment, EventKind, LeaseSecret, LeaseToken};
use crate::error::{Error, Result};
use crate::store::common::{self, deal, wanted_per_kind};
use crate::store::{ClaimRequest, Effects, Limits, Pass};

/// Advisory-lock namespace of worker ids (`pg_advisory_xact_lock(ns, key)`).
const WORKER_LOCK: i32 = 0x5C_01;

/// Rounds of a pass: a round finds fewer tasks than it dealt only when
/// another transaction changed them meanwhile.
const CLAIM_ROUNDS: usize = 3;

/// One dispatch pass in a transaction of its own.
pub(super) async fn claim_many(
    db: &PgPool,
    origin: &str,
    requests: &[ClaimRequest],
    limits: Limits,
) -> Result<Pass> {
    if !wants_work(requests) {
        return Ok(nothing(requests));
    }
    let mut tx = db.begin().await?;
    lock_workers(&mut tx, requests).await?;
    let mut fx = Effects::default();
    let pass = claim_in(&mut tx, requests, limits, true, &Known::default(), &mut fx).await?;
    // Other coordinators' dispatchers look again once the holders commit
    // (this one's caller does, from the pass).
    fx.dispatch |= pass.partial;
    notify::commit(tx, origin, &fx).await?;
    Ok(pass)
}

/// A pass that handed out nothing and left nothing behind.
pub(super) fn nothing(requests: &[ClaimRequest]) -> Pass {
    Pass {
        claimed: requests.iter().map(|_| Vec::new()).collect(),
        partial: false,
    }
}

/// Whether any request could take a task at all.
pub(super) fn wants_work(requests: &[ClaimRequest]) -> bool {
    requests.iter().any(|r| !r.kinds.is_empty() && r.slots > 0)
}

/// A `workers` CTE, whose one row's `n` is the number of worker locks taken:
/// the advisory locks of the requests' worker ids (bound by [`bind_workers`]
/// as parameters `$first` and `$first + 1`), in key order. For a statement
/// that takes them before anything else it locks: they are the first locks
/// of the lock order (module doc of the store).
pub(super) fn lock_workers_cte(first: usize) -> String {
    let ids = first + 1;
    format!(
        "workers AS (
             SELECT count(pg_advisory_xact_lock(${first}, k.key)) AS n
             FROM (SELECT DISTINCT hashtext(w) AS key FROM unnest(${ids}::text[]) AS w
                   ORDER BY 1) AS k)"
    )
}

/// Binds what [`lock_workers_cte`] takes.
pub(super) fn bind_workers<'q>(
    query: sqlx::query::Query<'q, Postgres, PgArguments>,
    requests: &'q [ClaimRequest],
) -> sqlx::query::Query<'q, Postgres, PgArguments> {
    let ids: Vec<&str> = requests.iter().map(|r| r.worker_id.as_str()).collect();
    query.bind(WORKER_LOCK).bind(ids)
}

/// Takes the advisory locks of the requests' worker ids, in key order.
pub(super) async fn lock_workers(conn: &mut PgConnection, requests: &[ClaimRequest]) -> Result<()> {
    let sql = format!("WITH {} SELECT n FROM workers", lock_workers_cte(1));
    bind_workers(sqlx::query(sqlx::AssertSqlSafe(sql)), requests)
        .execute(conn)
        .await?;
    Ok(())
}

/// The requests whose worker locks were free, taken without waiting: for a
/// transaction that already holds migration or pool locks, where waiting
/// for a worker lock would break the lock order.
pub(super) async fn try_lock_workers(
    conn: &mut PgConnection,
    requests: &[ClaimRequest],
) -> Result<Vec<usize>> {
    let ids: Vec<&str> = requests.iter().map(|r| r.worker_id.as_str()).collect();
    let locked: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_try_advisory_xact_lock($1, hashtext(w.id))
         FROM unnest($2::text[]) WITH ORDINALITY AS w(id, n) ORDER BY w.n",
    )
    .bind(WORKER_LOCK)
    .bind(&ids)
    .fetch_all(conn)
    .await?;
    Ok((0..requests.len()).filter(|&i| locked[i]).collect())
}

/// What the transaction a pass runs in learned before it, which the pass
/// need not ask again.
#[derive(Default)]
pub(super) struct Known {
    /// Migrations whose row locks the transaction holds.
    pub locked: Vec<i64>,
    /// The live leases of the requests' workers (by id), counted after
    /// their locks and after what the transaction ended since.
    pub leases: Option<HashMap<String, i64>>,
}

/// A dispatch pass inside the caller's transaction, which holds the
/// requests' worker locks and knows `known`. `wait`: the transaction holds
/// no migration lock yet, so the first round may wait for the ones it needs.
pub(super) async fn claim_in(
    conn: &mut PgConnection,
    requests: &[ClaimRequest],
    limits: Limits,
    mut wait: bool,
    known: &Known,
    fx: &mut Effects,
) -> Result<Pass> {
    let mut pass = nothing(requests);
    if !wants_work(requests) {
        return Ok(pass);
    }
    let slot_of: HashMap<&str, usize> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| (r.worker_id.as_str(), i))
        .collect();
    let mut free = match &known.leases {
        Some(leases) => common::free_slots(requests, leases),
        None => free_slots(conn, requests).await?,
    };
    // Migrations whose tasks this pass no longer looks at: held by others,
    // or not running.
    let mut passed: Vec<i64> = Vec::new();
    let mut held = known.locked.clone();
    let mut stages: HashMap<(i64, i64), StageInfo> = HashMap::new();
    for _ in 0..CLAIM_ROUNDS {
        let wanted = wanted_per_kind(requests, &free);
        if wanted.is_empty() {
            break;
        }
        let candidates = oldest_ready(conn, &wanted, &passed).await?;
        if candidates.is_empty() {
            break;
        }
        // A kind that gave fewer candidates than asked has no more ready.
        let more_ready = wanted
            .iter()
            .any(|&(kind, n)| candidates.iter().filter(|c| c.kind == kind).count() as i64 >= n);
        let mut migrations: Vec<i64> = candidates.iter().map(|c| c.migration_id).collect();
        migrations.sort_unstable();
        migrations.dedup();
        let locked = if migrations.iter().all(|m| held.contains(m)) {
            read_held(conn, &migrations, &mut stages, limits).await?
        } else {
            let locked = lock_migrations(conn, &migrations, wait).await?;
            read_running_stages(conn, &locked, &mut stages, limits).await?;
            held.extend(locked.iter().map(|m| m.id));
            locked
        };
        wait = false;
        for &m in &migrations {
            match locked.iter().find(|l| l.id == m) {
                Some(l) if l.running => continue,
                Some(_) => {}
                // Skipped, not ended: another transaction holds it right now.
                None => pass.partial = true,
            }
            passed.push(m);
        }
        let usable: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| stages.contains_key(&(c.migration_id, c.stage)))
            .collect();
        let picked = deal(
            requests,
            &mut free.clone(),
            usable
                .iter()
                .map(|c| (c.kind.as_str(), c.id, c.expired_worker.as_deref())),
        );
        let dealt: usize = picked.iter().map(Vec::len).sum();
        let rows = lease(conn, requests, &picked, &usable, &stages).await?;
        if rows.is_empty() {
            break;
        }
        // Another round finds nothing new unless a kind had more ready
        // tasks, or some of this round's were passed over or taken.
        let again = more_ready || usable.len() < candidates.len() || rows.len() < dealt;
        for row in &rows {
            let (a, worker) = assignment(row, &stages)?;
            let Some(&i) = slot_of.get(worker.as_str()) else {
                return Err(Error::Corrupt(format!(
                    "leased to unknown worker {worker:?}"
                )));
            };
            fx.touch(a.migration_id);
            free[i] -= 1;
            pass.claimed[i].push(a);
        }
        if !again {
            break;
        }
    }
    // RETURNING has no order: hand tasks out in creation order.
    for batch in &mut pass.claimed {
        batch.sort_by_key(|a| a.lease.task_id);
    }
    pass.partial &= free.iter().any(|&f| f > 0);
    Ok(pass)
}

/// Free slots of each request: its slots less its worker's live leases
/// (I12), counted for all workers in one statement after their locks.
async fn free_slots(conn: &mut PgConnection, requests: &[ClaimRequest]) -> Result<Vec<i64>> {
    let (ids, slots) = worker_slots(requests);
    let sql = format!("WITH {} SELECT id, n FROM leases_held", count_leases_cte(1));
    let held: HashMap<String, i64> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&ids)
        .bind(&slots)
        .fetch_all(conn)
        .await?
        .into_iter()
        .collect();
    Ok(common::free_slots(requests, &held))
}

/// A `leases_held` CTE: `(id, n)`, the live leases `n` of each worker id,
/// given with its slots as parameters `$first` and `$first + 1` (see
/// [`worker_slots`]). Run it after the workers' locks.
///
/// Each worker's leases are counted newest first and at most its slots (it
/// never holds more, I12), by `stagecoach_live_leases` (migration 0009): a
/// plain index scan, which stops once the worker is full and marks the
/// entries of ended leases dead as it passes them, so the next count skips
/// them. The bitmap scan the planner chose for one `lease_worker = ANY(…)`
/// never marks them: it visited every lease ended since the last heartbeat
/// or sweep, ~17,000 heap rows and 1.3 ms a pass.
pub(super) fn count_leases_cte(first: usize) -> String {
    let slots = first + 1;
    format!(
        "leases_held AS (
             SELECT w.id, stagecoach_live_leases(w.id, w.slots) AS n
             FROM unnest(${first}::text[], ${slots}::bigint[]) AS w(id, slots))"
    )
}

/// The requests' worker ids, each once, with the largest slots of its
/// requests: what any of them could take.
pub(super) fn worker_slots(requests: &[ClaimRequest]) -> (Vec<&str>, Vec<i64>) {
    let mut most: HashMap<&str, i64> = HashMap::new();
    for r in requests {
        let m = most.entry(r.worker_id.as_str()).or_default();
        *m = (*m).max(r.slots as i64);
    }
    most.into_iter().unzip()
}

/// A ready task a pass may lease.
#[derive(sqlx::FromRow)]
struct Candidate {
    kind: String,
    id: i64,
    migration_id: i64,
    #[sqlx(rename = "stage_idx")]
    stage: i64,
    /// The worker its last lease expired on: [`deal`] prefers another.
    expired_worker: Option<String>,
}

/// The oldest ready tasks of each wanted kind, at most its count, outside
/// the `passed` migrations, oldest first. The clock is read once (an
/// InitPlan), so it bounds the index range instead of filtering every row
/// after it.
async fn oldest_ready(
    conn: &mut PgConnection,
    wanted: &[(&str, i64)],
    passed: &[i64],
) -> Result<Vec<Candidate>> {
    let kinds: Vec<&str> = wanted.iter().map(|w| w.0).collect();
    let counts: Vec<i64> = wanted.iter().map(|w| w.1).collect();
    Ok(sqlx::query_as(
        "SELECT r.kind, r.id, r.migration_id, r.stage_idx, r.expired_worker
         FROM unnest($1::text[], $2::bigint[]) AS k(kind, n)
         CROSS JOIN LATERAL (
             SELECT t.kind, t.id, t.migration_id, t.stage_idx, t.ready_at, t.expired_worker
             FROM tasks t
             WHERE t.state = 'ready' AND t.kind = k.kind
               AND t.ready_at <= (SELECT stagecoach_now_ms())
               AND NOT (t.migration_id = ANY($3))
             ORDER BY t.ready_at, t.id
             LIMIT k.n) r
         ORDER BY r.ready_at, r.id",
    )
    .bind(&kinds)
    .bind(&counts)
    .bind(passed)
    .fetch_all(conn)
    .await?)
}

/// A migration a pass locked, and what its assignments carry.
#[derive(sqlx::FromRow)]
struct LockedMigration {
    id: i64,
    /// Running and not past its deadline (see [`RUNNING`]).
    running: bool,
    subject: String,
    parameters: String,
}

/// Whether a migration `m` may have tasks leased: running (I9) and not past
/// its deadline (I10: the sweeper fails it), by the transaction's clock,
/// which also times the leases and their events.
const RUNNING: &str =
    "m.state = 'running' AND (m.deadline IS NULL OR m.deadline >= stagecoach_now_ms()) AS running";

/// Locks the migrations `ids` in id order and returns the locked ones:
/// waiting for each, or skipping those another transaction holds.
async fn lock_migrations(
    conn: &mut PgConnection,
    ids: &[i64],
    wait: bool,
) -> Result<Vec<LockedMigration>> {
    let sql = format!(
        "SELECT m.id, {RUNNING}, m.subject, m.parameters FROM migrations m
         WHERE m.id = ANY($1) ORDER BY m.id
         FOR NO KEY UPDATE{}",
        if wait { "" } else { " SKIP LOCKED" }
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(ids)
        .fetch_all(conn)
        .await?)
}

/// What every assignment of one running stage shares.
struct StageInfo {
    subject: String,
    parameters: serde_json::Value,
    name: String,
    /// The stage's heartbeat timeout, else the coordinator's lease.
    lease_ms: i64,
    /// The stage's start-to-close timeout (0: none).
    attempt_ms: i64,
}

/// Adds the running stages of the `locked` running migrations to `stages`
/// (I1, I9: only their tasks are leased). Read after the locks, in a
/// statement of its own, so it sees what the previous holders committed.
async fn read_running_stages(
    conn: &mut PgConnection,
    locked: &[LockedMigration],
    stages: &mut HashMap<(i64, i64), StageInfo>,
    limits: Limits,
) -> Result<()> {
    let ids: Vec<i64> = locked.iter().filter(|m| m.running).map(|m| m.id).collect();
    if ids.is_empty() {
        return Ok(());
    }
    let rows: Vec<StageRow> = sqlx::query_as(
        "SELECT migration_id, idx, name, heartbeat_timeout_ms, attempt_timeout_ms FROM stages
         WHERE migration_id = ANY($1) AND state = 'running'",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    add_stages(locked, &rows, stages, limits)
}

/// [`read_running_stages`] of migrations whose locks the transaction holds
/// already, with the migrations themselves: one statement, and no lock to
/// take (in a group commit, the reported tasks' migrations are nearly
/// always the ones whose tasks are ready). Returns the migrations.
async fn read_held(
    conn: &mut PgConnection,
    ids: &[i64],
    stages: &mut HashMap<(i64, i64), StageInfo>,
    limits: Limits,
) -> Result<Vec<LockedMigration>> {
    // One migration, as after a stage transition or a create, by a plain
    // parameter: PostgreSQL keeps a generic plan for that statement, while
    // one taking an array is planned afresh on every call (0.09 ms here,
    // more than running it), its length unknown to a generic plan.
    let one = ids.len() == 1;
    let sql = format!(
        "SELECT m.id, {RUNNING}, m.subject, m.parameters,
                s.idx, s.name, s.heartbeat_timeout_ms, s.attempt_timeout_ms
         FROM migrations m
         LEFT JOIN stages s ON s.migration_id = m.id AND s.state = 'running'
         WHERE {}
         ORDER BY m.id",
        if one { "m.id = $1" } else { "m.id = ANY($1)" }
    );
    let query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
    let query = if one {
        query.bind(ids[0])
    } else {
        query.bind(ids)
    };
    let rows: Vec<HeldRow> = query.fetch_all(&mut *conn).await?;
    let mut locked: Vec<LockedMigration> = Vec::new();
    let mut running = Vec::new();
    for row in rows {
        if let (Some(idx), Some(name), Some(heartbeat_timeout_ms), Some(attempt_timeout_ms)) = (
            row.idx,
            row.name,
            row.heartbeat_timeout_ms,
            row.attempt_timeout_ms,
        ) {
            running.push(StageRow {
                migration_id: row.id,
                idx,
                name,
                heartbeat_timeout_ms,
                attempt_timeout_ms,
            });
        }
        if locked.last().is_none_or(|m| m.id != row.id) {
            locked.push(LockedMigration {
                id: row.id,
                running: row.running,
                subject: row.subject,
                parameters: row.parameters,
            });
        }
    }
    add_stages(&locked, &running, stages, limits)?;
    Ok(locked)
}

/// Adds to `stages` the running stages (`rows`) of the `locked` migrations
/// that are running.
fn add_stages(
    locked: &[LockedMigration],
    rows: &[StageRow],
    stages: &mut HashMap<(i64, i64), StageInfo>,
    limits: Limits,
) -> Result<()> {
    for m in locked.iter().filter(|m| m.running) {
        let parameters = parameters(m)?;
        for row in rows.iter().filter(|r| r.migration_id == m.id) {
            stages.insert((m.id, row.idx), StageInfo::new(m, &parameters, row, limits));
        }
    }
    Ok(())
}

/// A row of [`read_held`]: a migration, and its running stage if any.
#[derive(sqlx::FromRow)]
struct HeldRow {
    id: i64,
    running: bool,
    subject: String,
    parameters: String,
    idx: Option<i64>,
    name: Option<String>,
    heartbeat_timeout_ms: Option<i64>,
    attempt_timeout_ms: Option<i64>,
}

/// A running stage's row.
#[derive(sqlx::FromRow)]
struct StageRow {
    migration_id: i64,
    idx: i64,
    name: String,
    heartbeat_timeout_ms: i64,
    attempt_timeout_ms: i64,
}

impl StageInfo {
    fn new(
        m: &LockedMigration,
        parameters: &serde_json::Value,
        row: &StageRow,
        limits: Limits,
    ) -> Self {
        StageInfo {
            subject: m.subject.clone(),
            parameters: parameters.clone(),
            name: row.name.clone(),
            lease_ms: if row.heartbeat_timeout_ms > 0 {
                row.heartbeat_timeout_ms
            } else {
                limits.lease_ms
            },
            attempt_ms: row.attempt_timeout_ms,
        }
    }
}

/// A locked migration's parameters, decoded.
fn parameters(m: &LockedMigration) -> Result<serde_json::Value> {
    serde_json::from_str(&m.parameters).map_err(|e| Error::Corrupt(format!("parameters: {e}")))
}

/// Leases the dealt tasks (`picked`, per request; all of `usable`) in one
/// statement, which also appends their TaskAssigned events. Each must still
/// be ready (I4); the migration locks make every other check of this pass
/// still true.
async fn lease(
    conn: &mut PgConnection,
    requests: &[ClaimRequest],
    picked: &[Vec<i64>],
    usable: &[&Candidate],
    stages: &HashMap<(i64, i64), StageInfo>,
) -> Result<Vec<PgRow>> {
    let stage_of: HashMap<i64, &StageInfo> = usable
        .iter()
        .filter_map(|c| Some((c.id, stages.get(&(c.migration_id, c.stage))?)))
        .collect();
    let (mut ids, mut workers, mut lease_ms, mut attempt_ms, mut secrets) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (r, tasks) in requests.iter().zip(picked) {
        for id in tasks {
            let Some(stage) = stage_of.get(id) else {
                continue;
            };
            ids.push(*id);
            workers.push(r.worker_id.as_str());
            lease_ms.push(stage.lease_ms);
            attempt_ms.push(stage.attempt_ms);
            secrets.push(LeaseSecret::random().db());
        }
    }
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = sqlx::AssertSqlSafe(format!(
        "WITH now AS (SELECT stagecoach_now_ms() AS ms),
         leased AS (
             UPDATE tasks SET state = 'leased', attempt = tasks.attempt + 1,
                              lease_worker = u.worker,
                              -- the task's heartbeat and attempt timeouts,
                              -- else its stage's
                              lease_expires_at = (SELECT ms FROM now)
                                  + coalesce(tasks.heartbeat_timeout_ms, u.lease_ms),
                              attempt_deadline = (SELECT ms FROM now)
                                  + nullif(coalesce(tasks.attempt_timeout_ms, u.attempt_ms), 0),
                              progress_done = 0, progress_total = 0,
                              -- a fresh secret per lease, drawn by the caller
                              lease_secret = u.secret
             FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $6::bigint[])
                  AS u(id, worker, lease_ms, attempt_ms, secret)
             WHERE tasks.id = u.id AND tasks.state = 'ready'
               AND tasks.ready_at <= (SELECT ms FROM now)
             RETURNING tasks.id, tasks.attempt, tasks.migration_id, tasks.stage_idx, tasks.kind,
                       tasks.payload, tasks.checkpoint, tasks.max_attempts,
                       tasks.lease_expires_at,
                       coalesce(tasks.heartbeat_timeout_ms, u.lease_ms) AS lease_ms,
                       tasks.lease_worker, tasks.lease_secret),
         -- the TaskAssigned events, in task order
         numbered AS (
             SELECT e.*, nextval('events_id_seq') AS event_id
             FROM (SELECT migration_id, stage_idx, id AS task_id, attempt,
                          lease_worker AS worker_id
                   FROM leased ORDER BY migration_id, stage_idx, id) AS e),
         {LOG_EVENT_BATCHES}
         SELECT * FROM leased"
    ));
    Ok(sqlx::query(sql)
        .bind(&ids)
        .bind(&workers)
        .bind(&lease_ms)
        .bind(&attempt_ms)
        .bind(EventKind::TaskAssigned.as_str())
        .bind(&secrets)
        .fetch_all(conn)
        .await?)
}

/// The assignment a leased row makes, and the worker it was leased to.
fn assignment(
    row: &PgRow,
    stages: &HashMap<(i64, i64), StageInfo>,
) -> Result<(Assignment, String)> {
    let (migration_id, stage): (i64, i64) = (row.try_get(2)?, row.try_get(3)?);
    let Some(info) = stages.get(&(migration_id, stage)) else {
        return Err(Error::Corrupt(format!(
            "leased a task of stage {stage} of migration {migration_id}, which is not running"
        )));
    };
    let payload: String = row.try_get(5)?;
    let a = Assignment {
        lease: LeaseToken {
            task_id: row.try_get(0)?,
            attempt: row.try_get::<i64, _>(1)? as u32,
        },
        secret: LeaseSecret::from_db(row.try_get(11)?),
        migration_id,
        stage_index: stage as u32,
        kind: row.try_get(4)?,
        payload: serde_json::from_str(&payload)
            .map_err(|e| Error::Corrupt(format!("payload: {e}")))?,
        checkpoint: row.try_get(6)?,
        max_attempts: row.try_get::<i64, _>(7)? as u32,
        lease_expires_at_ms: row.try_get(8)?,
        lease_ms: row.try_get(9)?,
        subject: info.subject.clone(),
        parameters: info.parameters.clone(),
        stage_name: info.name.clone(),
    };
    Ok((a, row.try_get(10)?))
}
