//! The state machines of docs/design.md as SQL, shared by every transition of the
//! PostgreSQL store: the same helpers as the SQLite store's, with the
//! database's clock. Each runs inside the caller's transaction and guards its
//! update with the state it expects (`WHERE state = 'pending'` and so on), so
//! a transition that already happened is a no-op (I2).
//!
//! The transitions every task and stage go through (a stage starting or
//! succeeding, a migration admitted or succeeding, and in `bulk` and `claim`
//! a task leased or succeeding) append their event in the statement that
//! makes the change, with a data-modifying `WITH`: each event of its own
//! would be one more round trip while the migration's lock is held.
//!
//! Every helper that touches one migration's stages, tasks or events expects
//! the caller to hold that migration's row lock ([`lock_migration`]): it is
//! the one lock that serialises all transitions of a migration across
//! coordinators (see the module doc of `postgres`).
//!
//! Ending a whole migration ([`abort_migration`]: cancel, a dead task, a
//! deadline) is one transaction whose cost does not depend on the number of
//! tasks in round trips: the unfinished tasks, their TaskCanceled events and
//! the stage's counter are one statement ([`cancel_unfinished`]). It was a
//! stage-row update and an event per task, and the updates of one row in
//! one transaction each walked the versions the earlier ones left: 2 s for
//! 10,000 tasks, 90 s for 100,000, longer than a client waits, so the cancel
//! rolled back. Set at a time, 100,000 tasks take about 1 s, holding only
//! that migration's row lock (and the pool's for the admission at the end),
//! so other migrations' transitions do not wait for it. It is not chunked:
//! a cancel spread over several transactions would leave leases revoked on
//! tasks not yet ended (heartbeats would renew them, completions count
//! them), its events after its state, and a half-done end for the sweeper
//! and retry to finish — new states for every transition to respect, for
//! time no other migration spends waiting.

use sqlx::PgConnection;

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

/// Appends one event to the log. The caller holds the migration's row lock,
/// which is what makes one migration's event ids commit in order.
pub(super) async fn event(
    conn: &mut PgConnection,
    migration_id: i64,
    kind: EventKind,
    at: EventAt<'_>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO events (migration_id, at, kind, stage_idx, task_id, attempt, worker_id, message)
         VALUES ($1, stagecoach_now_ms(), $2, $3, $4, $5, $6, $7)",
    )
    .bind(migration_id)
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

/// Takes a migration's row lock for the rest of the transaction and returns
/// its state and pool, or `None` if it does not exist.
///
/// `FOR NO KEY UPDATE`, not `FOR UPDATE`: it excludes every other transition
/// of the migration just the same, but does not block the foreign-key checks
/// of rows inserted beside it. Runs as its own statement, so the statements
/// after it see what the previous lock holder committed.
pub(super) async fn lock_migration(
    conn: &mut PgConnection,
    id: i64,
) -> Result<Option<(String, String)>> {
    Ok(
        sqlx::query_as("SELECT state, pool FROM migrations WHERE id = $1 FOR NO KEY UPDATE")
            .bind(id)
            .fetch_optional(conn)
            .await?,
    )
}

