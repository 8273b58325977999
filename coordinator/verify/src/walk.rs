//! One pass over a migration's log, in order, keeping per-run and
//! whole-log state: the rules of the crate docs that the order of events
//! decides (log, I1, I2, I4, I5, I7, I9).

use std::collections::{BTreeMap, HashMap, HashSet};

use stagecoach_proto::v1::{Event, EventKind, Migration, MigrationState};

use crate::describe_event;
use crate::outcome::DEADLINE_EXCEEDED;
use crate::violation::{Rule, Violation};

fn is_task_terminal(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::TaskSucceeded | EventKind::TaskDead | EventKind::TaskCanceled
    )
}

pub(crate) fn terminal_event_of(state: MigrationState) -> Option<EventKind> {
    match state {
        MigrationState::Succeeded => Some(EventKind::MigrationSucceeded),
        MigrationState::Failed => Some(EventKind::MigrationFailed),
        MigrationState::Canceled => Some(EventKind::MigrationCanceled),
        _ => None,
    }
}

fn is_migration_terminal(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::MigrationSucceeded | EventKind::MigrationFailed | EventKind::MigrationCanceled
    )
}

/// Where the log is between runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Created or retried, not admitted yet.
    Queued,
    /// Admitted: stages and tasks may move.
    Running,
    /// After a terminal migration event.
    Finished,
}

/// One pass over the log, in order, keeping per-run and whole-log state.
pub(crate) struct Walk<'a> {
    migration_id: i64,
    events: &'a [Event],
    pub(crate) errors: Vec<Violation>,
    /// Stage of each task, from the `stage_index` of its events.
    task_stage: HashMap<i64, u32>,
    phase: Phase,
    /// Stages that succeeded, ever (a succeeded stage never runs again).
    stage_succeeded: HashSet<u32>,
    /// Tasks that succeeded, ever, by stage.
    pub(crate) succeeded_tasks: BTreeMap<u32, HashSet<i64>>,
    // Per run:
    started: HashSet<u32>,
    task_terminal: HashMap<i64, i64>,
    attempts: HashMap<i64, Vec<u32>>,
    /// Each task's live attempt: assigned, and no event has ended it yet.
    live: HashMap<i64, u32>,
    /// Attempts handed back and not assigned again yet, by task.
    handed_back: HashMap<i64, u32>,
}

impl<'a> Walk<'a> {
    pub(crate) fn new(migration: &Migration, events: &'a [Event]) -> Self {
        let mut errors = Vec::new();
        let mut task_stage = HashMap::new();
        let with_stage = |e: &&Event| e.task_id != 0 && e.stage_index.is_some();
        // TASK_ADDED may name the adding task with the target stage, so it
        // only fills in stages no other event of the task gives.
        for e in events
            .iter()
            .filter(with_stage)
            .filter(|e| e.kind() != EventKind::TaskAdded)
        {
            let k = e.stage_index.unwrap_or_default();
            match task_stage.insert(e.task_id, k) {
                Some(prev) if prev != k => errors.push(Violation::new(
                    Rule::Log,
                    format!(
                        "task {} is in stage {prev} and in stage {k}: {}",
                        e.task_id,
                        describe_event(e)
                    ),
                    vec![e.id],
                )),
                _ => {}
            }
        }
        for e in events
            .iter()
            .filter(with_stage)
            .filter(|e| e.kind() == EventKind::TaskAdded)
        {
            task_stage
                .entry(e.task_id)
                .or_insert(e.stage_index.unwrap_or_default());
        }
        Walk {
            migration_id: migration.id,
            events,
            errors,
            task_stage,
            phase: Phase::Queued,
            stage_succeeded: HashSet::new(),
            succeeded_tasks: BTreeMap::new(),
            started: HashSet::new(),
            task_terminal: HashMap::new(),
            attempts: HashMap::new(),
            live: HashMap::new(),
            handed_back: HashMap::new(),
        }
    }

    fn err(&mut self, e: &Event, rule: Rule, what: impl std::fmt::Display) {
        self.err_also(e, rule, what, &[]);
    }

