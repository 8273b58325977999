//! Handlers that crash or hang, on real workers (I7, I9):
//!
//! - a handler that always panics is retried with backoff up to the task's
//!   `max_attempts` (3): two TASK_RETRYING events whose announced delays do
//!   not shrink, stay under the doubled initial backoff, and are honoured
//!   (the next attempt is assigned no sooner); then the migration fails with
//!   a reason naming the task, its kind, "after 3 attempts" and the panic
//!   message;
//! - a handler that hangs and ignores cancellation, under an
//!   `attempt_timeout_ms`, has each attempt timed out (no sooner than the
//!   timeout), retried, and finally failed with "timed out"; its worker is
//!   told to stop, and drops the handler when it does not;
//! - two hanging tasks of one migration that time out in the same sweep
//!   fail the migration once, with a consistent log.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;
use stagecoach_proto::v1::{Event, EventKind, MigrationState};
use stagecoach_tests::checker::millis;
use stagecoach_tests::plans::{StageExt, create_inline, plan, retry, stage, task};
use stagecoach_tests::{
    Backend, Cluster, assert_ok, check_attempt_bound, describe_event, of_kind, on_both_backends,
    wait_for,
};

on_both_backends!(
    a_panicking_handler_is_retried_with_backoff_then_fails_the_migration,
    a_hanging_handler_times_out_on_every_attempt_then_fails,
    two_attempts_timing_out_together_fail_the_migration_once
);

const WAIT: Duration = Duration::from_secs(90);

/// Fast heartbeats and sweeps, but leases far longer than any attempt here:
/// these tests are about handlers failing, not workers getting lost, and a
/// busy machine's disk can stall a commit for seconds — long enough to end
/// a 1.5 s lease and add an attempt the bounds below do not expect.
const TIMINGS: [&str; 6] = [
    "--heartbeat-interval-ms",
    "200",
    "--lease-duration-ms",
    "20000",
    "--sweep-interval-ms",
    "100",
];
const INITIAL_BACKOFF_MS: u64 = 300;

fn log(events: &[Event]) -> String {
    events
        .iter()
        .map(describe_event)
        .collect::<Vec<_>>()
        .join("\n")
}

fn at(e: &Event) -> i64 {
    millis(e.at.as_ref().expect("event time"))
}

/// The `N` of "retrying in N ms" in a TASK_RETRYING message.
fn announced_delay(e: &Event) -> u64 {
    let rest = e
        .message
        .split("retrying in ")
        .nth(1)
        .unwrap_or_else(|| panic!("no delay in {}", describe_event(e)));
    rest.trim_end_matches(" ms")
        .parse()
        .unwrap_or_else(|_| panic!("no delay in {}", describe_event(e)))
}

async fn a_panicking_handler_is_retried_with_backoff_then_fails_the_migration(backend: Backend) {
    let cluster = Cluster::start_with(backend, &TIMINGS, 2, 2).await;
    let client = cluster.client().await;
    let policy = retry(3, INITIAL_BACKOFF_MS as u32, 60_000, 0);
    let p = plan(
        "panics",
        vec![stage("s", vec![task("panic", json!({"message": "kaboom"}))]).with_retry(policy)],
    );
    let m = client.create(create_inline(p, "panics/1")).await.unwrap();
    let (m, events) = client.finish_and_check(m.id, WAIT).await;
    assert_eq!(m.state(), MigrationState::Failed, "{}", log(&events));

    let dead = of_kind(&events, EventKind::TaskDead);
    assert_eq!(dead.len(), 1, "{}", log(&events));
    let want = format!("task {} (panic) failed after 3 attempts", dead[0].task_id);
    assert!(
        m.reason.contains(&want) && m.reason.contains("kaboom"),
        "reason {:?} should contain {want:?} and the panic message",
        m.reason
    );
    let retrying = of_kind(&events, EventKind::TaskRetrying);
    assert_eq!(retrying.len(), 2, "{}", log(&events));
    let mut previous = 0;
    for (k, r) in retrying.iter().enumerate() {
        assert!(r.message.contains("kaboom"), "{}", describe_event(r));
        let delay = announced_delay(r);
        let cap = INITIAL_BACKOFF_MS << k;
        assert!(
            delay >= previous && delay <= cap,
            "delay {delay} ms after attempt {}: previous {previous} ms, cap {cap} ms",
            k + 1
        );
        previous = delay;
        let next = events
            .iter()
            .find(|e| e.kind() == EventKind::TaskAssigned && e.attempt == r.attempt + 1)
            .expect("the next attempt");
        let waited = at(next) - at(r);
        assert!(
            waited + 2 >= delay as i64,
            "attempt {} assigned {waited} ms after a {delay} ms backoff",
            next.attempt
        );
    }
    assert_ok("attempt bound", check_attempt_bound(&events, 3));
}

