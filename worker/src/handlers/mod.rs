//! Handlers that ship with the worker binary.
//!
//! - [`basic`]: `noop`, `sleep` and `fail`, small tools for demos and for the
//!   end-to-end tests (a task that takes a while, a task that fails on
//!   command).
//! - [`sample`]: the sample migration, a parallel export of a SQLite project
//!   database (`export.inspect`, `export.table`, `export.archive`,
//!   `export.verify`) and its plan.
//!
//! The sample handlers write under a shared directory every worker of the
//! fleet can reach (a volume in docker-compose); it is captured by the
//! registered closures rather than kept in a global.

use std::path::PathBuf;

use crate::WorkerBuilder;

pub mod basic;
pub mod sample;

/// Registers every built-in handler; the sample export writes under
/// `shared_dir`.
pub fn register_builtin(builder: WorkerBuilder, shared_dir: PathBuf) -> WorkerBuilder {
    let builder = builder
        .handler("noop", basic::noop)
        .handler("sleep", basic::sleep)
        .handler("fail", basic::fail);
    sample::register(builder, shared_dir)
}
