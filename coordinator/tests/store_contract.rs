//! Store contract tests: the state machines and invariants, driven through
//! the `Store` trait exactly as the core drives it, without a network.
//!
//! Every case runs on both backends: `sqlite::<case>` and `postgres::<case>`
//! (a real PostgreSQL server, see `support/postgres.rs`). Cases only
//! PostgreSQL has — several coordinators on one database — are in
//! `shared_database`.

use serde_json::json;
use stagecoach_coordinator::domain::{
    Assignment, Completion, EventKind, Failure, LeaseStatus, LeaseToken, MigrationState, NewTask,
    ReportAck, StageState, TaskSpec,
};
use stagecoach_coordinator::error::Error;
use stagecoach_coordinator::store::Limits;

mod support;

use support::contract::*;

async fn stages_run_in_order_and_the_migration_succeeds(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
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

    s.complete(W, &done(&first[0])).await.unwrap();
    assert!(
        s.claim(W, &kinds(&["noop"]), 10).await.unwrap().is_empty(),
        "stage b waits for all of a"
    );
    let (ack, _) = s.complete(W, &done(&first[1])).await.unwrap();
    assert_eq!(ack, ReportAck::Recorded);
    let second = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].stage_name, "b");
    s.complete(W, &done(&second[0])).await.unwrap();

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

async fn duplicate_and_stale_reports_change_nothing(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let (c, _) = s
        .create_migration(&new(two_stage(), "project/1"))
        .await
        .unwrap();
    let a = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    s.complete(W, &done(&a[0])).await.unwrap();
    let (ack, fx) = s.complete(W, &done(&a[0])).await.unwrap();
    assert_eq!(ack, ReportAck::Duplicate);
    assert!(fx.touched.is_empty());

    let stale = LeaseToken {
        task_id: a[1].lease.task_id,
        attempt: 7,
    };
    // The live secret does not make a stale attempt live.
    let err = s
        .complete(W, &done_as(stale, a[1].secret))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LeaseNotHeld(_)), "{err}");
    assert!(err.to_string().contains("no longer held"), "{err}");
    let other = s.complete("w2", &done(&a[1])).await.unwrap_err();
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

async fn worker_slots_bound_live_leases(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
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

async fn a_permanent_failure_fails_the_migration_and_stops_later_stages(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let (c, _) = s
        .create_migration(&new(two_stage(), "project/1"))
        .await
        .unwrap();
    let a = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    let f = Failure {
        lease: a[0].lease,
        secret: a[0].secret,
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
        s.complete(W, &done(&a[1])).await,
        Err(Error::LeaseNotHeld(_))
    ));
    // A repeated Fail is answered as the first was.
    assert_eq!(s.fail(W, &f).await.unwrap().0, ReportAck::Duplicate);
}

