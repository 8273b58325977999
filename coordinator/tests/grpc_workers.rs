//! Workers that cannot be impersonated, through the gRPC services on both
//! backends (handlers called directly, no socket): a report or heartbeat
//! with a forged lease secret is FAILED_PRECONDITION like a stale token; a
//! second Subscribe for a worker id whose stream is open is ALREADY_EXISTS
//! unless it comes from the same process (its `instance`); ListWorkers
//! shows no secret; UndrainWorker gives a drained worker work again.

mod support;

use support::contract::{Backend, Db, on_both_backends, store_with};

use std::sync::Arc;
use std::time::Duration;

use stagecoach_coordinator::engine::{Coordinator, Timing, run_dispatcher};
use stagecoach_coordinator::grpc::{AdminApi, MigrationApi, WorkerApi};
use stagecoach_coordinator::store::Limits;
use stagecoach_proto::v1::worker_message::Message;
use stagecoach_proto::v1::worker_service_server::WorkerService;
use stagecoach_proto::v1::{self as pb, admin_service_server::AdminService};
use stagecoach_proto::v1::{WorkerMessage, migration_service_server::MigrationService};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request};

struct Apis {
    migrations: MigrationApi,
    workers: WorkerApi,
    admin: AdminApi,
    shutdown: CancellationToken,
    _db: Db,
}

impl Drop for Apis {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn apis(backend: Backend) -> Apis {
    let limits = Limits {
        lease_ms: 10_000,
        heartbeat_interval_ms: 100,
        max_reassignments: 3,
    };
    let db = store_with(backend, limits).await;
    let timing = Timing {
        heartbeat_interval: Duration::from_millis(100),
        lease_duration: Duration::from_secs(10),
        sweep_interval: Duration::from_millis(100),
    };
    let shutdown = CancellationToken::new();
    let core: Arc<Coordinator> = Coordinator::new(db.store.clone(), timing, shutdown.clone());
    tokio::spawn(run_dispatcher(core.clone(), shutdown.clone()));
    Apis {
        migrations: MigrationApi::new(core.clone()),
        workers: WorkerApi::new(core.clone()),
        admin: AdminApi::new(core),
        shutdown,
        _db: db,
    }
}

type Messages = std::pin::Pin<Box<dyn Stream<Item = Result<WorkerMessage, tonic::Status>> + Send>>;

fn subscribe_request(id: &str, instance: u64) -> Request<pb::SubscribeRequest> {
    Request::new(pb::SubscribeRequest {
        worker_id: id.into(),
        kinds: vec!["noop".into()],
        slots: 4,
        name: String::new(),
        instance,
    })
}

/// Subscribes and reads the Welcome.
async fn subscribe(a: &Apis, id: &str, instance: u64) -> Result<Messages, tonic::Status> {
    let mut stream: Messages = a
        .workers
        .subscribe(subscribe_request(id, instance))
        .await?
        .into_inner();
    match stream.next().await {
        Some(Ok(WorkerMessage {
            message: Some(Message::Welcome(_)),
        })) => Ok(stream),
        other => panic!("no Welcome: {other:?}"),
    }
}

/// The next assignment on `stream`, within 10 s.
async fn assignment(stream: &mut Messages) -> pb::Assignment {
    let next = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await {
                Some(Ok(WorkerMessage {
                    message: Some(Message::Assignment(a)),
                })) => return a,
                Some(Ok(_)) => continue,
                other => panic!("the stream ended: {other:?}"),
            }
        }
    });
    next.await.expect("an assignment within 10 s")
}

