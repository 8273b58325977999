//! What clients are promised about migrations and stages (I8, I10, I1):
//!
//! - a migration past its deadline fails with reason "deadline exceeded",
//!   whether running (its worker is told to stop: the task's cancel marker
//!   appears) or still queued; a create whose deadline has passed is
//!   INVALID_ARGUMENT naming `deadline`; a report after the deadline is
//!   FAILED_PRECONDITION and moves nothing forward, even before any sweep;
//! - one unfinished migration per subject: a second create is ALREADY_EXISTS
//!   naming the running one; the same idempotency key returns the same
//!   migration with `created = false`;
//! - GetSubjectStatus: NONE, then FINISHED, then REGENERATING while a second
//!   run is under way (with the first run as `last_succeeded`), then
//!   FINISHED with the second;
//! - a serial stage runs its tasks one at a time in the order they were
//!   added (each assigned only after the previous one succeeded);
//! - tasks can be added only to later stages that have not started: a
//!   Complete adding to its own (started) stage or an earlier one is
//!   FAILED_PRECONDITION and changes nothing; one adding to a later dynamic
//!   stage is accepted (a repeat of it adds nothing) and the added task
//!   runs there.

use std::time::{Duration, SystemTime};

use serde_json::json;
use stagecoach_proto::v1::{
    CreatePoolRequest, EventKind, MigrationState, PausePoolRequest, StageState, SubjectStatus,
};
use stagecoach_tests::checker::DEADLINE_EXCEEDED;
use stagecoach_tests::fake_worker::{completion, completion_adding};
use stagecoach_tests::plans::{StageExt, create_inline, plan, stage, task};
use stagecoach_tests::{
    Backend, Client, Cluster, FakeWorker, describe_event, of_kind, on_both_backends, wait_for,
};
use tonic::Code;

on_both_backends!(
    a_migration_past_its_deadline_fails,
    nothing_moves_forward_after_the_deadline,
    one_unfinished_migration_per_subject_and_idempotent_creates,
    a_second_run_of_a_finished_subject_is_regenerating,
    a_serial_stage_runs_one_task_at_a_time_in_order,
    tasks_can_only_be_added_to_later_stages_not_started
);

const WAIT: Duration = Duration::from_secs(90);

fn in_a_second() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now() + Duration::from_secs(1))
}

async fn paused_pool(client: &Client, name: &str) {
    let mut admin = client.admin.clone();
    let create = CreatePoolRequest {
        name: name.into(),
        slots: 1,
    };
    admin.create_pool(create).await.expect("CreatePool");
    let pause = PausePoolRequest { name: name.into() };
    admin.pause_pool(pause).await.expect("PausePool");
}

async fn a_migration_past_its_deadline_fails(backend: Backend) {
    let cluster = Cluster::start_fast(backend, &[], 1, 2).await;
    let client = cluster.client().await;
    let marker = cluster.dir().join("stopped");
    let long = plan(
        "long",
        vec![stage(
            "s",
            vec![task(
                "sleep",
                json!({"ms": 60_000, "cancel_marker": marker}),
            )],
        )],
    );
    let running = client
        .create(stagecoach_proto::v1::CreateMigrationRequest {
            deadline: Some(in_a_second()),
            ..create_inline(long.clone(), "deadline/running")
        })
        .await
        .unwrap();
    paused_pool(&client, "held").await;
    let queued = client
        .create(stagecoach_proto::v1::CreateMigrationRequest {
            deadline: Some(in_a_second()),
            pool: "held".into(),
            ..create_inline(long, "deadline/queued")
        })
        .await
        .unwrap();
    assert_eq!(queued.state(), MigrationState::Queued);

    for id in [running.id, queued.id] {
        // The checker also checks I10: not failed before the deadline.
        let (m, events) = client.finish_and_check(id, WAIT).await;
        assert_eq!(m.state(), MigrationState::Failed);
        assert_eq!(m.reason, DEADLINE_EXCEEDED);
        let failed = of_kind(&events, EventKind::MigrationFailed);
        assert_eq!(failed[0].message, DEADLINE_EXCEEDED);
    }
    let events = client.events(running.id).await.unwrap();
    assert_eq!(of_kind(&events, EventKind::TaskCanceled).len(), 1);
    // The worker was told to stop its sleep.
    wait_for("the sleep's cancel marker", WAIT, async || {
        marker.exists().then_some(())
    })
    .await;
}

