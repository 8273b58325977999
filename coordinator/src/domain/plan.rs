//! Plans: the templates migrations run, and the one place they are validated.
//!
//! A plan arrives either as a protobuf message (converted in `grpc::convert`)
//! or as a JSON document; both end up as a [`PlanSpec`] and go through
//! [`PlanSpec::validate`], so the rules and the error messages are the same
//! whichever way a client sends it. Errors name the field with its path
//! (`stages[1].tasks[0].kind`) so a user can find it in a long plan.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Most stages a plan may have.
pub const MAX_STAGES: usize = 10_000;
/// Most tasks a plan may declare up front (more can be added at run time).
pub const MAX_STATIC_TASKS: usize = 1_000_000;
/// Most attempts a task may be given.
pub const MAX_ATTEMPTS: u32 = 100;

/// A named template: an ordered list of stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    pub name: String,
    /// Assigned by the store; ignored on input.
    #[serde(default)]
    pub version: u32,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub stages: Vec<StageSpec>,
}

/// One stage of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    pub name: String,
    #[serde(default)]
    pub serial: bool,
    #[serde(default)]
    pub dynamic: bool,
    #[serde(default)]
    pub tasks: Vec<TaskSpec>,
    #[serde(default)]
    pub retry: RetryPolicy,
}

/// One task of a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub kind: String,
    #[serde(default = "empty_object")]
    pub payload: Value,
    /// 0 means the stage's policy; the same as `retry.max_attempts`.
    #[serde(default)]
    pub max_attempts: u32,
    /// This task's own settings: each non-zero field replaces the stage's.
    #[serde(default, skip_serializing_if = "RetryPolicy::is_unset")]
    pub retry: RetryPolicy,
}

/// How a stage's failed tasks are retried and how long their leases and
/// attempts may last; 0 means "the default". On a task, 0 means "the stage's".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    #[serde(default)]
    pub max_attempts: u32,
    #[serde(default)]
    pub initial_backoff_ms: u32,
    #[serde(default)]
    pub max_backoff_ms: u32,
    /// Longest an attempt may run (start to close); 0 means no limit.
    #[serde(default)]
    pub attempt_timeout_ms: u32,
    /// How long a lease lives after its last heartbeat; 0 means the
    /// coordinator's lease duration.
    #[serde(default)]
    pub heartbeat_timeout_ms: u32,
}

impl TaskSpec {
    /// A task of `kind` with `payload` that follows its stage's policy.
    pub fn new(kind: impl Into<String>, payload: Value) -> Self {
        Self {
            kind: kind.into(),
            payload,
            max_attempts: 0,
            retry: RetryPolicy::default(),
        }
    }
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

impl RetryPolicy {
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
    pub const DEFAULT_INITIAL_BACKOFF_MS: u32 = 1_000;
    pub const DEFAULT_MAX_BACKOFF_MS: u32 = 60_000;

    /// The policy with every default filled in.
    pub fn resolved(self) -> Self {
        let or = |v: u32, d: u32| if v == 0 { d } else { v };
        Self {
            max_attempts: or(self.max_attempts, Self::DEFAULT_MAX_ATTEMPTS),
            initial_backoff_ms: or(self.initial_backoff_ms, Self::DEFAULT_INITIAL_BACKOFF_MS),
            max_backoff_ms: or(self.max_backoff_ms, Self::DEFAULT_MAX_BACKOFF_MS),
            ..self
        }
    }

    /// True when every field is 0 (nothing set).
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }
}

/// What the store keeps of a task's own settings: the attempts it gets
/// (resolved against its stage when added) and the rest of its override.
pub fn task_override(max_attempts: u32, retry: RetryPolicy) -> RetryPolicy {
    RetryPolicy {
        max_attempts: if max_attempts == 0 {
            retry.max_attempts
        } else {
            max_attempts
        },
        ..retry
    }
}

