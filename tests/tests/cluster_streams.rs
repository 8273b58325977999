//! One live Subscribe stream per worker id across two coordinators on one
//! PostgreSQL database (issue #19): the database's record of each worker
//! id's stream (`store::streams`), with real coordinator and worker
//! processes.
//!
//! - A worker process streams from coordinator A; a Subscribe with its id
//!   and another instance (or none) on coordinator B is ALREADY_EXISTS, so
//!   B never lists it nor hands it work.
//! - A worker that stops (SIGTERM) frees its id at once: B accepts another
//!   process with it while A, alive, keeps renewing its claims.
//! - `kill -9` of A: the same worker process moves to B without waiting
//!   for A's claims to expire (B accepts its instance at once), its tasks
//!   all succeed and the checker passes; a raw worker that streamed from A
//!   keeps its id from other processes until A's claims expire, then B
//!   accepts one.

use std::time::{Duration, Instant};

use serde_json::json;
use stagecoach_proto::v1::worker_message::Message;
use stagecoach_proto::v1::worker_service_client::WorkerServiceClient;
use stagecoach_proto::v1::{MigrationState, SubscribeRequest, WorkerMessage};
use stagecoach_tests::plans::{create_inline, plan, stage, task};
use stagecoach_tests::{FakeWorker, Fleet, assert_refused, wait_for};
use tonic::{Code, Status, Streaming};

const WAIT: Duration = Duration::from_secs(120);
/// Heartbeats every 1.5 s: a coordinator's claims of its streams outlive
/// its last renewal by three of these, 4.5 s — long enough to tell an
/// instant failover from one that waited for them to expire.
const TIMING: [&str; 6] = [
    "--heartbeat-interval-ms",
    "1500",
    "--lease-duration-ms",
    "5000",
    "--sweep-interval-ms",
    "100",
];
const CLAIMS_TTL: Duration = Duration::from_millis(4_500);

/// Subscribes as `id` with `instance` on the coordinator at `url`; the
/// open stream once its Welcome came.
async fn subscribe_as(
    url: &str,
    id: &str,
    instance: u64,
) -> Result<Streaming<WorkerMessage>, Status> {
    let mut client = WorkerServiceClient::connect(url.to_string())
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    let mut stream = client
        .subscribe(SubscribeRequest {
            worker_id: id.into(),
            kinds: vec!["fake.nothing".into()],
            slots: 1,
            name: "impostor".into(),
            instance,
        })
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
    match first {
        Ok(Ok(Some(WorkerMessage {
            message: Some(Message::Welcome(_)),
        }))) => Ok(stream),
        other => panic!("Subscribe as {id}: no Welcome: {other:?}"),
    }
}

/// Subscribes as `id` on `url` until it is accepted; how long that took.
async fn accepted_after(
    url: &str,
    id: &str,
    instance: u64,
) -> (Streaming<WorkerMessage>, Duration) {
    let asked = Instant::now();
    let stream = wait_for(
        &format!("{url} to accept {id}"),
        WAIT,
        async || match subscribe_as(url, id, instance).await {
            Ok(stream) => Some(stream),
            Err(s) if s.code() == Code::AlreadyExists => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                None
            }
            Err(s) => panic!("Subscribe as {id}: {s}"),
        },
    )
    .await;
    (stream, asked.elapsed())
}

/// The ids coordinator `i` lists.
async fn listed(fleet: &Fleet, i: usize) -> Vec<String> {
    let workers = fleet.client(i).await.list_workers().await.unwrap();
    workers.into_iter().map(|w| w.worker_id).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_live_stream_per_worker_id_across_coordinators() {
    let mut fleet = Fleet::start(2, &TIMING).await;
    fleet.add_worker("w1", 2, &[0, 1]);
    let on = fleet.wait_for_streams(&[0, 1], WAIT).await;
    // Whichever the worker picked is A.
    let a = on["w1"];
    let b = 1 - a;
    let (url_a, url_b) = (fleet.url(a), fleet.url(b));

    // Another process with its id, on the other coordinator: refused.
    for instance in [7, 0] {
        assert_refused(
            &format!("Subscribe as w1 with instance {instance} on B"),
            subscribe_as(&url_b, "w1", instance).await,
            Code::AlreadyExists,
            &["\"w1\"", "connected already", "one stream at a time"],
        );
    }
    assert!(!listed(&fleet, b).await.contains(&"w1".to_string()));

    // A worker that stops frees its id at once, though A lives on.
    fleet.add_worker("w2", 1, &[a]);
    fleet.wait_for_streams(&[a], WAIT).await;
    assert_refused(
        "Subscribe as w2 on B",
        subscribe_as(&url_b, "w2", 7).await,
        Code::AlreadyExists,
        &["\"w2\""],
    );
    let w2 = fleet.workers.iter_mut().find(|w| w.id() == "w2").unwrap();
    w2.terminate();
    assert!(w2.wait_exit(WAIT).await.is_some(), "w2 stops");
    let (impostor, after) = accepted_after(&url_b, "w2", 7).await;
    assert!(listed(&fleet, b).await.contains(&"w2".to_string()));
    drop(impostor);

    // A raw worker on A, and work for w1.
    let raw = FakeWorker::subscribe(&url_a, "raw-a", &["fake.nothing"], 1).await;
    let client_b = fleet.client(b).await;
    let tasks = (0..40)
        .map(|i| task("sleep", json!({"ms": 100, "i": i})))
        .collect();
    let p = plan("streams", vec![stage("s", tasks)]);
    let m = client_b
        .create(create_inline(p, "streams/1"))
        .await
        .unwrap();
    wait_for("w1 to finish a few tasks", WAIT, async || {
        let m = client_b.get_migration(m.id).await.ok()?;
        (m.stages[0].succeeded >= 4).then_some(())
    })
    .await;

    fleet.coordinators[a].kill9().await;
    let killed = Instant::now();
    // A's claims still hold raw-a's id against other processes...
    assert_refused(
        "Subscribe as raw-a on B just after A died",
        subscribe_as(&url_b, "raw-a", 9).await,
        Code::AlreadyExists,
        &["\"raw-a\""],
    );
    // ...but not against w1's own process: it moves at once.
    wait_for("w1 on B", WAIT, async || {
        listed(&fleet, b)
            .await
            .contains(&"w1".to_string())
            .then_some(())
    })
    .await;
    let moved_after = killed.elapsed();
    let (raw_stream, raw_after) = accepted_after(&url_b, "raw-a", 9).await;
    let freed_after = killed.elapsed();
    drop((raw, raw_stream));

    let (m, events) = client_b.finish_and_check(m.id, WAIT).await;
    assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);
    assert_eq!(m.stages[0].succeeded, 40);
    let logs = fleet.workers[0].logs();
    assert!(
        !logs.contains("connected already"),
        "w1 was refused somewhere:\n{logs}"
    );
    assert!(
        moved_after < CLAIMS_TTL,
        "w1 waited for A's claims to expire: on B {moved_after:?} after the kill"
    );
    assert!(
        freed_after <= CLAIMS_TTL + Duration::from_secs(3),
        "raw-a's id freed only {freed_after:?} after the kill"
    );
    eprintln!(
        "w2's id free {after:?} after it stopped; after kill -9 of A: w1 on B in {moved_after:?}, \
         raw-a's id free for another process in {freed_after:?} (asked for {raw_after:?}); \
         {} events, checker clean",
        events.len()
    );
}
