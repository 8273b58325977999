//! The checker on hand-made logs: valid ones pass, and each rule catches a
//! log that breaks it. These run without any binary.

use super::*;
use stagecoach_proto::v1::{MigrationState, StageProgress, StageState};

const MIGRATION: i64 = 7;

/// Builds a log with increasing ids.
#[derive(Default)]
struct Log(Vec<Event>);

impl Log {
    fn push(mut self, kind: EventKind, stage: Option<u32>, task: i64, attempt: u32) -> Self {
        let id = self.0.last().map_or(1, |e| e.id + 1);
        self.0.push(Event {
            id,
            migration_id: MIGRATION,
            kind: kind as i32,
            stage_index: stage,
            task_id: task,
            attempt,
            worker_id: if kind == EventKind::TaskAssigned {
                "w1".into()
            } else {
                String::new()
            },
            ..Default::default()
        });
        self
    }
    fn m(self, kind: EventKind) -> Self {
        self.push(kind, None, 0, 0)
    }
    fn stage(self, kind: EventKind, k: u32) -> Self {
        self.push(kind, Some(k), 0, 0)
    }
    fn task(self, kind: EventKind, k: u32, task: i64, attempt: u32) -> Self {
        self.push(kind, Some(k), task, attempt)
    }
}

use EventKind::*;

fn stage(index: u32, state: StageState, total: u32, succeeded: u32, failed: u32) -> StageProgress {
    StageProgress {
        index,
        name: format!("s{index}"),
        state: state as i32,
        total,
        succeeded,
        failed,
        ..Default::default()
    }
}

fn migration(state: MigrationState, stages: Vec<StageProgress>) -> Migration {
    Migration {
        id: MIGRATION,
        state: state as i32,
        stages,
        ..Default::default()
    }
}

/// Two stages; task 2 of stage 1 fails once and succeeds on attempt 2.
fn valid_log() -> Log {
    Log::default()
        .m(MigrationCreated)
        .m(MigrationAdmitted)
        .stage(StageStarted, 0)
        .task(TaskAssigned, 0, 1, 1)
        .task(TaskAdded, 1, 2, 0)
        .task(TaskSucceeded, 0, 1, 1)
        .stage(StageSucceeded, 0)
        .stage(StageStarted, 1)
        .task(TaskAssigned, 1, 2, 1)
        .task(TaskRetrying, 1, 2, 1)
        .task(TaskAssigned, 1, 2, 2)
        .task(TaskSucceeded, 1, 2, 2)
        .stage(StageSucceeded, 1)
        .m(MigrationSucceeded)
}

fn succeeded() -> Migration {
    migration(
        MigrationState::Succeeded,
        vec![
            stage(0, StageState::Succeeded, 1, 1, 0),
            stage(1, StageState::Succeeded, 1, 1, 0),
        ],
    )
}

/// Asserts the check fails and one violation starts with `rule`.
fn assert_violates(m: &Migration, log: &Log, rule: &str) {
    match check_invariants(m, &log.0) {
        Ok(()) => panic!("expected a {rule} violation, the log passed"),
        Err(errors) => assert!(
            errors.iter().any(|e| e.starts_with(rule)),
            "expected a {rule} violation, got {errors:#?}"
        ),
    }
}

#[test]
fn valid_log_passes() {
    assert_eq!(check_invariants(&succeeded(), &valid_log().0), Ok(()));
}

#[test]
fn failed_then_retried_log_passes() {
    let log = Log::default()
        .m(MigrationCreated)
        .m(MigrationAdmitted)
        .stage(StageStarted, 0)
        .task(TaskAssigned, 0, 1, 1)
        .task(TaskSucceeded, 0, 1, 1)
        .stage(StageSucceeded, 0)
        .stage(StageStarted, 1)
        .task(TaskAssigned, 1, 2, 1)
        .task(TaskDead, 1, 2, 1)
        .stage(StageFailed, 1)
        .m(MigrationFailed)
        .task(ReportRejected, 1, 2, 1)
        .m(MigrationRetried)
        .m(MigrationAdmitted)
        .stage(StageStarted, 1)
        .task(TaskAssigned, 1, 2, 1)
        .task(TaskSucceeded, 1, 2, 1)
        .stage(StageSucceeded, 1)
        .m(MigrationSucceeded);
    assert_eq!(check_invariants(&succeeded(), &log.0), Ok(()));
}

#[test]
fn failed_migration_with_unstarted_stage_passes() {
    let log = Log::default()
        .m(MigrationCreated)
        .m(MigrationAdmitted)
        .stage(StageStarted, 0)
        .task(TaskAssigned, 0, 1, 1)
        .task(TaskDead, 0, 1, 1)
        .stage(StageFailed, 0)
        .m(MigrationFailed);
    let m = migration(
        MigrationState::Failed,
        vec![
            stage(0, StageState::Failed, 1, 0, 1),
            stage(1, StageState::Pending, 1, 0, 0),
        ],
    );
    assert_eq!(check_invariants(&m, &log.0), Ok(()));
}

