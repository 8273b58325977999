//! A task that fails without retry fails its migration: the reason names the
//! task and its error, the stage after it never starts, and the log still
//! keeps every invariant.

use std::time::Duration;

use serde_json::json;
use stagecoach_proto::json::json_to_struct;
use stagecoach_proto::v1::{EventKind, MigrationState, Plan, StageSpec, TaskSpec};
use stagecoach_tests::{
    Backend, Cluster, assert_ok, check_invariants, describe_event, on_both_backends,
};

on_both_backends!(a_dead_task_fails_the_migration_and_later_stages_never_run);

fn stage(name: &str, kind: &str, payload: serde_json::Value) -> StageSpec {
    StageSpec {
        name: name.into(),
        tasks: vec![TaskSpec {
            kind: kind.into(),
            payload: Some(json_to_struct(&payload)),
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn a_dead_task_fails_the_migration_and_later_stages_never_run(backend: Backend) {
    let cluster = Cluster::start(backend, 2, 4).await;
    let client = cluster.client().await;
    client
        .put_plan(Plan {
            name: "fails-in-b".into(),
            stages: vec![
                stage("a", "noop", json!({})),
                stage(
                    "b",
                    "fail",
                    json!({"message": "disk full", "retryable": false}),
                ),
                stage("c", "noop", json!({})),
            ],
            ..Default::default()
        })
        .await
        .expect("put the plan");

    let created = client
        .create_migration("fails-in-b", "project/2", &json!({}))
        .await
        .expect("create the migration");
    let m = client
        .wait_for_terminal(created.id, Duration::from_secs(60))
        .await;
    let events = client.events(m.id).await.expect("list events");
    let log = events
        .iter()
        .map(describe_event)
        .collect::<Vec<_>>()
        .join("\n");

    assert_eq!(m.state(), MigrationState::Failed, "log:\n{log}");
    assert!(
        m.reason.contains("fail") && m.reason.contains("disk full"),
        "reason {:?} should name the task kind `fail` and its error",
        m.reason
    );
    let dead: Vec<_> = events
        .iter()
        .filter(|e| e.kind() == EventKind::TaskDead)
        .collect();
    assert_eq!(dead.len(), 1, "one dead task; log:\n{log}");
    assert!(
        m.reason.contains(&dead[0].task_id.to_string()),
        "reason {:?} should name task {}",
        m.reason,
        dead[0].task_id
    );
    // Not retryable: exactly one attempt.
    let assigned_b = events
        .iter()
        .filter(|e| e.kind() == EventKind::TaskAssigned && e.task_id == dead[0].task_id)
        .count();
    assert_eq!(assigned_b, 1, "attempts of the failing task; log:\n{log}");

    let stage_c = |e: &&stagecoach_proto::v1::Event| e.stage_index == Some(2);
    let c_started = events
        .iter()
        .filter(stage_c)
        .any(|e| matches!(e.kind(), EventKind::StageStarted | EventKind::TaskAssigned));
    assert!(!c_started, "stage c must never start; log:\n{log}");
    // Even if an assignment carried no stage index: only a's and b's tasks ran.
    let mut assigned: Vec<i64> = events
        .iter()
        .filter(|e| e.kind() == EventKind::TaskAssigned)
        .map(|e| e.task_id)
        .collect();
    assigned.sort_unstable();
    assigned.dedup();
    assert_eq!(
        assigned.len(),
        2,
        "tasks assigned: {assigned:?}; log:\n{log}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.kind() == EventKind::StageFailed && e.stage_index == Some(1)),
        "stage b should fail; log:\n{log}"
    );

    assert_ok("invariants", check_invariants(&m, &events));
}