async fn create(a: &Apis, subject: &str, tasks: usize) {
    let plan = pb::Plan {
        name: "p".into(),
        stages: vec![pb::StageSpec {
            name: "a".into(),
            tasks: (0..tasks)
                .map(|_| pb::TaskSpec {
                    kind: "noop".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    };
    use pb::create_migration_request::PlanSource;
    a.migrations
        .create_migration(Request::new(pb::CreateMigrationRequest {
            plan_source: Some(PlanSource::InlinePlan(plan)),
            subject: subject.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
}

async fn heartbeat(a: &Apis, id: &str, leases: Vec<pb::LeaseStatus>) -> pb::HeartbeatResponse {
    let req = pb::HeartbeatRequest {
        worker_id: id.into(),
        leases,
    };
    a.workers
        .heartbeat(Request::new(req))
        .await
        .unwrap()
        .into_inner()
}

async fn worker_info(a: &Apis, id: &str) -> pb::WorkerInfo {
    let workers = a
        .admin
        .list_workers(Request::new(pb::ListWorkersRequest {}))
        .await
        .unwrap()
        .into_inner()
        .workers;
    workers
        .into_iter()
        .find(|w| w.worker_id == id)
        .unwrap_or_else(|| panic!("{id} is not listed"))
}

/// A worker id and a lease token, as ListWorkers shows them, are not enough
/// to report: Complete, Fail and Heartbeat need the assignment's secret.
async fn a_forged_lease_secret_is_failed_precondition_and_changes_nothing(backend: Backend) {
    let a = apis(backend).await;
    let mut stream = subscribe(&a, "w", 1).await.unwrap();
    create(&a, "s", 1).await;
    let got = assignment(&mut stream).await;
    assert_ne!(got.lease_secret, 0, "the assignment carries a secret");

    let info = worker_info(&a, "w").await;
    assert_eq!(info.leases, vec![got.lease.unwrap()]);
    assert!(
        !format!("{info:?}").contains(&got.lease_secret.to_string()),
        "ListWorkers shows the secret: {info:?}"
    );

    for secret in [0, got.lease_secret ^ 0x8000_0000_0000_0000] {
        let complete = pb::CompleteRequest {
            worker_id: "w".into(),
            completions: vec![pb::Completion {
                lease: got.lease,
                lease_secret: secret,
                ..Default::default()
            }],
        };
        let err = a
            .workers
            .complete(Request::new(complete))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(!err.message().contains("secret"), "{err:?}");
        let fail = pb::FailRequest {
            worker_id: "w".into(),
            failures: vec![pb::Failure {
                lease: got.lease,
                lease_secret: secret,
                error: "forged".into(),
                retryable: false,
            }],
        };
        let err = a.workers.fail(Request::new(fail)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        let hb = heartbeat(
            &a,
            "w",
            vec![pb::LeaseStatus {
                lease: got.lease,
                lease_secret: secret,
                ..Default::default()
            }],
        )
        .await;
        assert!(hb.renewed.is_empty(), "{hb:?}");
        assert_eq!(hb.cancel.len(), 1, "{hb:?}");
    }
    assert_eq!(worker_info(&a, "w").await.leases, vec![got.lease.unwrap()]);

    let hb = heartbeat(
        &a,
        "w",
        vec![pb::LeaseStatus {
            lease: got.lease,
            lease_secret: got.lease_secret,
            ..Default::default()
        }],
    )
    .await;
    assert_eq!((hb.renewed.len(), hb.cancel.len()), (1, 0), "{hb:?}");
    let complete = pb::CompleteRequest {
        worker_id: "w".into(),
        completions: vec![pb::Completion {
            lease: got.lease,
            lease_secret: got.lease_secret,
            ..Default::default()
        }],
    };
    let ok = a.workers.complete(Request::new(complete)).await.unwrap();
    assert!(ok.into_inner().results[0].accepted);
}

/// While a worker's stream is open, a Subscribe with its id from another
/// process is refused with ALREADY_EXISTS and the first stream keeps its
/// work; once that stream is gone, the id subscribes again.
async fn a_second_subscribe_for_a_live_worker_id_is_refused(backend: Backend) {
    let a = apis(backend).await;
    let mut first = subscribe(&a, "w", 1).await.unwrap();
    for instance in [0, 2] {
        let err = match subscribe(&a, "w", instance).await {
            Ok(_) => panic!("a second stream took worker w over (instance {instance})"),
            Err(e) => e,
        };
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
        assert!(err.message().contains("connected already"), "{err:?}");
    }
    create(&a, "s", 1).await;
    let got = assignment(&mut first).await;
    assert!(got.lease.is_some());

    // The client goes away: its stream is dropped, the id is free again.
    drop(first);
    let mut again = subscribe(&a, "w", 3).await.unwrap();
    create(&a, "t", 1).await;
    assignment(&mut again).await;
}

/// The same process (same `instance`) reconnecting before the coordinator
/// noticed its old stream die takes the id over: the old stream ends, the
/// new one gets the work.
async fn the_same_process_reconnecting_takes_its_stream_over(backend: Backend) {
    let a = apis(backend).await;
    let mut old = subscribe(&a, "w", 42).await.unwrap();
    let mut new = subscribe(&a, "w", 42).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), old.next()).await;
    assert!(
        matches!(ended, Ok(None)),
        "the old stream did not end: {ended:?}"
    );
    create(&a, "s", 1).await;
    assignment(&mut new).await;
}

/// A drained worker gets no work; UndrainWorker makes it eligible again
/// and the next pass gives it the waiting task. An unknown id is NOT_FOUND.
async fn undrain_makes_a_drained_worker_eligible_again(backend: Backend) {
    let a = apis(backend).await;
    let mut stream = subscribe(&a, "w", 1).await.unwrap();
    let drained = a
        .admin
        .drain_worker(Request::new(pb::DrainWorkerRequest {
            worker_id: "w".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .worker
        .unwrap();
    assert!(drained.draining && !drained.eligible, "{drained:?}");
    create(&a, "s", 1).await;
    let none = tokio::time::timeout(Duration::from_millis(300), assignment(&mut stream)).await;
    assert!(none.is_err(), "a drained worker got work");

    heartbeat(&a, "w", vec![]).await;
    let back = a
        .admin
        .undrain_worker(Request::new(pb::UndrainWorkerRequest {
            worker_id: "w".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .worker
        .unwrap();
    assert!(!back.draining && back.eligible, "{back:?}");
    assignment(&mut stream).await;

    let err = a
        .admin
        .undrain_worker(Request::new(pb::UndrainWorkerRequest {
            worker_id: "nobody".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

on_both_backends!(
    a_forged_lease_secret_is_failed_precondition_and_changes_nothing,
    a_second_subscribe_for_a_live_worker_id_is_refused,
    the_same_process_reconnecting_takes_its_stream_over,
    undrain_makes_a_drained_worker_eligible_again,
);
