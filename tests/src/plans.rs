//! Short builders for the plans the scenario tests write, as protobuf
//! messages, so a test reads like the plan it runs:
//!
//! ```
//! use serde_json::json;
//! use stagecoach_tests::plans::{StageExt, plan, retry, stage, task};
//!
//! let p = plan("p", vec![
//!     stage("warm-up", vec![task("sleep", json!({"ms": 500}))]),
//!     stage("work", vec![task("noop", json!({})); 3]).with_retry(retry(5, 100, 1_000, 0)),
//! ]);
//! assert_eq!(p.stages[1].tasks.len(), 3);
//! ```

use serde_json::Value as Json;
use stagecoach_proto::json::json_to_struct;
use stagecoach_proto::v1::create_migration_request::PlanSource;
use stagecoach_proto::v1::{CreateMigrationRequest, Plan, RetryPolicy, StageSpec, TaskSpec};

/// A task of `kind` with `payload`, following its stage's retry policy.
pub fn task(kind: &str, payload: Json) -> TaskSpec {
    TaskSpec {
        kind: kind.to_string(),
        payload: Some(json_to_struct(&payload)),
        ..Default::default()
    }
}

/// A parallel stage with these tasks.
pub fn stage(name: &str, tasks: Vec<TaskSpec>) -> StageSpec {
    StageSpec {
        name: name.to_string(),
        tasks,
        ..Default::default()
    }
}

/// A retry policy; zeros take the coordinator's defaults.
pub fn retry(
    max_attempts: u32,
    initial_backoff_ms: u32,
    max_backoff_ms: u32,
    attempt_timeout_ms: u32,
) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff_ms,
        max_backoff_ms,
        attempt_timeout_ms,
        heartbeat_timeout_ms: 0,
    }
}

/// A plan named `name` with these stages.
pub fn plan(name: &str, stages: Vec<StageSpec>) -> Plan {
    Plan {
        name: name.to_string(),
        stages,
        ..Default::default()
    }
}

/// A CreateMigration request running `plan` inline for `subject` in the
/// default pool; set other fields with struct update syntax.
pub fn create_inline(plan: Plan, subject: &str) -> CreateMigrationRequest {
    CreateMigrationRequest {
        plan_source: Some(PlanSource::InlinePlan(plan)),
        subject: subject.to_string(),
        parameters: Some(json_to_struct(&serde_json::json!({}))),
        ..Default::default()
    }
}

/// Chainable tweaks of a stage.
pub trait StageExt {
    /// The stage with this retry policy.
    fn with_retry(self, retry: RetryPolicy) -> StageSpec;
    /// The stage running its tasks one at a time, in order.
    fn serial(self) -> StageSpec;
    /// The stage open to tasks added at run time.
    fn dynamic(self) -> StageSpec;
}

impl StageExt for StageSpec {
    fn with_retry(self, retry: RetryPolicy) -> StageSpec {
        StageSpec {
            retry: Some(retry),
            ..self
        }
    }

    fn serial(self) -> StageSpec {
        StageSpec {
            serial: true,
            ..self
        }
    }

    fn dynamic(self) -> StageSpec {
        StageSpec {
            dynamic: true,
            ..self
        }
    }
}
