//! `GET /metrics`: the Prometheus text format (version 0.0.4), behind the
//! token check of the HTTP port (a viewer or admin token when auth is on).
//!
//! Three sources, each for a reason:
//!
//! **Read from the database at scrape time** (`Store::gauges`, cached for
//! [`CACHE_FOR`], or ten times as long as the read took, so a storm of
//! scrapes costs one read): what the database
//! knows for every coordinator, so all coordinators on one PostgreSQL
//! report the same numbers (take `max` or any one of them in PromQL, not
//! `sum`), and a restarted one at once.
//!
//! | family | type | labels |
//! |---|---|---|
//! | `stagecoach_migrations` | gauge | `pool`, `state` (all five states of every pool, zeros included; `state="queued"` is the queue) |
//! | `stagecoach_pool_slots` | gauge | `pool`: its capacity |
//! | `stagecoach_pool_slots_used` | gauge | `pool`: its running migrations |
//! | `stagecoach_pool_paused` | gauge | `pool`: 1 when admission is paused |
//! | `stagecoach_tasks_ready` | gauge | `kind` (retries waiting out their backoff included) |
//! | `stagecoach_leases_live` | gauge | — |
//! | `stagecoach_tasks_dead` | gauge | — tasks in state `failed` (until their migration is retried) |
//! | `stagecoach_database_read_success` | gauge | — 1 when the read above worked; 0 and none of the above when it failed |
//! | `stagecoach_database_read_duration_seconds` | gauge | — how long that read took |
//!
//! **Read from this process's worker registry at scrape time**: workers
//! stream from one coordinator each, so these are per process (`sum` them).
//!
//! | family | type | labels |
//! |---|---|---|
//! | `stagecoach_workers_connected` | gauge | — workers with an open stream here |
//! | `stagecoach_workers_ineligible` | gauge | — of those, getting no new work (draining, silent, lost a lease) |
//! | `stagecoach_worker_slots` | gauge | — the slots the connected workers offer |
//!
//! **Counted in this process** (`crate::metrics`): events this coordinator
//! committed or served; each is counted once, by the coordinator that saw
//! it, so `sum` them over instances.
//!
//! | family | type | labels |
//! |---|---|---|
//! | `stagecoach_lease_expiries_total` | counter | — |
//! | `stagecoach_attempt_timeouts_total` | counter | — |
//! | `stagecoach_deadlines_exceeded_total` | counter | — |
//! | `stagecoach_task_retries_total` | counter | — |
//! | `stagecoach_tasks_died_total` | counter | — |
//! | `stagecoach_reports_total` | counter | `report` (complete, fail), `outcome` (recorded, duplicate, stale, invalid, not_recorded) |
//! | `stagecoach_task_duration_seconds` | histogram | `outcome` (succeeded, failed) |
//! | `stagecoach_stage_duration_seconds` | histogram | — stages that succeeded |
//! | `stagecoach_rpc_duration_seconds` | histogram | `service`, `method`, `code` |
//! | `stagecoach_report_commit_duration_seconds` | histogram | — one group commit |
//! | `stagecoach_report_commit_batch_size` | histogram | — reports per group commit |

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, Gauge, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::sync::Mutex;

use super::HttpState;
use crate::domain::MigrationState;
use crate::engine::Coordinator;
use crate::store::Gauges;

/// How long one database read answers scrapes, at least.
pub const CACHE_FOR: Duration = Duration::from_secs(1);

/// A read answers scrapes for this many times as long as it took, when
/// that is longer than [`CACHE_FOR`]: on a database whose history makes
/// the read slow (counting a million migrations takes ~0.4 s), scrapes
/// keep it under a tenth of the time, however often they come.
const CACHE_PER_READ: u32 = 10;

/// Every migration state, for a series per pool and state even at zero.
const STATES: [MigrationState; 5] = [
    MigrationState::Queued,
    MigrationState::Running,
    MigrationState::Succeeded,
    MigrationState::Failed,
    MigrationState::Canceled,
];

/// The `/metrics` route, for the guarded part of the router.
pub fn routes() -> Router<HttpState> {
    let cache = Arc::new(Cache::default());
    Router::new().route(
        "/metrics",
        get(move |State(state): State<HttpState>| scrape(state, cache.clone())),
    )
}

/// The last database read: when it was taken and its families.
#[derive(Default)]
struct Cache {
    /// A tokio mutex, held across the read: concurrent scrapes wait for
    /// the one read instead of each starting their own. With the read:
    /// until when it answers.
    last: Mutex<Option<(Instant, Arc<Vec<MetricFamily>>)>>,
}