#[test]
fn report_rejected_after_terminal_event_is_allowed() {
    let log = valid_log().task(ReportRejected, 1, 2, 1);
    assert_eq!(check_invariants(&succeeded(), &log.0), Ok(()));
}

#[test]
fn event_ids_must_increase() {
    let mut log = valid_log();
    log.0[4].id = log.0[3].id;
    assert_violates(&succeeded(), &log, "log");
}

#[test]
fn events_must_belong_to_the_migration() {
    let mut log = valid_log();
    log.0[3].migration_id = MIGRATION + 1;
    assert_violates(&succeeded(), &log, "log");
}

#[test]
fn i1_task_assigned_before_previous_stage_succeeded() {
    let log = Log::default()
        .m(MigrationCreated)
        .m(MigrationAdmitted)
        .stage(StageStarted, 0)
        .task(TaskAssigned, 0, 1, 1)
        .task(TaskAssigned, 1, 2, 1)
        .task(TaskSucceeded, 0, 1, 1)
        .stage(StageSucceeded, 0)
        .stage(StageStarted, 1)
        .task(TaskSucceeded, 1, 2, 1)
        .stage(StageSucceeded, 1)
        .m(MigrationSucceeded);
    assert_violates(&succeeded(), &log, "I1");
}

#[test]
fn i1_task_stage_comes_from_other_events_of_the_task() {
    // The early assignment carries no stage_index; its outcome does.
    let log = Log::default()
        .m(MigrationCreated)
        .m(MigrationAdmitted)
        .stage(StageStarted, 0)
        .task(TaskAssigned, 0, 1, 1)
        .push(TaskAssigned, None, 2, 1)
        .task(TaskSucceeded, 0, 1, 1)
        .stage(StageSucceeded, 0)
        .stage(StageStarted, 1)
        .task(TaskSucceeded, 1, 2, 1)
        .stage(StageSucceeded, 1)
        .m(MigrationSucceeded);
    assert_violates(&succeeded(), &log, "I1");
}

#[test]
fn i1_stage_started_before_previous_stage_succeeded() {
    let log = Log::default()
        .m(MigrationCreated)
        .m(MigrationAdmitted)
        .stage(StageStarted, 0)
        .task(TaskAssigned, 0, 1, 1)
        .stage(StageStarted, 1)
        .task(TaskSucceeded, 0, 1, 1)
        .stage(StageSucceeded, 0)
        .task(TaskAssigned, 1, 2, 1)
        .task(TaskSucceeded, 1, 2, 1)
        .stage(StageSucceeded, 1)
        .m(MigrationSucceeded);
    assert_violates(&succeeded(), &log, "I1");
}

#[test]
fn i2_stage_started_twice_in_one_run() {
    let log = Log::default()
        .m(MigrationCreated)
        .m(MigrationAdmitted)
        .stage(StageStarted, 0)
        .stage(StageStarted, 0)
        .task(TaskAssigned, 0, 1, 1)
        .task(TaskSucceeded, 0, 1, 1)
        .stage(StageSucceeded, 0)
        .stage(StageStarted, 1)
        .task(TaskAssigned, 1, 2, 1)
        .task(TaskSucceeded, 1, 2, 1)
        .stage(StageSucceeded, 1)
        .m(MigrationSucceeded);
    assert_violates(&succeeded(), &log, "I2");
}

#[test]
fn i2_stage_succeeded_twice() {
    let mut log = valid_log();
    let last = log.0.pop().expect("terminal event");
    log = log.stage(StageSucceeded, 1);
    log.0.push(Event {
        id: log.0.last().map_or(1, |e| e.id + 1),
        ..last
    });
    assert_violates(&succeeded(), &log, "I2");
}

#[test]
fn i4_outcome_of_a_stale_attempt() {
    let log = Log::default()
        .m(MigrationCreated)
        .m(MigrationAdmitted)
        .stage(StageStarted, 0)
        .task(TaskAssigned, 0, 1, 1)
        .task(TaskLeaseExpired, 0, 1, 1)
        .task(TaskAssigned, 0, 1, 2)
        .task(TaskSucceeded, 0, 1, 1)
        .stage(StageSucceeded, 0)
        .stage(StageStarted, 1)
        .task(TaskAssigned, 1, 2, 1)
        .task(TaskSucceeded, 1, 2, 1)
        .stage(StageSucceeded, 1)
        .m(MigrationSucceeded);
    assert_violates(&succeeded(), &log, "I4");
}

