//! Reporting an attempt's outcome with `Complete` or `Fail`.
//!
//! Reports are idempotent on the coordinator, so a report whose answer was
//! lost is simply sent again. A transport error is retried with backoff for
//! as long as the coordinator may still hold the lease (heartbeats keep
//! renewing it meanwhile); a rejection saying the lease is gone ends the
//! attempt's story on this worker, because the coordinator has already
//! given the task to someone else or ended it.

use stagecoach_proto::json::json_to_struct;
use stagecoach_proto::v1::{Completion, Failure, LeaseToken, NewTask, ReportResponse};
use tokio::time::Instant;
use tonic::{Code, Status};
use tracing::{debug, error, warn};

use crate::backoff::Backoff;
use crate::handler::{TaskError, TaskOutput};
use crate::leases::ReportState;
use crate::run::Runtime;

/// What the coordinator made of one report.
#[derive(Debug)]
enum Verdict {
    Accepted { duplicate: bool },
    Rejected { code: Code, message: String },
    Transient(Status),
}

fn verdict(result: Result<ReportResponse, Status>) -> Verdict {
    match result {
        Ok(response) => match response.results.first() {
            // A lone report that was rejected fails the call instead, so an
            // OK call without results accepted it.
            None => Verdict::Accepted { duplicate: false },
            Some(r) if r.accepted => Verdict::Accepted {
                duplicate: r.duplicate,
            },
            Some(r) => Verdict::Rejected {
                code: Code::from_i32(r.code),
                message: r.message.clone(),
            },
        },
        Err(status) => match status.code() {
            Code::FailedPrecondition | Code::Aborted | Code::NotFound | Code::InvalidArgument => {
                Verdict::Rejected {
                    code: status.code(),
                    message: status.message().to_string(),
                }
            }
            _ => Verdict::Transient(status),
        },
    }
}

/// Sends the outcome of the attempt holding `token` until it is accepted,
/// rejected, or can no longer be accepted.
pub(crate) async fn report(
    rt: &Runtime,
    token: LeaseToken,
    outcome: Result<TaskOutput, TaskError>,
) {
    let mut outcome = outcome;
    let mut backoff = Backoff::default();
    let secret = rt.leases.secret(token);
    loop {
        if let ReportState::Gone(why) = rt.leases.report_state(token, Instant::now(), rt.timing()) {
            warn!(%why, "lease no longer held; dropping the report");
            return;
        }
        let result = match &outcome {
            Ok(output) => {
                let c = completion(token, secret, output);
                rt.completions
                    .send(c, |batch| rt.coordinator.complete(batch))
                    .await
            }
            Err(error) => {
                let f = failure(token, secret, error);
                rt.failures
                    .send(f, |batch| rt.coordinator.fail(batch))
                    .await
            }
        };
        match verdict(result) {
            Verdict::Accepted { duplicate } => {
                debug!(duplicate, "report accepted");
                return;
            }
            // The output itself is unacceptable (e.g. a task added to an
            // unknown stage): no retry can fix it, so fail the task with the
            // coordinator's explanation instead of letting its lease expire.
            Verdict::Rejected {
                code: Code::InvalidArgument,
                message,
            } if outcome.is_ok() => {
                error!(%message, "the coordinator rejected the task's output; reporting a fatal failure");
                outcome = Err(TaskError::fatal(format!(
                    "the coordinator rejected the task's output: {message}"
                )));
                backoff.reset();
                continue;
            }
            Verdict::Rejected { code, message } => {
                warn!(?code, %message, "report rejected; the lease was lost");
                return;
            }
            Verdict::Transient(status) => {
                let delay = backoff.next_delay();
                warn!(
                    code = ?status.code(),
                    error = %status.message(),
                    attempt = backoff.attempt(),
                    retry_in_ms = delay.as_millis() as u64,
                    "could not report the outcome; retrying"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn completion(token: LeaseToken, secret: u64, output: &TaskOutput) -> Completion {
    Completion {
        lease: Some(token),
        lease_secret: secret,
        output: Some(json_to_struct(&output.output)),
        add_tasks: output
            .add_tasks
            .iter()
            .map(|t| NewTask {
                stage: t.stage.clone(),
                kind: t.kind.clone(),
                payload: Some(json_to_struct(&t.payload)),
                max_attempts: t.max_attempts,
                retry: t.retry,
            })
            .collect(),
    }
}

fn failure(token: LeaseToken, secret: u64, error: &TaskError) -> Failure {
    // The coordinator refuses an empty error, and a NUL character in any
    // string, and with it the whole batch: a handler's text (a driver's
    // message, bytes read as text) should not lose the report.
    let message = if error.message.trim().is_empty() {
        "the handler failed without a message".to_string()
    } else {
        error.message.replace('\0', "\u{FFFD}")
    };
    Failure {
        lease: Some(token),
        lease_secret: secret,
        error: message,
        retryable: error.retryable,
    }
}

#[cfg(test)]
mod tests {
    use stagecoach_proto::v1::ReportResult;

    use super::*;

    #[test]
    fn verdicts_follow_the_status_codes() {
        assert!(matches!(
            verdict(Ok(ReportResponse::default())),
            Verdict::Accepted { duplicate: false }
        ));
        let dup = ReportResponse {
            results: vec![ReportResult {
                accepted: true,
                duplicate: true,
                ..Default::default()
            }],
        };
        assert!(matches!(
            verdict(Ok(dup)),
            Verdict::Accepted { duplicate: true }
        ));
        let rejected = ReportResponse {
            results: vec![ReportResult {
                code: Code::FailedPrecondition as i32,
                message: "stale".into(),
                ..Default::default()
            }],
        };
        assert!(matches!(
            verdict(Ok(rejected)),
            Verdict::Rejected {
                code: Code::FailedPrecondition,
                ..
            }
        ));
        for code in [Code::FailedPrecondition, Code::Aborted, Code::NotFound] {
            assert!(matches!(
                verdict(Err(Status::new(code, "x"))),
                Verdict::Rejected { .. }
            ));
        }
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Internal] {
            assert!(matches!(
                verdict(Err(Status::new(code, "x"))),
                Verdict::Transient(_)
            ));
        }
    }

    #[test]
    fn an_error_with_nul_is_still_reported() {
        let token = LeaseToken {
            task_id: 7,
            attempt: 2,
        };
        let f = failure(token, 1, &TaskError::fatal("bad\0byte"));
        assert_eq!(f.error, "bad\u{FFFD}byte");
    }

    #[test]
    fn outputs_and_added_tasks_go_on_the_wire() {
        let out = TaskOutput::new(serde_json::json!({"rows": 3})).add_task(
            "export",
            "export.table",
            serde_json::json!({"table": "users"}),
        );
        let token = LeaseToken {
            task_id: 7,
            attempt: 2,
        };
        let c = completion(token, 1, &out);
        assert_eq!(c.lease, Some(token));
        assert_eq!(
            stagecoach_proto::json::struct_to_json(c.output.as_ref()),
            serde_json::json!({"rows": 3})
        );
        assert_eq!(c.add_tasks[0].stage, "export");
        assert_eq!(c.add_tasks[0].kind, "export.table");
    }
}
