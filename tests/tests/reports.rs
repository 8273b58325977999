//! Duplicate, late, premature and batched reports (I2, I4), sent by a
//! hand-rolled worker over raw gRPC ([`FakeWorker`]), so the test decides
//! exactly which report reaches the coordinator and when:
//!
//! - the same Complete twice is answered `accepted` + `duplicate` and
//!   changes nothing; a contradicting Fail after it is rejected;
//! - a Complete with the token of an attempt whose lease expired and was
//!   given to another worker is FAILED_PRECONDITION, logged as
//!   REPORT_REJECTED, and so is one naming the live attempt from a worker
//!   that does not hold it; the live attempt still completes;
//! - a Complete or Fail for a task of a stage that has not started is
//!   FAILED_PRECONDITION and neither starts nor fails anything;
//! - in a batch, a good and a stale report are answered one by one;
//! - an impersonator who knows a worker's id and its lease token (both
//!   shown by ListWorkers) but not the lease secret of the assignment can
//!   neither complete, fail nor renew the lease, nor take the worker's
//!   Subscribe stream (ALREADY_EXISTS); the real worker carries on.
//!
//! Every migration ends with the invariant checker (no stage starts twice,
//! counters add up).

use std::time::Duration;

use serde_json::json;
use stagecoach_proto::v1::{
    EventKind, HeartbeatRequest, LeaseStatus, MigrationState, StageState, SubscribeRequest,
};
use stagecoach_tests::fake_worker::{completion, failure, lease};
use stagecoach_tests::plans::{StageExt, create_inline, plan, retry, stage, task};
use stagecoach_tests::{Backend, Cluster, FakeWorker, of_kind, on_both_backends};
use tonic::Code;

on_both_backends!(
    a_repeated_complete_is_a_harmless_duplicate,
    a_complete_with_a_reassigned_attempts_token_is_rejected,
    a_report_for_a_stage_not_started_is_rejected,
    a_batch_with_a_good_and_a_stale_report_applies_the_good_one,
    an_impersonator_knowing_the_worker_id_and_token_is_refused
);

/// A kind no real worker handles: only the fake workers get these tasks.
const KIND: &str = "fake.step";
const WAIT: Duration = Duration::from_secs(60);

fn step() -> stagecoach_proto::v1::TaskSpec {
    task(KIND, json!({}))
}

async fn a_repeated_complete_is_a_harmless_duplicate(backend: Backend) {
    let cluster = Cluster::start_fast(backend, &[], 0, 1).await;
    let client = cluster.client().await;
    let url = cluster.coordinator.url();
    let mut f = FakeWorker::subscribe(&url, "f1", &[KIND], 4).await;
    let p = plan(
        "dup",
        vec![stage("one", vec![step()]), stage("two", vec![step()])],
    );
    let m = client.create(create_inline(p, "dup/1")).await.unwrap();

    let a = f.next_assignment(WAIT).await;
    assert_eq!(a.stage_index, 0);
    let a_lease = a.lease.unwrap();
    let first = f.complete(vec![completion(a_lease)]).await.unwrap();
    assert!(first.results[0].accepted && !first.results[0].duplicate);
    let again = f.complete(vec![completion(a_lease)]).await.unwrap();
    assert!(
        again.results[0].accepted && again.results[0].duplicate,
        "a repeated Complete is accepted as a duplicate: {again:?}"
    );

    let b = f.next_assignment(WAIT).await;
    assert_eq!(b.stage_index, 1);
    // Late duplicates, in a batch, after stage two started: still harmless.
    let late = f
        .complete(vec![completion(a_lease), completion(a_lease)])
        .await
        .unwrap();
    assert_eq!(late.results.len(), 2);
    for r in &late.results {
        assert!(r.accepted && r.duplicate, "late duplicate: {r:?}");
    }
    // A Fail contradicting the recorded success is refused.
    let contradiction = f
        .fail(vec![failure(a_lease, "changed my mind", false)])
        .await
        .unwrap_err();
    assert_eq!(contradiction.code(), Code::FailedPrecondition);

    f.complete(vec![completion(b.lease.unwrap())])
        .await
        .unwrap();
    let (m, events) = client.finish_and_check(m.id, WAIT).await;
    assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);
    let succeeded_a = of_kind(&events, EventKind::TaskSucceeded)
        .iter()
        .filter(|e| e.task_id == a_lease.task_id)
        .count();
    assert_eq!(succeeded_a, 1, "one TASK_SUCCEEDED for the duplicated task");
    assert_eq!(of_kind(&events, EventKind::StageStarted).len(), 2);
    eprintln!("raw report calls: {}", f.report_calls());
}

