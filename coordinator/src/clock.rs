//! One clock for every timestamp the coordinator writes. On SQLite the
//! coordinator is the only writer, so its wall clock is the clock
//! (docs/design.md, "Leases and time"); times are milliseconds since the Unix epoch, stored as integers.
//!
//! A transition reads the clock once: inside [`one_instant`], the first
//! [`now_ms`] fixes the instant and every later one returns it, so the checks
//! a transaction makes against time (a deadline, a lease's expiry) and the
//! times it writes (its events, a lease's start) agree exactly. The
//! PostgreSQL store gets the same from the database: its clock is the
//! transaction's start (`migrations/postgres/0012_transaction_clock.sql`).

use std::cell::Cell;
use std::future::Future;
use std::time::{SystemTime, UNIX_EPOCH};

tokio::task_local! {
    static INSTANT: Cell<Option<i64>>;
}

/// Milliseconds since the Unix epoch; inside [`one_instant`], the instant
/// its first call read.
pub fn now_ms() -> i64 {
    INSTANT
        .try_with(|instant| match instant.get() {
            Some(ms) => ms,
            None => {
                let ms = wall_ms();
                instant.set(Some(ms));
                ms
            }
        })
        .unwrap_or_else(|_| wall_ms())
}

/// Runs `f` as one instant: every [`now_ms`] in it returns the time its
/// first one read (the start of the transaction, not of a wait for the
/// writer before it).
pub async fn one_instant<F: Future>(f: F) -> F::Output {
    INSTANT.scope(Cell::new(None), f).await
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_instant_reads_the_clock_once() {
        let (first, later) = one_instant(async {
            let first = now_ms();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            (first, now_ms())
        })
        .await;
        assert_eq!(first, later);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert!(now_ms() > first, "outside, the clock moves");
    }
}