/// Without a sweep (its interval is a minute), only the transitions'
/// own checks keep a migration from moving past its deadline.
async fn nothing_moves_forward_after_the_deadline(backend: Backend) {
    let cluster = Cluster::start_with(backend, &["--sweep-interval-ms", "60000"], 0, 1).await;
    let client = cluster.client().await;
    let url = cluster.coordinator.url();
    let f = FakeWorker::subscribe(&url, "f1", &["fake.step"], 4).await;
    let mut f = f;
    let step = || task("fake.step", json!({}));
    let p = plan(
        "p",
        vec![stage("one", vec![step()]), stage("two", vec![step()])],
    );

    let past = prost_types::Timestamp::from(SystemTime::now() - Duration::from_secs(5));
    let refused = client
        .create(stagecoach_proto::v1::CreateMigrationRequest {
            deadline: Some(past),
            ..create_inline(p.clone(), "deadline/past")
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().starts_with("deadline:"), "{refused:?}");

    let m = client
        .create(stagecoach_proto::v1::CreateMigrationRequest {
            deadline: Some(in_a_second()),
            ..create_inline(p, "deadline/late-report")
        })
        .await
        .unwrap();
    let a = f.next_assignment(WAIT).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let late = f.complete(vec![completion(a.lease.unwrap())]).await;
    let late = late.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    assert!(late.message().contains("deadline"), "{late:?}");
    // Nothing moved: the first stage is still running, the second pending,
    // and the invariant checker (I10) finds nothing after the deadline.
    let (m, events) = client.check(m.id).await;
    assert_eq!(m.state(), MigrationState::Running);
    assert_eq!(m.stages[0].succeeded, 0);
    assert_eq!(m.stages[1].state(), StageState::Pending);
    assert!(of_kind(&events, EventKind::TaskSucceeded).is_empty());
    assert_eq!(of_kind(&events, EventKind::ReportRejected).len(), 1);
}

async fn one_unfinished_migration_per_subject_and_idempotent_creates(backend: Backend) {
    let cluster = Cluster::start_fast(backend, &[], 0, 1).await;
    let client = cluster.client().await;
    paused_pool(&client, "held").await;
    let p = plan("p", vec![stage("s", vec![task("noop", json!({}))])]);
    let req = |subject: &str, key: &str| stagecoach_proto::v1::CreateMigrationRequest {
        pool: "held".into(),
        idempotency_key: key.into(),
        ..create_inline(p.clone(), subject)
    };

    let first = client.create(req("project/busy", "")).await.unwrap();
    let second = client.create(req("project/busy", "")).await.unwrap_err();
    assert_eq!(second.code(), Code::AlreadyExists, "{second:?}");
    assert!(
        second.message().contains(&first.id.to_string()),
        "the error names migration {}: {:?}",
        first.id,
        second.message()
    );

    let once = client
        .create_full(req("project/idem", "key-1"))
        .await
        .unwrap();
    let twice = client
        .create_full(req("project/idem", "key-1"))
        .await
        .unwrap();
    let (once_m, twice_m) = (once.migration.unwrap(), twice.migration.unwrap());
    assert!(once.created && !twice.created);
    assert_eq!(once_m.id, twice_m.id);
    assert_eq!(twice_m.idempotency_key, "key-1");

    client.cancel(first.id, "make room").await.unwrap();
    let third = client.create(req("project/busy", "")).await.unwrap();
    assert_ne!(third.id, first.id);
    let listed = client.list_migrations().await.unwrap();
    assert_eq!(listed.len(), 3, "no create made a second migration");
    for m in listed {
        client.check(m.id).await;
    }
}

async fn a_second_run_of_a_finished_subject_is_regenerating(backend: Backend) {
    let cluster = Cluster::start_fast(backend, &[], 1, 2).await;
    let client = cluster.client().await;
    let subject = "project/regen";
    let status = async || client.subject_status(subject).await.unwrap();
    assert_eq!(status().await.status(), SubjectStatus::None);

    let quick = plan("quick", vec![stage("s", vec![task("noop", json!({}))])]);
    let run1 = client.create(create_inline(quick, subject)).await.unwrap();
    client.finish_and_check(run1.id, WAIT).await;
    let s = status().await;
    assert_eq!(s.status(), SubjectStatus::Finished);
    assert_eq!(s.last_succeeded.map(|m| m.id), Some(run1.id));

    let slow = plan(
        "slow",
        vec![stage("s", vec![task("sleep", json!({"ms": 2_000}))])],
    );
    let run2 = client.create(create_inline(slow, subject)).await.unwrap();
    let s = status().await;
    assert_eq!(s.status(), SubjectStatus::Regenerating);
    assert_eq!(s.latest.map(|m| m.id), Some(run2.id));
    assert_eq!(s.last_succeeded.map(|m| m.id), Some(run1.id));

    let (m, _) = client.finish_and_check(run2.id, WAIT).await;
    assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);
    let s = status().await;
    assert_eq!(s.status(), SubjectStatus::Finished);
    assert_eq!(s.last_succeeded.map(|m| m.id), Some(run2.id));
}

