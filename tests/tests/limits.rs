//! Limits of #19 part 5 beyond the message size (`e2e_bad_input`): each is
//! a flag, a request over it is refused naming the field and the flag, and
//! refusing it stores nothing (checked before any store call).

use serde_json::json;
use stagecoach_proto::json::json_to_struct;
use stagecoach_proto::v1::{
    CompleteRequest, Completion, CreateMigrationRequest, DeletePlanRequest, GetPlanRequest,
    HeartbeatRequest, LeaseStatus, LeaseToken, ListPlansRequest, MigrationState, NewTask, Plan,
    StageSpec, SubscribeRequest, TaskSpec, WatchMigrationRequest,
    create_migration_request::PlanSource,
};
use stagecoach_tests::{Backend, Client, Coordinator, assert_refused, on_both_backends};
use tonic::{Code, Status};

on_both_backends!(
    byte_and_count_limits_are_flags_and_store_nothing,
    list_plans_pages_without_tasks_and_delete_plan_removes_every_version,
    open_streams_are_bounded_by_flags
);

fn stage(name: &str, tasks: usize, payload: serde_json::Value) -> StageSpec {
    StageSpec {
        name: name.into(),
        tasks: (0..tasks)
            .map(|_| TaskSpec {
                kind: "noop".into(),
                payload: Some(json_to_struct(&payload)),
                ..Default::default()
            })
            .collect(),
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

async fn byte_and_count_limits_are_flags_and_store_nothing(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let coordinator = Coordinator::start(
        backend,
        &dir.path().join("coordinator"),
        &[
            "--max-payload-bytes",
            "1000",
            "--max-checkpoint-bytes",
            "100",
            "--max-tasks-per-plan",
            "5",
            "--max-stages-per-plan",
            "3",
            "--max-tasks-per-completion",
            "2",
        ],
    )
    .await;
    let client = Client::connect(&coordinator.url()).await;
    let small = json!({"table": "users"});
    let big = json!({"blob": "x".repeat(1_000)});
    let invalid = Code::InvalidArgument;

    assert_refused(
        "a payload over --max-payload-bytes",
        client
            .put_plan(plan("big-payload", vec![stage("a", 1, big.clone())]))
            .await,
        invalid,
        &[
            "stages[0].tasks[0].payload",
            "1000 bytes",
            "--max-payload-bytes",
        ],
    );
    assert_refused(
        "a payload over --max-payload-bytes, as JSON",
        client
            .put_plan_json(&json!({
                "name": "big-json",
                "stages": [{"name": "a", "tasks": [{"kind": "noop", "payload": big}]}]
            }))
            .await,
        invalid,
        &["stages[0].tasks[0].payload", "--max-payload-bytes"],
    );
    let stages = (0..4).map(|i| stage(&format!("s{i}"), 1, small.clone()));
    assert_refused(
        "more stages than --max-stages-per-plan",
        client.put_plan(plan("deep", stages.collect())).await,
        invalid,
        &["stages", "4 stages", "--max-stages-per-plan"],
    );
    assert_refused(
        "more tasks than --max-tasks-per-plan",
        client
            .put_plan(plan(
                "wide",
                vec![stage("a", 3, small.clone()), stage("b", 3, small.clone())],
            ))
            .await,
        invalid,
        &["stages", "6 declared tasks", "--max-tasks-per-plan"],
    );
    assert_refused(
        "an inline plan's payload",
        client
            .create(CreateMigrationRequest {
                plan_source: Some(PlanSource::InlinePlan(plan(
                    "inline",
                    vec![stage("a", 1, big.clone())],
                ))),
                subject: "project/1".into(),
                ..Default::default()
            })
            .await,
        invalid,
        &[
            "inline_plan.stages[0].tasks[0].payload",
            "--max-payload-bytes",
        ],
    );
    // At the limits: served.
    client
        .put_plan(plan(
            "fits",
            vec![stage("a", 3, small.clone()), stage("b", 2, small.clone())],
        ))
        .await
        .expect("a plan at the limits is accepted");
    assert_refused(
        "parameters over --max-payload-bytes",
        client
            .create(CreateMigrationRequest {
                plan_source: Some(PlanSource::PlanName("fits".into())),
                subject: "project/2".into(),
                parameters: Some(json_to_struct(&big)),
                ..Default::default()
            })
            .await,
        invalid,
        &["parameters", "--max-payload-bytes"],
    );

    let lease = Some(LeaseToken {
        task_id: 1,
        attempt: 1,
    });
    let mut workers = client.workers.clone();
    let heartbeat = HeartbeatRequest {
        worker_id: "w".into(),
        leases: vec![LeaseStatus {
            lease,
            checkpoint: Some(vec![7; 101]),
            ..Default::default()
        }],
    };
    assert_refused(
        "a checkpoint over --max-checkpoint-bytes",
        workers.heartbeat(heartbeat).await,
        invalid,
        &[
            "leases[0].checkpoint",
            "101 bytes",
            "--max-checkpoint-bytes",
        ],
    );
    let complete = |output: serde_json::Value, added: usize| CompleteRequest {
        worker_id: "w".into(),
        completions: vec![Completion {
            lease,
            output: Some(json_to_struct(&output)),
            add_tasks: (0..added)
                .map(|_| NewTask {
                    stage: "b".into(),
                    kind: "noop".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
    };
    assert_refused(
        "an output over --max-payload-bytes",
        workers.complete(complete(big.clone(), 0)).await,
        invalid,
        &["completions[0].output", "--max-payload-bytes"],
    );
    assert_refused(
        "more added tasks than --max-tasks-per-completion",
        workers.complete(complete(small.clone(), 3)).await,
        invalid,
        &[
            "completions[0].add_tasks",
            "3 tasks",
            "--max-tasks-per-completion",
        ],
    );

    let names: Vec<String> = (client.list_plans().await.expect("list plans"))
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, vec!["fits".to_string()], "only the plan that fits");
    assert_eq!(
        client.list_migrations().await.expect("list migrations"),
        vec![],
        "no migration was stored"
    );
}

async fn list_plans_pages_without_tasks_and_delete_plan_removes_every_version(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let coordinator = Coordinator::start(backend, &dir.path().join("coordinator"), &[]).await;
    let client = Client::connect(&coordinator.url()).await;
    let small = json!({"table": "users"});
    for name in ["p00", "p01", "p02", "p02", "p03", "p04"] {
        client
            .put_plan(plan(name, vec![stage("a", 2, small.clone())]))
            .await
            .expect("put plan");
    }

    // Pages of two, by name, latest versions, tasks left out.
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_plans_page(ListPlansRequest {
                page_size: 2,
                page_token,
                include_tasks: false,
            })
            .await
            .expect("a page of plans");
        for p in &page.plans {
            assert_eq!(p.stages.len(), 1, "{}: stages are listed", p.name);
            assert!(p.stages[0].tasks.is_empty(), "{}: tasks left out", p.name);
        }
        pages.push(
            page.plans
                .iter()
                .map(|p| format!("{}@{}", p.name, p.version))
                .collect::<Vec<_>>(),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(
        pages,
        vec![
            vec!["p00@1", "p01@1"],
            vec!["p02@2", "p03@1"],
            vec!["p04@1"]
        ]
    );
    let with_tasks = client
        .list_plans_page(ListPlansRequest {
            page_size: 1,
            include_tasks: true,
            ..Default::default()
        })
        .await
        .expect("a page with tasks");
    assert_eq!(with_tasks.plans[0].stages[0].tasks.len(), 2);
    assert_eq!(with_tasks.next_page_token, "p00");
    assert_refused(
        "a page over 1000",
        client
            .list_plans_page(ListPlansRequest {
                page_size: 1001,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        &["page_size", "1000"],
    );
    assert_refused(
        "a token this server did not issue",
        client
            .list_plans_page(ListPlansRequest {
                page_token: "not a name!".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        &["page_token"],
    );

    // Large plans with their tasks: a page ends after about 2 MiB, so
    // every page stays under the 4 MiB a client decodes by default.
    let blob = json!({"blob": "x".repeat(200_000)});
    for i in 0..5 {
        client
            .put_plan(plan(&format!("q{i}"), vec![stage("a", 5, blob.clone())]))
            .await
            .expect("a 1 MB plan");
    }
    let big = client
        .list_plans_page(ListPlansRequest {
            page_token: "p04".into(),
            include_tasks: true,
            ..Default::default()
        })
        .await
        .expect("a page of large plans decodes");
    assert!(
        (1..5).contains(&big.plans.len()) && !big.next_page_token.is_empty(),
        "{} plans, next {:?}",
        big.plans.len(),
        big.next_page_token
    );
    assert_eq!(client.list_plans().await.expect("every page").len(), 10);

    // DeletePlan: every version; migrations of it keep theirs.
    let m = client
        .create(CreateMigrationRequest {
            plan_source: Some(PlanSource::PlanName("p02".into())),
            subject: "project/1".into(),
            ..Default::default()
        })
        .await
        .expect("a migration of p02");
    let mut migrations = client.migrations.clone();
    let deleted = migrations
        .delete_plan(DeletePlanRequest { name: "p02".into() })
        .await
        .expect("delete p02")
        .into_inner();
    assert_eq!(deleted.versions_deleted, 2);
    assert_refused(
        "GetPlan of a deleted plan",
        migrations
            .get_plan(GetPlanRequest { name: "p02".into() })
            .await,
        Code::NotFound,
        &["p02"],
    );
    assert_refused(
        "DeletePlan of an unknown name",
        migrations
            .delete_plan(DeletePlanRequest { name: "p02".into() })
            .await,
        Code::NotFound,
        &["p02"],
    );
    let kept = client
        .get_migration(m.id)
        .await
        .expect("the migration stays");
    assert_eq!((kept.plan_name.as_str(), kept.plan_version), ("p02", 2));
    assert_eq!(kept.stages.len(), 1, "{kept:?}");
    client
        .cancel(m.id, "done")
        .await
        .expect("it can still be canceled");
    let again = client
        .put_plan(plan("p02", vec![stage("a", 1, small.clone())]))
        .await
        .expect("the name is free again");
    assert_eq!(again.version, 1);
}

/// `--max-watch-streams` and `--max-worker-streams`: one stream more is
/// `RESOURCE_EXHAUSTED` naming the flag, and closing one frees its place.
async fn open_streams_are_bounded_by_flags(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let coordinator = Coordinator::start(
        backend,
        &dir.path().join("coordinator"),
        &["--max-watch-streams", "1", "--max-worker-streams", "1"],
    )
    .await;
    let client = Client::connect(&coordinator.url()).await;
    client
        .put_plan(plan("p", vec![stage("a", 1, json!({}))]))
        .await
        .expect("put plan");
    let m = client
        .create(CreateMigrationRequest {
            plan_source: Some(PlanSource::PlanName("p".into())),
            subject: "project/1".into(),
            ..Default::default()
        })
        .await
        .expect("create");
    let watch = || {
        let mut migrations = client.migrations.clone();
        async move {
            migrations
                .watch_migration(WatchMigrationRequest {
                    migration_id: m.id,
                    after_event_id: 0,
                })
                .await
        }
    };
    let mut first = watch().await.expect("the first watch").into_inner();
    first
        .message()
        .await
        .expect("first message")
        .expect("a message");
    assert_refused(
        "a second watch",
        watch().await,
        Code::ResourceExhausted,
        &["--max-watch-streams", "STAGECOACH_MAX_WATCH_STREAMS"],
    );
    drop(first);
    eventually("a watch after the first closed", watch).await;

    let subscribe = |worker: &str| {
        let mut workers = client.workers.clone();
        let req = SubscribeRequest {
            worker_id: worker.into(),
            kinds: vec!["other".into()],
            slots: 1,
            ..Default::default()
        };
        async move { workers.subscribe(req).await }
    };
    let mut w1 = subscribe("w1")
        .await
        .expect("the first worker")
        .into_inner();
    w1.message().await.expect("welcome").expect("a message");
    assert_refused(
        "a second worker stream",
        subscribe("w2").await,
        Code::ResourceExhausted,
        &["--max-worker-streams", "STAGECOACH_MAX_WORKER_STREAMS"],
    );
    drop(w1);
    eventually("a worker after the first left", || subscribe("w2")).await;
}

/// Retries `call` until it succeeds, for at most 10 s.
async fn eventually<T, F, Fut>(what: &str, call: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match call().await {
            Ok(v) => return v,
            Err(s) if std::time::Instant::now() < until => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{what}: {s:?}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(s) => panic!("{what}: still refused after 10 s: {s:?}"),
        }
    }
}

/// `--handshake-timeout-ms`: a connection that sends part of the HTTP/2
/// preface, or nothing, is closed once the timeout passes; clients that
/// speak HTTP/2 are served as before.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_without_its_preface_is_closed_in_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("temp dir");
    let coordinator = Coordinator::start(
        Backend::Sqlite,
        &dir.path().join("coordinator"),
        &["--handshake-timeout-ms", "500"],
    )
    .await;
    let addr = coordinator.url().trim_start_matches("http://").to_string();
    for sent in [&b"PRI * HTTP/2.0\r\n"[..], b""] {
        let mut conn = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        conn.write_all(sent).await.expect("part of the preface");
        let start = std::time::Instant::now();
        // The server's SETTINGS may come first; then the end of the stream.
        let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let mut buf = [0u8; 1024];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "a connection that sent {} bytes is still open after 5 s",
            sent.len()
        );
        assert!(
            start.elapsed() >= std::time::Duration::from_millis(400),
            "closed before the timeout: {:?}",
            start.elapsed()
        );
    }
    let client = Client::connect(&coordinator.url()).await;
    client
        .list_plans()
        .await
        .expect("an HTTP/2 client is served");
}

/// `--idle-timeout-ms`: a connection with no call open for the timeout is
/// closed, one with an open stream is not, and a client whose idle
/// connection was closed is served again on its next call.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_connection_is_closed_and_a_streaming_one_is_not() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("temp dir");
    let coordinator = Coordinator::start(
        Backend::Sqlite,
        &dir.path().join("coordinator"),
        &["--idle-timeout-ms", "600"],
    )
    .await;

    // A peer that completes the HTTP/2 handshake (preface and an empty
    // SETTINGS frame), answers nothing and calls nothing.
    let addr = coordinator.url().trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("preface and SETTINGS");
    let start = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 1024];
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle connection is still open after 5 s");
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "closed before the idle timeout: {:?}",
        start.elapsed()
    );

    // A watch stream open for five idle periods keeps its connection: the
    // cancel made on the same connection reaches it.
    let client = Client::connect(&coordinator.url()).await;
    client
        .put_plan(plan("idle", vec![stage("s", 1, json!({}))]))
        .await
        .expect("put plan");
    let m = client
        .create_migration("idle", "project/idle", &json!({}))
        .await
        .expect("create");
    let mut watch = client
        .migrations
        .clone()
        .watch_migration(WatchMigrationRequest {
            migration_id: m.id,
            after_event_id: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    watch.message().await.expect("first").expect("a message");
    tokio::time::sleep(Duration::from_secs(3)).await;
    client.cancel(m.id, "done waiting").await.expect("cancel");
    let canceled = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let update = watch.message().await.expect("the stream is alive");
            let update = update.expect("the stream ends only after the cancel");
            if update
                .migration
                .is_some_and(|m| m.state() == MigrationState::Canceled)
            {
                return;
            }
        }
    })
    .await;
    assert!(canceled.is_ok(), "the watch saw the cancel");
    drop(watch);

    // Idle again: the connection goes, the next call connects anew.
    tokio::time::sleep(Duration::from_secs(2)).await;
    client
        .get_migration(m.id)
        .await
        .expect("a client whose idle connection was closed is served");
}
