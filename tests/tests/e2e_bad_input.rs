//! Bad plans and requests are refused with the right gRPC code and a message
//! that names the offending field, and refusing them stores nothing.
//!
//! One coordinator serves every case (no workers are needed): the cases are
//! independent requests, and checking ListPlans / ListMigrations once after
//! all of them shows that none left anything behind.

use serde_json::json;
use stagecoach_proto::json::{json_to_struct, struct_to_json};
use stagecoach_proto::v1::{
    CreateMigrationRequest, DrainWorkerRequest, FailRequest, Failure, GetPlanRequest,
    HeartbeatRequest, LeaseToken, ListMigrationsRequest, PausePoolRequest, Plan, StageSpec,
    TaskSpec, create_migration_request::PlanSource,
};
use stagecoach_tests::{Backend, Client, Coordinator, assert_refused, on_both_backends};
use tonic::{Code, Status};

on_both_backends!(
    bad_plans_and_requests_are_refused_and_store_nothing,
    the_request_size_limit_is_a_flag
);

fn noop_stage(name: &str) -> StageSpec {
    StageSpec {
        name: name.into(),
        tasks: vec![TaskSpec {
            kind: "noop".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn plan(name: &str, stages: Vec<StageSpec>) -> Plan {
    Plan {
        name: name.into(),
        stages,
        ..Default::default()
    }
}

async fn bad_plans_and_requests_are_refused_and_store_nothing(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let coordinator = Coordinator::start(backend, &dir.path().join("coordinator"), &[]).await;
    let client = Client::connect(&coordinator.url()).await;

    // One good plan, so CreateMigration cases can name a plan that exists.
    client
        .put_plan(plan("good", vec![noop_stage("a")]))
        .await
        .expect("a valid plan is accepted");
    let plans_before = client.list_plans().await.expect("list plans");
    let migrations_before = client.list_migrations().await.expect("list migrations");

    assert_refused(
        "no stages",
        client.put_plan(plan("no-stages", vec![])).await,
        Code::InvalidArgument,
        &["stages"],
    );
    assert_refused(
        "no stages, as JSON",
        client
            .put_plan_json(&json!({"name": "no-stages-json", "stages": []}))
            .await,
        Code::InvalidArgument,
        &["stages"],
    );
    assert_refused(
        "a non-dynamic stage without tasks",
        client
            .put_plan(plan(
                "empty-stage",
                vec![StageSpec {
                    name: "a".into(),
                    ..Default::default()
                }],
            ))
            .await,
        Code::InvalidArgument,
        &["stages[0].tasks"],
    );
    assert_refused(
        "duplicate stage names",
        client
            .put_plan(plan("dup", vec![noop_stage("a"), noop_stage("a")]))
            .await,
        Code::InvalidArgument,
        &["stages[1].name"],
    );
    assert_refused(
        "an unknown task field",
        client
            .put_plan_json(&json!({
                "name": "typo",
                "stages": [{"name": "a", "tasks": [{"knd": "noop"}]}]
            }))
            .await,
        Code::InvalidArgument,
        &["knd"],
    );
    assert_refused(
        "malformed JSON",
        client
            .put_plan_json_text("{\"name\": \"broken\", \"stages\": [")
            .await,
        Code::InvalidArgument,
        &[],
    );
    assert_refused(
        "an empty plan name",
        client.put_plan(plan("", vec![noop_stage("a")])).await,
        Code::InvalidArgument,
        &["name"],
    );
    assert_refused(
        "a migration without subject",
        client.create_migration("good", "", &json!({})).await,
        Code::InvalidArgument,
        &["subject"],
    );
    assert_refused(
        "a migration without plan",
        client
            .create(CreateMigrationRequest {
                subject: "project/9".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        &[],
    );
    assert_refused(
        "a migration of an unknown plan",
        client
            .create(CreateMigrationRequest {
                plan_source: Some(PlanSource::PlanName("no-such-plan".into())),
                subject: "project/9".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        &["no-such-plan"],
    );

    nul_is_refused_in_every_string_naming_the_field(&client).await;
    json_too_deep_to_read_back_is_refused(&client).await;
    // A 20 KB name is quoted by a prefix: the answer stays NOT_FOUND, not
    // the client's RESOURCE_EXHAUSTED for an oversized header.
    let long = "n".repeat(20_000);
    for (case, answer) in [
        (
            "GetPlan of a 20 KB name",
            client
                .migrations
                .clone()
                .get_plan(GetPlanRequest { name: long.clone() })
                .await
                .map(|_| ()),
        ),
        (
            "DrainWorker of a 20 KB id",
            client
                .admin
                .clone()
                .drain_worker(DrainWorkerRequest {
                    worker_id: long.clone(),
                })
                .await
                .map(|_| ()),
        ),
    ] {
        let status = answer.expect_err(case);
        assert_eq!(status.code(), Code::NotFound, "{case}: {status:?}");
        assert!(status.message().len() < 300, "{case}: {}", status.message());
        assert!(status.message().contains("(20000 bytes)"), "{case}");
    }
    assert_refused(
        "a request over the default 4 MiB limit",
        client
            .put_plan(Plan {
                description: "x".repeat(5 << 20),
                ..plan("huge", vec![noop_stage("a")])
            })
            .await,
        Code::ResourceExhausted,
        &["4194304 bytes", "--max-request-bytes"],
    );

    let plans_after = client.list_plans().await.expect("list plans");
    assert_eq!(
        plans_after, plans_before,
        "refused plans must not be stored"
    );
    let migrations_after = client.list_migrations().await.expect("list migrations");
    assert_eq!(
        migrations_after, migrations_before,
        "refused migrations must not be stored"
    );

    // As deep as allowed: stored, and every client can still read it back.
    let deepest = nested(24);
    client
        .put_plan_json(&json!({"name": "deep", "stages": [
            {"name": "a", "tasks": [{"kind": "noop", "payload": deepest}]}]}))
        .await
        .expect("a payload 24 levels deep is accepted");
    let plans = client.list_plans().await.expect("ListPlans decodes");
    assert!(plans.iter().any(|p| p.name == "deep"));
}

/// A JSON object nested `depth` levels: `{"a": {"a": … {} …}}`.
fn nested(depth: usize) -> serde_json::Value {
    (1..depth).fold(json!({}), |inner, _| json!({ "a": inner }))
}

/// Payloads and parameters nested deeper than protobuf decoders read back
/// (a plan stored so would break every worker it is assigned to, and
/// ListPlans for every client) are `INVALID_ARGUMENT` naming the field.
async fn json_too_deep_to_read_back_is_refused(client: &Client) {
    assert_refused(
        "a payload nested 40 levels",
        client
            .put_plan_json(&json!({"name": "too-deep", "stages": [
                {"name": "a", "tasks": [{"kind": "noop", "payload": nested(40)}]}]}))
            .await,
        Code::InvalidArgument,
        &["stages[0].tasks[0].payload", "at most 24"],
    );
    assert_refused(
        "parameters nested 25 levels",
        client
            .create_migration("good", "project/deep", &nested(25))
            .await,
        Code::InvalidArgument,
        &["parameters", "at most 24"],
    );
}

/// A NUL character (`\0`) in any string of a request is `INVALID_ARGUMENT`
/// naming that field, on both backends alike: lookups as well as writes
/// (PostgreSQL text cannot hold NUL; SQLite could, so the edge refuses it for
/// both).
async fn nul_is_refused_in_every_string_naming_the_field(client: &Client) {
    let nul = "project/\0";
    #[track_caller]
    fn refused<T: std::fmt::Debug>(case: &str, result: Result<T, Status>, field: &str) {
        assert_refused(case, result, Code::InvalidArgument, &[field, "NUL"]);
    }
    refused(
        "GetSubjectStatus",
        client.subject_status(nul).await,
        "subject",
    );
    let get_plan = client
        .migrations
        .clone()
        .get_plan(GetPlanRequest {
            name: "go\0od".into(),
        })
        .await;
    refused("GetPlan", get_plan, "name");
    for (case, req, field) in [
        (
            "ListMigrations by subject",
            ListMigrationsRequest {
                subject: nul.into(),
                ..Default::default()
            },
            "subject",
        ),
        (
            "ListMigrations by pool",
            ListMigrationsRequest {
                pool: "default\0".into(),
                ..Default::default()
            },
            "pool",
        ),
    ] {
        let r = client.migrations.clone().list_migrations(req).await;
        refused(case, r, field);
    }
    let create = |f: fn(&mut CreateMigrationRequest)| {
        let mut req = CreateMigrationRequest {
            plan_source: Some(PlanSource::PlanName("good".into())),
            subject: "project/nul".into(),
            ..Default::default()
        };
        f(&mut req);
        client.create(req)
    };
    refused(
        "CreateMigration's plan name",
        create(|r| r.plan_source = Some(PlanSource::PlanName("go\0od".into()))).await,
        "plan_name",
    );
    refused(
        "CreateMigration's subject",
        create(|r| r.subject = "project/\0".into()).await,
        "subject",
    );
    refused(
        "CreateMigration's idempotency key",
        create(|r| r.idempotency_key = "k\0".into()).await,
        "idempotency_key",
    );
    refused(
        "a plan's description",
        client
            .put_plan(Plan {
                description: "a\0b".into(),
                ..plan("described", vec![noop_stage("a")])
            })
            .await,
        "description",
    );
    refused(
        "a stage name",
        client
            .put_plan(plan("named", vec![noop_stage("a\0")]))
            .await,
        "stages[0].name",
    );
    refused(
        "CancelMigration's reason",
        client.cancel(1, "because\0").await,
        "reason",
    );
    let (mut admin, mut workers) = (client.admin.clone(), client.workers.clone());
    let pause = PausePoolRequest {
        name: "default\0".into(),
    };
    refused("PausePool", admin.pause_pool(pause).await, "name");
    let drain = DrainWorkerRequest {
        worker_id: "w\0".into(),
    };
    refused("DrainWorker", admin.drain_worker(drain).await, "worker_id");
    let heartbeat = HeartbeatRequest {
        worker_id: "w\0".into(),
        leases: vec![],
    };
    refused("Heartbeat", workers.heartbeat(heartbeat).await, "worker_id");
    let lease = Some(LeaseToken {
        task_id: 1,
        attempt: 1,
    });
    let fail = FailRequest {
        worker_id: "w".into(),
        failures: vec![Failure {
            lease,
            error: "disk\0full".into(),
            retryable: true,
            lease_secret: 0,
        }],
    };
    let fail = workers.fail(fail).await;
    refused("Fail's error", fail, "failures[0].error");
}

/// `--max-request-bytes` sets the limit: a request over it is
/// `RESOURCE_EXHAUSTED` naming the limit and the flag, one under it is served.
async fn the_request_size_limit_is_a_flag(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let coordinator = Coordinator::start(
        backend,
        &dir.path().join("coordinator"),
        &["--max-request-bytes", "65536"],
    )
    .await;
    let client = Client::connect(&coordinator.url()).await;
    let described = |name: &str, bytes: usize| Plan {
        description: "x".repeat(bytes),
        ..plan(name, vec![noop_stage("a")])
    };
    assert_refused(
        "a plan over the limit",
        client.put_plan(described("big", 70_000)).await,
        Code::ResourceExhausted,
        &[
            "65536 bytes",
            "--max-request-bytes",
            "STAGECOACH_MAX_REQUEST_BYTES",
        ],
    );
    assert_eq!(client.list_plans().await.expect("list plans"), vec![]);
    client
        .put_plan(described("small", 60_000))
        .await
        .expect("a plan under the limit is served");
    // JSON payloads may hold NUL: they are stored as JSON text, where it is
    // the escape `\u0000`, and come back as sent on both backends.
    let parameters = json!({"note": "a\0b", "k\0": ["\0"]});
    let m = client
        .create(CreateMigrationRequest {
            plan_source: Some(PlanSource::PlanName("small".into())),
            subject: "project/json-nul".into(),
            parameters: Some(json_to_struct(&parameters)),
            ..Default::default()
        })
        .await
        .expect("NUL inside JSON parameters is accepted");
    let read = client.get_migration(m.id).await.expect("get migration");
    assert_eq!(struct_to_json(read.parameters.as_ref()), parameters);
}
