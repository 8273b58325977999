//! One live Subscribe stream per worker id across every coordinator that
//! shares a database: the statements both backends run, written once.
//!
//! Inside one coordinator the registry (`engine::registry`) refuses a
//! second stream for a worker id whose stream is open, unless it comes from
//! the same worker process (its `instance`). Several coordinators on one
//! PostgreSQL database each see only their own streams, so without a shared
//! record a caller could subscribe on coordinator B with the id of a worker
//! streaming from A and take its assignments. Two tables hold that record
//! (migrations `postgres/0014`, `sqlite/0008`):
//!
//! - `stream_coordinators`: one row per coordinator (a random id drawn at
//!   its start) and until when it is alive. The coordinator renews its row
//!   every heartbeat interval ([`WorkerStreams::renew`]); a killed one's
//!   row expires, which frees every worker id it held at once. Renewing one
//!   row instead of each stream's keeps the cost flat however many workers
//!   stream.
//! - `worker_streams`: the open stream of each worker id — the process
//!   (instance), the coordinator and the stream's connection number there.
//!
//! A claim ([`CLAIM`]) takes the worker id's row when it is free (none, or
//! its coordinator expired), when the same process holds it (failover to
//! another coordinator stays instant: a worker process moves on stream loss
//! and its old coordinator may not have noticed yet), or when this very
//! coordinator holds it (its registry has already decided). Otherwise no
//! row comes back and the Subscribe is refused. The times are the store's
//! clock: the database's on PostgreSQL (one clock for every coordinator),
//! the coordinator's on SQLite ([`Clock`]).

use async_trait::async_trait;
use sqlx::{
    AssertSqlSafe, Database, Encode, Executor, FromRow, IntoArguments, Pool, SqlSafeStr, Type,
};

use crate::clock::now_ms;
use crate::error::Result;

/// A worker stream as `worker_streams` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamClaim<'a> {
    pub worker_id: &'a str,
    /// The worker process's per-process instance (0: it sent none; such a
    /// stream is never taken over by another with 0).
    pub instance: u64,
    /// The coordinator holding the stream (its random id).
    pub coordinator: &'a str,
    /// The stream's connection number in that coordinator: its end deletes
    /// its own row, never that of a newer stream of the same process.
    pub stream: u64,
}

/// A stream the database says a coordinator holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HeldStream {
    pub worker_id: String,
    pub stream: u64,
}

/// How a backend's statements read the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Clock {
    /// PostgreSQL: `stagecoach_now_ms()`, the database's clock.
    Database,
    /// SQLite: the coordinator's (`clock::now_ms`), bound as the parameter
    /// after the statement's own.
    Bound,
}

/// A statement both backends run: `$n` parameters (SQLite reads them as
/// PostgreSQL does) and `{now}` where the clock goes.
#[derive(Debug, Clone, Copy)]
struct Statement {
    text: &'static str,
    /// How many `$n` parameters it has besides the clock.
    params: usize,
}

impl Statement {
    /// Its SQL with the backend's clock.
    fn sql(&self, clock: Clock) -> AssertSqlSafe<String> {
        let now = match clock {
            Clock::Database => "stagecoach_now_ms()".to_string(),
            Clock::Bound => format!("${}", self.params + 1),
        };
        // Safe: the statement is ours, and so is the clock's text.
        AssertSqlSafe(self.text.replace("{now}", &now))
    }
}

/// Registers coordinator `$1` alive for `$2` ms, unless it is registered:
/// before its first claim, so its claims hold from the start. Leaves a
/// registered row alone (no write to one hot row per Subscribe).
const ENROL: Statement = Statement {
    text: "INSERT INTO stream_coordinators (id, expires_at_ms) VALUES ($1, {now} + $2)
           ON CONFLICT (id) DO NOTHING",
    params: 2,
};

