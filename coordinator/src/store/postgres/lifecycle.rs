//! The client-facing transitions of one migration's life: create, cancel,
//! retry. Each is one transaction; `transact` runs it again when it lost a
//! race on a unique index (I8) or a deadlock.

use super::machine::{self, EventAt, event};
use super::{PostgresStore, notify, pool_not_found};
use super::{bulk, claim};

use crate::domain::{EventKind, MigrationState, NewMigration, RetryPolicy, retried_message};
use crate::error::{Error, Result};
use crate::store::common::{corrupt, created_tasks, deadline_not_ahead, retry_past_deadline};
use crate::store::{ClaimRequest, Created, Effects, Pass};

impl PostgresStore {
    /// Creates a migration and, when it was admitted, claims in the same
    /// transaction for the `requests` whose worker locks are free.
    pub(super) async fn create_once(
        &self,
        m: &NewMigration,
        requests: &[ClaimRequest],
    ) -> Result<(Created, Effects, Option<Pass>)> {
        let mut fx = Effects::default();
        let mut tx = self.db.begin().await?;
        // One statement, one snapshot: checked one by one, a create that
        // another coordinator commits in between could be seen by the
        // subject check and missed by the key check before it.
        let (existing, pool_exists, busy_id, busy_state, late_ms): (
            Option<i64>,
            bool,
            Option<i64>,
            Option<String>,
            Option<i64>,
        ) = sqlx::query_as(
            "SELECT (SELECT id FROM migrations WHERE idempotency_key = $1),
                    EXISTS (SELECT 1 FROM pools WHERE name = $2),
                    busy.id, busy.state, stagecoach_now_ms() - $4::bigint
             FROM (SELECT 1) AS one
             LEFT JOIN migrations busy ON busy.subject = $3 AND busy.state IN ('queued', 'running')",
        )
        .bind(&m.idempotency_key)
        .bind(&m.pool)
        .bind(&m.subject)
        .bind(m.deadline_ms)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(id) = existing {
            tx.rollback().await?;
            let created = Created {
                migration_id: id,
                created: false,
            };
            return Ok((created, fx, None));
        }
        if !pool_exists {
            return Err(pool_not_found(&m.pool));
        }
        // I10, after the idempotency lookup, as on SQLite.
        if let Some(late_ms) = late_ms.filter(|&ms| ms > 0) {
            return Err(deadline_not_ahead(late_ms));
        }
        if let (Some(id), Some(state)) = (busy_id, busy_state) {
            return Err(Error::AlreadyExists(format!(
                "subject {:?} already has an unfinished migration: {id} is {state}; wait for it, or cancel it first",
                m.subject
            )));
        }
        // A concurrent create of the same subject or key that commits first
        // makes this insert fail on a unique index; `transact` runs the whole
        // create again and the checks above answer.
        let id = insert_migration(&mut tx, m).await?;
        fx.touch(id);
        machine::admit(&mut tx, &m.pool, &mut fx).await?;
        // The tasks go in after the admission: see `NewTaskState`.
        let running = machine::running_stage(&mut tx, id).await?;
        for s in created_tasks(&m.plan.stages, running) {
            bulk::insert_tasks(&mut tx, id, s.idx, s.attempts, &s.tasks, s.state).await?;
        }
        if let Some((idx, true)) = running {
            machine::ready_next_serial(&mut tx, id, idx).await?;
        }
        let pass = if fx.dispatch && claim::wants_work(requests) {
            Some(self.pass_in(&mut tx, requests, id, &mut fx).await?)
        } else {
            None
        };
        notify::commit(tx, &self.origin, &fx).await?;
        let created = Created {
            migration_id: id,
            created: true,
        };
        Ok((created, fx, pass))
    }

    /// A dispatch pass at the end of a transaction that holds migration and
    /// pool locks and created migration `created` (no other transaction
    /// sees it yet: as good as locked): for the workers whose locks are
    /// free (the rest, and migrations others hold, make the pass partial).
    async fn pass_in(
        &self,
        conn: &mut sqlx::PgConnection,
        requests: &[ClaimRequest],
        created: i64,
        fx: &mut Effects,
    ) -> Result<Pass> {
        let free = claim::try_lock_workers(conn, requests).await?;
        let mine: Vec<ClaimRequest> = free.iter().map(|&i| requests[i].clone()).collect();
        let known = claim::Known {
            locked: vec![created],
            leases: None,
        };
        let theirs = claim::claim_in(conn, &mine, self.limits, false, &known, fx).await?;
        let mut pass = claim::nothing(requests);
        pass.partial = theirs.partial || free.len() < requests.len();
        for (i, batch) in free.into_iter().zip(theirs.claimed) {
            pass.claimed[i] = batch;
        }
        fx.dispatch |= pass.partial;
        Ok(pass)
    }

