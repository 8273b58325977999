//! Handlers that ship with the worker binary.
//!
//! - [`basic`]: small tools for demos and for the end-to-end tests:
//!   - `noop` succeeds at once;
//!   - `sleep` takes a while (`{"ms": N}`), stops when canceled and can leave
//!     a marker file saying so (`"cancel_marker": PATH`);
//!   - `fail` fails on command (`{"message", "retryable"}`), unless a file
//!     named by `"unless_file"` exists;
//!   - `panic` panics with `{"message"}` (a buggy handler);
//!   - `hang` never finishes and ignores cancellation (a stuck handler).
//! - [`sample`]: the sample migration, a parallel export of a SQLite project
//!   database (`export.inspect`, `export.table`, `export.archive`,
//!   `export.verify`) and its plan.
//!
//! The sample handlers write under a shared directory every worker of the
//! fleet can reach (a volume in docker-compose); it is captured by the
//! registered closures rather than kept in a global.

use std::path::PathBuf;

use stagecoach_worker::WorkerBuilder;

pub mod basic;
pub mod sample;

/// Registers every built-in handler; the sample export writes under
/// `shared_dir`.
pub fn register_builtin(builder: WorkerBuilder, shared_dir: PathBuf) -> WorkerBuilder {
    let builder = builder
        .handler("noop", basic::noop)
        .handler("sleep", basic::sleep)
        .handler("fail", basic::fail)
        .handler("panic", basic::panic)
        .handler("hang", basic::hang);
    sample::register(builder, shared_dir)
}
