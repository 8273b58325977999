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
//! Rules across migrations (capacity, worker slots) are in
//! [`crate::capacity`].
//!
//! Runs matter because a retried migration runs its unfinished tasks again.

use std::collections::{BTreeMap, HashMap, HashSet};

use stagecoach_proto::v1::{Event, EventKind, Migration, MigrationState, StageState};

/// Checks every rule of the module docs on one migration and its complete
/// event log (oldest first). Returns every violation found.
pub fn check_invariants(migration: &Migration, events: &[Event]) -> Result<(), Vec<String>> {
    let mut walk = Walk::new(migration, events);
    walk.run();
    let mut errors = walk.errors;
    check_nothing_after_deadline(migration, events, &mut errors);
    check_outcome(migration, events, &walk.succeeded_tasks, &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
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

fn is_task_terminal(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::TaskSucceeded | EventKind::TaskDead | EventKind::TaskCanceled
    )
}

fn terminal_event_of(state: MigrationState) -> Option<EventKind> {
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
struct Walk<'a> {
    migration_id: i64,
    events: &'a [Event],
    errors: Vec<String>,
    /// Stage of each task, from the `stage_index` of its events.
    task_stage: HashMap<i64, u32>,
    phase: Phase,
    /// Stages that succeeded, ever (a succeeded stage never runs again).
    stage_succeeded: HashSet<u32>,
    /// Tasks that succeeded, ever, by stage.
    succeeded_tasks: BTreeMap<u32, HashSet<i64>>,
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
    fn new(migration: &Migration, events: &'a [Event]) -> Self {
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
                Some(prev) if prev != k => errors.push(format!(
                    "log: task {} is in stage {prev} and in stage {k}: {}",
                    e.task_id,
                    describe_event(e)
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

    fn err(&mut self, e: &Event, rule: &str, what: impl std::fmt::Display) {
        self.errors
            .push(format!("{rule}: {what}: {}", describe_event(e)));
    }

    fn run(&mut self) {
        let events = self.events;
        let mut last_id = i64::MIN;
        for (i, e) in events.iter().enumerate() {
            if e.id <= last_id {
                self.err(
                    e,
                    "log",
                    format!("event id not above previous id {last_id}"),
                );
            }
            last_id = last_id.max(e.id);
            if e.migration_id != self.migration_id {
                self.err(
                    e,
                    "log",
                    format!(
                        "event of migration {}, wanted {}",
                        e.migration_id, self.migration_id
                    ),
                );
            }
            let kind = e.kind();
            if (i == 0) != (kind == EventKind::MigrationCreated) {
                self.err(e, "log", "MIGRATION_CREATED must be the first event, once");
            }
            if self.phase == Phase::Finished && kind == EventKind::TaskAssigned {
                self.err(e, "I9", "task assigned after the migration ended");
            } else if self.phase == Phase::Finished
                && !matches!(
                    kind,
                    EventKind::ReportRejected | EventKind::MigrationRetried
                )
            {
                self.err(e, "log", "event after the migration's terminal event");
            }
            self.step(e, kind);
        }
    }

    fn step(&mut self, e: &Event, kind: EventKind) {
        match kind {
            EventKind::MigrationAdmitted => {
                if self.phase != Phase::Queued {
                    self.err(e, "I2", "admitted while not queued");
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
                    self.err(e, "log", "retried while not finished");
                }
                self.phase = Phase::Queued;
            }
            k if is_migration_terminal(k) => {
                // Canceling a queued migration is fine, and so is failing
                // one whose deadline passed in the queue (I10); finishing
                // twice is not.
                if self.phase == Phase::Finished {
                    self.err(e, "log", "a second terminal event in one run");
                }
                let unadmitted_end = k == EventKind::MigrationCanceled
                    || (k == EventKind::MigrationFailed && e.message == DEADLINE_EXCEEDED);
                if !unadmitted_end && self.phase != Phase::Running {
                    self.err(e, "log", "finished without being admitted");
                }
                self.phase = Phase::Finished;
            }
            EventKind::StageStarted => self.stage_started(e),
            EventKind::StageSucceeded => {
                let Some(k) = self.stage_of(e) else { return };
                if !self.stage_succeeded.insert(k) {
                    self.err(e, "I2", format!("stage {k} succeeded twice"));
                }
            }
            EventKind::TaskAssigned => self.task_assigned(e),
            k if is_task_terminal(k) => self.task_finished(e, k),
            EventKind::TaskRetrying | EventKind::TaskLeaseExpired | EventKind::TaskHandedBack => {
                if self.task_terminal.contains_key(&e.task_id) {
                    self.err(e, "I5", "attempt ended after the task's terminal outcome");
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
                "log",
                "no stage_index on this event or any event of its task",
            );
        }
        k
    }

    fn stage_started(&mut self, e: &Event) {
        if self.phase != Phase::Running {
            self.err(e, "log", "stage started outside a run");
        }
        let Some(k) = self.stage_of(e) else { return };
        if !self.started.insert(k) {
            self.err(e, "I2", format!("stage {k} started twice in one run"));
        }
        if k > 0 && !self.stage_succeeded.contains(&(k - 1)) {
            self.err(
                e,
                "I1",
                format!("stage {k} started before stage {} succeeded", k - 1),
            );
        }
    }

    fn task_assigned(&mut self, e: &Event) {
        if self.phase != Phase::Running {
            self.err(e, "log", "task assigned outside a run");
        }
        if let Some(k) = self.stage_of(e)
            && k > 0
            && !self.stage_succeeded.contains(&(k - 1))
        {
            self.err(
                e,
                "I1",
                format!(
                    "task of stage {k} assigned before stage {} succeeded",
                    k - 1
                ),
            );
        }
        if let Some(at) = self.task_terminal.get(&e.task_id).copied() {
            self.err(e, "I5", format!("assigned after its terminal event #{at}"));
        }
        if self
            .succeeded_tasks
            .values()
            .any(|s| s.contains(&e.task_id))
        {
            self.err(e, "I5", "assigned again after it succeeded");
        }
        if let Some(live) = self.live.insert(e.task_id, e.attempt) {
            self.err(
                e,
                "I4",
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
                "I7",
                format!("attempt {} does not follow attempt {last}", e.attempt),
            );
        }
        if count > max as usize {
            self.err(
                e,
                "I7",
                format!("{count} assignments but highest attempt is {max}"),
            );
        }
    }

    fn task_finished(&mut self, e: &Event, kind: EventKind) {
        self.live.remove(&e.task_id);
        if let Some(prev) = self.task_terminal.insert(e.task_id, e.id) {
            self.err(
                e,
                "I5",
                format!("second terminal outcome, first was #{prev}"),
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
            self.err(e, "I5", "succeeded twice");
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
                "I4",
                format!(
                    "outcome of attempt {}, latest assigned is {latest:?}",
                    e.attempt
                ),
            );
        }
    }
}

/// Rules on the migration as it ended, compared with its log.
fn check_outcome(
    m: &Migration,
    events: &[Event],
    succeeded_tasks: &BTreeMap<u32, HashSet<i64>>,
    errors: &mut Vec<String>,
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
        Some(e) => errors.push(format!(
            "log: migration is {:?} but its last event is {}, wanted {}",
            m.state(),
            describe_event(e),
            want.as_str_name()
        )),
        None => errors.push(format!(
            "log: migration is {:?} but has no events",
            m.state()
        )),
    }
    check_deadline(m, events, errors);
    for s in &m.stages {
        let finished = matches!(
            s.state(),
            StageState::Succeeded | StageState::Failed | StageState::Canceled
        );
        if finished && s.total != s.succeeded + s.failed + s.canceled {
            errors.push(format!(
                "I5: stage {} ({}) is {:?} with total {} != succeeded {} + failed {} + canceled {}",
                s.index,
                s.name,
                s.state(),
                s.total,
                s.succeeded,
                s.failed,
                s.canceled
            ));
        }
        let logged = succeeded_tasks.get(&s.index).map_or(0, HashSet::len);
        if logged != s.succeeded as usize {
            errors.push(format!(
                "I5: stage {} ({}) counts {} succeeded tasks, the log has {logged}",
                s.index, s.name, s.succeeded
            ));
        }
    }
    if m.state() != MigrationState::Succeeded {
        return;
    }
    for s in &m.stages {
        if s.state() != StageState::Succeeded || s.succeeded != s.total {
            errors.push(format!(
                "I5: migration succeeded but stage {} ({}) is {:?} with {}/{} tasks succeeded",
                s.index,
                s.name,
                s.state(),
                s.succeeded,
                s.total
            ));
        }
        let logged = events
            .iter()
            .any(|e| e.kind() == EventKind::StageSucceeded && e.stage_index == Some(s.index));
        if !logged {
            errors.push(format!(
                "I5: migration succeeded but the log has no STAGE_SUCCEEDED for stage {}",
                s.index
            ));
        }
    }
    let all_succeeded: HashSet<i64> = succeeded_tasks.values().flatten().copied().collect();
    let mut unfinished: Vec<i64> = events
        .iter()
        .filter(|e| e.task_id != 0 && !all_succeeded.contains(&e.task_id))
        .map(|e| e.task_id)
        .collect();
    unfinished.sort_unstable();
    unfinished.dedup();
    if !unfinished.is_empty() {
        errors.push(format!(
            "I5: migration succeeded but tasks {unfinished:?} never succeeded"
        ));
    }
}

/// The reason the coordinator gives a migration that ran past its deadline.
pub const DEADLINE_EXCEEDED: &str = "deadline exceeded";

/// I10 on a migration in any state: nothing moves forward after its
/// deadline.
fn check_nothing_after_deadline(m: &Migration, events: &[Event], errors: &mut Vec<String>) {
    let Some(deadline) = m.deadline.as_ref().map(millis) else {
        return;
    };
    for e in events.iter().filter(|e| moves_forward(e.kind())) {
        if let Some(at) = e.at.as_ref().map(millis)
            && at > deadline
        {
            errors.push(format!(
                "I10: {} ms after the deadline: {}",
                at - deadline,
                describe_event(e)
            ));
        }
    }
}

/// I10 on a finished migration, as far as one log can tell: failing for the
/// deadline happens only once it has passed.
fn check_deadline(m: &Migration, events: &[Event], errors: &mut Vec<String>) {
    if m.state() != MigrationState::Failed || m.reason != DEADLINE_EXCEEDED {
        return;
    }
    let Some(deadline) = m.deadline.as_ref().map(millis) else {
        errors.push(format!(
            "I10: migration failed with reason {DEADLINE_EXCEEDED:?} but has no deadline"
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
        errors.push(format!(
            "I10: failed for its deadline {} ms before the deadline: {}",
            deadline - at,
            describe_event(e)
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

/// Milliseconds since the Unix epoch.
pub fn millis(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

#[cfg(test)]
mod tests;
