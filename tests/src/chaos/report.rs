//! What a chaos run counted, and the table it prints. The last line is
//! `N migrations, M tasks, F faults, V violations`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::faults::{Fault, FaultKind};

/// Everything a run counted.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub backend: String,
    pub seed: u64,
    /// Faults and workload, then the settling.
    pub elapsed: Duration,
    pub settled_in: Duration,
    pub coordinators: usize,
    pub workers: usize,
    /// Migrations by shape, then final state.
    pub migrations: BTreeMap<(&'static str, String), usize>,
    pub migration_count: usize,
    pub tasks: usize,
    pub faults: Vec<Fault>,
    /// Events of each kind over every migration (TASK_LEASE_EXPIRED,
    /// REPORT_REJECTED, …).
    pub events: BTreeMap<String, usize>,
    /// Assignments beyond each task's first (after a lease expired, a
    /// retry, a hand-back or a client retry).
    pub reassignments: usize,
    /// The workload's calls sent again after a transient answer, by RPC
    /// and code.
    pub retried_calls: BTreeMap<(String, String), u64>,
    /// The most migrations running at once, and leases one worker held.
    pub max_running: usize,
    pub max_worker_leases: usize,
    /// Each violation, with what shows it.
    pub violations: Vec<String>,
    /// Where the run's logs were kept (only when something failed).
    pub kept: Option<String>,
}

impl Report {
    /// Faults of each kind.
    pub fn fault_counts(&self) -> BTreeMap<FaultKind, usize> {
        let mut counts = BTreeMap::new();
        for f in &self.faults {
            *counts.entry(f.kind).or_default() += 1;
        }
        counts
    }

    fn event(&self, kind: &str) -> usize {
        self.events.get(kind).copied().unwrap_or(0)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "chaos on {}, seed {}: {} coordinators, {} workers, {:.1?} of faults and work, settled in {:.1?}",
            self.backend, self.seed, self.coordinators, self.workers, self.elapsed, self.settled_in
        )?;
        writeln!(f, "{:<36} {:>10}  final states", "shape", "migrations")?;
        let mut by_shape: BTreeMap<&str, Vec<(&str, usize)>> = BTreeMap::new();
        for ((shape, state), n) in &self.migrations {
            by_shape.entry(shape).or_default().push((state, *n));
        }
        for (shape, states) in &by_shape {
            let total: usize = states.iter().map(|(_, n)| n).sum();
            let states: Vec<String> = states.iter().map(|(s, n)| format!("{s} {n}")).collect();
            writeln!(f, "{shape:<36} {total:>10}  {}", states.join(", "))?;
        }
        writeln!(f, "{:<44} {:>6}", "fault", "count")?;
        for (kind, n) in self.fault_counts() {
            writeln!(f, "{:<44} {n:>6}", kind.name())?;
        }
        writeln!(f, "{:<44} {:>6}", "tasks", self.tasks)?;
        writeln!(f, "{:<44} {:>6}", "reassignments", self.reassignments)?;
        for (label, kind) in [
            ("leases expired", "TASK_LEASE_EXPIRED"),
            ("attempts handed back", "TASK_HANDED_BACK"),
            ("retries after a failure", "TASK_RETRYING"),
            ("rejected reports", "REPORT_REJECTED"),
            ("client retries", "MIGRATION_RETRIED"),
        ] {
            writeln!(f, "{label:<44} {:>6}", self.event(kind))?;
        }
        writeln!(
            f,
            "{:<44} {:>6}",
            "most migrations running", self.max_running
        )?;
        writeln!(
            f,
            "{:<44} {:>6}",
            "most leases on one worker", self.max_worker_leases
        )?;
        for ((rpc, code), n) in &self.retried_calls {
            writeln!(f, "{:<44} {n:>6}", format!("{rpc} retried after {code}"))?;
        }
        if !self.violations.is_empty() {
            writeln!(f, "replay: --backend {} --seed {}", self.backend, self.seed)?;
            writeln!(f, "faults, in order:")?;
            for fault in &self.faults {
                writeln!(f, "  {fault}")?;
            }
            for v in &self.violations {
                writeln!(f, "VIOLATION: {v}")?;
            }
            if let Some(dir) = &self.kept {
                writeln!(f, "logs kept in {dir}")?;
            }
        }
        write!(
            f,
            "{} migrations, {} tasks, {} faults, {} violations",
            self.migration_count,
            self.tasks,
            self.faults.len(),
            self.violations.len()
        )
    }
}
