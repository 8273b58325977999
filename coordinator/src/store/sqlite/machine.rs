//! The state machines of docs/design.md as SQL, shared by every transition of the
//! SQLite store. Each helper runs inside the caller's transaction and guards
//! its update with the state it expects (`WHERE state = 'pending'` and so
//! on): a transition that already happened is a no-op, which is what keeps a
//! duplicate or late message from starting a stage twice (I2).
//!
//! Ending a whole migration ([`abort_migration`]: cancel, a dead task, a
//! deadline) is one transaction of a fixed number of set-at-a-time
//! statements, whatever its number of tasks ([`cancel_unfinished`]). A
//! statement pair per task (the stage's counter and an event) held the one
//! writer 7.5 s for 100,000 tasks, and every other migration's transitions
//! waited behind it; set at a time it is about 0.3 s. That is short enough
//! to stay one transaction rather than be chunked: chunks would leave
//! leases revoked on tasks not yet ended (heartbeats would renew them,
//! completions count them), the migration's end events after its state, and
//! a half-done end for the sweeper and retry to finish. Past about a
//! million tasks in one stage the writer would be held for seconds again;
//! that is where chunking would pay for those states.

use sqlx::{Row, SqliteConnection};

use crate::clock::now_ms;
use crate::domain::{EventKind, MigrationState, Revoked};
use crate::error::Result;
use crate::store::Effects;
use crate::store::common::revoked;

/// Optional parts of an event.
#[derive(Default)]
pub(super) struct EventAt<'a> {
    pub stage: Option<i64>,
    pub task_id: i64,
    pub attempt: i64,
    pub worker: &'a str,
    pub message: &'a str,
}

/// Appends one event to the log.
pub(super) async fn event(
    conn: &mut SqliteConnection,
    migration_id: i64,
    kind: EventKind,
    at: EventAt<'_>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO events (migration_id, at, kind, stage_idx, task_id, attempt, worker_id, message)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(migration_id)
    .bind(now_ms())
    .bind(kind.as_str())
    .bind(at.stage)
    .bind(at.task_id)
    .bind(at.attempt)
    .bind(at.worker)
    .bind(at.message)
    .execute(conn)
    .await?;
    Ok(())
}

/// Admits the oldest queued migrations of a pool into every free slot, in one
/// pass (I3), and starts their first unfinished stage.
pub(super) async fn admit(conn: &mut SqliteConnection, pool: &str, fx: &mut Effects) -> Result<()> {
    // A migration whose stages are all empty finishes during admission and
    // frees its slot again, hence the loop.
    loop {
        let row = sqlx::query(
            "SELECT p.slots, p.paused,
                    (SELECT count(*) FROM migrations m WHERE m.pool = p.name AND m.state = 'running') AS running
             FROM pools p WHERE p.name = ?",
        )
        .bind(pool)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else { return Ok(()) };
        let (slots, paused, running): (i64, bool, i64) = (row.get(0), row.get(1), row.get(2));
        if paused || running >= slots {
            return Ok(());
        }
        // I10: one past its deadline is not admitted; the sweeper fails it.
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM migrations WHERE pool = ? AND state = 'queued'
               AND (deadline IS NULL OR deadline >= ?)
             ORDER BY queued_at, id LIMIT (? + 0)",
        )
        .bind(pool)
        .bind(now_ms())
        .bind(slots - running)
        .fetch_all(&mut *conn)
        .await?;
        if ids.is_empty() {
            return Ok(());
        }
        let mut finished_any = false;
        for id in ids {
            let admitted = sqlx::query(
                "UPDATE migrations SET state = 'running', admitted_at = ? WHERE id = ? AND state = 'queued'",
            )
            .bind(now_ms())
            .bind(id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if admitted == 0 {
                continue;
            }
            event(conn, id, EventKind::MigrationAdmitted, EventAt::default()).await?;
            fx.touch(id);
            let first: Option<i64> = sqlx::query_scalar(
                "SELECT min(idx) FROM stages WHERE migration_id = ? AND state != 'succeeded'",
            )
            .bind(id)
            .fetch_one(&mut *conn)
            .await?;
            let count = stage_count(conn, id).await?;
            finished_any |= enter_stage(conn, id, first.unwrap_or(count), fx).await?;
        }
        if !finished_any {
            return Ok(());
        }
    }
}

async fn stage_count(conn: &mut SqliteConnection, migration_id: i64) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM stages WHERE migration_id = ?")
            .bind(migration_id)
            .fetch_one(conn)
            .await?,
    )
}

