//! Every conversion between protobuf messages and domain types, in one place.
//! Input conversions validate shape and name the offending field; domain
//! rules (plan validation, limits) stay in the core.

use prost_types::Timestamp;
use stagecoach_proto::json::{json_to_struct, struct_to_json};
use stagecoach_proto::v1 as pb;

use crate::domain::{
    Assignment, Completion, Event, EventKind, Failure, LeaseSecret, LeaseStatus, LeaseToken,
    Migration, MigrationState, NewTask, PlanSpec, Pool, RetryPolicy, StageProgress, StageSpec,
    StageState, SubjectStatus, TaskSpec, validate_json_depth,
};
use crate::engine::{WorkerEvent, WorkerView};
use crate::error::{Error, Result};

pub fn timestamp(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn opt_timestamp(ms: Option<i64>) -> Option<Timestamp> {
    ms.map(timestamp)
}

pub fn timestamp_ms(field: &str, t: &Timestamp) -> Result<i64> {
    if t.nanos < 0 || t.nanos >= 1_000_000_000 {
        return Err(Error::invalid(field, "nanos must be 0-999999999"));
    }
    t.seconds
        .checked_mul(1000)
        .and_then(|s| s.checked_add(i64::from(t.nanos) / 1_000_000))
        .ok_or_else(|| Error::invalid(field, "the timestamp is out of range"))
}

// --- plans -----------------------------------------------------------------

pub fn plan_from_pb(p: pb::Plan) -> PlanSpec {
    PlanSpec {
        name: p.name,
        version: 0,
        description: p.description,
        stages: p
            .stages
            .into_iter()
            .map(|s| StageSpec {
                name: s.name,
                serial: s.serial,
                dynamic: s.dynamic,
                tasks: s
                    .tasks
                    .into_iter()
                    .map(|t| TaskSpec {
                        kind: t.kind,
                        payload: struct_to_json(t.payload.as_ref()),
                        max_attempts: t.max_attempts,
                        retry: retry_from_pb(t.retry),
                    })
                    .collect(),
                retry: retry_from_pb(s.retry),
            })
            .collect(),
    }
}

pub fn plan_to_pb(p: &PlanSpec) -> pb::Plan {
    pb::Plan {
        name: p.name.clone(),
        version: p.version,
        description: p.description.clone(),
        stages: p
            .stages
            .iter()
            .map(|s| pb::StageSpec {
                name: s.name.clone(),
                serial: s.serial,
                dynamic: s.dynamic,
                tasks: s
                    .tasks
                    .iter()
                    .map(|t| pb::TaskSpec {
                        kind: t.kind.clone(),
                        payload: Some(json_to_struct(&t.payload)),
                        max_attempts: t.max_attempts,
                        retry: retry_to_pb(t.retry),
                    })
                    .collect(),
                retry: retry_to_pb(s.retry),
            })
            .collect(),
    }
}

fn retry_from_pb(r: Option<pb::RetryPolicy>) -> RetryPolicy {
    r.map(|r| RetryPolicy {
        max_attempts: r.max_attempts,
        initial_backoff_ms: r.initial_backoff_ms,
        max_backoff_ms: r.max_backoff_ms,
        attempt_timeout_ms: r.attempt_timeout_ms,
        heartbeat_timeout_ms: r.heartbeat_timeout_ms,
    })
    .unwrap_or_default()
}

fn retry_to_pb(r: RetryPolicy) -> Option<pb::RetryPolicy> {
    (!r.is_unset()).then_some(pb::RetryPolicy {
        max_attempts: r.max_attempts,
        initial_backoff_ms: r.initial_backoff_ms,
        max_backoff_ms: r.max_backoff_ms,
        attempt_timeout_ms: r.attempt_timeout_ms,
        heartbeat_timeout_ms: r.heartbeat_timeout_ms,
    })
}

// --- migrations and events ---------------------------------------------------

pub fn migration_state_to_pb(s: MigrationState) -> pb::MigrationState {
    match s {
        MigrationState::Queued => pb::MigrationState::Queued,
        MigrationState::Running => pb::MigrationState::Running,
        MigrationState::Succeeded => pb::MigrationState::Succeeded,
        MigrationState::Failed => pb::MigrationState::Failed,
        MigrationState::Canceled => pb::MigrationState::Canceled,
    }
}

pub fn migration_state_from_pb(field: &str, v: i32) -> Result<Option<MigrationState>> {
    let state = pb::MigrationState::try_from(v).map_err(|_| {
        Error::invalid(
            field,
            format!("{v} is not a MigrationState; use 0 (any) to 5"),
        )
    })?;
    Ok(match state {
        pb::MigrationState::Unspecified => None,
        pb::MigrationState::Queued => Some(MigrationState::Queued),
        pb::MigrationState::Running => Some(MigrationState::Running),
        pb::MigrationState::Succeeded => Some(MigrationState::Succeeded),
        pb::MigrationState::Failed => Some(MigrationState::Failed),
        pb::MigrationState::Canceled => Some(MigrationState::Canceled),
    })
}

fn stage_state_to_pb(s: StageState) -> pb::StageState {
    match s {
        StageState::Pending => pb::StageState::Pending,
        StageState::Running => pb::StageState::Running,
        StageState::Succeeded => pb::StageState::Succeeded,
        StageState::Failed => pb::StageState::Failed,
        StageState::Canceled => pb::StageState::Canceled,
    }
}

fn stage_to_pb(s: &StageProgress) -> pb::StageProgress {
    pb::StageProgress {
        index: s.index,
        name: s.name.clone(),
        state: stage_state_to_pb(s.state) as i32,
        total: s.total,
        succeeded: s.succeeded,
        failed: s.failed,
        canceled: s.canceled,
        running: s.running,
        started_at: opt_timestamp(s.started_at_ms),
        finished_at: opt_timestamp(s.finished_at_ms),
    }
}

pub fn migration_to_pb(m: &Migration) -> pb::Migration {
    pb::Migration {
        id: m.id,
        plan_name: m.plan_name.clone(),
        plan_version: m.plan_version,
        subject: m.subject.clone(),
        parameters: Some(json_to_struct(&m.parameters)),
        pool: m.pool.clone(),
        state: migration_state_to_pb(m.state) as i32,
        reason: m.reason.clone(),
        idempotency_key: m.idempotency_key.clone().unwrap_or_default(),
        deadline: opt_timestamp(m.deadline_ms),
        created_at: Some(timestamp(m.created_at_ms)),
        admitted_at: opt_timestamp(m.admitted_at_ms),
        finished_at: opt_timestamp(m.finished_at_ms),
        stages: m.stages.iter().map(stage_to_pb).collect(),
    }
}

fn event_kind_to_pb(k: EventKind) -> pb::EventKind {
    use pb::EventKind as P;
    match k {
        EventKind::MigrationCreated => P::MigrationCreated,
        EventKind::MigrationAdmitted => P::MigrationAdmitted,
        EventKind::MigrationSucceeded => P::MigrationSucceeded,
        EventKind::MigrationFailed => P::MigrationFailed,
        EventKind::MigrationCanceled => P::MigrationCanceled,
        EventKind::MigrationRetried => P::MigrationRetried,
        EventKind::StageStarted => P::StageStarted,
        EventKind::StageSucceeded => P::StageSucceeded,
        EventKind::StageFailed => P::StageFailed,
        EventKind::TaskAssigned => P::TaskAssigned,
        EventKind::TaskSucceeded => P::TaskSucceeded,
        EventKind::TaskRetrying => P::TaskRetrying,
        EventKind::TaskDead => P::TaskDead,
        EventKind::TaskLeaseExpired => P::TaskLeaseExpired,
        EventKind::TaskAdded => P::TaskAdded,
        EventKind::ReportRejected => P::ReportRejected,
        EventKind::TaskCanceled => P::TaskCanceled,
        EventKind::TaskHandedBack => P::TaskHandedBack,
    }
}

pub fn event_to_pb(e: &Event) -> pb::Event {
    pb::Event {
        id: e.id,
        migration_id: e.migration_id,
        at: Some(timestamp(e.at_ms)),
        kind: event_kind_to_pb(e.kind) as i32,
        stage_index: e.stage_index,
        task_id: e.task_id,
        attempt: e.attempt,
        worker_id: e.worker_id.clone(),
        message: e.message.clone(),
    }
}

pub fn subject_status_to_pb(s: SubjectStatus) -> pb::SubjectStatus {
    match s {
        SubjectStatus::None => pb::SubjectStatus::None,
        SubjectStatus::Queued => pb::SubjectStatus::Queued,
        SubjectStatus::Running => pb::SubjectStatus::Running,
        SubjectStatus::Finished => pb::SubjectStatus::Finished,
        SubjectStatus::Regenerating => pb::SubjectStatus::Regenerating,
        SubjectStatus::Failed => pb::SubjectStatus::Failed,
    }
}

pub fn pool_to_pb(p: &Pool) -> pb::Pool {
    pb::Pool {
        name: p.name.clone(),
        slots: p.slots,
        running: p.running,
        queued: p.queued,
        paused: p.paused,
    }
}

// --- worker protocol ---------------------------------------------------------

pub fn lease_to_pb(l: LeaseToken) -> pb::LeaseToken {
    pb::LeaseToken {
        task_id: l.task_id,
        attempt: l.attempt,
    }
}

pub fn lease_from_pb(field: &str, l: Option<&pb::LeaseToken>) -> Result<LeaseToken> {
    let l = l.ok_or_else(|| {
        Error::invalid(
            field,
            "the lease token is required: copy it from the Assignment",
        )
    })?;
    if l.task_id <= 0 || l.attempt == 0 {
        return Err(Error::invalid(
            field,
            "task_id and attempt must be positive: copy the token from the Assignment",
        ));
    }
    Ok(LeaseToken {
        task_id: l.task_id,
        attempt: l.attempt,
    })
}

pub fn worker_event_to_pb(e: WorkerEvent) -> pb::WorkerMessage {
    use pb::worker_message::Message;
    let message = match e {
        WorkerEvent::Assign(a) => Message::Assignment(assignment_to_pb(a)),
        WorkerEvent::Cancel { lease, reason } => Message::Cancel(pb::CancelNotice {
            lease: Some(lease_to_pb(lease)),
            reason,
        }),
    };
    pb::WorkerMessage {
        message: Some(message),
    }
}

fn assignment_to_pb(a: Assignment) -> pb::Assignment {
    pb::Assignment {
        lease: Some(lease_to_pb(a.lease)),
        lease_secret: a.secret.0,
        migration_id: a.migration_id,
        subject: a.subject,
        stage_index: a.stage_index,
        stage_name: a.stage_name,
        kind: a.kind,
        payload: Some(json_to_struct(&a.payload)),
        parameters: Some(json_to_struct(&a.parameters)),
        lease_expires_at: Some(timestamp(a.lease_expires_at_ms)),
        checkpoint: a.checkpoint,
        max_attempts: a.max_attempts,
        lease_duration_ms: a.lease_ms.clamp(0, u32::MAX as i64) as u32,
    }
}

pub fn lease_status_from_pb(i: usize, s: &pb::LeaseStatus) -> Result<LeaseStatus> {
    Ok(LeaseStatus {
        lease: lease_from_pb(&format!("leases[{i}].lease"), s.lease.as_ref())?,
        // 0 (not sent) names no lease: the lease is answered as not held.
        secret: LeaseSecret(s.lease_secret),
        done: s.done,
        total: s.total,
        checkpoint: s.checkpoint.clone(),
    })
}

pub fn completion_from_pb(i: usize, c: pb::Completion) -> Result<Completion> {
    let output = struct_to_json(c.output.as_ref());
    validate_json_depth(&format!("completions[{i}].output"), &output)?;
    Ok(Completion {
        lease: lease_from_pb(&format!("completions[{i}].lease"), c.lease.as_ref())?,
        // 0 (not sent) names no lease: the report is rejected as stale.
        secret: LeaseSecret(c.lease_secret),
        output,
        add_tasks: c
            .add_tasks
            .into_iter()
            .map(|t| NewTask {
                stage: t.stage,
                task: TaskSpec {
                    kind: t.kind,
                    payload: struct_to_json(t.payload.as_ref()),
                    max_attempts: t.max_attempts,
                    retry: retry_from_pb(t.retry),
                },
            })
            .collect(),
    })
}

pub fn failure_from_pb(i: usize, f: pb::Failure) -> Result<Failure> {
    let lease = lease_from_pb(&format!("failures[{i}].lease"), f.lease.as_ref())?;
    if f.error.is_empty() {
        return Err(Error::invalid(
            format!("failures[{i}].error"),
            "say what went wrong: the error becomes the migration's reason",
        ));
    }
    Ok(Failure {
        lease,
        secret: LeaseSecret(f.lease_secret),
        error: f.error,
        retryable: f.retryable,
    })
}

pub fn worker_to_pb(w: &WorkerView, leases: Vec<LeaseToken>) -> pb::WorkerInfo {
    pb::WorkerInfo {
        worker_id: w.spec.worker_id.clone(),
        name: w.spec.name.clone(),
        kinds: w.spec.kinds.clone(),
        slots: w.spec.slots,
        leases: leases.into_iter().map(lease_to_pb).collect(),
        connected_at: Some(timestamp(w.connected_at_ms)),
        draining: w.draining,
        last_heartbeat: w.last_heartbeat_ms.map(timestamp),
        eligible: w.ineligible.is_none(),
        ineligible_reason: w
            .ineligible
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    }
}
