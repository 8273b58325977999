//! The sample project export end to end: a coordinator, two workers of four
//! slots, the `project-export` plan put as JSON, one migration of a real
//! SQLite database. The archive is checked against the source database and
//! the event log against the invariants, so a pass means the export is right
//! *and* it got there by the rules.

use std::time::Duration;

use stagecoach_proto::v1::{EventKind, MigrationState, StageState};
use stagecoach_tests::{
    Backend, Cluster, SAMPLE_PLAN, assert_ok, build_source_db, check_archive, check_invariants,
    describe_event, on_both_backends, sample_plan_json,
};

on_both_backends!(sample_export_succeeds_and_matches_its_source);

async fn sample_export_succeeds_and_matches_its_source(backend: Backend) {
    let cluster = Cluster::start(backend, 2, 4).await;
    let client = cluster.client().await;
    let source = build_source_db(&cluster.dir().join("source.db"))
        .await
        .expect("build the source database");

    let plan = client
        .put_plan_json(&sample_plan_json())
        .await
        .expect("put the sample plan");
    assert_eq!(plan.name, SAMPLE_PLAN);
    assert_eq!(plan.version, 1);
    assert_eq!(plan.stages.len(), 4);

    let created = client
        .create_migration(SAMPLE_PLAN, "project/1", &source.parameters())
        .await
        .expect("create the migration");
    let m = client
        .wait_for_terminal(created.id, Duration::from_secs(60))
        .await;
    let events = client.events(m.id).await.expect("list events");
    let log: Vec<String> = events.iter().map(describe_event).collect();
    assert_eq!(
        m.state(),
        MigrationState::Succeeded,
        "reason {:?}; log:\n{}",
        m.reason,
        log.join("\n")
    );

    let archive = cluster.export_archive(m.id);
    let summary = check_archive(&archive, &source.path, m.id, "project/1")
        .await
        .unwrap_or_else(|e| panic!("archive {}:\n  {}", archive.display(), e.join("\n  ")));
    let want: Vec<(String, usize)> = summary.rows.into_iter().collect();
    assert_eq!(want, source.tables, "tables exported");

    assert_ok("invariants", check_invariants(&m, &events));

    // The export stage got one task per table, added by inspect.
    let export = &m.stages[1];
    assert_eq!(export.state(), StageState::Succeeded);
    assert_eq!(export.total as usize, source.tables.len(), "export tasks");
    let added = events
        .iter()
        .filter(|e| e.kind() == EventKind::TaskAdded)
        .count();
    assert_eq!(added, source.tables.len(), "TASK_ADDED events");

    // I1, read directly: each stage after the first starts after the one
    // before it succeeded.
    for k in 1..m.stages.len() as u32 {
        let started = position(&events, EventKind::StageStarted, k);
        let prev_done = position(&events, EventKind::StageSucceeded, k - 1);
        match (started, prev_done) {
            (Some(s), Some(p)) => {
                assert!(p < s, "stage {k} started before stage {} succeeded", k - 1)
            }
            other => panic!("stage {k}: STAGE_STARTED / previous STAGE_SUCCEEDED at {other:?}"),
        }
    }
}

/// Index in the log of the first event of `kind` for stage `k`.
fn position(events: &[stagecoach_proto::v1::Event], kind: EventKind, k: u32) -> Option<usize> {
    events
        .iter()
        .position(|e| e.kind() == kind && e.stage_index == Some(k))
}
