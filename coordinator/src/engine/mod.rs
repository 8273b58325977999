//! The scheduling core: what the gRPC services call. It validates requests
//! in domain terms, runs each state change as one store transaction, and acts
//! on the committed [`Effects`]: wake the dispatcher, tell watchers, push
//! cancel notices. No protobuf here, so it is tested without a network.

mod claims;
mod group_commit;
mod loops;
mod registry;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::domain::{
    Completion, Event, Failure, HeartbeatOutcome, LeaseStatus, Migration, MigrationFilter,
    NewMigration, PlanSpec, Pool, ReportAck, RequestLimits, shown, validate_json_depth,
    validate_name,
};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::store::{Effects, LeasedTask, PlanPage, Plans, Report, Store, SubjectView};
use claims::{Pending, stream_taken};
use group_commit::GroupCommit;

pub use loops::{run_dispatcher, run_remote_effects, run_stream_claims, run_sweeper};
pub use registry::{Ineligible, Instance, Registry, WorkerEvent, WorkerSpec, WorkerView};

/// Timing of the worker protocol.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often workers send heartbeats.
    pub heartbeat_interval: Duration,
    /// How long a lease lasts after it is granted or renewed.
    pub lease_duration: Duration,
    /// How often the sweeper looks for expired leases, due retries and deadlines.
    pub sweep_interval: Duration,
}

/// Where a migration's plan comes from.
#[derive(Debug, Clone)]
pub enum PlanSource {
    /// A stored plan, by name (its latest version).
    Named(String),
    /// A plan given with the request.
    Inline(PlanSpec),
}

/// A client's request to create a migration, before validation.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub plan: PlanSource,
    pub subject: String,
    pub parameters: Value,
    pub pool: String,
    pub deadline_ms: Option<i64>,
    pub idempotency_key: Option<String>,
    /// The caller's token name, when auth is on: its MigrationCreated event names it.
    pub created_by: Option<String>,
}

/// The coordinator's core, shared by every service and background loop.
pub struct Coordinator {
    store: Arc<dyn Store>,
    registry: Registry,
    wake: Notify,
    changes: broadcast::Sender<i64>,
    timing: Timing,
    /// What a request may hold; checked before any store call.
    limits: RequestLimits,
    /// One permit per open WatchMigration stream.
    watch_streams: Arc<Semaphore>,
    /// One permit per open worker stream, by connection number.
    worker_streams: Arc<Semaphore>,
    worker_permits: std::sync::Mutex<HashMap<u64, OwnedSemaphorePermit>>,
    shutdown: CancellationToken,
    reports: GroupCommit,
    /// This coordinator's random id in the database's record of worker
    /// streams (`store::streams`), drawn at start.
    id: String,
    /// What this process counts for `/metrics`.
    metrics: Metrics,
}

impl Coordinator {
    /// A core over `store`; `shutdown` ends its loops and streams.
    pub fn new(store: Arc<dyn Store>, timing: Timing, shutdown: CancellationToken) -> Arc<Self> {
        Self::with_limits(store, timing, RequestLimits::default(), shutdown)
    }

