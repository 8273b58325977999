//! gRPC clients of a coordinator and the calls tests make again and again:
//! put a plan, create a migration, wait until it is finished, read its whole
//! event log.
//!
//! Calls return `Result<_, tonic::Status>` so tests can assert error codes;
//! [`Client::wait_for_terminal`] panics instead, with the migration's state
//! and latest events, because a test can do nothing useful after a timeout.

use std::time::Duration;

use serde_json::Value as Json;
use stagecoach_proto::json::json_to_struct;
use stagecoach_proto::v1::admin_service_client::AdminServiceClient;
use stagecoach_proto::v1::migration_service_client::MigrationServiceClient;
use stagecoach_proto::v1::worker_service_client::WorkerServiceClient;
use stagecoach_proto::v1::{
    CancelMigrationRequest, CreateMigrationRequest, CreateMigrationResponse, Event, EventKind,
    GetMigrationRequest, GetSubjectStatusRequest, GetSubjectStatusResponse, ListEventsRequest,
    ListMigrationsRequest, ListPlansRequest, ListPlansResponse, ListPoolsRequest,
    ListWorkersRequest, Migration, MigrationState, Plan, Pool, PutPlanRequest,
    RetryMigrationRequest, WatchMigrationRequest, WorkerInfo, create_migration_request::PlanSource,
    put_plan_request::Source,
};
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use crate::checker::{check_invariants, describe_event};

