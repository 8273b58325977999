//! Persistence: one [`Store`] trait, one file per backend.
//!
//! Every state change is one store method and one transaction whose SQL
//! checks its precondition (state and fencing token), so correctness never
//! depends on in-memory state and the coordinator can be killed at any
//! instant. Each method returns the [`Effects`] the caller must act on after
//! the commit (wake the dispatcher, tell watchers, send cancel notices) — the
//! reply to a client or worker is sent only after the commit (I11).

mod common;
mod gauges;
mod postgres;
mod sqlite;
mod streams;

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::{
    Assignment, Completion, Event, Failure, HeartbeatOutcome, LeaseSecret, LeaseStatus, LeaseToken,
    Migration, MigrationFilter, NewMigration, PlanSpec, Pool, ReportAck, Revoked, SubjectStatus,
    SweepReport,
};
use crate::error::Result;

pub use gauges::Gauges;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;
pub use streams::{HeldStream, StreamClaim, WorkerStreams};

/// Opens the store a database URL names: `postgres://…` or `postgresql://…`
/// for PostgreSQL (shared by several coordinators), anything else — a
/// `sqlite://` URL or a plain path — for SQLite.
pub async fn open(url: &str, limits: Limits) -> Result<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::open(url, limits).await?))
    } else {
        Ok(Arc::new(SqliteStore::open(url, limits).await?))
    }
}

/// What a committed transition means for the rest of the coordinator.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Effects {
    /// Migrations whose state, progress or events changed.
    pub touched: BTreeSet<i64>,
    /// Leases that were taken away and whose workers must be told to stop.
    pub revoked: Vec<Revoked>,
    /// True when tasks became ready or worker slots freed: dispatch again.
    pub dispatch: bool,
    /// Workers whose leases expired in this transition (the sweeper's). The
    /// coordinator holding such a worker's stream gives it no new work
    /// until it hears a heartbeat from it after this (the registry); sent
    /// to the other coordinators with the rest, as any of them may sweep.
    /// Absent from notices of older coordinators, hence the default.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub lost: BTreeSet<String>,
    /// What the transition did that `/metrics` counts. Never sent to the
    /// other coordinators: each counts the transitions it committed, so a
    /// sum over the coordinators counts each once.
    #[serde(skip)]
    pub counted: Counted,
}

impl Effects {
    pub(crate) fn touch(&mut self, migration_id: i64) {
        self.touched.insert(migration_id);
    }
}

/// Events of a transition that are counted per process (`crate::metrics`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Counted {
    /// Failed attempts whose task will run again (TaskRetrying).
    pub retries: u32,
    /// Tasks that died (TaskDead), by a report or a sweep.
    pub dead: u32,
    /// How long each stage that succeeded ran, in milliseconds of the
    /// database clock (`finished_at - started_at`).
    pub stages_ms: Vec<i64>,
}

impl Counted {
    /// Adds `more` to these counts.
    pub fn add(&mut self, more: Counted) {
        self.retries += more.retries;
        self.dead += more.dead;
        self.stages_ms.extend(more.stages_ms);
    }
}

/// Timing and limits the store applies; taken from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a lease lasts after it is granted or renewed, unless its
    /// stage or task sets a heartbeat timeout of its own.
    pub lease_ms: i64,
    /// How often workers send heartbeats: a heartbeat timeout must be at
    /// least twice this.
    pub heartbeat_interval_ms: i64,
    /// Lease expiries a task survives: it is assigned at most
    /// `max_reassignments + 1` times by expiry, and the expiry after the
    /// last of those makes it dead (0: the first expiry does).
    pub max_reassignments: u32,
}

impl Limits {
    /// The shortest heartbeat timeout a stage or task may set.
    pub fn min_heartbeat_timeout_ms(&self) -> u32 {
        (2 * self.heartbeat_interval_ms).clamp(0, u32::MAX as i64) as u32
    }
}

/// The created (or found) migration and whether this call created it.
#[derive(Debug, Clone)]
pub struct Created {
    pub migration_id: i64,
    pub created: bool,
}

/// A worker's report of one attempt's outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    Complete(Completion),
    Fail(Failure),
}

impl Report {
    /// The lease the report names.
    pub fn lease(&self) -> LeaseToken {
        match self {
            Report::Complete(c) => c.lease,
            Report::Fail(f) => f.lease,
        }
    }

