//! Read-only queries of the PostgreSQL store: views for clients and
//! operators. Plain reads under MVCC: they take no row locks and never wait
//! for a transition.

use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use crate::domain::{
    Event, LeaseToken, Migration, MigrationFilter, MigrationState, PlanSpec, Pool, StageProgress,
    StageState,
};
use crate::error::{Error, Result};
use crate::store::common::{self, LeasedTaskRow, corrupt, event_kind};
use crate::store::{Gauges, LeasedTask, PlanPage, Plans, SubjectView, gauges};

fn decode_plan(spec: &str) -> Result<PlanSpec> {
    serde_json::from_str(spec).map_err(|e| Error::Corrupt(format!("stored plan: {e}")))
}

pub(super) async fn get_plan(db: &PgPool, name: &str) -> Result<Option<PlanSpec>> {
    let spec: Option<String> =
        sqlx::query_scalar("SELECT spec FROM plans WHERE name = $1 ORDER BY version DESC LIMIT 1")
            .bind(name)
            .fetch_optional(db)
            .await?;
    spec.as_deref().map(decode_plan).transpose()
}

pub(super) async fn list_plans(db: &PgPool, page: &PlanPage) -> Result<Plans> {
    let rows = sqlx::query_scalar::<_, String>(
        "SELECT DISTINCT ON (name COLLATE \"C\") spec FROM plans
         -- keyset paging, in byte order as on SQLite whatever the
         -- database's collation; names are never empty, so > '' is page 1
         WHERE name COLLATE \"C\" > $1
         ORDER BY name COLLATE \"C\", version DESC
         LIMIT $2",
    )
    .bind(page.after.as_deref().unwrap_or(""))
    .bind(page.limit as i64 + 1)
    .fetch(db);
    page.collect(rows).await
}

const POOL_SELECT: &str = "SELECT p.name, p.slots, p.paused,
        (SELECT count(*) FROM migrations m WHERE m.pool = p.name AND m.state = 'running'),
        (SELECT count(*) FROM migrations m WHERE m.pool = p.name AND m.state = 'queued')
    FROM pools p";

fn decode_pool(row: &PgRow) -> Result<Pool> {
    Ok(Pool {
        name: row.try_get(0)?,
        slots: row.try_get::<i64, _>(1)? as u32,
        paused: row.try_get(2)?,
        running: row.try_get::<i64, _>(3)? as u32,
        queued: row.try_get::<i64, _>(4)? as u32,
    })
}

pub(super) async fn pool(db: &PgPool, name: &str) -> Result<Option<Pool>> {
    let sql = sqlx::AssertSqlSafe(format!("{POOL_SELECT} WHERE p.name = $1"));
    let row = sqlx::query(sql).bind(name).fetch_optional(db).await?;
    row.as_ref().map(decode_pool).transpose()
}

/// The gauges of `/metrics`, in one read-only snapshot (REPEATABLE READ),
/// so their numbers agree with each other; plain MVCC reads, no locks.
pub(super) async fn gauges(db: &PgPool) -> Result<Gauges> {
    let mut tx = db.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let rows = gauges::read_rows!(tx);
    tx.commit().await?;
    rows.gauges()
}

pub(super) async fn list_pools(db: &PgPool) -> Result<Vec<Pool>> {
    let sql = sqlx::AssertSqlSafe(format!("{POOL_SELECT} ORDER BY p.name COLLATE \"C\""));
    let rows = sqlx::query(sql).fetch_all(db).await?;
    rows.iter().map(decode_pool).collect()
}

const MIGRATION_COLUMNS: &str =
    "id, plan_name, plan_version, subject, parameters, pool, state, reason,
    idempotency_key, deadline, created_at, admitted_at, finished_at";

fn decode_migration(row: &PgRow) -> Result<Migration> {
    let state: String = row.try_get("state")?;
    let parameters: String = row.try_get("parameters")?;
    Ok(Migration {
        id: row.try_get("id")?,
        plan_name: row.try_get("plan_name")?,
        plan_version: row.try_get::<i64, _>("plan_version")? as u32,
        subject: row.try_get("subject")?,
        parameters: serde_json::from_str(&parameters)
            .map_err(|e| Error::Corrupt(format!("parameters: {e}")))?,
        pool: row.try_get("pool")?,
        state: MigrationState::parse(&state).ok_or_else(|| corrupt("migration state", &state))?,
        reason: row.try_get("reason")?,
        idempotency_key: row.try_get("idempotency_key")?,
        deadline_ms: row.try_get("deadline")?,
        created_at_ms: row.try_get("created_at")?,
        admitted_at_ms: row.try_get("admitted_at")?,
        finished_at_ms: row.try_get("finished_at")?,
        stages: Vec::new(),
    })
}

