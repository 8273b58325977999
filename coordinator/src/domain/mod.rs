//! Domain types: plans and their validation, migrations, stages, tasks,
//! leases and events. No protobuf and no SQL here.

mod limits;
mod model;
mod plan;

pub use limits::RequestLimits;
pub use model::*;
pub use plan::{
    MAX_JSON_DEPTH, MAX_STAGES, MAX_STATIC_TASKS, PlanSpec, RetryPolicy, StageSpec, TaskSpec,
    shown, task_override, validate_json_depth, validate_name, validate_task, validate_text,
};
