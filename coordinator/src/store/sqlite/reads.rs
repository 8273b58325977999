//! Read-only queries of the SQLite store: views for clients and operators.
//! They run on the reader pool and never block the writer.

use futures::TryStreamExt;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection, SqlitePool};

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

pub(super) async fn get_plan(db: &SqlitePool, name: &str) -> Result<Option<PlanSpec>> {
    let spec: Option<String> =
        sqlx::query_scalar("SELECT spec FROM plans WHERE name = ? ORDER BY version DESC LIMIT 1")
            .bind(name)
            .fetch_optional(db)
            .await?;
    spec.as_deref().map(decode_plan).transpose()
}

pub(super) async fn list_plans(db: &SqlitePool, page: &PlanPage) -> Result<Plans> {
    // Keyset paging on the primary key (name, version); names are never
    // empty, so `> ''` is the first page.
    let rows = sqlx::query_scalar::<_, String>(
        "SELECT spec FROM plans p
         WHERE name > ? AND version = (SELECT max(version) FROM plans q WHERE q.name = p.name)
         ORDER BY name LIMIT ?",
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

fn decode_pool(row: &SqliteRow) -> Pool {
    Pool {
        name: row.get(0),
        slots: row.get::<i64, _>(1) as u32,
        paused: row.get(2),
        running: row.get::<i64, _>(3) as u32,
        queued: row.get::<i64, _>(4) as u32,
    }
}

pub(super) async fn pool(db: &SqlitePool, name: &str) -> Result<Option<Pool>> {
    let sql = sqlx::AssertSqlSafe(format!("{POOL_SELECT} WHERE p.name = ?"));
    let row = sqlx::query(sql).bind(name).fetch_optional(db).await?;
    Ok(row.as_ref().map(decode_pool))
}

/// The gauges of `/metrics`, in one read transaction: one snapshot of the
/// database (WAL), never waiting for the writer.
pub(super) async fn gauges(db: &SqlitePool) -> Result<Gauges> {
    let mut tx = db.begin().await?;
    let rows = gauges::read_rows!(tx);
    tx.commit().await?;
    rows.gauges()
}

pub(super) async fn list_pools(db: &SqlitePool) -> Result<Vec<Pool>> {
    let sql = sqlx::AssertSqlSafe(format!("{POOL_SELECT} ORDER BY p.name"));
    let rows = sqlx::query(sql).fetch_all(db).await?;
    Ok(rows.iter().map(decode_pool).collect())
}

const MIGRATION_COLUMNS: &str =
    "id, plan_name, plan_version, subject, parameters, pool, state, reason,
    idempotency_key, deadline, created_at, admitted_at, finished_at";

fn decode_migration(row: &SqliteRow) -> Result<Migration> {
    let state: String = row.get("state");
    let parameters: String = row.get("parameters");
    Ok(Migration {
        id: row.get("id"),
        plan_name: row.get("plan_name"),
        plan_version: row.get::<i64, _>("plan_version") as u32,
        subject: row.get("subject"),
        parameters: serde_json::from_str(&parameters)
            .map_err(|e| Error::Corrupt(format!("parameters: {e}")))?,
        pool: row.get("pool"),
        state: MigrationState::parse(&state).ok_or_else(|| corrupt("migration state", &state))?,
        reason: row.get("reason"),
        idempotency_key: row.get("idempotency_key"),
        deadline_ms: row.get("deadline"),
        created_at_ms: row.get("created_at"),
        admitted_at_ms: row.get("admitted_at"),
        finished_at_ms: row.get("finished_at"),
        stages: Vec::new(),
    })
}

async fn with_stages(db: &SqlitePool, mut m: Migration) -> Result<Migration> {
    let rows = sqlx::query(
        "SELECT s.idx, s.name, s.state, s.total, s.succeeded, s.failed, s.canceled, s.started_at, s.finished_at,
                (SELECT count(*) FROM tasks t WHERE t.migration_id = s.migration_id AND t.stage_idx = s.idx
                                               AND t.state = 'leased') AS running
         FROM stages s WHERE s.migration_id = ? ORDER BY s.idx",
    )
    .bind(m.id)
    .fetch_all(db)
    .await?;
    m.stages = rows
        .iter()
        .map(|r| {
            let state: String = r.get(2);
            Ok(StageProgress {
                index: r.get::<i64, _>(0) as u32,
                name: r.get(1),
                state: StageState::parse(&state).ok_or_else(|| corrupt("stage state", &state))?,
                total: r.get::<i64, _>(3) as u32,
                succeeded: r.get::<i64, _>(4) as u32,
                failed: r.get::<i64, _>(5) as u32,
                canceled: r.get::<i64, _>(6) as u32,
                started_at_ms: r.get(7),
                finished_at_ms: r.get(8),
                running: r.get::<i64, _>(9) as u32,
            })
        })
        .collect::<Result<_>>()?;
    Ok(m)
}

pub(super) async fn migration(db: &SqlitePool, id: i64) -> Result<Option<Migration>> {
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT {MIGRATION_COLUMNS} FROM migrations WHERE id = ?"
    ));
    let Some(row) = sqlx::query(sql).bind(id).fetch_optional(db).await? else {
        return Ok(None);
    };
    Ok(Some(with_stages(db, decode_migration(&row)?).await?))
}