    /// The lease secret the report gives.
    pub fn secret(&self) -> LeaseSecret {
        match self {
            Report::Complete(c) => c.secret,
            Report::Fail(f) => f.secret,
        }
    }
}

/// One worker's claim in a dispatch pass.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimRequest {
    pub worker_id: String,
    pub kinds: Vec<String>,
    pub slots: u32,
}

/// What a dispatch pass handed out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pass {
    /// Each request's assignments, in request order.
    pub claimed: Vec<Vec<Assignment>>,
    /// The pass left ready work it could not reach (rows another
    /// transaction held at that moment): the dispatcher must run again.
    pub partial: bool,
}

/// One page of ListPlans: latest versions by name (byte order), after
/// `after` (keyset paging: a plan stored or deleted between pages neither
/// shifts nor repeats the others).
#[derive(Debug, Clone, Default)]
pub struct PlanPage {
    /// The last name of the previous page; `None` for the first page.
    pub after: Option<String>,
    /// Most plans to return.
    pub limit: u32,
    /// Keep each stage's tasks; without it every `tasks` is empty, so a page
    /// of plans with 100,000 tasks each stays small.
    pub include_tasks: bool,
    /// The page ends early once its plans hold about this many bytes (at
    /// least one plan is always returned), so a reply stays under what
    /// clients decode by default (4 MiB).
    pub max_bytes: usize,
}

/// What [`Store::list_plans`] returns.
#[derive(Debug, Clone, Default)]
pub struct Plans {
    pub plans: Vec<PlanSpec>,
    /// Whether plans follow the last one.
    pub more: bool,
}

impl PlanPage {
    /// Reads a page from `rows` (stored specs by name, at least `limit + 1`
    /// of them if there are), one spec at a time: without tasks a page never
    /// holds a whole large plan.
    pub(crate) async fn collect<S>(&self, mut rows: S) -> Result<Plans>
    where
        S: futures::Stream<Item = Result<String, sqlx::Error>> + Unpin,
    {
        use futures::TryStreamExt;
        let mut page = Plans::default();
        let mut bytes = 0;
        while let Some(spec) = rows.try_next().await? {
            if page.plans.len() >= self.limit as usize
                || (!page.plans.is_empty() && bytes >= self.max_bytes)
            {
                page.more = true;
                break;
            }
            let plan = self.decode(&spec).map_err(|e| {
                crate::error::Error::Corrupt(format!("stored plan: {e}; DeletePlan removes it"))
            })?;
            bytes += if self.include_tasks {
                spec.len()
            } else {
                plan.name.len()
                    + plan.description.len()
                    + plan.stages.iter().map(|s| s.name.len() + 64).sum::<usize>()
            };
            page.plans.push(plan);
        }
        Ok(page)
    }

    /// A stored spec as this page returns it. Without tasks they are
    /// skipped while parsing, never built: a page of plans with 100,000
    /// tasks each costs a scan of the text, not 100,000 allocations each.
    fn decode(&self, spec: &str) -> serde_json::Result<PlanSpec> {
        if self.include_tasks {
            return serde_json::from_str(spec);
        }
        #[derive(serde::Deserialize)]
        struct Head {
            name: String,
            #[serde(default)]
            version: u32,
            #[serde(default)]
            description: String,
            #[serde(default)]
            stages: Vec<StageHead>,
        }
        #[derive(serde::Deserialize)]
        struct StageHead {
            name: String,
            #[serde(default)]
            serial: bool,
            #[serde(default)]
            dynamic: bool,
            #[serde(default, rename = "tasks")]
            _tasks: serde::de::IgnoredAny,
            #[serde(default)]
            retry: crate::domain::RetryPolicy,
        }
        let head: Head = serde_json::from_str(spec)?;
        Ok(PlanSpec {
            name: head.name,
            version: head.version,
            description: head.description,
            stages: head
                .stages
                .into_iter()
                .map(|s| crate::domain::StageSpec {
                    name: s.name,
                    serial: s.serial,
                    dynamic: s.dynamic,
                    tasks: Vec::new(),
                    retry: s.retry,
                })
                .collect(),
        })
    }
}

