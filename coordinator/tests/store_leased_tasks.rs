//! `Store::leased_tasks`, the dashboard's view of one migration's running
//! tasks: exactly the leased ones, with their worker and the progress of the
//! last heartbeat, in task order, bounded. On both backends.

use stagecoach_coordinator::domain::LeaseStatus;

mod support;

use support::contract::*;

on_both_backends!(leased_tasks_name_their_worker_and_progress);

async fn leased_tasks_name_their_worker_and_progress(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    // Three tasks in "a" leased, then one completed: two stay leased.
    let (c, a) = first_stage_claimed(s, 3).await;
    let id = c.migration_id;
    s.complete(W, &done(&a[0])).await.unwrap();
    let progress = LeaseStatus {
        lease: a[2].lease,
        secret: a[2].secret,
        done: 40,
        total: 100,
        checkpoint: None,
    };
    s.heartbeat(W, &[progress]).await.unwrap();

    let leased = s.leased_tasks(id, 10).await.unwrap();
    let seen: Vec<_> = leased
        .iter()
        .map(|t| {
            (
                t.lease,
                t.stage_index,
                t.kind.as_str(),
                t.worker_id.as_str(),
                t.done,
                t.total,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (a[1].lease, 0, "noop", W, 0, 0),
            (a[2].lease, 0, "noop", W, 40, 100),
        ]
    );
    assert!(leased.iter().all(|t| t.lease_expires_at_ms.is_some()));
    assert_eq!(s.leased_tasks(id, 1).await.unwrap().len(), 1, "bounded");
    // Another migration's tasks are not this one's.
    assert_eq!(s.leased_tasks(id + 1, 10).await.unwrap(), []);
}