/// Admits the oldest queued migrations of a pool into every free slot, in one
/// pass (I3), and starts their first unfinished stage.
pub(super) async fn admit(conn: &mut PgConnection, pool: &str, fx: &mut Effects) -> Result<()> {
    // A migration whose stages are all empty finishes during admission and
    // frees its slot again, hence the loop.
    loop {
        // I3 across coordinators: admissions into one pool queue behind this
        // row lock, so two coordinators never both fill the same free slot.
        // NO KEY UPDATE: inserting a migration into the pool takes a KEY SHARE
        // lock on this row (the foreign key); a full UPDATE lock would make
        // two creating transactions wait for each other.
        let row: Option<(i64, bool)> =
            sqlx::query_as("SELECT slots, paused FROM pools WHERE name = $1 FOR NO KEY UPDATE")
                .bind(pool)
                .fetch_optional(&mut *conn)
                .await?;
        let Some((slots, paused)) = row else {
            return Ok(());
        };
        if paused {
            return Ok(());
        }
        // The free slots are counted in a statement of its own, after the
        // lock: a count in the locking statement would come from before the
        // wait, and miss what the previous admitter committed.
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM migrations WHERE pool = $1 AND state = 'queued'
               -- I10: one past its deadline is not admitted; the sweeper fails it
               AND (deadline IS NULL OR deadline >= stagecoach_now_ms())
             ORDER BY queued_at, id
             LIMIT greatest($2 - (SELECT count(*) FROM migrations
                                  WHERE pool = $1 AND state = 'running'), 0)
             -- A queued migration whose row another transaction holds is being
             -- canceled or retried; that transaction admits after it. Waiting
             -- here instead could deadlock: it waits for this pool row.
             FOR NO KEY UPDATE SKIP LOCKED",
        )
        .bind(pool)
        .bind(slots)
        .fetch_all(&mut *conn)
        .await?;
        if ids.is_empty() {
            return Ok(());
        }
        let mut finished_any = false;
        for id in ids {
            // Admitted now or not, and with the same round trip the first
            // stage not yet succeeded (a retried migration's may not be the
            // first), or past the last one.
            let (admitted, first, count): (bool, Option<i64>, i64) = sqlx::query_as(
                "WITH admitted AS (
                     UPDATE migrations SET state = 'running', admitted_at = stagecoach_now_ms()
                     WHERE id = $1 AND state = 'queued'
                     RETURNING id),
                 logged AS (
                     INSERT INTO events (migration_id, at, kind)
                     SELECT id, stagecoach_now_ms(), $2 FROM admitted)
                 SELECT EXISTS (SELECT 1 FROM admitted),
                        min(idx) FILTER (WHERE state <> 'succeeded'), count(*)
                 FROM stages WHERE migration_id = $1",
            )
            .bind(id)
            .bind(EventKind::MigrationAdmitted.as_str())
            .fetch_one(&mut *conn)
            .await?;
            if !admitted {
                continue;
            }
            fx.touch(id);
            finished_any |= enter_stage(conn, id, first.unwrap_or(count), fx).await?;
        }
        if !finished_any {
            return Ok(());
        }
    }
}

async fn stage_count(conn: &mut PgConnection, migration_id: i64) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM stages WHERE migration_id = $1")
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
    conn: &mut PgConnection,
    migration_id: i64,
    idx: i64,
    fx: &mut Effects,
) -> Result<bool> {
    Ok(advance(conn, migration_id, None, idx, fx).await? == Some(true))
}

/// Succeeds stage `finish` if given, then starts stage `idx` as
/// [`enter_stage`] does — only if `finish` succeeded now (I1). `None` when
/// `finish` did not succeed (and nothing changed), else whether the
/// migration succeeded.
async fn advance(
    conn: &mut PgConnection,
    migration_id: i64,
    mut finish: Option<i64>,
    mut idx: i64,
    fx: &mut Effects,
) -> Result<Option<bool>> {
    loop {
        let (finished, started) = finish_and_start(conn, migration_id, finish, idx).await?;
        if finish.is_some() {
            let Some(ran_ms) = finished else {
                return Ok(None);
            };
            fx.counted.stages_ms.extend(ran_ms);
            fx.touch(migration_id);
        }
        let Some((total, serial)) = started else {
            // Past the last stage the migration is done; a stage that exists
            // had started already.
            if idx >= stage_count(conn, migration_id).await? {
                return succeed_migration(conn, migration_id, fx).await.map(Some);
            }
            return Ok(Some(false));
        };
        fx.touch(migration_id);
        if total > 0 {
            if serial {
                ready_next_serial(conn, migration_id, idx).await?;
            }
            fx.dispatch = true;
            return Ok(Some(false));
        }
        // A dynamic stage that received no tasks: nothing can add work to it
        // any more, so it is done, and the next one starts.
        finish = Some(idx);
        idx += 1;
    }
}

