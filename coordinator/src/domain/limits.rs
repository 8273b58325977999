//! Request limits: how large the things a client or worker sends may be.
//! Each is a coordinator flag, and each refusal names the field (with its
//! path) and the flag that raises the limit, so whoever reads the error
//! knows both what to shrink and what an operator could change.
//!
//! A request over one of these is `INVALID_ARGUMENT`: it is what the request
//! says that is too large, and sending it again will not help. (A message
//! over `--max-request-bytes` is `RESOURCE_EXHAUSTED` as gRPC itself
//! answers it, and so is a stream over `--max-watch-streams` /
//! `--max-worker-streams`: the server's capacity, which frees up.)
//! Every check runs before any store call: a refused request stores nothing.

use std::io::Write;

use serde_json::Value;

use super::{Completion, LeaseStatus, PlanSpec, TaskSpec};
use crate::error::{Error, Result};

/// The limits of [`crate::config::Config`], as the core checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// A task's payload, a migration's parameters or a completion's output,
    /// each as JSON text (`--max-payload-bytes`).
    pub max_payload_bytes: usize,
    /// A heartbeat's checkpoint of one lease (`--max-checkpoint-bytes`).
    pub max_checkpoint_bytes: usize,
    /// Tasks a plan declares up front (`--max-tasks-per-plan`); tasks added
    /// at run time are bounded per completion instead.
    pub max_tasks_per_plan: usize,
    /// Stages of a plan (`--max-stages-per-plan`).
    pub max_stages_per_plan: usize,
    /// Tasks one completion adds (`--max-tasks-per-completion`).
    pub max_tasks_per_completion: usize,
    /// WatchMigration streams open at once (`--max-watch-streams`).
    pub max_watch_streams: usize,
    /// Worker Subscribe streams open at once (`--max-worker-streams`).
    pub max_worker_streams: usize,
}

impl RequestLimits {
    pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 << 10;
    pub const DEFAULT_MAX_CHECKPOINT_BYTES: usize = 1 << 20;
    /// The benchmark's throughput plan declares 100,000 tasks.
    pub const DEFAULT_MAX_TASKS_PER_PLAN: usize = 100_000;
    /// The benchmark's deepest plan has 1,000 stages.
    pub const DEFAULT_MAX_STAGES_PER_PLAN: usize = 1_000;
    /// The benchmark's fan-out adds 10,000 tasks per completion.
    pub const DEFAULT_MAX_TASKS_PER_COMPLETION: usize = 10_000;
    pub const DEFAULT_MAX_WATCH_STREAMS: usize = 10_000;
    /// The benchmark holds 10,000 idle worker streams on one coordinator.
    pub const DEFAULT_MAX_WORKER_STREAMS: usize = 20_000;
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_payload_bytes: Self::DEFAULT_MAX_PAYLOAD_BYTES,
            max_checkpoint_bytes: Self::DEFAULT_MAX_CHECKPOINT_BYTES,
            max_tasks_per_plan: Self::DEFAULT_MAX_TASKS_PER_PLAN,
            max_stages_per_plan: Self::DEFAULT_MAX_STAGES_PER_PLAN,
            max_tasks_per_completion: Self::DEFAULT_MAX_TASKS_PER_COMPLETION,
            max_watch_streams: Self::DEFAULT_MAX_WATCH_STREAMS,
            max_worker_streams: Self::DEFAULT_MAX_WORKER_STREAMS,
        }
    }
}

fn over(field: impl Into<String>, what: String, flag: &str) -> Error {
    Error::invalid(
        field,
        format!("{what}; make it smaller, or start the coordinator with a higher --{flag}"),
    )
}

impl RequestLimits {
    /// A payload, the parameters or an output: its JSON text at most
    /// `max_payload_bytes`.
    pub fn check_json(&self, field: &str, value: &Value) -> Result<()> {
        let bytes = json_len(value, self.max_payload_bytes + 1);
        if bytes > self.max_payload_bytes {
            return Err(over(
                field,
                format!(
                    "more than {} bytes as JSON text (the limit)",
                    self.max_payload_bytes
                ),
                "max-payload-bytes",
            ));
        }
        Ok(())
    }

