//! Several coordinators sharing one PostgreSQL database, and workers that
//! know one or several of them: the deployment the PostgreSQL backend is
//! for. Everything lives in one temporary directory, kept (with every
//! process's log tail printed) when a test panics.
//!
//! ```text
//! <tmp>/coordinator-<i>/coordinator.log
//! <tmp>/shared/                 workers' shared dir
//! <tmp>/worker-<id>.log
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use crate::backend::{Backend, postgres_database};
use crate::client::Client;
use crate::process::{Coordinator, Worker};

/// Coordinators on one database, and their workers. Fields drop in order:
/// workers, then coordinators, then the directory.
#[derive(Debug)]
pub struct Fleet {
    /// The workers, as started.
    pub workers: Vec<Worker>,
    /// The coordinators, `0..`, as started.
    pub coordinators: Vec<Coordinator>,
    database: String,
    coordinator_args: Vec<String>,
    dir: Option<TempDir>,
    path: PathBuf,
}

impl Fleet {
    /// Starts `coordinators` coordinators with `coordinator_args` on a new
    /// database of this test binary's PostgreSQL server.
    pub async fn start(coordinators: usize, coordinator_args: &[&str]) -> Fleet {
        let dir = tempfile::Builder::new()
            .prefix("stagecoach-fleet-")
            .tempdir()
            .expect("create temp dir");
        let mut fleet = Fleet {
            workers: Vec::new(),
            coordinators: Vec::new(),
            database: postgres_database().await,
            coordinator_args: coordinator_args.iter().map(|s| s.to_string()).collect(),
            path: dir.path().to_path_buf(),
            dir: Some(dir),
        };
        for _ in 0..coordinators {
            fleet.add_coordinator().await;
        }
        fleet
    }

    /// Starts one more coordinator on the fleet's database and returns its
    /// index.
    pub async fn add_coordinator(&mut self) -> usize {
        let i = self.coordinators.len();
        let mut args = vec!["--database", self.database.as_str()];
        args.extend(self.coordinator_args.iter().map(String::as_str));
        let dir = self.path.join(format!("coordinator-{i}"));
        let c = Coordinator::start(Backend::Postgres, &dir, &args).await;
        self.coordinators.push(c);
        i
    }

    /// The database every coordinator uses.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// `http://ADDR` of coordinator `i`.
    pub fn url(&self, i: usize) -> String {
        self.coordinators[i].url()
    }

    /// Starts a worker `id` with `slots` slots that knows the coordinators
    /// `of` (indices, in this order; the worker shuffles them and streams
    /// from one at a time). It is not waited for.
    pub fn add_worker(&mut self, id: &str, slots: u32, of: &[usize]) -> &mut Worker {
        let urls: Vec<String> = of.iter().map(|&i| self.url(i)).collect();
        let worker = Worker::start(&urls.join(","), slots, &self.shared_dir(), id);
        self.workers.push(worker);
        self.workers.last_mut().expect("just pushed")
    }

    /// A new client of coordinator `i`.
    pub async fn client(&self, i: usize) -> Client {
        Client::connect(&self.url(i)).await
    }

    /// Which coordinator each connected worker streams from, as the
    /// coordinators `of` list them (ListWorkers shows a coordinator's own
    /// streams only).
    pub async fn streams(&self, of: &[usize]) -> BTreeMap<String, usize> {
        let mut on = BTreeMap::new();
        for &i in of {
            let client = self.client(i).await;
            let workers = tokio::time::timeout(Duration::from_secs(5), client.list_workers())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            for w in workers {
                on.insert(w.worker_id, i);
            }
        }
        on
    }

    /// Waits until every worker streams from one of the coordinators `of`,
    /// and returns where each one is. Panics after `timeout`.
    pub async fn wait_for_streams(
        &self,
        of: &[usize],
        timeout: Duration,
    ) -> BTreeMap<String, usize> {
        let want: Vec<&str> = self.workers.iter().map(Worker::id).collect();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let on = self.streams(of).await;
            if want.iter().all(|id| on.contains_key(*id)) {
                return on;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "after {timeout:?} not every worker streams from one of coordinators {of:?}: {on:?}, want {want:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The temporary directory holding everything.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The workers' shared directory.
    pub fn shared_dir(&self) -> PathBuf {
        self.path.join("shared")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("===== test files kept in {} =====", dir.keep().display());
        }
    }
}
