//! The coordinator's background tasks (dispatcher, sweeper, the listener
//! of other coordinators' effects, the HTTP port), supervised.
//!
//! Each runs until shutdown. One that ends before it — a panic, an error,
//! or a loop that returned — leaves a coordinator that still answers calls
//! but no longer dispatches, sweeps or hears its peers: worse than none,
//! because it looks healthy. So [`Background`] logs why, cancels the
//! shutdown token (the server drains and stops, and an orchestrator
//! restarts the process; nothing is lost, the state is in the database),
//! and [`Background::join`] returns the failure, so the process exits
//! non-zero.

use std::fmt::Display;
use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A background task that stopped before shutdown, and why.
#[derive(Debug, thiserror::Error)]
#[error("the {task} stopped before shutdown: {reason}")]
pub struct Stopped {
    pub task: &'static str,
    pub reason: String,
}

/// The supervised background tasks of one coordinator.
pub struct Background {
    shutdown: CancellationToken,
    watchers: Vec<JoinHandle<Option<Stopped>>>,
}

impl Background {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            watchers: Vec::new(),
        }
    }

    /// Runs `task` (`name` says what it is, in logs and errors) until it
    /// ends; an end before shutdown stops the coordinator.
    pub fn spawn<F, E>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let handle = tokio::spawn(task);
        let shutdown = self.shutdown.clone();
        self.watchers.push(tokio::spawn(async move {
            let reason = match handle.await {
                Ok(Ok(())) if shutdown.is_cancelled() => return None,
                Ok(Ok(())) => "it returned".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) if e.is_panic() => format!("it panicked: {}", panic_message(e.into_panic())),
                Err(_) => return None,
            };
            tracing::error!(
                task = name,
                reason,
                "a background task stopped: stopping the coordinator so that it is restarted"
            );
            shutdown.cancel();
            Some(Stopped { task: name, reason })
        }));
    }

    /// Waits until every task ended; the first that stopped early, if any.
    pub async fn join(self) -> Result<(), Stopped> {
        let mut first = None;
        for watcher in self.watchers {
            if let Ok(Some(stopped)) = watcher.await {
                first.get_or_insert(stopped);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map_or_else(|| "(no message)".to_string(), |s| s.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_stops_early_stops_everything_and_says_why() {
        let shutdown = CancellationToken::new();
        let mut background = Background::new(shutdown.clone());
        let waits = shutdown.clone();
        background.spawn("sweeper", async move {
            waits.cancelled().await;
            Ok::<_, String>(())
        });
        background.spawn("dispatcher", async {
            if true {
                panic!("bad row");
            }
            Ok::<_, String>(())
        });
        let stopped = background.join().await.expect_err("the panic is reported");
        assert!(shutdown.is_cancelled(), "the rest was told to stop");
        assert_eq!(stopped.task, "dispatcher");
        assert_eq!(stopped.reason, "it panicked: bad row");
    }

    #[tokio::test]
    async fn tasks_that_end_at_shutdown_are_no_failure() {
        let shutdown = CancellationToken::new();
        let mut background = Background::new(shutdown.clone());
        for name in ["dispatcher", "sweeper"] {
            let waits = shutdown.clone();
            background.spawn(name, async move {
                waits.cancelled().await;
                Ok::<_, String>(())
            });
        }
        shutdown.cancel();
        background.join().await.expect("a clean stop");
    }
}
