//! The throwaway PostgreSQL server of the PostgreSQL half of the bench: the
//! one the e2e harness uses ([`crate::postgres_database`], built on the
//! coordinator's test helper `coordinator/tests/support/postgres.rs`). It
//! runs `initdb` and `postgres` as the `postgres` OS user when we are root,
//! on a free loopback port in a temp dir, and stops the server when the
//! process exits, however it exits.
//!
//! The helper panics when it cannot start a server (it is written for
//! tests); here that panic becomes an error, so the bench reports
//! PostgreSQL as not available and goes on with the other backend.

use anyhow::anyhow;

/// The process's throwaway server, once it answered.
#[derive(Debug)]
pub struct PgServer {
    _started: (),
}

impl PgServer {
    /// Starts the server (creating a first, unused database proves it runs).
    pub async fn start() -> anyhow::Result<PgServer> {
        create_database().await?;
        Ok(PgServer { _started: () })
    }

    /// Creates an empty database and returns its URL.
    pub async fn create_database(&self) -> anyhow::Result<String> {
        create_database().await
    }
}

async fn create_database() -> anyhow::Result<String> {
    // A task of its own, so the helper's panic ends only that task.
    match tokio::spawn(crate::postgres_database()).await {
        Ok(url) => Ok(url),
        Err(e) if e.is_panic() => {
            let panic = e.into_panic();
            let text = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("the PostgreSQL helper panicked");
            Err(anyhow!("{}", text.lines().next().unwrap_or(text)))
        }
        Err(e) => Err(anyhow!("the PostgreSQL helper's task: {e}")),
    }
}
