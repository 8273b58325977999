//! The SQLite backend: the embedded default, one file.
//!
//! One writer connection beside a pool of readers, WAL journal: SQLite
//! serialises writers anyway, and a single writer connection turns "database
//! is locked" retries into an orderly queue in the pool, while readers (get,
//! list, watch) never wait for it. Each transition is one transaction on the
//! writer; its precondition is in the `WHERE` of its updates.

mod bulk;
mod claim;
mod machine;
mod reads;
mod reports;
mod sweep;

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::clock::{now_ms, one_instant};
use crate::domain::{
    Assignment, Completion, Event, EventKind, Failure, HeartbeatOutcome, LeaseStatus, LeaseToken,
    Migration, MigrationFilter, MigrationState, NewMigration, PlanSpec, Pool, ReportAck,
    SweepReport, retried_message, shown,
};
use crate::error::{Error, Result};
use crate::store::common::{created_tasks, deadline_not_ahead, retry_past_deadline};
use crate::store::streams::{Clock, Streams};
use crate::store::{
    ClaimRequest, Created, Effects, LeasedTask, Limits, Pass, Report, Store, SubjectView,
    WorkerStreams,
};
use machine::{EventAt, event};

/// The SQLite store.
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    limits: Limits,
    contexts: claim::Contexts,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://path` or
    /// a plain path) and applies the schema migrations.
    pub async fn open(url: &str, limits: Limits) -> Result<Self> {
        let url = if url.starts_with("sqlite:") {
            url.to_string()
        } else {
            format!("sqlite://{url}")
        };
        let options = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a reply is sent only after what it acknowledges is on disk (I11).
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true)
            // 16 MiB of page cache per connection (the default is 2 MiB): the hot
            // task and event pages stay in memory instead of being re-read. Not
            // more: every commit walks the cache's hash table.
            .pragma("cache_size", "-16384")
            // Sorts and statement journals in memory, not temp files.
            .pragma("temp_store", "memory")
            // Batches make statements of many shapes (an IN list per batch
            // size); keep them all prepared.
            .statement_cache_capacity(1024);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self {
            writer,
            reader,
            limits,
            contexts: Default::default(),
        })
    }
}

/// The one result of a one-report batch.
fn single(mut results: Vec<Result<(ReportAck, Effects)>>) -> Result<(ReportAck, Effects)> {
    results
        .pop()
        .unwrap_or_else(|| Err(Error::Corrupt("a report batch returned no result".into())))
}

fn pool_not_found(name: &str) -> Error {
    Error::NotFound(format!(
        "pool {} does not exist; create it with AdminService/CreatePool or use \"default\"",
        shown(name)
    ))
}

