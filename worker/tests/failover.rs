//! A worker given several coordinators (sharing one database, so any of them
//! knows its leases), against two scripted ones on real sockets: it finds a
//! live one, moves when the one it streams from goes away mid-task, keeps
//! its lease alive there, reports there, and says so in its log.

mod fake;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake::{Fake, token, wait_until};
use serde_json::json;
use stagecoach_worker::{TaskContext, TaskOutput, Worker, WorkerBuilder, WorkerError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tracing_subscriber::fmt::MakeWriter;

fn builder(urls: &[&str]) -> WorkerBuilder {
    Worker::builder()
        .coordinators(urls.iter().copied())
        .worker_id("w-failover")
        .slots(2)
        .drain_timeout(Duration::from_secs(5))
        .handler("echo", |ctx: TaskContext| async move {
            Ok(TaskOutput::new(ctx.payload().clone()))
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

thread_local! {
    /// Where the log lines of the test running on this thread go.
    static LOGS: std::cell::RefCell<Option<Logs>> = const { std::cell::RefCell::new(None) };
}

/// The worker's log lines, captured per test.
///
/// One global subscriber routes each line to the buffer of the test whose
/// thread wrote it (`#[tokio::test]` runs the worker's tasks on the test's
/// own thread). A thread-local subscriber per test would be simpler, but
/// `tracing` caches whether a call site is enabled across threads, so with
/// tests running in parallel some lines would be lost.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn capture() -> Logs {
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            tracing_subscriber::fmt()
                .with_writer(Router)
                .with_ansi(false)
                .with_max_level(tracing::Level::DEBUG)
                .init();
        });
        let logs = Logs::default();
        LOGS.with(|l| *l.borrow_mut() = Some(logs.clone()));
        logs
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The `warn` lines announcing a switch from `from` to `to`.
    fn switches(&self, from: &str, to: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    && l.contains("switching to another coordinator")
                    && l.contains(&format!("from={from}"))
                    && l.contains(&format!("to={to}"))
            })
            .map(String::from)
            .collect()
    }
}

/// Writes to this thread's [`Logs`], or nowhere.
struct Router;

