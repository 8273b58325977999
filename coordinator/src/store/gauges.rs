//! What `/metrics` reads from the database at scrape time ([`Gauges`]),
//! with the SQL both backends run for it: the statements are the same in
//! both dialects, only the connection they run on differs.
//!
//! Read from the database, not counted in memory, so that every
//! coordinator on one PostgreSQL database reports the same numbers, and a
//! restarted one reports them at once. Each statement is answered from an
//! index the scheduler keeps anyway, and costs what the live work costs
//! (ready tasks, live leases) — except [`MIGRATIONS`], which counts every
//! migration ever created (a million: ~0.3 s on SQLite, ~0.4 s on
//! PostgreSQL, a parallel scan), and [`DEAD_TASKS`], which reads the failed
//! migrations. The caller caches a result for a second or longer, so a
//! storm of scrapes costs one read.

use std::collections::HashMap;

use crate::domain::{MigrationState, Pool};
use crate::error::Result;
use crate::store::common::corrupt;

/// The database's view of the whole system, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gauges {
    /// Every pool with its slots; `running` is the slots in use.
    pub pools: Vec<Pool>,
    /// Migrations by pool and state; pairs with none are left out.
    pub migrations: Vec<(String, MigrationState, u64)>,
    /// Ready tasks by kind, those waiting out a retry's backoff included;
    /// kinds with none are left out.
    pub ready_tasks: Vec<(String, u64)>,
    /// Tasks leased to a worker now.
    pub live_leases: u64,
    /// Dead tasks: attempts used up, or failed not retryable (state `failed`).
    pub dead_tasks: u64,
}

/// Pools by name. A few rows.
pub(crate) const POOLS: &str = "SELECT name, slots, paused FROM pools";

/// Migrations by pool and state: an index-only scan of
/// `migrations_admission (pool, state, queued_at, id)`, one entry per
/// migration ever created.
pub(crate) const MIGRATIONS: &str =
    "SELECT pool, state, count(*) FROM migrations GROUP BY pool, state";

/// Ready tasks by kind: the partial index `tasks_ready_kind (kind, ready_at,
/// id) WHERE state = 'ready'`, which holds only ready tasks.
pub(crate) const READY_TASKS: &str =
    "SELECT kind, count(*) FROM tasks WHERE state = 'ready' GROUP BY kind";

/// Live leases: a partial index of leased tasks only (`tasks_lease` on
/// PostgreSQL, `tasks_lease_worker` on SQLite).
pub(crate) const LIVE_LEASES: &str = "SELECT count(*) FROM tasks WHERE state = 'leased'";

/// Dead tasks. No index holds them alone, but a dead task fails its
/// migration (I7) and a retry makes it pending again, so they are all in
/// failed migrations: those are found pool by pool in `migrations_admission
/// (pool, state, …)`, and their failed tasks in `tasks_stage (migration_id,
/// …)`. On SQLite, where `tasks_stage` holds every task, counting in it
/// alone read the whole index (0.8 s for 5 million tasks; this: 2 ms).
pub(crate) const DEAD_TASKS: &str = "SELECT count(*) FROM pools p
     JOIN migrations m ON m.pool = p.name AND m.state = 'failed'
     JOIN tasks t ON t.migration_id = m.id AND t.state = 'failed'";

/// Runs the statements above on `$tx` (a transaction of either backend):
/// one text for both, as the row types are the same.
macro_rules! read_rows {
    ($tx:ident) => {
        $crate::store::gauges::Rows {
            pools: sqlx::query_as(gauges::POOLS).fetch_all(&mut *$tx).await?,
            migrations: sqlx::query_as(gauges::MIGRATIONS)
                .fetch_all(&mut *$tx)
                .await?,
            ready_tasks: sqlx::query_as(gauges::READY_TASKS)
                .fetch_all(&mut *$tx)
                .await?,
            live_leases: sqlx::query_scalar(gauges::LIVE_LEASES)
                .fetch_one(&mut *$tx)
                .await?,
            dead_tasks: sqlx::query_scalar(gauges::DEAD_TASKS)
                .fetch_one(&mut *$tx)
                .await?,
        }
    };
}
pub(crate) use read_rows;

/// The rows of the statements above, as each backend reads them.
pub(crate) struct Rows {
    pub pools: Vec<(String, i64, bool)>,
    pub migrations: Vec<(String, String, i64)>,
    pub ready_tasks: Vec<(String, i64)>,
    pub live_leases: i64,
    pub dead_tasks: i64,
}

impl Rows {
    /// The gauges these rows say; a state name this build does not know is
    /// an error, as in every other read.
    pub(crate) fn gauges(self) -> Result<Gauges> {
        let mut migrations = Vec::with_capacity(self.migrations.len());
        let mut usage: HashMap<&str, (u32, u32)> = HashMap::new();
        for (pool, state, n) in &self.migrations {
            let state =
                MigrationState::parse(state).ok_or_else(|| corrupt("migration state", state))?;
            let entry = usage.entry(pool).or_default();
            match state {
                MigrationState::Running => entry.0 = *n as u32,
                MigrationState::Queued => entry.1 = *n as u32,
                _ => {}
            }
            migrations.push((pool.clone(), state, *n as u64));
        }
        let mut pools: Vec<Pool> = self
            .pools
            .iter()
            .map(|(name, slots, paused)| {
                let (running, queued) = usage.get(name.as_str()).copied().unwrap_or_default();
                Pool {
                    name: name.clone(),
                    slots: *slots as u32,
                    running,
                    queued,
                    paused: *paused,
                }
            })
            .collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        migrations.sort_by(|a, b| (&a.0, a.1.as_str()).cmp(&(&b.0, b.1.as_str())));
        let mut ready_tasks: Vec<(String, u64)> = self
            .ready_tasks
            .into_iter()
            .map(|(kind, n)| (kind, n as u64))
            .collect();
        ready_tasks.sort();
        Ok(Gauges {
            pools,
            migrations,
            ready_tasks,
            live_leases: self.live_leases as u64,
            dead_tasks: self.dead_tasks as u64,
        })
    }
}