async fn retryable_failures_back_off_then_the_task_dies(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
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
            secret: a[0].secret,
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
            secret: b[0].secret,
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

async fn tasks_fan_out_to_a_later_dynamic_stage_only(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
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
        secret: a[0].secret,
        output: json!({}),
        add_tasks: vec![NewTask {
            stage: "inspect".into(),
            task: TaskSpec::new("noop", json!({})),
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
    let with_timeout = |ms| {
        let mut t = TaskSpec::new("noop", json!({}));
        t.retry.heartbeat_timeout_ms = ms;
        NewTask {
            stage: "export".into(),
            task: t,
        }
    };
    // A bad second task adds nothing, not even the good first one.
    let too_short = Completion {
        add_tasks: vec![with_timeout(4_000), with_timeout(10)],
        ..bad.clone()
    };
    match s.complete(W, &too_short).await {
        Err(Error::InvalidArgument { field, .. }) => {
            assert_eq!(field, "add_tasks[1].retry.heartbeat_timeout_ms")
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    let mut added: Vec<NewTask> = (0..2)
        .map(|i| NewTask {
            stage: "export".into(),
            task: TaskSpec::new("noop", json!({"i": i})),
        })
        .collect();
    added.push(with_timeout(4_000));
    let fan = Completion {
        add_tasks: added,
        ..bad
    };
    s.complete(W, &fan).await.unwrap();
    let exports = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert_eq!(exports.len(), 3);
    assert!(exports.iter().all(|e| e.stage_name == "export"));
    let leases: Vec<i64> = exports.iter().map(|e| e.lease_ms).collect();
    assert_eq!(leases, [LIMITS.lease_ms, LIMITS.lease_ms, 4_000]);
    for e in &exports {
        s.complete(W, &done(e)).await.unwrap();
    }
    // The empty dynamic stage succeeded at once; "end" runs.
    let end = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert_eq!(end.len(), 1);
    assert_eq!(end[0].stage_name, "end");
    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(m.stages[2].state, StageState::Succeeded);
    assert_eq!(m.stages[1].total, 3);
}

async fn a_serial_stage_runs_one_task_at_a_time_in_order(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let p = plan(json!({"name": "p", "stages": [{"name": "a", "serial": true,
        "tasks": [{"kind": "noop", "payload": {"n": 1}}, {"kind": "noop", "payload": {"n": 2}}, {"kind": "noop", "payload": {"n": 3}}]}]}));
    s.create_migration(&new(p, "s")).await.unwrap();
    for n in 1..=3 {
        let a = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].payload, json!({"n": n}));
        s.complete(W, &done(&a[0])).await.unwrap();
    }
}

async fn pools_admit_oldest_first_within_their_slots(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
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
    s.complete(W, &done(&a[0])).await.unwrap();
    assert_eq!(
        state(ids[2]).await,
        MigrationState::Running,
        "admitted at once when a slot frees"
    );
    assert_eq!(state(ids[3]).await, MigrationState::Queued);
    s.set_pool_paused("default", true).await.unwrap();
    s.complete(W, &done(&a[1])).await.unwrap();
    assert_eq!(
        state(ids[3]).await,
        MigrationState::Queued,
        "paused pools admit nothing"
    );
    let (pool, _) = s.set_pool_paused("default", false).await.unwrap();
    assert_eq!((pool.running, pool.queued), (2, 0));
}

async fn one_unfinished_run_per_subject_and_idempotent_create(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
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

async fn cancel_revokes_leases_and_retry_resumes_at_the_unfinished_stage(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let (c, _) = s.create_migration(&new(two_stage(), "s")).await.unwrap();
    let a = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    s.complete(W, &done(&a[0])).await.unwrap();
    s.complete(W, &done(&a[1])).await.unwrap();
    let b = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    let fx = s.cancel_migration(c.migration_id, "").await.unwrap();
    assert_eq!(fx.revoked.len(), 1);
    assert_eq!(fx.revoked[0].lease, b[0].lease);
    let hb = s
        .heartbeat(
            W,
            &[LeaseStatus {
                lease: b[0].lease,
                secret: b[0].secret,
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
    s.complete(W, &done(&again[0])).await.unwrap();
    assert_eq!(
        s.get_migration(c.migration_id)
            .await
            .unwrap()
            .unwrap()
            .state,
        MigrationState::Succeeded
    );
}

async fn expired_leases_are_reassigned_until_the_cap(b: Backend) {
    let db = store_with(
        b,
        Limits {
            lease_ms: 1,
            heartbeat_interval_ms: 1,
            // One expiry survived: two assignments, dead at the second expiry.
            max_reassignments: 1,
        },
    )
    .await;
    let s = &*db.store;
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
            s.complete(W, &done(&a[0])).await,
            Err(Error::LeaseNotHeld(_))
        ),
        "late worker rejected"
    );
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let (report, _) = s.sweep().await.unwrap();
    assert_eq!(report.tasks_dead, 1);
    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(m.state, MigrationState::Failed);
    assert!(
        m.reason
            .contains("lost its worker 2 times (at most 1 reassignment)"),
        "{}",
        m.reason
    );
}

async fn a_migration_past_its_deadline_fails(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let mut m = new(two_stage(), "s");
    m.deadline_ms = Some(stagecoach_coordinator::clock::now_ms() + 100);
    let (c, _) = s.create_migration(&m).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let (report, _) = s.sweep().await.unwrap();
    assert_eq!(report.deadlines_exceeded, 1);
    let got = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(
        (got.state, got.reason.as_str()),
        (MigrationState::Failed, "deadline exceeded")
    );
}

async fn an_attempt_past_its_timeout_fails_as_retryable_and_its_worker_is_told(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
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

/// An attempt's TaskAssigned event carries the instant its lease and its
/// timeout count from, so the log never shows an attempt timing out sooner
/// than its timeout after it started. One claim at a time, many times: a
/// clock read apart from the deadlines' differs from it in some of them.
async fn an_assignment_is_logged_at_the_instant_its_lease_counts_from(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let c = one_stage_of_noops(s, 60).await;
    let mut leases = Vec::new();
    for held in 0..60 {
        let a = s.claim(W, &kinds(&["noop"]), held + 1).await.unwrap();
        assert_eq!(a.len(), 1);
        leases.extend(a);
    }
    let events = s.list_events(c.migration_id, 0, 10_000).await.unwrap();
    for a in &leases {
        let assigned = events
            .iter()
            .find(|e| e.kind == EventKind::TaskAssigned && e.task_id == a.lease.task_id)
            .expect("its TaskAssigned event");
        assert_eq!(
            assigned.at_ms + a.lease_ms,
            a.lease_expires_at_ms,
            "task {}: assigned at {}, lease of {} ms expires at {}",
            a.lease.task_id,
            assigned.at_ms,
            a.lease_ms,
            a.lease_expires_at_ms
        );
    }
}

/// Leases and retries follow the task's own settings, else its stage's,
/// else the coordinator's: heartbeat timeout (claim and renewal), backoff
/// and attempt timeout.
async fn task_and_stage_settings_override_the_defaults(b: Backend) {
    use stagecoach_coordinator::clock::now_ms;
    let db = store(b).await;
    let s = &*db.store;
    let p = plan(json!({"name": "p", "stages": [{"name": "a",
    "retry": {"heartbeat_timeout_ms": 5000, "initial_backoff_ms": 60000, "max_backoff_ms": 60000},
    "tasks": [
        {"kind": "staged"},
        {"kind": "own", "retry": {"heartbeat_timeout_ms": 3000, "initial_backoff_ms": 1,
                                  "max_backoff_ms": 1, "attempt_timeout_ms": 1}}
    ]}]}));
    let (c, _) = s.create_migration(&new(p, "s")).await.unwrap();
    let close = |expires: i64, ms: i64| (expires - now_ms() - ms).abs() < 1_000;

    let staged = s.claim(W, &kinds(&["staged"]), 10).await.unwrap();
    assert_eq!(staged[0].lease_ms, 5_000, "the stage's heartbeat timeout");
    assert!(close(staged[0].lease_expires_at_ms, 5_000));
    let own = s.claim(W, &kinds(&["own"]), 10).await.unwrap();
    assert_eq!(own[0].lease_ms, 3_000, "the task's own heartbeat timeout");
    let beat = s
        .heartbeat(
            W,
            &[&staged[0], &own[0]].map(|a| LeaseStatus {
                lease: a.lease,
                secret: a.secret,
                done: 0,
                total: 0,
                checkpoint: None,
            }),
        )
        .await
        .unwrap();
    assert!(close(beat.renewed[0].1, 5_000), "{beat:?}");
    assert!(close(beat.renewed[1].1, 3_000), "{beat:?}");

    // The task's 1 ms backoff, not the stage's minute.
    for a in [&staged[0], &own[0]] {
        let f = Failure {
            lease: a.lease,
            secret: a.secret,
            error: "flaky".into(),
            retryable: true,
        };
        s.fail(W, &f).await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    assert!(
        s.claim(W, &kinds(&["staged"]), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = s.claim(W, &kinds(&["own"]), 10).await.unwrap();
    assert_eq!(again[0].lease.attempt, 2);
    // The task's 1 ms attempt timeout; the stage has none.
    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    let (report, _) = s.sweep().await.unwrap();
    assert_eq!(report.attempts_timed_out, 1);

    // A stage without settings gets the coordinator's lease.
    let p = plan(json!({"name": "q", "stages": [{"name": "a", "tasks": [{"kind": "plain"}]}]}));
    s.create_migration(&new(p, "t")).await.unwrap();
    let plain = s.claim(W, &kinds(&["plain"]), 10).await.unwrap();
    assert_eq!(plain[0].lease_ms, LIMITS.lease_ms);
    assert!(close(plain[0].lease_expires_at_ms, LIMITS.lease_ms));
    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(m.state, MigrationState::Running);
}

/// A batch of reports (group commit) records each live completion once, set
/// at a time, and answers repeats and stale tokens in the batch as single
/// reports are answered.
async fn a_batch_of_reports_records_each_once(b: Backend) {
    use stagecoach_coordinator::store::Report;
    let db = store(b).await;
    let s = &*db.store;
    let (c, a) = first_stage_claimed(s, 4).await;
    let stale = LeaseToken {
        attempt: 7,
        ..a[2].lease
    };
    // A stale token ahead of the live one of the same task: the live one
    // is still recorded.
    let stale = Assignment {
        lease: stale,
        ..a[2].clone()
    };
    let mut batch: Vec<(String, Report)> = [&a[0], &a[1], &a[0], &stale, &a[2]]
        .into_iter()
        .map(|l| (W.to_string(), Report::Complete(done(l))))
        .collect();
    // A live token, reported by a worker that does not hold it.
    batch.push(("intruder".to_string(), Report::Complete(done(&a[3]))));
    let results = s.report_many(&batch).await.unwrap();
    let acks: Vec<_> = results
        .iter()
        .map(|r| r.as_ref().map(|(ack, _)| *ack))
        .collect();
    assert!(matches!(acks[0], Ok(ReportAck::Recorded)), "{acks:?}");
    assert!(matches!(acks[1], Ok(ReportAck::Recorded)), "{acks:?}");
    assert!(matches!(acks[2], Ok(ReportAck::Duplicate)), "{acks:?}");
    assert!(matches!(acks[3], Err(Error::LeaseNotHeld(_))), "{acks:?}");
    assert!(matches!(acks[4], Ok(ReportAck::Recorded)), "{acks:?}");
    assert!(matches!(acks[5], Err(Error::LeaseNotHeld(_))), "{acks:?}");
    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(
        (m.stages[0].succeeded, m.stages[1].state),
        (3, StageState::Pending)
    );

    complete_as_one_batch(s, [&a[2], &a[3]]).await;
    let next = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].stage_name, "b");
    let events = kinds_of(s, c.migration_id).await;
    let count = |k| events.iter().filter(|&&e| e == k).count();
    assert_eq!(count(EventKind::TaskSucceeded), 4);
    assert_eq!(count(EventKind::StageStarted), 2);
    assert_eq!(count(EventKind::ReportRejected), 2);
}

/// A create whose migration is admitted at once hands out its first tasks
/// in its own commit, within the workers' slots; a queued one runs no pass.
async fn an_admitted_create_claims_in_its_commit(b: Backend) {
    use stagecoach_coordinator::store::ClaimRequest;
    let db = store(b).await;
    let s = &*db.store;
    s.create_pool("one", 1).await.unwrap();
    let request = [ClaimRequest {
        worker_id: W.into(),
        kinds: kinds(&["noop"]),
        slots: 1,
    }];
    let mut x = new(two_stage(), "x");
    x.pool = "one".into();
    let (c, fx, pass) = s.create_and_claim(&x, &request).await.unwrap();
    assert!(c.created && fx.touched.contains(&c.migration_id));
    let pass = pass.expect("admitted at once: a pass in the commit");
    assert!(!pass.partial);
    assert_eq!(pass.claimed[0].len(), 1, "one slot, one task");
    let first = &pass.claimed[0][0];
    assert_eq!(
        (first.migration_id, first.stage_name.as_str()),
        (c.migration_id, "a")
    );
    assert!(
        kinds_of(s, c.migration_id)
            .await
            .contains(&EventKind::TaskAssigned)
    );

    let mut y = new(two_stage(), "y");
    y.pool = "one".into();
    let (_, _, pass) = s.create_and_claim(&y, &request).await.unwrap();
    assert!(pass.is_none(), "queued: nothing to hand out");
}

/// A created migration's tasks queue behind every task that was ready
/// before them (here: a stage that started earlier), and a first stage
/// with no tasks hands over to the next at creation, whose tasks can be
/// claimed at once.
async fn created_tasks_queue_behind_older_ready_ones(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let older = s
        .create_migration(&new(two_stage(), "x"))
        .await
        .unwrap()
        .0
        .migration_id;
    for a in s.claim(W, &kinds(&["noop"]), 2).await.unwrap() {
        s.complete(W, &done(&a)).await.unwrap();
    }
    // Stage "b" of the older migration started: its task is ready. Ready
    // times are milliseconds: make the create's differ.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let skip_first = plan(json!({"name": "q", "stages": [
        {"name": "empty", "dynamic": true},
        {"name": "b", "tasks": [{"kind": "noop"}]},
    ]}));
    let newer = s
        .create_migration(&new(skip_first, "y"))
        .await
        .unwrap()
        .0
        .migration_id;
    // One more slot each time: a task at a time, oldest first.
    let mut order = Vec::new();
    for slots in 1..=2 {
        let a = s.claim(W, &kinds(&["noop"]), slots).await.unwrap();
        assert_eq!(a.len(), 1, "a ready task for every free slot");
        order.push((a[0].migration_id, a[0].stage_name.clone()));
    }
    assert_eq!(order, [(older, "b".to_string()), (newer, "b".to_string())]);
}

/// The checkpoint a heartbeat stored goes to the task's next assignment
/// (here after a hand-back, which keeps the attempt number), in the same
/// claim as a task that has none and gets none.
async fn the_next_attempt_gets_the_last_checkpoint(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let id = s
        .create_migration(&new(two_stage(), "x"))
        .await
        .unwrap()
        .0
        .migration_id;
    let first = s.claim(W, &kinds(&["noop"]), 2).await.unwrap();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|a| a.checkpoint.is_none()));
    let status = |a: &Assignment, checkpoint| LeaseStatus {
        lease: a.lease,
        secret: a.secret,
        done: 1,
        total: 2,
        checkpoint,
    };
    let beat = s
        .heartbeat(
            W,
            &[
                status(&first[0], Some(vec![7, 0, 255])),
                status(&first[1], None),
            ],
        )
        .await
        .unwrap();
    assert_eq!(beat.renewed.len(), 2, "{beat:?}");
    for a in &first {
        s.release(W, a.lease).await.unwrap();
    }
    let again = s.claim(W, &kinds(&["noop"]), 2).await.unwrap();
    let by_task = |task_id| again.iter().find(|a| a.lease.task_id == task_id).unwrap();
    let resumed = by_task(first[0].lease.task_id);
    assert_eq!(resumed.checkpoint.as_deref(), Some(&[7, 0, 255][..]));
    assert_eq!(resumed.lease.attempt, first[0].lease.attempt);
    assert_eq!(by_task(first[1].lease.task_id).checkpoint, None);
    assert!(again.iter().all(|a| a.migration_id == id));
}

/// The event log reads the same page by page as whole, one event per task
/// transition: a claim's and a group commit's task events (written together
/// on PostgreSQL) page by cursor in id order, each once, in the order they
/// happened, between the single events around them.
async fn the_event_log_pages_by_cursor_one_event_at_a_time(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let (c, a) = first_stage_claimed(s, 5).await;
    // Reported in reverse: the log keeps the order they were recorded in.
    complete_as_one_batch(s, a.iter().rev()).await;
    let next = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    s.complete(W, &done(&next[0])).await.unwrap();

    let all = s.list_events(c.migration_id, 0, 10_000).await.unwrap();
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "{all:?}");
    for size in [1, 2, 3, 7] {
        let (mut paged, mut cursor) = (Vec::new(), 0);
        loop {
            let page = s.list_events(c.migration_id, cursor, size).await.unwrap();
            assert!(page.len() <= size as usize);
            let Some(last) = page.last() else { break };
            assert!(
                last.id > cursor,
                "a page after {cursor} went back: {page:?}"
            );
            cursor = last.id;
            paged.extend(page);
        }
        assert_eq!(paged, all, "pages of {size}");
    }
    let tasks_of = |kind| -> Vec<i64> {
        all.iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.task_id)
            .collect()
    };
    let mut ids: Vec<i64> = a.iter().map(|t| t.lease.task_id).collect();
    ids.push(next[0].lease.task_id);
    assert_eq!(tasks_of(EventKind::TaskAssigned), ids);
    ids[..5].reverse();
    assert_eq!(tasks_of(EventKind::TaskSucceeded), ids);
    for e in all.iter().filter(|e| e.task_id != 0) {
        assert_eq!((e.worker_id.as_str(), e.attempt), (W, 1), "{e:?}");
        assert_eq!(e.stage_index, Some(u32::from(e.task_id == ids[5])), "{e:?}");
    }
    let kinds = kinds_of(s, c.migration_id).await;
    let stage_b = kinds
        .iter()
        .rposition(|&k| k == EventKind::StageStarted)
        .unwrap();
    let last_a_success = kinds[..stage_b]
        .iter()
        .rposition(|&k| k == EventKind::TaskSucceeded)
        .unwrap();
    assert_eq!(
        kinds[last_a_success + 1],
        EventKind::StageSucceeded,
        "{kinds:?}"
    );
}

