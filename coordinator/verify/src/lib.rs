//! The invariant checker: reads one migration's event log and says which of
//! the design's invariants it breaks.
//!
//! The event log is the test oracle: every transition the coordinator commits
//! is an event, in commit order, so ordering rules can be checked after the
//! fact on any run, including runs with crashes injected. The rules:
//!
//! - **log** — event ids strictly increase and belong to the migration; the
//!   log starts with MIGRATION_CREATED; stages and tasks only move inside a
//!   run; a terminal migration ends its log with the terminal event matching
//!   its state. Only REPORT_REJECTED may follow it (a worker may report late
//!   on a canceled migration), or MIGRATION_RETRIED, which opens a new run.
//! - **I1 stage order** — no TASK_ASSIGNED for a task of stage k+1, and no
//!   STAGE_STARTED of stage k+1, before STAGE_SUCCEEDED of stage k. A task's
//!   stage is the `stage_index` of its events.
//! - **I2 one stage at a time** — at most one STAGE_STARTED per stage per run
//!   (a run begins at MIGRATION_ADMITTED), at most one STAGE_SUCCEEDED per
//!   stage ever.
//! - **I4 fencing** — an outcome naming an attempt names the task's latest
//!   assigned attempt, and a task is assigned again only after an event
//!   ended its live attempt (TASK_RETRYING, TASK_LEASE_EXPIRED,
//!   TASK_HANDED_BACK): every attempt is explained.
//! - **I5 one outcome** — at most one terminal task event (TASK_SUCCEEDED,
//!   TASK_DEAD, TASK_CANCELED) per task per run, nothing assigned after it,
//!   and at most one TASK_SUCCEEDED ever; a succeeded migration has every
//!   task and stage succeeded and counters that match the log; a finished
//!   stage's counters add up (total = succeeded + failed + canceled).
//! - **I7 bounded retries** — within a run a task's attempts strictly increase
//!   from 1, except that an attempt handed back (TASK_HANDED_BACK: it never
//!   reached its worker) is assigned again with the same number, so it was
//!   assigned at most as often as its highest attempt plus its hand-backs;
//!   [`check_attempt_bound`] also checks a known `max_attempts`.
//! - **I9 cancel** — nothing is assigned after the migration was canceled
//!   or failed, until a MIGRATION_RETRIED opens a new run.
//! - **I10 deadline** — a migration that failed with reason `deadline
//!   exceeded` has a deadline, and its MIGRATION_FAILED is not earlier than
//!   the deadline; and past a migration's deadline nothing moves forward: no
//!   MIGRATION_ADMITTED, STAGE_STARTED, TASK_ASSIGNED, TASK_SUCCEEDED,
//!   STAGE_SUCCEEDED or MIGRATION_SUCCEEDED is later than the deadline (the
//!   event's `at` and the deadline are read from the same clock).
//!
//! Rules across migrations (capacity, worker slots) are in the tests
//! crate's `capacity` module.
//!
//! Runs matter because a retried migration runs its unfinished tasks again.
//!
//! It is a library of its own, apart from the coordinator, so that the end-to-end
//! tests and the operator CLI (`stagecoach verify`) judge a log by the
//! same rules, and so that it knows the coordinator only through the
//! protocol: it reads what any client reads.
//!
//! # Layout
//!
//! | module | what it holds |
//! |---|---|
//! | `walk` | one pass over the log in order: the rules the order of events decides |
//! | `outcome` | the migration as it is (state, counters, deadline) against its log |
//! | `violation` | [`Violation`] and [`Rule`]: what was found, and the events that show it |
//!
//! ```
//! use stagecoach_proto::v1::{Event, EventKind, Migration, MigrationState};
//! use stagecoach_verify::{Rule, violations};
//!
//! let m = Migration { id: 1, state: MigrationState::Succeeded as i32, ..Default::default() };
//! let log = [Event { id: 1, migration_id: 1, kind: EventKind::MigrationCreated as i32, ..Default::default() }];
//! let found = violations(&m, &log);
//! // Succeeded, but its log ends before MIGRATION_SUCCEEDED.
//! assert_eq!(found[0].rule, Rule::Log);
//! assert_eq!(found[0].events, vec![1]);
//! ```

mod outcome;
mod violation;
mod walk;

use std::collections::{HashMap, HashSet};

use stagecoach_proto::v1::{Event, EventKind, Migration};

pub use outcome::DEADLINE_EXCEEDED;
pub use violation::{Rule, Violation};

/// Checks every rule of the crate docs on one migration and its complete
/// event log (oldest first). Returns every violation found, each with the
/// events that show it.
pub fn violations(migration: &Migration, events: &[Event]) -> Vec<Violation> {
    let mut walk = walk::Walk::new(migration, events);
    walk.run();
    let mut found = std::mem::take(&mut walk.errors);
    outcome::check_nothing_after_deadline(migration, events, &mut found);
    outcome::check_outcome(migration, events, &walk.succeeded_tasks, &mut found);
    found
}

/// [`violations`] as lines (`I4: …: #7 TASK_SUCCEEDED …`), for tests that
/// assert a log is clean and print what is not.
pub fn check_invariants(migration: &Migration, events: &[Event]) -> Result<(), Vec<String>> {
    let found = violations(migration, events);
    if found.is_empty() {
        Ok(())
    } else {
        Err(found.iter().map(ToString::to_string).collect())
    }
}

/// Checks that no task was assigned more than `max_attempts` times in any run
/// (I7), for tests that know the plan's retry policy.
pub fn check_attempt_bound(events: &[Event], max_attempts: u32) -> Result<(), Vec<String>> {
    let mut counts: HashMap<i64, u32> = HashMap::new();
    let mut handed_back: HashSet<(i64, u32)> = HashSet::new();
    let mut errors = Vec::new();
    for e in events {
        match e.kind() {
            EventKind::MigrationAdmitted => counts.clear(),
            EventKind::TaskHandedBack => {
                handed_back.insert((e.task_id, e.attempt));
            }
            EventKind::TaskAssigned => {
                let n = counts.entry(e.task_id).or_default();
                // An attempt handed back did not run: its new assignment
                // is the same attempt.
                if !handed_back.remove(&(e.task_id, e.attempt)) {
                    *n += 1;
                }
                if *n > max_attempts || e.attempt > max_attempts {
                    errors.push(format!(
                        "I7: task {} assigned {n} times (attempt {}), max_attempts is {max_attempts}: {}",
                        e.task_id,
                        e.attempt,
                        describe_event(e)
                    ));
                }
            }
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// One line describing an event, for messages: `#12 TASK_ASSIGNED stage=1
/// task=5 attempt=2 worker=w1 "…"`.
pub fn describe_event(e: &Event) -> String {
    let kind = e.kind().as_str_name().trim_start_matches("EVENT_KIND_");
    let mut s = format!("#{} {kind}", e.id);
    if let Some(k) = e.stage_index {
        s.push_str(&format!(" stage={k}"));
    }
    if e.task_id != 0 {
        s.push_str(&format!(" task={}", e.task_id));
    }
    if e.attempt != 0 {
        s.push_str(&format!(" attempt={}", e.attempt));
    }
    if !e.worker_id.is_empty() {
        s.push_str(&format!(" worker={}", e.worker_id));
    }
    if !e.message.is_empty() {
        s.push_str(&format!(" {:?}", e.message));
    }
    s
}

/// Milliseconds since the Unix epoch.
pub fn millis(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

#[cfg(test)]
mod tests;