/// One statement: stage `finish` (if given) succeeds if every task of it
/// has, then stage `idx` starts — if pending (I2), and when `finish` is
/// given only if it succeeded now (I1) — and the tasks of a parallel stage
/// become ready. Their events go in in that order. One round trip for both
/// is one less on the path of every stage transition; a data-modifying CTE
/// runs whether or not the query reads it. Returns whether `finish`
/// succeeded (with how long it ran, in ms, if it has a start time), and the
/// started stage's task count and seriality.
async fn finish_and_start(
    conn: &mut PgConnection,
    migration_id: i64,
    finish: Option<i64>,
    idx: i64,
) -> Result<(Option<Option<i64>>, Option<(i64, bool)>)> {
    let (finished, ran_ms, total, serial): (bool, Option<i64>, Option<i64>, Option<bool>) =
        sqlx::query_as(
            "WITH finished AS (
             UPDATE stages SET state = 'succeeded', finished_at = stagecoach_now_ms()
             WHERE migration_id = $1 AND idx = $2 AND state = 'running' AND succeeded = total
             RETURNING migration_id, idx, finished_at - started_at AS ran_ms),
         started AS (
             UPDATE stages SET state = 'running', started_at = stagecoach_now_ms()
             WHERE migration_id = $1 AND idx = $3 AND state = 'pending'
               AND ($2::bigint IS NULL OR EXISTS (SELECT 1 FROM finished))
             RETURNING migration_id, idx, total, serial),
         logged AS (
             INSERT INTO events (migration_id, at, kind, stage_idx)
             SELECT migration_id, stagecoach_now_ms(), kind, idx
             FROM (SELECT 0 AS o, migration_id, idx, $4::text AS kind FROM finished
                   UNION ALL SELECT 1, migration_id, idx, $5::text FROM started) AS e
             ORDER BY o),
         readied AS (
             UPDATE tasks SET state = 'ready', ready_at = stagecoach_now_ms()
             WHERE migration_id = $1 AND stage_idx = $3 AND state = 'pending'
               AND EXISTS (SELECT 1 FROM started WHERE NOT serial))
         SELECT EXISTS (SELECT 1 FROM finished), (SELECT ran_ms FROM finished),
                (SELECT total FROM started), (SELECT serial FROM started)",
        )
        .bind(migration_id)
        .bind(finish)
        .bind(idx)
        .bind(EventKind::StageSucceeded.as_str())
        .bind(EventKind::StageStarted.as_str())
        .fetch_one(conn)
        .await?;
    Ok((finished.then_some(ran_ms), total.zip(serial)))
}

/// The migration's running stage, if one is: its index and whether it is
/// serial. At most one runs at a time (I1).
pub(super) async fn running_stage(
    conn: &mut PgConnection,
    migration_id: i64,
) -> Result<Option<(i64, bool)>> {
    Ok(sqlx::query_as(
        "SELECT idx, serial FROM stages WHERE migration_id = $1 AND state = 'running'",
    )
    .bind(migration_id)
    .fetch_optional(conn)
    .await?)
}

/// Makes the next pending task of a serial stage ready, in insertion order.
pub(super) async fn ready_next_serial(
    conn: &mut PgConnection,
    migration_id: i64,
    idx: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE tasks SET state = 'ready', ready_at = stagecoach_now_ms()
         WHERE id = (SELECT min(id) FROM tasks WHERE migration_id = $1 AND stage_idx = $2 AND state = 'pending')
           -- a serial stage runs one task at a time
           AND NOT EXISTS (SELECT 1 FROM tasks WHERE migration_id = $1 AND stage_idx = $2
                                                 AND state IN ('ready', 'leased'))",
    )
    .bind(migration_id)
    .bind(idx)
    .execute(conn)
    .await?;
    Ok(())
}

/// Counts `n` more successes of stage `idx` and acts on them
/// ([`counted`]). One statement when nothing else happens, which is nearly
/// always.
pub(super) async fn count_successes(
    conn: &mut PgConnection,
    migration_id: i64,
    idx: i64,
    n: i64,
    fx: &mut Effects,
) -> Result<()> {
    let (last, serial): (bool, bool) = sqlx::query_as(
        "UPDATE stages SET succeeded = succeeded + $1 WHERE migration_id = $2 AND idx = $3
         RETURNING state = 'running' AND succeeded = total, serial",
    )
    .bind(n)
    .bind(migration_id)
    .bind(idx)
    .fetch_one(&mut *conn)
    .await?;
    counted(conn, migration_id, idx, last, serial, fx).await
}

/// Acts on successes just counted in stage `idx`: after the stage's `last`,
/// the stage succeeds and the next one starts (I1), and a migration that
/// succeeded frees its pool slot for the queue (I3); in a `serial` stage,
/// the next task becomes ready.
pub(super) async fn counted(
    conn: &mut PgConnection,
    migration_id: i64,
    idx: i64,
    last: bool,
    serial: bool,
    fx: &mut Effects,
) -> Result<()> {
    fx.touch(migration_id);
    let advanced = if last {
        advance(conn, migration_id, Some(idx), idx + 1, fx).await?
    } else {
        None
    };
    match advanced {
        Some(true) => {
            let pool: String = sqlx::query_scalar("SELECT pool FROM migrations WHERE id = $1")
                .bind(migration_id)
                .fetch_one(&mut *conn)
                .await?;
            admit(conn, &pool, fx).await
        }
        None if serial => ready_next_serial(conn, migration_id, idx).await,
        _ => Ok(()),
    }
}

