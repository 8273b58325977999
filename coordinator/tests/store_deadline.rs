//! Contract: past its deadline a migration moves no further (I10). Every
//! transition that moves a migration forward checks the deadline in its own
//! transaction, by the clock its events are written with: a create with a
//! deadline behind it is refused, nothing is admitted or leased after it,
//! a late report is rejected without recording anything, and the sweeper
//! fails the migration with reason "deadline exceeded".

use std::time::Duration;

use stagecoach_coordinator::clock::now_ms;
use stagecoach_coordinator::domain::{EventKind, MigrationFilter, MigrationState};
use stagecoach_coordinator::error::Error;

mod support;

use support::contract::*;

on_both_backends!(
    a_create_with_a_deadline_behind_it_is_refused,
    a_report_after_the_deadline_records_nothing,
    nothing_is_leased_or_admitted_after_the_deadline,
    a_migration_past_its_deadline_cannot_be_retried,
);

/// How far ahead the deadlines of these cases are: long enough for the
/// steps before it, short enough to wait out.
const AHEAD_MS: i64 = 400;

async fn past_the_deadline() {
    tokio::time::sleep(Duration::from_millis(AHEAD_MS as u64 + 100)).await;
}

async fn a_create_with_a_deadline_behind_it_is_refused(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let mut m = new(two_stage(), "s");
    m.deadline_ms = Some(now_ms() - 1_000);
    match s.create_migration(&m).await {
        Err(Error::InvalidArgument { field, message }) => {
            assert_eq!(field, "deadline");
            assert!(message.contains("passed"), "{message}");
        }
        other => panic!("wanted INVALID_ARGUMENT on deadline, got {other:?}"),
    }
    let all = s
        .list_migrations(&MigrationFilter::default())
        .await
        .unwrap();
    assert!(all.is_empty(), "nothing stored: {all:?}");

    // A repeated create with its idempotency key still finds its run, even
    // once the deadline has passed.
    m.deadline_ms = Some(now_ms() + AHEAD_MS);
    m.idempotency_key = Some("k".into());
    let (first, _) = s.create_migration(&m).await.unwrap();
    past_the_deadline().await;
    let (again, _) = s.create_migration(&m).await.unwrap();
    assert_eq!(again.migration_id, first.migration_id);
    assert!(!again.created);
}

async fn a_report_after_the_deadline_records_nothing(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let mut m = new(two_stage(), "s");
    m.deadline_ms = Some(now_ms() + AHEAD_MS);
    let (c, _) = s.create_migration(&m).await.unwrap();
    let a = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert_eq!(a.len(), 2);
    s.complete(W, &done(&a[0])).await.unwrap();
    past_the_deadline().await;

    // The last task of the stage reports late: as one report and as part
    // of a batch (the set-at-a-time path).
    use stagecoach_coordinator::store::Report;
    let late = s.complete(W, &done(&a[1])).await;
    let batch = [(W.to_string(), Report::Complete(done(&a[1])))];
    let late_in_batch = s.report_many(&batch).await.unwrap().remove(0);
    for result in [late.map(|_| ()), late_in_batch.map(|_| ())] {
        match result {
            Err(Error::LeaseNotHeld(why)) => assert!(why.contains("deadline"), "{why}"),
            other => panic!("wanted the late report rejected, got {other:?}"),
        }
    }
    let events = kinds_of(s, c.migration_id).await;
    let succeeded = events
        .iter()
        .filter(|k| **k == EventKind::TaskSucceeded)
        .count();
    assert_eq!(succeeded, 1, "only the report in time: {events:?}");
    assert!(!events.contains(&EventKind::StageSucceeded), "{events:?}");

    let (report, _) = s.sweep().await.unwrap();
    assert_eq!(report.deadlines_exceeded, 1);
    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(m.state, MigrationState::Failed);
    assert_eq!(m.reason, "deadline exceeded");
    assert_eq!(
        m.stages[1].state,
        stagecoach_coordinator::domain::StageState::Pending
    );
}

async fn nothing_is_leased_or_admitted_after_the_deadline(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    s.create_pool("one", 1).await.unwrap();
    let in_pool = |subject: &str, deadline_ms: Option<i64>| {
        let mut m = new(two_stage(), subject);
        m.pool = "one".into();
        m.deadline_ms = deadline_ms;
        m
    };
    let deadline = Some(now_ms() + AHEAD_MS);
    let (running, _) = s.create_migration(&in_pool("a", deadline)).await.unwrap();
    let (queued, _) = s.create_migration(&in_pool("b", deadline)).await.unwrap();
    let (after, _) = s.create_migration(&in_pool("c", None)).await.unwrap();
    past_the_deadline().await;

    // The running one's ready tasks are not leased.
    assert!(s.claim(W, &kinds(&["noop"]), 10).await.unwrap().is_empty());
    // Its slot, freed by a cancel, goes to the one without a deadline: the
    // late queued one is passed over.
    s.cancel_migration(running.migration_id, "").await.unwrap();
    let view = |id| async move { s.get_migration(id).await.unwrap().unwrap().state };
    assert_eq!(view(queued.migration_id).await, MigrationState::Queued);
    assert_eq!(view(after.migration_id).await, MigrationState::Running);
    let a = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert!(a.iter().all(|a| a.migration_id == after.migration_id));
    assert_eq!(a.len(), 2);

    s.sweep().await.unwrap();
    let late = s.get_migration(queued.migration_id).await.unwrap().unwrap();
    assert_eq!(late.state, MigrationState::Failed);
    assert_eq!(late.reason, "deadline exceeded");
    let events = kinds_of(s, queued.migration_id).await;
    assert!(
        !events.contains(&EventKind::MigrationAdmitted),
        "{events:?}"
    );
}

async fn a_migration_past_its_deadline_cannot_be_retried(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let mut m = new(two_stage(), "s");
    m.deadline_ms = Some(now_ms() + AHEAD_MS);
    let (c, _) = s.create_migration(&m).await.unwrap();
    s.cancel_migration(c.migration_id, "").await.unwrap();
    past_the_deadline().await;
    match s.retry_migration(c.migration_id).await {
        Err(Error::FailedPrecondition(why)) => assert!(why.contains("deadline"), "{why}"),
        other => panic!("wanted FAILED_PRECONDITION, got {other:?}"),
    }
    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(m.state, MigrationState::Canceled);
}