#[async_trait]
impl Store for SqliteStore {
    async fn put_plan(&self, plan: &PlanSpec) -> Result<PlanSpec> {
        let mut tx = self.writer.begin().await?;
        let version: i64 =
            sqlx::query_scalar("SELECT coalesce(max(version), 0) + 1 FROM plans WHERE name = ?")
                .bind(&plan.name)
                .fetch_one(&mut *tx)
                .await?;
        let mut stored = plan.clone();
        stored.version = version as u32;
        let spec = serde_json::to_string(&stored).map_err(|e| Error::Corrupt(e.to_string()))?;
        sqlx::query("INSERT INTO plans (name, version, spec, created_at) VALUES (?, ?, ?, ?)")
            .bind(&plan.name)
            .bind(version)
            .bind(spec)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn get_plan(&self, name: &str) -> Result<Option<PlanSpec>> {
        reads::get_plan(&self.reader, name).await
    }

    async fn list_plans(&self, page: &crate::store::PlanPage) -> Result<crate::store::Plans> {
        reads::list_plans(&self.reader, page).await
    }

    async fn delete_plan(&self, name: &str) -> Result<u64> {
        let deleted = sqlx::query("DELETE FROM plans WHERE name = ?")
            .bind(name)
            .execute(&self.writer)
            .await?
            .rows_affected();
        Ok(deleted)
    }

    async fn ensure_pool(&self, name: &str, slots: u32) -> Result<()> {
        sqlx::query("INSERT INTO pools (name, slots) VALUES (?, ?) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(slots as i64)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn create_pool(&self, name: &str, slots: u32) -> Result<Pool> {
        let inserted = sqlx::query(
            "INSERT INTO pools (name, slots) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(slots as i64)
        .execute(&self.writer)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(Error::AlreadyExists(format!(
                "pool {name:?} already exists; change its size with SetPoolSlots"
            )));
        }
        reads::pool(&self.writer, name)
            .await?
            .ok_or_else(|| pool_not_found(name))
    }

    async fn set_pool_slots(&self, name: &str, slots: u32) -> Result<(Pool, Effects)> {
        one_instant(self.update_pool(
            name,
            "UPDATE pools SET slots = ? WHERE name = ?",
            slots as i64,
        ))
        .await
    }

    async fn set_pool_paused(&self, name: &str, paused: bool) -> Result<(Pool, Effects)> {
        one_instant(self.update_pool(
            name,
            "UPDATE pools SET paused = ? WHERE name = ?",
            paused as i64,
        ))
        .await
    }

    async fn list_pools(&self) -> Result<Vec<Pool>> {
        reads::list_pools(&self.reader).await
    }

    async fn gauges(&self) -> Result<crate::store::Gauges> {
        reads::gauges(&self.reader).await
    }

    async fn create_and_claim(
        &self,
        m: &NewMigration,
        requests: &[ClaimRequest],
    ) -> Result<(Created, Effects, Option<Pass>)> {
        one_instant(self.create(m, requests)).await
    }

    async fn get_migration(&self, id: i64) -> Result<Option<Migration>> {
        reads::migration(&self.reader, id).await
    }

    async fn list_migrations(&self, filter: &MigrationFilter) -> Result<Vec<Migration>> {
        reads::list_migrations(&self.reader, filter).await
    }

    async fn list_events(
        &self,
        migration_id: i64,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<Event>> {
        reads::list_events(&self.reader, migration_id, after_id, limit).await
    }

    async fn subject_status(&self, subject: &str) -> Result<SubjectView> {
        reads::subject_status(&self.reader, subject).await
    }

    async fn claim(
        &self,
        worker_id: &str,
        kinds: &[String],
        slots: u32,
    ) -> Result<Vec<Assignment>> {
        let request = ClaimRequest {
            worker_id: worker_id.to_string(),
            kinds: kinds.to_vec(),
            slots,
        };
        let mut pass = one_instant(claim::claim_many(
            &self.writer,
            &[request],
            self.limits,
            &self.contexts,
        ))
        .await?;
        Ok(pass.claimed.pop().unwrap_or_default())
    }

    async fn release(&self, worker_id: &str, lease: LeaseToken) -> Result<Effects> {
        one_instant(claim::release(&self.writer, worker_id, lease)).await
    }

    async fn heartbeat(&self, worker_id: &str, leases: &[LeaseStatus]) -> Result<HeartbeatOutcome> {
        one_instant(claim::heartbeat(
            &self.writer,
            worker_id,
            leases,
            self.limits,
        ))
        .await
    }

    async fn complete(&self, worker_id: &str, c: &Completion) -> Result<(ReportAck, Effects)> {
        let report = [(worker_id.to_string(), Report::Complete(c.clone()))];
        single(self.report_many(&report).await?)
    }

    async fn fail(&self, worker_id: &str, f: &Failure) -> Result<(ReportAck, Effects)> {
        let report = [(worker_id.to_string(), Report::Fail(f.clone()))];
        single(self.report_many(&report).await?)
    }

    async fn cancel_migration(&self, id: i64, reason: &str) -> Result<Effects> {
        one_instant(self.cancel(id, reason)).await
    }

    async fn retry_migration_by(&self, id: i64, by: &str) -> Result<Effects> {
        one_instant(self.retry(id, by)).await
    }

    async fn claim_many(&self, requests: &[ClaimRequest]) -> Result<Pass> {
        one_instant(claim::claim_many(
            &self.writer,
            requests,
            self.limits,
            &self.contexts,
        ))
        .await
    }

    async fn report_and_claim(
        &self,
        reports: &[(String, Report)],
        requests: &[ClaimRequest],
    ) -> Result<(Vec<Result<(ReportAck, Effects)>>, Option<Pass>)> {
        one_instant(async {
            let mut tx = self.writer.begin().await?;
            let results = reports::record(&mut tx, reports, self.limits).await?;
            let pass = claim::claim_in(&mut tx, requests, self.limits, &self.contexts).await?;
            tx.commit().await?;
            Ok((results, Some(pass)))
        })
        .await
    }

    async fn report_many(
        &self,
        reports: &[(String, Report)],
    ) -> Result<Vec<Result<(ReportAck, Effects)>>> {
        one_instant(reports::report_many(&self.writer, reports, self.limits)).await
    }

    async fn sweep(&self) -> Result<(SweepReport, Effects)> {
        one_instant(sweep::sweep(&self.writer, self.limits)).await
    }

    async fn live_leases(&self, worker_id: &str) -> Result<Vec<LeaseToken>> {
        reads::live_leases(&self.reader, worker_id).await
    }

    fn worker_streams(&self) -> Box<dyn WorkerStreams + '_> {
        Box::new(Streams {
            db: &self.writer,
            clock: Clock::Bound,
        })
    }

    async fn leased_tasks(&self, migration_id: i64, limit: u32) -> Result<Vec<LeasedTask>> {
        reads::leased_tasks(&self.reader, migration_id, limit).await
    }
}

impl SqliteStore {
    async fn cancel(&self, id: i64, reason: &str) -> Result<Effects> {
        let mut fx = Effects::default();
        let mut tx = self.writer.begin().await?;
        let state = reads::migration_state(&mut tx, id).await?;
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
        tx.commit().await?;
        Ok(fx)
    }

    async fn retry(&self, id: i64, by: &str) -> Result<Effects> {
        let mut fx = Effects::default();
        let mut tx = self.writer.begin().await?;
        let state = reads::migration_state(&mut tx, id).await?;
        if !matches!(state, MigrationState::Failed | MigrationState::Canceled) {
            return Err(Error::FailedPrecondition(format!(
                "migration {id} is {state}; only failed or canceled migrations can be retried"
            )));
        }
        let late: Option<i64> = sqlx::query_scalar(
            "SELECT ?1 - deadline FROM migrations WHERE id = ?2 AND deadline < ?1",
        )
        .bind(now_ms())
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(late_ms) = late {
            return Err(retry_past_deadline(id, late_ms));
        }
        let requeued = sqlx::query(
            "UPDATE migrations SET state = 'queued', reason = '', finished_at = NULL, queued_at = ?
             WHERE id = ? AND state IN ('failed', 'canceled')
               -- I8: not while another run of the subject is unfinished
               AND NOT EXISTS (SELECT 1 FROM migrations o WHERE o.subject = migrations.subject
                               AND o.state IN ('queued', 'running'))",
        )
        .bind(now_ms())
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
             WHERE migration_id = ? AND state IN ('failed', 'canceled')",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE stages SET state = 'pending', failed = 0, canceled = 0, started_at = NULL, finished_at = NULL
             WHERE migration_id = ? AND state != 'succeeded'",
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
        let pool: String = sqlx::query_scalar("SELECT pool FROM migrations WHERE id = ?")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        machine::admit(&mut tx, &pool, &mut fx).await?;
        tx.commit().await?;
        Ok(fx)
    }

    /// Creates a migration and, when it was admitted, claims for `requests`
    /// in the same transaction.
    async fn create(
        &self,
        m: &NewMigration,
        requests: &[ClaimRequest],
    ) -> Result<(Created, Effects, Option<Pass>)> {
        let mut fx = Effects::default();
        let mut tx = self.writer.begin().await?;
        if let Some(key) = &m.idempotency_key {
            let existing: Option<i64> =
                sqlx::query_scalar("SELECT id FROM migrations WHERE idempotency_key = ?")
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(id) = existing {
                return Ok((
                    Created {
                        migration_id: id,
                        created: false,
                    },
                    fx,
                    None,
                ));
            }
        }
        let pool_exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM pools WHERE name = ?")
            .bind(&m.pool)
            .fetch_optional(&mut *tx)
            .await?;
        if pool_exists.is_none() {
            return Err(pool_not_found(&m.pool));
        }
        // I10: a deadline that has passed would fail the migration before
        // it did anything; the caller is told instead (after the
        // idempotency lookup, so a repeated create still finds its run).
        if let Some(deadline) = m.deadline_ms
            && deadline < now_ms()
        {
            return Err(deadline_not_ahead(now_ms() - deadline));
        }
        let busy: Option<(i64, String)> = sqlx::query_as(
            "SELECT id, state FROM migrations WHERE subject = ? AND state IN ('queued', 'running')",
        )
        .bind(&m.subject)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((id, state)) = busy {
            return Err(Error::AlreadyExists(format!(
                "subject {:?} already has an unfinished migration: {id} is {state}; wait for it, or cancel it first",
                m.subject
            )));
        }
        let now = now_ms();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO migrations (plan_name, plan_version, subject, parameters, pool, state,
                                     idempotency_key, deadline, created_at, queued_at)
             VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?) RETURNING id",
        )
        .bind(&m.plan.name)
        .bind(m.plan.version as i64)
        .bind(&m.subject)
        .bind(m.parameters.to_string())
        .bind(&m.pool)
        .bind(&m.idempotency_key)
        .bind(m.deadline_ms)
        .bind(now)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        for (idx, stage) in m.plan.stages.iter().enumerate() {
            let retry = stage.retry.resolved();
            sqlx::query(
                "INSERT INTO stages (migration_id, idx, name, serial, state, total, max_attempts,
                                     initial_backoff_ms, max_backoff_ms, attempt_timeout_ms,
                                     heartbeat_timeout_ms)
                 VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(idx as i64)
            .bind(&stage.name)
            .bind(stage.serial)
            .bind(stage.tasks.len() as i64)
            .bind(retry.max_attempts as i64)
            .bind(retry.initial_backoff_ms as i64)
            .bind(retry.max_backoff_ms as i64)
            .bind(retry.attempt_timeout_ms as i64)
            .bind(retry.heartbeat_timeout_ms as i64)
            .execute(&mut *tx)
            .await?;
        }
        event(
            &mut tx,
            id,
            EventKind::MigrationCreated,
            EventAt {
                message: &m.created_message(),
                ..Default::default()
            },
        )
        .await?;
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
        let pass = if fx.dispatch && !requests.is_empty() {
            Some(claim::claim_in(&mut tx, requests, self.limits, &self.contexts).await?)
        } else {
            None
        };
        tx.commit().await?;
        let created = Created {
            migration_id: id,
            created: true,
        };
        Ok((created, fx, pass))
    }

    async fn update_pool(
        &self,
        name: &str,
        sql: &'static str,
        value: i64,
    ) -> Result<(Pool, Effects)> {
        let mut fx = Effects::default();
        let mut tx = self.writer.begin().await?;
        let changed = sqlx::query(sql)
            .bind(value)
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if changed == 0 {
            return Err(pool_not_found(name));
        }
        machine::admit(&mut tx, name, &mut fx).await?;
        tx.commit().await?;
        let pool = reads::pool(&self.writer, name)
            .await?
            .ok_or_else(|| pool_not_found(name))?;
        Ok((pool, fx))
    }
}
