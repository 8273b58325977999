//! Store contract tests: the state machines and invariants, driven through
//! the `Store` trait exactly as the core drives it, without a network.

use serde_json::json;
use stagecoach_coordinator::domain::{
    Completion, EventKind, Failure, LeaseStatus, LeaseToken, MigrationState, NewMigration, NewTask,
    PlanSpec, ReportAck, StageState,
};
use stagecoach_coordinator::error::Error;
use stagecoach_coordinator::store::{Limits, SqliteStore, Store};

struct Db {
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

async fn store_with(limits: Limits) -> Db {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = SqliteStore::open(&url, limits).await.unwrap();
    store.ensure_pool("default", 10).await.unwrap();
    Db { store, _dir: dir }
}

async fn store() -> Db {
    store_with(Limits {
        lease_ms: 60_000,
        max_reassignments: 3,
    })
    .await
}

fn plan(json: serde_json::Value) -> PlanSpec {
    let p = PlanSpec::from_json(&json.to_string()).unwrap();
    p.validate("").unwrap();
    p
}

fn two_stage() -> PlanSpec {
    plan(json!({"name": "p", "stages": [
        {"name": "a", "tasks": [{"kind": "noop"}, {"kind": "noop"}]},
        {"name": "b", "tasks": [{"kind": "noop"}]},
    ]}))
}

fn new(plan: PlanSpec, subject: &str) -> NewMigration {
    NewMigration {
        plan,
        subject: subject.into(),
        parameters: json!({}),
        pool: "default".into(),
        deadline_ms: None,
        idempotency_key: None,
    }
}

fn done(lease: LeaseToken) -> Completion {
    Completion {
        lease,
        output: json!({}),
        add_tasks: vec![],
    }
}

const W: &str = "w1";

fn kinds(k: &[&str]) -> Vec<String> {
    k.iter().map(|s| s.to_string()).collect()
}

async fn kinds_of(s: &SqliteStore, id: i64) -> Vec<EventKind> {
    s.list_events(id, 0, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind)
        .collect()
}

#[tokio::test]
async fn stages_run_in_order_and_the_migration_succeeds() {
    let db = store().await;
    let s = &db.store;
    let (c, fx) = s
        .create_migration(&new(two_stage(), "project/1"))
        .await
        .unwrap();
    assert!(c.created && fx.dispatch);
    let first = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert_eq!(
        first.len(),
        2,
        "both tasks of stage a, none of stage b (I1)"
    );
    assert!(
        first
            .iter()
            .all(|a| a.stage_index == 0 && a.lease.attempt == 1)
    );

    s.complete(W, &done(first[0].lease)).await.unwrap();
    assert!(
        s.claim(W, &kinds(&["noop"]), 10).await.unwrap().is_empty(),
        "stage b waits for all of a"
    );
    let (ack, _) = s.complete(W, &done(first[1].lease)).await.unwrap();
    assert_eq!(ack, ReportAck::Recorded);
    let second = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].stage_name, "b");
    s.complete(W, &done(second[0].lease)).await.unwrap();

    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(m.state, MigrationState::Succeeded);
    for st in &m.stages {
        assert_eq!(st.state, StageState::Succeeded);
        assert_eq!(
            st.total,
            st.succeeded + st.failed + st.canceled,
            "I5 counters"
        );
    }
    let ev = kinds_of(s, c.migration_id).await;
    assert_eq!(
        ev.iter().filter(|k| **k == EventKind::StageStarted).count(),
        2,
        "I2"
    );
    assert_eq!(ev.last(), Some(&EventKind::MigrationSucceeded));
}

#[tokio::test]
async fn duplicate_and_stale_reports_change_nothing() {
    let db = store().await;
    let s = &db.store;
    let (c, _) = s
        .create_migration(&new(two_stage(), "project/1"))
        .await
        .unwrap();
    let a = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    s.complete(W, &done(a[0].lease)).await.unwrap();
    let (ack, fx) = s.complete(W, &done(a[0].lease)).await.unwrap();
    assert_eq!(ack, ReportAck::Duplicate);
    assert!(fx.touched.is_empty());

    let stale = LeaseToken {
        task_id: a[1].lease.task_id,
        attempt: 7,
    };
    let err = s.complete(W, &done(stale)).await.unwrap_err();
    assert!(matches!(err, Error::LeaseNotHeld(_)), "{err}");
    assert!(err.to_string().contains("no longer held"), "{err}");
    let other = s.complete("w2", &done(a[1].lease)).await.unwrap_err();
    assert!(
        matches!(other, Error::LeaseNotHeld(_)),
        "a lease is held by one worker"
    );

    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(m.stages[0].succeeded, 1);
    assert_eq!(m.stages[1].state, StageState::Pending);
    let ev = kinds_of(s, c.migration_id).await;
    assert_eq!(
        ev.iter()
            .filter(|k| **k == EventKind::ReportRejected)
            .count(),
        2
    );
}

