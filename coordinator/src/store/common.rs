//! Rules both backends apply the same way, kept out of their SQL: how a
//! subject's status is derived, what a dead task's reason says, how long a
//! retry waits, and which tasks a completion may add where.

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::Rng;

use crate::domain::{
    Completion, EventKind, LeaseToken, Migration, MigrationState, NewTask, ReportAck, Revoked,
    StageSpec, SubjectStatus, TaskSpec, shown, validate_task,
};
use crate::error::{Error, Result};
use crate::store::{ClaimRequest, Effects, LeasedTask, Report};

/// The error for a stored value this build does not know (a state or kind
/// name written by another version, or a damaged row).
/// Why a report on a migration past its deadline changes nothing (I10):
/// after its deadline a migration moves no further, and the sweeper fails it
/// with reason "deadline exceeded".
pub(crate) fn past_deadline(migration_id: i64, late_ms: i64) -> String {
    format!(
        "migration {migration_id} passed its deadline {late_ms} ms ago: it records no more results \
         and fails with reason \"deadline exceeded\"; drop this report"
    )
}

/// A create whose deadline is not in the future (I10), `late_ms` after it.
pub(crate) fn deadline_not_ahead(late_ms: i64) -> Error {
    Error::invalid(
        "deadline",
        format!(
            "the deadline passed {late_ms} ms ago by the coordinator's clock; give a time in the \
             future, or none"
        ),
    )
}

/// A retry of a migration whose deadline has passed (I10).
pub(crate) fn retry_past_deadline(migration_id: i64, late_ms: i64) -> Error {
    Error::FailedPrecondition(format!(
        "migration {migration_id} passed its deadline {late_ms} ms ago and cannot run again; \
         create a new migration with a later deadline"
    ))
}

/// The message of a TaskHandedBack event.
pub(crate) const HANDED_BACK: &str =
    "the worker's stream closed before the assignment reached it; the attempt did not count";

pub(crate) fn corrupt(what: &str, value: &str) -> Error {
    Error::Corrupt(format!("unknown {what} {value:?} in the database"))
}

/// A stored event kind, parsed.
pub(crate) fn event_kind(kind: &str) -> Result<EventKind> {
    EventKind::parse(kind).ok_or_else(|| corrupt("event kind", kind))
}

/// The leases a migration's end took back — `(task id, attempt, holder)`
/// rows — as the cancel notices their workers get (I9), saying `why`.
pub(crate) fn revoked(leases: Vec<(i64, i64, Option<String>)>, why: &str) -> Vec<Revoked> {
    leases
        .into_iter()
        .map(|(task_id, attempt, worker)| Revoked {
            worker_id: worker.unwrap_or_default(),
            lease: LeaseToken {
                task_id,
                attempt: attempt as u32,
            },
            reason: why.to_string(),
        })
        .collect()
}

/// The state a new task starts in. Tasks wait pending until their stage
/// starts, which makes them ready; a created migration's tasks go in after
/// its admission, so the stage that admission started gets its tasks ready
/// as they are written instead of written twice (a 100,000-task create
/// spent about 40 % of its time on PostgreSQL updating them to ready).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NewTaskState {
    Pending,
    Ready,
}

impl NewTaskState {
    /// For the tasks of stage `idx` when `running` is the migration's
    /// running stage and whether it is serial: ready only in a running
    /// parallel stage (a serial stage readies its first task itself).
    pub fn of(idx: i64, running: Option<(i64, bool)>) -> Self {
        if running == Some((idx, false)) {
            NewTaskState::Ready
        } else {
            NewTaskState::Pending
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NewTaskState::Pending => "pending",
            NewTaskState::Ready => "ready",
        }
    }
}

/// One stage's worth of a created plan's tasks, to insert.
pub(crate) struct StageTasks<'a> {
    pub idx: i64,
    /// The stage's attempt budget, for tasks that set none of their own.
    pub attempts: i64,
    pub tasks: Vec<&'a TaskSpec>,
    pub state: NewTaskState,
}

