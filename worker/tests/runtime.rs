//! The SDK's runtime against a scripted coordinator on a real socket:
//! reports, heartbeats, cancellation, reconnects, shutdown.

mod fake;

use std::time::Duration;

use fake::{Fake, secret, token};
use serde_json::json;
use stagecoach_proto::json::struct_to_json;
use stagecoach_proto::v1::CancelNotice;
use stagecoach_proto::v1::worker_message::Message;
use stagecoach_worker::{TaskContext, TaskError, TaskOutput, Worker, WorkerBuilder, WorkerError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::Code;

fn builder(url: &str) -> WorkerBuilder {
    Worker::builder()
        .coordinator(url)
        .worker_id("w-test")
        .name("test host")
        .slots(2)
        .drain_timeout(Duration::from_secs(5))
        .handler("echo", |ctx: TaskContext| async move {
            Ok(TaskOutput::new(json!({
                "payload": ctx.payload(),
                "region": ctx.parameters()["region"],
                "subject": ctx.subject(),
                "attempt": ctx.attempt(),
                "checkpoint": String::from_utf8_lossy(ctx.checkpoint().unwrap_or_default()),
            }))
            .add_task("later", "echo", json!({"n": 2})))
        })
        .handler("fail", |_ctx| async { Err(TaskError::fatal("bad input")) })
        .handler("panic", |_ctx| async {
            if true {
                panic!("kaboom");
            }
            Ok(TaskOutput::empty())
        })
        .handler("sleep", stagecoach_handlers::basic::sleep)
}

struct Running {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<Result<(), WorkerError>>,
}

impl Running {
    async fn shutdown(self) -> Result<(), WorkerError> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(15), self.handle)
            .await
            .expect("the worker stops")
            .expect("run does not panic")
    }
}

fn start(builder: WorkerBuilder) -> Running {
    let worker = builder.build().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    Running { stop, handle }
}