async fn a_complete_with_a_reassigned_attempts_token_is_rejected(backend: Backend) {
    let cluster = Cluster::start_fast(backend, &[], 0, 1).await;
    let client = cluster.client().await;
    let url = cluster.coordinator.url();
    let mut f1 = FakeWorker::subscribe(&url, "f1", &[KIND], 1).await;
    let p = plan("stale", vec![stage("only", vec![step()])]);
    let m = client.create(create_inline(p, "stale/1")).await.unwrap();

    let a1 = f1.next_assignment(WAIT).await;
    let token1 = a1.lease.unwrap();
    assert_eq!(token1.attempt, 1);
    // f1 hangs: no heartbeats, so its lease expires and it gets no new work.
    f1.go_silent();
    let mut f2 = FakeWorker::subscribe(&url, "f2", &[KIND], 1).await;
    let a2 = f2.next_assignment(WAIT).await;
    let token2 = a2.lease.unwrap();
    assert_eq!(token2, lease(token1.task_id, 2), "attempt 2 goes to f2");

    let late = f1.complete(vec![completion(token1)]).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    // Nor may f1 report the live attempt: that lease is f2's.
    let foreign = f1.complete(vec![completion(token2)]).await.unwrap_err();
    assert_eq!(foreign.code(), Code::FailedPrecondition, "{foreign:?}");
    let rejected = client
        .wait_for_event(m.id, "REPORT_REJECTED of attempt 1", WAIT, |e| {
            e.kind() == EventKind::ReportRejected
                && e.task_id == token1.task_id
                && e.attempt == 1
                && e.worker_id == "f1"
        })
        .await;
    let events = client.events(m.id).await.unwrap();
    let expired = events
        .iter()
        .find(|e| e.kind() == EventKind::TaskLeaseExpired && e.attempt == 1)
        .expect("TASK_LEASE_EXPIRED of attempt 1");
    let assigned2 = events
        .iter()
        .find(|e| e.kind() == EventKind::TaskAssigned && e.attempt == 2)
        .expect("TASK_ASSIGNED of attempt 2");
    assert!(expired.id < assigned2.id && assigned2.id < rejected.id);
    assert_eq!(assigned2.worker_id, "f2");
    // The stale report changed nothing: attempt 2 is still running.
    let now = client.get_migration(m.id).await.unwrap();
    assert_eq!(now.state(), MigrationState::Running);
    assert_eq!((now.stages[0].running, now.stages[0].succeeded), (1, 0));

    let ok = f2.complete(vec![completion(token2)]).await.unwrap();
    assert!(ok.results[0].accepted && !ok.results[0].duplicate);
    let (m, _) = client.finish_and_check(m.id, WAIT).await;
    assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);
    eprintln!(
        "raw report calls: f1 {}, f2 {}",
        f1.report_calls(),
        f2.report_calls()
    );
}

async fn a_report_for_a_stage_not_started_is_rejected(backend: Backend) {
    let cluster = Cluster::start_fast(backend, &[], 0, 1).await;
    let client = cluster.client().await;
    let mut f = FakeWorker::subscribe(&cluster.coordinator.url(), "f1", &[KIND], 4).await;
    let p = plan(
        "early",
        vec![
            stage("one", vec![step()]),
            stage("two", vec![step(), step()]),
        ],
    );
    let m = client.create(create_inline(p, "early/1")).await.unwrap();
    let a = f.next_assignment(WAIT).await;
    let first = a.lease.unwrap().task_id;
    // Tasks are numbered in plan order: the next two ids are stage two's.
    let (guess1, guess2) = (first + 1, first + 2);

    let complete = f
        .complete(vec![completion(lease(guess1, 1))])
        .await
        .unwrap_err();
    assert_eq!(complete.code(), Code::FailedPrecondition, "{complete:?}");
    let fail = f
        .fail(vec![failure(lease(guess2, 1), "sabotage", false)])
        .await
        .unwrap_err();
    assert_eq!(fail.code(), Code::FailedPrecondition, "{fail:?}");
    let now = client.get_migration(m.id).await.unwrap();
    assert_eq!(now.state(), MigrationState::Running);
    let two = &now.stages[1];
    assert_eq!(two.state(), StageState::Pending);
    assert_eq!((two.succeeded, two.failed, two.running), (0, 0, 0));

    f.complete(vec![completion(a.lease.unwrap())])
        .await
        .unwrap();
    let b = f.next_assignment(WAIT).await;
    let c = f.next_assignment(WAIT).await;
    let mut ids = [b.lease.unwrap().task_id, c.lease.unwrap().task_id];
    ids.sort_unstable();
    assert_eq!(
        ids,
        [guess1, guess2],
        "the guessed ids are stage two's tasks"
    );
    let both = f
        .complete(vec![
            completion(b.lease.unwrap()),
            completion(c.lease.unwrap()),
        ])
        .await
        .unwrap();
    assert!(both.results.iter().all(|r| r.accepted && !r.duplicate));
    let (m, events) = client.finish_and_check(m.id, WAIT).await;
    assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);
    let rejected = of_kind(&events, EventKind::ReportRejected);
    assert_eq!(rejected.len(), 2, "both premature reports are logged");
    eprintln!("raw report calls: {}", f.report_calls());
}