pub(super) async fn list_migrations(
    db: &SqlitePool,
    f: &MigrationFilter,
) -> Result<Vec<Migration>> {
    // NULL parameters switch a filter off, so one prepared statement serves
    // every combination.
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT {MIGRATION_COLUMNS} FROM migrations
         WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR subject = ?2) AND (?3 IS NULL OR pool = ?3)
           AND (?4 IS NULL OR id < ?4)
         ORDER BY id DESC LIMIT (?5 + 0)"
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

pub(super) async fn list_events(
    db: &SqlitePool,
    migration_id: i64,
    after_id: i64,
    limit: u32,
) -> Result<Vec<Event>> {
    let limit = limit as usize;
    // Both reads in one snapshot (a read transaction, in WAL mode): a commit
    // between them could show a batch and not an event numbered before it in
    // the same transaction, and the cursor would then skip that event.
    let mut tx = db.begin().await?;
    let rows = sqlx::query(
        "SELECT id, migration_id, at, kind, stage_idx, task_id, attempt, worker_id, message
         FROM events WHERE migration_id = ? AND id > ? ORDER BY id LIMIT (? + 0)",
    )
    .bind(migration_id)
    .bind(after_id)
    .bind(limit as i64)
    .fetch_all(&mut *tx)
    .await?;
    let mut out = rows
        .iter()
        .map(|r| {
            Ok(Event {
                id: r.get(0),
                migration_id: r.get(1),
                at_ms: r.get(2),
                kind: event_kind(r.get(3))?,
                stage_index: r.get::<Option<i64>, _>(4).map(|i| i as u32),
                task_id: r.get(5),
                attempt: r.get::<i64, _>(6) as u32,
                worker_id: r.get(7),
                message: r.get(8),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // The batches past the cursor, read whole and expanded here: a batch
    // is one row to hand over from sqlx's SQLite thread, not one per event.
    // Read in id order until they hold a page: one batch's ids never
    // interleave with another's of the same migration (each took its block
    // in one statement).
    let mut batches = sqlx::query(
        "SELECT first_id, last_id, at, kind, stage_idx, events FROM event_batches
         WHERE migration_id = ? AND last_id > ? ORDER BY last_id",
    )
    .bind(migration_id)
    .bind(after_id)
    .fetch(&mut *tx);
    let mut from_batches = 0;
    while from_batches < limit {
        let Some(b) = batches.try_next().await? else {
            break;
        };
        let (first_id, last_id, at_ms): (i64, i64, i64) = (b.get(0), b.get(1), b.get(2));
        let kind = event_kind(b.get(3))?;
        let stage_index = Some(b.get::<i64, _>(4) as u32);
        let events: Vec<(i64, i64, String)> = serde_json::from_str(b.get(5))
            .map_err(|e| Error::Corrupt(format!("event batch {first_id}: {e}")))?;
        if events.len() as i64 != last_id - first_id + 1 {
            return Err(Error::Corrupt(format!(
                "event batch {first_id}..{last_id} of migration {migration_id} holds {} events",
                events.len()
            )));
        }
        for (k, (task_id, attempt, worker_id)) in events.into_iter().enumerate() {
            let id = first_id + k as i64;
            if id > after_id {
                from_batches += 1;
                out.push(Event {
                    id,
                    migration_id,
                    at_ms,
                    kind,
                    stage_index,
                    task_id,
                    attempt: attempt as u32,
                    worker_id,
                    message: String::new(),
                });
            }
        }
    }
    drop(batches);
    tx.commit().await?;
    out.sort_unstable_by_key(|e| e.id);
    out.truncate(limit);
    Ok(out)
}

pub(super) async fn subject_status(db: &SqlitePool, subject: &str) -> Result<SubjectView> {
    // "Latest" is the unfinished run if there is one (a retried older
    // migration included), else the one that finished last.
    let latest: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM migrations WHERE subject = ?
         ORDER BY state IN ('queued', 'running') DESC, coalesce(finished_at, 0) DESC, id DESC LIMIT 1",
    )
    .bind(subject)
    .fetch_optional(db)
    .await?;
    let succeeded: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM migrations WHERE subject = ? AND state = 'succeeded'
         ORDER BY finished_at DESC, id DESC LIMIT 1",
    )
    .bind(subject)
    .fetch_optional(db)
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

/// The state of a migration, inside a write transaction.
pub(super) async fn migration_state(
    conn: &mut SqliteConnection,
    id: i64,
) -> Result<MigrationState> {
    let state: Option<String> = sqlx::query_scalar("SELECT state FROM migrations WHERE id = ?")
        .bind(id)
        .fetch_optional(conn)
        .await?;
    let state = state.ok_or_else(|| Error::NotFound(format!("migration {id} does not exist")))?;
    MigrationState::parse(&state).ok_or_else(|| corrupt("migration state", &state))
}

pub(super) async fn live_leases(db: &SqlitePool, worker_id: &str) -> Result<Vec<LeaseToken>> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT id, attempt FROM tasks WHERE state = 'leased' AND lease_worker = ? ORDER BY id",
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
    db: &SqlitePool,
    migration_id: i64,
    limit: u32,
) -> Result<Vec<LeasedTask>> {
    let rows: Vec<LeasedTaskRow> = sqlx::query_as(
        "SELECT id, attempt, stage_idx, kind, lease_worker, progress_done, progress_total,
                lease_expires_at
         FROM tasks WHERE migration_id = ? AND state = 'leased' ORDER BY id LIMIT ?",
    )
    .bind(migration_id)
    .bind(limit as i64)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(common::leased_task).collect())
}