/// Starts stage `idx` of a running migration: marks it running (once — I2)
/// and makes its tasks ready (only the first one for a serial stage). An empty
/// stage succeeds at once and the next one starts; past the last stage the
/// migration succeeds. Returns true when the migration succeeded, so the
/// caller admits into the freed slot.
pub(super) async fn enter_stage(
    conn: &mut SqliteConnection,
    migration_id: i64,
    mut idx: i64,
    fx: &mut Effects,
) -> Result<bool> {
    loop {
        let started: Option<(i64, bool)> = sqlx::query_as(
            "UPDATE stages SET state = 'running', started_at = ?
             WHERE migration_id = ? AND idx = ? AND state = 'pending'
             RETURNING total, serial",
        )
        .bind(now_ms())
        .bind(migration_id)
        .bind(idx)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((total, serial)) = started else {
            // Past the last stage the migration is done; a stage that exists
            // had started already.
            if idx >= stage_count(conn, migration_id).await? {
                return succeed_migration(conn, migration_id, fx).await;
            }
            return Ok(false);
        };
        fx.touch(migration_id);
        event(
            conn,
            migration_id,
            EventKind::StageStarted,
            EventAt {
                stage: Some(idx),
                ..Default::default()
            },
        )
        .await?;
        if total > 0 {
            if serial {
                ready_next_serial(conn, migration_id, idx).await?;
            } else {
                sqlx::query(
                    "UPDATE tasks SET state = 'ready', ready_at = ?
                     WHERE migration_id = ? AND stage_idx = ? AND state = 'pending'",
                )
                .bind(now_ms())
                .bind(migration_id)
                .bind(idx)
                .execute(&mut *conn)
                .await?;
            }
            fx.dispatch = true;
            return Ok(false);
        }
        // A dynamic stage that received no tasks: nothing can add work to it
        // any more, so it is done.
        finish_stage(conn, migration_id, idx, fx).await?;
        idx += 1;
    }
}

/// The migration's running stage, if one is: its index and whether it is
/// serial. At most one runs at a time (I1).
pub(super) async fn running_stage(
    conn: &mut SqliteConnection,
    migration_id: i64,
) -> Result<Option<(i64, bool)>> {
    Ok(sqlx::query_as(
        "SELECT idx, serial FROM stages WHERE migration_id = ? AND state = 'running'",
    )
    .bind(migration_id)
    .fetch_optional(conn)
    .await?)
}

/// Makes the next pending task of a serial stage ready, in insertion order.
pub(super) async fn ready_next_serial(
    conn: &mut SqliteConnection,
    migration_id: i64,
    idx: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE tasks SET state = 'ready', ready_at = ?
         WHERE id = (SELECT min(id) FROM tasks WHERE migration_id = ? AND stage_idx = ? AND state = 'pending')
           -- a serial stage runs one task at a time
           AND NOT EXISTS (SELECT 1 FROM tasks WHERE migration_id = ? AND stage_idx = ? AND state IN ('ready', 'leased'))",
    )
    .bind(now_ms())
    .bind(migration_id)
    .bind(idx)
    .bind(migration_id)
    .bind(idx)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks a running stage succeeded (once).
async fn finish_stage(
    conn: &mut SqliteConnection,
    migration_id: i64,
    idx: i64,
    fx: &mut Effects,
) -> Result<bool> {
    let ran_ms: Option<Option<i64>> = sqlx::query_scalar(
        "UPDATE stages SET state = 'succeeded', finished_at = ?
         WHERE migration_id = ? AND idx = ? AND state = 'running' AND succeeded = total
         RETURNING finished_at - started_at",
    )
    .bind(now_ms())
    .bind(migration_id)
    .bind(idx)
    .fetch_optional(&mut *conn)
    .await?;
    let done = ran_ms.is_some();
    if let Some(ran_ms) = ran_ms {
        fx.counted.stages_ms.extend(ran_ms);
        fx.touch(migration_id);
        event(
            conn,
            migration_id,
            EventKind::StageSucceeded,
            EventAt {
                stage: Some(idx),
                ..Default::default()
            },
        )
        .await?;
    }
    Ok(done)
}

/// Counts `n` more successes of stage `idx` and acts on them: after the
/// stage's last, the stage succeeds and the next one starts (I1), and a
/// migration that succeeded frees its pool slot for the queue (I3); in a
/// serial stage, the next task becomes ready. One statement when nothing
/// else happens, which is nearly always.
pub(super) async fn count_successes(
    conn: &mut SqliteConnection,
    migration_id: i64,
    idx: i64,
    n: i64,
    fx: &mut Effects,
) -> Result<()> {
    let (last, serial): (bool, bool) = sqlx::query_as(
        "UPDATE stages SET succeeded = succeeded + ? WHERE migration_id = ? AND idx = ?
         RETURNING state = 'running' AND succeeded = total, serial",
    )
    .bind(n)
    .bind(migration_id)
    .bind(idx)
    .fetch_one(&mut *conn)
    .await?;
    fx.touch(migration_id);
    if last && finish_stage(conn, migration_id, idx, fx).await? {
        if enter_stage(conn, migration_id, idx + 1, fx).await? {
            let pool: String = sqlx::query_scalar("SELECT pool FROM migrations WHERE id = ?")
                .bind(migration_id)
                .fetch_one(&mut *conn)
                .await?;
            admit(conn, &pool, fx).await?;
        }
    } else if serial {
        ready_next_serial(conn, migration_id, idx).await?;
    }
    Ok(())
}