/// A created plan's tasks, stage by stage, once admission has run:
/// `running` is the stage it started (index, serial), if any.
pub(crate) fn created_tasks(
    stages: &[StageSpec],
    running: Option<(i64, bool)>,
) -> impl Iterator<Item = StageTasks<'_>> {
    stages
        .iter()
        .enumerate()
        .map(move |(idx, stage)| StageTasks {
            idx: idx as i64,
            attempts: stage.retry.resolved().max_attempts as i64,
            tasks: stage.tasks.iter().collect(),
            state: NewTaskState::of(idx as i64, running),
        })
}

/// An event to append, owned so a batch can collect many; each backend
/// inserts them set at a time.
pub(crate) struct NewEvent {
    pub migration_id: i64,
    pub kind: EventKind,
    pub stage: Option<i64>,
    pub task_id: i64,
    pub attempt: i64,
    pub worker: String,
    pub message: String,
}

impl NewEvent {
    /// TASK_ASSIGNED: `worker` leased attempt `attempt` of the task.
    pub fn assigned(
        migration_id: i64,
        stage: i64,
        task_id: i64,
        attempt: i64,
        worker: &str,
    ) -> Self {
        NewEvent {
            migration_id,
            kind: EventKind::TaskAssigned,
            stage: Some(stage),
            task_id,
            attempt,
            worker: worker.to_string(),
            message: String::new(),
        }
    }

    /// TASK_SUCCEEDED of a completion taken from a batch.
    pub fn succeeded(t: &Taken<'_>) -> Self {
        NewEvent {
            migration_id: t.migration_id,
            kind: EventKind::TaskSucceeded,
            stage: Some(t.stage),
            task_id: t.completion.lease.task_id,
            attempt: t.completion.lease.attempt as i64,
            worker: t.worker.to_string(),
            message: String::new(),
        }
    }

    /// TASK_ADDED: task `task_id` of `kind` added to `stage` by task `by`.
    pub fn added(migration_id: i64, stage: i64, task_id: i64, kind: &str, by: i64) -> Self {
        NewEvent {
            migration_id,
            kind: EventKind::TaskAdded,
            stage: Some(stage),
            task_id,
            attempt: 0,
            worker: String::new(),
            message: format!("{kind} added by task {by}"),
        }
    }
}

/// A completion of a batch: its index in the batch, the reporting worker.
pub(crate) type Plain<'a> = (usize, &'a str, &'a Completion);

/// The completions of a batch of reports that add no tasks: the ones the
/// set-at-a-time path records.
pub(crate) fn plain_completions(reports: &[(String, Report)]) -> Vec<Plain<'_>> {
    reports
        .iter()
        .enumerate()
        .filter_map(|(i, (w, r))| match r {
            Report::Complete(c) if c.add_tasks.is_empty() => Some((i, w.as_str(), c)),
            _ => None,
        })
        .collect()
}

/// A live lease as read for a batch: attempt, secret, holder, migration,
/// stage.
pub(crate) type LiveLease = (i64, Option<i64>, Option<String>, i64, i64);

/// A completion whose lease is live, with its task's migration and stage.
pub(crate) struct Taken<'a> {
    pub index: usize,
    pub worker: &'a str,
    pub completion: &'a Completion,
    pub migration_id: i64,
    pub stage: i64,
}

/// The completions of `batch` whose token is the live lease (by task id in
/// `live`) of the worker reporting it, with its secret, each task once (I4).
/// The rest go the one-by-one way, which answers repeats and stale tokens
/// (a wrong secret among them).
pub(crate) fn live_completions<'a>(
    batch: &[Plain<'a>],
    live: &HashMap<i64, LiveLease>,
) -> Vec<Taken<'a>> {
    let mut seen = HashSet::new();
    batch
        .iter()
        .filter_map(|&(index, worker, c)| {
            let (attempt, secret, holder, migration_id, stage) = live.get(&c.lease.task_id)?;
            (*attempt == c.lease.attempt as i64
                && *secret == Some(c.secret.db())
                && holder.as_deref() == Some(worker)
                && seen.insert(c.lease.task_id))
            .then_some(Taken {
                index,
                worker,
                completion: c,
                migration_id: *migration_id,
                stage: *stage,
            })
        })
        .collect()
}

