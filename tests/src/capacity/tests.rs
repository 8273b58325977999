//! The cross-migration checks on hand-made merged logs.

use super::*;

use CommitOrder::{Concurrent, Serial};
use EventKind::*;

/// A merged log with increasing ids.
#[derive(Default)]
struct Log(Vec<Event>);

impl Log {
    fn ev(mut self, migration: i64, kind: EventKind, task: i64, worker: &str) -> Self {
        let id = self.0.last().map_or(1, |e| e.id + 1);
        self.0.push(Event {
            id,
            migration_id: migration,
            kind: kind as i32,
            task_id: task,
            worker_id: worker.to_string(),
            ..Default::default()
        });
        self
    }
    fn m(self, migration: i64, kind: EventKind) -> Self {
        self.ev(migration, kind, 0, "")
    }
    /// The last event happened at `ms` (database time).
    fn at(mut self, ms: i64) -> Self {
        if let Some(e) = self.0.last_mut() {
            e.at = Some(prost_types::Timestamp {
                seconds: ms / 1000,
                nanos: (ms % 1000) as i32 * 1_000_000,
            });
        }
        self
    }
}

/// Three migrations, two slots: the third waits and is admitted in the
/// transaction that finishes the first.
fn prompt_log() -> Log {
    Log::default()
        .m(1, MigrationCreated)
        .m(1, MigrationAdmitted)
        .m(1, StageStarted)
        .m(2, MigrationCreated)
        .m(2, MigrationAdmitted)
        .m(2, StageStarted)
        .m(3, MigrationCreated)
        .ev(1, TaskAssigned, 10, "w1")
        .ev(1, TaskSucceeded, 10, "w1")
        .m(1, StageSucceeded)
        .m(1, MigrationSucceeded)
        .m(3, MigrationAdmitted)
        .m(3, StageStarted)
        .m(2, MigrationCanceled)
        .m(3, MigrationSucceeded)
}

#[test]
fn prompt_admissions_within_slots_pass() {
    let seen = check_capacity(&prompt_log().0, 2, Serial).unwrap();
    assert_eq!(
        seen,
        Capacity {
            max_running: 2,
            admissions: 3,
            prompt_admissions: 3,
            longest_wait_ms: 0,
        }
    );
}

#[test]
fn too_many_running_is_caught() {
    let errors = check_capacity(&prompt_log().0, 1, Serial).unwrap_err();
    assert!(
        errors.iter().any(|e| e.contains("2 migrations running")),
        "{errors:?}"
    );
}

#[test]
fn a_late_admission_is_caught() {
    let log = Log::default()
        .m(1, MigrationCreated)
        .m(1, MigrationAdmitted)
        .m(2, MigrationCreated)
        .m(1, MigrationSucceeded)
        // Something else happens before 2 gets the free slot.
        .ev(3, TaskAssigned, 5, "w1")
        .m(2, MigrationAdmitted);
    let errors = check_capacity(&log.0, 1, Serial).unwrap_err();
    assert!(
        errors[0].contains("next event is #5 TASK_ASSIGNED"),
        "{errors:?}"
    );
}

#[test]
fn admission_out_of_order_is_caught() {
    let log = Log::default()
        .m(1, MigrationCreated)
        .m(1, MigrationAdmitted)
        .m(2, MigrationCreated)
        .m(3, MigrationCreated)
        .m(1, MigrationSucceeded)
        .m(3, MigrationAdmitted);
    assert!(check_capacity(&log.0, 1, Serial).is_err());
}

#[test]
fn worker_slots() {
    let log = Log::default()
        .ev(1, TaskAssigned, 1, "w1")
        .ev(1, TaskAssigned, 2, "w1")
        .ev(1, TaskRetrying, 1, "w1")
        .ev(1, TaskAssigned, 3, "w1")
        .ev(1, TaskLeaseExpired, 2, "w1")
        .ev(1, TaskAssigned, 2, "w2");
    assert_eq!(check_worker_slots(&log.0, |_| 2), Ok(2));
    let errors = check_worker_slots(&log.0, |_| 1).unwrap_err();
    assert!(errors[0].contains("I12"), "{errors:?}");
}

#[test]
fn nothing_is_owed_while_paused() {
    // 2 waits from #4 on; the pool is paused from #4 to #6.
    let log = Log::default()
        .m(1, MigrationCreated)
        .m(1, MigrationAdmitted)
        .m(2, MigrationCreated)
        .m(1, MigrationSucceeded)
        .m(3, MigrationCreated)
        .m(3, MigrationCanceled)
        .m(2, MigrationAdmitted)
        .m(2, MigrationSucceeded);
    assert!(check_capacity(&log.0, 1, Serial).is_err());
    let seen = check_capacity_paused(&log.0, 1, Serial, |e| (4..=6).contains(&e.id)).unwrap();
    assert_eq!((seen.max_running, seen.admissions), (1, 2));
}

#[test]
fn a_log_ending_with_a_wait_beside_a_free_slot_is_caught() {
    let log = Log::default()
        .m(1, MigrationCreated)
        .m(1, MigrationAdmitted)
        .m(2, MigrationCreated)
        .m(1, MigrationSucceeded);
    for order in [Serial, Concurrent] {
        let errors = check_capacity(&log.0, 1, order).unwrap_err();
        assert!(errors[0].contains("the log ends"), "{errors:?}");
    }
}

/// Two coordinators: 1 finishes and its transaction refills the slot with 3,
/// while another transaction's claim of 2's task takes an id in between.
fn interleaved_log() -> Log {
    Log::default()
        .m(1, MigrationCreated)
        .m(1, MigrationAdmitted)
        .m(2, MigrationCreated)
        .m(2, MigrationAdmitted)
        .m(3, MigrationCreated)
        .m(1, MigrationSucceeded)
        .at(1_000)
        .ev(2, TaskAssigned, 20, "w2")
        .m(3, MigrationAdmitted)
        .at(1_040)
        .m(2, MigrationSucceeded)
        .m(3, MigrationSucceeded)
}

#[test]
fn concurrent_commits_may_interleave_an_admission_pass() {
    let log = interleaved_log();
    assert!(check_capacity(&log.0, 2, Serial).is_err());
    let seen = check_capacity(&log.0, 2, Concurrent).unwrap();
    assert_eq!(
        seen,
        Capacity {
            max_running: 2,
            admissions: 3,
            prompt_admissions: 3,
            longest_wait_ms: 40,
        }
    );
}

#[test]
fn concurrent_commits_still_keep_the_slot_limit() {
    let errors = check_capacity(&interleaved_log().0, 1, Concurrent).unwrap_err();
    assert!(
        errors.iter().any(|e| e.contains("2 migrations running")),
        "{errors:?}"
    );
}
