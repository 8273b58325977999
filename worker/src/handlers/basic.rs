//! `noop`, `sleep` and `fail`: handlers whose behaviour the payload dictates,
//! for demos and for tests of the scheduling machinery itself.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{TaskContext, TaskError, TaskOutput};

/// How often `sleep` records progress and checks for cancellation.
const SLEEP_STEP: Duration = Duration::from_millis(50);

/// `noop`: succeeds at once with `{}`.
pub async fn noop(_ctx: TaskContext) -> Result<TaskOutput, TaskError> {
    Ok(TaskOutput::empty())
}

/// `sleep`, payload `{"ms": N}` (default 100): sleeps N milliseconds,
/// recording progress in milliseconds; a cancellation ends it early with the
/// retryable error `canceled`. Output `{"slept_ms": N}`.
pub async fn sleep(ctx: TaskContext) -> Result<TaskOutput, TaskError> {
    let ms = match ctx.payload().get("ms") {
        None | Some(Value::Null) => 100,
        Some(v) => v.as_u64().ok_or_else(|| {
            TaskError::fatal(format!(
                "payload \"ms\" must be a non-negative integer, got {v}"
            ))
        })?,
    };
    let total = Duration::from_millis(ms);
    let start = Instant::now();
    loop {
        let elapsed = start.elapsed();
        if elapsed >= total {
            break;
        }
        ctx.progress(elapsed.as_millis() as u64, ms);
        tokio::select! {
            () = tokio::time::sleep(SLEEP_STEP.min(total - elapsed)) => {}
            () = ctx.cancelled() => return Err(TaskError::retryable("canceled")),
        }
    }
    ctx.progress(ms, ms);
    Ok(TaskOutput::new(json!({ "slept_ms": ms })))
}

/// `fail`, payload `{"message": "...", "retryable": bool}` (defaults
/// `"failed on purpose"`, `false`): always fails that way.
pub async fn fail(ctx: TaskContext) -> Result<TaskOutput, TaskError> {
    let payload = ctx.payload();
    let message = payload
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("failed on purpose");
    let retryable = payload
        .get("retryable")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Err(TaskError {
        message: message.to_string(),
        retryable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(kind: &str, payload: Value) -> TaskContext {
        TaskContext::for_test(kind, 1, payload, json!({}))
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_sleeps_and_reports_progress() {
        let c = ctx("sleep", json!({"ms": 120}));
        let started = Instant::now();
        let out = sleep(c.clone()).await.unwrap();
        assert_eq!(out.output, json!({"slept_ms": 120}));
        assert_eq!(started.elapsed(), Duration::from_millis(120));
        assert_eq!(c.progress_for_test(), (120, 120));
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_stops_when_canceled() {
        let c = ctx("sleep", json!({"ms": 60_000}));
        let canceler = c.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(75)).await;
            canceler.cancel_for_test();
        });
        assert_eq!(
            sleep(c).await.unwrap_err(),
            TaskError::retryable("canceled")
        );
    }

    #[tokio::test]
    async fn sleep_rejects_a_bad_duration() {
        let err = sleep(ctx("sleep", json!({"ms": "soon"})))
            .await
            .unwrap_err();
        assert!(!err.retryable && err.message.contains("\"ms\""), "{err}");
    }

    #[tokio::test]
    async fn fail_fails_as_told() {
        assert_eq!(
            fail(ctx("fail", json!({}))).await.unwrap_err(),
            TaskError::fatal("failed on purpose")
        );
        assert_eq!(
            fail(ctx(
                "fail",
                json!({"message": "disk full", "retryable": true})
            ))
            .await
            .unwrap_err(),
            TaskError::retryable("disk full")
        );
        assert_eq!(
            noop(ctx("noop", json!({}))).await.unwrap(),
            TaskOutput::empty()
        );
    }
}
