//! Contract: a lease handed back because its assignment could not be
//! delivered is a transition like the others — an event ends the attempt,
//! and the hand-back costs the task nothing, so its next assignment carries
//! the same attempt number, never more than `max_attempts`.

use serde_json::json;
use stagecoach_coordinator::domain::{EventKind, LeaseToken, MigrationState};

mod support;

use support::contract::*;

on_both_backends!(
    a_handed_back_lease_ends_its_attempt_without_counting_it,
    a_stale_hand_back_changes_nothing,
);

async fn a_handed_back_lease_ends_its_attempt_without_counting_it(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let p = plan(json!({"name": "p", "stages": [
        {"name": "a", "retry": {"max_attempts": 1}, "tasks": [{"kind": "noop"}]}]}));
    let (c, _) = s.create_migration(&new(p, "s")).await.unwrap();
    let first = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert_eq!(first[0].lease.attempt, 1);

    let fx = s.release(W, first[0].lease).await.unwrap();
    assert!(fx.dispatch, "a handed-back task is ready: dispatch again");
    assert!(
        fx.touched.contains(&c.migration_id),
        "watchers see the event"
    );
    assert!(s.live_leases(W).await.unwrap().is_empty());

    // Another worker gets the task with the attempt that never ran.
    let again = s.claim("w2", &kinds(&["noop"]), 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].lease, first[0].lease);
    assert!(again[0].lease.attempt <= again[0].max_attempts);

    let events = s.list_events(c.migration_id, 0, 1000).await.unwrap();
    let attempts: Vec<(EventKind, u32, &str)> = events
        .iter()
        .filter(|e| e.task_id == first[0].lease.task_id)
        .map(|e| (e.kind, e.attempt, e.worker_id.as_str()))
        .collect();
    assert_eq!(
        attempts,
        [
            (EventKind::TaskAssigned, 1, W),
            (EventKind::TaskHandedBack, 1, W),
            (EventKind::TaskAssigned, 1, "w2"),
        ]
    );
    let handed = events
        .iter()
        .find(|e| e.kind == EventKind::TaskHandedBack)
        .unwrap();
    assert_eq!(handed.stage_index, Some(0));
    assert!(handed.message.contains("did not count"), "{handed:?}");

    s.complete("w2", &done(&again[0])).await.unwrap();
    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(m.state, MigrationState::Succeeded);
}

/// A hand-back naming another worker, or an attempt that is not the live
/// one, changes nothing and writes nothing.
async fn a_stale_hand_back_changes_nothing(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let c = one_stage_of_noops(s, 1).await;
    let a = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    let before = s.list_events(c.migration_id, 0, 1000).await.unwrap().len();
    let stale = LeaseToken {
        attempt: a[0].lease.attempt + 1,
        ..a[0].lease
    };
    for (worker, lease) in [("w2", a[0].lease), (W, stale)] {
        let fx = s.release(worker, lease).await.unwrap();
        assert!(!fx.dispatch && fx.touched.is_empty(), "{fx:?}");
    }
    assert_eq!(s.live_leases(W).await.unwrap(), vec![a[0].lease]);
    let after = s.list_events(c.migration_id, 0, 1000).await.unwrap().len();
    assert_eq!(before, after);
}
