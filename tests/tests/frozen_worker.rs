//! A worker frozen with SIGSTOP past its lease (I6, I7): its stream stays
//! open, it still looks recent for three heartbeat intervals, and a stage's
//! `heartbeat_timeout_ms` of two intervals expires its lease before that.
//!
//! - the expired task is not handed back to the frozen worker (which would
//!   lose it again and, with `--max-reassignments 2`, for good) but waits
//!   for the healthy worker, which is busy with the stage's other task;
//! - ListWorkers shows the frozen worker as not eligible, and the
//!   coordinator warns about it once;
//! - once thawed (SIGCONT), its next heartbeat makes it eligible again.
//!
//! On both backends with one coordinator, and on PostgreSQL with two: the
//! workers stream from one that sweeps only at start, so the other one
//! expires the lease and the first learns which worker lost it by NOTIFY
//! (ListWorkers there says "a lease it held expired", which only that
//! notice tells it).
//!
//! One SIGSTOP and one SIGCONT per test; no kills, no raw reports.

use std::time::Duration;

use serde_json::json;
use stagecoach_proto::v1::{EventKind, MigrationState, Plan, RetryPolicy, StageSpec};
use stagecoach_tests::plans::{create_inline, plan, stage, task};
use stagecoach_tests::{
    Backend, Client, Cluster, Coordinator, Fleet, Worker, describe_event, of_kind,
    on_both_backends, wait_for,
};

on_both_backends!(a_frozen_workers_task_goes_to_the_healthy_worker);

const WAIT: Duration = Duration::from_secs(90);

/// Heartbeats every 500 ms: a worker is "recent" for 1.5 s, while the
/// stage's leases ([`two_sleeps`]) last 1 s after their last renewal.
const ARGS: [&str; 4] = ["--heartbeat-interval-ms", "500", "--max-reassignments", "2"];

async fn a_frozen_workers_task_goes_to_the_healthy_worker(backend: Backend) {
    let args: Vec<&str> = ARGS
        .iter()
        .chain(&["--sweep-interval-ms", "100"])
        .copied()
        .collect();
    let mut cluster = Cluster::start_with(backend, &args, 2, 1).await;
    let client = cluster.client().await;
    let frozen = lose_a_task_to_a_freeze(&client, &mut cluster.workers, "frozen/1").await;
    let held_back = ineligible(&client, &frozen).await;
    assert!(
        held_back.contains("expired") || held_back.starts_with("no heartbeat for"),
        "{held_back}"
    );
    thaw(&client, &mut cluster.workers, &frozen, &cluster.coordinator).await;
    eprintln!("freezes: 1, kills: 0, raw reports: 0");
}

/// The workers stream from coordinator 0, which sweeps once at start;
/// coordinator 1 sweeps every 100 ms and so expires the frozen lease.
#[tokio::test]
async fn postgres_a_lease_expired_by_another_coordinator_holds_its_worker_back() {
    let streaming: Vec<&str> = ARGS
        .iter()
        .chain(&["--sweep-interval-ms", "3600000"])
        .copied()
        .collect();
    let mut fleet = Fleet::start(1, &streaming).await;
    let mut sweeping = vec!["--database", fleet.database()];
    sweeping.extend(ARGS.iter().chain(&["--sweep-interval-ms", "100"]));
    let sweeper =
        Coordinator::start(Backend::Postgres, &fleet.dir().join("sweeper"), &sweeping).await;
    fleet.add_worker("a", 1, &[0]);
    fleet.add_worker("b", 1, &[0]);
    fleet.wait_for_streams(&[0], WAIT).await;
    let client = fleet.client(0).await;
    let frozen = lose_a_task_to_a_freeze(&client, &mut fleet.workers, "frozen/2").await;
    let held_back = ineligible(&client, &frozen).await;
    assert!(
        held_back.starts_with("a lease it held expired"),
        "coordinator 0 did not hear of the expiry: {held_back}"
    );
    thaw(&client, &mut fleet.workers, &frozen, &fleet.coordinators[0]).await;
    drop(sweeper);
    eprintln!("freezes: 1, kills: 0, raw reports: 0");
}

/// One stage of two 2 s sleeps whose leases last 1 s after a renewal: two
/// heartbeat intervals.
fn two_sleeps() -> Plan {
    let sleep = || task("sleep", json!({"ms": 2_000}));
    plan(
        "frozen",
        vec![StageSpec {
            retry: Some(RetryPolicy {
                heartbeat_timeout_ms: 1_000,
                ..Default::default()
            }),
            ..stage("only", vec![sleep(), sleep()])
        }],
    )
}

/// Runs [`two_sleeps`] on two workers of one slot, freezes the worker of
/// the first assignment, and checks that its task went to the other one
/// and the migration succeeded, with one warning about the frozen worker
/// in the log of the coordinator it streams from. Returns its id.
async fn lose_a_task_to_a_freeze(client: &Client, workers: &mut [Worker], subject: &str) -> String {
    let m = client
        .create(create_inline(two_sleeps(), subject))
        .await
        .unwrap();
    let assigned = client
        .wait_for_event(m.id, "TASK_ASSIGNED", WAIT, |e| {
            e.kind() == EventKind::TaskAssigned
        })
        .await;
    let frozen = assigned.worker_id.clone();
    let task_id = assigned.task_id;
    worker(workers, &frozen).freeze();

    let (m, events) = client.finish_and_check(m.id, WAIT).await;
    let log: Vec<String> = events.iter().map(describe_event).collect();
    assert_eq!(
        m.state(),
        MigrationState::Succeeded,
        "{}\n{}",
        m.reason,
        log.join("\n")
    );
    let expired = of_kind(&events, EventKind::TaskLeaseExpired);
    assert!(
        expired
            .iter()
            .any(|e| e.task_id == task_id && e.worker_id == frozen),
        "{}",
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
    frozen
}

/// The frozen worker's `ineligible_reason` in ListWorkers, once it is shown
/// as not eligible.
async fn ineligible(client: &Client, id: &str) -> String {
    wait_for(
        "the frozen worker shown as not eligible",
        WAIT,
        async || {
            let workers = client.list_workers().await.ok()?;
            let w = workers.into_iter().find(|w| w.worker_id == id)?;
            (!w.eligible).then_some(w.ineligible_reason)
        },
    )
    .await
}

/// Checks the coordinator warned once about the frozen worker, thaws it,
/// and waits until ListWorkers and the log say it gets work again.
async fn thaw(client: &Client, workers: &mut [Worker], id: &str, coordinator: &Coordinator) {
    let about = |line: &&str| line.contains(&format!("\"{id}\""));
    let warned = coordinator
        .logs()
        .lines()
        .filter(|l| l.contains("gets no new work"))
        .filter(about)
        .count();
    assert_eq!(warned, 1, "one warning about the frozen worker");
    worker(workers, id).resume();
    wait_for("the thawed worker eligible again", WAIT, async || {
        let workers = client.list_workers().await.ok()?;
        let w = workers.into_iter().find(|w| w.worker_id == id)?;
        (w.eligible && w.ineligible_reason.is_empty()).then_some(())
    })
    .await;
    wait_for("the coordinator to say so", WAIT, async || {
        let logs = coordinator.logs();
        let mut lines = logs.lines().filter(|l| l.contains("gets new work again"));
        lines.any(|l| about(&l)).then_some(())
    })
    .await;
}

fn worker<'w>(workers: &'w mut [Worker], id: &str) -> &'w mut Worker {
    workers
        .iter_mut()
        .find(|w| w.id() == id)
        .unwrap_or_else(|| panic!("no worker {id:?}"))
}