impl PlanSpec {
    /// Parses a plan from JSON, rejecting unknown fields with their path.
    pub fn from_json(json: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(json);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." || path.is_empty() {
                "plan_json".to_string()
            } else {
                format!("plan_json.{path}")
            };
            Error::invalid(field, format!("{}; fix the JSON plan document", e.inner()))
        })
    }

    /// Checks every rule a plan must follow. `field` prefixes error paths
    /// (e.g. `plan` or `inline_plan`); `min_heartbeat_timeout_ms` is the
    /// shortest heartbeat timeout this coordinator's heartbeats can keep alive.
    pub fn validate(&self, field: &str, min_heartbeat_timeout_ms: u32) -> Result<()> {
        let at = |rest: &str| {
            if field.is_empty() {
                rest.to_string()
            } else {
                format!("{field}.{rest}")
            }
        };
        validate_name(&at("name"), &self.name, "plan name")?;
        validate_text(&at("description"), &self.description)?;
        if self.stages.is_empty() {
            return Err(Error::invalid(
                at("stages"),
                "a plan needs at least one stage; add a stage with at least one task",
            ));
        }
        if self.stages.len() > MAX_STAGES {
            return Err(Error::invalid(
                at("stages"),
                format!(
                    "{} stages is more than the limit of {MAX_STAGES}",
                    self.stages.len()
                ),
            ));
        }
        let mut static_tasks = 0usize;
        for (i, stage) in self.stages.iter().enumerate() {
            let sf = at(&format!("stages[{i}]"));
            validate_name(&format!("{sf}.name"), &stage.name, "stage name")?;
            if let Some(j) = self.stages[..i].iter().position(|s| s.name == stage.name) {
                return Err(Error::invalid(
                    format!("{sf}.name"),
                    format!(
                        "stage name {:?} is already used by stages[{j}]; stage names must be unique within a plan",
                        stage.name
                    ),
                ));
            }
            if stage.tasks.is_empty() && !stage.dynamic {
                return Err(Error::invalid(
                    format!("{sf}.tasks"),
                    format!(
                        "stage {:?} has no tasks; add at least one task, or set \"dynamic\": true if earlier tasks add its tasks at run time",
                        stage.name
                    ),
                ));
            }
            let retry_field = format!("{sf}.retry");
            validate_retry(&retry_field, &stage.retry, min_heartbeat_timeout_ms)?;
            let resolved = stage.retry.resolved();
            if resolved.initial_backoff_ms > resolved.max_backoff_ms {
                return Err(Error::invalid(
                    format!("{retry_field}.initial_backoff_ms"),
                    format!(
                        "{} ms is more than max_backoff_ms ({} ms); lower it or raise max_backoff_ms",
                        resolved.initial_backoff_ms, resolved.max_backoff_ms
                    ),
                ));
            }
            for (j, task) in stage.tasks.iter().enumerate() {
                validate_task(&format!("{sf}.tasks[{j}]"), task, min_heartbeat_timeout_ms)?;
            }
            static_tasks += stage.tasks.len();
        }
        if static_tasks > MAX_STATIC_TASKS {
            return Err(Error::invalid(
                at("stages"),
                format!(
                    "{static_tasks} tasks is more than the limit of {MAX_STATIC_TASKS} declared tasks; add tasks at run time from an earlier stage instead"
                ),
            ));
        }
        Ok(())
    }

    /// Index of the stage with this name.
    pub fn stage_index(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }
}

/// Checks one task's fields (also used for tasks added at run time).
pub fn validate_task(field: &str, task: &TaskSpec, min_heartbeat_timeout_ms: u32) -> Result<()> {
    validate_name(&format!("{field}.kind"), &task.kind, "task kind")?;
    if !task.payload.is_object() {
        return Err(Error::invalid(
            format!("{field}.payload"),
            "the payload must be a JSON object, e.g. {\"table\": \"users\"}",
        ));
    }
    validate_json_depth(&format!("{field}.payload"), &task.payload)?;
    if task.max_attempts > MAX_ATTEMPTS {
        return Err(Error::invalid(
            format!("{field}.max_attempts"),
            format!(
                "{} is more than the limit of {MAX_ATTEMPTS}; use 1-{MAX_ATTEMPTS}, or 0 for the stage's policy",
                task.max_attempts
            ),
        ));
    }
    if task.max_attempts != 0
        && task.retry.max_attempts != 0
        && task.max_attempts != task.retry.max_attempts
    {
        return Err(Error::invalid(
            format!("{field}.retry.max_attempts"),
            format!(
                "{} contradicts the task's max_attempts ({}); set only one of them",
                task.retry.max_attempts, task.max_attempts
            ),
        ));
    }
    validate_retry(
        &format!("{field}.retry"),
        &task.retry,
        min_heartbeat_timeout_ms,
    )
}

