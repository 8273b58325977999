//! A worker process killed with `kill -9` mid-task (I4, I6):
//!
//! - its task is given to the other worker once the lease expires
//!   (TASK_LEASE_EXPIRED of attempt 1 on the dead worker, then TASK_ASSIGNED
//!   of attempt 2 elsewhere), and the migration succeeds;
//! - the dead worker's late report (a raw Complete, then a raw Fail, with its
//!   worker id and the attempt-1 token) is FAILED_PRECONDITION and changes
//!   nothing;
//! - with `--max-reassignments 0` (no expiry survived), a worker dying
//!   with two leases of one migration makes the first task dead and fails
//!   the migration once: the log stays consistent (both leases expire in
//!   the same sweep).
//!
//! - a stage's own `heartbeat_timeout_ms` (1.5 s) decides how soon a killed
//!   worker's task moves on, not the coordinator's 10-minute default lease;
//!   the surviving worker keeps its 1.5 s lease alive through a 3 s task.
//!
//! One kill and two raw reports in the first test, one kill in each of the
//! others.

use std::time::Duration;

use serde_json::json;
use stagecoach_proto::v1::{
    CompleteRequest, EventKind, FailRequest, MigrationState, RetryPolicy, StageSpec,
};
use stagecoach_tests::fake_worker::{completion, failure, lease};
use stagecoach_tests::plans::{create_inline, plan, stage, task};
use stagecoach_tests::{
    Backend, Cluster, check_worker_slots, describe_event, of_kind, on_both_backends, wait_for,
};
use tonic::Code;

on_both_backends!(
    a_killed_workers_task_moves_on_and_its_late_report_is_rejected,
    a_worker_dying_with_two_leases_fails_the_migration_once,
    a_stage_heartbeat_timeout_overrides_the_coordinator_lease
);

const WAIT: Duration = Duration::from_secs(90);

async fn a_killed_workers_task_moves_on_and_its_late_report_is_rejected(backend: Backend) {
    let mut cluster = Cluster::start_fast(backend, &[], 2, 2).await;
    let client = cluster.client().await;
    let p = plan(
        "crash",
        vec![stage("only", vec![task("sleep", json!({"ms": 4_000}))])],
    );
    let m = client.create(create_inline(p, "crash/1")).await.unwrap();
    let assigned = client
        .wait_for_event(m.id, "TASK_ASSIGNED", WAIT, |e| {
            e.kind() == EventKind::TaskAssigned
        })
        .await;
    let victim = assigned.worker_id.clone();
    let task_id = assigned.task_id;
    cluster.worker_mut(&victim).kill9().await;
    let kills = 1;

    let expired = client
        .wait_for_event(m.id, "TASK_LEASE_EXPIRED of attempt 1", WAIT, |e| {
            e.kind() == EventKind::TaskLeaseExpired && e.task_id == task_id
        })
        .await;
    assert_eq!(
        (expired.attempt, expired.worker_id.as_str()),
        (1, victim.as_str())
    );
    let again = client
        .wait_for_event(m.id, "TASK_ASSIGNED of attempt 2", WAIT, |e| {
            e.kind() == EventKind::TaskAssigned && e.attempt == 2
        })
        .await;
    assert_eq!(again.task_id, task_id);
    assert_ne!(
        again.worker_id, victim,
        "reassigned to the surviving worker"
    );
    assert!(expired.id < again.id);

    let (m, events) = client.finish_and_check(m.id, WAIT).await;
    assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);
    let outcome = of_kind(&events, EventKind::TaskSucceeded);
    assert_eq!(outcome.len(), 1);
    assert_eq!(
        (outcome[0].attempt, &outcome[0].worker_id),
        (2, &again.worker_id)
    );

    // The dead worker's report arrives late, as if it had been in flight.
    let stale = lease(task_id, 1);
    let late = client
        .workers
        .clone()
        .complete(CompleteRequest {
            worker_id: victim.clone(),
            completions: vec![completion(stale)],
        })
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    let late_fail = client
        .workers
        .clone()
        .fail(FailRequest {
            worker_id: victim.clone(),
            failures: vec![failure(stale, "lost", false)],
        })
        .await
        .unwrap_err();
    assert_eq!(late_fail.code(), Code::FailedPrecondition, "{late_fail:?}");
    let raw_reports = 2;
    let (after, events) = client.check(m.id).await;
    assert_eq!(after.state(), MigrationState::Succeeded);
    assert_eq!(after.finished_at, m.finished_at, "nothing changed");
    let rejected = of_kind(&events, EventKind::ReportRejected);
    assert_eq!(rejected.len(), 2, "both late reports are logged");
    assert!(
        rejected
            .iter()
            .all(|e| e.worker_id == victim && e.attempt == 1)
    );

    wait_for("the dead worker to leave ListWorkers", WAIT, async || {
        let workers = client.list_workers().await.ok()?;
        (!workers.iter().any(|w| w.worker_id == victim)).then_some(())
    })
    .await;
    let all = client.all_events().await.unwrap();
    check_worker_slots(&all, |_| 2).unwrap_or_else(|e| panic!("{e:?}"));
    eprintln!("kills: {kills}, raw reports: {raw_reports}");
}