/// Adds `authorization: Bearer TOKEN` to every call, when it has a token.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// Panics on a token that cannot be a header value (tests make their own).
    pub fn new(token: Option<&str>) -> Bearer {
        Bearer(token.map(|t| {
            format!("Bearer {t}")
                .parse()
                .unwrap_or_else(|e| panic!("token {t:?} is no header value: {e}"))
        }))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel whose calls carry the client's token (if any).
pub type Authed = InterceptedService<Channel, Bearer>;

/// Clients of the three Stagecoach services over one channel.
#[derive(Debug, Clone)]
pub struct Client {
    /// The channel the clients share, for other services (health, reflection).
    pub channel: Channel,
    /// `stagecoach.v1.MigrationService`.
    pub migrations: MigrationServiceClient<Authed>,
    /// `stagecoach.v1.WorkerService`.
    pub workers: WorkerServiceClient<Authed>,
    /// `stagecoach.v1.AdminService`.
    pub admin: AdminServiceClient<Authed>,
}

impl Client {
    /// Connects to `url` (`http://ADDR`), retrying for a few seconds.
    pub async fn connect(url: &str) -> Client {
        Self::connect_with_token(url, None).await
    }

    /// Like [`Client::connect`], every call carrying `token` when given.
    pub async fn connect_with_token(url: &str, token: Option<&str>) -> Client {
        Self::connect_endpoint(url, Self::endpoint(url, None), token).await
    }

    /// Connects to `url` (`https://ADDR`) over TLS with `tls`, retrying for a
    /// few seconds.
    pub async fn connect_tls(url: &str, tls: ClientTlsConfig) -> Client {
        Self::connect_endpoint(url, Self::endpoint(url, Some(tls)), None).await
    }

    /// One connection attempt to `url`, over TLS with `tls` when given: for
    /// tests of who is refused. Note that a TLS 1.3 server may refuse a
    /// client certificate only after the client considers the connection
    /// made, on the first call.
    pub async fn try_connect(
        url: &str,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Client, tonic::transport::Error> {
        let channel = Self::endpoint(url, tls).connect().await?;
        Ok(Self::on_channel(channel, None))
    }

    fn endpoint(url: &str, tls: Option<ClientTlsConfig>) -> Endpoint {
        let endpoint = Channel::from_shared(url.to_string())
            .unwrap_or_else(|e| panic!("bad coordinator url {url:?}: {e}"))
            .connect_timeout(Duration::from_secs(2));
        match tls {
            Some(tls) => endpoint
                .tls_config(tls)
                .unwrap_or_else(|e| panic!("bad TLS settings for {url}: {e:?}")),
            None => endpoint,
        }
    }

    async fn connect_endpoint(url: &str, endpoint: Endpoint, token: Option<&str>) -> Client {
        let deadline = Instant::now() + Duration::from_secs(10);
        let channel = loop {
            match endpoint.connect().await {
                Ok(c) => break c,
                Err(e) if Instant::now() >= deadline => {
                    panic!("could not connect to {url}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        Self::on_channel(channel, token)
    }

    /// Clients on `channel` whose calls carry `token` (none: no header).
    pub fn on_channel(channel: Channel, token: Option<&str>) -> Client {
        let bearer = Bearer::new(token);
        Client {
            migrations: MigrationServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            workers: WorkerServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            admin: AdminServiceClient::with_interceptor(channel.clone(), bearer),
            channel,
        }
    }

    /// The same connection, every call carrying this `authorization`
    /// header value as is (e.g. one that is not `Bearer …`).
    pub fn with_authorization(&self, value: &str) -> Client {
        let bearer = Bearer(Some(value.parse().expect("a header value")));
        let channel = self.channel.clone();
        Client {
            migrations: MigrationServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            workers: WorkerServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            admin: AdminServiceClient::with_interceptor(channel.clone(), bearer),
            channel,
        }
    }

    /// The same connection, every call carrying `token` instead.
    pub fn with_token(&self, token: Option<&str>) -> Client {
        Self::on_channel(self.channel.clone(), token)
    }

    /// PutPlan with a `Plan` message; returns the stored plan.
    pub async fn put_plan(&self, plan: Plan) -> Result<Plan, Status> {
        self.put_plan_source(Source::Plan(plan)).await
    }

    /// PutPlan with a JSON document (`plan_json`); returns the stored plan.
    pub async fn put_plan_json(&self, plan: &Json) -> Result<Plan, Status> {
        self.put_plan_json_text(&plan.to_string()).await
    }

    /// PutPlan with `plan_json` text as given (e.g. malformed on purpose).
    pub async fn put_plan_json_text(&self, plan_json: &str) -> Result<Plan, Status> {
        self.put_plan_source(Source::PlanJson(plan_json.to_string()))
            .await
    }

    async fn put_plan_source(&self, source: Source) -> Result<Plan, Status> {
        let resp = self
            .migrations
            .clone()
            .put_plan(PutPlanRequest {
                source: Some(source),
            })
            .await?
            .into_inner();
        resp.plan
            .ok_or_else(|| Status::internal("PutPlan answered without a plan"))
    }

    /// Every stored plan (latest versions, with their tasks), page by page.
    pub async fn list_plans(&self) -> Result<Vec<Plan>, Status> {
        let mut plans = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .list_plans_page(ListPlansRequest {
                    page_token,
                    include_tasks: true,
                    ..Default::default()
                })
                .await?;
            plans.extend(page.plans);
            if page.next_page_token.is_empty() {
                return Ok(plans);
            }
            page_token = page.next_page_token;
        }
    }

    /// One page of ListPlans.
    pub async fn list_plans_page(
        &self,
        req: ListPlansRequest,
    ) -> Result<ListPlansResponse, Status> {
        Ok(self.migrations.clone().list_plans(req).await?.into_inner())
    }

    /// CreateMigration of the stored plan `plan_name` for `subject`.
    pub async fn create_migration(
        &self,
        plan_name: &str,
        subject: &str,
        parameters: &Json,
    ) -> Result<Migration, Status> {
        self.create(CreateMigrationRequest {
            plan_source: Some(PlanSource::PlanName(plan_name.to_string())),
            subject: subject.to_string(),
            parameters: Some(json_to_struct(parameters)),
            ..Default::default()
        })
        .await
    }

    /// CreateMigration with any request.
    pub async fn create(&self, req: CreateMigrationRequest) -> Result<Migration, Status> {
        let resp = self
            .migrations
            .clone()
            .create_migration(req)
            .await?
            .into_inner();
        resp.migration
            .ok_or_else(|| Status::internal("CreateMigration answered without a migration"))
    }

    /// CreateMigration with any request, returning the whole answer (with
    /// `created`).
    pub async fn create_full(
        &self,
        req: CreateMigrationRequest,
    ) -> Result<CreateMigrationResponse, Status> {
        Ok(self
            .migrations
            .clone()
            .create_migration(req)
            .await?
            .into_inner())
    }

    /// CancelMigration; returns the migration after cancellation.
    pub async fn cancel(&self, id: i64, reason: &str) -> Result<Migration, Status> {
        let resp = self
            .migrations
            .clone()
            .cancel_migration(CancelMigrationRequest {
                migration_id: id,
                reason: reason.to_string(),
            })
            .await?
            .into_inner();
        resp.migration
            .ok_or_else(|| Status::internal("CancelMigration answered without a migration"))
    }

    /// RetryMigration; returns the migration queued again.
    pub async fn retry(&self, id: i64) -> Result<Migration, Status> {
        let resp = self
            .migrations
            .clone()
            .retry_migration(RetryMigrationRequest { migration_id: id })
            .await?
            .into_inner();
        resp.migration
            .ok_or_else(|| Status::internal("RetryMigration answered without a migration"))
    }

    /// GetSubjectStatus.
    pub async fn subject_status(&self, subject: &str) -> Result<GetSubjectStatusResponse, Status> {
        Ok(self
            .migrations
            .clone()
            .get_subject_status(GetSubjectStatusRequest {
                subject: subject.to_string(),
            })
            .await?
            .into_inner())
    }

    /// The pool named `name`, from ListPools.
    pub async fn pool(&self, name: &str) -> Result<Pool, Status> {
        let pools = self
            .admin
            .clone()
            .list_pools(ListPoolsRequest {})
            .await?
            .into_inner()
            .pools;
        pools
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| Status::not_found(format!("ListPools has no pool {name:?}")))
    }

    /// ListWorkers.
    pub async fn list_workers(&self) -> Result<Vec<WorkerInfo>, Status> {
        Ok(self
            .admin
            .clone()
            .list_workers(ListWorkersRequest {})
            .await?
            .into_inner()
            .workers)
    }

    /// Waits until the log of `migration_id` has an event `want` accepts and
    /// returns the first such event. Panics after `timeout`, with the log.
    pub async fn wait_for_event(
        &self,
        migration_id: i64,
        what: &str,
        timeout: Duration,
        want: impl Fn(&Event) -> bool,
    ) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(events) = self.events(migration_id).await
                && let Some(e) = events.into_iter().find(|e| want(e))
            {
                return e;
            }
            if Instant::now() >= deadline {
                panic!(
                    "migration {migration_id}: no event {what} after {timeout:?}\n{}",
                    self.describe(migration_id).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `migration_id` is finished, runs the invariant checker on
    /// it and its whole log, and returns both. Panics on any violation.
    pub async fn finish_and_check(
        &self,
        migration_id: i64,
        timeout: Duration,
    ) -> (Migration, Vec<Event>) {
        let m = self.wait_for_terminal(migration_id, timeout).await;
        self.check(m.id).await
    }

    /// Runs the invariant checker on `migration_id` as it is now, and returns
    /// it with its log. Panics on any violation.
    pub async fn check(&self, migration_id: i64) -> (Migration, Vec<Event>) {
        let m = self
            .get_migration(migration_id)
            .await
            .expect("GetMigration");
        let events = self.events(migration_id).await.expect("ListEvents");
        if let Err(errors) = check_invariants(&m, &events) {
            let log: Vec<String> = events.iter().map(describe_event).collect();
            panic!(
                "migration {migration_id}: {} invariant violations:\n  {}\nlog:\n  {}",
                errors.len(),
                errors.join("\n  "),
                log.join("\n  ")
            );
        }
        (m, events)
    }

    /// The events of every migration the coordinator knows, in id order.
    /// Ids are global: on SQLite this is the order in which they were
    /// committed; on PostgreSQL the events of one migration are in commit
    /// order, but concurrent transactions of different migrations may
    /// interleave (see [`crate::capacity`]). Read migration by migration, so
    /// it is a consistent snapshot only once nothing changes any more.
    pub async fn all_events(&self) -> Result<Vec<Event>, Status> {
        let mut all = Vec::new();
        for m in self.list_migrations().await? {
            all.extend(self.events(m.id).await?);
        }
        all.sort_by_key(|e| e.id);
        Ok(all)
    }

    /// GetMigration.
    pub async fn get_migration(&self, id: i64) -> Result<Migration, Status> {
        let resp = self
            .migrations
            .clone()
            .get_migration(GetMigrationRequest { migration_id: id })
            .await?
            .into_inner();
        resp.migration
            .ok_or_else(|| Status::internal("GetMigration answered without a migration"))
    }

    /// Every migration, following `next_page_token` to the last page.
    pub async fn list_migrations(&self) -> Result<Vec<Migration>, Status> {
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .migrations
                .clone()
                .list_migrations(ListMigrationsRequest {
                    page_token: page_token.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            all.extend(page.migrations);
            if page.next_page_token.is_empty() || page.next_page_token == page_token {
                return Ok(all);
            }
            page_token = page.next_page_token;
        }
    }

    /// The whole event log of a migration, paging ListEvents until a page
    /// comes back empty.
    pub async fn events(&self, migration_id: i64) -> Result<Vec<Event>, Status> {
        let mut all: Vec<Event> = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .migrations
                .clone()
                .list_events(ListEventsRequest {
                    migration_id,
                    after_event_id: after,
                    limit: 1000,
                })
                .await?
                .into_inner()
                .events;
            let Some(last) = page.last().map(|e| e.id) else {
                return Ok(all);
            };
            if last <= after {
                return Err(Status::internal(format!(
                    "ListEvents after {after} answered events up to {last} only"
                )));
            }
            all.extend(page);
            after = last;
        }
    }

    /// Waits until the migration is succeeded, failed or canceled and returns
    /// it. Follows WatchMigration and falls back to polling GetMigration when
    /// the stream is unavailable or ends early. Panics after `timeout`, with
    /// the migration's state and last events.
    pub async fn wait_for_terminal(&self, migration_id: i64, timeout: Duration) -> Migration {
        let deadline = Instant::now() + timeout;
        let mut after = 0;
        while Instant::now() < deadline {
            let mut migrations = self.migrations.clone();
            let watch = migrations.watch_migration(WatchMigrationRequest {
                migration_id,
                after_event_id: after,
            });
            if let Ok(Ok(resp)) = tokio::time::timeout_at(deadline, watch).await {
                let mut stream = resp.into_inner();
                while let Ok(Ok(Some(msg))) =
                    tokio::time::timeout_at(deadline, stream.message()).await
                {
                    if let Some(last) = msg.events.last() {
                        after = after.max(last.id);
                    }
                    if let Some(m) = msg.migration.filter(|m| is_terminal(m.state())) {
                        return m;
                    }
                }
            }
            if let Ok(m) = self.get_migration(migration_id).await
                && is_terminal(m.state())
            {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "migration {migration_id} not finished after {timeout:?}\n{}",
            self.describe(migration_id).await
        )
    }

    /// Waits until every one of `ids` shows in ListWorkers. Returns at once
    /// when the coordinator does not implement ListWorkers.
    pub async fn wait_for_workers(&self, ids: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let seen: Vec<String> =
                match self.admin.clone().list_workers(ListWorkersRequest {}).await {
                    Ok(r) => r
                        .into_inner()
                        .workers
                        .into_iter()
                        .map(|w| w.worker_id)
                        .collect(),
                    Err(s) if s.code() == Code::Unimplemented => return,
                    Err(_) => Vec::new(),
                };
            if ids.iter().all(|id| seen.iter().any(|s| s == id)) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("workers {ids:?} not connected after {timeout:?}; connected: {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A readable account of a migration and its log, for failure messages.
    pub async fn describe(&self, migration_id: i64) -> String {
        let quick = Duration::from_secs(5);
        let migration = tokio::time::timeout(quick, self.get_migration(migration_id)).await;
        let events = tokio::time::timeout(quick, self.events(migration_id)).await;
        let mut out = format!("migration: {migration:?}\n");
        match events {
            Ok(Ok(events)) => {
                out.push_str(&format!("events ({}):\n", events.len()));
                for e in &events {
                    out.push_str(&format!("  {}\n", describe_event(e)));
                }
            }
            other => out.push_str(&format!("events: {other:?}\n")),
        }
        out
    }
}

/// Polls `probe` every 50 ms until it returns `Some`, and returns that.
/// Panics after `timeout`, saying it waited for `what`.
pub async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("waited {timeout:?} for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The events of `kind` in a log.
pub fn of_kind(events: &[Event], kind: EventKind) -> Vec<&Event> {
    events.iter().filter(|e| e.kind() == kind).collect()
}

/// True for SUCCEEDED, FAILED and CANCELED.
pub fn is_terminal(state: MigrationState) -> bool {
    matches!(
        state,
        MigrationState::Succeeded | MigrationState::Failed | MigrationState::Canceled
    )
}

/// Asserts `result` failed with `code` and a message naming every one of `words`.
#[track_caller]
pub fn assert_refused<T: std::fmt::Debug>(
    case: &str,
    result: Result<T, Status>,
    code: Code,
    words: &[&str],
) {
    match result {
        Ok(v) => panic!("{case}: accepted, wanted {code:?}; answer: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{case}: code; message {:?}", s.message());
            for w in words {
                assert!(
                    s.message().contains(w),
                    "{case}: message {:?} should name {w:?}",
                    s.message()
                );
            }
        }
    }
}