async fn succeed_migration(
    conn: &mut SqliteConnection,
    migration_id: i64,
    fx: &mut Effects,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE migrations SET state = 'succeeded', finished_at = ? WHERE id = ? AND state = 'running'",
    )
    .bind(now_ms())
    .bind(migration_id)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if done == 1 {
        fx.touch(migration_id);
        fx.dispatch = true;
        event(
            conn,
            migration_id,
            EventKind::MigrationSucceeded,
            EventAt::default(),
        )
        .await?;
    }
    Ok(done == 1)
}

/// Ends a queued or running migration as failed or canceled: every unfinished
/// task of a running stage is canceled, held leases are revoked (their
/// workers get cancel notices, I9), the running stage ends, and the slot is
/// freed. Returns false if the migration was already finished.
pub(super) async fn abort_migration(
    conn: &mut SqliteConnection,
    migration_id: i64,
    state: MigrationState,
    reason: &str,
    fx: &mut Effects,
) -> Result<bool> {
    debug_assert!(matches!(
        state,
        MigrationState::Failed | MigrationState::Canceled
    ));
    let pool: Option<String> = sqlx::query_scalar(
        "UPDATE migrations SET state = ?, reason = ?, finished_at = ?
         WHERE id = ? AND state IN ('queued', 'running') RETURNING pool",
    )
    .bind(state.as_str())
    .bind(reason)
    .bind(now_ms())
    .bind(migration_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(pool) = pool else { return Ok(false) };
    fx.touch(migration_id);
    fx.dispatch = true;

    let why = match state {
        MigrationState::Canceled => "migration canceled",
        _ => "migration failed",
    };
    fx.revoked
        .extend(cancel_unfinished(conn, migration_id, why).await?);

    let (stage_state, stage_event) = match state {
        MigrationState::Canceled => ("canceled", EventKind::StageFailed),
        _ => ("failed", EventKind::StageFailed),
    };
    let ended: Vec<i64> = sqlx::query_scalar(
        "UPDATE stages SET state = ?, finished_at = ? WHERE migration_id = ? AND state = 'running' RETURNING idx",
    )
    .bind(stage_state)
    .bind(now_ms())
    .bind(migration_id)
    .fetch_all(&mut *conn)
    .await?;
    for idx in ended {
        event(
            conn,
            migration_id,
            stage_event,
            EventAt {
                stage: Some(idx),
                message: reason,
                ..Default::default()
            },
        )
        .await?;
    }
    let kind = match state {
        MigrationState::Canceled => EventKind::MigrationCanceled,
        _ => EventKind::MigrationFailed,
    };
    event(
        conn,
        migration_id,
        kind,
        EventAt {
            message: reason,
            ..Default::default()
        },
    )
    .await?;
    admit(conn, &pool, fx).await?;
    Ok(true)
}

/// The unfinished tasks of a migration's running stage, for the statements
/// of [`cancel_unfinished`] (`?1` the migration).
const UNFINISHED: &str = "migration_id = ?1 AND state IN ('pending', 'ready', 'leased')
    AND stage_idx IN (SELECT idx FROM stages WHERE migration_id = ?1 AND state = 'running')";

/// Cancels every unfinished task of the migration's running stage, set at a
/// time: four statements whatever the number of tasks — read the leases it
/// ends, append the TaskCanceled events (in task-id order, with `why`),
/// count them in the stage's `canceled` (I5), end the tasks. Returns the
/// leases, in task-id order, for their workers' cancel notices (I9).
///
/// A statement per task (an update of the stage row and an event each) kept
/// the only writer 7.5 s for 100,000 tasks.
async fn cancel_unfinished(
    conn: &mut SqliteConnection,
    migration_id: i64,
    why: &str,
) -> Result<Vec<Revoked>> {
    let now = now_ms();
    let leased: Vec<(i64, i64, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, attempt, lease_worker FROM tasks WHERE {UNFINISHED} AND state = 'leased'
         ORDER BY id"
    )))
    .bind(migration_id)
    .fetch_all(&mut *conn)
    .await?;
    // AUTOINCREMENT ids are handed out in the order the rows come: task order.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO events (migration_id, at, kind, stage_idx, task_id, attempt, message)
         SELECT ?1, ?2, ?3, stage_idx, id, attempt, ?4 FROM tasks WHERE {UNFINISHED}
         ORDER BY id"
    )))
    .bind(migration_id)
    .bind(now)
    .bind(EventKind::TaskCanceled.as_str())
    .bind(why)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE stages SET canceled = canceled +
             (SELECT count(*) FROM tasks t WHERE t.migration_id = ?1 AND t.stage_idx = stages.idx
                                             AND t.state IN ('pending', 'ready', 'leased'))
         WHERE migration_id = ?1 AND state = 'running'",
    )
    .bind(migration_id)
    .execute(&mut *conn)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE tasks SET state = 'canceled', lease_worker = NULL, lease_expires_at = NULL,
                          finished_at = ?2
         WHERE {UNFINISHED}"
    )))
    .bind(migration_id)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(revoked(leased, why))
}
