//! # Stagecoach coordinator
//!
//! Keeps every migration's state in SQL, holds capacity slots and stage
//! leases, and streams task assignments over gRPC to stateless workers. See
//! `docs/design.md` in the repository for the concepts, state machines,
//! invariants, lock order and why each backend does what it does.
//!
//! ## Layout, top to bottom
//!
//! | module | what it holds |
//! |---|---|
//! | [`server`] | assembles store, core, loops and the gRPC server; `run(config, listener, shutdown)` |
//! | [`http`] | the HTTP port (`--http-listen`): health, metrics and the dashboard, behind the same tokens |
//! | [`metrics`] | what this process counts for `/metrics` (retries, leases expired, task, stage and RPC durations) and the gRPC layer that times each call |
//! | [`auth`] | bearer tokens with roles: the tokens file, the role of each RPC, the check wrapped around each service |
//! | [`grpc`] | thin `MigrationService`, `WorkerService`, `AdminService` handlers; all proto ↔ domain conversions; the error → status mapping |
//! | [`engine`] | the scheduling core: validation, one store transition per call, acting on its effects; the connected-worker registry; the dispatcher and sweeper loops |
//! | [`store`] | the `Store` trait and its backends; each state change is one transaction with its precondition in SQL |
//! | [`domain`] | plans and their validation, migration/stage/task states, leases, events — no protobuf, no SQL |
//! | [`config`] | the typed configuration (flags, `STAGECOACH_…` environment) |
//! | [`background`] | the dispatcher, sweeper, listener and HTTP port as supervised tasks: one that stops early stops the coordinator |
//! | [`conn`] | the timeouts of a connection: its HTTP/2 preface, and no call for too long |
//! | [`tls`] | TLS and mutual TLS on the gRPC port: the certificate files, read and checked at start |
//!
//! Correctness never depends on in-memory state: the registry and the
//! notification channels are caches, rebuilt when workers reconnect.

pub mod auth;
pub mod background;
pub mod clock;
pub mod config;
pub mod conn;
pub mod domain;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod server;
pub mod store;
pub mod tls;