async fn a_worker_dying_with_two_leases_fails_the_migration_once(backend: Backend) {
    let mut cluster = Cluster::start_fast(backend, &["--max-reassignments", "0"], 1, 2).await;
    let client = cluster.client().await;
    let long = || task("sleep", json!({"ms": 60_000}));
    let p = plan("doomed", vec![stage("only", vec![long(), long()])]);
    let m = client.create(create_inline(p, "doomed/1")).await.unwrap();
    wait_for("both tasks on the worker", WAIT, async || {
        let events = client.events(m.id).await.ok()?;
        (of_kind(&events, EventKind::TaskAssigned).len() == 2).then_some(())
    })
    .await;
    cluster.workers[0].kill9().await;

    let (m, events) = client.finish_and_check(m.id, WAIT).await;
    let log: Vec<String> = events.iter().map(describe_event).collect();
    assert_eq!(m.state(), MigrationState::Failed, "{}", log.join("\n"));
    assert!(
        m.reason
            .contains("(sleep) lost its worker 1 time (at most 0 reassignments)"),
        "reason {:?}",
        m.reason
    );
    let stage = &m.stages[0];
    assert_eq!(
        (stage.total, stage.failed, stage.canceled),
        (2, 1, 1),
        "{stage:?}"
    );
    assert_eq!(
        of_kind(&events, EventKind::TaskDead).len(),
        1,
        "{}",
        log.join("\n")
    );
    eprintln!("kills: 1, raw reports: 0");
}

async fn a_stage_heartbeat_timeout_overrides_the_coordinator_lease(backend: Backend) {
    let args = [
        "--heartbeat-interval-ms",
        "200",
        "--lease-duration-ms",
        "600000",
        "--sweep-interval-ms",
        "100",
    ];
    let mut cluster = Cluster::start_with(backend, &args, 2, 1).await;
    let client = cluster.client().await;
    let p = plan(
        "short-leases",
        vec![StageSpec {
            retry: Some(RetryPolicy {
                heartbeat_timeout_ms: 1_500,
                ..Default::default()
            }),
            ..stage("only", vec![task("sleep", json!({"ms": 3_000}))])
        }],
    );
    let m = client.create(create_inline(p, "short/1")).await.unwrap();
    let assigned = client
        .wait_for_event(m.id, "TASK_ASSIGNED", WAIT, |e| {
            e.kind() == EventKind::TaskAssigned
        })
        .await;
    cluster.worker_mut(&assigned.worker_id).kill9().await;

    // With the default lease this would take ten minutes, far past WAIT.
    let (m, events) = client.finish_and_check(m.id, WAIT).await;
    let log: Vec<String> = events.iter().map(describe_event).collect();
    assert_eq!(m.state(), MigrationState::Succeeded, "{}", log.join("\n"));
    let expired = of_kind(&events, EventKind::TaskLeaseExpired);
    assert_eq!(
        expired.len(),
        1,
        "only the killed worker's lease expires; heartbeats keep the 1.5 s lease of the 3 s task alive:\n{}",
        log.join("\n")
    );
    assert_eq!(expired[0].worker_id, assigned.worker_id);
    let succeeded = of_kind(&events, EventKind::TaskSucceeded);
    assert_eq!(succeeded[0].attempt, 2);
    eprintln!("kills: 1, raw reports: 0");
}
