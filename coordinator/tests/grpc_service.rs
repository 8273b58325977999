//! Service tests: the gRPC handlers called directly (no socket), checking
//! status codes, that messages name the field, and that bad input stores
//! nothing — on SQLite and on a throwaway PostgreSQL.

mod support;

use support::contract::{Backend, Db, on_both_backends, store_with};

use std::time::Duration;

use stagecoach_coordinator::engine::{Coordinator, Timing};
use stagecoach_coordinator::grpc::{AdminApi, MigrationApi, WorkerApi};
use stagecoach_coordinator::store::Limits;
use stagecoach_proto::v1::{
    self as pb, admin_service_server::AdminService, migration_service_server::MigrationService,
    worker_service_server::WorkerService,
};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request};

struct Apis {
    migrations: MigrationApi,
    workers: WorkerApi,
    admin: AdminApi,
    _db: Db,
}

async fn apis(backend: Backend) -> Apis {
    let limits = Limits {
        lease_ms: 10_000,
        heartbeat_interval_ms: 100,
        max_reassignments: 3,
    };
    let db = store_with(backend, limits).await;
    let store = db.store.clone();
    let timing = Timing {
        heartbeat_interval: Duration::from_millis(100),
        lease_duration: Duration::from_secs(10),
        sweep_interval: Duration::from_millis(100),
    };
    let core = Coordinator::new(store, timing, CancellationToken::new());
    Apis {
        migrations: MigrationApi::new(core.clone()),
        workers: WorkerApi::new(core.clone()),
        admin: AdminApi::new(core),
        _db: db,
    }
}

fn json_plan(json: &str) -> Request<pb::PutPlanRequest> {
    Request::new(pb::PutPlanRequest {
        source: Some(pb::put_plan_request::Source::PlanJson(json.into())),
    })
}

