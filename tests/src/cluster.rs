//! A whole local system in one temporary directory: a coordinator on either
//! backend and some workers sharing one output directory.
//!
//! Layout of the directory:
//!
//! ```text
//! <tmp>/coordinator/coordinator.log, coord.db (SQLite)
//! <tmp>/shared/                 workers' shared dir (migration-<id>/…)
//! <tmp>/worker-<id>.log
//! ```
//!
//! When a test panics the directory is kept (its path is printed) and every
//! process prints the tail of its log; otherwise it is removed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use crate::backend::Backend;
use crate::client::Client;
use crate::process::{Coordinator, Worker};

/// Coordinator flags for fault tests: heartbeats every 200 ms, leases of
/// 1.5 s, sweeps every 100 ms, so a lost worker's task moves on within about
/// two seconds.
pub const FAST: [&str; 6] = [
    "--heartbeat-interval-ms",
    "200",
    "--lease-duration-ms",
    "1500",
    "--sweep-interval-ms",
    "100",
];

/// A coordinator and its workers. Fields drop in order: workers, then the
/// coordinator, then the directory.
#[derive(Debug)]
pub struct Cluster {
    /// The workers, `w1`, `w2`, … as started.
    pub workers: Vec<Worker>,
    /// The coordinator.
    pub coordinator: Coordinator,
    dir: Option<TempDir>,
    path: PathBuf,
}

impl Cluster {
    /// Starts a coordinator on `backend` with default flags and `workers`
    /// workers of `slots` slots each, and waits until the workers are
    /// connected.
    pub async fn start(backend: Backend, workers: usize, slots: u32) -> Cluster {
        Self::start_with(backend, &[], workers, slots).await
    }

    /// Like [`Cluster::start`], passing `coordinator_args` to `coordinator serve`.
    pub async fn start_with(
        backend: Backend,
        coordinator_args: &[&str],
        workers: usize,
        slots: u32,
    ) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("stagecoach-test-")
            .tempdir()
            .expect("create temp dir");
        let path = dir.path().to_path_buf();
        let coordinator =
            Coordinator::start(backend, &path.join("coordinator"), coordinator_args).await;
        let mut cluster = Cluster {
            workers: Vec::new(),
            coordinator,
            dir: Some(dir),
            path,
        };
        for i in 1..=workers {
            cluster.add_worker(&format!("w{i}"), slots);
        }
        let ids: Vec<String> = cluster.workers.iter().map(|w| w.id().to_string()).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        cluster
            .client()
            .await
            .wait_for_workers(&ids, Duration::from_secs(30))
            .await;
        cluster
    }

    /// Like [`Cluster::start_with`], with the [`FAST`] timings before
    /// `coordinator_args`.
    pub async fn start_fast(
        backend: Backend,
        coordinator_args: &[&str],
        workers: usize,
        slots: u32,
    ) -> Cluster {
        let args: Vec<&str> = FAST.iter().chain(coordinator_args).copied().collect();
        Self::start_with(backend, &args, workers, slots).await
    }

    /// The backend its coordinator runs on.
    pub fn backend(&self) -> Backend {
        self.coordinator.backend()
    }

    /// The worker with id `id`. Panics if there is none.
    pub fn worker_mut(&mut self, id: &str) -> &mut Worker {
        self.workers
            .iter_mut()
            .find(|w| w.id() == id)
            .unwrap_or_else(|| panic!("no worker {id:?}"))
    }

    /// Starts one more worker; it is not waited for.
    pub fn add_worker(&mut self, id: &str, slots: u32) -> &mut Worker {
        let worker = Worker::start(&self.coordinator.url(), slots, &self.shared_dir(), id);
        self.workers.push(worker);
        self.workers.last_mut().expect("just pushed")
    }

    /// A new client of the coordinator.
    pub async fn client(&self) -> Client {
        Client::connect(&self.coordinator.url()).await
    }

    /// The temporary directory holding everything.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The workers' shared directory, where migrations write their output.
    pub fn shared_dir(&self) -> PathBuf {
        self.path.join("shared")
    }

    /// Where the sample export of `migration_id` puts its archive.
    pub fn export_archive(&self, migration_id: i64) -> PathBuf {
        self.shared_dir()
            .join(format!("migration-{migration_id}"))
            .join("export.tar.gz")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("===== test files kept in {} =====", dir.keep().display());
        }
    }
}