#[tokio::test]
async fn worker_slots_bound_live_leases() {
    let db = store().await;
    let s = &db.store;
    let p = plan(json!({"name": "p", "stages": [{"name": "a", "tasks": [
        {"kind": "noop"}, {"kind": "noop"}, {"kind": "noop"}, {"kind": "noop"}, {"kind": "noop"}]}]}));
    s.create_migration(&new(p, "s")).await.unwrap();
    assert_eq!(s.claim(W, &kinds(&["noop"]), 2).await.unwrap().len(), 2);
    assert_eq!(
        s.claim(W, &kinds(&["noop"]), 2).await.unwrap().len(),
        0,
        "I12"
    );
    assert_eq!(
        s.claim(W, &kinds(&["other"]), 2).await.unwrap().len(),
        0,
        "kinds filter"
    );
    assert_eq!(s.claim("w2", &kinds(&["noop"]), 8).await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_permanent_failure_fails_the_migration_and_stops_later_stages() {
    let db = store().await;
    let s = &db.store;
    let (c, _) = s
        .create_migration(&new(two_stage(), "project/1"))
        .await
        .unwrap();
    let a = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    let f = Failure {
        lease: a[0].lease,
        error: "disk full".into(),
        retryable: false,
    };
    let (_, fx) = s.fail(W, &f).await.unwrap();
    assert_eq!(fx.revoked.len(), 1, "the sibling's lease is revoked");
    assert_eq!(fx.revoked[0].lease, a[1].lease);
    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(m.state, MigrationState::Failed);
    assert!(
        m.reason.contains("noop") && m.reason.contains("disk full"),
        "{}",
        m.reason
    );
    assert_eq!(m.stages[0].state, StageState::Failed);
    assert_eq!(
        m.stages[0].total,
        m.stages[0].succeeded + m.stages[0].failed + m.stages[0].canceled
    );
    assert_eq!(
        m.stages[1].state,
        StageState::Pending,
        "no later stage started"
    );
    assert!(s.claim(W, &kinds(&["noop"]), 10).await.unwrap().is_empty());
    // The sibling's late success is rejected.
    assert!(matches!(
        s.complete(W, &done(a[1].lease)).await,
        Err(Error::LeaseNotHeld(_))
    ));
    // A repeated Fail is answered as the first was.
    assert_eq!(s.fail(W, &f).await.unwrap().0, ReportAck::Duplicate);
}

#[tokio::test]
async fn retryable_failures_back_off_then_the_task_dies() {
    let db = store().await;
    let s = &db.store;
    let p = plan(
        json!({"name": "p", "stages": [{"name": "a", "retry": {"max_attempts": 2, "initial_backoff_ms": 1, "max_backoff_ms": 1},
        "tasks": [{"kind": "noop"}]}]}),
    );
    let (c, _) = s.create_migration(&new(p, "s")).await.unwrap();
    let a = s.claim(W, &kinds(&["noop"]), 1).await.unwrap();
    s.fail(
        W,
        &Failure {
            lease: a[0].lease,
            error: "flaky".into(),
            retryable: true,
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let b = s.claim(W, &kinds(&["noop"]), 1).await.unwrap();
    assert_eq!(b[0].lease.attempt, 2);
    s.fail(
        W,
        &Failure {
            lease: b[0].lease,
            error: "flaky".into(),
            retryable: true,
        },
    )
    .await
    .unwrap();
    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(m.state, MigrationState::Failed);
    assert!(m.reason.contains("after 2 attempts: flaky"), "{}", m.reason);
}

#[tokio::test]
async fn tasks_fan_out_to_a_later_dynamic_stage_only() {
    let db = store().await;
    let s = &db.store;
    let p = plan(json!({"name": "p", "stages": [
        {"name": "inspect", "tasks": [{"kind": "noop"}]},
        {"name": "export", "dynamic": true},
        {"name": "empty", "dynamic": true},
        {"name": "end", "tasks": [{"kind": "noop"}]},
    ]}));
    let (c, _) = s.create_migration(&new(p, "s")).await.unwrap();
    let a = s.claim(W, &kinds(&["noop"]), 1).await.unwrap();
    let bad = Completion {
        lease: a[0].lease,
        output: json!({}),
        add_tasks: vec![NewTask {
            stage: "inspect".into(),
            kind: "noop".into(),
            payload: json!({}),
            max_attempts: 0,
        }],
    };
    let err = s.complete(W, &bad).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    let unknown = Completion {
        add_tasks: vec![NewTask {
            stage: "nope".into(),
            ..bad.add_tasks[0].clone()
        }],
        ..bad.clone()
    };
    assert!(matches!(
        s.complete(W, &unknown).await,
        Err(Error::InvalidArgument { .. })
    ));
    let fan = Completion {
        add_tasks: (0..3)
            .map(|i| NewTask {
                stage: "export".into(),
                kind: "noop".into(),
                payload: json!({"i": i}),
                max_attempts: 0,
            })
            .collect(),
        ..bad
    };
    s.complete(W, &fan).await.unwrap();
    let exports = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert_eq!(exports.len(), 3);
    assert!(exports.iter().all(|e| e.stage_name == "export"));
    for e in &exports {
        s.complete(W, &done(e.lease)).await.unwrap();
    }
    // The empty dynamic stage succeeded at once; "end" runs.
    let end = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert_eq!(end.len(), 1);
    assert_eq!(end[0].stage_name, "end");
    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(m.stages[2].state, StageState::Succeeded);
    assert_eq!(m.stages[1].total, 3);
}

#[tokio::test]
async fn a_serial_stage_runs_one_task_at_a_time_in_order() {
    let db = store().await;
    let s = &db.store;
    let p = plan(json!({"name": "p", "stages": [{"name": "a", "serial": true,
        "tasks": [{"kind": "noop", "payload": {"n": 1}}, {"kind": "noop", "payload": {"n": 2}}, {"kind": "noop", "payload": {"n": 3}}]}]}));
    s.create_migration(&new(p, "s")).await.unwrap();
    for n in 1..=3 {
        let a = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].payload, json!({"n": n}));
        s.complete(W, &done(a[0].lease)).await.unwrap();
    }
}

#[tokio::test]
async fn pools_admit_oldest_first_within_their_slots() {
    let db = store().await;
    let s = &db.store;
    s.set_pool_slots("default", 2).await.unwrap();
    let one = plan(json!({"name": "p", "stages": [{"name": "a", "tasks": [{"kind": "noop"}]}]}));
    let mut ids = vec![];
    for i in 0..4 {
        ids.push(
            s.create_migration(&new(one.clone(), &format!("s{i}")))
                .await
                .unwrap()
                .0
                .migration_id,
        );
    }
    let state = |id| async move { s.get_migration(id).await.unwrap().unwrap().state };
    assert_eq!(state(ids[1]).await, MigrationState::Running);
    assert_eq!(
        state(ids[2]).await,
        MigrationState::Queued,
        "I3: never more than the slots"
    );
    let a = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert_eq!(a.len(), 2);
    s.complete(W, &done(a[0].lease)).await.unwrap();
    assert_eq!(
        state(ids[2]).await,
        MigrationState::Running,
        "admitted at once when a slot frees"
    );
    assert_eq!(state(ids[3]).await, MigrationState::Queued);
    s.set_pool_paused("default", true).await.unwrap();
    s.complete(W, &done(a[1].lease)).await.unwrap();
    assert_eq!(
        state(ids[3]).await,
        MigrationState::Queued,
        "paused pools admit nothing"
    );
    let (pool, _) = s.set_pool_paused("default", false).await.unwrap();
    assert_eq!((pool.running, pool.queued), (2, 0));
}

#[tokio::test]
async fn one_unfinished_run_per_subject_and_idempotent_create() {
    let db = store().await;
    let s = &db.store;
    let mut m = new(two_stage(), "project/9");
    m.idempotency_key = Some("k1".into());
    let (first, _) = s.create_migration(&m).await.unwrap();
    let (again, _) = s.create_migration(&m).await.unwrap();
    assert_eq!(again.migration_id, first.migration_id);
    assert!(!again.created);
    let err = s
        .create_migration(&new(two_stage(), "project/9"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)));
    assert!(
        err.to_string().contains(&first.migration_id.to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn cancel_revokes_leases_and_retry_resumes_at_the_unfinished_stage() {
    let db = store().await;
    let s = &db.store;
    let (c, _) = s.create_migration(&new(two_stage(), "s")).await.unwrap();
    let a = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    s.complete(W, &done(a[0].lease)).await.unwrap();
    s.complete(W, &done(a[1].lease)).await.unwrap();
    let b = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    let fx = s.cancel_migration(c.migration_id, "").await.unwrap();
    assert_eq!(fx.revoked.len(), 1);
    assert_eq!(fx.revoked[0].lease, b[0].lease);
    let hb = s
        .heartbeat(
            W,
            &[LeaseStatus {
                lease: b[0].lease,
                done: 1,
                total: 2,
                checkpoint: None,
            }],
        )
        .await
        .unwrap();
    assert_eq!(
        hb.cancel.len(),
        1,
        "the heartbeat answer tells the worker to stop (I9)"
    );
    assert!(s.claim(W, &kinds(&["noop"]), 10).await.unwrap().is_empty());
    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(m.state, MigrationState::Canceled);
    assert!(matches!(
        s.cancel_migration(c.migration_id, "").await,
        Err(Error::FailedPrecondition(_))
    ));

    s.retry_migration(c.migration_id).await.unwrap();
    let again = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert_eq!(again.len(), 1, "stage a is not run again");
    assert_eq!(again[0].stage_name, "b");
    assert_eq!(again[0].lease.attempt, b[0].lease.attempt + 1);
    s.complete(W, &done(again[0].lease)).await.unwrap();
    assert_eq!(
        s.get_migration(c.migration_id)
            .await
            .unwrap()
            .unwrap()
            .state,
        MigrationState::Succeeded
    );
}

#[tokio::test]
async fn expired_leases_are_reassigned_until_the_cap() {
    let db = store_with(Limits {
        lease_ms: 1,
        max_reassignments: 2,
    })
    .await;
    let s = &db.store;
    let p = plan(json!({"name": "p", "stages": [{"name": "a", "tasks": [{"kind": "noop"}]}]}));
    let (c, _) = s.create_migration(&new(p, "s")).await.unwrap();
    let a = s.claim(W, &kinds(&["noop"]), 1).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let (report, _) = s.sweep().await.unwrap();
    assert_eq!(report.leases_expired, 1);
    let b = s.claim("w2", &kinds(&["noop"]), 1).await.unwrap();
    assert_eq!(b[0].lease.attempt, 2);
    assert!(
        matches!(
            s.complete(W, &done(a[0].lease)).await,
            Err(Error::LeaseNotHeld(_))
        ),
        "late worker rejected"
    );
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let (report, _) = s.sweep().await.unwrap();
    assert_eq!(report.tasks_dead, 1);
    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(m.state, MigrationState::Failed);
    assert!(m.reason.contains("lost its worker 2 times"), "{}", m.reason);
}

#[tokio::test]
async fn a_migration_past_its_deadline_fails() {
    let db = store().await;
    let s = &db.store;
    let mut m = new(two_stage(), "s");
    m.deadline_ms = Some(stagecoach_coordinator::clock::now_ms() - 1);
    let (c, _) = s.create_migration(&m).await.unwrap();
    let (report, _) = s.sweep().await.unwrap();
    assert_eq!(report.deadlines_exceeded, 1);
    let got = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(
        (got.state, got.reason.as_str()),
        (MigrationState::Failed, "deadline exceeded")
    );
}

#[tokio::test]
async fn an_attempt_past_its_timeout_fails_as_retryable_and_its_worker_is_told() {
    let db = store().await;
    let s = &db.store;
    let p = plan(json!({"name": "p", "stages": [{"name": "a",
        "retry": {"max_attempts": 2, "initial_backoff_ms": 1, "max_backoff_ms": 1, "attempt_timeout_ms": 1},
        "tasks": [{"kind": "noop"}]}]}));
    let (c, _) = s.create_migration(&new(p, "s")).await.unwrap();
    let a = s.claim(W, &kinds(&["noop"]), 1).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let (report, fx) = s.sweep().await.unwrap();
    assert_eq!(report.attempts_timed_out, 1);
    assert_eq!(fx.revoked.len(), 1);
    assert_eq!(fx.revoked[0].lease, a[0].lease);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let b = s.claim(W, &kinds(&["noop"]), 1).await.unwrap();
    assert_eq!(b[0].lease.attempt, 2);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    s.sweep().await.unwrap();
    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(m.state, MigrationState::Failed);
    assert!(m.reason.contains("timed out after 1 ms"), "{}", m.reason);
}