    /// Like `err`, naming earlier events that show the violation too.
    fn err_also(&mut self, e: &Event, rule: Rule, what: impl std::fmt::Display, also: &[i64]) {
        let mut ids = also.to_vec();
        ids.push(e.id);
        self.errors.push(Violation::new(
            rule,
            format!("{what}: {}", describe_event(e)),
            ids,
        ));
    }

    pub(crate) fn run(&mut self) {
        let events = self.events;
        let mut last_id = i64::MIN;
        for (i, e) in events.iter().enumerate() {
            if e.id <= last_id {
                self.err(
                    e,
                    Rule::Log,
                    format!("event id not above previous id {last_id}"),
                );
            }
            last_id = last_id.max(e.id);
            if e.migration_id != self.migration_id {
                self.err(
                    e,
                    Rule::Log,
                    format!(
                        "event of migration {}, wanted {}",
                        e.migration_id, self.migration_id
                    ),
                );
            }
            let kind = e.kind();
            if (i == 0) != (kind == EventKind::MigrationCreated) {
                self.err(
                    e,
                    Rule::Log,
                    "MIGRATION_CREATED must be the first event, once",
                );
            }
            if self.phase == Phase::Finished && kind == EventKind::TaskAssigned {
                self.err(e, Rule::Cancel, "task assigned after the migration ended");
            } else if self.phase == Phase::Finished
                && !matches!(
                    kind,
                    EventKind::ReportRejected | EventKind::MigrationRetried
                )
            {
                self.err(e, Rule::Log, "event after the migration's terminal event");
            }
            self.step(e, kind);
        }
    }

    fn step(&mut self, e: &Event, kind: EventKind) {
        match kind {
            EventKind::MigrationAdmitted => {
                if self.phase != Phase::Queued {
                    self.err(e, Rule::OneStageAtATime, "admitted while not queued");
                }
                self.phase = Phase::Running;
                self.started.clear();
                self.task_terminal.clear();
                self.attempts.clear();
                self.live.clear();
                self.handed_back.clear();
            }
            EventKind::MigrationRetried => {
                if self.phase != Phase::Finished {
                    self.err(e, Rule::Log, "retried while not finished");
                }
                self.phase = Phase::Queued;
            }
            k if is_migration_terminal(k) => {
                // Canceling a queued migration is fine, and so is failing
                // one whose deadline passed in the queue (I10); finishing
                // twice is not.
                if self.phase == Phase::Finished {
                    self.err(e, Rule::Log, "a second terminal event in one run");
                }
                let unadmitted_end = k == EventKind::MigrationCanceled
                    || (k == EventKind::MigrationFailed && e.message == DEADLINE_EXCEEDED);
                if !unadmitted_end && self.phase != Phase::Running {
                    self.err(e, Rule::Log, "finished without being admitted");
                }
                self.phase = Phase::Finished;
            }
            EventKind::StageStarted => self.stage_started(e),
            EventKind::StageSucceeded => {
                let Some(k) = self.stage_of(e) else { return };
                if !self.stage_succeeded.insert(k) {
                    self.err(
                        e,
                        Rule::OneStageAtATime,
                        format!("stage {k} succeeded twice"),
                    );
                }
            }
            EventKind::TaskAssigned => self.task_assigned(e),
            k if is_task_terminal(k) => self.task_finished(e, k),
            EventKind::TaskRetrying | EventKind::TaskLeaseExpired | EventKind::TaskHandedBack => {
                if self.task_terminal.contains_key(&e.task_id) {
                    self.err(
                        e,
                        Rule::OneOutcome,
                        "attempt ended after the task's terminal outcome",
                    );
                }
                self.check_fencing(e);
                self.live.remove(&e.task_id);
                if kind == EventKind::TaskHandedBack {
                    self.handed_back.insert(e.task_id, e.attempt);
                }
            }
            _ => {}
        }
    }

