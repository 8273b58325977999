//! The faults, drawn one after another from the run's single seeded RNG:
//! which kind, which target, how long. Every fault is applied and undone
//! before the next is drawn, so at most one thing is broken at a time and
//! the sequence of faults (kinds, targets, durations) replays exactly from
//! the seed; only the moments the processes reach differ between runs.

use std::fmt;
use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;
use tokio::time::Instant;

use super::cluster::{ChaosCluster, LEASE};
use super::postgres::Shutdown;
use super::proxy::Mode;
use crate::backend::Backend;

/// The kinds of fault, in the order the report lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// `kill -9` of a coordinator, restarted on its address after a pause.
    KillCoordinator,
    /// `kill -9` of a worker, started again with the same id.
    KillWorker,
    /// SIGSTOP of a worker for longer than its lease, then SIGCONT.
    FreezeWorker,
    /// Every connection between the workers and one coordinator closed.
    DropWorkerLinks,
    /// The workers' way to one coordinator black-holed for a while.
    BlackholeWorkerLinks,
    /// Latency on the workers' way to one coordinator.
    SlowWorkerLinks,
    /// Every connection between the coordinators and PostgreSQL closed.
    DropDatabaseLinks,
    /// The coordinators' way to PostgreSQL black-holed for a while.
    BlackholeDatabase,
    /// Latency between the coordinators and PostgreSQL.
    SlowDatabase,
    /// `pg_ctl restart -m fast`.
    RestartPostgresFast,
    /// `pg_ctl restart -m immediate` (crash recovery).
    RestartPostgresImmediate,
}

impl FaultKind {
    /// The kinds a run on `backend` draws from.
    pub fn of(backend: Backend) -> &'static [FaultKind] {
        use FaultKind::*;
        match backend {
            Backend::Sqlite => &[
                KillCoordinator,
                KillWorker,
                FreezeWorker,
                DropWorkerLinks,
                BlackholeWorkerLinks,
                SlowWorkerLinks,
            ],
            Backend::Postgres => &[
                KillCoordinator,
                KillWorker,
                FreezeWorker,
                DropWorkerLinks,
                BlackholeWorkerLinks,
                SlowWorkerLinks,
                DropDatabaseLinks,
                BlackholeDatabase,
                SlowDatabase,
                RestartPostgresFast,
                RestartPostgresImmediate,
            ],
        }
    }

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillCoordinator => "kill -9 coordinator",
            FaultKind::KillWorker => "kill -9 worker",
            FaultKind::FreezeWorker => "SIGSTOP worker",
            FaultKind::DropWorkerLinks => "drop worker links",
            FaultKind::BlackholeWorkerLinks => "black-hole worker links",
            FaultKind::SlowWorkerLinks => "slow worker links",
            FaultKind::DropDatabaseLinks => "drop database links",
            FaultKind::BlackholeDatabase => "black-hole database",
            FaultKind::SlowDatabase => "slow database",
            FaultKind::RestartPostgresFast => "pg_ctl restart -m fast",
            FaultKind::RestartPostgresImmediate => "pg_ctl restart -m immediate",
        }
    }
}

/// One fault as injected: when (since the run started), what, on whom.
#[derive(Debug, Clone)]
pub struct Fault {
    pub at: Duration,
    pub kind: FaultKind,
    pub detail: String,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "+{:>7.3}s {}: {}",
            self.at.as_secs_f64(),
            self.kind.name(),
            self.detail
        )
    }
}

/// What the fault loop did.
#[derive(Debug, Default)]
pub struct FaultLog {
    pub faults: Vec<Fault>,
    /// Faults the harness could not undo (a coordinator that did not come
    /// back, a server that did not restart): violations.
    pub failures: Vec<String>,
}

/// Injects faults until `until`, a gap of about `mean_gap` between them.
pub async fn inject(
    cluster: &mut ChaosCluster,
    rng: &mut StdRng,
    started: Instant,
    until: Instant,
    mean_gap: Duration,
) -> FaultLog {
    let mut log = FaultLog::default();
    let kinds = FaultKind::of(cluster.backend());
    loop {
        let gap = mean_gap.mul_f64(rng.random_range(0.5..1.5));
        if Instant::now() + gap >= until {
            break;
        }
        tokio::time::sleep(gap).await;
        let kind = kinds[rng.random_range(0..kinds.len())];
        let at = started.elapsed();
        match apply(cluster, rng, kind).await {
            Ok(detail) => {
                let fault = Fault { at, kind, detail };
                eprintln!("chaos: {fault}");
                log.faults.push(fault);
            }
            Err(failure) => {
                let failure = format!("+{:.3}s {}: {failure}", at.as_secs_f64(), kind.name());
                eprintln!("chaos: FAILED {failure}");
                log.failures.push(failure);
            }
        }
    }
    log
}

