//! Store contract cases of what `/metrics` reads and counts, on both
//! backends: `Store::gauges` follows a migration through ready, leased,
//! retried and dead tasks, and the committed `Effects` count the retries,
//! the deaths and each succeeded stage's duration.

use serde_json::json;
use stagecoach_coordinator::domain::{Assignment, Failure, MigrationState, Pool};
use stagecoach_coordinator::store::{Effects, Gauges, Report, Store};

mod support;

use support::contract::*;

fn default_pool(running: u32) -> Vec<Pool> {
    vec![Pool {
        name: "default".into(),
        slots: 10,
        running,
        queued: 0,
        paused: false,
    }]
}

/// Reports a retryable failure of `a`, held by `W`; its effects.
async fn fail(s: &dyn Store, a: &Assignment) -> Effects {
    let failure = Failure {
        lease: a.lease,
        secret: a.secret,
        error: "no".into(),
        retryable: true,
    };
    let (_, fx) = s.fail(W, &failure).await.unwrap();
    fx
}

async fn gauges_follow_tasks_from_ready_to_dead(b: Backend) {
    let db = store(b).await;
    let s = db.store.as_ref();
    assert_eq!(
        s.gauges().await.unwrap(),
        Gauges {
            pools: default_pool(0),
            ..Gauges::default()
        }
    );

    let p = plan(json!({"name": "p", "stages": [
        {"name": "a", "tasks": [{"kind": "noop"}, {"kind": "noop"}, {"kind": "other"}],
         "retry": {"max_attempts": 2, "initial_backoff_ms": 1, "max_backoff_ms": 1}}]}));
    let (c, _) = s.create_migration(&new(p, "s")).await.unwrap();
    let g = s.gauges().await.unwrap();
    assert_eq!(g.pools, default_pool(1));
    assert_eq!(
        g.migrations,
        vec![("default".to_string(), MigrationState::Running, 1)]
    );
    assert_eq!(
        g.ready_tasks,
        vec![("noop".to_string(), 2), ("other".to_string(), 1)]
    );
    assert_eq!((g.live_leases, g.dead_tasks), (0, 0));

    let held = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    let g = s.gauges().await.unwrap();
    assert_eq!(g.ready_tasks, vec![("other".to_string(), 1)]);
    assert_eq!(g.live_leases, 2);

    // The first failure retries; the second, after its backoff, kills the
    // task and fails the migration.
    let fx = fail(s, &held[0]).await;
    assert_eq!((fx.counted.retries, fx.counted.dead), (1, 0));
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let again = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert_eq!(again.len(), 1, "{again:?}");
    let fx = fail(s, &again[0]).await;
    assert_eq!((fx.counted.retries, fx.counted.dead), (0, 1));

    let g = s.gauges().await.unwrap();
    assert_eq!(g.pools, default_pool(0));
    assert_eq!(
        g.migrations,
        vec![("default".to_string(), MigrationState::Failed, 1)]
    );
    assert_eq!(
        (g.ready_tasks.len(), g.live_leases, g.dead_tasks),
        (0, 0, 1)
    );

    // A retry of the migration makes its dead task pending again.
    s.retry_migration(c.migration_id).await.unwrap();
    assert_eq!(s.gauges().await.unwrap().dead_tasks, 0);
}

async fn a_succeeded_stage_is_counted_with_its_duration(b: Backend) {
    let db = store(b).await;
    let s = db.store.as_ref();
    let (_, held) = first_stage_claimed(s, 2).await;
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let batch: Vec<(String, Report)> = held
        .iter()
        .map(|a| (W.to_string(), Report::Complete(done(a))))
        .collect();
    let results = s.report_many(&batch).await.unwrap();
    let stages: Vec<i64> = results
        .into_iter()
        .flat_map(|r| r.unwrap().1.counted.stages_ms)
        .collect();
    assert_eq!(stages.len(), 1, "stage a succeeded once: {stages:?}");
    assert!(
        stages[0] >= 30,
        "it ran at least the 30 ms waited: {stages:?}"
    );
}

on_both_backends!(
    gauges_follow_tasks_from_ready_to_dead,
    a_succeeded_stage_is_counted_with_its_duration,
);