/// Tasks leased and finished one at a time log one event per batch: a page
/// must read on through as many batches as it takes to fill it.
async fn a_page_of_the_event_log_reads_through_many_small_batches(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let c = one_stage_of_noops(s, 12).await;
    for _ in 0..12 {
        let a = s.claim(W, &kinds(&["noop"]), 1).await.unwrap();
        s.complete(W, &done(&a[0])).await.unwrap();
    }
    let all = s.list_events(c.migration_id, 0, 10_000).await.unwrap();
    assert_eq!(all.iter().filter(|e| e.task_id != 0).count(), 24, "{all:?}");
    for size in [5, 10, 30] {
        let (mut paged, mut cursor) = (Vec::new(), 0);
        loop {
            let page = s.list_events(c.migration_id, cursor, size).await.unwrap();
            let Some(last) = page.last() else { break };
            let rest = all.iter().filter(|e| e.id > cursor).count();
            assert_eq!(page.len(), rest.min(size as usize), "a page after {cursor}");
            cursor = last.id;
            paged.extend(page);
        }
        assert_eq!(paged, all, "pages of {size}");
    }
}

/// A reader tailing the log while stages finish sees every event: each
/// commit logs a stage's end and the next one's start as single events and
/// then the next task's assignment as a batch, numbered after them, so a
/// page that read the batch but not those events would move its cursor past
/// them for good.
async fn a_tailing_reader_misses_no_event_while_stages_advance(b: Backend) {
    use stagecoach_coordinator::store::{ClaimRequest, Report};
    let db = store(b).await;
    let s = db.store.clone();
    let stages: Vec<_> = (0..150)
        .map(|i| json!({"name": format!("s{i}"), "tasks": [{"kind": "noop"}]}))
        .collect();
    let p = plan(json!({"name": "p", "stages": stages}));
    let id = s
        .create_migration(&new(p, "s"))
        .await
        .unwrap()
        .0
        .migration_id;
    let writer = tokio::spawn({
        let s = s.clone();
        async move {
            let request = ClaimRequest {
                worker_id: W.into(),
                kinds: kinds(&["noop"]),
                slots: 1,
            };
            let mut lease = s.claim(W, &request.kinds, 1).await.unwrap()[0].clone();
            loop {
                let report = (W.to_string(), Report::Complete(done(&lease)));
                let (results, pass) = s
                    .report_and_claim(&[report], std::slice::from_ref(&request))
                    .await
                    .unwrap();
                assert!(results[0].is_ok(), "{results:?}");
                let next = match pass {
                    Some(pass) => pass.claimed[0].first().cloned(),
                    None => s
                        .claim(W, &request.kinds, 1)
                        .await
                        .unwrap()
                        .first()
                        .cloned(),
                };
                let Some(next) = next else { break };
                lease = next;
            }
        }
    });
    let (mut seen, mut cursor) = (Vec::new(), 0);
    loop {
        let finished = writer.is_finished();
        let page = s.list_events(id, cursor, 1000).await.unwrap();
        if let Some(last) = page.last() {
            cursor = last.id;
        } else if finished {
            break;
        }
        seen.extend(page);
    }
    writer.await.unwrap();
    let all = s.list_events(id, 0, 10_000).await.unwrap();
    assert_eq!(all.len(), seen.len(), "the tailing reader missed events");
    assert_eq!(seen, all);
}

