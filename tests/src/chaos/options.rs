//! The chaos command's flags, validated once before anything starts.

use std::time::Duration;

use clap::Parser;

use crate::backend::Backend;
use crate::fuzz::{parse_backend, parse_duration};

/// The chaos harness's flags.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "chaos",
    about = "Random, seeded faults against a cluster of real processes, checked by the event log"
)]
pub struct Options {
    /// `sqlite` (one coordinator, restarted in place) or `postgres` (three
    /// coordinators on one database of a PostgreSQL server of the run's own).
    #[arg(long, value_parser = parse_backend, default_value = "sqlite")]
    pub backend: Backend,
    /// How long faults are injected and migrations created (`90s`, `5m`).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub duration: Duration,
    /// The run's seed; a random one (printed) when not given.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Coordinators on PostgreSQL (SQLite always runs one).
    #[arg(long, default_value_t = 3)]
    pub coordinators: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Slots of each worker.
    #[arg(long, default_value_t = 4)]
    pub worker_slots: u32,
    /// Slots of the `default` pool (fewer than the migrations in flight, so
    /// some queue).
    #[arg(long, default_value_t = 6)]
    pub pool_slots: u32,
    /// Milliseconds between two new migrations.
    #[arg(long, default_value_t = 400)]
    pub create_every_ms: u64,
    /// Most migrations unfinished at once; creation waits beyond it, so a
    /// slowed cluster is not buried under a queue.
    #[arg(long, default_value_t = 24)]
    pub max_in_flight: usize,
    /// Mean milliseconds between the end of one fault and the next.
    #[arg(long, default_value_t = 1_500)]
    pub fault_gap_ms: u64,
    /// Longest wait, after the faults stop, for every migration to finish.
    #[arg(long, value_parser = parse_duration, default_value = "180s")]
    pub settle: Duration,
}

/// A flag with a value the harness cannot run with.
#[derive(Debug, thiserror::Error)]
#[error("--{flag} {value}: {why}")]
pub struct BadOption {
    pub flag: &'static str,
    pub value: String,
    pub why: &'static str,
}

impl Options {
    /// A short run for tests, with a random seed.
    pub fn smoke(backend: Backend, duration: Duration) -> Options {
        Options {
            backend,
            duration,
            seed: None,
            coordinators: 3,
            workers: 3,
            worker_slots: 4,
            pool_slots: 6,
            create_every_ms: 400,
            max_in_flight: 24,
            fault_gap_ms: 800,
            settle: Duration::from_secs(150),
        }
    }

    /// Refuses values that would make the run meaningless.
    pub fn validate(&self) -> Result<(), BadOption> {
        let bad = |flag, value: &dyn ToString, why| {
            Err(BadOption {
                flag,
                value: value.to_string(),
                why,
            })
        };
        if self.duration < Duration::from_secs(5) {
            return bad(
                "duration",
                &format!("{:?}", self.duration),
                "give at least 5s",
            );
        }
        if self.backend == Backend::Postgres && !(1..=8).contains(&self.coordinators) {
            return bad("coordinators", &self.coordinators, "give 1 to 8");
        }
        if !(2..=32).contains(&self.workers) {
            return bad(
                "workers",
                &self.workers,
                "give 2 to 32 (work must be able to move to another worker)",
            );
        }
        if !(1..=64).contains(&self.worker_slots) {
            return bad("worker-slots", &self.worker_slots, "give 1 to 64");
        }
        if self.pool_slots == 0 {
            return bad("pool-slots", &self.pool_slots, "give at least 1");
        }
        if self.create_every_ms < 20 {
            return bad("create-every-ms", &self.create_every_ms, "give at least 20");
        }
        if self.max_in_flight == 0 {
            return bad("max-in-flight", &self.max_in_flight, "give at least 1");
        }
        if self.fault_gap_ms < 50 {
            return bad("fault-gap-ms", &self.fault_gap_ms, "give at least 50");
        }
        Ok(())
    }

    /// How many coordinators the run starts.
    pub fn coordinator_count(&self) -> usize {
        match self.backend {
            Backend::Sqlite => 1,
            Backend::Postgres => self.coordinators,
        }
    }
}
