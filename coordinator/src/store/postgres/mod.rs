//! The PostgreSQL backend: several coordinators share one database.
//!
//! Same schema, same transitions, same events and errors as the SQLite store
//! (the reference); what differs is that other coordinators run the very
//! same transitions at the same moment. Every transaction is therefore safe
//! against concurrent copies of itself, and finds out what others did from
//! the database alone:
//!
//! - **One clock.** Every time is `stagecoach_now_ms()`, the database's
//!   clock, evaluated inside the statements (docs/design.md, "Leases and time"): the
//!   start of the transaction (migration 0012), so a transition's checks
//!   against time (a deadline, I10) and the times it writes are one instant.
//! - **The migration row lock** (`FOR NO KEY UPDATE`) guards everything of
//!   one migration: its stages, its tasks' transitions, its events. Reports,
//!   cancel, retry, the sweeper and claims take it before they touch the
//!   migration, so two last-task completions cannot both start the next
//!   stage (I1, I2), and one migration's event ids become visible in id order
//!   (the `WatchMigration` cursor never skips an event that commits late).
//! - **The pool row lock** serialises admission into a pool (I3).
//! - **A per-worker advisory lock** serialises one worker id's claims, even
//!   from two coordinators (I12).
//! - **`FOR UPDATE SKIP LOCKED`** on task rows in claims (I4: a task is
//!   leased once) and in the sweeper, which also skips migrations another
//!   coordinator is sweeping.
//! - **Lock order**: workers → migrations (ascending id) → pool → tasks. A
//!   transaction that would have to wait against that order skips the row
//!   instead (admission of a held queued migration, claim rounds after the
//!   first, a create's worker locks, the sweeper, heartbeats' task rows), so
//!   coordinators never deadlock one another. Should PostgreSQL still abort a
//!   transaction as a deadlock or serialisation failure, [`transact`] runs it
//!   again from the start.
//! - **`NOTIFY`** in every transition's transaction carries its [`Effects`]
//!   to the other coordinators ([`notify`]).
//!
//! The partial unique index of I8 is the last word when two coordinators
//! create a migration for one subject at once: the loser's transaction is run
//! again, finds the winner, and answers exactly as the SQLite store would.

mod bulk;
mod claim;
mod lifecycle;
mod machine;
mod notify;
mod pass;
mod reads;
mod reports;
mod sweep;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::domain::{
    Assignment, Completion, Event, Failure, HeartbeatOutcome, LeaseStatus, LeaseToken, Migration,
    MigrationFilter, NewMigration, PlanSpec, Pool, ReportAck, SweepReport, shown,
};
use crate::error::{Error, Result};
use crate::store::common::plain_completions;
use crate::store::streams::{Clock, Streams};
use crate::store::{
    ClaimRequest, Created, Effects, LeasedTask, Limits, Pass, Report, Store, SubjectView,
    WorkerStreams,
};

/// Advisory-lock namespace of plan names: versions of one plan are numbered
/// one after another.
const PLAN_LOCK: i32 = 0x5C_02;

/// How often [`transact`] runs a transition PostgreSQL aborted for a conflict.
const ATTEMPTS: u32 = 5;

/// Tasks one transition inserts that make the store refresh the planner's
/// statistics of `tasks` at once (see [`PostgresStore::refresh_statistics`]).
const ANALYZE_AFTER: usize = 10_000;

/// How long a pooled connection may sit idle before it is pinged on
/// acquire: one that was just used is live, or fails its first statement
/// like any connection that drops mid-use.
const PING_AFTER_IDLE: Duration = Duration::from_secs(5);