impl Write for Router {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.with(|l| {
            if let Some(logs) = &*l.borrow() {
                logs.0.lock().unwrap().extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Router {
    type Writer = Router;

    fn make_writer(&'a self) -> Self::Writer {
        Router
    }
}

/// An address nothing listens on: connecting is refused.
async fn dead_address() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

#[tokio::test]
async fn connects_to_the_other_address_when_one_is_down() {
    let logs = Logs::capture();
    let dead = dead_address().await;
    let live = Fake::default();
    let (live_url, _server) = live.start().await;
    let started = tokio::time::Instant::now();
    let worker = start(builder(&[&dead, &live_url]));

    live.wait_for("a subscription", |s| !s.subscribes.is_empty())
        .await;
    // Whichever address the worker tried first, the live one is reached in
    // the first round, without waiting out a backoff of the dead one.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // Its order is random; a lost stream makes it go round once, so it
    // meets the dead address and moves past it either way.
    live.drop_stream();
    live.wait_for("a second subscription", |s| s.subscribes.len() == 2)
        .await;
    assert_eq!(live.state().subscribes[1].worker_id, "w-failover");
    let switches = logs.switches(&dead, &live_url);
    assert!(
        !switches.is_empty(),
        "no warning of a switch from {dead} to {live_url}:\n{}",
        logs.text()
    );

    live.assign(1, "echo", json!({"n": 1})).await;
    live.wait_for("the completion", |s| s.completions.len() == 1)
        .await;
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn moves_to_the_other_coordinator_mid_task_and_keeps_the_lease() {
    let logs = Logs::capture();
    let (a, b) = (Fake::default(), Fake::default());
    let (a_url, a_server) = a.start().await;
    let (b_url, b_server) = b.start().await;
    let worker = start(builder(&[&a_url, &b_url]));

    wait_until("a subscription", || a.subscribed() || b.subscribed()).await;
    let ((first, first_url, first_server), (other, other_url, _other_server)) = if a.subscribed() {
        ((a, a_url, a_server), (b, b_url, b_server))
    } else {
        ((b, b_url, b_server), (a, a_url, a_server))
    };

    // Longer than the worker trusts a lease (4/5 of 2 s) without renewal:
    // it completes only if the other coordinator keeps renewing it.
    first.assign(7, "sleep", json!({"ms": 2500})).await;
    first
        .wait_for("a heartbeat renewing the lease", |s| {
            s.heartbeats
                .iter()
                .flat_map(|h| &h.leases)
                .any(|l| l.lease == Some(token(7)))
        })
        .await;
    first.go_away(first_server);

    other
        .wait_for("a subscription to the other coordinator", |s| {
            s.subscribes.len() == 1
        })
        .await;
    assert_eq!(other.state().subscribes[0].worker_id, "w-failover");
    wait_until("a heartbeat renewing the lease there", || {
        other.heartbeat_named(token(7))
    })
    .await;
    other
        .wait_for("the completion, reported there", |s| {
            s.completions.len() == 1
        })
        .await;
    assert_eq!(other.state().completions[0].lease, Some(token(7)));
    assert!(
        other.state().failures.is_empty(),
        "the lease was not given up"
    );
    {
        let f = first.state();
        assert!(f.completions.is_empty() && f.failures.is_empty());
    }

    let switches = logs.switches(&first_url, &other_url);
    assert!(
        !switches.is_empty(),
        "no warning of a switch from {first_url} to {other_url}:\n{}",
        logs.text()
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn reports_and_heartbeats_the_current_coordinator_cannot_take_go_to_another() {
    let (a, b) = (Fake::default(), Fake::default());
    let (a_url, _a_server) = a.start().await;
    let (b_url, _b_server) = b.start().await;
    let worker = start(builder(&[&a_url, &b_url]));

    wait_until("a subscription", || a.subscribed() || b.subscribed()).await;
    let (current, other) = if a.subscribed() { (a, b) } else { (b, a) };
    // The stream stays up, but unary calls find the coordinator unavailable.
    {
        let mut s = current.state();
        s.unavailable_reports = u32::MAX;
        s.unavailable_heartbeats = u32::MAX;
    }
    let beats_before = other.state().heartbeats.len();
    current.assign(3, "echo", json!({"n": 3})).await;
    other
        .wait_for("the completion on the other coordinator", |s| {
            s.completions.len() == 1
        })
        .await;
    assert_eq!(other.state().completions[0].lease, Some(token(3)));
    assert!(
        current.state().report_calls >= 1,
        "the current one was asked first"
    );
    other
        .wait_for("heartbeats on the other coordinator", |s| {
            s.heartbeats.len() >= beats_before + 2
        })
        .await;
    assert_eq!(
        current.state().subscribes.len(),
        1,
        "unary failover does not move the stream"
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refusal_from_one_coordinator_is_not_the_end() {
    let refusing = Fake::default();
    refusing.state().refuse_subscribe = Some(Code::PermissionDenied);
    let live = Fake::default();
    let (refusing_url, _r) = refusing.start().await;
    let (live_url, _l) = live.start().await;
    let worker = start(builder(&[&refusing_url, &live_url]));
    live.wait_for("a subscription", |s| !s.subscribes.is_empty())
        .await;
    live.assign(4, "echo", json!({})).await;
    live.wait_for("the completion", |s| s.completions.len() == 1)
        .await;
    worker.shutdown().await.unwrap();

    // Refused everywhere: that no retry can fix.
    live.state().refuse_subscribe = Some(Code::PermissionDenied);
    let worker = builder(&[&refusing_url, &live_url]).build().unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), worker.run(std::future::pending()))
        .await
        .expect("run returns");
    assert!(
        matches!(
            result,
            Err(WorkerError::Refused {
                code: Code::PermissionDenied,
                ..
            })
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn the_builder_takes_a_list_and_single_addresses_together() {
    let worker = Worker::builder()
        .coordinator("http://c1:50051")
        .coordinators(["http://c2:50051", "http://c3:50051"])
        .handler("noop", |_ctx| async { Ok(TaskOutput::empty()) })
        .build()
        .unwrap();
    assert_eq!(
        worker.coordinators(),
        ["http://c1:50051", "http://c2:50051", "http://c3:50051"]
    );
}
