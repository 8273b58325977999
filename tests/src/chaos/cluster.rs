//! The cluster the harness breaks: real coordinator and worker processes in
//! one temporary directory, with a [`Proxy`] in front of every coordinator
//! (the workers' way in) and, on PostgreSQL, one in front of the run's own
//! server (the coordinators' way to their store).
//!
//! ```text
//! client (harness) ──────────────────────────► coordinator i ──► pg proxy ──► PostgreSQL
//! worker ──► worker proxy i ─────────────────► coordinator i
//! ```
//!
//! The harness's own clients talk to the coordinators directly: it is the
//! operator watching, not a victim of the faults. On SQLite there is one
//! coordinator, restarted in place on its file.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;

use super::options::Options;
use super::postgres::ChaosPostgres;
use super::proxy::Proxy;
use crate::backend::Backend;
use crate::client::Client;
use crate::cluster::FAST;
use crate::process::{Coordinator, Worker};

/// Lease expiries a task survives. Faults come every second or two, so a
/// task may lose its worker several times; the default (5) would fail plans
/// that must succeed for reasons the harness itself caused.
pub const MAX_REASSIGNMENTS: u32 = 20;

/// Lease duration the coordinators run with ([`FAST`]), for faults that
/// must outlast it.
pub const LEASE: Duration = Duration::from_millis(1_500);

/// Why the cluster could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("temporary directory: {0}")]
    TempDir(std::io::Error),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] super::postgres::PgError),
    #[error("a proxy to {target}: {source}")]
    Proxy {
        target: String,
        source: std::io::Error,
    },
    #[error("the PostgreSQL set-up task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// One worker process and what it needs to start again.
#[derive(Debug)]
pub struct WorkerSlot {
    pub id: String,
    pub process: Worker,
}

/// Every process of the run. Fields drop in order: workers, coordinators,
/// proxies, the PostgreSQL server, the directory.
#[derive(Debug)]
pub struct ChaosCluster {
    pub workers: Vec<WorkerSlot>,
    /// `None` while a restart is under way (or after one failed).
    pub coordinators: Vec<Option<Coordinator>>,
    pub worker_proxies: Vec<Proxy>,
    pub pg_proxy: Option<Proxy>,
    pub pg: Option<Arc<ChaosPostgres>>,
    dir: Option<TempDir>,
    path: PathBuf,
    backend: Backend,
    worker_slots: u32,
    worker_url: String,
    urls: Vec<String>,
}

impl ChaosCluster {
    /// Starts the server (PostgreSQL), the coordinators, their proxies and
    /// the workers, and waits until every worker streams from someone.
    pub async fn start(opts: &Options) -> Result<ChaosCluster, SetupError> {
        let dir = tempfile::Builder::new()
            .prefix("stagecoach-chaos-")
            .tempdir()
            .map_err(SetupError::TempDir)?;
        let path = dir.path().to_path_buf();
        let (pg, pg_proxy) = match opts.backend {
            Backend::Sqlite => (None, None),
            Backend::Postgres => {
                let pg = tokio::task::spawn_blocking(ChaosPostgres::start).await??;
                let target = std::net::SocketAddr::from(([127, 0, 0, 1], pg.port()));
                let proxy = proxy_to(target).await?;
                (Some(Arc::new(pg)), Some(proxy))
            }
        };
        let pool_slots = opts.pool_slots.to_string();
        let reassignments = MAX_REASSIGNMENTS.to_string();
        let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
        args.extend(
            [
                "--default-pool-slots",
                &pool_slots,
                "--max-reassignments",
                &reassignments,
            ]
            .map(String::from),
        );
        if let Some(proxy) = &pg_proxy {
            args.push("--database".into());
            args.push(format!("postgres://postgres@{}/postgres", proxy.addr()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut coordinators = Vec::new();
        let mut worker_proxies = Vec::new();
        // One after the other: the first one creates the schema.
        for i in 0..opts.coordinator_count() {
            let dir = path.join(format!("coordinator-{i}"));
            let c = Coordinator::start(opts.backend, &dir, &args).await;
            worker_proxies.push(proxy_to(c.addr()).await?);
            coordinators.push(Some(c));
        }
        let urls = coordinators
            .iter()
            .flatten()
            .map(Coordinator::url)
            .collect();
        let worker_url = worker_proxies
            .iter()
            .map(|p| p.addr().to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = ChaosCluster {
            workers: Vec::new(),
            coordinators,
            worker_proxies,
            pg_proxy,
            pg,
            dir: Some(dir),
            path,
            backend: opts.backend,
            worker_slots: opts.worker_slots,
            worker_url,
            urls,
        };
        for i in 1..=opts.workers {
            let id = format!("w{i}");
            let process = cluster.start_worker(&id);
            cluster.workers.push(WorkerSlot { id, process });
        }
        cluster.wait_for_workers(Duration::from_secs(60)).await;
        Ok(cluster)
    }

    /// Starts worker `id` on every coordinator's proxy (again, after a kill).
    pub fn start_worker(&self, id: &str) -> Worker {
        Worker::start(&self.worker_url, self.worker_slots, &self.shared_dir(), id)
    }

    /// Waits until every worker streams from one of the coordinators (as
    /// their ListWorkers say); gives up quietly after `timeout`, since the
    /// checks at the end say what went wrong.
    pub async fn wait_for_workers(&self, timeout: Duration) {
        let want: Vec<&str> = self.workers.iter().map(|w| w.id.as_str()).collect();
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            let mut seen = Vec::new();
            for client in self.clients().await {
                let listed = tokio::time::timeout(Duration::from_secs(3), client.list_workers());
                if let Ok(Ok(workers)) = listed.await {
                    seen.extend(workers.into_iter().map(|w| w.worker_id));
                }
            }
            if want.iter().all(|id| seen.iter().any(|s| s == id)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The backend the coordinators run on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Slots each worker declares.
    pub fn worker_slots(&self) -> u32 {
        self.worker_slots
    }

    /// `http://ADDR` of each coordinator, directly (not through a proxy);
    /// stable across restarts.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// A client of each coordinator.
    pub async fn clients(&self) -> Vec<Client> {
        let mut clients = Vec::new();
        for url in &self.urls {
            clients.push(Client::connect(url).await);
        }
        clients
    }

    /// Where the workers keep their files, and the harness its marker files.
    pub fn shared_dir(&self) -> PathBuf {
        self.path.join("shared")
    }

    /// Keeps the directory (logs, SQLite files) after the run and returns
    /// its path.
    pub fn keep(&mut self) -> PathBuf {
        if let Some(dir) = self.dir.take() {
            return dir.keep();
        }
        self.path.clone()
    }
}

async fn proxy_to(target: std::net::SocketAddr) -> Result<Proxy, SetupError> {
    Proxy::start(target)
        .await
        .map_err(|source| SetupError::Proxy {
            target: target.to_string(),
            source,
        })
}