/// The PostgreSQL store.
pub struct PostgresStore {
    db: PgPool,
    options: PgConnectOptions,
    limits: Limits,
    /// Tags this store's notifications, so it skips its own.
    origin: String,
    /// An `ANALYZE tasks` of this store is running.
    analyzing: Arc<AtomicBool>,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://…` or `postgresql://…`) and applies the
    /// schema migrations (sqlx serialises concurrent migrators with an
    /// advisory lock, so coordinators may start together).
    pub async fn open(url: &str, limits: Limits) -> Result<Self> {
        let options = PgConnectOptions::from_str(url)?
            .application_name("stagecoach-coordinator")
            .options([
                // A coordinator that stalls inside a transaction (stopped,
                // partitioned) must not hold its row locks for ever: the
                // server ends such a session and the others carry on.
                ("idle_in_transaction_session_timeout", "60s"),
                // Nothing waits for a lock this long in a healthy system;
                // fail loudly instead of hanging.
                ("lock_timeout", "60s"),
            ]);
        let db = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(30))
            // A connection is pinged before use only after it sat idle a
            // while (a server restart or a proxy may have closed it
            // meanwhile): sqlx's default pings on every acquire, a round
            // trip added to every transaction of the hot path.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_AFTER_IDLE {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&db).await?;
        Ok(Self {
            db,
            options,
            limits,
            origin: format!("{:016x}", rand::random::<u64>()),
            analyzing: Arc::default(),
        })
    }

    /// After a transition inserted `inserted` tasks: when they are many,
    /// `ANALYZE tasks` in the background. Autovacuum would, within a minute
    /// or so; until then the planner believes the table holds what it held
    /// before — often nothing — and plans claims and completions to walk
    /// every task of the new migration. ANALYZE samples a fixed number of
    /// rows and blocks no reader or writer.
    fn refresh_statistics(&self, inserted: usize) {
        if inserted < ANALYZE_AFTER || self.analyzing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (db, analyzing) = (self.db.clone(), self.analyzing.clone());
        tokio::spawn(async move {
            if let Err(e) = sqlx::query("ANALYZE tasks").execute(&db).await {
                tracing::warn!(error = %e, "refreshing the statistics of tasks failed; autovacuum will");
            }
            analyzing.store(false, Ordering::Release);
        });
    }
}

fn pool_not_found(name: &str) -> Error {
    Error::NotFound(format!(
        "pool {} does not exist; create it with AdminService/CreatePool or use \"default\"",
        shown(name)
    ))
}

/// The SQLSTATE of a database error, if it is one.
fn sqlstate(e: &Error) -> Option<(Cow<'_, str>, Option<&str>)> {
    match e {
        Error::Database(sqlx::Error::Database(db)) => Some((db.code()?, db.constraint())),
        _ => None,
    }
}

/// Conflicts a fresh run of the transaction resolves.
fn conflict(e: &Error) -> bool {
    match sqlstate(e) {
        // deadlock_detected, serialization_failure
        Some((code, _)) if code == "40P01" || code == "40001" => true,
        // I8 and idempotency keys: another coordinator created (or retried)
        // the same subject or key and committed first. Run again, the checks
        // before the insert find it and answer as they always do.
        Some((code, Some(constraint))) if code == "23505" => matches!(
            constraint,
            "migrations_one_unfinished_per_subject" | "migrations_idempotency_key"
        ),
        _ => false,
    }
}

/// Errors that are the request's fault, said so.
fn explain(e: Error) -> Error {
    match sqlstate(&e) {
        // character_not_in_repertoire: PostgreSQL text cannot hold NUL. The
        // gRPC edge refuses NUL in every field by name (`grpc::text`); this
        // is the last line of defence, for a caller of the store that skipped it.
        Some((code, _)) if code == "22021" => Error::invalid(
            "request",
            "a string contains a NUL character (\\0), which PostgreSQL cannot store; remove it",
        ),
        Some((code, Some("migrations_one_unfinished_per_subject"))) if code == "23505" => {
            Error::AlreadyExists(
                "the subject already has an unfinished migration; wait for it, or cancel it first"
                    .into(),
            )
        }
        _ => e,
    }
}