/// A report batch refills exactly the slots its completions freed, whether
/// its store runs the pass in the batch's commit or leaves it to a later
/// one (I12): a worker's slots are not freed by another worker's
/// completions, nor counted twice.
async fn a_report_batch_refills_exactly_the_slots_it_freed(b: Backend) {
    refills(b, 3, 1, 2, 1).await;
}

/// The same with batches big enough that PostgreSQL counts the pass's
/// leases in the completion statement.
async fn a_big_report_batch_refills_exactly_the_slots_it_freed(b: Backend) {
    refills(b, 150, 64, 70, 64).await;
}

/// W claims `slots` tasks and w2 `theirs`; w2 completes all of its, then W
/// `first` and then `second` of its, each in one batch that also claims
/// for W: W gets nothing, then `first`, then `second` tasks.
async fn refills(b: Backend, slots: usize, theirs: usize, first: usize, second: usize) {
    use stagecoach_coordinator::store::{ClaimRequest, Report};
    let db = store(b).await;
    let s = &*db.store;
    one_stage_of_noops(s, slots + theirs + first + second + 10).await;
    let request = ClaimRequest {
        worker_id: W.into(),
        kinds: kinds(&["noop"]),
        slots: slots as u32,
    };
    let held: Vec<Assignment> = s.claim(W, &request.kinds, request.slots).await.unwrap();
    assert_eq!(held.len(), slots);
    let other: Vec<Assignment> = s.claim("w2", &request.kinds, theirs as u32).await.unwrap();
    // Completes `leases` of `worker` in one batch that also claims for W:
    // how many tasks W got.
    let refill = async |worker: &str, leases: &[Assignment]| {
        let reports: Vec<_> = leases
            .iter()
            .map(|l| (worker.to_string(), Report::Complete(done(l))))
            .collect();
        let (results, pass) = s
            .report_and_claim(&reports, std::slice::from_ref(&request))
            .await
            .unwrap();
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        let pass = match pass {
            Some(pass) => pass,
            None => s.claim_many(std::slice::from_ref(&request)).await.unwrap(),
        };
        pass.claimed[0].len()
    };
    assert_eq!(refill("w2", &other).await, 0, "W is full");
    assert_eq!(refill(W, &held[..first]).await, first, "W freed {first}");
    let next = &held[first..first + second];
    assert_eq!(refill(W, next).await, second, "W freed {second}");
}

