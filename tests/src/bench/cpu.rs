//! Processor time per task: where a throughput run's CPU goes — the
//! coordinator, the workers, the database server's backends, and the whole
//! machine — read from Linux's `/proc` before and after the run.
//!
//! It says which process to optimise, and how close a run came to using
//! every core: tasks/s × µs/task ÷ 1,000,000 is the number of cores it kept
//! busy. It moves with the machine's speed as tasks/s does (a shared machine
//! has slow and fast phases), so builds are compared in interleaved runs.

use std::collections::HashMap;

use anyhow::Context;

/// `/proc` counts CPU time in ticks of 1/100 s (Linux's `USER_HZ`, fixed for
/// user space on every architecture we run on).
const TICK_US: f64 = 10_000.0;

/// The processes whose CPU time a run charges to each part.
#[derive(Debug, Clone)]
pub struct Parts {
    pub coordinator: u32,
    pub workers: Vec<u32>,
    /// The PostgreSQL database the coordinator uses: its server backends
    /// (found by their process title) are the database's part. `None` for
    /// SQLite, which runs inside the coordinator.
    pub database: Option<String>,
}

/// CPU time so far, in ticks: the machine's busy time and each process's.
#[derive(Debug, Clone)]
pub struct Sample {
    machine: u64,
    coordinator: u64,
    workers: HashMap<u32, u64>,
    database: HashMap<u32, u64>,
}

/// CPU time per task of one run, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct PerTask {
    /// Every process on the machine, the kernel's work included.
    pub machine_us: f64,
    pub coordinator_us: f64,
    pub workers_us: f64,
    /// The PostgreSQL backends serving the coordinator; `None` on SQLite.
    pub database_us: Option<f64>,
}

impl Parts {
    /// The CPU time used so far.
    pub fn sample(&self) -> anyhow::Result<Sample> {
        let ticks = |pids: &[u32]| -> HashMap<u32, u64> {
            pids.iter()
                .filter_map(|&p| Some((p, process_ticks(p)?)))
                .collect()
        };
        let backends = match &self.database {
            Some(db) => database_backends(db),
            None => Vec::new(),
        };
        Ok(Sample {
            machine: machine_busy_ticks()?,
            coordinator: process_ticks(self.coordinator)
                .context("the coordinator's CPU time (has it exited?)")?,
            workers: ticks(&self.workers),
            database: ticks(&backends),
        })
    }

    /// CPU time per task between `before` and `after`, which ran `tasks`.
    /// A backend that started meanwhile counts from zero.
    pub fn per_task(&self, before: &Sample, after: &Sample, tasks: u32) -> PerTask {
        let us = |ticks: u64| ticks as f64 * TICK_US / f64::from(tasks.max(1));
        let grown = |b: &HashMap<u32, u64>, a: &HashMap<u32, u64>| -> u64 {
            a.iter()
                .map(|(pid, t)| t.saturating_sub(b.get(pid).copied().unwrap_or(0)))
                .sum()
        };
        PerTask {
            machine_us: us(after.machine.saturating_sub(before.machine)),
            coordinator_us: us(after.coordinator.saturating_sub(before.coordinator)),
            workers_us: us(grown(&before.workers, &after.workers)),
            database_us: self
                .database
                .as_ref()
                .map(|_| us(grown(&before.database, &after.database))),
        }
    }
}

/// User plus system time of a process, in ticks; `None` once it is gone.
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its ')'.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    // utime and stime are fields 14 and 15 of proc(5); the slice starts at
    // field 3, so they are at indexes 11 and 12.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Busy time of all CPUs (everything but idle and iowait), in ticks.
fn machine_busy_ticks() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let (idle, iowait) = (cpu.get(3).copied(), cpu.get(4).copied());
    Ok(cpu.iter().sum::<u64>() - idle.unwrap_or(0) - iowait.unwrap_or(0))
}

/// PostgreSQL backends connected to database `db`: processes whose title is
/// `postgres: USER DB …`.
fn database_backends(db: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let title = String::from_utf8_lossy(&c);
                let mut words = title.split_whitespace();
                words.next() == Some("postgres:") && words.nth(1) == Some(db)
            })
        })
        .collect()
}

/// The database name of a `postgres://…/NAME?…` URL; `None` for any other
/// URL (SQLite's database runs inside the coordinator).
pub fn database_name(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))?;
    let path = rest.split_once('/')?.1;
    let name = path.split(['?', '#']).next()?;
    (!name.is_empty()).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_comes_from_the_url_path() {
        let name = |u: &str| database_name(u);
        assert_eq!(
            name("postgres://postgres@127.0.0.1:5432/t_1_4").as_deref(),
            Some("t_1_4")
        );
        assert_eq!(
            name("postgresql://u:p@h/db?sslmode=disable").as_deref(),
            Some("db")
        );
        assert_eq!(name("postgres://h:5432/"), None);
        assert_eq!(name("sqlite:///tmp/coord.db"), None);
    }

    #[test]
    fn a_busy_process_is_charged_its_own_time() {
        let parts = Parts {
            coordinator: std::process::id(),
            workers: vec![std::process::id()],
            database: None,
        };
        let before = parts.sample().expect("sample");
        // Spin until this process has used ten ticks: the machine's counters
        // in /proc/stat can lag a tick or two behind a process's own (after
        // two ticks they once read no busy time at all).
        let start = process_ticks(std::process::id()).expect("own ticks");
        let mut x = 0u64;
        while process_ticks(std::process::id()).expect("own ticks") < start + 10 {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
        }
        std::hint::black_box(x);
        let after = parts.sample().expect("sample");
        let per = parts.per_task(&before, &after, 1);
        assert!(per.coordinator_us >= 10.0 * TICK_US, "{per:?}");
        assert_eq!(per.coordinator_us, per.workers_us);
        assert!(per.machine_us >= per.coordinator_us * 0.5, "{per:?}");
        assert_eq!(per.database_us, None);
    }
}
