//! The two stores a coordinator can run on, and [`on_both_backends!`], which
//! runs each scenario on both.
//!
//! The backend is an explicit argument all the way down
//! (`Cluster::start(backend, …)`, `Coordinator::start(backend, …)`), not
//! ambient state: a test reads what it runs on, and a coordinator started
//! from a spawned task cannot silently fall back to SQLite.
//!
//! - **SQLite**: a coordinator's database is the file `coord.db` in its
//!   directory.
//! - **PostgreSQL**: each coordinator directory gets its own database on one
//!   throwaway server per test binary (`coordinator/tests/support/postgres.rs`,
//!   included below): started on first use, stopped and deleted when the
//!   test binary exits, however it exits. Starting a coordinator on the same
//!   directory again (a restart) reuses that directory's database. Without
//!   PostgreSQL's server binaries every PostgreSQL test fails and says how to
//!   install them: a backend silently skipped is a backend not tested.
//!
//! Several coordinators share one PostgreSQL database when the test passes
//! `--database URL` (from [`postgres_database`]) to each of them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

#[path = "../../coordinator/tests/support/postgres.rs"]
mod throwaway;

/// Which store the coordinators of a test run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// A SQLite file per coordinator (the embedded default).
    Sqlite,
    /// A database on this test binary's throwaway PostgreSQL server.
    Postgres,
}

/// In what order a store commits events, which decides what the merged log
/// of several migrations can prove (see [`crate::capacity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOrder {
    /// One writer: event ids increase in commit order, and the events of one
    /// transaction are consecutive (SQLite).
    Serial,
    /// Concurrent transactions: the events of one migration commit in id
    /// order (its row lock), but transactions of different migrations
    /// interleave their ids, and a transaction may commit after another
    /// that took later ids (PostgreSQL).
    Concurrent,
}

impl Backend {
    /// How the store orders its commits.
    pub fn commit_order(self) -> CommitOrder {
        match self {
            Backend::Sqlite => CommitOrder::Serial,
            Backend::Postgres => CommitOrder::Concurrent,
        }
    }

    /// The database URL of a coordinator that keeps its files in `dir`: the
    /// same URL every time for the same directory, so a restarted
    /// coordinator finds its data. On PostgreSQL the first call for a
    /// directory creates an empty database (and starts the server, on the
    /// first call of the test binary).
    pub async fn database_for(self, dir: &Path) -> String {
        match self {
            Backend::Sqlite => format!("sqlite://{}", dir.join("coord.db").display()),
            Backend::Postgres => {
                static BY_DIR: Mutex<BTreeMap<PathBuf, String>> = Mutex::new(BTreeMap::new());
                let by_dir = || BY_DIR.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(url) = by_dir().get(dir) {
                    return url.clone();
                }
                let url = postgres_database().await;
                // Two starts on one directory at once: the first one wins.
                by_dir().entry(dir.to_path_buf()).or_insert(url).clone()
            }
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        })
    }
}

/// A new, empty database on this test binary's PostgreSQL server (started
/// on first use), for coordinators that share it. Panics, saying how to
/// install PostgreSQL, when its binaries are missing.
pub async fn postgres_database() -> String {
    // initdb, the server's start and psql block: keep them off the runtime.
    match tokio::task::spawn_blocking(throwaway::fresh_database).await {
        Ok(url) => url,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("creating a PostgreSQL database: {e}"),
        },
    }
}

/// Runs each scenario once per backend. Write the scenarios as plain
/// `async fn NAME(backend: Backend)` and list their names; each becomes the
/// tests `sqlite::NAME` and `postgres::NAME` (multi-threaded Tokio runtime),
/// so `cargo test -p stagecoach-tests postgres::` runs the PostgreSQL half.
/// The scenarios stay ordinary functions outside the macro, so rustfmt and
/// clippy see them; one left out of the list is dead code, which clippy
/// refuses. Attributes before a name (`#[ignore = "bug: …"]`) go on both of
/// its tests.
///
/// ```no_run
/// use stagecoach_tests::{Backend, Cluster, on_both_backends};
///
/// on_both_backends!(workers_connect, #[ignore = "bug: …"] something_broken);
///
/// async fn workers_connect(backend: Backend) {
///     let cluster = Cluster::start(backend, 2, 1).await;
///     assert_eq!(cluster.client().await.list_workers().await.unwrap().len(), 2);
/// }
///
/// async fn something_broken(backend: Backend) {
///     let _ = Cluster::start(backend, 0, 1).await;
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! on_both_backends {
    ($($(#[$attr:meta])* $name:ident),+ $(,)?) => {
        /// The scenarios on SQLite.
        mod sqlite {
            $(
                $(#[$attr])*
                #[::tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await
                }
            )+
        }

        /// The scenarios on PostgreSQL.
        mod postgres {
            $(
                $(#[$attr])*
                #[::tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name($crate::Backend::Postgres).await
                }
            )+
        }
    };
}