fn decode_stage(r: &PgRow) -> Result<StageProgress> {
    let state: String = r.try_get(2)?;
    Ok(StageProgress {
        index: r.try_get::<i64, _>(0)? as u32,
        name: r.try_get(1)?,
        state: StageState::parse(&state).ok_or_else(|| corrupt("stage state", &state))?,
        total: r.try_get::<i64, _>(3)? as u32,
        succeeded: r.try_get::<i64, _>(4)? as u32,
        failed: r.try_get::<i64, _>(5)? as u32,
        canceled: r.try_get::<i64, _>(6)? as u32,
        started_at_ms: r.try_get(7)?,
        finished_at_ms: r.try_get(8)?,
        running: r.try_get::<i64, _>(9)? as u32,
    })
}

async fn with_stages(db: &PgPool, mut m: Migration) -> Result<Migration> {
    let rows = sqlx::query(
        "SELECT s.idx, s.name, s.state, s.total, s.succeeded, s.failed, s.canceled, s.started_at,
                s.finished_at,
                (SELECT count(*) FROM tasks t WHERE t.migration_id = s.migration_id AND t.stage_idx = s.idx
                                               AND t.state = 'leased') AS running
         FROM stages s WHERE s.migration_id = $1 ORDER BY s.idx",
    )
    .bind(m.id)
    .fetch_all(db)
    .await?;
    m.stages = rows.iter().map(decode_stage).collect::<Result<_>>()?;
    Ok(m)
}

pub(super) async fn migration(db: &PgPool, id: i64) -> Result<Option<Migration>> {
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT {MIGRATION_COLUMNS} FROM migrations WHERE id = $1"
    ));
    let Some(row) = sqlx::query(sql).bind(id).fetch_optional(db).await? else {
        return Ok(None);
    };
    Ok(Some(with_stages(db, decode_migration(&row)?).await?))
}

pub(super) async fn list_migrations(db: &PgPool, f: &MigrationFilter) -> Result<Vec<Migration>> {
    // NULL parameters switch a filter off, so one prepared statement serves
    // every combination.
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT {MIGRATION_COLUMNS} FROM migrations
         WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR subject = $2)
           AND ($3::text IS NULL OR pool = $3) AND ($4::bigint IS NULL OR id < $4)
         ORDER BY id DESC LIMIT $5"
    ));
    let rows = sqlx::query(sql)
        .bind(f.state.map(|s| s.as_str()))
        .bind(&f.subject)
        .bind(&f.pool)
        .bind(f.before_id)
        .bind(f.limit as i64)
        .fetch_all(db)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        out.push(with_stages(db, decode_migration(row)?).await?);
    }
    Ok(out)
}

fn decode_event(r: &PgRow) -> Result<Event> {
    Ok(Event {
        id: r.try_get(0)?,
        migration_id: r.try_get(1)?,
        at_ms: r.try_get(2)?,
        kind: event_kind(r.try_get(3)?)?,
        stage_index: r.try_get::<Option<i64>, _>(4)?.map(|i| i as u32),
        task_id: r.try_get(5)?,
        attempt: r.try_get::<i64, _>(6)? as u32,
        worker_id: r.try_get(7)?,
        message: r.try_get(8)?,
    })
}