/// Claims worker id `$1` for process `$2`, coordinator `$3`, stream `$4`;
/// returns a row only when it did (module doc: when it may).
const CLAIM: Statement = Statement {
    text: "INSERT INTO worker_streams (worker_id, instance, coordinator, stream)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (worker_id) DO UPDATE
           SET instance = excluded.instance, coordinator = excluded.coordinator,
               stream = excluded.stream
           -- this coordinator: its registry decided already
           WHERE worker_streams.coordinator = excluded.coordinator
              -- the same process, moving between coordinators
              OR (worker_streams.instance = excluded.instance AND excluded.instance <> 0)
              -- the holder is gone: killed, or stopped without cleaning up
              OR NOT EXISTS (
                  SELECT 1 FROM stream_coordinators c
                  WHERE c.id = worker_streams.coordinator AND c.expires_at_ms >= {now})
           RETURNING stream",
    params: 4,
};

/// Keeps coordinator `$1` alive for another `$2` ms — only if it still is:
/// no row updated means its claims lapsed (or it never claimed), and
/// others may have taken some of its worker ids.
const RENEW: Statement = Statement {
    text: "UPDATE stream_coordinators SET expires_at_ms = {now} + $2
           WHERE id = $1 AND expires_at_ms >= {now}
           RETURNING id",
    params: 2,
};

/// Registers coordinator `$1` alive for `$2` ms again after a lapse.
const REVIVE: Statement = Statement {
    text: "INSERT INTO stream_coordinators (id, expires_at_ms) VALUES ($1, {now} + $2)
           ON CONFLICT (id) DO UPDATE SET expires_at_ms = excluded.expires_at_ms",
    params: 2,
};

/// The streams coordinator `$1` holds.
const HELD: &str = "SELECT worker_id, stream FROM worker_streams WHERE coordinator = $1";

/// Forgets an ended stream: worker `$1`, coordinator `$2`, stream `$3`.
const RELEASE: &str =
    "DELETE FROM worker_streams WHERE worker_id = $1 AND coordinator = $2 AND stream = $3";

/// Forgets coordinator `$1` and every stream it holds (its shutdown),
/// streams first: a stop between the two leaves a row that expires.
const RETIRE: [&str; 2] = [
    "DELETE FROM worker_streams WHERE coordinator = $1",
    "DELETE FROM stream_coordinators WHERE id = $1",
];

/// A parameter of a statement here.
#[derive(Debug, Clone, Copy)]
enum Arg<'q> {
    Text(&'q str),
    Int(i64),
}