/// Runs one transition (a closure that opens, and commits, its own
/// transactions) and runs it again when PostgreSQL aborted it for a conflict
/// with a concurrent transaction. A transition's effects count only from the
/// run that committed, so nothing is applied twice.
pub(super) async fn transact<T, F, Fut>(what: &'static str, mut run: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        match run().await {
            Err(e) if attempt < ATTEMPTS && conflict(&e) => {
                tracing::debug!(transition = what, attempt, error = %e, "conflict; running again");
                attempt += 1;
            }
            result => return result.map_err(explain),
        }
    }
}

/// Adds `more` to `fx`.
pub(super) fn merge(fx: &mut Effects, more: Effects) {
    fx.touched.extend(more.touched);
    fx.revoked.extend(more.revoked);
    fx.dispatch |= more.dispatch;
    fx.lost.extend(more.lost);
    fx.counted.add(more.counted);
}

/// Text a worker or client sent that the store writes as is: PostgreSQL
/// cannot store NUL, so it becomes U+FFFD instead of failing the report.
/// Requests never get here with one (the gRPC edge refuses NUL in every
/// field); this only keeps a direct caller of the store from failing.
fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn put_plan(&self, plan: &PlanSpec) -> Result<PlanSpec> {
        transact("put_plan", || self.put_plan_once(plan)).await
    }

    async fn get_plan(&self, name: &str) -> Result<Option<PlanSpec>> {
        reads::get_plan(&self.db, name).await
    }

    async fn list_plans(&self, page: &crate::store::PlanPage) -> Result<crate::store::Plans> {
        reads::list_plans(&self.db, page).await
    }

    async fn delete_plan(&self, name: &str) -> Result<u64> {
        // One statement, no row of another table involved: outside the
        // lock order, and nothing to retry.
        let deleted = sqlx::query("DELETE FROM plans WHERE name = $1")
            .bind(name)
            .execute(&self.db)
            .await?
            .rows_affected();
        Ok(deleted)
    }

    async fn ensure_pool(&self, name: &str, slots: u32) -> Result<()> {
        sqlx::query(
            "INSERT INTO pools (name, slots) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(slots as i64)
        .execute(&self.db)
        .await?;
        Ok(())
    }

    async fn create_pool(&self, name: &str, slots: u32) -> Result<Pool> {
        let inserted = sqlx::query(
            "INSERT INTO pools (name, slots) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(slots as i64)
        .execute(&self.db)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(Error::AlreadyExists(format!(
                "pool {name:?} already exists; change its size with SetPoolSlots"
            )));
        }
        reads::pool(&self.db, name)
            .await?
            .ok_or_else(|| pool_not_found(name))
    }

    async fn set_pool_slots(&self, name: &str, slots: u32) -> Result<(Pool, Effects)> {
        transact("set_pool_slots", || {
            self.update_pool(name, PoolChange::Slots(slots as i64))
        })
        .await
    }

    async fn set_pool_paused(&self, name: &str, paused: bool) -> Result<(Pool, Effects)> {
        transact("set_pool_paused", || {
            self.update_pool(name, PoolChange::Paused(paused))
        })
        .await
    }

    async fn list_pools(&self) -> Result<Vec<Pool>> {
        reads::list_pools(&self.db).await
    }

    async fn gauges(&self) -> Result<crate::store::Gauges> {
        reads::gauges(&self.db).await
    }

    async fn create_and_claim(
        &self,
        m: &NewMigration,
        requests: &[ClaimRequest],
    ) -> Result<(Created, Effects, Option<Pass>)> {
        let done = transact("create_migration", || self.create_once(m, requests)).await?;
        if done.0.created {
            self.refresh_statistics(m.plan.stages.iter().map(|s| s.tasks.len()).sum());
        }
        Ok(done)
    }

    async fn get_migration(&self, id: i64) -> Result<Option<Migration>> {
        reads::migration(&self.db, id).await
    }

    async fn list_migrations(&self, filter: &MigrationFilter) -> Result<Vec<Migration>> {
        reads::list_migrations(&self.db, filter).await
    }

    async fn list_events(
        &self,
        migration_id: i64,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<Event>> {
        reads::list_events(&self.db, migration_id, after_id, limit).await
    }

    async fn subject_status(&self, subject: &str) -> Result<SubjectView> {
        reads::subject_status(&self.db, subject).await
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
        let mut pass = self.claim_many(std::slice::from_ref(&request)).await?;
        Ok(pass.claimed.pop().unwrap_or_default())
    }

    async fn claim_many(&self, requests: &[ClaimRequest]) -> Result<Pass> {
        transact("claim", || {
            claim::claim_many(&self.db, &self.origin, requests, self.limits)
        })
        .await
    }

    async fn release(&self, worker_id: &str, lease: LeaseToken) -> Result<Effects> {
        transact("release", || {
            reports::release(&self.db, &self.origin, worker_id, lease)
        })
        .await
    }

    async fn heartbeat(&self, worker_id: &str, leases: &[LeaseStatus]) -> Result<HeartbeatOutcome> {
        transact("heartbeat", || {
            reports::heartbeat(&self.db, worker_id, leases, self.limits)
        })
        .await
    }

    async fn complete(&self, worker_id: &str, c: &Completion) -> Result<(ReportAck, Effects)> {
        let done = transact("complete", || {
            reports::complete(&self.db, &self.origin, worker_id, c, self.limits)
        })
        .await?;
        if done.0 == ReportAck::Recorded {
            self.refresh_statistics(c.add_tasks.len());
        }
        Ok(done)
    }

    async fn fail(&self, worker_id: &str, f: &Failure) -> Result<(ReportAck, Effects)> {
        let f = Failure {
            error: storable(&f.error).into_owned(),
            ..f.clone()
        };
        transact("fail", || {
            reports::fail(&self.db, &self.origin, worker_id, &f)
        })
        .await
    }

    async fn report_many(
        &self,
        reports: &[(String, Report)],
    ) -> Result<Vec<Result<(ReportAck, Effects)>>> {
        Ok(self.report_and_claim(reports, &[]).await?.0)
    }

    async fn report_and_claim(
        &self,
        reports: &[(String, Report)],
        requests: &[ClaimRequest],
    ) -> Result<(Vec<Result<(ReportAck, Effects)>>, Option<Pass>)> {
        // Failures and fan-out first, one by one, each in its own
        // transaction, so the pass below sees the slots they free.
        let plain = plain_completions(reports);
        let is_plain: HashSet<usize> = plain.iter().map(|p| p.0).collect();
        let mut early: HashMap<usize, Result<(ReportAck, Effects)>> = HashMap::new();
        for (i, (worker_id, report)) in reports.iter().enumerate() {
            if !is_plain.contains(&i) {
                early.insert(i, self.report_one(worker_id, report).await);
            }
        }
        // Then the plain completions of live leases set at a time, and the
        // pass, in one transaction.
        let committed = transact("report_and_claim", || {
            pass::report_and_claim(&self.db, &self.origin, &plain, requests, self.limits)
        })
        .await;
        let (mut done, pass) = match committed {
            Ok((done, pass)) => (done, Some(pass)),
            Err(e) if early.is_empty() => return Err(e),
            Err(e) => {
                // The one-by-one reports are recorded; these are not.
                for &(i, _, _) in &plain {
                    early.insert(
                        i,
                        Err(Error::NotRecorded(format!("the database failed ({e})"))),
                    );
                }
                (HashMap::new(), None)
            }
        };
        // Stale or repeated completions: the one-by-one path answers them.
        let mut out = Vec::with_capacity(reports.len());
        for (i, (worker_id, report)) in reports.iter().enumerate() {
            out.push(match (early.remove(&i), done.remove(&i)) {
                (Some(result), _) => result,
                (None, Some(recorded)) => Ok(recorded),
                (None, None) => self.report_one(worker_id, report).await,
            });
        }
        Ok((out, pass))
    }

    async fn cancel_migration(&self, id: i64, reason: &str) -> Result<Effects> {
        let reason = storable(reason);
        transact("cancel_migration", || self.cancel_once(id, &reason)).await
    }

    async fn retry_migration_by(&self, id: i64, by: &str) -> Result<Effects> {
        transact("retry_migration", || self.retry_once(id, by)).await
    }

    async fn sweep(&self) -> Result<(SweepReport, Effects)> {
        // Transacts each migration by itself: see `sweep`.
        sweep::sweep(&self.db, &self.origin, self.limits).await
    }

    async fn live_leases(&self, worker_id: &str) -> Result<Vec<LeaseToken>> {
        reads::live_leases(&self.db, worker_id).await
    }

    fn worker_streams(&self) -> Box<dyn WorkerStreams + '_> {
        Box::new(Streams {
            db: &self.db,
            clock: Clock::Database,
        })
    }

    async fn leased_tasks(&self, migration_id: i64, limit: u32) -> Result<Vec<LeasedTask>> {
        reads::leased_tasks(&self.db, migration_id, limit).await
    }

    /// Effects other coordinators commit, from `LISTEN stagecoach_effects`.
    async fn remote_effects(&self) -> Result<Option<UnboundedReceiver<Effects>>> {
        Ok(Some(
            notify::listen(self.options.clone(), self.origin.clone()).await?,
        ))
    }
}