pub(super) async fn list_events(
    db: &PgPool,
    migration_id: i64,
    after_id: i64,
    limit: u32,
) -> Result<Vec<Event>> {
    let limit = i64::from(limit);
    // Every read of a page in one snapshot: a commit between two of them
    // could show a batch and not an event numbered before it in the same
    // transaction, and the cursor would then skip that event for good.
    let mut tx = db
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let rows = sqlx::query(
        "SELECT id, migration_id, at, kind, stage_idx, task_id, attempt, worker_id, message
         FROM events WHERE migration_id = $1 AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(migration_id)
    .bind(after_id)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let mut out = rows.iter().map(decode_event).collect::<Result<Vec<_>>>()?;
    // The batches past the cursor, a few at a time in id order until they
    // hold a page, expanded here: the work is the page's, not the whole
    // log's past the cursor (one batch's ids never interleave with
    // another's of the same migration: each was numbered whole under the
    // migration's lock).
    let (mut from_batches, mut batch_cursor, mut chunk) = (0, after_id, limit.min(4));
    while from_batches < limit {
        let batches: Vec<BatchRow> = sqlx::query_as(
            "SELECT last_id, at, kind, stage_idx, ids, task_ids, attempts, worker_ids
             FROM event_batches WHERE migration_id = $1 AND last_id > $2
             ORDER BY last_id LIMIT $3",
        )
        .bind(migration_id)
        .bind(batch_cursor)
        .bind(chunk)
        .fetch_all(&mut *tx)
        .await?;
        for b in &batches {
            let kind = event_kind(&b.kind)?;
            let n = b.ids.len();
            if [b.task_ids.len(), b.attempts.len(), b.worker_ids.len()] != [n; 3] {
                return Err(Error::Corrupt(format!(
                    "event batch {} of migration {migration_id}: arrays of unequal length",
                    b.last_id
                )));
            }
            let elements = b
                .ids
                .iter()
                .zip(&b.task_ids)
                .zip(&b.attempts)
                .zip(&b.worker_ids);
            for (((&id, &task_id), &attempt), worker_id) in elements {
                if id > after_id {
                    from_batches += 1;
                    out.push(Event {
                        id,
                        migration_id,
                        at_ms: b.at,
                        kind,
                        stage_index: Some(b.stage_idx as u32),
                        task_id,
                        attempt: attempt as u32,
                        worker_id: worker_id.clone(),
                        message: String::new(),
                    });
                }
            }
        }
        match batches.last() {
            Some(b) if batches.len() as i64 == chunk => batch_cursor = b.last_id,
            _ => break,
        }
        chunk = (chunk * 4).min(limit);
    }
    tx.commit().await?;
    out.sort_unstable_by_key(|e| e.id);
    out.truncate(limit as usize);
    Ok(out)
}

/// One `event_batches` row: element k of the arrays is one event.
#[derive(sqlx::FromRow)]
struct BatchRow {
    last_id: i64,
    at: i64,
    kind: String,
    stage_idx: i64,
    ids: Vec<i64>,
    task_ids: Vec<i64>,
    attempts: Vec<i64>,
    worker_ids: Vec<String>,
}

pub(super) async fn subject_status(db: &PgPool, subject: &str) -> Result<SubjectView> {
    let (latest, succeeded): (Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT max(id), max(id) FILTER (WHERE state = 'succeeded') FROM migrations WHERE subject = $1",
    )
    .bind(subject)
    .fetch_one(db)
    .await?;
    let latest = match latest {
        Some(id) => migration(db, id).await?,
        None => None,
    };
    let last_succeeded = match succeeded {
        Some(id) => migration(db, id).await?,
        None => None,
    };
    let status = common::subject_status(latest.as_ref(), last_succeeded.is_some());
    Ok(SubjectView {
        status,
        latest,
        last_succeeded,
    })
}

pub(super) async fn live_leases(db: &PgPool, worker_id: &str) -> Result<Vec<LeaseToken>> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT id, attempt FROM tasks WHERE state = 'leased' AND lease_worker = $1 ORDER BY id",
    )
    .bind(worker_id)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(task_id, a)| LeaseToken {
            task_id,
            attempt: a as u32,
        })
        .collect())
}

/// A migration's leased tasks; `tasks_stage` (migration_id, stage_idx,
/// state) finds them without reading its finished ones.
pub(super) async fn leased_tasks(
    db: &PgPool,
    migration_id: i64,
    limit: u32,
) -> Result<Vec<LeasedTask>> {
    let rows: Vec<LeasedTaskRow> = sqlx::query_as(
        "SELECT id, attempt, stage_idx, kind, lease_worker, progress_done, progress_total,
                lease_expires_at
         FROM tasks WHERE migration_id = $1 AND state = 'leased' ORDER BY id LIMIT $2",
    )
    .bind(migration_id)
    .bind(limit as i64)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(common::leased_task).collect())
}