async fn a_hanging_handler_times_out_on_every_attempt_then_fails(backend: Backend) {
    let cluster = Cluster::start_with(backend, &TIMINGS, 2, 2).await;
    let client = cluster.client().await;
    let timeout_ms = 1_000;
    let p = plan(
        "hangs",
        vec![
            stage("s", vec![task("hang", json!({}))]).with_retry(retry(3, 100, 1_000, timeout_ms)),
        ],
    );
    let m = client.create(create_inline(p, "hangs/1")).await.unwrap();
    let (m, events) = client.finish_and_check(m.id, WAIT).await;
    assert_eq!(m.state(), MigrationState::Failed, "{}", log(&events));
    assert!(
        m.reason.contains("(hang) failed after 3 attempts") && m.reason.contains("timed out"),
        "reason {:?}",
        m.reason
    );
    let retrying = of_kind(&events, EventKind::TaskRetrying);
    assert_eq!(retrying.len(), 2, "{}", log(&events));
    let ends: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e.kind(), EventKind::TaskRetrying | EventKind::TaskDead))
        .collect();
    for end in &ends {
        assert!(end.message.contains("timed out"), "{}", describe_event(end));
        let start = events
            .iter()
            .find(|e| e.kind() == EventKind::TaskAssigned && e.attempt == end.attempt)
            .expect("its assignment");
        assert!(
            at(end) - at(start) >= i64::from(timeout_ms),
            "attempt {} ended {} ms after it started",
            end.attempt,
            at(end) - at(start)
        );
    }
    assert_ok("attempt bound", check_attempt_bound(&events, 3));

    // The workers were told to stop, and dropped the handler that ignored it.
    wait_for(
        "a worker to drop an ignored cancellation",
        WAIT,
        async || {
            let logs: String = cluster.workers.iter().map(|w| w.logs()).collect();
            // Each attempt, told on the stream or by a heartbeat's answer.
            let told: BTreeSet<(i64, u32)> = cluster
                .workers
                .iter()
                .flat_map(|w| w.canceled_leases())
                .collect();
            (told.len() >= 3 && logs.contains("did not stop within")).then_some(())
        },
    )
    .await;
}

async fn two_attempts_timing_out_together_fail_the_migration_once(backend: Backend) {
    // One worker claims both tasks at once, so they share their deadline.
    let cluster = Cluster::start_with(backend, &TIMINGS, 1, 2).await;
    let client = cluster.client().await;
    let p = plan(
        "hang-twice",
        vec![stage("s", vec![task("hang", json!({})); 2]).with_retry(retry(1, 100, 1_000, 1_000))],
    );
    let m = client
        .create(create_inline(p, "hang-twice/1"))
        .await
        .unwrap();
    let (m, events) = client.finish_and_check(m.id, WAIT).await;
    assert_eq!(m.state(), MigrationState::Failed, "{}", log(&events));
    let stage = &m.stages[0];
    assert_eq!(
        (stage.total, stage.failed, stage.canceled),
        (2, 1, 1),
        "{stage:?}"
    );
    assert_eq!(
        of_kind(&events, EventKind::TaskDead).len(),
        1,
        "{}",
        log(&events)
    );
}