impl PostgresStore {
    /// One report in transactions of its own.
    async fn report_one(&self, worker_id: &str, report: &Report) -> Result<(ReportAck, Effects)> {
        match report {
            Report::Complete(c) => self.complete(worker_id, c).await,
            Report::Fail(f) => self.fail(worker_id, f).await,
        }
    }
}

/// What `update_pool` changes.
#[derive(Clone, Copy)]
enum PoolChange {
    Slots(i64),
    Paused(bool),
}

impl PostgresStore {
    async fn put_plan_once(&self, plan: &PlanSpec) -> Result<PlanSpec> {
        let mut tx = self.db.begin().await?;
        // Two coordinators storing the same plan would both pick the next
        // version number; the second waits here and picks the one after.
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(PLAN_LOCK)
            .bind(&plan.name)
            .execute(&mut *tx)
            .await?;
        let version: i64 =
            sqlx::query_scalar("SELECT coalesce(max(version), 0) + 1 FROM plans WHERE name = $1")
                .bind(&plan.name)
                .fetch_one(&mut *tx)
                .await?;
        let mut stored = plan.clone();
        stored.version = version as u32;
        let spec = serde_json::to_string(&stored).map_err(|e| Error::Corrupt(e.to_string()))?;
        sqlx::query(
            "INSERT INTO plans (name, version, spec, created_at)
             VALUES ($1, $2, $3, stagecoach_now_ms())",
        )
        .bind(&plan.name)
        .bind(version)
        .bind(spec)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn update_pool(&self, name: &str, change: PoolChange) -> Result<(Pool, Effects)> {
        let mut fx = Effects::default();
        let mut tx = self.db.begin().await?;
        // The UPDATE takes the pool row lock that admission takes, too.
        let update = match change {
            PoolChange::Slots(slots) => {
                sqlx::query("UPDATE pools SET slots = $1 WHERE name = $2").bind(slots)
            }
            PoolChange::Paused(paused) => {
                sqlx::query("UPDATE pools SET paused = $1 WHERE name = $2").bind(paused)
            }
        };
        let changed = update.bind(name).execute(&mut *tx).await?.rows_affected();
        if changed == 0 {
            return Err(pool_not_found(name));
        }
        machine::admit(&mut tx, name, &mut fx).await?;
        notify::commit(tx, &self.origin, &fx).await?;
        let pool = reads::pool(&self.db, name)
            .await?
            .ok_or_else(|| pool_not_found(name))?;
        Ok((pool, fx))
    }
}