async fn a_serial_stage_runs_one_task_at_a_time_in_order(backend: Backend) {
    let cluster = Cluster::start_fast(backend, &[], 2, 4).await;
    let client = cluster.client().await;
    let tasks = (0..4)
        .map(|i| task("sleep", json!({"ms": 200, "n": i})))
        .collect();
    let p = plan(
        "serial",
        vec![
            stage("one-by-one", tasks).serial(),
            stage("after", vec![task("noop", json!({})); 2]),
        ],
    );
    let m = client.create(create_inline(p, "serial/1")).await.unwrap();
    let (m, events) = client.finish_and_check(m.id, WAIT).await;
    assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);

    // Replay stage 0: every assignment must be of the first task not yet
    // succeeded, with nothing else in flight (robust to a retried attempt).
    let stage0: Vec<_> = events.iter().filter(|e| e.stage_index == Some(0)).collect();
    let order: Vec<String> = stage0.iter().map(|e| describe_event(e)).collect();
    let mut tasks: Vec<i64> = stage0
        .iter()
        .map(|e| e.task_id)
        .filter(|t| *t != 0)
        .collect();
    tasks.sort_unstable();
    tasks.dedup();
    assert_eq!(tasks.len(), 4, "{order:#?}");
    let (mut done, mut in_flight) = (0, None);
    for e in &stage0 {
        match e.kind() {
            EventKind::TaskAssigned => {
                assert_eq!(
                    in_flight,
                    None,
                    "two tasks in flight at {}",
                    describe_event(e)
                );
                assert_eq!(
                    e.task_id,
                    tasks[done],
                    "out of order at {}",
                    describe_event(e)
                );
                in_flight = Some(e.task_id);
            }
            EventKind::TaskSucceeded => {
                assert_eq!(in_flight, Some(e.task_id), "{order:#?}");
                (done, in_flight) = (done + 1, None);
            }
            EventKind::TaskRetrying | EventKind::TaskLeaseExpired => in_flight = None,
            _ => {}
        }
    }
    assert_eq!(done, 4, "{order:#?}");
}

async fn tasks_can_only_be_added_to_later_stages_not_started(backend: Backend) {
    const KIND: &str = "fake.step";
    let cluster = Cluster::start_fast(backend, &[], 0, 1).await;
    let client = cluster.client().await;
    let mut f = FakeWorker::subscribe(&cluster.coordinator.url(), "f1", &[KIND], 2).await;
    let p = plan(
        "fan-out",
        vec![
            stage("first", vec![task(KIND, json!({}))]),
            stage("later", vec![]).dynamic(),
            stage("last", vec![task(KIND, json!({}))]),
        ],
    );
    let m = client.create(create_inline(p, "fanout/1")).await.unwrap();
    let a = f.next_assignment(WAIT).await.lease.unwrap();
    let add = |lease, to: &str| completion_adding(lease, to, KIND, &json!({"to": to}));

    let own = f.complete(vec![add(a, "first")]).await.unwrap_err();
    assert_eq!(own.code(), Code::FailedPrecondition, "{own:?}");
    let unknown = f.complete(vec![add(a, "nope")]).await.unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument, "{unknown:?}");
    let now = client.get_migration(m.id).await.unwrap();
    let first = &now.stages[0];
    assert_eq!(
        (first.total, first.succeeded, first.running),
        (1, 0, 1),
        "unchanged"
    );
    let events = client.events(m.id).await.unwrap();
    assert!(of_kind(&events, EventKind::TaskAdded).is_empty());

    let ok = f.complete(vec![add(a, "later")]).await.unwrap();
    assert!(ok.results[0].accepted && !ok.results[0].duplicate);
    // Repeating it adds nothing more.
    let again = f.complete(vec![add(a, "later")]).await.unwrap();
    assert!(again.results[0].accepted && again.results[0].duplicate);
    let b = f.next_assignment(WAIT).await;
    assert_eq!((b.stage_index, b.stage_name.as_str()), (1, "later"));
    let b = b.lease.unwrap();
    for to in ["first", "later"] {
        let refused = f.complete(vec![add(b, to)]).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::FailedPrecondition,
            "adding to {to}: {refused:?}"
        );
    }
    f.complete(vec![completion(b)]).await.unwrap();
    let c = f.next_assignment(WAIT).await;
    assert_eq!(c.stage_index, 2);
    f.complete(vec![completion(c.lease.unwrap())])
        .await
        .unwrap();

    let (m, events) = client.finish_and_check(m.id, WAIT).await;
    assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);
    let totals: Vec<(u32, StageState)> = m.stages.iter().map(|s| (s.total, s.state())).collect();
    assert_eq!(totals, [(1, StageState::Succeeded); 3]);
    assert_eq!(of_kind(&events, EventKind::TaskAdded).len(), 1);
    eprintln!("raw report calls: {}", f.report_calls());
}
