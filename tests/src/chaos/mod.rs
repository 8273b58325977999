//! `chaos`: a cluster of real processes broken at random, reproducibly from
//! a seed, while migrations of several shapes keep arriving; then every
//! migration is checked by its event log and by the outcome its plan
//! implies.
//!
//! | module | what it holds |
//! |---|---|
//! | [`options`] | the flags, validated |
//! | [`cluster`] | the processes: coordinators, workers, proxies, the run's own PostgreSQL |
//! | [`proxy`] | an in-process TCP proxy that drops, black-holes or delays |
//! | [`postgres`] | a PostgreSQL server the harness may restart |
//! | [`faults`] | the faults, drawn from the seeded RNG, applied and undone one at a time |
//! | [`workload`] | the plan shapes, their expected outcomes, the client's part |
//! | [`verify`] | settling, then the checks at the end |
//! | [`report`] | the counts and the table printed at the end |
//!
//! One seed drives everything: the fault sequence comes from one `StdRng`
//! seeded with it, and migration `n`'s shape and sizes from an RNG seeded
//! with it and `n`. The processes' timing is not replayable, so a replay
//! runs the same faults and the same workload, not the same interleaving;
//! a failure prints the seed, the fault log with times, and the events of
//! each migration that broke a rule.

pub mod cluster;
pub mod faults;
pub mod options;
pub mod postgres;
pub mod proxy;
pub mod report;
pub mod verify;
pub mod workload;

use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use cluster::{ChaosCluster, SetupError};
pub use options::{BadOption, Options};
pub use report::Report;
use workload::{Calls, Driven};

/// Why a run could not start; what it finds is in the [`Report`].
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    BadOption(#[from] BadOption),
    #[error("setting up the cluster: {0}")]
    Setup(#[from] SetupError),
    #[error("creating {path}: {source}")]
    Markers {
        path: String,
        source: std::io::Error,
    },
}

/// Runs the harness as `opts` says and returns what it counted and found.
pub async fn run(opts: Options) -> Result<Report, RunError> {
    opts.validate()?;
    let seed = opts.seed.unwrap_or_else(rand::random);
    eprintln!(
        "chaos: backend {}, seed {seed}, {:?}",
        opts.backend, opts.duration
    );
    let mut cluster = ChaosCluster::start(&opts).await?;
    let clients = cluster.clients().await;
    let markers = cluster.shared_dir().join("chaos-markers");
    std::fs::create_dir_all(&markers).map_err(|source| RunError::Markers {
        path: markers.display().to_string(),
        source,
    })?;

    let started = Instant::now();
    let until = started + opts.duration;
    let calls = Calls::new(clients.clone());
    let workload = tokio::spawn(create_migrations(
        seed,
        until,
        Duration::from_millis(opts.create_every_ms),
        opts.max_in_flight,
        calls.clone(),
        markers,
    ));
    let mut rng = StdRng::seed_from_u64(seed);
    let faults = faults::inject(
        &mut cluster,
        &mut rng,
        started,
        until,
        Duration::from_millis(opts.fault_gap_ms),
    )
    .await;
    let mut report = Report {
        backend: opts.backend.to_string(),
        seed,
        coordinators: opts.coordinator_count(),
        workers: opts.workers,
        faults: faults.faults,
        violations: faults.failures,
        ..Report::default()
    };
    eprintln!("chaos: faults stopped; waiting for the clients' last calls");
    let driven = workload
        .await
        .unwrap_or_else(|e| vec![Err(format!("the workload panicked: {e}"))]);
    report.elapsed = started.elapsed();
    report.retried_calls = calls.retried();
    let mut tracked = Vec::new();
    for d in driven {
        match d {
            Ok(t) => tracked.push(t),
            Err(e) => report.violations.push(e),
        }
    }
    eprintln!("chaos: {} migrations created; settling", tracked.len());
    report.settled_in = verify::settle(&clients, opts.settle).await;
    verify::verify(
        &clients,
        opts.backend,
        &tracked,
        opts.pool_slots as usize,
        opts.worker_slots as usize,
        &mut report,
    )
    .await;
    if !report.violations.is_empty() {
        report.kept = Some(cluster.keep().display().to_string());
    }
    Ok(report)
}

/// Creates one migration every `every` until `until`, each driven by a task
/// of its own, and returns what every driver ended with. At most
/// `max_in_flight` are unfinished at once: a tick finding them all busy
/// waits for one to finish.
async fn create_migrations(
    seed: u64,
    until: Instant,
    every: Duration,
    max_in_flight: usize,
    calls: Calls,
    markers: std::path::PathBuf,
) -> Vec<Driven> {
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let mut drivers = JoinSet::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut n = 0;
    while Instant::now() < until {
        tick.tick().await;
        let Ok(Ok(permit)) = tokio::time::timeout_at(until, permits.clone().acquire_owned()).await
        else {
            break;
        };
        let (calls, markers) = (calls.clone(), markers.clone());
        drivers.spawn(async move {
            let driven = workload::drive(seed, n, calls.clone(), markers).await;
            if let Ok(t) = &driven {
                workload::wait_finished(&calls, n, t.id).await;
            }
            drop(permit);
            driven
        });
        n += 1;
    }
    let mut out = Vec::new();
    while let Some(done) = drivers.join_next().await {
        out.push(done.unwrap_or_else(|e| Err(format!("a migration's driver panicked: {e}"))));
    }
    out
}