/// Applies one fault and undoes it; returns what it did, or why the
/// cluster could not be brought back.
async fn apply(
    cluster: &mut ChaosCluster,
    rng: &mut StdRng,
    kind: FaultKind,
) -> Result<String, String> {
    let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.random_range(lo..hi));
    match kind {
        FaultKind::KillCoordinator => {
            let i = rng.random_range(0..cluster.coordinators.len());
            let pause = ms(rng, 0, 2_000);
            let Some(mut c) = cluster.coordinators[i].take() else {
                return Err(format!("coordinator {i} is not running"));
            };
            c.kill9().await;
            tokio::time::sleep(pause).await;
            // A start that fails panics (with the log); keep that panic
            // from taking the whole harness down.
            let restarted = tokio::spawn(async move {
                c.restart().await;
                c
            })
            .await;
            match restarted {
                Ok(c) => cluster.coordinators[i] = Some(c),
                Err(e) => return Err(format!("coordinator {i} did not start again: {e}")),
            }
            Ok(format!("coordinator {i}, restarted after {pause:?}"))
        }
        FaultKind::KillWorker => {
            let i = rng.random_range(0..cluster.workers.len());
            let pause = ms(rng, 0, 1_500);
            cluster.workers[i].process.kill9().await;
            tokio::time::sleep(pause).await;
            let id = cluster.workers[i].id.clone();
            cluster.workers[i].process = cluster.start_worker(&id);
            Ok(format!("worker {id}, restarted after {pause:?}"))
        }
        FaultKind::FreezeWorker => {
            let i = rng.random_range(0..cluster.workers.len());
            let frozen = LEASE.mul_f64(rng.random_range(1.3..2.5));
            let w = &cluster.workers[i];
            w.process.freeze();
            tokio::time::sleep(frozen).await;
            w.process.resume();
            Ok(format!("worker {} frozen {frozen:?}", w.id))
        }
        FaultKind::DropWorkerLinks => {
            let i = rng.random_range(0..cluster.worker_proxies.len());
            cluster.worker_proxies[i].drop_connections();
            Ok(format!("to coordinator {i}"))
        }
        FaultKind::BlackholeWorkerLinks => {
            let i = rng.random_range(0..cluster.worker_proxies.len());
            let held = ms(rng, 500, 4_000);
            let proxy = &cluster.worker_proxies[i];
            proxy.set(Mode::Blackhole);
            tokio::time::sleep(held).await;
            proxy.set(Mode::Pass);
            Ok(format!("to coordinator {i} for {held:?}"))
        }
        FaultKind::SlowWorkerLinks => {
            let i = rng.random_range(0..cluster.worker_proxies.len());
            let delay = ms(rng, 20, 400);
            let held = ms(rng, 1_000, 5_000);
            let proxy = &cluster.worker_proxies[i];
            proxy.set(Mode::Latency(delay));
            tokio::time::sleep(held).await;
            proxy.set(Mode::Pass);
            Ok(format!("to coordinator {i}: +{delay:?} for {held:?}"))
        }
        FaultKind::DropDatabaseLinks => {
            database_proxy(cluster)?.drop_connections();
            Ok("every coordinator".into())
        }
        FaultKind::BlackholeDatabase => {
            let held = ms(rng, 500, 4_000);
            let proxy = database_proxy(cluster)?;
            proxy.set(Mode::Blackhole);
            tokio::time::sleep(held).await;
            proxy.set(Mode::Pass);
            Ok(format!("for {held:?}"))
        }
        FaultKind::SlowDatabase => {
            let delay = ms(rng, 5, 200);
            let held = ms(rng, 1_000, 5_000);
            let proxy = database_proxy(cluster)?;
            proxy.set(Mode::Latency(delay));
            tokio::time::sleep(held).await;
            proxy.set(Mode::Pass);
            Ok(format!("+{delay:?} for {held:?}"))
        }
        FaultKind::RestartPostgresFast | FaultKind::RestartPostgresImmediate => {
            let how = if kind == FaultKind::RestartPostgresFast {
                Shutdown::Fast
            } else {
                Shutdown::Immediate
            };
            let pg = cluster.pg.clone().ok_or("no PostgreSQL server")?;
            let began = Instant::now();
            match tokio::task::spawn_blocking(move || pg.restart(how)).await {
                Ok(Ok(())) => Ok(format!("back after {:?}", began.elapsed())),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

fn database_proxy(cluster: &ChaosCluster) -> Result<&super::proxy::Proxy, String> {
    cluster
        .pg_proxy
        .as_ref()
        .ok_or_else(|| "no database proxy".to_string())
}