/// Every taken report recorded, the batch's effects riding on the first
/// (the committer applies them all anyway).
pub(crate) fn recorded(
    taken: &[Taken<'_>],
    mut fx: Effects,
) -> HashMap<usize, (ReportAck, Effects)> {
    taken
        .iter()
        .enumerate()
        .map(|(n, t)| {
            let effects = if n == 0 {
                std::mem::take(&mut fx)
            } else {
                Effects::default()
            };
            (t.index, (ReportAck::Recorded, effects))
        })
        .collect()
}

/// Free slots of each request: its slots (none without kinds) less the
/// live leases its worker holds (I12), given by worker id.
pub(crate) fn free_slots(requests: &[ClaimRequest], held: &HashMap<String, i64>) -> Vec<i64> {
    requests
        .iter()
        .map(|r| {
            let slots = if r.kinds.is_empty() {
                0
            } else {
                r.slots as i64
            };
            slots - held.get(&r.worker_id).copied().unwrap_or(0)
        })
        .collect()
}

/// How many ready tasks of each kind a dispatch pass looks at: for every
/// kind some worker with free slots runs, the free slots of all such
/// workers (`free` is per request, in order).
pub(crate) fn wanted_per_kind<'a>(
    requests: &'a [ClaimRequest],
    free: &[i64],
) -> Vec<(&'a str, i64)> {
    let mut wanted: Vec<(&str, i64)> = Vec::new();
    for (r, &f) in requests.iter().zip(free) {
        if f <= 0 {
            continue;
        }
        for kind in &r.kinds {
            match wanted.iter_mut().find(|(k, _)| k == kind) {
                Some((_, n)) => *n += f,
                None => wanted.push((kind, f)),
            }
        }
    }
    wanted
}

/// A ready task as a pass deals it: its kind, its id, and the worker its
/// last lease expired on, if any (`tasks.expired_worker`).
pub(crate) type Deal<'k> = (&'k str, i64, Option<&'k str>);

/// Deals ready tasks, oldest first, round-robin over the workers that run
/// their kind and still have free slots; returns each request's task ids
/// and takes what it deals from `free`.
///
/// A task whose lease expired on a worker goes to another one when any
/// with a free slot runs its kind, and back to that worker only when none
/// does: a frozen worker that still looks eligible does not get back the
/// task it just lost (and with a small `--max-reassignments`, lose it for
/// good). It costs the pass nothing but the column.
pub(crate) fn deal<'k>(
    requests: &[ClaimRequest],
    free: &mut [i64],
    candidates: impl IntoIterator<Item = Deal<'k>>,
) -> Vec<Vec<i64>> {
    let n = requests.len();
    let mut picked: Vec<Vec<i64>> = vec![Vec::new(); n];
    let mut next = 0;
    for (kind, id, lost_on) in candidates {
        let takes = |w: usize| free[w] > 0 && requests[w].kinds.iter().any(|k| k == kind);
        let order = || (0..n).map(|k| (next + k) % n);
        let other = order().find(|&w| takes(w) && Some(requests[w].worker_id.as_str()) != lost_on);
        if let Some(w) = other.or_else(|| order().find(|&w| takes(w))) {
            free[w] -= 1;
            picked[w].push(id);
            next = (w + 1) % n;
        }
    }
    picked
}

/// What the sweep does with a lease that expired for the `expiries`-th
/// time (counting this one): whether the task is dead, and the event's
/// message. `--max-reassignments N` means N expiries survived, so N + 1
/// assignments; the expiry after them kills the task.
pub(crate) fn expiry(worker: &str, expiries: i64, max_reassignments: u32) -> (bool, String) {
    let dead = expiries > i64::from(max_reassignments);
    let then = if dead {
        "the task is dead"
    } else {
        "the task is reassigned"
    };
    let message = format!(
        "lease expired on worker {worker:?}: expiry {expiries}, {}; {then}",
        reassignments(max_reassignments)
    );
    (dead, message)
}