impl Cache {
    async fn database(&self, core: &Coordinator) -> Arc<Vec<MetricFamily>> {
        let mut last = self.last.lock().await;
        if let Some((until, families)) = last.as_ref()
            && Instant::now() < *until
        {
            return families.clone();
        }
        let started = Instant::now();
        let read = core.store().gauges().await;
        let took = started.elapsed();
        let families = Arc::new(database_families(read, took));
        let until = Instant::now() + CACHE_FOR.max(took * CACHE_PER_READ);
        *last = Some((until, families.clone()));
        families
    }
}

async fn scrape(state: HttpState, cache: Arc<Cache>) -> Response {
    let mut families = state.core.metrics().gather();
    families.extend(worker_families(&state.core));
    families.extend(cache.database(&state.core).await.iter().cloned());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut body = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut body) {
        tracing::error!(error = %e, "encoding /metrics failed");
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the metrics failed: {e}\n"),
        )
            .into_response();
    }
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response()
}

/// A registry for families made at scrape time.
struct Families(Registry);

impl Families {
    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        let g = IntGauge::new(name, help).expect("a valid gauge");
        self.0.register(Box::new(g.clone())).expect("a new name");
        g
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid gauge");
        self.0.register(Box::new(g.clone())).expect("a new name");
        g
    }
}

/// The families of one database read (module doc); on failure only the
/// two that say it failed and how long it took.
fn database_families(read: crate::error::Result<Gauges>, took: Duration) -> Vec<MetricFamily> {
    let f = Families(Registry::new());
    let success = f.gauge(
        "stagecoach_database_read_success",
        "1 when this scrape's read of the database's gauges worked, else 0 (and the database's families are missing)",
    );
    let duration = Gauge::new(
        "stagecoach_database_read_duration_seconds",
        "How long the read of the database's gauges took",
    )
    .expect("a valid gauge");
    f.0.register(Box::new(duration.clone()))
        .expect("a new name");
    duration.set(took.as_secs_f64());
    let g = match read {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(error = %e, "/metrics: reading the database's gauges failed");
            return f.0.gather();
        }
    };
    success.set(1);
    let migrations = f.gauge_vec(
        "stagecoach_migrations",
        "Migrations by pool and state, from the database (the same on every coordinator)",
        &["pool", "state"],
    );
    let slots = f.gauge_vec(
        "stagecoach_pool_slots",
        "Migrations a pool runs at once",
        &["pool"],
    );
    let used = f.gauge_vec(
        "stagecoach_pool_slots_used",
        "A pool's slots in use: its running migrations",
        &["pool"],
    );
    let paused = f.gauge_vec(
        "stagecoach_pool_paused",
        "1 when the pool's admission is paused",
        &["pool"],
    );
    for pool in &g.pools {
        for state in STATES {
            migrations.with_label_values(&[pool.name.as_str(), state.as_str()]);
        }
        slots
            .with_label_values(&[&pool.name])
            .set(pool.slots.into());
        used.with_label_values(&[&pool.name])
            .set(pool.running.into());
        paused
            .with_label_values(&[&pool.name])
            .set(pool.paused.into());
    }
    for (pool, state, n) in &g.migrations {
        migrations
            .with_label_values(&[pool.as_str(), state.as_str()])
            .set(*n as i64);
    }
    let ready = f.gauge_vec(
        "stagecoach_tasks_ready",
        "Tasks ready to be claimed (or waiting out a retry's backoff), by kind",
        &["kind"],
    );
    for (kind, n) in &g.ready_tasks {
        ready.with_label_values(&[kind]).set(*n as i64);
    }
    f.gauge(
        "stagecoach_leases_live",
        "Tasks leased to a worker now, over every coordinator",
    )
    .set(g.live_leases as i64);
    f.gauge(
        "stagecoach_tasks_dead",
        "Dead tasks in the database (state failed), until their migration is retried",
    )
    .set(g.dead_tasks as i64);
    f.0.gather()
}

/// The families of this process's worker registry.
fn worker_families(core: &Coordinator) -> Vec<MetricFamily> {
    let workers = core.workers().list();
    let f = Families(Registry::new());
    f.gauge(
        "stagecoach_workers_connected",
        "Workers with an open stream to this coordinator",
    )
    .set(workers.len() as i64);
    f.gauge(
        "stagecoach_workers_ineligible",
        "Connected workers getting no new work now (draining, silent, lost a lease)",
    )
    .set(workers.iter().filter(|w| w.ineligible.is_some()).count() as i64);
    f.gauge(
        "stagecoach_worker_slots",
        "Slots the workers connected to this coordinator offer",
    )
    .set(workers.iter().map(|w| i64::from(w.spec.slots)).sum());
    f.0.gather()
}
