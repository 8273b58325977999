//! One assignment from start to finish: wait for a free slot, run the
//! handler (catching panics, bounding how long it may ignore a
//! cancellation), report the outcome, forget the lease.
//!
//! The slot is held until the report is done, not just until the handler
//! returns: the coordinator counts the lease as live until it records the
//! report, so the worker's count and the coordinator's agree (I12).

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tracing::{info, warn};

use crate::handler::{Handler, TaskContext, TaskError, TaskOutput};
use crate::report::report;
use crate::run::Runtime;

/// How long a canceled handler may keep running before its future is
/// dropped. Cancellation is cooperative, but a handler that ignores it must
/// not hold a slot the coordinator already considers free.
pub(crate) const CANCEL_GRACE: Duration = Duration::from_secs(5);

pub(crate) async fn execute(rt: Arc<Runtime>, handler: Option<Arc<dyn Handler>>, ctx: TaskContext) {
    let token = ctx.lease();
    // The coordinator never sends more assignments than slots, but a new one
    // can overtake the release of the slot whose report it answers.
    let permit = tokio::select! {
        permit = rt.slots.clone().acquire_owned() => permit.ok(),
        () = ctx.cancelled() => None,
    };
    let outcome = match (&handler, &permit) {
        (None, _) => Err(TaskError::retryable(format!(
            "worker {} has no handler for kind {:?}",
            rt.coordinator.worker_id(),
            ctx.kind()
        ))),
        (Some(_), None) => Err(TaskError::retryable("canceled before it started")),
        (Some(handler), Some(_)) => run_guarded(handler.as_ref(), ctx).await,
    };
    match &outcome {
        Ok(out) => info!(added_tasks = out.add_tasks.len(), "task succeeded"),
        Err(e) => warn!(error = %e.message, retryable = e.retryable, "task failed"),
    }
    report(&rt, token, outcome).await;
    rt.leases.remove(token);
    drop(permit);
}

/// Runs the handler; a panic becomes a retryable failure, and a handler
/// still running `CANCEL_GRACE` after its cancellation is dropped.
pub(crate) async fn run_guarded(
    handler: &dyn Handler,
    ctx: TaskContext,
) -> Result<TaskOutput, TaskError> {
    let cancel = ctx.cancel_token().clone();
    let run = AssertUnwindSafe(handler.run(ctx)).catch_unwind();
    let overdue = async {
        cancel.cancelled().await;
        tokio::time::sleep(CANCEL_GRACE).await;
    };
    tokio::select! {
        result = run => result.unwrap_or_else(|panic| {
            Err(TaskError::retryable(format!("handler panicked: {}", panic_message(&*panic))))
        }),
        () = overdue => Err(TaskError::retryable(format!(
            "handler did not stop within {}s of being canceled",
            CANCEL_GRACE.as_secs()
        ))),
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ctx() -> TaskContext {
        TaskContext::for_test("t", 1, json!({}), json!({}))
    }

    #[tokio::test]
    async fn a_panic_is_a_retryable_failure() {
        let handler = |_ctx: TaskContext| async move {
            if true {
                panic!("boom {}", 42);
            }
            Ok(TaskOutput::empty())
        };
        let err = run_guarded(&handler, ctx()).await.unwrap_err();
        assert_eq!(err, TaskError::retryable("handler panicked: boom 42"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_ignoring_cancellation_is_dropped_after_the_grace() {
        let handler = |_ctx: TaskContext| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(TaskOutput::empty())
        };
        let ctx = ctx();
        ctx.cancel_for_test();
        let started = tokio::time::Instant::now();
        let err = run_guarded(&handler, ctx).await.unwrap_err();
        assert!(
            err.retryable && err.message.contains("did not stop"),
            "{err}"
        );
        assert_eq!(started.elapsed(), CANCEL_GRACE);
    }
}
