//! Cancel mid-stage and retry after a failure (I9, I2, I8):
//!
//! - CancelMigration while four long `sleep` tasks run on two workers: the
//!   answer says CANCELED; every running handler sees the cancellation (each
//!   writes its cancel marker, long before its sleep would end) and the
//!   workers log that the coordinator canceled each of the four (by a
//!   notice on the stream or a heartbeat's answer); nothing is assigned after
//!   MIGRATION_CANCELED; the freed slot goes at once to the migration queued
//!   behind it in the same one-slot pool (its MIGRATION_ADMITTED is the very
//!   next event in the coordinator's log), and once that one finishes the
//!   pool shows nothing running or queued and no worker holds a lease;
//! - RetryMigration of a → b → c that failed in b, after the cause was
//!   fixed: stage a does not run again, b and c do, the migration succeeds,
//!   and GetSubjectStatus goes FAILED → QUEUED → RUNNING → FINISHED.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;
use stagecoach_proto::v1::{
    CreateMigrationRequest, CreatePoolRequest, Event, EventKind, MigrationState, PausePoolRequest,
    ResumePoolRequest, SubjectStatus,
};
use stagecoach_tests::plans::{create_inline, plan, stage, task};
use stagecoach_tests::{
    Backend, Client, Cluster, describe_event, of_kind, on_both_backends, wait_for,
};

on_both_backends!(
    cancel_stops_running_tasks_and_frees_the_slot,
    retry_resumes_at_the_failed_stage
);

const WAIT: Duration = Duration::from_secs(90);

async fn create_pool(client: &Client, name: &str, slots: u32) {
    client
        .admin
        .clone()
        .create_pool(CreatePoolRequest {
            name: name.into(),
            slots,
        })
        .await
        .expect("CreatePool");
}

async fn cancel_stops_running_tasks_and_frees_the_slot(backend: Backend) {
    let cluster = Cluster::start_fast(backend, &[], 2, 2).await;
    let client = cluster.client().await;
    create_pool(&client, "one", 1).await;
    let markers: Vec<_> = (0..4)
        .map(|i| cluster.dir().join(format!("canceled-{i}")))
        .collect();
    let long = markers
        .iter()
        .map(|m| task("sleep", json!({"ms": 60_000, "cancel_marker": m})))
        .collect();
    let a = client
        .create(CreateMigrationRequest {
            pool: "one".into(),
            ..create_inline(plan("long", vec![stage("s", long)]), "cancel/a")
        })
        .await
        .unwrap();
    let b = client
        .create(CreateMigrationRequest {
            pool: "one".into(),
            ..create_inline(
                plan("short", vec![stage("s", vec![task("noop", json!({}))])]),
                "cancel/b",
            )
        })
        .await
        .unwrap();
    assert_eq!(b.state(), MigrationState::Queued, "one slot, taken by a");
    wait_for("a's four tasks running", WAIT, async || {
        let m = client.get_migration(a.id).await.ok()?;
        (m.stages[0].running == 4).then_some(())
    })
    .await;

    let canceled = client.cancel(a.id, "operator says stop").await.unwrap();
    assert_eq!(canceled.state(), MigrationState::Canceled);
    assert_eq!(canceled.reason, "operator says stop");

    // Every handler saw the cancellation, long before its 60 s sleep ended.
    wait_for("every cancel marker", Duration::from_secs(20), async || {
        markers.iter().all(|m| m.exists()).then_some(())
    })
    .await;
    // Told on the stream, or by a heartbeat's answer that raced ahead.
    let told = || -> BTreeSet<(i64, u32)> {
        let workers = cluster.workers.iter();
        workers.flat_map(|w| w.canceled_leases()).collect()
    };
    wait_for("the workers to be told of 4 cancels", WAIT, async || {
        (told().len() >= 4).then_some(())
    })
    .await;
    assert_eq!(told().len(), 4, "each running task, once: {:?}", told());

    let (_, a_events) = client.check(a.id).await;
    let end = a_events
        .iter()
        .position(|e| e.kind() == EventKind::MigrationCanceled)
        .expect("MIGRATION_CANCELED");
    let assigned_after: Vec<String> = a_events[end..]
        .iter()
        .filter(|e| e.kind() == EventKind::TaskAssigned)
        .map(describe_event)
        .collect();
    assert!(assigned_after.is_empty(), "{assigned_after:?}");
    assert_eq!(of_kind(&a_events, EventKind::TaskCanceled).len(), 4);

    // The slot went to b in the same transaction.
    let all = client.all_events().await.unwrap();
    let i = all
        .iter()
        .position(|e| e.id == a_events[end].id)
        .expect("in the merged log");
    let next = &all[i + 1];
    assert_eq!(
        (next.kind(), next.migration_id),
        (EventKind::MigrationAdmitted, b.id),
        "next event after the cancel: {}",
        describe_event(next)
    );
    let (b_done, _) = client.finish_and_check(b.id, WAIT).await;
    assert_eq!(
        b_done.state(),
        MigrationState::Succeeded,
        "{}",
        b_done.reason
    );
    let pool = client.pool("one").await.unwrap();
    assert_eq!((pool.running, pool.queued), (0, 0), "{pool:?}");
    wait_for("no leases left on any worker", WAIT, async || {
        let workers = client.list_workers().await.ok()?;
        workers.iter().all(|w| w.leases.is_empty()).then_some(())
    })
    .await;
}

