//! The coordinator killed with `kill -9` mid-stage and restarted on the same
//! database and address, twice in one migration (during stage 0, then
//! during stage 1) (I2, I6, I11):
//!
//! - the worker processes reconnect by themselves (ListWorkers shows them
//!   again after each restart);
//! - the migration succeeds, every task succeeded exactly once and every
//!   stage started exactly once, whatever work the crashes cost (tasks whose
//!   leases ran out during the outage run again), and the checker passes.
//!
//! Each kill lands while the stage is provably unfinished: the stage's
//! STAGE_SUCCEEDED comes after the last event read before the kill.

use std::time::Duration;

use serde_json::json;
use stagecoach_proto::v1::{EventKind, MigrationState};
use stagecoach_tests::plans::{StageExt, create_inline, plan, retry, stage, task};
use stagecoach_tests::{Backend, Cluster, check_worker_slots, of_kind, on_both_backends};

on_both_backends!(the_coordinator_killed_mid_stage_twice_loses_nothing);

const WAIT: Duration = Duration::from_secs(120);

async fn the_coordinator_killed_mid_stage_twice_loses_nothing(backend: Backend) {
    let mut cluster = Cluster::start_fast(backend, &[], 2, 2).await;
    let sleeps = || vec![task("sleep", json!({"ms": 3_000})); 4];
    // Generous attempts: each outage may cost a running attempt.
    let policy = retry(10, 100, 1_000, 0);
    let p = plan(
        "crashy",
        vec![
            stage("a", sleeps()).with_retry(policy),
            stage("b", sleeps()).with_retry(policy),
            stage("c", sleeps()).with_retry(policy),
        ],
    );
    let id = cluster
        .client()
        .await
        .create(create_inline(p, "crashy/1"))
        .await
        .unwrap()
        .id;

    let mut kills = 0;
    let mut last_before_kill = Vec::new();
    for k in 0..2u32 {
        let client = cluster.client().await;
        client
            .wait_for_event(id, &format!("a task of stage {k} assigned"), WAIT, |e| {
                e.kind() == EventKind::TaskAssigned && e.stage_index == Some(k)
            })
            .await;
        let seen = client.events(id).await.unwrap();
        assert!(
            !seen
                .iter()
                .any(|e| e.kind() == EventKind::StageSucceeded && e.stage_index == Some(k)),
            "stage {k} finished before the kill"
        );
        last_before_kill.push(seen.last().unwrap().id);
        cluster.coordinator.kill9().await;
        kills += 1;
        cluster.coordinator.restart().await;
        cluster
            .client()
            .await
            .wait_for_workers(&["w1", "w2"], WAIT)
            .await;
    }

    let client = cluster.client().await;
    let (m, events) = client.finish_and_check(id, WAIT).await;
    assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);
    for (k, last) in last_before_kill.iter().enumerate() {
        let done = events
            .iter()
            .find(|e| e.kind() == EventKind::StageSucceeded && e.stage_index == Some(k as u32))
            .expect("stage succeeded");
        assert!(
            done.id > *last,
            "stage {k} was unfinished at kill {}",
            k + 1
        );
    }
    assert_eq!(of_kind(&events, EventKind::StageStarted).len(), 3);
    assert_eq!(of_kind(&events, EventKind::TaskSucceeded).len(), 12);
    assert!(m.stages.iter().all(|s| s.total == 4 && s.succeeded == 4));
    check_worker_slots(&events, |_| 2).unwrap_or_else(|e| panic!("{e:?}"));
    eprintln!(
        "kills: {kills}; cost of the outages: {} lease expiries, {} retries",
        of_kind(&events, EventKind::TaskLeaseExpired).len(),
        of_kind(&events, EventKind::TaskRetrying).len(),
    );
    assert_eq!(kills, 2);
}