async fn succeed_migration(
    conn: &mut PgConnection,
    migration_id: i64,
    fx: &mut Effects,
) -> Result<bool> {
    // Rows affected: the events inserted, one if the migration succeeded now.
    let done = sqlx::query(
        "WITH done AS (
             UPDATE migrations SET state = 'succeeded', finished_at = stagecoach_now_ms()
             WHERE id = $1 AND state = 'running'
             RETURNING id)
         INSERT INTO events (migration_id, at, kind)
         SELECT id, stagecoach_now_ms(), $2 FROM done",
    )
    .bind(migration_id)
    .bind(EventKind::MigrationSucceeded.as_str())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if done == 1 {
        fx.touch(migration_id);
        fx.dispatch = true;
    }
    Ok(done == 1)
}

/// Ends a queued or running migration as failed or canceled: every unfinished
/// task of a running stage is canceled, held leases are revoked (their
/// workers get cancel notices, I9), the running stage ends, and the slot is
/// freed. Returns false if the migration was already finished.
pub(super) async fn abort_migration(
    conn: &mut PgConnection,
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
        "UPDATE migrations SET state = $1, reason = $2, finished_at = stagecoach_now_ms()
         WHERE id = $3 AND state IN ('queued', 'running') RETURNING pool",
    )
    .bind(state.as_str())
    .bind(reason)
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

    let stage_state = match state {
        MigrationState::Canceled => "canceled",
        _ => "failed",
    };
    let mut ended: Vec<i64> = sqlx::query_scalar(
        "UPDATE stages SET state = $1, finished_at = stagecoach_now_ms()
         WHERE migration_id = $2 AND state = 'running' RETURNING idx",
    )
    .bind(stage_state)
    .bind(migration_id)
    .fetch_all(&mut *conn)
    .await?;
    ended.sort_unstable();
    for idx in ended {
        event(
            conn,
            migration_id,
            EventKind::StageFailed,
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

/// Cancels every unfinished task of the migration's running stage, set at a
/// time in one statement: the tasks, their TaskCanceled events (in task-id
/// order, with `why`), and the stage's `canceled` counter by the number
/// canceled (I5). Returns the leases it ended, in task-id order, for their
/// workers' cancel notices (I9). The caller holds the migration's lock.
///
/// One statement whatever the number of tasks: a statement per task, and
/// above all an update of the stage row per task, made a cancel quadratic
/// (every update of one row in one transaction walks the versions the
/// earlier ones left), 90 s for 100,000 tasks.
async fn cancel_unfinished(
    conn: &mut PgConnection,
    migration_id: i64,
    why: &str,
) -> Result<Vec<Revoked>> {
    let leased: Vec<(i64, i64, Option<String>)> = sqlx::query_as(
        "WITH now AS (SELECT stagecoach_now_ms() AS ms),
         unfinished AS (
             SELECT id, state, lease_worker FROM tasks
             WHERE migration_id = $1 AND state IN ('pending', 'ready', 'leased')
               AND stage_idx IN (SELECT idx FROM stages WHERE migration_id = $1 AND state = 'running')),
         canceled AS (
             UPDATE tasks SET state = 'canceled', lease_worker = NULL, lease_expires_at = NULL,
                              finished_at = (SELECT ms FROM now)
             FROM unfinished WHERE tasks.id = unfinished.id
             RETURNING tasks.id, tasks.stage_idx, tasks.attempt,
                       unfinished.state AS was, unfinished.lease_worker),
         -- Identity values are drawn in the order the rows come: task order.
         logged AS (
             INSERT INTO events (migration_id, at, kind, stage_idx, task_id, attempt, message)
             SELECT $1, (SELECT ms FROM now), $2, stage_idx, id, attempt, $3
             FROM canceled ORDER BY id),
         counted AS (
             UPDATE stages SET canceled = stages.canceled + c.n
             FROM (SELECT stage_idx, count(*) AS n FROM canceled GROUP BY stage_idx) AS c
             WHERE stages.migration_id = $1 AND stages.idx = c.stage_idx)
         SELECT id, attempt, lease_worker FROM canceled WHERE was = 'leased' ORDER BY id",
    )
    .bind(migration_id)
    .bind(EventKind::TaskCanceled.as_str())
    .bind(why)
    .fetch_all(conn)
    .await?;
    Ok(revoked(leased, why))
}