    /// Stages, declared tasks and every payload of a plan; `field` prefixes
    /// the paths as in [`PlanSpec::validate`].
    pub fn check_plan(&self, field: &str, plan: &PlanSpec) -> Result<()> {
        let at = |rest: &str| {
            if field.is_empty() {
                rest.to_string()
            } else {
                format!("{field}.{rest}")
            }
        };
        if plan.stages.len() > self.max_stages_per_plan {
            return Err(over(
                at("stages"),
                format!(
                    "{} stages is more than the limit of {}",
                    plan.stages.len(),
                    self.max_stages_per_plan
                ),
                "max-stages-per-plan",
            ));
        }
        let tasks: usize = plan.stages.iter().map(|s| s.tasks.len()).sum();
        if tasks > self.max_tasks_per_plan {
            return Err(over(
                at("stages"),
                format!(
                    "{tasks} declared tasks is more than the limit of {}; tasks added at run time by completions do not count",
                    self.max_tasks_per_plan
                ),
                "max-tasks-per-plan",
            ));
        }
        for (i, stage) in plan.stages.iter().enumerate() {
            for (j, task) in stage.tasks.iter().enumerate() {
                self.check_task(&at(&format!("stages[{i}].tasks[{j}]")), task)?;
            }
        }
        Ok(())
    }

    fn check_task(&self, field: &str, task: &TaskSpec) -> Result<()> {
        self.check_json(&format!("{field}.payload"), &task.payload)
    }

    /// The output and added tasks of completion `i` of a Complete call.
    pub fn check_completion(&self, i: usize, c: &Completion) -> Result<()> {
        self.check_json(&format!("completions[{i}].output"), &c.output)?;
        if c.add_tasks.len() > self.max_tasks_per_completion {
            return Err(over(
                format!("completions[{i}].add_tasks"),
                format!(
                    "{} tasks is more than the limit of {} added by one completion",
                    c.add_tasks.len(),
                    self.max_tasks_per_completion
                ),
                "max-tasks-per-completion",
            ));
        }
        for (j, t) in c.add_tasks.iter().enumerate() {
            self.check_task(&format!("completions[{i}].add_tasks[{j}]"), &t.task)?;
        }
        Ok(())
    }

    /// The checkpoints of a heartbeat.
    pub fn check_heartbeat(&self, leases: &[LeaseStatus]) -> Result<()> {
        for (i, s) in leases.iter().enumerate() {
            if let Some(c) = &s.checkpoint
                && c.len() > self.max_checkpoint_bytes
            {
                return Err(over(
                    format!("leases[{i}].checkpoint"),
                    format!(
                        "{} bytes is more than the limit of {} bytes",
                        c.len(),
                        self.max_checkpoint_bytes
                    ),
                    "max-checkpoint-bytes",
                ));
            }
        }
        Ok(())
    }
}

/// Length of `value` as compact JSON text, counting no further than `stop`
/// (so a huge value costs no more than the limit to measure).
fn json_len(value: &Value, stop: usize) -> usize {
    struct Count {
        n: usize,
        stop: usize,
    }
    impl Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.n += buf.len();
            if self.n > self.stop {
                // Stops the serializer: the answer is known.
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count { n: 0, stop };
    let _ = serde_json::to_writer(&mut count, value);
    count.n
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_is_measured_as_compact_text_and_stops_at_the_limit() {
        assert_eq!(json_len(&json!({"a": [1, 2]}), 100), 11);
        assert!(json_len(&json!({"a": "x".repeat(10_000)}), 100) <= 10_100);
        let limits = RequestLimits {
            max_payload_bytes: 10,
            ..RequestLimits::default()
        };
        assert!(limits.check_json("p", &json!({"a": [1]})).is_ok());
        let e = limits.check_json("p", &json!({"a": [1, 2]})).unwrap_err();
        assert!(e.to_string().contains("--max-payload-bytes"), "{e}");
        assert!(e.to_string().starts_with("p: "), "{e}");
    }
}
