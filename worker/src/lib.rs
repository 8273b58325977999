//! The Stagecoach worker SDK.
//!
//! A worker is a stateless process that runs tasks for a Stagecoach
//! coordinator: it subscribes with the task kinds it has handlers for and how
//! many tasks it runs at once, receives assignments over a gRPC stream, keeps
//! their leases alive with heartbeats, and reports each outcome. Everything
//! durable lives in the coordinator; a worker can be killed at any instant and
//! its tasks are given to another worker once their leases expire.
//!
//! # Writing a worker
//!
//! ```no_run
//! use stagecoach_worker::{TaskContext, TaskError, TaskOutput, Worker};
//!
//! async fn export_table(ctx: TaskContext) -> Result<TaskOutput, TaskError> {
//!     let table = ctx.payload()["table"]
//!         .as_str()
//!         .ok_or_else(|| TaskError::fatal("payload needs a \"table\""))?;
//!     for done in 0..100 {
//!         if ctx.is_cancelled() {
//!             return Err(TaskError::retryable("canceled"));
//!         }
//!         ctx.progress(done, 100); // sent with the next heartbeat
//!     }
//!     Ok(TaskOutput::new(serde_json::json!({ "table": table })))
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let worker = Worker::builder()
//!     .coordinator("http://127.0.0.1:50051") // at least one address
//!     .worker_id("w-1") // default "<hostname>-<pid>-<random>"
//!     .slots(8) // default 4
//!     .handler("export.table", export_table)
//!     .handler("noop", |_ctx| async { Ok(TaskOutput::empty()) })
//!     .build()?;
//! worker.run(async { tokio::signal::ctrl_c().await.ok(); }).await?;
//! # Ok(()) }
//! ```
//!
//! # How the types relate
//!
//! ```text
//! WorkerBuilder --build()--> Worker --run(shutdown)--> subscription loop
//!      | .handler(kind, f)                  | Assignment    | CancelNotice
//!      v                                    v               v
//!   Handler <---- run(TaskContext) ---- task runner    lease table <-- heartbeat loop
//!      |                                    |   (progress, checkpoint, cancel)
//!      +-- Ok(TaskOutput) / Err(TaskError) -+--> Complete / Fail
//! ```
//!
//! - A handler returns [`TaskOutput`] (a JSON output, and tasks to add to
//!   later stages) or [`TaskError`], which says whether a retry may help.
//!   A panicking handler counts as a retryable failure.
//! - [`TaskContext`] carries the payload, the migration's parameters, the
//!   checkpoint of an earlier attempt, and a cancellation signal that fires
//!   when the coordinator cancels the task, when the lease is lost, or when
//!   shutdown passes its drain bound. Cancellation is cooperative; a handler
//!   that ignores it is dropped a few seconds later.
//! - The worker treats each lease as ending a fifth earlier than the
//!   coordinator does, so a handler is stopped before its task can be given
//!   to another worker.
//! - When the stream to the coordinator drops, the worker reconnects with
//!   backoff (100 ms doubling to 5 s, with jitter) under the same id, and its
//!   running tasks keep going and keep reporting.
//!
//! # Several coordinators
//!
//! Coordinators that share one PostgreSQL database are interchangeable, so a
//! worker can be given all of them:
//!
//! ```no_run
//! # use stagecoach_worker::{TaskOutput, Worker};
//! let worker = Worker::builder()
//!     .coordinators(["http://c1:50051", "http://c2:50051"])
//!     .handler("noop", |_ctx| async { Ok(TaskOutput::empty()) })
//!     .build()?;
//! # Ok::<(), stagecoach_worker::BuildError>(())
//! ```
//!
//! It streams from one at a time. Each worker shuffles the list once (so a
//! fleet spreads out, also when one coordinator dies) and moves round-robin
//! to the next address when a connect fails or its stream ends, right away;
//! the backoff applies between full rounds. Heartbeats and reports go to the
//! coordinator it streams from, and one that finds it unreachable is tried on
//! the others before the caller backs off. Leases the worker holds stay
//! valid across a switch: they live in the shared database, keyed by worker
//! id and fencing token, and the worker keeps its id and keeps renewing them.
//! Each switch is logged at `warn` with both addresses. One address behind a
//! load balancer works as well.
//!
//! # TLS
//!
//! An `https://` address connects over TLS (rustls), trusting the system's
//! roots unless [`ClientTls`] names the CA; a coordinator that requires
//! client certificates (mutual TLS) gets the one [`ClientTls`] carries:
//!
//! ```no_run
//! # use stagecoach_worker::{ClientTls, TaskOutput, Worker};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tls = ClientTls::new()
//!     .ca_certificate_pem(std::fs::read("ca.pem")?)?
//!     .identity_pem(std::fs::read("worker.pem")?, std::fs::read("worker.key")?)?;
//! let worker = Worker::builder()
//!     .coordinator("https://coordinator.internal:50051")
//!     .tls(tls)
//!     .handler("noop", |_ctx| async { Ok(TaskOutput::empty()) })
//!     .build()?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! | module | what it holds |
//! |---|---|
//! | `builder` | [`Worker::builder`], every setting and its validation ([`BuildError`]) |
//! | `handler` | [`Handler`], [`TaskContext`], [`TaskOutput`], [`TaskError`], [`NewTask`] |
//! | `run` | [`Worker::run`]: the subscription loop, reconnects, shutdown drain ([`WorkerError`]) |
//! | `task` | one assignment: slot, handler (panics, cancellation), report |
//! | `report` | `Complete` / `Fail` with retries and the lease-lost rules |
//! | `heartbeat` | lease renewal, progress, cancel notices, local lease expiry |
//! | `leases` | the table of held leases the loops above share |
//! | `client` | one gRPC channel per coordinator address, failover of unary calls, per-call metadata |
//! | [`tls`] | [`ClientTls`]: the CA to trust and the certificate to present to `https://` coordinators |
//! | `backoff` | exponential backoff with jitter |
//!
//! The built-in handlers (`noop`, `sleep`, `fail`, `panic`, `hang`) and the
//! sample project export are the `stagecoach-handlers` crate
//! (`worker/handlers/`), and the `worker` binary is `worker/bin/`: the SDK
//! depends only on what an SDK needs.

mod backoff;
mod batch;
mod builder;
mod client;
mod handler;
mod heartbeat;
mod leases;
mod report;
mod run;
mod task;
pub mod tls;

pub use builder::{
    BuildError, DEFAULT_DRAIN_TIMEOUT, DEFAULT_SLOTS, MAX_SLOTS, Worker, WorkerBuilder,
};
pub use futures::future::BoxFuture;
pub use handler::{Handler, NewTask, TaskContext, TaskError, TaskOutput};
pub use run::WorkerError;
pub use stagecoach_proto::v1::RetryPolicy;
pub use tls::{ClientTls, TlsError};