#[test]
fn i5_two_terminal_outcomes_for_one_task() {
    let log = Log::default()
        .m(MigrationCreated)
        .m(MigrationAdmitted)
        .stage(StageStarted, 0)
        .task(TaskAssigned, 0, 1, 1)
        .task(TaskSucceeded, 0, 1, 1)
        .task(TaskDead, 0, 1, 1)
        .stage(StageSucceeded, 0)
        .stage(StageStarted, 1)
        .task(TaskAssigned, 1, 2, 1)
        .task(TaskSucceeded, 1, 2, 1)
        .stage(StageSucceeded, 1)
        .m(MigrationSucceeded);
    assert_violates(&succeeded(), &log, "I5");
}

#[test]
fn i5_succeeded_migration_with_an_unfinished_task() {
    // Task 3 was added to stage 1 and assigned, but never succeeded.
    let log = Log::default()
        .m(MigrationCreated)
        .m(MigrationAdmitted)
        .stage(StageStarted, 0)
        .task(TaskAssigned, 0, 1, 1)
        .task(TaskSucceeded, 0, 1, 1)
        .stage(StageSucceeded, 0)
        .stage(StageStarted, 1)
        .task(TaskAssigned, 1, 2, 1)
        .task(TaskAssigned, 1, 3, 1)
        .task(TaskSucceeded, 1, 2, 1)
        .stage(StageSucceeded, 1)
        .m(MigrationSucceeded);
    assert_violates(&succeeded(), &log, "I5");
}

#[test]
fn i5_stage_counters_must_add_up() {
    let m = migration(
        MigrationState::Succeeded,
        vec![
            stage(0, StageState::Succeeded, 2, 1, 0),
            stage(1, StageState::Succeeded, 1, 1, 0),
        ],
    );
    assert_violates(&m, &valid_log(), "I5");
}

#[test]
fn i5_stage_counters_must_match_the_log() {
    let m = migration(
        MigrationState::Succeeded,
        vec![
            stage(0, StageState::Succeeded, 2, 2, 0),
            stage(1, StageState::Succeeded, 1, 1, 0),
        ],
    );
    assert_violates(&m, &valid_log(), "I5");
}

#[test]
fn i7_attempt_number_reused() {
    let log = Log::default()
        .m(MigrationCreated)
        .m(MigrationAdmitted)
        .stage(StageStarted, 0)
        .task(TaskAssigned, 0, 1, 1)
        .task(TaskRetrying, 0, 1, 1)
        .task(TaskAssigned, 0, 1, 1)
        .task(TaskSucceeded, 0, 1, 1)
        .stage(StageSucceeded, 0)
        .stage(StageStarted, 1)
        .task(TaskAssigned, 1, 2, 1)
        .task(TaskSucceeded, 1, 2, 1)
        .stage(StageSucceeded, 1)
        .m(MigrationSucceeded);
    assert_violates(&succeeded(), &log, "I7");
}

#[test]
fn i7_attempt_bound() {
    let log = valid_log();
    assert_eq!(check_attempt_bound(&log.0, 2), Ok(()));
    let errors = check_attempt_bound(&log.0, 1).expect_err("task 2 had two attempts");
    assert!(errors[0].starts_with("I7"), "{errors:?}");
}

#[test]
fn terminal_event_must_be_last() {
    let log = valid_log().task(TaskCanceled, 1, 2, 0);
    assert_violates(&succeeded(), &log, "log");
}

#[test]
fn terminal_event_must_match_the_state() {
    let m = migration(
        MigrationState::Failed,
        vec![
            stage(0, StageState::Succeeded, 1, 1, 0),
            stage(1, StageState::Succeeded, 1, 1, 0),
        ],
    );
    assert_violates(&m, &valid_log(), "log");
}

#[test]
fn task_assigned_without_any_stage_index_is_reported() {
    let mut log = valid_log();
    for e in &mut log.0 {
        if e.task_id == 1 {
            e.stage_index = None;
        }
    }
    assert_violates(&succeeded(), &log, "log");
}

#[test]
fn describe_event_is_readable() {
    let e = &valid_log().0[3];
    assert_eq!(
        describe_event(e),
        "#4 TASK_ASSIGNED stage=0 task=1 attempt=1 worker=w1"
    );
}

/// Stage 0 running when the migration ends with `end`.
fn ended_log(end: EventKind) -> Log {
    Log::default()
        .m(MigrationCreated)
        .m(MigrationAdmitted)
        .stage(StageStarted, 0)
        .task(TaskAssigned, 0, 1, 1)
        .task(TaskCanceled, 0, 1, 1)
        .stage(StageFailed, 0)
        .m(end)
}