    /// A core that refuses requests over `limits`.
    pub fn with_limits(
        store: Arc<dyn Store>,
        timing: Timing,
        limits: RequestLimits,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            registry: Registry::new(timing.heartbeat_interval),
            wake: Notify::new(),
            changes: broadcast::channel(4096).0,
            timing,
            limits,
            watch_streams: Arc::new(Semaphore::new(limits.max_watch_streams)),
            worker_streams: Arc::new(Semaphore::new(limits.max_worker_streams)),
            worker_permits: Default::default(),
            shutdown,
            reports: GroupCommit::default(),
            id: format!("{:016x}", rand::random::<u64>()),
            metrics: Metrics::new(),
        })
    }

    /// Resolves when the coordinator starts shutting down.
    pub async fn shutting_down(&self) {
        self.shutdown.cancelled().await
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    pub fn limits(&self) -> RequestLimits {
        self.limits
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Acts on what a committed transition changed.
    fn apply(&self, fx: Effects) {
        self.metrics.applied(&fx);
        // Before any wake-up: the pass it triggers must not pick them.
        for worker_id in &fx.lost {
            self.registry.lost_lease(worker_id);
        }
        for lease in fx.revoked {
            let event = WorkerEvent::Cancel {
                lease: lease.lease,
                reason: lease.reason,
            };
            self.registry.send(&lease.worker_id, event);
        }
        for id in fx.touched {
            // No receivers is fine: nobody is watching.
            let _ = self.changes.send(id);
        }
        if fx.dispatch {
            self.wake.notify_one();
        }
    }

    /// The shortest heartbeat timeout this coordinator's workers can keep
    /// alive: two heartbeat intervals, as for `--lease-duration-ms`.
    fn min_heartbeat_timeout_ms(&self) -> u32 {
        (2 * self.timing.heartbeat_interval.as_millis()).min(u32::MAX as u128) as u32
    }

    // --- plans -----------------------------------------------------------

    pub async fn put_plan(&self, plan: PlanSpec) -> Result<PlanSpec> {
        self.limits.check_plan("", &plan)?;
        plan.validate("", self.min_heartbeat_timeout_ms())?;
        self.store.put_plan(&plan).await
    }

    pub async fn get_plan(&self, name: &str) -> Result<PlanSpec> {
        self.store
            .get_plan(name)
            .await?
            .ok_or_else(|| plan_not_found(name))
    }

    pub async fn list_plans(&self, page: &PlanPage) -> Result<Plans> {
        self.store.list_plans(page).await
    }

    /// Deletes every version of a plan; how many there were.
    pub async fn delete_plan(&self, name: &str) -> Result<u64> {
        if name.is_empty() {
            return Err(Error::invalid("name", "the plan name is required"));
        }
        match self.store.delete_plan(name).await? {
            0 => Err(plan_not_found(name)),
            n => Ok(n),
        }
    }

    // --- migrations ------------------------------------------------------

    /// Creates (or, for a repeated idempotency key, finds) a migration.
    pub async fn create_migration(&self, req: CreateRequest) -> Result<(Migration, bool)> {
        let subject = req.subject.trim();
        if subject.is_empty() {
            return Err(Error::invalid(
                "subject",
                "the subject is required, e.g. \"project/42\"",
            ));
        }
        if subject.len() > 500 {
            return Err(Error::invalid(
                "subject",
                "the subject must be at most 500 characters",
            ));
        }
        if !req.parameters.is_object() {
            return Err(Error::invalid(
                "parameters",
                "parameters must be a JSON object",
            ));
        }
        validate_json_depth("parameters", &req.parameters)?;
        self.limits.check_json("parameters", &req.parameters)?;
        let pool = if req.pool.is_empty() {
            "default".to_string()
        } else {
            req.pool
        };
        validate_name("pool", &pool, "pool name")?;
        if let Some(key) = &req.idempotency_key
            && key.len() > 200
        {
            return Err(Error::invalid(
                "idempotency_key",
                "the idempotency key must be at most 200 characters",
            ));
        }
        let plan = match req.plan {
            PlanSource::Named(name) => {
                if name.is_empty() {
                    return Err(Error::invalid(
                        "plan_name",
                        "name a stored plan, or give inline_plan",
                    ));
                }
                self.get_plan(&name).await?
            }
            PlanSource::Inline(plan) => {
                self.limits.check_plan("inline_plan", &plan)?;
                plan.validate("inline_plan", self.min_heartbeat_timeout_ms())?;
                plan
            }
        };
        let new = NewMigration {
            plan,
            subject: subject.to_string(),
            parameters: req.parameters,
            pool,
            deadline_ms: req.deadline_ms,
            idempotency_key: req.idempotency_key.filter(|k| !k.is_empty()),
            created_by: req.created_by,
        };
        // Admitted at once, its first tasks go out with the create's commit.
        let (workers, requests) = loops::claim_requests(self);
        let (created, mut fx, pass) = self.store.create_and_claim(&new, &requests).await?;
        fx.dispatch &= !loops::pass_settles(&workers, pass.as_ref());
        self.apply(fx);
        if let Some(pass) = pass {
            loops::deliver_pass(self, &workers, pass.claimed).await;
        }
        let migration = self.get_migration(created.migration_id).await?;
        Ok((migration, created.created))
    }

    pub async fn get_migration(&self, id: i64) -> Result<Migration> {
        self.store
            .get_migration(id)
            .await?
            .ok_or_else(|| migration_not_found(id))
    }

    pub async fn list_migrations(&self, filter: &MigrationFilter) -> Result<Vec<Migration>> {
        self.store.list_migrations(filter).await
    }

    pub async fn list_events(
        &self,
        migration_id: i64,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<Event>> {
        self.get_migration(migration_id).await?;
        self.store.list_events(migration_id, after_id, limit).await
    }

    /// The tasks of a migration under lease now, with their workers and
    /// last reported progress, at most `limit` (the dashboard's view of
    /// one migration). Read-only.
    pub async fn leased_tasks(&self, migration_id: i64, limit: u32) -> Result<Vec<LeasedTask>> {
        self.store.leased_tasks(migration_id, limit).await
    }

    /// Cancels it; with `by` (the caller's token name) the reason, which
    /// its MigrationCanceled event and the migration carry, says who:
    /// `canceled by ops-alice: <reason>`.
    pub async fn cancel_migration(
        &self,
        id: i64,
        reason: &str,
        by: Option<&str>,
    ) -> Result<Migration> {
        let reason = match (by, reason) {
            (None, r) => r.to_string(),
            (Some(by), "") => format!("canceled by {by}"),
            (Some(by), r) => format!("canceled by {by}: {r}"),
        };
        let fx = self.store.cancel_migration(id, &reason).await?;
        self.apply(fx);
        self.get_migration(id).await
    }

    /// Retries it; its MigrationRetried event says `retried by NAME` when
    /// `by` names the caller's token.
    pub async fn retry_migration(&self, id: i64, by: Option<&str>) -> Result<Migration> {
        let fx = self
            .store
            .retry_migration_by(id, by.unwrap_or_default())
            .await?;
        self.apply(fx);
        self.get_migration(id).await
    }

    pub async fn subject_status(&self, subject: &str) -> Result<SubjectView> {
        if subject.is_empty() {
            return Err(Error::invalid(
                "subject",
                "the subject is required, e.g. \"project/42\"",
            ));
        }
        self.store.subject_status(subject).await
    }

    /// A place for one more WatchMigration stream, held as long as the
    /// stream is open; `RESOURCE_EXHAUSTED` naming the flag when all are taken.
    pub fn watch_permit(&self) -> Result<OwnedSemaphorePermit> {
        self.watch_streams.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!(
                "{} WatchMigration streams are open, the limit; close one or poll GetMigration / ListEvents, or raise --max-watch-streams (STAGECOACH_MAX_WATCH_STREAMS)",
                self.limits.max_watch_streams
            ))
        })
    }

    /// Notifications of migrations that changed (by id), for watchers.
    pub fn changes(&self) -> broadcast::Receiver<i64> {
        self.changes.subscribe()
    }

    // --- workers ---------------------------------------------------------

    /// Registers a worker's stream. Events for it arrive on the returned
    /// receiver; call [`Coordinator::unsubscribe`] with the connection number
    /// when the stream ends.
    ///
    /// One live stream per worker id (`ALREADY_EXISTS` otherwise, unless the
    /// same worker process reconnects): the registry refuses a second one
    /// among this coordinator's streams at no cost, then the database among
    /// every coordinator's (`WorkerStreams::claim`). Until the database
    /// agrees, the stream gets no work.
    pub async fn subscribe(
        &self,
        spec: WorkerSpec,
        instance: Instance,
    ) -> Result<(u64, mpsc::UnboundedReceiver<WorkerEvent>)> {
        if spec.worker_id.is_empty() || spec.worker_id.len() > 200 {
            return Err(Error::invalid(
                "worker_id",
                "a worker id of 1-200 characters is required; keep it across reconnects",
            ));
        }
        if spec.kinds.is_empty() {
            return Err(Error::invalid(
                "kinds",
                "name at least one task kind the worker handles",
            ));
        }
        for (i, kind) in spec.kinds.iter().enumerate() {
            validate_name(&format!("kinds[{i}]"), kind, "task kind")?;
        }
        let worker_id = spec.worker_id.clone();
        if spec.slots == 0 || spec.slots > 10_000 {
            return Err(Error::invalid(
                "slots",
                "slots must be 1-10000: how many tasks the worker runs at once",
            ));
        }
        // Checked before registering: a stream registered after the
        // shutdown closed every stream would keep the server from stopping.
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let permit = self.worker_streams.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!(
                "{} worker streams are open, the limit; retry later (the worker SDK reconnects with backoff), or raise --max-worker-streams (STAGECOACH_MAX_WORKER_STREAMS)",
                self.limits.max_worker_streams
            ))
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = self
            .registry
            .connect(spec, instance, tx)
            .map_err(|_| stream_taken(&worker_id))?;
        self.worker_permits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn, permit);
        // Undoes the stream on every way out but success, the caller
        // dropping this call mid-claim included.
        let pending = Pending {
            core: self,
            worker_id: &worker_id,
            conn,
        };
        if !self.claim_stream(&worker_id, instance, conn).await? {
            return Err(stream_taken(&worker_id));
        }
        // While the claim ran, the same process's newer stream may have
        // replaced this one, or the shutdown closed it.
        let confirmed = self.registry.confirm(&worker_id, conn);
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        if !confirmed {
            return Err(stream_taken(&worker_id));
        }
        pending.confirmed();
        self.wake.notify_one();
        Ok((conn, rx))
    }

    /// Forgets an ended stream: here, and its claim of the worker id in
    /// the database.
    pub fn unsubscribe(&self, worker_id: &str, conn: u64) {
        self.forget(worker_id, conn);
        self.release_stream(worker_id, conn);
    }

    /// Forgets a stream here: the registry's entry and its place.
    fn forget(&self, worker_id: &str, conn: u64) {
        self.registry.disconnect(worker_id, conn);
        // Frees the stream's place (`--max-worker-streams`).
        self.worker_permits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&conn);
    }

    /// Renews the worker's leases. Only this counts as the worker's sign of
    /// life for eligibility (Complete and Fail do not): a worker held back
    /// since a lease of it expired gets work again from the next pass,
    /// which this wakes.
    pub async fn heartbeat(
        &self,
        worker_id: &str,
        leases: &[LeaseStatus],
    ) -> Result<HeartbeatOutcome> {
        self.limits.check_heartbeat(leases)?;
        if self.registry.seen(worker_id) {
            self.wake.notify_one();
        }
        self.store.heartbeat(worker_id, leases).await
    }

    /// Records successful attempts (group commit with concurrent reports).
    pub async fn complete(
        &self,
        worker_id: &str,
        reports: &[Completion],
    ) -> Vec<Result<ReportAck>> {
        // A completion over a limit is refused alone; the rest of the batch
        // is recorded as usual.
        let checked: Vec<Result<()>> = reports
            .iter()
            .enumerate()
            .map(|(i, c)| self.limits.check_completion(i, c))
            .collect();
        let items = reports
            .iter()
            .zip(&checked)
            .filter(|(_, ok)| ok.is_ok())
            .map(|(c, _)| (worker_id.to_string(), Report::Complete(c.clone())))
            .collect();
        let mut recorded = self.record(items).await.into_iter();
        let results: Vec<_> = checked
            .into_iter()
            .map(|ok| match ok {
                Ok(()) => recorded.next().unwrap_or_else(|| {
                    Err(Error::NotRecorded("its batch returned no result".into()))
                }),
                Err(e) => Err(e),
            })
            .collect();
        let leases = reports.iter().map(|c| c.lease);
        self.metrics
            .reported("complete", worker_id, leases, &results);
        results
    }

    /// Records failed attempts (group commit with concurrent reports).
    pub async fn fail(&self, worker_id: &str, reports: &[Failure]) -> Vec<Result<ReportAck>> {
        let items = reports
            .iter()
            .map(|f| (worker_id.to_string(), Report::Fail(f.clone())))
            .collect();
        let results = self.record(items).await;
        let leases = reports.iter().map(|f| f.lease);
        self.metrics.reported("fail", worker_id, leases, &results);
        results
    }

    async fn record(&self, items: Vec<(String, Report)>) -> Vec<Result<ReportAck>> {
        self.reports
            .record(items, |batch| self.commit_reports(batch))
            .await
    }

    /// One group commit: a batch of reports and a dispatch pass for every
    /// eligible worker in one store call (one transaction), so the
    /// slots and stages the reports free are refilled by the same commit,
    /// without waking the dispatcher for another.
    async fn commit_reports(&self, batch: Vec<(String, Report)>) -> Result<Vec<Result<ReportAck>>> {
        let (workers, requests) = loops::claim_requests(self);
        let started = std::time::Instant::now();
        let (results, pass) = self.store.report_and_claim(&batch, &requests).await?;
        self.metrics.committed(batch.len(), started.elapsed());
        // Without a pass, or after one that left work behind, the
        // dispatcher is woken as usual.
        let dispatched = loops::pass_settles(&workers, pass.as_ref());
        let acks = results
            .into_iter()
            .map(|r| {
                r.map(|(ack, mut fx)| {
                    fx.dispatch &= !dispatched;
                    self.apply(fx);
                    ack
                })
            })
            .collect();
        if let Some(pass) = pass {
            loops::deliver_pass(self, &workers, pass.claimed).await;
        }
        Ok(acks)
    }

    pub fn workers(&self) -> &Registry {
        &self.registry
    }

    pub fn drain_worker(&self, worker_id: &str) -> Result<WorkerView> {
        self.registry
            .drain(worker_id)
            .ok_or_else(|| not_connected(worker_id))
    }

    /// Undoes `drain_worker`; the next dispatch pass may give it work.
    pub fn undrain_worker(&self, worker_id: &str) -> Result<WorkerView> {
        let view = self
            .registry
            .undrain(worker_id)
            .ok_or_else(|| not_connected(worker_id))?;
        self.wake.notify_one();
        Ok(view)
    }

    // --- pools -----------------------------------------------------------

    pub async fn list_pools(&self) -> Result<Vec<Pool>> {
        self.store.list_pools().await
    }

    pub async fn create_pool(&self, name: &str, slots: u32) -> Result<Pool> {
        validate_name("name", name, "pool name")?;
        check_slots(slots)?;
        self.store.create_pool(name, slots).await
    }

    pub async fn set_pool_slots(&self, name: &str, slots: u32) -> Result<Pool> {
        check_slots(slots)?;
        let (pool, fx) = self.store.set_pool_slots(name, slots).await?;
        self.apply(fx);
        Ok(pool)
    }

    pub async fn set_pool_paused(&self, name: &str, paused: bool) -> Result<Pool> {
        let (pool, fx) = self.store.set_pool_paused(name, paused).await?;
        self.apply(fx);
        Ok(pool)
    }

    /// Ends every worker stream (shutdown).
    pub fn close_streams(&self) {
        self.registry.close_all();
    }
}

fn check_slots(slots: u32) -> Result<()> {
    if slots == 0 || slots > 100_000 {
        return Err(Error::invalid("slots", "slots must be 1-100000"));
    }
    Ok(())
}

fn plan_not_found(name: &str) -> Error {
    Error::NotFound(format!(
        "plan {} does not exist; store it with PutPlan first, or list plans with ListPlans",
        shown(name)
    ))
}

fn migration_not_found(id: i64) -> Error {
    Error::NotFound(format!("migration {id} does not exist"))
}

fn not_connected(worker_id: &str) -> Error {
    Error::NotFound(format!(
        "worker {} is not connected to this coordinator",
        shown(worker_id)
    ))
}