/// The migration's reason when a task dies of lease expiries (I7).
pub(crate) fn lost_reason(
    task_id: i64,
    kind: &str,
    expiries: i64,
    max_reassignments: u32,
) -> String {
    let times = if expiries == 1 { "time" } else { "times" };
    format!(
        "task {task_id} ({kind}) lost its worker {expiries} {times} ({}): its lease expired each time",
        reassignments(max_reassignments)
    )
}

fn reassignments(max: u32) -> String {
    let s = if max == 1 { "" } else { "s" };
    format!("at most {max} reassignment{s}")
}

/// A stage as fan-out sees it: index, name, state, and its `max_attempts`.
pub(crate) type StageRow = (i64, String, String, i64);

/// Checks every task a completing task of stage `from` adds and groups them
/// by target stage index, with that stage's `max_attempts`. Tasks may only
/// go to later stages that have not started; one bad task refuses them all.
pub(crate) fn plan_added_tasks<'a>(
    stages: &[StageRow],
    from: i64,
    add_tasks: &'a [NewTask],
    min_heartbeat_timeout_ms: u32,
) -> Result<BTreeMap<i64, (i64, Vec<&'a TaskSpec>)>> {
    let mut per_stage: BTreeMap<i64, (i64, Vec<&TaskSpec>)> = BTreeMap::new();
    for (j, new) in add_tasks.iter().enumerate() {
        let field = format!("add_tasks[{j}]");
        validate_task(&field, &new.task, min_heartbeat_timeout_ms)?;
        let Some((idx, name, state, attempts)) = stages.iter().find(|s| s.1 == new.stage) else {
            let names: Vec<&str> = stages.iter().map(|s| s.1.as_str()).collect();
            return Err(Error::invalid(
                format!("{field}.stage"),
                format!(
                    "the plan has no stage {}; its stages are {names:?}",
                    shown(&new.stage)
                ),
            ));
        };
        if *idx <= from || state != "pending" {
            return Err(Error::FailedPrecondition(format!(
                "{field}.stage: stage {name:?} (index {idx}) has already started or is not after this task's stage (index {from}); tasks can only be added to later stages that have not started"
            )));
        }
        per_stage
            .entry(*idx)
            .or_insert((*attempts, Vec::new()))
            .1
            .push(&new.task);
    }
    Ok(per_stage)
}

/// A subject's status from its latest migration and whether any run of it
/// succeeded.
pub(crate) fn subject_status(latest: Option<&Migration>, any_succeeded: bool) -> SubjectStatus {
    match latest {
        None => SubjectStatus::None,
        Some(m) if any_succeeded && !m.state.is_terminal() => SubjectStatus::Regenerating,
        Some(m) => match m.state {
            MigrationState::Queued => SubjectStatus::Queued,
            MigrationState::Running => SubjectStatus::Running,
            MigrationState::Succeeded => SubjectStatus::Finished,
            MigrationState::Failed | MigrationState::Canceled => SubjectStatus::Failed,
        },
    }
}

/// The migration's reason when a task dies of a reported failure (I7).
pub(crate) fn dead_reason(
    task_id: i64,
    kind: &str,
    failures: i64,
    error: &str,
    retryable: bool,
) -> String {
    if retryable {
        let s = if failures == 1 { "" } else { "s" };
        format!("task {task_id} ({kind}) failed after {failures} attempt{s}: {error}")
    } else {
        format!("task {task_id} ({kind}) failed: {error}")
    }
}

/// Exponential backoff with equal jitter: half the delay is fixed, half random,
/// so retries of many tasks that failed together spread out.
pub(crate) fn backoff_ms(initial: i64, max: i64, failures: i64) -> i64 {
    let exp = initial.saturating_mul(1i64 << (failures - 1).clamp(0, 30));
    let delay = exp.min(max).max(1);
    delay / 2 + rand::rng().random_range(0..=delay / 2)
}

/// A row of `leased_tasks`: id, attempt, stage_idx, kind, lease_worker,
/// progress_done, progress_total, lease_expires_at.
pub(crate) type LeasedTaskRow = (i64, i64, i64, String, Option<String>, i64, i64, Option<i64>);