/// Subject status with the latest and the latest successful migration.
#[derive(Debug, Clone)]
pub struct SubjectView {
    pub status: SubjectStatus,
    pub latest: Option<Migration>,
    pub last_succeeded: Option<Migration>,
}

/// A task under lease, with its worker's last reported progress (for the
/// dashboard's view of one migration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedTask {
    pub lease: LeaseToken,
    pub stage_index: u32,
    pub kind: String,
    pub worker_id: String,
    /// Progress from the last heartbeat (0 of 0 before the first).
    pub done: u64,
    pub total: u64,
    pub lease_expires_at_ms: Option<i64>,
}

/// The store interface. Mutating methods name the invariant they keep.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a new version of a plan (validated by the caller).
    async fn put_plan(&self, plan: &PlanSpec) -> Result<PlanSpec>;
    /// The latest version of a plan.
    async fn get_plan(&self, name: &str) -> Result<Option<PlanSpec>>;
    /// A page of the latest version of every plan, by name.
    async fn list_plans(&self, page: &PlanPage) -> Result<Plans>;
    /// Deletes every version of a plan; how many there were (0: none, the
    /// name is unknown). Migrations keep running: each copied its plan's
    /// stages and tasks when it was created, and names it by text only.
    async fn delete_plan(&self, name: &str) -> Result<u64>;

    /// Creates a pool if it does not exist yet (start-up: the default pool).
    async fn ensure_pool(&self, name: &str, slots: u32) -> Result<()>;
    /// Creates a pool; `AlreadyExists` if the name is taken.
    async fn create_pool(&self, name: &str, slots: u32) -> Result<Pool>;
    /// Changes a pool's slots and admits at once if slots were added (I3).
    async fn set_pool_slots(&self, name: &str, slots: u32) -> Result<(Pool, Effects)>;
    /// Pauses or resumes admission into a pool (I3).
    async fn set_pool_paused(&self, name: &str, paused: bool) -> Result<(Pool, Effects)>;
    /// Every pool with its usage.
    async fn list_pools(&self) -> Result<Vec<Pool>>;
    /// Counts of the whole system for `/metrics`, read in one snapshot;
    /// read-only and cheap (see `store::gauges`).
    async fn gauges(&self) -> Result<Gauges>;

    /// Creates a migration and admits it if its pool has a free slot.
    /// Keeps I8 (one unfinished run per subject, idempotency keys) and I3.
    async fn create_migration(&self, m: &NewMigration) -> Result<(Created, Effects)> {
        let (created, fx, _) = self.create_and_claim(m, &[]).await?;
        Ok((created, fx))
    }
    /// Creates a migration as `create_migration` does and, when it was
    /// admitted, runs a dispatch pass for `requests` in the same
    /// transaction, so its first tasks leave with the commit instead of
    /// after another. No pass: nothing was admitted, or nobody asked.
    async fn create_and_claim(
        &self,
        m: &NewMigration,
        requests: &[ClaimRequest],
    ) -> Result<(Created, Effects, Option<Pass>)>;
    /// One migration with its per-stage progress.
    async fn get_migration(&self, id: i64) -> Result<Option<Migration>>;
    /// Migrations, newest first.
    async fn list_migrations(&self, filter: &MigrationFilter) -> Result<Vec<Migration>>;
    /// A page of one migration's events, oldest first.
    async fn list_events(&self, migration_id: i64, after_id: i64, limit: u32)
    -> Result<Vec<Event>>;
    /// What a client sees of a subject.
    async fn subject_status(&self, subject: &str) -> Result<SubjectView>;

    /// Leases up to `slots` minus the worker's live leases of ready tasks of
    /// the given kinds, oldest ready first. Keeps I1 (only tasks of running
    /// stages are ready), I4 (a task is claimed only from `ready`) and I12.
    async fn claim(&self, worker_id: &str, kinds: &[String], slots: u32)
    -> Result<Vec<Assignment>>;
    /// Claims for several workers, in one transaction where the backend can.
    async fn claim_many(&self, requests: &[ClaimRequest]) -> Result<Pass> {
        let mut claimed = Vec::with_capacity(requests.len());
        for r in requests {
            claimed.push(self.claim(&r.worker_id, &r.kinds, r.slots).await?);
        }
        Ok(Pass {
            claimed,
            partial: false,
        })
    }
    /// Hands back a lease whose assignment could not be delivered (the
    /// worker's stream closed first): the task is `ready` again in its old
    /// place in the queue, a TaskHandedBack event ends the attempt, and the
    /// attempt number goes back one, so the hand-back costs the task nothing
    /// and its next assignment never says more than `max_attempts`. Reusing
    /// the number is safe: the token never left the coordinator.
    async fn release(&self, worker_id: &str, lease: LeaseToken) -> Result<Effects>;
    /// Renews the worker's live leases and records progress; leases no longer
    /// held come back as cancel notices (I4, I9).
    async fn heartbeat(&self, worker_id: &str, leases: &[LeaseStatus]) -> Result<HeartbeatOutcome>;
    /// Records a successful attempt; the last success of a stage starts the
    /// next one. Keeps I1, I2, I4, I5.
    async fn complete(&self, worker_id: &str, c: &Completion) -> Result<(ReportAck, Effects)>;
    /// Records a failed attempt: retry after backoff, or the task is dead and
    /// the migration fails. Keeps I4, I5, I7.
    async fn fail(&self, worker_id: &str, f: &Failure) -> Result<(ReportAck, Effects)>;
    /// Records many reports, possibly of different workers, each with the
    /// semantics of `complete`/`fail`, committed together where the backend
    /// can (group commit). An `Err` of the whole call means nothing of the
    /// batch was recorded; otherwise each report has its own result.
    async fn report_many(
        &self,
        reports: &[(String, Report)],
    ) -> Result<Vec<Result<(ReportAck, Effects)>>> {
        let mut out = Vec::with_capacity(reports.len());
        for (worker_id, r) in reports {
            out.push(match r {
                Report::Complete(c) => self.complete(worker_id, c).await,
                Report::Fail(f) => self.fail(worker_id, f).await,
            });
        }
        Ok(out)
    }
    /// Records `reports` as `report_many` does and, where the backend does
    /// both in one transaction, claims for `requests` as `claim_many` does
    /// in the same one, seeing the slots and stages the reports freed: one
    /// commit records a batch and refills the workers. No pass: the
    /// backend left dispatching to the dispatcher (the default).
    async fn report_and_claim(
        &self,
        reports: &[(String, Report)],
        _requests: &[ClaimRequest],
    ) -> Result<(Vec<Result<(ReportAck, Effects)>>, Option<Pass>)> {
        Ok((self.report_many(reports).await?, None))
    }
    /// Cancels a queued or running migration (I9).
    async fn cancel_migration(&self, id: i64, reason: &str) -> Result<Effects>;
    /// Queues a failed or canceled migration again from its first unfinished
    /// stage (I2, I8).
    async fn retry_migration(&self, id: i64) -> Result<Effects> {
        self.retry_migration_by(id, "").await
    }
    /// [`retry_migration`](Self::retry_migration), its MigrationRetried
    /// event naming `by` (the caller's token name; empty: nobody named).
    async fn retry_migration_by(&self, id: i64, by: &str) -> Result<Effects>;
    /// Reclaims expired leases and fails migrations past their deadline
    /// (I6, I7, I10). Safe to run at any time.
    async fn sweep(&self) -> Result<(SweepReport, Effects)>;
    /// The live leases a worker holds.
    async fn live_leases(&self, worker_id: &str) -> Result<Vec<LeaseToken>>;
    /// The leased tasks of a migration, by task id, at most `limit`.
    async fn leased_tasks(&self, migration_id: i64, limit: u32) -> Result<Vec<LeasedTask>>;

    /// The record of which process streams each worker id through which
    /// coordinator: one live stream per worker id across every coordinator
    /// on this database (`streams` module doc).
    fn worker_streams(&self) -> Box<dyn WorkerStreams + '_>;

    /// Effects committed by *other* coordinators sharing this database, as
    /// they commit (PostgreSQL `LISTEN`/`NOTIFY`): this coordinator wakes its
    /// dispatcher, tells its watchers and sends cancel notices to the workers
    /// streaming from it. `None` where this coordinator is the only writer.
    async fn remote_effects(
        &self,
    ) -> Result<Option<tokio::sync::mpsc::UnboundedReceiver<Effects>>> {
        Ok(None)
    }
}
