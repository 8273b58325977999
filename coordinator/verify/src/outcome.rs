//! Rules on the migration as it is (its state, reason, deadline and stage
//! counters) compared with its log: I5's counters, the terminal event, I10.

use std::collections::{BTreeMap, HashSet};

use stagecoach_proto::v1::{Event, EventKind, Migration, MigrationState, StageState};

use crate::violation::{Rule, Violation};
use crate::walk::terminal_event_of;
use crate::{describe_event, millis};

/// Rules on the migration as it ended, compared with its log.
pub(crate) fn check_outcome(
    m: &Migration,
    events: &[Event],
    succeeded_tasks: &BTreeMap<u32, HashSet<i64>>,
    errors: &mut Vec<Violation>,
) {
    let Some(want) = terminal_event_of(m.state()) else {
        return;
    };
    let last = events
        .iter()
        .rev()
        .find(|e| e.kind() != EventKind::ReportRejected);
    match last {
        Some(e) if e.kind() == want => {}
        Some(e) => errors.push(Violation::new(
            Rule::Log,
            format!(
                "migration is {:?} but its last event is {}, wanted {}",
                m.state(),
                describe_event(e),
                want.as_str_name()
            ),
            vec![e.id],
        )),
        None => errors.push(Violation::new(
            Rule::Log,
            format!("migration is {:?} but has no events", m.state()),
            vec![],
        )),
    }
    check_deadline(m, events, errors);
    for s in &m.stages {
        let finished = matches!(
            s.state(),
            StageState::Succeeded | StageState::Failed | StageState::Canceled
        );
        if finished && s.total != s.succeeded + s.failed + s.canceled {
            errors.push(Violation::new(
                Rule::OneOutcome,
                format!(
                    "stage {} ({}) is {:?} with total {} != succeeded {} + failed {} + canceled {}",
                    s.index,
                    s.name,
                    s.state(),
                    s.total,
                    s.succeeded,
                    s.failed,
                    s.canceled
                ),
                vec![],
            ));
        }
        let logged = succeeded_tasks.get(&s.index).map_or(0, HashSet::len);
        if logged != s.succeeded as usize {
            let shown = of_stage(events, s.index, EventKind::TaskSucceeded);
            errors.push(Violation::new(
                Rule::OneOutcome,
                format!(
                    "stage {} ({}) counts {} succeeded tasks, the log has {logged}",
                    s.index, s.name, s.succeeded
                ),
                shown,
            ));
        }
    }
    if m.state() != MigrationState::Succeeded {
        return;
    }
    for s in &m.stages {
        if s.state() != StageState::Succeeded || s.succeeded != s.total {
            errors.push(Violation::new(
                Rule::OneOutcome,
                format!(
                    "migration succeeded but stage {} ({}) is {:?} with {}/{} tasks succeeded",
                    s.index,
                    s.name,
                    s.state(),
                    s.succeeded,
                    s.total
                ),
                vec![],
            ));
        }
        let logged = events
            .iter()
            .any(|e| e.kind() == EventKind::StageSucceeded && e.stage_index == Some(s.index));
        if !logged {
            errors.push(Violation::new(
                Rule::OneOutcome,
                format!(
                    "migration succeeded but the log has no STAGE_SUCCEEDED for stage {}",
                    s.index
                ),
                of_stage(events, s.index, EventKind::StageStarted),
            ));
        }
    }
    let all_succeeded: HashSet<i64> = succeeded_tasks.values().flatten().copied().collect();
    let unfinished_events: Vec<&Event> = events
        .iter()
        .filter(|e| e.task_id != 0 && !all_succeeded.contains(&e.task_id))
        .collect();
    let mut unfinished: Vec<i64> = unfinished_events.iter().map(|e| e.task_id).collect();
    unfinished.sort_unstable();
    unfinished.dedup();
    if !unfinished.is_empty() {
        errors.push(Violation::new(
            Rule::OneOutcome,
            format!("migration succeeded but tasks {unfinished:?} never succeeded"),
            unfinished_events.iter().map(|e| e.id).collect(),
        ));
    }
}

/// The reason the coordinator gives a migration that ran past its deadline.
pub const DEADLINE_EXCEEDED: &str = "deadline exceeded";

/// I10 on a migration in any state: nothing moves forward after its
/// deadline.
pub(crate) fn check_nothing_after_deadline(
    m: &Migration,
    events: &[Event],
    errors: &mut Vec<Violation>,
) {
    let Some(deadline) = m.deadline.as_ref().map(millis) else {
        return;
    };
    for e in events.iter().filter(|e| moves_forward(e.kind())) {
        if let Some(at) = e.at.as_ref().map(millis)
            && at > deadline
        {
            errors.push(Violation::new(
                Rule::Deadline,
                format!(
                    "{} ms after the deadline: {}",
                    at - deadline,
                    describe_event(e)
                ),
                vec![e.id],
            ));
        }
    }
}

/// I10 on a finished migration, as far as one log can tell: failing for the
/// deadline happens only once it has passed.
fn check_deadline(m: &Migration, events: &[Event], errors: &mut Vec<Violation>) {
    if m.state() != MigrationState::Failed || m.reason != DEADLINE_EXCEEDED {
        return;
    }
    let Some(deadline) = m.deadline.as_ref().map(millis) else {
        errors.push(Violation::new(
            Rule::Deadline,
            format!("migration failed with reason {DEADLINE_EXCEEDED:?} but has no deadline"),
            vec![],
        ));
        return;
    };
    let failed = events
        .iter()
        .rev()
        .find(|e| e.kind() == EventKind::MigrationFailed);
    if let Some(e) = failed
        && let Some(at) = e.at.as_ref().map(millis)
        && at < deadline
    {
        errors.push(Violation::new(
            Rule::Deadline,
            format!(
                "failed for its deadline {} ms before the deadline: {}",
                deadline - at,
                describe_event(e)
            ),
            vec![e.id],
        ));
    }
}

/// Events that move a migration forward, which its deadline ends.
fn moves_forward(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::MigrationAdmitted
            | EventKind::StageStarted
            | EventKind::StageSucceeded
            | EventKind::TaskAssigned
            | EventKind::TaskSucceeded
            | EventKind::MigrationSucceeded
    )
}

/// Ids of the events of `kind` in stage `index`.
fn of_stage(events: &[Event], index: u32, kind: EventKind) -> Vec<i64> {
    events
        .iter()
        .filter(|e| e.kind() == kind && e.stage_index == Some(index))
        .map(|e| e.id)
        .collect()
}
