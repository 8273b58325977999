//! End-to-end tests of Stagecoach: real `coordinator` and `worker`
//! processes, driven over gRPC, judged by their event log.
//!
//! # Layout
//!
//! | module | what it holds |
//! |---|---|
//! | [`backend`] | [`Backend`] (SQLite or a throwaway PostgreSQL), [`on_both_backends!`] |
//! | [`binaries`] | builds the two executables once per test process and finds them |
//! | [`process`] | one real process: [`Coordinator`] and [`Worker`], start, SIGTERM, SIGKILL, logs |
//! | [`cluster`] | [`Cluster`]: a coordinator and workers in one temporary directory |
//! | [`fleet`] | [`Fleet`]: several coordinators on one PostgreSQL database, workers that know several |
//! | [`client`] | [`Client`]: gRPC clients and the calls tests repeat (wait, read the log) |
//! | [`checker`] | [`check_invariants`]: the invariants I1–I10 read from one migration's log |
//! | [`capacity`] | [`check_capacity`] (I3) and [`check_worker_slots`] (I12) on the merged log of all migrations |
//! | [`fuzz`] | the `fuzz` command: hostile input against a live coordinator, and its checks |
//! | [`metrics`] | `/metrics` over HTTP ([`metrics::get`]) and a strict parser of the Prometheus text format |
//! | [`python`] | the Python examples (`worker/examples/python/`): their virtualenv under the target dir, stubs, processes |
//! | [`chaos`] | the `chaos` command: random, seeded faults against a cluster of real processes, every migration checked |
//! | [`fake_worker`] | [`FakeWorker`]: a worker over raw gRPC whose every report the test sends by hand |
//! | [`plans`] | short builders for the plans tests write |
//! | [`sample`] | the sample export plan and a source database to export |
//! | [`archive`] | [`check_archive`]: the export archive checked against its source |
//! | [`chromium`] | [`chromium::Chromium`]: headless Chromium over the DevTools protocol, installed when missing |
//!
//! The test files under `tests/` are the scenarios. Each scenario runs on
//! both backends, as `sqlite::NAME` and `postgres::NAME`
//! ([`on_both_backends!`]; `grpc_surface.rs` does not touch the store and
//! runs on SQLite only), so `cargo test -p stagecoach-tests postgres::` runs
//! the PostgreSQL half. PostgreSQL is a throwaway server per test binary,
//! started on first use; without its binaries those tests fail and say how
//! to install them.
//!
//! | file | what it proves |
//! |---|---|
//! | `e2e_sample.rs` | the sample export end to end |
//! | `e2e_failure.rs` | a dead task fails its migration |
//! | `e2e_bad_input.rs` | bad plans and requests are refused and store nothing |
//! | `grpc_surface.rs` | health and reflection |
//! | `tls.rs` | TLS end to end (a worker process, clients, `worker health-check`), plaintext and untrusting clients refused; mutual TLS refusing clients without a certificate of its CA; a wrong key stops the start |
//! | `auth.rs` | bearer tokens: every RPC × no token, bad tokens and each role answers as the role table says and a denied call changes nothing; who created, canceled, retried in the event log; SIGHUP reload; loopback only without tokens |
//! | `reports.rs` | duplicate, late, premature and batched reports (I2, I4) |
//! | `capacity.rs` | pool slots, immediate admission, pause and resume (I3) |
//! | `worker_crash.rs` | `kill -9` of a worker: reassignment, stale late report (I4, I6) |
//! | `frozen_worker.rs` | a worker frozen (`SIGSTOP`) past its lease: its task goes to the healthy worker, ListWorkers says why it gets none (I6, I7) |
//! | `coordinator_crash.rs` | `kill -9` of the coordinator mid-stage, twice (I2, I6, I11) |
//! | `handler_faults.rs` | panicking and hanging handlers: bounded retries, timeouts (I7) |
//! | `cancel_retry.rs` | cancel mid-stage and retry after a failure (I9) |
//! | `semantics.rs` | deadline, subject exclusivity, idempotency, subject status, serial and dynamic stages (I8, I10) |
//! | `fuzz_smoke.rs` | a few seconds of the fuzzer: no crash, no `INTERNAL` for bad input, SERVING, bounded memory, the checker clean on every migration |
//! | `dashboard.rs` | the web dashboard: its JSON API (filters, paging, spans, tail, leased tasks, live feed, tokens) and the page in headless Chromium (states, Gantt chart, a live update without reload, hostile subjects as text, 390 px, the token prompt) |
//! | `metrics.rs` | `/metrics`: every family with its type, counts matching a run of succeeded, failed, canceled and stuck migrations; 401/403/200 by token; two coordinators on one PostgreSQL report the same database gauges |
//! | `python_clients.rs` | the Python example worker and client (stubs generated from our proto) run a migration, a forged lease secret is refused, a killed Python worker's task is redone, `--tls-ca` (SQLite only) |
//! | `chaos_smoke.rs` | 30 s of the chaos harness on each backend: faults of several kinds, every migration as its plan implies, 0 violations |
//! | `cluster_postgres.rs` | three coordinators on one PostgreSQL database: a fleet, a `kill -9`, racing admissions, a cancel across coordinators (I2, I3, I6, I9) |
//! | `cluster_streams.rs` | one live `Subscribe` stream per worker id across two coordinators on one PostgreSQL database; instant failover of the same worker process |
//!
//! # A test, typically
//!
//! ```no_run
//! use std::time::Duration;
//! use stagecoach_tests::{Backend, Cluster, check_invariants, on_both_backends};
//!
//! on_both_backends!(one_noop_succeeds);
//!
//! /// One noop task succeeds, by the rules.
//! async fn one_noop_succeeds(backend: Backend) {
//!     let cluster = Cluster::start(backend, 2, 4).await; // 2 workers of 4 slots
//!     let client = cluster.client().await;
//!     client.put_plan_json(&serde_json::json!({
//!         "name": "p", "stages": [{"name": "s", "tasks": [{"kind": "noop"}]}]
//!     })).await.unwrap();
//!     let m = client.create_migration("p", "project/1", &serde_json::json!({})).await.unwrap();
//!     let m = client.wait_for_terminal(m.id, Duration::from_secs(30)).await;
//!     let events = client.events(m.id).await.unwrap();
//!     check_invariants(&m, &events).unwrap();
//! }
//! # fn main() {}
//! ```
//!
//! A panicking test prints the tail of every process's log and keeps its
//! temporary directory.

