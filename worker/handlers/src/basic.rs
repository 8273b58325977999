//! `noop`, `sleep`, `fail`, `panic` and `hang`: handlers whose behaviour the
//! payload dictates, for demos and for tests of the scheduling machinery
//! itself (slow tasks, cancellation, failures, crashing and stuck handlers).

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use stagecoach_worker::{TaskContext, TaskError, TaskOutput};

/// How often `sleep` records progress and checks for cancellation.
const SLEEP_STEP: Duration = Duration::from_millis(50);

/// `noop`: succeeds at once with `{}`.
pub async fn noop(_ctx: TaskContext) -> Result<TaskOutput, TaskError> {
    Ok(TaskOutput::empty())
}

/// `sleep`, payload `{"ms": N, "cancel_marker": PATH}` (`ms` default 100,
/// `cancel_marker` optional): sleeps N milliseconds, recording progress in
/// milliseconds; a cancellation ends it early with the retryable error
/// `canceled`, after writing `canceled after M ms` to `cancel_marker` if
/// given (so a test can see that the cancellation reached the handler).
/// Output `{"slept_ms": N}`.
pub async fn sleep(ctx: TaskContext) -> Result<TaskOutput, TaskError> {
    let ms = match ctx.payload().get("ms") {
        None | Some(Value::Null) => 100,
        Some(v) => v.as_u64().ok_or_else(|| {
            TaskError::fatal(format!(
                "payload \"ms\" must be a non-negative integer, got {v}"
            ))
        })?,
    };
    let marker = optional_path(ctx.payload(), "cancel_marker")?;
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
            () = ctx.cancelled() => {
                if let Some(marker) = marker {
                    let note = format!("canceled after {} ms", start.elapsed().as_millis());
                    tokio::fs::write(marker, note).await.map_err(|e| {
                        TaskError::retryable(format!("canceled; writing {}: {e}", marker.display()))
                    })?;
                }
                return Err(TaskError::retryable("canceled"));
            }
        }
    }
    ctx.progress(ms, ms);
    Ok(TaskOutput::new(json!({ "slept_ms": ms })))
}

/// `fail`, payload `{"message": "...", "retryable": bool, "unless_file":
/// PATH}` (defaults `"failed on purpose"`, `false`, none): fails that way,
/// unless `unless_file` names a file that exists, in which case it succeeds
/// with `{"found": PATH}` (so a test can fix the cause and retry).
pub async fn fail(ctx: TaskContext) -> Result<TaskOutput, TaskError> {
    let payload = ctx.payload();
    if let Some(path) = optional_path(payload, "unless_file")?
        && tokio::fs::try_exists(path).await.unwrap_or(false)
    {
        return Ok(TaskOutput::new(json!({ "found": path })));
    }
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

/// `panic`, payload `{"message": "..."}` (default `"panicked on purpose"`):
/// panics with that message, as a buggy handler would. The runtime turns the
/// panic into a retryable failure `handler panicked: MESSAGE`.
pub async fn panic(ctx: TaskContext) -> Result<TaskOutput, TaskError> {
    let message = ctx
        .payload()
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("panicked on purpose");
    panic!("{message}")
}

/// `hang`: never finishes and ignores cancellation, as a handler stuck in a
/// blocking call would. Only an attempt timeout (or the lease running out)
/// ends its attempt; the runtime drops the future a grace period after it
/// was told to stop.
pub async fn hang(_ctx: TaskContext) -> Result<TaskOutput, TaskError> {
    std::future::pending().await
}

/// Reads an optional string payload field naming a file.
fn optional_path<'a>(payload: &'a Value, field: &str) -> Result<Option<&'a Path>, TaskError> {
    match payload.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(Path::new(s))),
        Some(v) => Err(TaskError::fatal(format!(
            "payload {field:?} must be a file path, got {v}"
        ))),
    }
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

    #[tokio::test(start_paused = true)]
    async fn sleep_writes_its_cancel_marker() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("canceled");
        let c = ctx(
            "sleep",
            json!({"ms": 60_000, "cancel_marker": marker.to_str().unwrap()}),
        );
        c.cancel_for_test();
        assert_eq!(
            sleep(c).await.unwrap_err(),
            TaskError::retryable("canceled")
        );
        let note = std::fs::read_to_string(&marker).unwrap();
        assert!(note.starts_with("canceled after"), "{note}");
        let bad = sleep(ctx("sleep", json!({"cancel_marker": 3})))
            .await
            .unwrap_err();
        assert!(
            !bad.retryable && bad.message.contains("cancel_marker"),
            "{bad}"
        );
    }

    #[tokio::test]
    async fn fail_succeeds_once_its_file_exists() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fixed");
        let payload = json!({"message": "no input", "unless_file": file.to_str().unwrap()});
        assert_eq!(
            fail(ctx("fail", payload.clone())).await.unwrap_err(),
            TaskError::fatal("no input")
        );
        std::fs::write(&file, "").unwrap();
        let out = fail(ctx("fail", payload)).await.unwrap();
        assert_eq!(out.output, json!({"found": file.to_str().unwrap()}));
    }

    #[tokio::test]
    async fn panic_panics_with_its_message() {
        use futures::FutureExt;
        let run = std::panic::AssertUnwindSafe(panic(ctx("panic", json!({"message": "kaboom"}))));
        let payload = run.catch_unwind().await.unwrap_err();
        assert_eq!(
            payload.downcast_ref::<String>().map(String::as_str),
            Some("kaboom")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hang_ignores_cancellation() {
        let c = ctx("hang", json!({}));
        c.cancel_for_test();
        let waited = tokio::time::timeout(Duration::from_secs(3600), hang(c)).await;
        assert!(waited.is_err(), "hang finished: {waited:?}");
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