fn noop_stage(name: &str) -> pb::StageSpec {
    pb::StageSpec {
        name: name.into(),
        tasks: vec![pb::TaskSpec {
            kind: "noop".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn plan_count(a: &Apis) -> usize {
    a.migrations
        .list_plans(Request::new(pb::ListPlansRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .plans
        .len()
}

async fn migration_count(a: &Apis) -> usize {
    let r = pb::ListMigrationsRequest::default();
    a.migrations
        .list_migrations(Request::new(r))
        .await
        .unwrap()
        .into_inner()
        .migrations
        .len()
}

async fn bad_plans_are_invalid_argument_naming_the_field_and_store_nothing(backend: Backend) {
    let a = apis(backend).await;
    let cases = [
        (r#"{"name":"p","stages":[]}"#, "stages"),
        (r#"{"name":"p","stages":[{"name":"a"}]}"#, "stages[0].tasks"),
        (
            r#"{"name":"p","stages":[{"name":"a","tasks":[{"kind":"noop"}]},{"name":"a","tasks":[{"kind":"noop"}]}]}"#,
            "stages[1].name",
        ),
        (
            r#"{"name":"p","stages":[{"name":"a","tasks":[{"knd":"noop"}]}]}"#,
            "unknown field `knd`",
        ),
        (
            r#"{"name":"","stages":[{"name":"a","tasks":[{"kind":"noop"}]}]}"#,
            "name",
        ),
        (
            r#"{"name":"p","stages":[{"name":"a","tasks":[{"kind":"noop","max_attempts":1000}]}]}"#,
            "stages[0].tasks[0].max_attempts",
        ),
        // Heartbeats come every 100 ms here: a timeout under 200 ms is refused.
        (
            r#"{"name":"p","stages":[{"name":"a","retry":{"heartbeat_timeout_ms":150},"tasks":[{"kind":"noop"}]}]}"#,
            "stages[0].retry.heartbeat_timeout_ms",
        ),
        (
            r#"{"name":"p","stages":[{"name":"a","tasks":[{"kind":"noop","retry":{"heartbeat_timeout_ms":199}}]}]}"#,
            "stages[0].tasks[0].retry.heartbeat_timeout_ms",
        ),
        ("not json", "plan_json"),
    ];
    for (json, field) in cases {
        let err = a.migrations.put_plan(json_plan(json)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{json}: {err:?}");
        assert!(
            err.message().contains(field),
            "{json}: message {:?} should name {field}",
            err.message()
        );
    }
    let empty = pb::Plan {
        name: "p".into(),
        ..Default::default()
    };
    let req = Request::new(pb::PutPlanRequest {
        source: Some(pb::put_plan_request::Source::Plan(empty)),
    });
    assert_eq!(
        a.migrations.put_plan(req).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(plan_count(&a).await, 0, "nothing is stored");
}

async fn bad_creates_store_nothing(backend: Backend) {
    let a = apis(backend).await;
    let plan = pb::Plan {
        name: "p".into(),
        stages: vec![noop_stage("a")],
        ..Default::default()
    };
    let req = Request::new(pb::PutPlanRequest {
        source: Some(pb::put_plan_request::Source::Plan(plan.clone())),
    });
    let stored = a
        .migrations
        .put_plan(req)
        .await
        .unwrap()
        .into_inner()
        .plan
        .unwrap();
    assert_eq!(stored.version, 1);

    let create = |plan_source, subject: &str, pool: &str| {
        Request::new(pb::CreateMigrationRequest {
            plan_source: Some(plan_source),
            subject: subject.into(),
            pool: pool.into(),
            ..Default::default()
        })
    };
    use pb::create_migration_request::PlanSource;
    let err = a
        .migrations
        .create_migration(create(PlanSource::PlanName("p".into()), "", ""))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message().starts_with("subject")),
        (Code::InvalidArgument, true),
        "{err:?}"
    );
    let err = a
        .migrations
        .create_migration(create(PlanSource::PlanName("nope".into()), "s", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("\"nope\""), "{err:?}");
    let err = a
        .migrations
        .create_migration(create(PlanSource::PlanName("p".into()), "s", "gpu"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("pool \"gpu\""), "{err:?}");
    let bad_inline = pb::Plan {
        name: "x".into(),
        stages: vec![],
        ..Default::default()
    };
    let err = a
        .migrations
        .create_migration(create(PlanSource::InlinePlan(bad_inline), "s", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("inline_plan.stages"), "{err:?}");
    assert_eq!(migration_count(&a).await, 0);

    let ok = a
        .migrations
        .create_migration(create(PlanSource::InlinePlan(plan), "s", ""))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.created);
    let busy = a
        .migrations
        .create_migration(create(PlanSource::PlanName("p".into()), "s", ""))
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::AlreadyExists);
    assert_eq!(migration_count(&a).await, 1);
}

async fn worker_reports_with_stale_tokens_are_failed_precondition(backend: Backend) {
    let a = apis(backend).await;
    let req = pb::CompleteRequest {
        worker_id: "w".into(),
        completions: vec![pb::Completion {
            lease: Some(pb::LeaseToken {
                task_id: 99,
                attempt: 1,
            }),
            ..Default::default()
        }],
    };
    let err = a.workers.complete(Request::new(req)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let missing = pb::FailRequest {
        worker_id: "w".into(),
        failures: vec![pb::Failure::default()],
    };
    let err = a.workers.fail(Request::new(missing)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("failures[0].lease"), "{err:?}");
    let batch = pb::CompleteRequest {
        worker_id: "w".into(),
        completions: (1..=2)
            .map(|i| pb::Completion {
                lease: Some(pb::LeaseToken {
                    task_id: i,
                    attempt: 1,
                }),
                ..Default::default()
            })
            .collect(),
    };
    let results = a
        .workers
        .complete(Request::new(batch))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 2);
    assert!(
        results
            .iter()
            .all(|r| !r.accepted && r.code == Code::FailedPrecondition as i32)
    );
    let sub = pb::SubscribeRequest {
        worker_id: "w".into(),
        kinds: vec![],
        slots: 1,
        name: String::new(),
        instance: 0,
    };
    let err = a.workers.subscribe(Request::new(sub)).await.err().unwrap();
    assert_eq!(
        (err.code(), err.message().starts_with("kinds")),
        (Code::InvalidArgument, true)
    );
}

async fn pools_are_managed_through_the_admin_service(backend: Backend) {
    let a = apis(backend).await;
    let created = a
        .admin
        .create_pool(Request::new(pb::CreatePoolRequest {
            name: "gpu".into(),
            slots: 2,
        }))
        .await
        .unwrap();
    assert_eq!(created.into_inner().pool.unwrap().slots, 2);
    let dup = a
        .admin
        .create_pool(Request::new(pb::CreatePoolRequest {
            name: "gpu".into(),
            slots: 2,
        }))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let zero = a
        .admin
        .set_pool_slots(Request::new(pb::SetPoolSlotsRequest {
            name: "gpu".into(),
            slots: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(zero.code(), Code::InvalidArgument);
    let paused = a
        .admin
        .pause_pool(Request::new(pb::PausePoolRequest { name: "gpu".into() }))
        .await
        .unwrap();
    assert!(paused.into_inner().pool.unwrap().paused);
    let pools = a
        .admin
        .list_pools(Request::new(pb::ListPoolsRequest {}))
        .await
        .unwrap()
        .into_inner()
        .pools;
    assert_eq!(
        pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["default", "gpu"]
    );
    let missing = a
        .admin
        .drain_worker(Request::new(pb::DrainWorkerRequest {
            worker_id: "x".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

/// A change to a good request that makes one field bad.
type Edit<T> = fn(&mut T);

/// Asserts `result` is `INVALID_ARGUMENT` naming `field` and the NUL.
#[track_caller]
fn refuses_nul<T>(result: Result<T, tonic::Status>, field: &str) {
    let Err(err) = result else {
        panic!("{field}: a NUL was accepted");
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
    assert!(
        err.message().starts_with(&format!("{field}: ")) && err.message().contains("NUL character"),
        "{field}: message {:?}",
        err.message()
    );
}

async fn nul_in_any_string_is_invalid_argument_naming_the_field(backend: Backend) {
    let a = apis(backend).await;
    let m = &a.migrations;
    let nul = || "x\0y".to_string();
    let plan = |description: String, stage: &str| pb::Plan {
        name: "p".into(),
        description,
        stages: vec![noop_stage(stage)],
        ..Default::default()
    };
    let put = |p| {
        Request::new(pb::PutPlanRequest {
            source: Some(pb::put_plan_request::Source::Plan(p)),
        })
    };
    refuses_nul(m.put_plan(put(plan(nul(), "a"))).await, "description");
    refuses_nul(
        m.put_plan(put(plan(String::new(), "a\0"))).await,
        "stages[0].name",
    );
    refuses_nul(
        m.put_plan(json_plan(
            r#"{"name":"p","description":"\u0000","stages":[]}"#,
        ))
        .await,
        "description",
    );
    refuses_nul(m.put_plan(json_plan("{\0}")).await, "plan_json");
    let get = pb::GetPlanRequest { name: nul() };
    refuses_nul(m.get_plan(Request::new(get)).await, "name");
    use pb::create_migration_request::PlanSource;
    let create = |f: Edit<pb::CreateMigrationRequest>| {
        let mut r = pb::CreateMigrationRequest {
            plan_source: Some(PlanSource::PlanName("p".into())),
            subject: "s".into(),
            ..Default::default()
        };
        f(&mut r);
        Request::new(r)
    };
    let cases: [(Edit<pb::CreateMigrationRequest>, &str); 5] = [
        (
            |r| r.plan_source = Some(PlanSource::PlanName("p\0".into())),
            "plan_name",
        ),
        (|r| r.subject = "s\0".into(), "subject"),
        (|r| r.pool = "default\0".into(), "pool"),
        (|r| r.idempotency_key = "k\0".into(), "idempotency_key"),
        (
            |r| {
                r.plan_source = Some(PlanSource::InlinePlan(pb::Plan {
                    name: "p".into(),
                    description: "\0".into(),
                    stages: vec![noop_stage("a")],
                    ..Default::default()
                }))
            },
            "inline_plan.description",
        ),
    ];
    for (f, field) in cases {
        refuses_nul(m.create_migration(create(f)).await, field);
    }
    for (r, field) in [
        (
            pb::ListMigrationsRequest {
                subject: nul(),
                ..Default::default()
            },
            "subject",
        ),
        (
            pb::ListMigrationsRequest {
                pool: nul(),
                ..Default::default()
            },
            "pool",
        ),
        (
            pb::ListMigrationsRequest {
                page_token: nul(),
                ..Default::default()
            },
            "page_token",
        ),
    ] {
        refuses_nul(m.list_migrations(Request::new(r)).await, field);
    }
    let cancel = pb::CancelMigrationRequest {
        migration_id: 1,
        reason: nul(),
    };
    refuses_nul(m.cancel_migration(Request::new(cancel)).await, "reason");
    let status = pb::GetSubjectStatusRequest { subject: nul() };
    refuses_nul(m.get_subject_status(Request::new(status)).await, "subject");

    let ad = &a.admin;
    let create = pb::CreatePoolRequest {
        name: nul(),
        slots: 1,
    };
    refuses_nul(ad.create_pool(Request::new(create)).await, "name");
    let slots = pb::SetPoolSlotsRequest {
        name: nul(),
        slots: 1,
    };
    refuses_nul(ad.set_pool_slots(Request::new(slots)).await, "name");
    let pause = pb::PausePoolRequest { name: nul() };
    refuses_nul(ad.pause_pool(Request::new(pause)).await, "name");
    let resume = pb::ResumePoolRequest { name: nul() };
    refuses_nul(ad.resume_pool(Request::new(resume)).await, "name");
    let drain = pb::DrainWorkerRequest { worker_id: nul() };
    refuses_nul(ad.drain_worker(Request::new(drain)).await, "worker_id");

    let w = &a.workers;
    let subscribe = |f: Edit<pb::SubscribeRequest>| {
        let mut r = pb::SubscribeRequest {
            worker_id: "w".into(),
            kinds: vec!["noop".into()],
            slots: 1,
            name: String::new(),
            instance: 0,
        };
        f(&mut r);
        Request::new(r)
    };
    let cases: [(Edit<pb::SubscribeRequest>, &str); 3] = [
        (|r| r.worker_id = "w\0".into(), "worker_id"),
        (|r| r.name = "host\0".into(), "name"),
        (|r| r.kinds.push("k\0".into()), "kinds[1]"),
    ];
    for (f, field) in cases {
        refuses_nul(w.subscribe(subscribe(f)).await.map(|_| ()), field);
    }
    let heartbeat = pb::HeartbeatRequest {
        worker_id: nul(),
        leases: vec![],
    };
    refuses_nul(w.heartbeat(Request::new(heartbeat)).await, "worker_id");
    let lease = Some(pb::LeaseToken {
        task_id: 1,
        attempt: 1,
    });
    let add = |stage: &str, kind: &str| pb::CompleteRequest {
        worker_id: "w".into(),
        completions: vec![pb::Completion {
            lease,
            add_tasks: vec![pb::NewTask {
                stage: stage.into(),
                kind: kind.into(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let complete = pb::CompleteRequest {
        worker_id: nul(),
        ..add("b", "noop")
    };
    refuses_nul(w.complete(Request::new(complete)).await, "worker_id");
    refuses_nul(
        w.complete(Request::new(add("b\0", "noop"))).await,
        "completions[0].add_tasks[0].stage",
    );
    refuses_nul(
        w.complete(Request::new(add("b", "noop\0"))).await,
        "completions[0].add_tasks[0].kind",
    );
    let fail = |worker_id: String, error: String| pb::FailRequest {
        worker_id,
        failures: vec![pb::Failure {
            lease,
            error,
            retryable: true,
            lease_secret: 0,
        }],
    };
    refuses_nul(
        w.fail(Request::new(fail(nul(), "boom".into()))).await,
        "worker_id",
    );
    refuses_nul(
        w.fail(Request::new(fail("w".into(), nul()))).await,
        "failures[0].error",
    );

    assert_eq!(plan_count(&a).await, 0, "nothing is stored");
    assert_eq!(migration_count(&a).await, 0, "nothing is stored");
}

/// A worker that subscribes and never heartbeats stops getting work after
/// three heartbeat intervals (100 ms here), and ListWorkers says so and
/// why; a Complete is no heartbeat, a Heartbeat makes it eligible again.
async fn list_workers_says_who_gets_no_work_and_why(backend: Backend) {
    let a = apis(backend).await;
    let sub = pb::SubscribeRequest {
        worker_id: "quiet".into(),
        kinds: vec!["noop".into()],
        slots: 1,
        name: String::new(),
        instance: 0,
    };
    let _stream = a.workers.subscribe(Request::new(sub)).await.unwrap();
    let list = async || {
        let workers = a
            .admin
            .list_workers(Request::new(pb::ListWorkersRequest {}))
            .await
            .unwrap()
            .into_inner()
            .workers;
        assert_eq!(workers.len(), 1);
        workers.into_iter().next().unwrap()
    };
    let fresh = list().await;
    assert!(fresh.eligible, "a new stream is a sign of life: {fresh:?}");
    assert_eq!(
        (fresh.last_heartbeat, fresh.ineligible_reason.as_str()),
        (None, "")
    );

    tokio::time::sleep(Duration::from_millis(400)).await;
    let complete = pb::CompleteRequest {
        worker_id: "quiet".into(),
        completions: vec![pb::Completion {
            lease: Some(pb::LeaseToken {
                task_id: 1,
                attempt: 1,
            }),
            ..Default::default()
        }],
    };
    let _ = a.workers.complete(Request::new(complete)).await;
    let starved = list().await;
    assert!(!starved.eligible, "{starved:?}");
    let reason = &starved.ineligible_reason;
    assert!(
        reason.starts_with("no heartbeat since it subscribed ")
            && reason.contains("workers must send Heartbeat every 100 ms"),
        "{reason}"
    );

    let beat = pb::HeartbeatRequest {
        worker_id: "quiet".into(),
        leases: vec![],
    };
    a.workers.heartbeat(Request::new(beat)).await.unwrap();
    let alive = list().await;
    assert!(alive.eligible, "{alive:?}");
    assert!(alive.last_heartbeat.is_some());
    assert_eq!(alive.ineligible_reason, "");
}

on_both_backends!(
    bad_plans_are_invalid_argument_naming_the_field_and_store_nothing,
    bad_creates_store_nothing,
    worker_reports_with_stale_tokens_are_failed_precondition,
    pools_are_managed_through_the_admin_service,
    nul_in_any_string_is_invalid_argument_naming_the_field,
    list_workers_says_who_gets_no_work_and_why,
);
