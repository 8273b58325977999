//! The protocol's messages as JSON values: snake_case fields like the
//! proto, enums by their short lower-case name (`running`), times in RFC
//! 3339. A plan comes out in the shape `stagecoach plan put` reads, so
//! `plan show -o json` can be stored again.

use prost_types::Timestamp;
use serde_json::{Value as Json, json};
use stagecoach_proto::json::struct_to_json;
use stagecoach_proto::v1::{
    Event, LeaseToken, Migration, Plan, Pool, RetryPolicy, StageProgress, StageSpec, TaskSpec,
    WorkerInfo,
};

/// `MIGRATION_STATE_RUNNING` → `running`.
pub fn short_name(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_ascii_lowercase()
}

/// RFC 3339, or null when unset.
pub fn time(t: Option<&Timestamp>) -> Json {
    t.map_or(Json::Null, |t| Json::String(t.to_string()))
}

pub fn migration(m: &Migration) -> Json {
    json!({
        "id": m.id,
        "plan_name": m.plan_name,
        "plan_version": m.plan_version,
        "subject": m.subject,
        "parameters": struct_to_json(m.parameters.as_ref()),
        "pool": m.pool,
        "state": short_name(m.state().as_str_name(), "MIGRATION_STATE_"),
        "reason": m.reason,
        "idempotency_key": m.idempotency_key,
        "deadline": time(m.deadline.as_ref()),
        "created_at": time(m.created_at.as_ref()),
        "admitted_at": time(m.admitted_at.as_ref()),
        "finished_at": time(m.finished_at.as_ref()),
        "stages": m.stages.iter().map(stage_progress).collect::<Vec<_>>(),
    })
}

pub fn stage_progress(s: &StageProgress) -> Json {
    json!({
        "index": s.index,
        "name": s.name,
        "state": short_name(s.state().as_str_name(), "STAGE_STATE_"),
        "total": s.total,
        "succeeded": s.succeeded,
        "failed": s.failed,
        "canceled": s.canceled,
        "running": s.running,
        "started_at": time(s.started_at.as_ref()),
        "finished_at": time(s.finished_at.as_ref()),
    })
}

pub fn event(e: &Event) -> Json {
    json!({
        "id": e.id,
        "migration_id": e.migration_id,
        "at": time(e.at.as_ref()),
        "kind": short_name(e.kind().as_str_name(), "EVENT_KIND_"),
        "stage_index": e.stage_index,
        "task_id": e.task_id,
        "attempt": e.attempt,
        "worker_id": e.worker_id,
        "message": e.message,
    })
}

/// The plan in the shape of a plan file, with its version.
pub fn plan(p: &Plan) -> Json {
    json!({
        "name": p.name,
        "version": p.version,
        "description": p.description,
        "stages": p.stages.iter().map(stage_spec).collect::<Vec<_>>(),
    })
}

fn stage_spec(s: &StageSpec) -> Json {
    let mut j = json!({
        "name": s.name,
        "serial": s.serial,
        "dynamic": s.dynamic,
        "tasks": s.tasks.iter().map(task_spec).collect::<Vec<_>>(),
    });
    if let Some(r) = &s.retry {
        j["retry"] = retry(r);
    }
    j
}

fn task_spec(t: &TaskSpec) -> Json {
    let mut j = json!({
        "kind": t.kind,
        "payload": struct_to_json(t.payload.as_ref()),
    });
    if t.max_attempts != 0 {
        j["max_attempts"] = t.max_attempts.into();
    }
    if let Some(r) = &t.retry {
        j["retry"] = retry(r);
    }
    j
}

fn retry(r: &RetryPolicy) -> Json {
    json!({
        "max_attempts": r.max_attempts,
        "initial_backoff_ms": r.initial_backoff_ms,
        "max_backoff_ms": r.max_backoff_ms,
        "attempt_timeout_ms": r.attempt_timeout_ms,
        "heartbeat_timeout_ms": r.heartbeat_timeout_ms,
    })
}

pub fn pool(p: &Pool) -> Json {
    json!({
        "name": p.name,
        "slots": p.slots,
        "running": p.running,
        "queued": p.queued,
        "paused": p.paused,
    })
}

pub fn worker(w: &WorkerInfo) -> Json {
    json!({
        "worker_id": w.worker_id,
        "name": w.name,
        "kinds": w.kinds,
        "slots": w.slots,
        "leases": w.leases.iter().map(lease).collect::<Vec<_>>(),
        "connected_at": time(w.connected_at.as_ref()),
        "draining": w.draining,
        "last_heartbeat": time(w.last_heartbeat.as_ref()),
        "eligible": w.eligible,
        "ineligible_reason": w.ineligible_reason,
    })
}

fn lease(l: &LeaseToken) -> Json {
    json!({ "task_id": l.task_id, "attempt": l.attempt })
}