on_both_backends!(
    stages_run_in_order_and_the_migration_succeeds,
    duplicate_and_stale_reports_change_nothing,
    worker_slots_bound_live_leases,
    a_permanent_failure_fails_the_migration_and_stops_later_stages,
    retryable_failures_back_off_then_the_task_dies,
    tasks_fan_out_to_a_later_dynamic_stage_only,
    a_serial_stage_runs_one_task_at_a_time_in_order,
    pools_admit_oldest_first_within_their_slots,
    one_unfinished_run_per_subject_and_idempotent_create,
    cancel_revokes_leases_and_retry_resumes_at_the_unfinished_stage,
    expired_leases_are_reassigned_until_the_cap,
    a_migration_past_its_deadline_fails,
    an_attempt_past_its_timeout_fails_as_retryable_and_its_worker_is_told,
    an_assignment_is_logged_at_the_instant_its_lease_counts_from,
    task_and_stage_settings_override_the_defaults,
    a_batch_of_reports_records_each_once,
    an_admitted_create_claims_in_its_commit,
    created_tasks_queue_behind_older_ready_ones,
    the_next_attempt_gets_the_last_checkpoint,
    the_event_log_pages_by_cursor_one_event_at_a_time,
    a_page_of_the_event_log_reads_through_many_small_batches,
    a_tailing_reader_misses_no_event_while_stages_advance,
    a_report_batch_refills_exactly_the_slots_it_freed,
    a_big_report_batch_refills_exactly_the_slots_it_freed,
);

/// Several coordinators on one PostgreSQL database: the same transitions
/// race each other for real, through separate stores and connections.
mod shared_database {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use serde_json::json;
    use stagecoach_coordinator::domain::{EventKind, MigrationState, NewMigration, StageState};
    use stagecoach_coordinator::error::Error;
    use stagecoach_coordinator::store::{Effects, PostgresStore, Store};

    use super::{LIMITS, done, kinds, kinds_of, new, plan, support};

    /// Two coordinators' stores on one fresh database.
    async fn two_stores() -> (Arc<dyn Store>, Arc<dyn Store>) {
        let (a, b, _) = two_stores_at().await;
        (a, b)
    }

    /// The same, and the database's URL.
    async fn two_stores_at() -> (Arc<dyn Store>, Arc<dyn Store>, String) {
        let url = support::postgres::fresh_database();
        let a = PostgresStore::open(&url, LIMITS).await.unwrap();
        let b = PostgresStore::open(&url, LIMITS).await.unwrap();
        a.ensure_pool("default", 100).await.unwrap();
        (Arc::new(a), Arc::new(b), url)
    }