#[test]
fn i9_nothing_assigned_after_cancel() {
    let m = migration(
        MigrationState::Canceled,
        vec![stage(0, StageState::Canceled, 2, 0, 0)],
    );
    let log = ended_log(MigrationCanceled).task(TaskAssigned, 0, 2, 1);
    assert_violates(&m, &log, "I9");
}

#[test]
fn i10_deadline_failure_not_before_the_deadline() {
    let at = |ms: i64| prost_types::Timestamp {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    };
    let mut log = ended_log(MigrationFailed);
    log.0.last_mut().unwrap().at = Some(at(5_000));
    let mut m = migration(
        MigrationState::Failed,
        vec![stage(0, StageState::Failed, 1, 0, 0)],
    );
    m.stages[0].canceled = 1;
    m.reason = DEADLINE_EXCEEDED.into();
    assert_violates(&m, &log, "I10"); // no deadline at all
    m.deadline = Some(at(4_000));
    assert_eq!(check_invariants(&m, &log.0), Ok(()));
    m.deadline = Some(at(6_000));
    assert_violates(&m, &log, "I10");
}

#[test]
fn i10_a_queued_migration_may_fail_for_its_deadline() {
    let mut m = migration(
        MigrationState::Failed,
        vec![stage(0, StageState::Pending, 1, 0, 0)],
    );
    m.reason = DEADLINE_EXCEEDED.into();
    m.deadline = Some(prost_types::Timestamp::default());
    let mut log = Log::default().m(MigrationCreated).m(MigrationFailed);
    log.0[1].message = DEADLINE_EXCEEDED.into();
    assert_eq!(check_invariants(&m, &log.0), Ok(()));
    log.0[1].message = "something else".into();
    assert_violates(&m, &log, "log");
}

/// `valid_log` with task 1's first assignment handed back and given again.
fn handed_back_log() -> Log {
    let mut log = Log::default()
        .m(MigrationCreated)
        .m(MigrationAdmitted)
        .stage(StageStarted, 0)
        .task(TaskAssigned, 0, 1, 1)
        .task(TaskHandedBack, 0, 1, 1);
    log.0.extend(valid_log().0.into_iter().skip(3).map(|mut e| {
        e.id += 2;
        e
    }));
    log
}

#[test]
fn a_handed_back_attempt_is_assigned_again_as_itself() {
    let log = handed_back_log();
    assert_eq!(check_invariants(&succeeded(), &log.0), Ok(()));
    // It did not run: it does not count against max_attempts.
    assert_eq!(check_attempt_bound(&log.0, 2), Ok(()));
}

#[test]
fn i4_every_attempt_is_explained() {
    // Attempt 1 is assigned again without an event that ended it.
    let log = Log::default()
        .m(MigrationCreated)
        .m(MigrationAdmitted)
        .stage(StageStarted, 0)
        .task(TaskAssigned, 0, 1, 1)
        .task(TaskAssigned, 0, 1, 2)
        .task(TaskSucceeded, 0, 1, 2)
        .stage(StageSucceeded, 0)
        .stage(StageStarted, 1)
        .task(TaskAssigned, 1, 2, 1)
        .task(TaskSucceeded, 1, 2, 1)
        .stage(StageSucceeded, 1)
        .m(MigrationSucceeded);
    assert_violates(&succeeded(), &log, "I4");
}

#[test]
fn i10_nothing_moves_forward_after_the_deadline() {
    let at = |ms: i64| prost_types::Timestamp {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    };
    let mut log = valid_log();
    for (i, e) in log.0.iter_mut().enumerate() {
        e.at = Some(at(1_000 + i as i64));
    }
    let last = 1_000 + log.0.len() as i64 - 1;
    let mut m = succeeded();
    m.deadline = Some(at(last));
    assert_eq!(check_invariants(&m, &log.0), Ok(()));
    // The migration succeeded 1 ms after its deadline.
    m.deadline = Some(at(last - 1));
    assert_violates(&m, &log, "I10");
    // And so does a running one whose task was assigned after it.
    let mut running = migration(MigrationState::Running, vec![]);
    running.deadline = Some(at(1_002));
    let early = Log(log.0[..4].to_vec());
    assert_violates(&running, &early, "I10");
}

#[test]
fn a_violation_names_the_events_that_show_it() {
    // Task 1 ends twice: both outcomes are shown.
    let log = valid_log().task(TaskDead, 0, 1, 1);
    let found = violations(&succeeded(), &log.0);
    let twice = found
        .iter()
        .find(|v| v.message.starts_with("second terminal outcome"))
        .unwrap_or_else(|| panic!("no second-outcome violation in {found:#?}"));
    assert_eq!(twice.rule, Rule::OneOutcome);
    assert_eq!(twice.events, vec![6, 15]);
    assert!(
        twice
            .to_string()
            .starts_with("I5: second terminal outcome, first was #6")
    );
}
