//! The bench command's flags, and the sizes of every measurement they imply.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Which database backends to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    Sqlite,
    Postgres,
    All,
}

/// A database backend of the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `sqlite` or `postgres`, as in figure keys.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// Measures a real coordinator and real workers on loopback, beside a bare
/// tonic echo and bare sqlx transactions on the same machine.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench", version)]
pub struct Options {
    /// Small sizes (2,000 tasks, 50 stages, 20 creates, tiny scale tests):
    /// a smoke run of the harness in seconds.
    #[arg(long)]
    pub quick: bool,

    /// Database backend(s) of the coordinator.
    #[arg(long, value_enum, default_value = "sqlite")]
    pub backend: BackendChoice,

    /// Runs of every measurement; the table shows the median (and min/max).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,

    /// Where to write the JSON results [default: <target>/bench/results.json].
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// Worker processes running `noop` tasks in the throughput tests.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,

    /// Slots of each worker process (workers × slots is also the echo
    /// baseline's concurrency). The default saturates the coordinator on
    /// the 2-core reference machine: 4 × 64 left it waiting on round trips
    /// (SQLite 15,100 tasks/s, PostgreSQL 8,600), 4 × 128 reached 18,800
    /// and 10,000, and 4 × 256 no more (same run of each).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub slots: u32,

    /// Directory holding `coordinator` and `worker` executables; by default
    /// they are built with the bench's own cargo profile and target dir.
    #[arg(long, env = "STAGECOACH_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,

    /// Parent directory of the run's temporary files (databases, logs)
    /// [default: the system temp dir].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,

    /// Skip the scale tests (1M-task fan-out, 10k streams, 10k queued).
    #[arg(long)]
    pub no_scale: bool,

    /// Override: tasks of the throughput migration.
    #[arg(long)]
    pub tasks: Option<u32>,

    /// Override: stages of the stage-transition migration.
    #[arg(long)]
    pub stages: Option<u32>,

    /// Override: migrations created for the start latency.
    #[arg(long)]
    pub creates: Option<u32>,
}

impl Options {
    /// The sizes these flags ask for.
    pub fn sizes(&self) -> Sizes {
        let mut s = if self.quick {
            Sizes::QUICK
        } else {
            Sizes::FULL
        };
        if let Some(t) = self.tasks {
            s.throughput_tasks = t.max(1);
        }
        if let Some(n) = self.stages {
            s.stages = n.max(2);
        }
        if let Some(n) = self.creates {
            s.creates = n.max(1);
        }
        s
    }

    /// The backends to measure, in order.
    pub fn backends(&self) -> Vec<Backend> {
        match self.backend {
            BackendChoice::Sqlite => vec![Backend::Sqlite],
            BackendChoice::Postgres => vec![Backend::Postgres],
            BackendChoice::All => vec![Backend::Sqlite, Backend::Postgres],
        }
    }

    /// Concurrency of the throughput workers: workers × slots.
    pub fn concurrency(&self) -> u32 {
        self.workers * self.slots
    }
}

/// How big each measurement is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Sizes {
    /// `noop` tasks of the throughput migration (one stage).
    pub throughput_tasks: u32,
    /// Stages (one raw-worker task each) of the stage-transition migration.
    pub stages: u32,
    /// Migrations created one after another for the start latency.
    pub creates: u32,
    /// Fan-out tasks of the scale migration's first stage.
    pub fanout_tasks: u32,
    /// `noop` tasks each fan-out task adds to the dynamic second stage.
    pub fanout_per_task: u32,
    /// Idle worker streams opened on one coordinator.
    pub streams: u32,
    /// HTTP/2 connections the idle streams are spread over.
    pub stream_connections: u32,
    /// Migrations queued in a one-slot pool.
    pub queued: u32,
    /// Slot frees timed in the queued pool.
    pub queued_frees: u32,
    /// How long each baseline runs, in milliseconds.
    pub baseline_ms: u64,
}

impl Sizes {
    /// The sizes of a full run.
    pub const FULL: Sizes = Sizes {
        throughput_tasks: 100_000,
        stages: 1_000,
        creates: 200,
        fanout_tasks: 100,
        fanout_per_task: 10_000,
        streams: 10_000,
        stream_connections: 100,
        queued: 10_000,
        queued_frees: 21,
        baseline_ms: 3_000,
    };

    /// The sizes of `--quick`: every figure, tiny.
    pub const QUICK: Sizes = Sizes {
        throughput_tasks: 2_000,
        stages: 50,
        creates: 20,
        fanout_tasks: 4,
        fanout_per_task: 50,
        streams: 200,
        stream_connections: 4,
        queued: 20,
        queued_frees: 5,
        baseline_ms: 500,
    };

    /// Every task of the fan-out migration, both stages.
    pub fn fanout_total(&self) -> u64 {
        self.fanout_tasks as u64 * (1 + self.fanout_per_task as u64)
    }
}