/// The record of live worker streams (module doc), as a store keeps it
/// ([`Store::worker_streams`]).
///
/// [`Store::worker_streams`]: crate::store::Store::worker_streams
#[async_trait]
pub trait WorkerStreams: Send + Sync {
    /// Claims `claim.worker_id` for the stream, keeping one live stream
    /// per worker id across every coordinator on this database; enrols
    /// the coordinator, alive for `ttl_ms`, if it is not yet. False: the
    /// stream of another process holds the id through another coordinator
    /// that is alive.
    async fn claim(&self, claim: &StreamClaim<'_>, ttl_ms: i64) -> Result<bool>;
    /// Forgets an ended stream, by worker id, coordinator and stream (not
    /// instance): a newer stream's claim of the id stays.
    async fn release(&self, claim: &StreamClaim<'_>) -> Result<()>;
    /// Keeps `coordinator` and so all its streams' claims alive for
    /// another `ttl_ms`. `Some`: its claims had lapsed (or it had none
    /// yet), so others may have taken ids it held; it is alive again, and
    /// these are the streams it still holds.
    async fn renew(&self, coordinator: &str, ttl_ms: i64) -> Result<Option<Vec<HeldStream>>>;
    /// Forgets `coordinator` and every stream it holds (its shutdown): the
    /// worker ids are free at once.
    async fn retire(&self, coordinator: &str) -> Result<()>;
}

/// The record on one backend's pool: the statements above run the same
/// way on both, only the clock differs.
pub(crate) struct Streams<'a, DB: Database> {
    pub db: &'a Pool<DB>,
    pub clock: Clock,
}

impl<DB> Streams<'_, DB>
where
    DB: Database,
    DB::Arguments: IntoArguments<DB>,
    for<'q> i64: Encode<'q, DB>,
    for<'q> &'q str: Encode<'q, DB>,
    i64: Type<DB>,
    str: Type<DB>,
{
    /// `sql` with `args` bound, then the clock read at `now` where the
    /// backend binds it (a [`Statement`]'s; `None` for a statement without).
    fn query(
        &self,
        sql: impl SqlSafeStr,
        args: &[Arg<'_>],
        now: Option<i64>,
    ) -> sqlx::query::Query<'static, DB, DB::Arguments> {
        let mut q = sqlx::query(sql);
        for arg in args {
            q = match *arg {
                Arg::Text(t) => q.bind(t),
                Arg::Int(n) => q.bind(n),
            };
        }
        match now {
            Some(now) if self.clock == Clock::Bound => q.bind(now),
            _ => q,
        }
    }
}

#[async_trait]
impl<DB> WorkerStreams for Streams<'_, DB>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'q> i64: Encode<'q, DB>,
    for<'q> &'q str: Encode<'q, DB>,
    i64: Type<DB>,
    str: Type<DB>,
    for<'r> (String, i64): FromRow<'r, DB::Row>,
{
    async fn claim(&self, claim: &StreamClaim<'_>, ttl_ms: i64) -> Result<bool> {
        let now = Some(now_ms());
        let coordinator = Arg::Text(claim.coordinator);
        self.query(ENROL.sql(self.clock), &[coordinator, Arg::Int(ttl_ms)], now)
            .execute(self.db)
            .await?;
        let args = [
            Arg::Text(claim.worker_id),
            Arg::Int(stored(claim.instance)),
            coordinator,
            Arg::Int(stored(claim.stream)),
        ];
        let claimed = self
            .query(CLAIM.sql(self.clock), &args, now)
            .fetch_optional(self.db)
            .await?;
        Ok(claimed.is_some())
    }

    async fn release(&self, claim: &StreamClaim<'_>) -> Result<()> {
        let args = [
            Arg::Text(claim.worker_id),
            Arg::Text(claim.coordinator),
            Arg::Int(stored(claim.stream)),
        ];
        self.query(RELEASE, &args, None).execute(self.db).await?;
        Ok(())
    }

    async fn renew(&self, coordinator: &str, ttl_ms: i64) -> Result<Option<Vec<HeldStream>>> {
        let now = Some(now_ms());
        let args = [Arg::Text(coordinator), Arg::Int(ttl_ms)];
        let renewed = self
            .query(RENEW.sql(self.clock), &args, now)
            .fetch_optional(self.db)
            .await?;
        if renewed.is_some() {
            return Ok(None);
        }
        self.query(REVIVE.sql(self.clock), &args, now)
            .execute(self.db)
            .await?;
        let held: Vec<(String, i64)> = sqlx::query_as(HELD)
            .bind(coordinator)
            .fetch_all(self.db)
            .await?;
        let held = held
            .into_iter()
            .map(|(worker_id, stream)| HeldStream {
                worker_id,
                stream: stream as u64,
            })
            .collect();
        Ok(Some(held))
    }

    async fn retire(&self, coordinator: &str) -> Result<()> {
        for sql in RETIRE {
            self.query(sql, &[Arg::Text(coordinator)], None)
                .execute(self.db)
                .await?;
        }
        Ok(())
    }
}

/// A `u64` as the BIGINT both backends store it in (its bits).
fn stored(n: u64) -> i64 {
    n as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_is_the_database_function_or_the_next_parameter() {
        let renew = RENEW.sql(Clock::Database).0;
        assert!(
            renew.contains("expires_at_ms = stagecoach_now_ms() + $2")
                && renew.contains("expires_at_ms >= stagecoach_now_ms()"),
            "{renew}"
        );
        let claim = CLAIM.sql(Clock::Bound).0;
        assert!(claim.contains("c.expires_at_ms >= $5"), "{claim}");
        assert!(!claim.contains("{now}"));
    }
}