#[tokio::test]
async fn subscribes_runs_tasks_and_reports_outcomes() {
    let fake = Fake::default();
    // A handler's panic prints its backtrace on the test's only runtime
    // thread; with `RUST_BACKTRACE` set and the freshly built binary's debug
    // info not yet cached, that took over 2 s in CI, no heartbeat went out,
    // the 2 s lease ended locally and the failure report was dropped. This
    // test is about outcomes, not expiry: give it leases that outlast that.
    fake.state().lease_duration_ms = 60_000;
    let (url, _server) = fake.start().await;
    let worker = start(builder(&url));

    fake.wait_for("a subscription", |s| !s.subscribes.is_empty())
        .await;
    {
        let s = fake.state();
        let sub = &s.subscribes[0];
        assert_eq!(sub.worker_id, "w-test");
        assert_eq!(sub.kinds, ["echo", "fail", "panic", "sleep"]);
        assert_eq!((sub.slots, sub.name.as_str()), (2, "test host"));
    }
    fake.wait_for("heartbeats without leases", |s| s.heartbeats.len() >= 2)
        .await;

    fake.assign(1, "echo", json!({"n": 1})).await;
    fake.assign(2, "fail", json!({})).await;
    fake.assign(3, "panic", json!({})).await;
    fake.wait_for("one completion and two failures", |s| {
        s.completions.len() == 1 && s.failures.len() == 2
    })
    .await;

    let (completions, failures) = {
        let s = fake.state();
        (s.completions.clone(), s.failures.clone())
    };
    let c = &completions[0];
    assert_eq!(c.lease, Some(token(1)));
    // Every report echoes its assignment's lease secret.
    assert_eq!(c.lease_secret, secret(1));
    assert!(
        failures
            .iter()
            .all(|f| f.lease_secret == secret(f.lease.unwrap().task_id)),
        "{failures:?}"
    );
    assert_eq!(
        struct_to_json(c.output.as_ref()),
        json!({"payload": {"n": 1}, "region": "eu", "subject": "project/1", "attempt": 1, "checkpoint": "earlier"})
    );
    assert_eq!(
        (c.add_tasks[0].stage.as_str(), c.add_tasks[0].kind.as_str()),
        ("later", "echo")
    );
    let fail = failures.iter().find(|f| f.lease == Some(token(2))).unwrap();
    assert_eq!((fail.error.as_str(), fail.retryable), ("bad input", false));
    let panic = failures.iter().find(|f| f.lease == Some(token(3))).unwrap();
    assert_eq!(
        (panic.error.as_str(), panic.retryable),
        ("handler panicked: kaboom", true)
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn heartbeats_carry_progress_and_checkpoints() {
    let fake = Fake::default();
    let (url, _server) = fake.start().await;
    let (go, go_rx) = tokio::sync::watch::channel(false);
    let worker = start(builder(&url).handler("steps", move |ctx: TaskContext| {
        let mut go = go_rx.clone();
        async move {
            ctx.progress(3, 10);
            ctx.save_checkpoint(b"row 3".to_vec());
            let _ = go.wait_for(|g| *g).await;
            Ok(TaskOutput::empty())
        }
    }));

    fake.assign(5, "steps", json!({})).await;
    fake.wait_for("a heartbeat with progress", |s| {
        s.heartbeats.iter().flat_map(|h| &h.leases).any(|l| {
            l.lease == Some(token(5))
                && l.lease_secret == secret(5)
                && (l.done, l.total) == (3, 10)
                && l.checkpoint.as_deref() == Some(b"row 3")
        })
    })
    .await;
    // Once acknowledged, the checkpoint is not sent again.
    let seen = fake.state().heartbeats.len();
    fake.wait_for("two more heartbeats", |s| s.heartbeats.len() >= seen + 2)
        .await;
    let last = fake.state().heartbeats.last().unwrap().clone();
    assert_eq!(last.leases.len(), 1);
    assert_eq!(last.leases[0].checkpoint, None);
    assert_eq!((last.leases[0].done, last.leases[0].total), (3, 10));

    go.send(true).unwrap();
    fake.wait_for("the completion", |s| s.completions.len() == 1)
        .await;
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn cancel_notices_stop_handlers_on_the_stream_and_in_heartbeats() {
    let fake = Fake::default();
    let (url, _server) = fake.start().await;
    let (cancelled, mut cancels) = mpsc::unbounded_channel::<i64>();
    let (started, mut starts) = mpsc::unbounded_channel::<i64>();
    let worker = start(builder(&url).handler("wait", move |ctx: TaskContext| {
        let (cancelled, started) = (cancelled.clone(), started.clone());
        async move {
            started.send(ctx.task_id()).unwrap();
            ctx.cancelled().await;
            cancelled.send(ctx.task_id()).unwrap();
            Err(TaskError::retryable("canceled"))
        }
    }));

    fake.assign(10, "wait", json!({})).await;
    fake.assign(11, "wait", json!({})).await;
    // (A cancel that overtakes the start means the handler never runs.)
    let mut ids = [recv(&mut starts).await, recv(&mut starts).await];
    ids.sort();
    assert_eq!(ids, [10, 11]);
    fake.send(Message::Cancel(CancelNotice {
        lease: Some(token(10)),
        reason: "migration canceled".into(),
    }))
    .await;
    assert_eq!(recv(&mut cancels).await, 10);

    fake.state().cancel_in_heartbeat.push(CancelNotice {
        lease: Some(token(11)),
        reason: "lease reassigned".into(),
    });
    assert_eq!(recv(&mut cancels).await, 11);

    // A revoked lease's outcome is not reported: it would be rejected.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.state().report_calls, 0);
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn leases_end_locally_when_renewals_stop() {
    let fake = Fake::default();
    {
        let mut s = fake.state();
        s.renew = false;
        s.lease_duration_ms = 500;
    }
    let (url, _server) = fake.start().await;
    let worker = start(builder(&url));

    let started = tokio::time::Instant::now();
    fake.assign(20, "sleep", json!({"ms": 60_000})).await;
    // Local lease = 4/5 of 500 ms; the handler stops and its retryable
    // failure still lands before the coordinator's expiry.
    fake.wait_for("the canceled attempt's failure", |s| s.failures.len() == 1)
        .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(380) && elapsed < Duration::from_millis(1500),
        "{elapsed:?}"
    );
    assert_eq!(fake.state().failures[0].error, "canceled");
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn reports_are_retried_through_outages_and_dropped_when_the_lease_is_lost() {
    let fake = Fake::default();
    fake.state().unavailable_reports = 2;
    let (url, _server) = fake.start().await;
    let worker = start(builder(&url));

    fake.assign(30, "echo", json!({})).await;
    fake.wait_for("the completion", |s| s.completions.len() == 1)
        .await;
    assert_eq!(fake.state().report_calls, 3);

    fake.state().reject_reports = Some(Code::FailedPrecondition);
    fake.assign(31, "echo", json!({})).await;
    fake.wait_for("the rejected report", |s| s.report_calls == 4)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        fake.state().report_calls,
        4,
        "a lost lease's report is not retried"
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn reconnects_with_the_same_id_and_keeps_running_tasks() {
    let fake = Fake::default();
    let (url, _server) = fake.start().await;
    let worker = start(builder(&url));

    fake.assign(40, "sleep", json!({"ms": 400})).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    fake.drop_stream();
    fake.wait_for("a second subscription", |s| s.subscribes.len() == 2)
        .await;
    {
        // The reconnect proves it is the same process: the same instance.
        let s = fake.state();
        assert_eq!(s.subscribes[1].worker_id, "w-test");
        assert_ne!(s.subscribes[0].instance, 0);
        assert_eq!(s.subscribes[1].instance, s.subscribes[0].instance);
    }
    fake.wait_for("the task started before the reconnect", |s| {
        s.completions.len() == 1
    })
    .await;
    assert_eq!(fake.state().completions[0].lease, Some(token(40)));

    // Work assigned on the new stream runs too.
    fake.assign(41, "echo", json!({})).await;
    fake.wait_for("the second completion", |s| s.completions.len() == 2)
        .await;
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn waits_for_a_coordinator_that_is_not_up_yet() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let worker = start(builder(&url));
    // Not accepting yet: the first attempts fail and are retried.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fake = Fake::default();
    let _server = fake.serve(listener);
    fake.wait_for("a subscription", |s| !s.subscribes.is_empty())
        .await;
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_drains_in_flight_tasks_then_cancels_past_the_bound() {
    let fake = Fake::default();
    let (url, _server) = fake.start().await;
    let worker = start(builder(&url).drain_timeout(Duration::from_millis(300)));

    fake.assign(50, "sleep", json!({"ms": 100})).await;
    fake.assign(51, "sleep", json!({"ms": 60_000})).await;
    fake.wait_for("both leases in a heartbeat", |s| {
        s.heartbeats.last().is_some_and(|h| h.leases.len() == 2)
    })
    .await;
    let started = tokio::time::Instant::now();
    worker.shutdown().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let s = fake.state();
    assert_eq!(
        s.completions.len(),
        1,
        "the short task finished within the bound"
    );
    assert_eq!(s.completions[0].lease, Some(token(50)));
    assert_eq!(
        s.failures.len(),
        1,
        "the long one was canceled and handed back"
    );
    assert_eq!(
        (s.failures[0].error.as_str(), s.failures[0].retryable),
        ("canceled", true)
    );
}

#[tokio::test]
async fn a_refused_subscription_ends_run_with_an_error() {
    let fake = Fake::default();
    fake.state().refuse_subscribe = Some(Code::InvalidArgument);
    let (url, _server) = fake.start().await;
    let worker = builder(&url).build().unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), worker.run(std::future::pending()))
        .await
        .expect("run returns");
    match result {
        Err(WorkerError::Refused { code, message, .. }) => {
            assert_eq!(code, Code::InvalidArgument);
            assert_eq!(message, "bad worker");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn never_exceeds_its_slots() {
    let fake = Fake::default();
    let (url, _server) = fake.start().await;
    let running = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let worker = start(builder(&url).handler("count", move |_ctx: TaskContext| {
        let (running, peak) = (r.clone(), p.clone());
        async move {
            use std::sync::atomic::Ordering::SeqCst;
            let now = running.fetch_add(1, SeqCst) + 1;
            peak.fetch_max(now, SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            running.fetch_sub(1, SeqCst);
            Ok(TaskOutput::empty())
        }
    }));
    // More assignments than slots (a misbehaving coordinator): they queue.
    for id in 60..66 {
        fake.assign(id, "count", json!({})).await;
    }
    fake.wait_for("six completions", |s| s.completions.len() == 6)
        .await;
    assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 2);
    worker.shutdown().await.unwrap();
}

async fn recv(rx: &mut mpsc::UnboundedReceiver<i64>) -> i64 {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("in time")
        .expect("open")
}
