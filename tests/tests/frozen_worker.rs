//! A worker frozen with SIGSTOP past its lease (I6, I7): its stream stays
//! open, it still looks recent for three heartbeat intervals, and a stage's
//! `heartbeat_timeout_ms` of two intervals expires its lease before that.
//!
//! - the expired task is not handed back to the frozen worker (which would
//!   lose it again and, with `--max-reassignments 2`, for good) but waits
//!   for the healthy worker, which is busy with the stage's other task;
//! - ListWorkers shows the frozen worker as not eligible, saying its lease
//!   expired, and the coordinator warns about it once;
//! - once thawed (SIGCONT), its next heartbeat makes it eligible again.
//!
//! One SIGSTOP and one SIGCONT; no kills, no raw reports.

use std::time::Duration;

use serde_json::json;
use stagecoach_proto::v1::{EventKind, MigrationState, RetryPolicy, StageSpec};
use stagecoach_tests::plans::{create_inline, plan, stage, task};
use stagecoach_tests::{Backend, Cluster, describe_event, of_kind, on_both_backends, wait_for};

on_both_backends!(a_frozen_workers_task_goes_to_the_healthy_worker);

const WAIT: Duration = Duration::from_secs(90);

async fn a_frozen_workers_task_goes_to_the_healthy_worker(backend: Backend) {
    // Heartbeats every 500 ms: a worker is "recent" for 1.5 s, while the
    // stage's leases last 1 s after their last renewal.
    let args = [
        "--heartbeat-interval-ms",
        "500",
        "--sweep-interval-ms",
        "100",
        "--max-reassignments",
        "2",
    ];
    let mut cluster = Cluster::start_with(backend, &args, 2, 1).await;
    let client = cluster.client().await;
    let sleep = || task("sleep", json!({"ms": 2_000}));
    let p = plan(
        "frozen",
        vec![StageSpec {
            retry: Some(RetryPolicy {
                heartbeat_timeout_ms: 1_000,
                ..Default::default()
            }),
            ..stage("only", vec![sleep(), sleep()])
        }],
    );
    let m = client.create(create_inline(p, "frozen/1")).await.unwrap();
    let assigned = client
        .wait_for_event(m.id, "TASK_ASSIGNED", WAIT, |e| {
            e.kind() == EventKind::TaskAssigned
        })
        .await;
    let frozen = assigned.worker_id.clone();
    let task_id = assigned.task_id;
    cluster.worker_mut(&frozen).freeze();

    client
        .wait_for_event(m.id, "TASK_LEASE_EXPIRED on the frozen worker", WAIT, |e| {
            e.kind() == EventKind::TaskLeaseExpired && e.task_id == task_id
        })
        .await;
    let held_back = wait_for(
        "the frozen worker shown as not eligible",
        WAIT,
        async || {
            let workers = client.list_workers().await.ok()?;
            let w = workers.into_iter().find(|w| w.worker_id == frozen)?;
            (!w.eligible).then_some(w)
        },
    )
    .await;
    assert!(
        held_back.ineligible_reason.contains("expired")
            || held_back.ineligible_reason.starts_with("no heartbeat for"),
        "{held_back:?}"
    );

    let (m, events) = client.finish_and_check(m.id, WAIT).await;
    let log: Vec<String> = events.iter().map(describe_event).collect();
    assert_eq!(
        m.state(),
        MigrationState::Succeeded,
        "{}\n{}",
        m.reason,
        log.join("\n")
    );
    let lost: Vec<_> = of_kind(&events, EventKind::TaskAssigned)
        .into_iter()
        .filter(|e| e.task_id == task_id)
        .collect();
    assert_eq!(lost.len(), 2, "{}", log.join("\n"));
    assert_ne!(
        lost[1].worker_id,
        frozen,
        "given back to the frozen worker:\n{}",
        log.join("\n")
    );
    let warned = |logs: &str| {
        logs.lines()
            .filter(|l| l.contains("gets no new work") && l.contains(&format!("\"{frozen}\"")))
            .count()
    };
    assert_eq!(
        warned(&cluster.coordinator.logs()),
        1,
        "one warning about the frozen worker"
    );

    cluster.worker_mut(&frozen).resume();
    wait_for("the thawed worker eligible again", WAIT, async || {
        let workers = client.list_workers().await.ok()?;
        let w = workers.into_iter().find(|w| w.worker_id == frozen)?;
        (w.eligible && w.ineligible_reason.is_empty()).then_some(())
    })
    .await;
    wait_for("the coordinator to say so", WAIT, async || {
        let logs = cluster.coordinator.logs();
        logs.lines()
            .any(|l| l.contains("gets new work again") && l.contains(&format!("\"{frozen}\"")))
            .then_some(())
    })
    .await;
    eprintln!("freezes: 1, kills: 0, raw reports: 0");
}
