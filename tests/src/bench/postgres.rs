//! The throwaway PostgreSQL server of the PostgreSQL half of the bench: the
//! coordinator's own test helper (`coordinator/tests/support/postgres.rs`,
//! included by path), which runs `initdb` and `postgres` as the `postgres`
//! OS user when we are root, on a free loopback port in a temp dir, and
//! stops the server when the process exits however it exits.
//!
//! The helper panics when it cannot start a server (it is written for
//! tests); here that panic becomes an error, so the bench reports
//! PostgreSQL as not available and goes on with SQLite.

use anyhow::{Context, anyhow};

#[path = "../../../coordinator/tests/support/postgres.rs"]
mod support;

/// The running server (one per process, stopped at exit).
pub struct PgServer {
    server: &'static support::TestPostgres,
}

impl std::fmt::Debug for PgServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgServer")
            .field("url", &self.server.url(""))
            .finish()
    }
}

impl PgServer {
    /// Starts the server, or returns the one this process started already.
    pub async fn start() -> anyhow::Result<PgServer> {
        let server = blocking(support::server).await?;
        Ok(PgServer { server })
    }

    /// Creates an empty database and returns its URL.
    pub async fn create_database(&self) -> anyhow::Result<String> {
        let server = self.server;
        blocking(move || server.create_database()).await
    }
}

/// Runs one of the helper's blocking calls off the runtime, turning its
/// panic into an error.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(move || std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)))
        .await
        .context("the PostgreSQL helper's thread")?
        .map_err(|panic| {
            let text = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("the PostgreSQL helper panicked");
            anyhow!("{}", text.lines().next().unwrap_or(text))
        })
}
