//! Concurrent reports through the core: every one is recorded exactly once
//! even when hundreds arrive together and share transactions.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use stagecoach_coordinator::domain::{Completion, MigrationState, PlanSpec, ReportAck};
use stagecoach_coordinator::engine::{Coordinator, CreateRequest, PlanSource, Timing};
use stagecoach_coordinator::store::{Limits, SqliteStore, Store};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundreds_of_concurrent_reports_are_each_recorded_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("g.db").display());
    let store = Arc::new(
        SqliteStore::open(
            &url,
            Limits {
                lease_ms: 60_000,
                heartbeat_interval_ms: 1_000,
                max_reassignments: 3,
            },
        )
        .await
        .unwrap(),
    );
    store.ensure_pool("default", 1).await.unwrap();
    let timing = Timing {
        heartbeat_interval: Duration::from_secs(1),
        lease_duration: Duration::from_secs(60),
        sweep_interval: Duration::from_secs(1),
    };
    let core = Coordinator::new(store.clone(), timing, CancellationToken::new());
    let tasks: Vec<_> = (0..300)
        .map(|i| json!({"kind": "k", "payload": {"i": i}}))
        .collect();
    let plan = PlanSpec::from_json(
        &json!({"name": "p", "stages": [{"name": "a", "tasks": tasks}]}).to_string(),
    )
    .unwrap();
    let (m, _) = core
        .create_migration(CreateRequest {
            plan: PlanSource::Inline(plan),
            subject: "s".into(),
            parameters: json!({}),
            pool: String::new(),
            deadline_ms: None,
            idempotency_key: None,
            created_by: None,
        })
        .await
        .unwrap();
    let leases = store.claim("w", &["k".to_string()], 300).await.unwrap();
    assert_eq!(leases.len(), 300);
    let mut joins = Vec::new();
    for a in leases {
        let core = core.clone();
        joins.push(tokio::spawn(async move {
            let c = Completion {
                lease: a.lease,
                secret: a.secret,
                output: json!({}),
                add_tasks: vec![],
            };
            let first = core
                .complete("w", std::slice::from_ref(&c))
                .await
                .pop()
                .unwrap()
                .unwrap();
            let again = core.complete("w", &[c]).await.pop().unwrap().unwrap();
            (first, again)
        }));
    }
    for j in joins {
        assert_eq!(
            j.await.unwrap(),
            (ReportAck::Recorded, ReportAck::Duplicate)
        );
    }
    let m = core.get_migration(m.id).await.unwrap();
    assert_eq!(m.state, MigrationState::Succeeded);
    assert_eq!(m.stages[0].succeeded, 300);
}