pub(crate) fn leased_task(row: LeasedTaskRow) -> LeasedTask {
    let (task_id, attempt, stage, kind, worker, done, total, expires) = row;
    LeasedTask {
        lease: LeaseToken {
            task_id,
            attempt: attempt as u32,
        },
        stage_index: stage as u32,
        kind,
        worker_id: worker.unwrap_or_default(),
        done: done.max(0) as u64,
        total: total.max(0) as u64,
        lease_expires_at_ms: expires,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(worker: &str, kinds: &[&str], slots: u32) -> ClaimRequest {
        ClaimRequest {
            worker_id: worker.into(),
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
            slots,
        }
    }

    #[test]
    fn new_tasks_are_ready_only_in_a_running_parallel_stage() {
        use NewTaskState::{Pending, Ready};
        assert_eq!(NewTaskState::of(1, Some((1, false))), Ready);
        assert_eq!(NewTaskState::of(1, Some((1, true))), Pending, "serial");
        assert_eq!(NewTaskState::of(2, Some((1, false))), Pending, "later");
        assert_eq!(NewTaskState::of(0, None), Pending, "queued");
    }

    #[test]
    fn a_pass_deals_oldest_first_round_robin_within_free_slots() {
        let requests = [request("a", &["x", "y"], 2), request("b", &["x"], 5)];
        let mut free = vec![2, 1];
        assert_eq!(wanted_per_kind(&requests, &free), vec![("x", 3), ("y", 2)]);
        let ready = [("x", 1), ("y", 2), ("x", 3), ("x", 4), ("y", 5)];
        let picked = deal(&requests, &mut free, ready.map(|(k, id)| (k, id, None)));
        // b runs only x, so the y task after a's x1 goes to a as well.
        assert_eq!(picked, vec![vec![1, 2], vec![3]]);
        assert_eq!(free, vec![0, 0]);
        // A worker with no free slots asks for nothing.
        assert_eq!(wanted_per_kind(&requests, &[0, 4]), vec![("x", 4)]);
    }

    #[test]
    fn a_task_lost_on_a_worker_goes_to_another_with_a_free_slot_first() {
        let requests = [request("a", &["x"], 2), request("b", &["x"], 1)];
        let mut free = vec![2, 1];
        // 1 and 2 were lost on a: b takes one, a gets the other back
        // rather than nobody; 3 was lost on b and goes to a.
        let ready = [
            ("x", 1, Some("a")),
            ("x", 2, Some("a")),
            ("x", 3, Some("b")),
        ];
        let picked = deal(&requests, &mut free, ready);
        assert_eq!(picked, vec![vec![2, 3], vec![1]]);
        // A worker not asking at all changes nothing.
        let mut free = vec![1, 1];
        let picked = deal(&requests, &mut free, [("x", 4, Some("gone"))]);
        assert_eq!(picked, vec![vec![4], vec![]]);
    }

    #[test]
    fn the_cap_counts_expiries_survived() {
        let (dead, message) = expiry("w", 2, 2);
        assert!(!dead);
        assert_eq!(
            message,
            "lease expired on worker \"w\": expiry 2, at most 2 reassignments; the task is reassigned"
        );
        assert!(expiry("w", 3, 2).0);
        assert!(expiry("w", 1, 0).0, "0: the first expiry kills");
        assert_eq!(
            lost_reason(7, "k", 2, 1),
            "task 7 (k) lost its worker 2 times (at most 1 reassignment): its lease expired each time"
        );
        assert!(lost_reason(7, "k", 1, 0).contains("lost its worker 1 time ("));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        for _ in 0..100 {
            let d = backoff_ms(100, 1_000, 3);
            assert!((200..=400).contains(&d), "{d}");
            let capped = backoff_ms(100, 1_000, 20);
            assert!((500..=1_000).contains(&capped), "{capped}");
        }
    }

    #[test]
    fn reasons_name_the_task_kind_and_attempts() {
        assert_eq!(
            dead_reason(7, "k", 1, "boom", true),
            "task 7 (k) failed after 1 attempt: boom"
        );
        assert_eq!(
            dead_reason(7, "k", 3, "boom", true),
            "task 7 (k) failed after 3 attempts: boom"
        );
        assert_eq!(
            dead_reason(7, "k", 1, "boom", false),
            "task 7 (k) failed: boom"
        );
    }
}
