//! When each lease this coordinator sent left, until its report comes back:
//! the `stagecoach_task_duration_seconds` histogram.
//!
//! In memory because the database keeps no lease start (a column for it
//! would cost every claim a write, and every report path of both backends
//! a change, for a metric). So it measures what this process saw: a report
//! that reaches another coordinator (a worker that moved) is not observed
//! here, nor there. One lock per batch of assignments or reports, not per
//! task; a std mutex, never held across an await.
//!
//! An entry ends with its lease's report, a hand-back, a cancel notice
//! (`Effects::revoked`), or a lease expiry of its worker (`Effects::lost`:
//! all that worker's timers go, as a worker that loses one lease has
//! usually lost all). Past [`MOST`] entries new leases are not timed, so a
//! leak can cost memory only up to a bound.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::domain::LeaseToken;

/// Most leases timed at once (~48 bytes each).
const MOST: usize = 1 << 20;

#[derive(Default)]
pub(super) struct TaskTimer {
    started: Mutex<Timers>,
}

#[derive(Default)]
struct Timers {
    by_worker: HashMap<String, HashMap<LeaseToken, Instant>>,
    len: usize,
}

impl TaskTimer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Timers> {
        self.started.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn start(&self, worker: &str, leases: impl Iterator<Item = LeaseToken>) {
        let now = Instant::now();
        let mut t = self.lock();
        let room = MOST.saturating_sub(t.len);
        let mut added = 0;
        {
            let timers = match t.by_worker.get_mut(worker) {
                Some(timers) => timers,
                None => t.by_worker.entry(worker.to_string()).or_default(),
            };
            for lease in leases.take(room) {
                added += timers.insert(lease, now).is_none() as usize;
            }
        }
        t.len += added;
    }

    /// Ends the timers of `leases`; `observe` gets how long each recorded
    /// one (`true`) ran.
    pub(super) fn stop(
        &self,
        worker: &str,
        leases: impl Iterator<Item = (LeaseToken, bool)>,
        observe: impl Fn(Duration),
    ) {
        let now = Instant::now();
        let mut t = self.lock();
        let Some(timers) = t.by_worker.get_mut(worker) else {
            return;
        };
        let mut removed = 0;
        for (lease, recorded) in leases {
            if let Some(sent) = timers.remove(&lease) {
                removed += 1;
                if recorded {
                    observe(now - sent);
                }
            }
        }
        if timers.is_empty() {
            t.by_worker.remove(worker);
        }
        t.len -= removed;
    }

    pub(super) fn forget(&self, worker: &str, lease: LeaseToken) {
        self.stop(worker, std::iter::once((lease, false)), |_| {});
    }

    pub(super) fn forget_worker(&self, worker: &str) {
        let mut t = self.lock();
        if let Some(timers) = t.by_worker.remove(worker) {
            t.len -= timers.len();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(task_id: i64) -> LeaseToken {
        LeaseToken {
            task_id,
            attempt: 1,
        }
    }

    #[test]
    fn only_recorded_reports_are_observed_and_every_end_frees_its_entry() {
        let timer = TaskTimer::default();
        timer.start("w1", (1..=3).map(lease));
        timer.start("w2", [lease(4)].into_iter());
        assert_eq!(timer.len(), 4);
        let observed = std::cell::Cell::new(0);
        timer.stop(
            "w1",
            [(lease(1), true), (lease(2), false), (lease(9), true)].into_iter(),
            |_| observed.set(observed.get() + 1),
        );
        assert_eq!(observed.get(), 1, "one recorded report of a timed lease");
        assert_eq!(timer.len(), 2);
        timer.forget("w1", lease(3));
        timer.forget_worker("w2");
        assert_eq!(timer.len(), 0);
        assert!(timer.lock().by_worker.is_empty());
    }
}