async fn retry_resumes_at_the_failed_stage(backend: Backend) {
    let cluster = Cluster::start_fast(backend, &[], 2, 2).await;
    let client = cluster.client().await;
    create_pool(&client, "retry", 1).await;
    let fixed = cluster.dir().join("input-ready");
    let subject = "project/retry";
    let p = plan(
        "abc",
        vec![
            stage("a", vec![task("noop", json!({}))]),
            stage(
                "b",
                vec![task(
                    "fail",
                    json!({"message": "input missing", "retryable": false, "unless_file": fixed}),
                )],
            ),
            stage("c", vec![task("sleep", json!({"ms": 2_000}))]),
        ],
    );
    let m = client
        .create(CreateMigrationRequest {
            pool: "retry".into(),
            ..create_inline(p, subject)
        })
        .await
        .unwrap();
    let (failed, first_run) = client.finish_and_check(m.id, WAIT).await;
    assert_eq!(failed.state(), MigrationState::Failed);
    assert!(
        failed.reason.contains("(fail)") && failed.reason.contains("input missing"),
        "{}",
        failed.reason
    );
    let s = client.subject_status(subject).await.unwrap();
    assert_eq!(s.status(), SubjectStatus::Failed);

    std::fs::write(&fixed, "").unwrap();
    let pause = PausePoolRequest {
        name: "retry".into(),
    };
    client.admin.clone().pause_pool(pause).await.unwrap();
    let queued = client.retry(m.id).await.unwrap();
    assert_eq!(queued.state(), MigrationState::Queued, "the pool is paused");
    let s = client.subject_status(subject).await.unwrap();
    assert_eq!(s.status(), SubjectStatus::Queued);
    assert_eq!(s.latest.as_ref().map(|l| l.id), Some(m.id));
    let resume = ResumePoolRequest {
        name: "retry".into(),
    };
    let pool = client.admin.clone().resume_pool(resume).await.unwrap();
    assert_eq!(pool.into_inner().pool.unwrap().running, 1);
    // c sleeps 2 s, so the second run is still going.
    let s = client.subject_status(subject).await.unwrap();
    assert_eq!(s.status(), SubjectStatus::Running);

    let (done, events) = client.finish_and_check(m.id, WAIT).await;
    assert_eq!(done.state(), MigrationState::Succeeded, "{}", done.reason);
    let s = client.subject_status(subject).await.unwrap();
    assert_eq!(s.status(), SubjectStatus::Finished);
    assert_eq!(s.last_succeeded.map(|l| l.id), Some(m.id));

    let retried = events
        .iter()
        .position(|e| e.kind() == EventKind::MigrationRetried)
        .expect("MIGRATION_RETRIED");
    let second_run = &events[retried..];
    let stages_assigned = |run: &[Event]| {
        let mut k: Vec<u32> = run
            .iter()
            .filter(|e| e.kind() == EventKind::TaskAssigned)
            .filter_map(|e| e.stage_index)
            .collect();
        k.dedup();
        k
    };
    assert_eq!(stages_assigned(&first_run), [0, 1]);
    assert_eq!(stages_assigned(second_run), [1, 2], "a is not run again");
    let started: Vec<Option<u32>> = of_kind(second_run, EventKind::StageStarted)
        .iter()
        .map(|e| e.stage_index)
        .collect();
    assert_eq!(started, [Some(1), Some(2)]);
    assert!(done.stages.iter().all(|s| s.total == 1 && s.succeeded == 1));
}