    /// Another session holding migration `id`'s row lock until the
    /// returned transaction ends.
    async fn hold_migration(url: &str, id: i64) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let other = sqlx::PgPool::connect(url).await.unwrap();
        let mut held = other.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM migrations WHERE id = $1 FOR UPDATE")
            .bind(id)
            .execute(&mut *held)
            .await
            .unwrap();
        held
    }

    fn wide(tasks: usize) -> serde_json::Value {
        json!(
            (0..tasks)
                .map(|i| json!({"kind": "noop", "payload": {"i": i}}))
                .collect::<Vec<_>>()
        )
    }

    fn one_task() -> NewMigration {
        new(
            plan(json!({"name": "p", "stages": [{"name": "a", "tasks": [{"kind": "noop"}]}]})),
            "unused",
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn workers_of_two_coordinators_never_lease_a_task_twice() {
        let (a, b) = two_stores().await;
        let p = plan(json!({"name": "p", "stages": [
            {"name": "one", "tasks": wide(24)}, {"name": "two", "tasks": wide(24)}]}));
        let (c, _) = a.create_migration(&new(p, "s")).await.unwrap();
        let leased = Arc::new(Mutex::new(Vec::new()));
        let mut workers = Vec::new();
        for (n, store) in [&a, &b, &a, &b].into_iter().enumerate() {
            let (store, leased) = (store.clone(), leased.clone());
            workers.push(tokio::spawn(async move {
                let worker = format!("w{n}");
                let end = Instant::now() + Duration::from_secs(30);
                while Instant::now() < end {
                    let got = store.claim(&worker, &kinds(&["noop"]), 3).await.unwrap();
                    if got.is_empty() {
                        let m = store.get_migration(c.migration_id).await.unwrap().unwrap();
                        if m.state.is_terminal() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    for g in got {
                        leased.lock().unwrap().push(g.lease);
                        store.complete(&worker, &done(&g)).await.unwrap();
                    }
                }
            }));
        }
        // A watcher pages through the log by cursor while the workers race,
        // as WatchMigration does: it must see every event, none skipped
        // because it committed after a later one.
        let watcher = {
            let store = b.clone();
            tokio::spawn(async move {
                let (mut seen, mut cursor) = (Vec::new(), 0);
                loop {
                    let terminal = store
                        .get_migration(c.migration_id)
                        .await
                        .unwrap()
                        .unwrap()
                        .state
                        .is_terminal();
                    let page = store
                        .list_events(c.migration_id, cursor, 1000)
                        .await
                        .unwrap();
                    if let Some(last) = page.last() {
                        cursor = last.id;
                    }
                    seen.extend(page.iter().map(|e| e.id));
                    if terminal {
                        return seen;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        for w in workers {
            w.await.unwrap();
        }
        let seen = watcher.await.unwrap();
        let all: Vec<i64> = a
            .list_events(c.migration_id, 0, 10_000)
            .await
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(seen, all, "a cursor reader skipped an event");
        let leased = leased.lock().unwrap().clone();
        let tasks: HashSet<i64> = leased.iter().map(|l| l.task_id).collect();
        assert_eq!(tasks.len(), leased.len(), "a task was leased twice (I4)");
        assert_eq!(leased.len(), 48);
        assert!(leased.iter().all(|l| l.attempt == 1));
        let m = a.get_migration(c.migration_id).await.unwrap().unwrap();
        assert_eq!(m.state, MigrationState::Succeeded);
        for st in &m.stages {
            assert_eq!((st.succeeded, st.total), (24, 24), "I5");
        }
        let ev = kinds_of(&*b, c.migration_id).await;
        let count = |k| ev.iter().filter(|e| **e == k).count();
        assert_eq!(count(EventKind::StageStarted), 2, "I2");
        assert_eq!(count(EventKind::TaskAssigned), 48);
        assert_eq!(count(EventKind::TaskSucceeded), 48);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_worker_claiming_through_two_coordinators_keeps_its_slots() {
        let (a, b) = two_stores().await;
        let p = plan(json!({"name": "p", "stages": [{"name": "a", "tasks": wide(60)}]}));
        a.create_migration(&new(p, "s")).await.unwrap();
        const W: &str = "same-worker";
        let noop = kinds(&["noop"]);
        for round in 0..20 {
            let (x, y) = tokio::join!(a.claim(W, &noop, 3), b.claim(W, &noop, 3));
            let (x, y) = (x.unwrap(), y.unwrap());
            assert!(
                x.len() + y.len() <= 3,
                "round {round}: I12 across coordinators"
            );
            assert_eq!(a.live_leases(W).await.unwrap().len(), x.len() + y.len());
            for l in x.iter().chain(&y) {
                a.complete(W, &done(l)).await.unwrap();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_coordinators_admit_into_one_free_slot_exactly_once() {
        let (a, b) = two_stores().await;
        a.create_pool("one", 1).await.unwrap();
        for round in 0..20 {
            let mut x = one_task();
            x.pool = "one".into();
            x.subject = format!("x{round}");
            let mut y = x.clone();
            y.subject = format!("y{round}");
            let (rx, ry) = tokio::join!(a.create_migration(&x), b.create_migration(&y));
            let (x, y) = (rx.unwrap().0.migration_id, ry.unwrap().0.migration_id);
            let pool = a.list_pools().await.unwrap();
            let pool = pool.iter().find(|p| p.name == "one").unwrap();
            assert_eq!((pool.running, pool.queued), (1, 1), "round {round}: I3");
            // Cancels race too: canceling the running one admits the queued
            // one, which the other coordinator is canceling at that moment.
            let (cx, cy) = tokio::join!(a.cancel_migration(x, ""), b.cancel_migration(y, ""));
            cx.unwrap();
            cy.unwrap();
            let pool = b.list_pools().await.unwrap();
            let pool = pool.iter().find(|p| p.name == "one").unwrap();
            assert_eq!((pool.running, pool.queued), (0, 0), "round {round}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_last_completions_at_once_start_the_next_stage_once() {
        let (a, b) = two_stores().await;
        let p = plan(json!({"name": "p", "stages": [
            {"name": "a", "tasks": wide(2)}, {"name": "b", "tasks": wide(1)}]}));
        for round in 0..10 {
            let (c, _) = a
                .create_migration(&new(p.clone(), &format!("s{round}")))
                .await
                .unwrap();
            let got = a.claim("w", &kinds(&["noop"]), 2).await.unwrap();
            assert_eq!(got.len(), 2);
            let (first, second) = (done(&got[0]), done(&got[1]));
            let (r1, r2) = tokio::join!(a.complete("w", &first), b.complete("w", &second));
            r1.unwrap();
            r2.unwrap();
            let m = a.get_migration(c.migration_id).await.unwrap().unwrap();
            assert_eq!(m.stages[0].state, StageState::Succeeded);
            assert_eq!(m.stages[1].state, StageState::Running, "round {round}: I1");
            let ev = kinds_of(&*a, c.migration_id).await;
            let started = ev.iter().filter(|k| **k == EventKind::StageStarted).count();
            assert_eq!(started, 2, "round {round}: I2");
            let next = b.claim("w", &kinds(&["noop"]), 2).await.unwrap();
            assert_eq!(next.len(), 1);
            b.complete("w", &done(&next[0])).await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_creates_of_one_subject_make_one_migration() {
        let (a, b) = two_stores().await;
        for round in 0..10 {
            let mut m = one_task();
            m.subject = format!("busy{round}");
            let (x, y) = tokio::join!(a.create_migration(&m), b.create_migration(&m));
            let (winner, loser) = match (x, y) {
                (Ok((w, _)), Err(l)) | (Err(l), Ok((w, _))) => (w, l),
                (x, y) => panic!("round {round}: exactly one create wins (I8): {x:?} {y:?}"),
            };
            assert!(matches!(loser, Error::AlreadyExists(_)), "{loser}");
            let message = loser.to_string();
            assert!(
                message.contains(&winner.migration_id.to_string()),
                "{message}"
            );

            m.subject = format!("keyed{round}");
            m.idempotency_key = Some(format!("key{round}"));
            let (x, y) = tokio::join!(a.create_migration(&m), b.create_migration(&m));
            let (x, y) = (x.unwrap().0, y.unwrap().0);
            assert_eq!(x.migration_id, y.migration_id, "one key, one migration");
            assert!(x.created != y.created, "exactly one create created it");
        }
    }

    /// Receives effects until one satisfies `want`, for at most 10 s.
    async fn receive(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<Effects>,
        want: impl Fn(&Effects) -> bool,
    ) -> Effects {
        let wait = async {
            loop {
                let fx = rx.recv().await.expect("the listener ended");
                if want(&fx) {
                    return fx;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("no such effects arrived within 10 s")
    }

    #[tokio::test]
    async fn a_cancel_on_one_coordinator_reaches_the_other_and_not_itself() {
        let (a, b) = two_stores().await;
        let mut from_a = a.remote_effects().await.unwrap().unwrap();
        let mut from_b = b.remote_effects().await.unwrap().unwrap();
        let (c, _) = a
            .create_migration(&new(super::two_stage(), "s"))
            .await
            .unwrap();
        let created = receive(&mut from_b, |fx| fx.touched.contains(&c.migration_id)).await;
        assert!(created.dispatch, "a ready task wakes the other dispatcher");
        let held = a.claim("w", &kinds(&["noop"]), 1).await.unwrap();
        let fx = a.cancel_migration(c.migration_id, "").await.unwrap();
        assert_eq!(fx.revoked.len(), 1);
        let remote = receive(&mut from_b, |fx| !fx.revoked.is_empty()).await;
        assert_eq!(remote.revoked, fx.revoked);
        assert_eq!(remote.revoked[0].lease, held[0].lease);
        assert_eq!(remote.revoked[0].worker_id, "w");
        // A store skips its own notifications: it applied those effects itself.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(from_a.try_recv().is_err(), "own effects came back");
    }

    #[tokio::test]
    async fn the_listener_reconnects_and_says_it_may_have_missed_something() {
        let (a, b, url) = two_stores_at().await;
        let mut from_b = b.remote_effects().await.unwrap().unwrap();
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        // Other tests run beside this one on the same server: only this
        // test's database.
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        .fetch_all(&mut admin)
        .await
        .unwrap();
        assert_eq!(killed, vec![true], "exactly the one listener connection");
        let missed = receive(&mut from_b, |_| true).await;
        assert_eq!(
            missed,
            Effects {
                dispatch: true,
                ..Effects::default()
            }
        );
        let (c, _) = a.create_migration(&one_task()).await.unwrap();
        receive(&mut from_b, |fx| fx.touched.contains(&c.migration_id)).await;
    }

    /// PostgreSQL text cannot hold NUL, SQLite's can: a worker's error text
    /// is stored with U+FFFD instead, anything else is refused by name.
    #[tokio::test]
    async fn text_with_nul_is_stored_replaced_or_refused_clearly() {
        let (a, _) = two_stores().await;
        let (c, _) = a.create_migration(&one_task()).await.unwrap();
        let got = a.claim("w", &kinds(&["noop"]), 1).await.unwrap();
        let f = stagecoach_coordinator::domain::Failure {
            lease: got[0].lease,
            secret: got[0].secret,
            error: "bad\0byte".into(),
            retryable: false,
        };
        a.fail("w", &f).await.unwrap();
        let m = a.get_migration(c.migration_id).await.unwrap().unwrap();
        assert!(m.reason.ends_with("bad\u{FFFD}byte"), "{}", m.reason);
        let mut bad = one_task();
        bad.subject = "nul\0subject".into();
        let err = a.create_migration(&bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        assert!(err.to_string().contains("NUL"), "{err}");
    }

    /// A report commit publishes its batch's effects with the completions
    /// and, when its dispatch pass touched more, at commit too: the other
    /// coordinator hears of the completed migration and of the one whose
    /// task the pass leased.
    #[tokio::test]
    async fn a_report_commit_is_heard_by_the_other_coordinator() {
        use stagecoach_coordinator::store::{ClaimRequest, Report};
        let (a, b) = two_stores().await;
        let mut heard = b.remote_effects().await.unwrap().unwrap();
        let mut x = one_task();
        x.subject = "x".into();
        let x = a.create_migration(&x).await.unwrap().0.migration_id;
        let lease = a.claim("w1", &kinds(&["noop"]), 1).await.unwrap()[0].clone();
        let mut y = one_task();
        y.subject = "y".into();
        let y = a.create_migration(&y).await.unwrap().0.migration_id;
        // What the creates and the claim published is not this test's.
        tokio::time::sleep(Duration::from_millis(300)).await;
        while heard.try_recv().is_ok() {}

        let request = ClaimRequest {
            worker_id: "w2".into(),
            kinds: kinds(&["noop"]),
            slots: 1,
        };
        let report = ("w1".to_string(), Report::Complete(done(&lease)));
        let (results, pass) = a
            .report_and_claim(&[report], std::slice::from_ref(&request))
            .await
            .unwrap();
        assert!(results[0].is_ok(), "{results:?}");
        let got: Vec<i64> = pass.unwrap().claimed[0]
            .iter()
            .map(|t| t.migration_id)
            .collect();
        assert_eq!(got, vec![y]);
        let mut touched = HashSet::new();
        while !(touched.contains(&x) && touched.contains(&y)) {
            let fx = receive(&mut heard, |_| true).await;
            assert!(fx.dispatch, "{fx:?}");
            touched.extend(fx.touched);
        }
    }

    /// Admission skips a queued migration whose row another transaction
    /// holds (waiting could deadlock); the sweeper admits it afterwards.
    #[tokio::test]
    async fn a_queued_migration_skipped_while_held_is_admitted_by_the_sweeper() {
        let (a, _, url) = two_stores_at().await;
        a.create_pool("one", 1).await.unwrap();
        let mut x = one_task();
        x.pool = "one".into();
        x.subject = "x".into();
        let mut y = x.clone();
        y.subject = "y".into();
        let x = a.create_migration(&x).await.unwrap().0.migration_id;
        let y = a.create_migration(&y).await.unwrap().0.migration_id;
        let held = hold_migration(&url, y).await;
        a.cancel_migration(x, "").await.unwrap();
        let state = async |id| a.get_migration(id).await.unwrap().unwrap().state;
        assert_eq!(
            state(y).await,
            MigrationState::Queued,
            "skipped, not waited for"
        );
        held.rollback().await.unwrap();
        let (_, fx) = a.sweep().await.unwrap();
        assert_eq!(
            state(y).await,
            MigrationState::Running,
            "I3: admitted by the sweep"
        );
        assert!(fx.touched.contains(&y) && fx.dispatch);
    }

    /// A report commit's dispatch pass skips a migration another
    /// transaction holds (it already holds the reported tasks' migrations,
    /// so waiting could deadlock), says the pass was partial so the
    /// dispatcher runs again, and a later pass hands those tasks out.
    #[tokio::test]
    async fn a_report_commit_passes_over_a_held_migration_and_says_so() {
        use stagecoach_coordinator::store::{ClaimRequest, Report};
        let (a, _, url) = two_stores_at().await;
        let two = |subject| {
            let p = plan(json!({"name": "p", "stages": [{"name": "a", "tasks": wide(2)}]}));
            new(p, subject)
        };
        let x = a.create_migration(&two("x")).await.unwrap().0.migration_id;
        let first = a.claim("w1", &kinds(&["noop"]), 1).await.unwrap();
        assert_eq!(first[0].migration_id, x);
        let y = a.create_migration(&two("y")).await.unwrap().0.migration_id;
        let held = hold_migration(&url, y).await;
        let request = ClaimRequest {
            worker_id: "w2".into(),
            kinds: kinds(&["noop"]),
            slots: 10,
        };
        let report = ("w1".to_string(), Report::Complete(done(&first[0])));
        let (results, pass) = tokio::time::timeout(
            Duration::from_secs(10),
            a.report_and_claim(&[report], std::slice::from_ref(&request)),
        )
        .await
        .expect("skipped, not waited for")
        .unwrap();
        assert!(results[0].is_ok(), "{results:?}");
        let pass = pass.expect("PostgreSQL runs the pass in the commit");
        let got: Vec<i64> = pass.claimed[0].iter().map(|t| t.migration_id).collect();
        assert_eq!(got, vec![x], "only the free migration's task");
        assert!(pass.partial, "y's tasks were left behind with slots free");

        held.rollback().await.unwrap();
        let later = a.claim_many(&[request]).await.unwrap();
        let got: Vec<i64> = later.claimed[0].iter().map(|t| t.migration_id).collect();
        assert_eq!(got, vec![y, y]);
        assert!(!later.partial);
        // Nothing held, nothing left: a pass that is not partial.
        let report = (
            "w2".to_string(),
            Report::Complete(done(&later.claimed[0][0])),
        );
        let (_, pass) = a.report_and_claim(&[report], &[]).await.unwrap();
        assert!(!pass.unwrap().partial);
    }

    /// A batch of completions reads its leases before it takes their
    /// migrations' locks. A lease that ends and is handed out again
    /// meanwhile — here re-leased to the same worker at the next attempt,
    /// by the transaction holding the lock — must not be completed by the
    /// old token: the update checks it again (I4), and the report is
    /// answered as stale.
    #[tokio::test]
    async fn a_lease_taken_again_while_its_batch_waits_for_the_lock_is_not_completed() {
        use stagecoach_coordinator::store::Report;
        let (a, _, url) = two_stores_at().await;
        let x = a
            .create_migration(&one_task())
            .await
            .unwrap()
            .0
            .migration_id;
        let lease = a.claim("w1", &kinds(&["noop"]), 1).await.unwrap()[0].clone();
        let mut held = hold_migration(&url, x).await;
        let store = a.clone();
        let report = vec![("w1".to_string(), Report::Complete(done(&lease)))];
        let batch = tokio::spawn(async move { store.report_many(&report).await });
        let watch = sqlx::PgPool::connect(&url).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&watch)
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the batch never waited for the lock"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sqlx::query("UPDATE tasks SET attempt = attempt + 1 WHERE id = $1")
            .bind(lease.lease.task_id)
            .execute(&mut *held)
            .await
            .unwrap();
        held.commit().await.unwrap();
        let results = tokio::time::timeout(Duration::from_secs(10), batch)
            .await
            .expect("the batch ends once the lock is free")
            .unwrap()
            .unwrap();
        assert!(
            matches!(&results[0], Err(Error::LeaseNotHeld(_))),
            "{results:?}"
        );
        let events = kinds_of(&*a, x).await;
        assert!(!events.contains(&EventKind::TaskSucceeded), "{events:?}");
        let state: String = sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1")
            .bind(lease.lease.task_id)
            .fetch_one(&watch)
            .await
            .unwrap();
        assert_eq!(state, "leased", "still the new attempt's");
    }
}