/// Checks the fields of a stage's policy or a task's override; 0 always
/// means "inherit", so only the fields that are set are checked.
fn validate_retry(field: &str, r: &RetryPolicy, min_heartbeat_timeout_ms: u32) -> Result<()> {
    if r.max_attempts > MAX_ATTEMPTS {
        return Err(Error::invalid(
            format!("{field}.max_attempts"),
            format!(
                "{} is more than the limit of {MAX_ATTEMPTS}; use 1-{MAX_ATTEMPTS}, or 0 for the default",
                r.max_attempts
            ),
        ));
    }
    if r.initial_backoff_ms != 0 && r.max_backoff_ms != 0 && r.initial_backoff_ms > r.max_backoff_ms
    {
        return Err(Error::invalid(
            format!("{field}.initial_backoff_ms"),
            format!(
                "{} ms is more than max_backoff_ms ({} ms); lower it or raise max_backoff_ms",
                r.initial_backoff_ms, r.max_backoff_ms
            ),
        ));
    }
    if r.heartbeat_timeout_ms != 0 && r.heartbeat_timeout_ms < min_heartbeat_timeout_ms {
        return Err(Error::invalid(
            format!("{field}.heartbeat_timeout_ms"),
            format!(
                "{} ms is less than twice this coordinator's heartbeat interval, so one late heartbeat would lose the lease; use at least {min_heartbeat_timeout_ms}, or 0 for the coordinator's lease duration",
                r.heartbeat_timeout_ms
            ),
        ));
    }
    Ok(())
}

/// Names of plans, stages, task kinds and pools: 1-100 characters of
/// `[A-Za-z0-9._-]`, so they are safe in URLs, logs and metric labels.
pub fn validate_name(field: &str, value: &str, what: &str) -> Result<()> {
    validate_text(field, value)?;
    if value.is_empty() {
        return Err(Error::invalid(field, format!("the {what} is required")));
    }
    if value.len() > 100
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(Error::invalid(
            field,
            format!(
                "{what} {} must be 1-100 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
                shown(value)
            ),
        ));
    }
    Ok(())
}

/// How deeply a payload, the parameters or an output may nest (objects and
/// arrays, counted from the top object as 1). Not a flag: on the wire every
/// JSON level is three protobuf messages (`Struct`, map entry, `Value`), and
/// the decoders our workers and clients use (prost, Python's protobuf) stop
/// at 100 nested messages, about 32 levels once the messages around a
/// payload are counted. A value stored deeper could never be read back:
/// every assignment of its task would break the receiving worker's stream,
/// and `ListPlans` would fail for every client. 24 leaves room for the
/// envelopes.
pub const MAX_JSON_DEPTH: usize = 24;

/// Refuses JSON nested deeper than [`MAX_JSON_DEPTH`].
pub fn validate_json_depth(field: &str, value: &serde_json::Value) -> Result<()> {
    // Iterative: the value may be as deep as its decoder allowed.
    let mut deepest = 0;
    let mut stack = vec![(value, 1)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &serde_json::Value>> = match v {
            serde_json::Value::Object(m) => Box::new(m.values()),
            serde_json::Value::Array(a) => Box::new(a.iter()),
            _ => continue,
        };
        deepest = deepest.max(depth);
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    if deepest > MAX_JSON_DEPTH {
        return Err(Error::invalid(
            field,
            format!(
                "nests {deepest} levels of objects and arrays; at most {MAX_JSON_DEPTH} can be read \
                 back by protobuf decoders (each level is three nested messages on the wire): \
                 flatten it"
            ),
        ));
    }
    Ok(())
}

/// How much of a client's string an error message quotes.
const SHOWN_BYTES: usize = 64;

/// `value` quoted for an error message: whole when short, else its first
/// [`SHOWN_BYTES`] and its length. Messages travel in a response header,
/// which clients cap (16 KiB is common): echoing a 20 KB name turned a
/// NOT_FOUND into the client's RESOURCE_EXHAUSTED.
pub fn shown(value: &str) -> String {
    if value.len() <= SHOWN_BYTES {
        return format!("{value:?}");
    }
    let mut end = SHOWN_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &value[..end], value.len())
}