    fn stage_of(&mut self, e: &Event) -> Option<u32> {
        let k = e
            .stage_index
            .or_else(|| self.task_stage.get(&e.task_id).copied());
        if k.is_none() {
            self.err(
                e,
                Rule::Log,
                "no stage_index on this event or any event of its task",
            );
        }
        k
    }

    fn stage_started(&mut self, e: &Event) {
        if self.phase != Phase::Running {
            self.err(e, Rule::Log, "stage started outside a run");
        }
        let Some(k) = self.stage_of(e) else { return };
        if !self.started.insert(k) {
            self.err(
                e,
                Rule::OneStageAtATime,
                format!("stage {k} started twice in one run"),
            );
        }
        if k > 0 && !self.stage_succeeded.contains(&(k - 1)) {
            self.err(
                e,
                Rule::StageOrder,
                format!("stage {k} started before stage {} succeeded", k - 1),
            );
        }
    }

    fn task_assigned(&mut self, e: &Event) {
        if self.phase != Phase::Running {
            self.err(e, Rule::Log, "task assigned outside a run");
        }
        if let Some(k) = self.stage_of(e)
            && k > 0
            && !self.stage_succeeded.contains(&(k - 1))
        {
            self.err(
                e,
                Rule::StageOrder,
                format!(
                    "task of stage {k} assigned before stage {} succeeded",
                    k - 1
                ),
            );
        }
        if let Some(at) = self.task_terminal.get(&e.task_id).copied() {
            self.err_also(
                e,
                Rule::OneOutcome,
                format!("assigned after its terminal event #{at}"),
                &[at],
            );
        }
        if self
            .succeeded_tasks
            .values()
            .any(|s| s.contains(&e.task_id))
        {
            self.err(e, Rule::OneOutcome, "assigned again after it succeeded");
        }
        if let Some(live) = self.live.insert(e.task_id, e.attempt) {
            self.err(
                e,
                Rule::Fencing,
                format!("assigned while attempt {live} is live: no event ended it"),
            );
        }
        // An attempt handed back never ran: it is assigned again as itself.
        let reused = self.handed_back.remove(&e.task_id) == Some(e.attempt);
        let seen = self.attempts.entry(e.task_id).or_default();
        let last = seen.last().copied().unwrap_or(0);
        if !reused {
            seen.push(e.attempt);
        }
        let (count, max) = (seen.len(), seen.iter().copied().max().unwrap_or(0));
        if e.attempt <= last && !reused {
            self.err(
                e,
                Rule::BoundedRetries,
                format!("attempt {} does not follow attempt {last}", e.attempt),
            );
        }
        if count > max as usize {
            self.err(
                e,
                Rule::BoundedRetries,
                format!("{count} assignments but highest attempt is {max}"),
            );
        }
    }

    fn task_finished(&mut self, e: &Event, kind: EventKind) {
        self.live.remove(&e.task_id);
        if let Some(prev) = self.task_terminal.insert(e.task_id, e.id) {
            self.err_also(
                e,
                Rule::OneOutcome,
                format!("second terminal outcome, first was #{prev}"),
                &[prev],
            );
        }
        if kind != EventKind::TaskSucceeded {
            if kind == EventKind::TaskDead {
                self.check_fencing(e);
            }
            return;
        }
        self.check_fencing(e);
        let Some(k) = self.stage_of(e) else { return };
        if self
            .succeeded_tasks
            .values()
            .any(|s| s.contains(&e.task_id))
        {
            self.err(e, Rule::OneOutcome, "succeeded twice");
        }
        self.succeeded_tasks.entry(k).or_default().insert(e.task_id);
    }

    /// An outcome naming an attempt must name the live one: the latest
    /// assigned in this run (I4).
    fn check_fencing(&mut self, e: &Event) {
        if e.attempt == 0 {
            return;
        }
        let latest = self
            .attempts
            .get(&e.task_id)
            .and_then(|a| a.last())
            .copied();
        if latest != Some(e.attempt) {
            self.err(
                e,
                Rule::Fencing,
                format!(
                    "outcome of attempt {}, latest assigned is {latest:?}",
                    e.attempt
                ),
            );
        }
    }
}
