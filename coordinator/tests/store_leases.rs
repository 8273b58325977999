//! Lease expiry and reassignment: the cap of `--max-reassignments`, and the
//! preference of a reassigned task for another worker than the one it was
//! lost on. On both backends (`sqlite::…`, `postgres::…`); the expiry
//! reaching another coordinator sharing the PostgreSQL database is in
//! `shared_database`.

use std::time::Duration;

use serde_json::json;
use stagecoach_coordinator::domain::{EventKind, MigrationState};
use stagecoach_coordinator::store::{ClaimRequest, Limits, Store};

mod support;

use support::contract::*;

/// Leases of 1 ms, so a short sleep expires them; `max_reassignments` as given.
fn short_leases(max_reassignments: u32) -> Limits {
    Limits {
        lease_ms: 1,
        heartbeat_interval_ms: 1,
        max_reassignments,
    }
}

/// A migration of one no-op task, created.
async fn one_task(s: &dyn Store) -> i64 {
    let p = plan(json!({"name": "p", "stages": [{"name": "a", "tasks": [{"kind": "noop"}]}]}));
    s.create_migration(&new(p, "s"))
        .await
        .unwrap()
        .0
        .migration_id
}

/// Lets every live lease expire and sweeps once.
async fn expire(s: &dyn Store) -> stagecoach_coordinator::domain::SweepReport {
    tokio::time::sleep(Duration::from_millis(5)).await;
    s.sweep().await.unwrap().0
}

fn request(worker: &str) -> ClaimRequest {
    ClaimRequest {
        worker_id: worker.into(),
        kinds: kinds(&["noop"]),
        slots: 1,
    }
}

/// `--max-reassignments 2`: the task survives two expiries, so it is
/// assigned three times, and dies at the third expiry, saying so.
async fn a_task_survives_as_many_expiries_as_the_cap_says(b: Backend) {
    let db = store_with(b, short_leases(2)).await;
    let s = &*db.store;
    let id = one_task(s).await;
    for attempt in 1..=3 {
        let a = s.claim(W, &kinds(&["noop"]), 1).await.unwrap();
        assert_eq!(a.len(), 1, "assignment {attempt} of 3");
        assert_eq!(a[0].lease.attempt, attempt);
        let report = expire(s).await;
        assert_eq!(report.leases_expired, 1);
        assert_eq!(
            report.tasks_dead,
            u32::from(attempt == 3),
            "expiry {attempt}"
        );
    }
    let m = s.get_migration(id).await.unwrap().unwrap();
    assert_eq!(m.state, MigrationState::Failed);
    assert!(
        m.reason.contains("(noop) lost its worker 3 times"),
        "{}",
        m.reason
    );
    assert!(m.reason.contains("2 reassignments"), "{}", m.reason);
    let events = s.list_events(id, 0, 1_000).await.unwrap();
    let expired: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::TaskLeaseExpired)
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(expired.len(), 3);
    assert!(expired[0].contains("reassigned"), "{expired:?}");
    assert!(expired[2].contains("dead"), "{expired:?}");
}

/// `--max-reassignments 0`: never reassigned; the first expiry kills the
/// task, and the reason says it lost its worker once.
async fn a_cap_of_zero_kills_at_the_first_expiry(b: Backend) {
    let db = store_with(b, short_leases(0)).await;
    let s = &*db.store;
    let id = one_task(s).await;
    s.claim(W, &kinds(&["noop"]), 1).await.unwrap();
    assert_eq!(expire(s).await.tasks_dead, 1);
    let m = s.get_migration(id).await.unwrap().unwrap();
    assert_eq!(m.state, MigrationState::Failed);
    assert!(m.reason.contains("lost its worker 1 time "), "{}", m.reason);
}

/// A task whose lease expired on `W` goes to another worker of the same
/// pass even when `W` asks first; only when `W` is the one asking does it
/// get the task back. The sweep names `W` in its effects, so the
/// coordinator holding `W`'s stream can hold back new work from it.
async fn a_reassigned_task_prefers_another_worker(b: Backend) {
    let db = store_with(b, short_leases(5)).await;
    let s = &*db.store;
    one_task(s).await;
    s.claim(W, &kinds(&["noop"]), 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (report, fx) = s.sweep().await.unwrap();
    assert_eq!(report.leases_expired, 1);
    assert!(fx.lost.contains(W), "{fx:?}");

    let pass = s.claim_many(&[request(W), request("w2")]).await.unwrap();
    assert_eq!(
        pass.claimed.iter().map(Vec::len).collect::<Vec<_>>(),
        [0, 1],
        "the task it lost went to w2"
    );
    assert_eq!(pass.claimed[1][0].lease.attempt, 2);

    // Lost on w2 in turn: with only w2 asking, w2 gets it back rather
    // than nobody.
    expire(s).await;
    let pass = s.claim_many(&[request("w2")]).await.unwrap();
    assert_eq!(pass.claimed[0].len(), 1, "no other worker: the same one");
}

/// The preference holds for many tasks in one pass: each of `W`'s lost
/// tasks goes to w2 while w2 has slots, and the rest back to `W`.
async fn a_pass_deals_lost_tasks_to_other_workers_first(b: Backend) {
    let db = store_with(b, short_leases(5)).await;
    let s = &*db.store;
    one_stage_of_noops(s, 3).await;
    assert_eq!(s.claim(W, &kinds(&["noop"]), 3).await.unwrap().len(), 3);
    assert_eq!(expire(s).await.leases_expired, 3);
    let mut mine = request(W);
    mine.slots = 3;
    let mut other = request("w2");
    other.slots = 2;
    let pass = s.claim_many(&[mine, other]).await.unwrap();
    assert_eq!(
        pass.claimed.iter().map(Vec::len).collect::<Vec<_>>(),
        [1, 2],
        "w2 takes what it can, W the rest"
    );
}

on_both_backends!(
    a_task_survives_as_many_expiries_as_the_cap_says,
    a_cap_of_zero_kills_at_the_first_expiry,
    a_reassigned_task_prefers_another_worker,
    a_pass_deals_lost_tasks_to_other_workers_first,
);

/// Two coordinators on one PostgreSQL database.
mod shared_database {
    use std::time::Duration;

    use stagecoach_coordinator::store::{PostgresStore, Store};

    use super::{W, kinds, one_task, short_leases, support};

    /// A lease of a worker streaming from coordinator A expires in B's
    /// sweep: A hears which worker lost it, so it can hold back new work
    /// from it until its next heartbeat.
    #[tokio::test]
    async fn an_expiry_swept_by_one_coordinator_names_its_worker_to_the_other() {
        let url = support::postgres::fresh_database();
        let a = PostgresStore::open(&url, short_leases(5)).await.unwrap();
        let b = PostgresStore::open(&url, short_leases(5)).await.unwrap();
        a.ensure_pool("default", 10).await.unwrap();
        let mut from_b = a.remote_effects().await.unwrap().unwrap();
        one_task(&a).await;
        a.claim(W, &kinds(&["noop"]), 1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (report, fx) = b.sweep().await.unwrap();
        assert_eq!(report.leases_expired, 1);
        assert!(fx.lost.contains(W));
        let wait = async {
            loop {
                let fx = from_b.recv().await.expect("the listener ended");
                if !fx.lost.is_empty() {
                    return fx;
                }
            }
        };
        let heard = tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the expiry's worker never reached the other coordinator");
        assert_eq!(heard.lost.iter().collect::<Vec<_>>(), [W]);
    }
}