    /// Locks a migration and returns its state; `NotFound` if it does not exist.
    async fn lock_state(
        conn: &mut sqlx::PgConnection,
        id: i64,
    ) -> Result<(MigrationState, String)> {
        let (state, pool) = machine::lock_migration(conn, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("migration {id} does not exist")))?;
        let state =
            MigrationState::parse(&state).ok_or_else(|| corrupt("migration state", &state))?;
        Ok((state, pool))
    }

    pub(super) async fn cancel_once(&self, id: i64, reason: &str) -> Result<Effects> {
        let mut fx = Effects::default();
        let mut tx = self.db.begin().await?;
        let (state, _) = Self::lock_state(&mut tx, id).await?;
        if state.is_terminal() {
            return Err(Error::FailedPrecondition(format!(
                "migration {id} is already {state}; only queued or running migrations can be canceled"
            )));
        }
        let reason = if reason.is_empty() {
            "canceled by client"
        } else {
            reason
        };
        machine::abort_migration(&mut tx, id, MigrationState::Canceled, reason, &mut fx).await?;
        notify::commit(tx, &self.origin, &fx).await?;
        Ok(fx)
    }

    pub(super) async fn retry_once(&self, id: i64, by: &str) -> Result<Effects> {
        let mut fx = Effects::default();
        let mut tx = self.db.begin().await?;
        let (state, pool) = Self::lock_state(&mut tx, id).await?;
        if !matches!(state, MigrationState::Failed | MigrationState::Canceled) {
            return Err(Error::FailedPrecondition(format!(
                "migration {id} is {state}; only failed or canceled migrations can be retried"
            )));
        }
        let late: Option<i64> = sqlx::query_scalar(
            "SELECT stagecoach_now_ms() - deadline FROM migrations
             WHERE id = $1 AND deadline < stagecoach_now_ms()",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(late_ms) = late {
            return Err(retry_past_deadline(id, late_ms));
        }
        let requeued = sqlx::query(
            "UPDATE migrations SET state = 'queued', reason = '', finished_at = NULL,
                                   queued_at = stagecoach_now_ms()
             WHERE id = $1 AND state IN ('failed', 'canceled')
               -- I8: not while another run of the subject is unfinished (one
               -- that commits meanwhile trips the unique index instead)
               AND NOT EXISTS (SELECT 1 FROM migrations o WHERE o.subject = migrations.subject
                               AND o.state IN ('queued', 'running'))",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if requeued == 0 {
            return Err(Error::AlreadyExists(format!(
                "migration {id} cannot be retried while another migration of its subject is queued or running"
            )));
        }
        // Finished stages stay finished; the rest start over with a fresh
        // attempt budget, from the first unfinished stage.
        sqlx::query(
            "UPDATE tasks SET state = 'pending', failures = 0, expiries = 0, error = NULL, finished_at = NULL
             WHERE migration_id = $1 AND state IN ('failed', 'canceled')",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE stages SET state = 'pending', failed = 0, canceled = 0, started_at = NULL, finished_at = NULL
             WHERE migration_id = $1 AND state <> 'succeeded'",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let message = retried_message(by);
        event(
            &mut tx,
            id,
            EventKind::MigrationRetried,
            EventAt {
                message: &message,
                ..Default::default()
            },
        )
        .await?;
        fx.touch(id);
        machine::admit(&mut tx, &pool, &mut fx).await?;
        notify::commit(tx, &self.origin, &fx).await?;
        Ok(fx)
    }
}

/// Inserts a new migration, queued, with its MigrationCreated event and its
/// stages, all pending, in one statement, and returns its id. Unlocked:
/// nobody else sees the row before the transaction commits. The stages'
/// foreign key is checked at the end of the statement, when the row is in.
async fn insert_migration(conn: &mut sqlx::PgConnection, m: &NewMigration) -> Result<i64> {
    let stages = &m.plan.stages;
    let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    let serial: Vec<bool> = stages.iter().map(|s| s.serial).collect();
    let totals: Vec<i64> = stages.iter().map(|s| s.tasks.len() as i64).collect();
    let retry: Vec<_> = stages.iter().map(|s| s.retry.resolved()).collect();
    let column =
        |f: fn(&RetryPolicy) -> u32| -> Vec<i64> { retry.iter().map(|r| f(r) as i64).collect() };
    Ok(sqlx::query_scalar(
        "WITH created AS (
             INSERT INTO migrations (plan_name, plan_version, subject, parameters, pool, state,
                                     idempotency_key, deadline, created_at, queued_at)
             VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, stagecoach_now_ms(),
                     stagecoach_now_ms())
             RETURNING id),
         logged AS (
             INSERT INTO events (migration_id, at, kind, message)
             SELECT id, stagecoach_now_ms(), $8, $17 FROM created),
         staged AS (
             INSERT INTO stages (migration_id, idx, name, serial, state, total, max_attempts,
                                 initial_backoff_ms, max_backoff_ms, attempt_timeout_ms,
                                 heartbeat_timeout_ms)
             SELECT created.id, u.n - 1, u.name, u.serial, 'pending', u.total, u.attempts,
                    u.ib, u.mb, u.at, u.ht
             FROM created,
                  UNNEST($9::text[], $10::bool[], $11::bigint[], $12::bigint[], $13::bigint[],
                         $14::bigint[], $15::bigint[], $16::bigint[])
                  WITH ORDINALITY AS u(name, serial, total, attempts, ib, mb, at, ht, n))
         SELECT id FROM created",
    )
    .bind(&m.plan.name)
    .bind(m.plan.version as i64)
    .bind(&m.subject)
    .bind(m.parameters.to_string())
    .bind(&m.pool)
    .bind(&m.idempotency_key)
    .bind(m.deadline_ms)
    .bind(EventKind::MigrationCreated.as_str())
    .bind(&names)
    .bind(&serial)
    .bind(&totals)
    .bind(column(|r| r.max_attempts))
    .bind(column(|r| r.initial_backoff_ms))
    .bind(column(|r| r.max_backoff_ms))
    .bind(column(|r| r.attempt_timeout_ms))
    .bind(column(|r| r.heartbeat_timeout_ms))
    .bind(m.created_message())
    .fetch_one(conn)
    .await?)
}