async fn a_batch_with_a_good_and_a_stale_report_applies_the_good_one(backend: Backend) {
    let cluster = Cluster::start_fast(backend, &[], 0, 1).await;
    let client = cluster.client().await;
    let mut f = FakeWorker::subscribe(&cluster.coordinator.url(), "f1", &[KIND], 2).await;
    let p = plan(
        "batch",
        vec![stage("only", vec![step(), step()]).with_retry(retry(3, 100, 1_000, 0))],
    );
    let m = client.create(create_inline(p, "batch/1")).await.unwrap();
    let a = f.next_assignment(WAIT).await.lease.unwrap();
    let b = f.next_assignment(WAIT).await.lease.unwrap();

    let failed = f.fail(vec![failure(b, "flaky", true)]).await.unwrap();
    assert!(failed.results[0].accepted);
    // b's attempt 1 already failed: its Complete is stale, a's is good.
    let batch = f
        .complete(vec![completion(a), completion(b)])
        .await
        .expect("a batch answers each report");
    assert_eq!(batch.results.len(), 2);
    let (good, stale) = (&batch.results[0], &batch.results[1]);
    assert_eq!(good.lease, Some(a));
    assert!(good.accepted && !good.duplicate, "{good:?}");
    assert_eq!(stale.lease, Some(b));
    assert!(!stale.accepted, "{stale:?}");
    assert_eq!(stale.code, Code::FailedPrecondition as i32, "{stale:?}");
    assert!(!stale.message.is_empty());

    let b2 = f.next_assignment(WAIT).await.lease.unwrap();
    assert_eq!(b2, lease(b.task_id, 2));
    f.complete(vec![completion(b2)]).await.unwrap();
    let (m, events) = client.finish_and_check(m.id, WAIT).await;
    assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);
    let b_succeeded: Vec<u32> = of_kind(&events, EventKind::TaskSucceeded)
        .iter()
        .filter(|e| e.task_id == b.task_id)
        .map(|e| e.attempt)
        .collect();
    assert_eq!(b_succeeded, [2], "only attempt 2 of b succeeded");
    eprintln!("raw report calls: {}", f.report_calls());
}

async fn an_impersonator_knowing_the_worker_id_and_token_is_refused(backend: Backend) {
    let cluster = Cluster::start_fast(backend, &[], 0, 1).await;
    let client = cluster.client().await;
    let url = cluster.coordinator.url();
    let mut f = FakeWorker::subscribe(&url, "f1", &[KIND], 1).await;
    let p = plan("impostor", vec![stage("one", vec![step()])]);
    let m = client.create(create_inline(p, "impostor/1")).await.unwrap();
    let a = f.next_assignment(WAIT).await;
    // What ListWorkers publishes: the worker id and its lease tokens.
    let listed = client.list_workers().await.unwrap();
    let token = listed
        .iter()
        .find(|w| w.worker_id == "f1")
        .and_then(|w| w.leases.first().copied())
        .expect("f1's lease is listed");
    assert_eq!(Some(token), a.lease);

    // The impostor's own connection, under f1's id, with guessed secrets.
    let mut impostor = f.raw_client();
    for guess in [0, 1, a.lease_secret.wrapping_add(1)] {
        let forged = stagecoach_proto::v1::Completion {
            lease_secret: guess,
            ..completion(token)
        };
        let err = impostor
            .complete(stagecoach_proto::v1::CompleteRequest {
                worker_id: "f1".into(),
                completions: vec![forged],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        let forged = stagecoach_proto::v1::Failure {
            lease_secret: guess,
            ..failure(token, "sabotage", false)
        };
        let err = impostor
            .fail(stagecoach_proto::v1::FailRequest {
                worker_id: "f1".into(),
                failures: vec![forged],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        let hb = impostor
            .heartbeat(HeartbeatRequest {
                worker_id: "f1".into(),
                leases: vec![LeaseStatus {
                    lease: Some(token),
                    lease_secret: guess,
                    ..Default::default()
                }],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(hb.renewed.is_empty(), "{hb:?}");
    }
    let taken = impostor
        .subscribe(SubscribeRequest {
            worker_id: "f1".into(),
            kinds: vec![KIND.into()],
            slots: 1,
            name: "impostor".into(),
            instance: 7,
        })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");

    let now = client.get_migration(m.id).await.unwrap();
    assert_eq!(now.state(), MigrationState::Running);
    // The real worker, with the secret, completes its task.
    let done = f.complete(vec![completion(token)]).await.unwrap();
    assert!(done.results[0].accepted && !done.results[0].duplicate);
    let (m, events) = client.finish_and_check(m.id, WAIT).await;
    assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);
    assert_eq!(of_kind(&events, EventKind::ReportRejected).len(), 6);
}
