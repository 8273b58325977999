//! The measurements against a real coordinator, and what they share: a
//! fresh coordinator (and database) per measurement, gRPC clients with
//! raised message limits, plans, and waiting for a migration on
//! WatchMigration.
//!
//! Every measurement starts its own coordinator on its own new database, so
//! runs do not see each other's rows and peak RSS (VmHWM) is the process's
//! own.

pub mod latency;
pub mod scale;
pub mod throughput;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use stagecoach_proto::v1::create_migration_request::PlanSource;
use stagecoach_proto::v1::migration_service_client::MigrationServiceClient;
use stagecoach_proto::v1::{
    CreateMigrationRequest, EventKind, GetMigrationRequest, ListWorkersRequest, Migration,
    MigrationState, Plan, StageSpec, TaskSpec, WatchMigrationRequest,
};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use super::options::{Backend, Options, Sizes};
use super::postgres::PgServer;
use super::procs::{CoordinatorProc, Executables};

/// A task kind no built-in worker handles: only the raw worker takes it.
pub const RAW_KIND: &str = "bench.raw";
/// The fan-out kind of the scale migration, also raw-worker only.
pub const FANOUT_KIND: &str = "bench.fanout";

/// What every measurement needs: executables, options, a place for files
/// and, for PostgreSQL, the server.
pub struct Env {
    pub exes: Executables,
    pub opts: Options,
    pub sizes: Sizes,
    pub dir: PathBuf,
    pub pg: Option<PgServer>,
    seq: AtomicU32,
}

impl Env {
    pub fn new(exes: Executables, opts: Options, dir: PathBuf, pg: Option<PgServer>) -> Env {
        Env {
            exes,
            sizes: opts.sizes(),
            opts,
            dir,
            pg,
            seq: AtomicU32::new(0),
        }
    }

    /// A new directory for one measurement, `<dir>/<n>-<label>`.
    pub fn scratch(&self, label: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.dir.join(format!("{n:03}-{label}"))
    }

    /// A new empty database of `backend` for one measurement, as a URL.
    pub async fn database(
        &self,
        backend: Backend,
        scratch: &std::path::Path,
    ) -> anyhow::Result<String> {
        match backend {
            Backend::Sqlite => {
                std::fs::create_dir_all(scratch)?;
                Ok(format!("sqlite://{}", scratch.join("coord.db").display()))
            }
            Backend::Postgres => {
                let pg = self
                    .pg
                    .as_ref()
                    .context("no PostgreSQL server was started")?;
                pg.create_database().await
            }
        }
    }

    /// A coordinator on a new database, and a channel to it.
    pub async fn coordinator(
        &self,
        backend: Backend,
        label: &str,
    ) -> anyhow::Result<(CoordinatorProc, Channel, PathBuf)> {
        let scratch = self.scratch(&format!("{}-{label}", backend.name()));
        let url = self.database(backend, &scratch).await?;
        let coordinator = CoordinatorProc::start(&self.exes, &scratch, &url).await?;
        let channel = connect(&coordinator.url()).await?;
        Ok((coordinator, channel, scratch))
    }
}

/// One HTTP/2 connection to `url`, retried for a few seconds.
pub async fn connect(url: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_string())?.connect_timeout(Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => bail!("could not connect to {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A MigrationService client whose message limits fit a 1,000,000-task plan.
pub fn migrations(channel: &Channel) -> MigrationServiceClient<Channel> {
    MigrationServiceClient::new(channel.clone())
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

/// A stage of `tasks` tasks of `kind`.
pub fn stage(name: &str, kind: &str, tasks: u32) -> StageSpec {
    StageSpec {
        name: name.to_string(),
        tasks: (0..tasks)
            .map(|_| TaskSpec {
                kind: kind.to_string(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A plan of these stages.
pub fn plan(name: &str, stages: Vec<StageSpec>) -> Plan {
    Plan {
        name: name.to_string(),
        description: "stagecoach bench".into(),
        stages,
        ..Default::default()
    }
}

/// CreateMigration of an inline plan for `subject`, in `pool` ("" for the
/// default pool).
pub async fn create(
    client: &mut MigrationServiceClient<Channel>,
    plan: Plan,
    subject: &str,
    pool: &str,
) -> anyhow::Result<Migration> {
    client
        .create_migration(CreateMigrationRequest {
            plan_source: Some(PlanSource::InlinePlan(plan)),
            subject: subject.to_string(),
            pool: pool.to_string(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("CreateMigration for {subject}"))?
        .into_inner()
        .migration
        .context("CreateMigration answered without a migration")
}

/// Follows WatchMigration until the migration succeeded and returns the
/// instant that was seen; fails if it fails, is canceled, or takes longer
/// than `timeout`.
pub async fn watch_until_succeeded(
    channel: &Channel,
    migration_id: i64,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    let mut client = migrations(channel);
    let mut stream = client
        .watch_migration(WatchMigrationRequest {
            migration_id,
            after_event_id: 0,
        })
        .await
        .context("WatchMigration")?
        .into_inner();
    loop {
        let msg = match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => bail!("migration {migration_id} did not succeed within {timeout:?}"),
            Ok(Err(status)) => bail!("WatchMigration of {migration_id}: {status}"),
            Ok(Ok(None)) => {
                // The stream ends once the migration is terminal.
                let m = get(&mut client, migration_id).await?;
                return match m.state() {
                    MigrationState::Succeeded => Ok(Instant::now()),
                    other => bail!(
                        "WatchMigration of {migration_id} ended while it is {other:?}: {}",
                        m.reason
                    ),
                };
            }
            Ok(Ok(Some(msg))) => msg,
        };
        let at = Instant::now();
        if msg
            .events
            .iter()
            .any(|e| e.kind() == EventKind::MigrationSucceeded)
        {
            return Ok(at);
        }
        if let Some(m) = msg.migration {
            match m.state() {
                MigrationState::Succeeded => return Ok(at),
                MigrationState::Failed | MigrationState::Canceled => {
                    bail!(
                        "migration {migration_id} ended {:?}: {}",
                        m.state(),
                        m.reason
                    )
                }
                _ => {}
            }
        }
    }
}

async fn get(client: &mut MigrationServiceClient<Channel>, id: i64) -> anyhow::Result<Migration> {
    client
        .get_migration(GetMigrationRequest { migration_id: id })
        .await?
        .into_inner()
        .migration
        .context("GetMigration answered without a migration")
}

/// Waits until every one of `ids` is connected (AdminService/ListWorkers).
pub async fn wait_for_workers(channel: &Channel, ids: &[String]) -> anyhow::Result<()> {
    let mut admin =
        stagecoach_proto::v1::admin_service_client::AdminServiceClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen: Vec<String> = admin
            .list_workers(ListWorkersRequest {})
            .await
            .context("ListWorkers")?
            .into_inner()
            .workers
            .into_iter()
            .map(|w| w.worker_id)
            .collect();
        if ids.iter().all(|id| seen.contains(id)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("workers {ids:?} not connected after 60 s; connected: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A generous bound for a migration of `tasks` tasks: a minute plus 10 ms a
/// task, so only a stuck coordinator hits it.
pub fn budget(tasks: u64) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(10 * tasks)
}

/// Adds the tail of the coordinator's log to a failed measurement's error.
pub fn with_log<T>(result: anyhow::Result<T>, coordinator: &CoordinatorProc) -> anyhow::Result<T> {
    result.map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\n--- coordinator log (tail) ---\n{}",
            coordinator.log_tail(15)
        )
    })
}
