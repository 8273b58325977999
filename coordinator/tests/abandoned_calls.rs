//! Calls a client abandons: the future of a store call dropped at any point
//! — while the pool hands out a connection, while `BEGIN` is in flight, in
//! the middle of a transaction's statements, during `COMMIT` — must leave
//! every pooled connection clean, outside any transaction, for the next
//! call. sqlx 0.9.0 did not on PostgreSQL: a future dropped while its
//! `BEGIN` was in flight put the connection back in the pool inside a
//! transaction nothing would end (sqlx #4393, fixed in 0.9.1), so the next
//! calls on it logged "there is already a transaction in progress" and
//! their writes stayed uncommitted, holding their locks.
//!
//! Each case drops hundreds of real store calls after a varying number of
//! polls, then checks on both backends that no connection of the store is
//! left inside a transaction, and that writes through every pooled
//! connection are committed and seen from outside.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use sqlx::Connection;
use stagecoach_coordinator::domain::{Failure, LeaseToken};
use stagecoach_coordinator::store::{PostgresStore, SqliteStore, Store};

mod support;

use support::contract::*;

/// Calls started and dropped per case.
const CALLS: usize = 400;
/// Writes made at once afterwards: more than the PostgreSQL store's pool
/// holds connections (16), so every pooled connection takes some.
const WRITES: usize = 48;

type Call<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Store call number `i`: creates, claims, reports, cancels, sweeps — each
/// a transaction of its own — on migrations made as the case goes.
fn call(s: &dyn Store, i: usize, running: i64) -> Call<'_> {
    match i % 6 {
        0 => Box::pin(async move {
            let _ = s
                .create_migration(&new(two_stage(), &format!("s{i}")))
                .await;
        }),
        1 => Box::pin(async move {
            let _ = s.claim(W, &kinds(&["noop"]), 4).await;
        }),
        2 => Box::pin(async move {
            let _ = s.cancel_migration(running, "").await;
        }),
        3 => Box::pin(async move {
            let _ = s.sweep().await;
        }),
        4 => Box::pin(async move {
            let lease = LeaseToken {
                task_id: 1,
                attempt: 1,
            };
            let _ = s
                .fail(
                    W,
                    &Failure {
                        lease,
                        secret: Default::default(),
                        error: "gone".into(),
                        retryable: true,
                    },
                )
                .await;
        }),
        _ => Box::pin(async move {
            let _ = s.retry_migration(running).await;
        }),
    }
}

/// Polls `fut` up to `polls` times, letting the runtime's I/O run between
/// polls, and drops it if it has not finished by then.
async fn abandon_after(mut fut: Call<'_>, polls: usize) {
    for _ in 0..polls {
        let ready = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx).is_ready())).await;
        if ready {
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// Starts `CALLS` store calls and drops each after 1 to 40 polls, a few at
/// once; the last ones after one poll, mid-`BEGIN` or sooner.
async fn abandon_many(s: &dyn Store) {
    let (running, _) = s.create_migration(&new(two_stage(), "r")).await.unwrap();
    for round in 0..CALLS / 4 {
        let polls = |k: usize| {
            if round + 10 >= CALLS / 4 {
                1
            } else {
                1 + (round * 7 + k * 13) % 40
            }
        };
        let calls =
            (0..4).map(|k| abandon_after(call(s, round * 4 + k, running.migration_id), polls(k)));
        futures::future::join_all(calls).await;
    }
    // Whatever was queued on the way out (a rollback) reaches the server.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Writes through the store, `WRITES` at once: pools named `after-<k>`.
async fn write_through_every_connection(s: &dyn Store) {
    let writes = (0..WRITES).map(|k| async move { s.ensure_pool(&format!("after-{k}"), 1).await });
    for r in futures::future::join_all(writes).await {
        r.unwrap();
    }
}

mod sqlite {
    use super::*;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
    use std::str::FromStr;

    #[tokio::test]
    async fn abandoned_calls_leave_the_writer_outside_any_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::open(&url, LIMITS).await.unwrap();
        let s: &dyn Store = &store;
        s.ensure_pool("default", 10).await.unwrap();
        abandon_many(s).await;

        // The writer holds no write transaction: another connection can
        // take the write lock at once.
        let mut outside = SqliteConnection::connect_with(
            &SqliteConnectOptions::from_str(&url)
                .unwrap()
                .busy_timeout(Duration::from_secs(2)),
        )
        .await
        .unwrap();
        sqlx::raw_sql("BEGIN IMMEDIATE; ROLLBACK")
            .execute(&mut outside)
            .await
            .expect("the store's writer still holds a write transaction");

        // Its writes commit, and a transaction of its own begins.
        write_through_every_connection(s).await;
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pools WHERE name LIKE 'after-%'")
            .fetch_one(&mut outside)
            .await
            .unwrap();
        assert_eq!(n as usize, WRITES, "every write is committed");
        s.create_migration(&new(two_stage(), "last"))
            .await
            .expect("the writer begins a transaction");
    }
}

mod postgres {
    use super::*;
    use sqlx::postgres::PgConnection;

    /// The store's connections inside a transaction, as the server sees
    /// them, once none is busy.
    async fn idle_in_transaction(outside: &mut PgConnection) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let states: Vec<String> = sqlx::query_scalar(
                "SELECT state FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'stagecoach-coordinator'
                   AND state LIKE 'idle in transaction%'",
            )
            .fetch_all(&mut *outside)
            .await
            .unwrap();
            if states.is_empty() || Instant::now() > deadline {
                return states;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn abandoned_calls_leave_no_pooled_connection_inside_a_transaction() {
        let url = support::postgres::fresh_database();
        let store = PostgresStore::open(&url, LIMITS).await.unwrap();
        let s: &dyn Store = &store;
        s.ensure_pool("default", 10).await.unwrap();
        abandon_many(s).await;

        let mut outside = PgConnection::connect(&url).await.unwrap();
        let left = idle_in_transaction(&mut outside).await;
        assert!(
            left.is_empty(),
            "{} pooled connections were left inside a transaction: {left:?}",
            left.len()
        );

        // Writes through every pooled connection commit: one still inside
        // a stale transaction would keep its write to itself.
        write_through_every_connection(s).await;
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pools WHERE name LIKE 'after-%'")
            .fetch_one(&mut outside)
            .await
            .unwrap();
        assert_eq!(n as usize, WRITES, "every write is committed");
        let left = idle_in_transaction(&mut outside).await;
        assert!(left.is_empty(), "{left:?}");
        s.create_migration(&new(two_stage(), "last")).await.unwrap();
    }
}