pub mod archive;
pub mod backend;
pub mod bench;
pub mod binaries;
pub mod capacity;
pub mod chaos;
pub mod chromium;
pub mod client;
pub mod cluster;
pub mod fake_worker;
pub mod fleet;
pub mod fuzz;
pub mod metrics;
pub mod plans;
pub mod process;
pub mod python;
pub mod sample;

pub use archive::check_archive;
pub use backend::{Backend, CommitOrder, postgres_database};
pub use capacity::{check_capacity, check_capacity_paused, check_worker_slots};
pub use checker::{check_attempt_bound, check_invariants, describe_event};
pub use client::{Client, assert_refused, is_terminal, of_kind, wait_for};
pub use cluster::{Cluster, FAST};
pub use fake_worker::FakeWorker;
pub use fleet::Fleet;
pub use process::{Coordinator, Worker};
pub use sample::{SAMPLE_PLAN, SourceDb, build_source_db, sample_plan_json};
/// The invariant checker, a crate of its own so the `stagecoach verify`
/// command shares it.
pub use stagecoach_verify as checker;

/// Asserts a check passed, printing every violation otherwise.
#[track_caller]
pub fn assert_ok(what: &str, result: Result<(), Vec<String>>) {
    if let Err(errors) = result {
        panic!(
            "{what}: {} violations:\n  {}",
            errors.len(),
            errors.join("\n  ")
        );
    }
}
