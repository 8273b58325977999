//! Bad plans and requests are refused with the right gRPC code and a message
//! that names the offending field, and refusing them stores nothing.
//!
//! One coordinator serves every case (no workers are needed): the cases are
//! independent requests, and checking ListPlans / ListMigrations once after
//! all of them shows that none left anything behind.

use serde_json::json;
use stagecoach_proto::v1::{
    CreateMigrationRequest, Plan, StageSpec, TaskSpec, create_migration_request::PlanSource,
};
use stagecoach_tests::{Backend, Client, Coordinator, on_both_backends};
use tonic::{Code, Status};

on_both_backends!(bad_plans_and_requests_are_refused_and_store_nothing);

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

/// Asserts `result` failed with `code` and a message containing every one of
/// `words`.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(
    case: &str,
    result: Result<T, Status>,
    code: Code,
    words: &[&str],
) {
    match result {
        Ok(v) => panic!("{case}: accepted, wanted {code:?}; answer: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{case}: code; message {:?}", s.message());
            for w in words {
                assert!(
                    s.message().contains(w),
                    "{case}: message {:?} should name {w:?}",
                    s.message()
                );
            }
        }
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
}