/// The rule for every string a client or worker sends: no NUL character.
/// PostgreSQL `text` cannot hold one and SQLite can, so refusing it wherever
/// it arrives makes both backends answer alike. (JSON payloads may hold NUL:
/// they are stored as JSON text, where it is the escape `\u0000`.)
pub fn validate_text(field: &str, value: &str) -> Result<()> {
    match value.find('\0') {
        None => Ok(()),
        Some(at) => Err(Error::invalid(
            field,
            format!(
                "contains a NUL character (\\0) at byte {at}; no text field may hold one, remove it"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_depth_counts_objects_and_arrays() {
        let nested = |depth: usize, wrap: fn(serde_json::Value) -> serde_json::Value| {
            (1..depth).fold(serde_json::json!({}), |v, _| wrap(v))
        };
        let object = |v| serde_json::json!({ "k": v });
        let array = |v| serde_json::json!([1, v]);
        assert!(validate_json_depth("p", &nested(MAX_JSON_DEPTH, object)).is_ok());
        assert!(validate_json_depth("p", &nested(MAX_JSON_DEPTH, array)).is_ok());
        for too_deep in [
            nested(MAX_JSON_DEPTH + 1, object),
            nested(MAX_JSON_DEPTH + 1, array),
        ] {
            let e = validate_json_depth("p", &too_deep).unwrap_err();
            assert!(e.to_string().starts_with("p: nests 25 levels"), "{e}");
        }
    }

    fn plan(json: &str) -> Result<PlanSpec> {
        let p = PlanSpec::from_json(json)?;
        p.validate("", 2_000)?;
        Ok(p)
    }

    fn field_of(r: Result<PlanSpec>) -> String {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_dynamic_stage_without_tasks() {
        let p = plan(r#"{"name":"p","stages":[{"name":"a","tasks":[{"kind":"noop"}]},{"name":"b","dynamic":true}]}"#).unwrap();
        assert_eq!(p.stages[0].tasks[0].payload, serde_json::json!({}));
        assert_eq!(p.stage_index("b"), Some(1));
    }

    #[test]
    fn names_the_bad_field() {
        assert_eq!(field_of(plan(r#"{"name":"p","stages":[]}"#)), "stages");
        assert_eq!(
            field_of(plan(r#"{"name":"p","stages":[{"name":"a"}]}"#)),
            "stages[0].tasks"
        );
        assert_eq!(
            field_of(plan(
                r#"{"name":"p","stages":[{"name":"a","tasks":[{"kind":"x"}]},{"name":"a","tasks":[{"kind":"x"}]}]}"#
            )),
            "stages[1].name"
        );
        assert_eq!(
            field_of(plan(
                r#"{"name":"","stages":[{"name":"a","tasks":[{"kind":"x"}]}]}"#
            )),
            "name"
        );
        assert_eq!(
            field_of(plan(
                r#"{"name":"p","stages":[{"name":"a","tasks":[{"kind":"x y"}]}]}"#
            )),
            "stages[0].tasks[0].kind"
        );
        assert_eq!(
            field_of(plan(
                r#"{"name":"p","stages":[{"name":"a","tasks":[{"kind":"x","payload":[1]}]}]}"#
            )),
            "stages[0].tasks[0].payload"
        );
        assert_eq!(
            field_of(plan(
                r#"{"name":"p","description":"a\u0000","stages":[{"name":"a","tasks":[{"kind":"x"}]}]}"#
            )),
            "description"
        );
    }

    #[test]
    fn checks_task_settings_and_heartbeat_timeouts() {
        let one = |stage_retry: &str, task: &str| {
            plan(&format!(
                r#"{{"name":"p","stages":[{{"name":"a","retry":{stage_retry},"tasks":[{task}]}}]}}"#
            ))
        };
        assert!(
            one(
                "{}",
                r#"{"kind":"x","retry":{"heartbeat_timeout_ms":2000}}"#
            )
            .is_ok()
        );
        assert_eq!(
            field_of(one(
                "{}",
                r#"{"kind":"x","retry":{"heartbeat_timeout_ms":1999}}"#
            )),
            "stages[0].tasks[0].retry.heartbeat_timeout_ms"
        );
        assert_eq!(
            field_of(one(r#"{"heartbeat_timeout_ms":500}"#, r#"{"kind":"x"}"#)),
            "stages[0].retry.heartbeat_timeout_ms"
        );
        assert_eq!(
            field_of(one(
                "{}",
                r#"{"kind":"x","max_attempts":2,"retry":{"max_attempts":3}}"#
            )),
            "stages[0].tasks[0].retry.max_attempts"
        );
        assert_eq!(
            field_of(one(
                "{}",
                r#"{"kind":"x","retry":{"initial_backoff_ms":20,"max_backoff_ms":10}}"#
            )),
            "stages[0].tasks[0].retry.initial_backoff_ms"
        );
        // A task's backoff above the stage's cap is only capped by it.
        assert!(
            one(
                "{}",
                r#"{"kind":"x","retry":{"initial_backoff_ms":120000}}"#
            )
            .is_ok()
        );
        assert_eq!(
            field_of(one(r#"{"initial_backoff_ms":120000}"#, r#"{"kind":"x"}"#)),
            "stages[0].retry.initial_backoff_ms"
        );
    }

    #[test]
    fn rejects_unknown_fields_with_their_path() {
        let err =
            plan(r#"{"name":"p","stages":[{"name":"a","tasks":[{"knd":"noop"}]}]}"#).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("plan_json.stages[0].tasks[0]"), "{msg}");
        assert!(msg.contains("unknown field `knd`"), "{msg}");
    }
}
