//! Store contract cases of the transitions that end a whole migration —
//! cancel, a dead task failing its migration, a deadline — on both backends.
//!
//! What users rely on: every unfinished task of the running stage ends
//! canceled exactly once, with its TaskCanceled event in task-id order, then
//! the stage's and the migration's end; the stage's counters add up (I5);
//! the workers holding leases are told to stop (I9) and nothing of the
//! migration is assigned again; the slot goes to the next migration (I3).
//! And a cancel of a migration of 100,000 tasks returns within a client's
//! 10 s deadline, and holds up another migration's create for well under
//! that one's 5 s.

use std::time::Duration;

use serde_json::json;
use stagecoach_coordinator::domain::{
    Assignment, Event, EventKind, Failure, LeaseStatus, LeaseToken, MigrationState, StageState,
};
use stagecoach_coordinator::store::Store;

mod support;

use support::contract::*;

/// Every event of a migration, paged as a client reads them.
async fn all_events(s: &dyn Store, id: i64) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::new();
    loop {
        let after = out.last().map_or(0, |e| e.id);
        let page = s.list_events(id, after, 10_000).await.unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

/// The task ids of the TaskCanceled events, in log order, after checking
/// that the log ends with them, then StageFailed for `stage`, then `last`
/// with `reason`.
fn canceled_then_end(
    events: &[Event],
    stage: u32,
    last: EventKind,
    reason: &str,
    why: &str,
) -> Vec<i64> {
    let n = events.len();
    assert!(n >= 2, "{events:?}");
    assert_eq!(events[n - 1].kind, last);
    assert_eq!(events[n - 1].message, reason);
    assert_eq!(events[n - 2].kind, EventKind::StageFailed);
    assert_eq!(events[n - 2].stage_index, Some(stage));
    let first_canceled = events
        .iter()
        .position(|e| e.kind == EventKind::TaskCanceled)
        .unwrap_or(n - 2);
    let canceled = &events[first_canceled..n - 2];
    for e in canceled {
        assert_eq!(e.kind, EventKind::TaskCanceled, "{e:?}");
        assert_eq!(e.stage_index, Some(stage), "{e:?}");
        assert_eq!(e.message, why, "{e:?}");
    }
    assert!(
        events.windows(2).all(|w| w[0].id < w[1].id),
        "event ids increase"
    );
    canceled.iter().map(|e| e.task_id).collect()
}

/// Stage counters add up for every finished stage (I5).
async fn counters_add_up(s: &dyn Store, id: i64) {
    let m = s.get_migration(id).await.unwrap().unwrap();
    for st in &m.stages {
        if st.state != StageState::Pending {
            assert_eq!(
                st.total,
                st.succeeded + st.failed + st.canceled,
                "I5 counters of stage {}: {st:?}",
                st.index
            );
        }
    }
}

/// A cancel in a stage whose tasks are in every unfinished state — leased,
/// ready again after a release, ready — and one done: each unfinished task
/// is canceled once, in task-id order, the held leases are revoked, the
/// later stage is left alone, and nothing is claimable.
async fn cancel_ends_each_unfinished_task_once_in_task_order(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let tasks: Vec<_> = (0..10)
        .map(|i| json!({"kind": "noop", "payload": {"i": i}}))
        .collect();
    let p = plan(json!({"name": "p", "stages": [
        {"name": "a", "tasks": tasks}, {"name": "b", "tasks": [{"kind": "noop"}]}]}));
    let (c, _) = s.create_migration(&new(p, "s")).await.unwrap();
    let a = s.claim(W, &kinds(&["noop"]), 4).await.unwrap();
    assert_eq!(a.len(), 4);
    s.complete(W, &done(&a[0])).await.unwrap();
    s.release(W, a[1].lease).await.unwrap();
    let task_ids: Vec<i64> = {
        let first = a[0].lease.task_id;
        (first..first + 10).collect()
    };

    let fx = s.cancel_migration(c.migration_id, "stop it").await.unwrap();
    let revoked: Vec<LeaseToken> = fx.revoked.iter().map(|r| r.lease).collect();
    assert_eq!(
        revoked,
        vec![a[2].lease, a[3].lease],
        "the held leases, in task order (I9)"
    );
    assert!(fx.revoked.iter().all(|r| r.worker_id == W));
    assert!(fx.touched.contains(&c.migration_id));

    let events = all_events(s, c.migration_id).await;
    let canceled = canceled_then_end(
        &events,
        0,
        EventKind::MigrationCanceled,
        "stop it",
        "migration canceled",
    );
    assert_eq!(
        canceled,
        task_ids[1..].to_vec(),
        "every unfinished task once, in task-id order"
    );

    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(m.state, MigrationState::Canceled);
    assert_eq!(m.stages[0].state, StageState::Canceled);
    assert_eq!(
        (m.stages[0].succeeded, m.stages[0].canceled),
        (1, 9),
        "{:?}",
        m.stages[0]
    );
    assert_eq!(m.stages[1].state, StageState::Pending);
    assert_eq!(m.stages[1].canceled, 0);
    counters_add_up(s, c.migration_id).await;

    assert!(s.claim(W, &kinds(&["noop"]), 10).await.unwrap().is_empty());
    let status = |a: &Assignment| LeaseStatus {
        lease: a.lease,
        secret: a.secret,
        done: 0,
        total: 1,
        checkpoint: None,
    };
    let hb = s
        .heartbeat(W, &[status(&a[2]), status(&a[3])])
        .await
        .unwrap();
    assert_eq!(hb.cancel.len(), 2, "the holders are told to stop (I9)");
}

/// A task that dies fails its migration: the rest of its stage is canceled
/// with "migration failed", the counters add up, and the queued migration
/// of the pool takes the slot (I3).
async fn a_dead_task_fails_the_migration_and_cancels_the_rest(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    s.set_pool_slots("default", 1).await.unwrap();
    let x = one_stage_of_noops(s, 5).await;
    let y = s
        .create_migration(&new(two_stage(), "other"))
        .await
        .unwrap()
        .0;
    let a = s.claim(W, &kinds(&["noop"]), 2).await.unwrap();
    assert!(a.iter().all(|a| a.migration_id == x.migration_id));
    let (_, fx) = s
        .fail(
            W,
            &Failure {
                lease: a[0].lease,
                secret: a[0].secret,
                error: "boom".into(),
                retryable: false,
            },
        )
        .await
        .unwrap();
    let revoked: Vec<LeaseToken> = fx.revoked.iter().map(|r| r.lease).collect();
    assert_eq!(revoked, vec![a[1].lease]);

    let first = a[0].lease.task_id;
    let events = all_events(s, x.migration_id).await;
    let canceled = canceled_then_end(
        &events,
        0,
        EventKind::MigrationFailed,
        &format!("task {first} (noop) failed: boom"),
        "migration failed",
    );
    assert_eq!(canceled, (first + 1..first + 5).collect::<Vec<_>>());
    let m = s.get_migration(x.migration_id).await.unwrap().unwrap();
    assert_eq!(m.state, MigrationState::Failed);
    assert_eq!((m.stages[0].failed, m.stages[0].canceled), (1, 4));
    counters_add_up(s, x.migration_id).await;

    let next = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert!(!next.is_empty(), "the freed slot admitted the queued one");
    assert!(next.iter().all(|a| a.migration_id == y.migration_id));
}

/// The sweeper fails a migration past its deadline the same way (its
/// leases were taken before the deadline).
async fn a_deadline_cancels_the_running_stage(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let tasks = vec![json!({"kind": "noop"}); 6];
    let p = plan(json!({"name": "p", "stages": [{"name": "a", "tasks": tasks}]}));
    let mut m = new(p, "s");
    m.deadline_ms = Some(stagecoach_coordinator::clock::now_ms() + 300);
    let (c, _) = s.create_migration(&m).await.unwrap();
    let a = s.claim(W, &kinds(&["noop"]), 3).await.unwrap();
    s.complete(W, &done(&a[0])).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let (report, fx) = s.sweep().await.unwrap();
    assert_eq!(report.deadlines_exceeded, 1);
    let mut revoked: Vec<LeaseToken> = fx.revoked.iter().map(|r| r.lease).collect();
    revoked.sort_by_key(|l| l.task_id);
    assert_eq!(revoked, vec![a[1].lease, a[2].lease]);
    let events = all_events(s, c.migration_id).await;
    let canceled = canceled_then_end(
        &events,
        0,
        EventKind::MigrationFailed,
        "deadline exceeded",
        "migration failed",
    );
    let first = a[0].lease.task_id;
    assert_eq!(canceled, (first + 1..first + 6).collect::<Vec<_>>());
    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!((m.stages[0].succeeded, m.stages[0].canceled), (1, 5));
    counters_add_up(s, c.migration_id).await;
    assert!(s.claim(W, &kinds(&["noop"]), 10).await.unwrap().is_empty());
}

/// Tasks in the big migration.
const BIG: usize = 100_000;
/// Of them, leased when the cancel comes.
const BIG_LEASED: usize = 1_000;

/// A client gives a cancel of a 100,000-task migration 10 s, and another
/// client creates a migration while it runs, giving that 5 s: both are
/// answered in time, every task is canceled once, every lease revoked, and
/// the other migration's tasks are claimed.
async fn a_big_cancel_returns_within_a_clients_deadline(b: Backend) {
    let db = store(b).await;
    let s = db.store.clone();
    let big = one_stage_of_noops(&*s, BIG).await;
    let leased = s
        .claim(W, &kinds(&["noop"]), BIG_LEASED as u32)
        .await
        .unwrap();
    assert_eq!(leased.len(), BIG_LEASED);

    let canceling = {
        let s = s.clone();
        tokio::spawn(async move {
            tokio::time::timeout(
                Duration::from_secs(10),
                s.cancel_migration(big.migration_id, ""),
            )
            .await
        })
    };
    // Another migration beside it, of another kind, created and claimed
    // while the cancel runs, by a client that gives its create 5 s: on
    // SQLite's one writer it waits for the cancel's transaction, which must
    // be short.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let other_plan = plan(json!({"name": "q", "stages": [
        {"name": "a", "tasks": [{"kind": "other"}, {"kind": "other"}]}]}));
    let (other, _) = tokio::time::timeout(
        Duration::from_secs(5),
        s.create_migration(&new(other_plan, "x")),
    )
    .await
    .expect("another migration's create is answered within its client's 5 s deadline")
    .unwrap();
    let got = s.claim("w2", &kinds(&["other"]), 10).await.unwrap();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|a| a.migration_id == other.migration_id));

    let fx = canceling
        .await
        .unwrap()
        .expect("the cancel returned within the client's 10 s deadline")
        .unwrap();
    let mut revoked: Vec<i64> = fx.revoked.iter().map(|r| r.lease.task_id).collect();
    revoked.sort_unstable();
    let mut held: Vec<i64> = leased.iter().map(|a| a.lease.task_id).collect();
    held.sort_unstable();
    assert_eq!(revoked, held, "every lease revoked once (I9)");

    let m = s.get_migration(big.migration_id).await.unwrap().unwrap();
    assert_eq!(m.state, MigrationState::Canceled);
    assert_eq!(m.stages[0].canceled as usize, BIG);
    counters_add_up(&*s, big.migration_id).await;
    let events = all_events(&*s, big.migration_id).await;
    let canceled = canceled_then_end(
        &events,
        0,
        EventKind::MigrationCanceled,
        "canceled by client",
        "migration canceled",
    );
    assert_eq!(canceled.len(), BIG);
    assert!(
        canceled.windows(2).all(|w| w[0] < w[1]),
        "each task once, in task-id order"
    );
    assert!(s.claim(W, &kinds(&["noop"]), 100).await.unwrap().is_empty());
}

on_both_backends!(
    cancel_ends_each_unfinished_task_once_in_task_order,
    a_dead_task_fails_the_migration_and_cancels_the_rest,
    a_deadline_cancels_the_running_stage,
    a_big_cancel_returns_within_a_clients_deadline,
);
