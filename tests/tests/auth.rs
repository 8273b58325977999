//! Bearer tokens with roles, and the safe default without them:
//!
//! - the role × RPC matrix: every RPC of the three services called with no
//!   token, a malformed header, an unknown token and a token of each role;
//!   each cell's code is the one the role table says (`UNAUTHENTICATED`,
//!   `PERMISSION_DENIED` naming the roles that may, or the handler's own
//!   answer), and the denied calls, made against real migrations, plans,
//!   pools and a connected worker, change nothing a viewer can read;
//!   health answers without a token; the event log names who created,
//!   canceled and retried (`created by`, `canceled by`, `retried by`);
//! - SIGHUP re-reads the tokens file: a removed token is refused and an added
//!   one accepted without a restart, and a file that no longer parses is
//!   logged and the tokens in force stay; a `worker` binary with
//!   `--token-file` runs a migration on the authenticated coordinator;
//! - without a tokens file the coordinator refuses a non-loopback address in
//!   one line naming the fix, starts there with `--allow-unauthenticated`
//!   and warns; a bad tokens file stops the start naming its line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use stagecoach_proto::v1::{
    CancelMigrationRequest, CompleteRequest, CreateMigrationRequest, CreatePoolRequest,
    DeletePlanRequest, DrainWorkerRequest, FailRequest, GetMigrationRequest, GetPlanRequest,
    GetSubjectStatusRequest, HeartbeatRequest, ListEventsRequest, ListMigrationsRequest,
    ListPlansRequest, ListPoolsRequest, ListWorkersRequest, MigrationState, PausePoolRequest,
    PutPlanRequest, ResumePoolRequest, RetryMigrationRequest, SetPoolSlotsRequest,
    SubscribeRequest, UndrainWorkerRequest, WatchMigrationRequest,
    create_migration_request::PlanSource, put_plan_request::Source,
};
use stagecoach_tests::binaries::binaries;
use stagecoach_tests::plans::{plan, stage, task};
use stagecoach_tests::{Backend, Client, Coordinator, Worker, on_both_backends, wait_for};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

on_both_backends!(
    every_rpc_answers_each_role_as_the_table_says,
    sighup_reloads_the_tokens_file,
    a_worker_token_acts_only_as_its_worker_ids,
    no_tokens_means_loopback_only
);

const WAIT: Duration = Duration::from_secs(60);

/// `coordinator token create`: the token and the tokens-file line.
async fn make_token(role: &str, name: &str) -> (String, String) {
    make_token_with(role, name, &[]).await
}

/// [`make_token`] with more flags (`--worker-ids …`).
async fn make_token_with(role: &str, name: &str, more: &[&str]) -> (String, String) {
    let out = tokio::process::Command::new(&binaries().coordinator)
        .args(["token", "create", "--role", role, "--name", name])
        .args(more)
        .output()
        .await
        .expect("run coordinator token create");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "token, then the line: {stdout:?}");
    let (token, line) = (lines[0].to_string(), lines[1].to_string());
    assert!(token.len() >= 32, "at least 128 random bits: {token}");
    assert!(line.starts_with(&format!("{role} {name} ")), "{line}");
    assert!(
        !line.contains(&token),
        "the line holds the hash, not the token"
    );
    (token, line)
}

struct Tokens {
    file: PathBuf,
    admin: String,
    client: String,
    worker: String,
    viewer: String,
}

async fn tokens(dir: &Path) -> Tokens {
    let (admin, a) = make_token("admin", "ops-admin").await;
    let (client, c) = make_token("client", "app-client").await;
    let (worker, w) = make_token("worker", "fleet").await;
    let (viewer, v) = make_token("viewer", "dash").await;
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("tokens");
    std::fs::write(&file, format!("# role name sha256\n{a}\n\n{c}\n{w}\n{v}\n")).unwrap();
    Tokens {
        file,
        admin,
        client,
        worker,
        viewer,
    }
}

/// Everything a denied call could have changed, as a viewer reads it.
async fn snapshot(c: &Client) -> String {
    let plans = c.list_plans().await.expect("ListPlans");
    let migrations = c.list_migrations().await.expect("ListMigrations");
    let events = c.all_events().await.expect("ListEvents");
    let pools = c
        .admin
        .clone()
        .list_pools(ListPoolsRequest {})
        .await
        .expect("ListPools")
        .into_inner();
    let workers: Vec<_> = c
        .list_workers()
        .await
        .expect("ListWorkers")
        .into_iter()
        // Not `eligible`: it turns false by itself once the raw worker's
        // heartbeat is three intervals old.
        .map(|w| (w.worker_id, w.slots, w.draining, w.last_heartbeat))
        .collect();
    format!("{plans:?}\n{migrations:?}\n{events:?}\n{pools:?}\n{workers:?}")
}

/// The RPCs, each with the roles the table gives it (admin may call all).
const RPCS: &[(&str, &[&str])] = &[
    ("MigrationService/PutPlan", &["client"]),
    ("MigrationService/GetPlan", &["client", "viewer"]),
    ("MigrationService/ListPlans", &["client", "viewer"]),
    // Not in the role table: admin only.
    ("MigrationService/DeletePlan", &[]),
    ("MigrationService/CreateMigration", &["client"]),
    ("MigrationService/GetMigration", &["client", "viewer"]),
    ("MigrationService/ListMigrations", &["client", "viewer"]),
    ("MigrationService/WatchMigration", &["client", "viewer"]),
    ("MigrationService/CancelMigration", &["client"]),
    ("MigrationService/RetryMigration", &["client"]),
    ("MigrationService/GetSubjectStatus", &["client", "viewer"]),
    ("MigrationService/ListEvents", &["client", "viewer"]),
    ("WorkerService/Subscribe", &["worker"]),
    ("WorkerService/Heartbeat", &["worker"]),
    ("WorkerService/Complete", &["worker"]),
    ("WorkerService/Fail", &["worker"]),
    ("AdminService/ListPools", &["viewer"]),
    ("AdminService/CreatePool", &[]),
    ("AdminService/SetPoolSlots", &[]),
    ("AdminService/PausePool", &[]),
    ("AdminService/ResumePool", &[]),
    ("AdminService/ListWorkers", &["viewer"]),
    ("AdminService/DrainWorker", &[]),
    ("AdminService/UndrainWorker", &[]),
];

/// Calls `rpc` as `c`; the code it answers (OK included).
async fn call(c: &Client, rpc: &str, migration: i64, failed: i64, worker: &str) -> (Code, String) {
    let (m, w, a) = (c.migrations.clone(), c.workers.clone(), c.admin.clone());
    let mut m = m;
    let mut w = w;
    let mut a = a;
    let p = plan("denied", vec![stage("s", vec![task("noop", json!({}))])]);
    macro_rules! code {
        ($e:expr) => {
            match $e.await {
                Ok(_) => (Code::Ok, String::new()),
                Err(s) => (s.code(), s.message().to_string()),
            }
        };
    }
    match rpc {
        "MigrationService/PutPlan" => code!(m.put_plan(PutPlanRequest {
            source: Some(Source::Plan(p)),
        })),
        "MigrationService/GetPlan" => code!(m.get_plan(GetPlanRequest { name: "p".into() })),
        "MigrationService/ListPlans" => code!(m.list_plans(ListPlansRequest::default())),
        "MigrationService/DeletePlan" => code!(m.delete_plan(DeletePlanRequest {
            name: "never-stored".into(),
        })),
        "MigrationService/CreateMigration" => code!(m.create_migration(CreateMigrationRequest {
            plan_source: Some(PlanSource::PlanName("p".into())),
            subject: format!("denied/{}", rand_suffix()),
            ..Default::default()
        })),
        "MigrationService/GetMigration" => code!(m.get_migration(GetMigrationRequest {
            migration_id: migration,
        })),
        "MigrationService/ListMigrations" => {
            code!(m.list_migrations(ListMigrationsRequest::default()))
        }
        "MigrationService/WatchMigration" => code!(m.watch_migration(WatchMigrationRequest {
            migration_id: migration,
            after_event_id: 0,
        })),
        "MigrationService/CancelMigration" => code!(m.cancel_migration(CancelMigrationRequest {
            migration_id: migration,
            reason: "matrix".into(),
        })),
        "MigrationService/RetryMigration" => code!(m.retry_migration(RetryMigrationRequest {
            migration_id: failed,
        })),
        "MigrationService/GetSubjectStatus" => {
            code!(m.get_subject_status(GetSubjectStatusRequest {
                subject: "project/1".into(),
            }))
        }
        "MigrationService/ListEvents" => code!(m.list_events(ListEventsRequest {
            migration_id: migration,
            after_event_id: 0,
            limit: 10,
        })),
        "WorkerService/Subscribe" => code!(w.subscribe(SubscribeRequest {
            worker_id: format!("matrix-{}", rand_suffix()),
            kinds: vec!["noop".into()],
            slots: 1,
            ..Default::default()
        })),
        "WorkerService/Heartbeat" => code!(w.heartbeat(HeartbeatRequest {
            worker_id: worker.into(),
            ..Default::default()
        })),
        "WorkerService/Complete" => code!(w.complete(CompleteRequest {
            worker_id: worker.into(),
            ..Default::default()
        })),
        "WorkerService/Fail" => code!(w.fail(FailRequest {
            worker_id: worker.into(),
            ..Default::default()
        })),
        "AdminService/ListPools" => code!(a.list_pools(ListPoolsRequest {})),
        "AdminService/CreatePool" => code!(a.create_pool(CreatePoolRequest {
            name: format!("pool-{}", rand_suffix()),
            slots: 2,
        })),
        "AdminService/SetPoolSlots" => code!(a.set_pool_slots(SetPoolSlotsRequest {
            name: "default".into(),
            slots: 7,
        })),
        "AdminService/PausePool" => code!(a.pause_pool(PausePoolRequest {
            name: "default".into(),
        })),
        "AdminService/ResumePool" => code!(a.resume_pool(ResumePoolRequest {
            name: "paused".into(),
        })),
        "AdminService/ListWorkers" => code!(a.list_workers(ListWorkersRequest {})),
        "AdminService/DrainWorker" => code!(a.drain_worker(DrainWorkerRequest {
            worker_id: worker.into(),
        })),
        "AdminService/UndrainWorker" => code!(a.undrain_worker(UndrainWorkerRequest {
            worker_id: worker.into(),
        })),
        other => panic!("no call for {other}"),
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn every_rpc_answers_each_role_as_the_table_says(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let t = tokens(tmp.path()).await;
    let file = t.file.to_str().unwrap();
    let coord = Coordinator::start(backend, &tmp.path().join("c"), &["--auth-tokens", file]).await;
    let anon = Client::connect(&coord.url()).await;
    let admin = anon.with_token(Some(&t.admin));
    let client = anon.with_token(Some(&t.client));
    let viewer = anon.with_token(Some(&t.viewer));

    // Health needs no token.
    let health = HealthClient::new(anon.channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("health answers without a token");
    assert_eq!(health.into_inner().status, 1, "SERVING");

    // Something to deny changes to: a plan, a migration that stays queued
    // (its pool is paused), one that failed, two pools, a connected worker.
    admin
        .admin
        .clone()
        .create_pool(CreatePoolRequest {
            name: "paused".into(),
            slots: 1,
        })
        .await
        .expect("CreatePool as admin");
    admin
        .admin
        .clone()
        .pause_pool(PausePoolRequest {
            name: "paused".into(),
        })
        .await
        .expect("PausePool as admin");
    client
        .put_plan(plan("p", vec![stage("s", vec![task("noop", json!({}))])]))
        .await
        .expect("PutPlan as client");
    let queued = client
        .create(CreateMigrationRequest {
            plan_source: Some(PlanSource::PlanName("p".into())),
            subject: "project/1".into(),
            pool: "paused".into(),
            ..Default::default()
        })
        .await
        .expect("CreateMigration as client");
    let doomed = client
        .create(CreateMigrationRequest {
            plan_source: Some(PlanSource::PlanName("p".into())),
            subject: "project/2".into(),
            pool: "paused".into(),
            ..Default::default()
        })
        .await
        .expect("CreateMigration as client");
    let canceled = client
        .cancel(doomed.id, "not needed")
        .await
        .expect("cancel");
    assert_eq!(canceled.reason, "canceled by app-client: not needed");
    let worker_client = anon.with_token(Some(&t.worker));
    let _stream = worker_client
        .workers
        .clone()
        .subscribe(SubscribeRequest {
            worker_id: "w1".into(),
            kinds: vec!["noop".into()],
            slots: 1,
            ..Default::default()
        })
        .await
        .expect("Subscribe as worker");
    viewer.wait_for_workers(&["w1"], WAIT).await;

    let callers: Vec<(&str, Client)> = vec![
        ("no token", anon.clone()),
        (
            "not bearer",
            anon.with_authorization("Basic b3BzOnNlY3JldA=="),
        ),
        (
            "unknown token",
            anon.with_token(Some("sct_0123456789abcdef0123456789abcdef")),
        ),
        ("admin", admin.clone()),
        ("client", client.clone()),
        ("worker", worker_client.clone()),
        ("viewer", viewer.clone()),
    ];

    // Every denied cell first, then check nothing moved.
    let before = snapshot(&viewer).await;
    let mut denied = 0;
    for (rpc, roles) in RPCS {
        for (who, c) in &callers {
            let expected = match *who {
                "no token" | "not bearer" | "unknown token" => Code::Unauthenticated,
                "admin" => continue,
                role if roles.contains(&role) => continue,
                _ => Code::PermissionDenied,
            };
            let (code, message) = call(c, rpc, queued.id, doomed.id, "w1").await;
            assert_eq!(code, expected, "{rpc} as {who}: {message}");
            if expected == Code::PermissionDenied {
                let mut needed = vec!["admin"];
                needed.extend(roles.iter());
                for role in needed {
                    assert!(
                        message.contains(role),
                        "{rpc} as {who} names role {role}: {message}"
                    );
                }
                assert!(message.contains("needs role"), "{message}");
            }
            denied += 1;
        }
    }
    assert_eq!(
        snapshot(&viewer).await,
        before,
        "denied calls changed nothing"
    );
    assert!(denied > 100, "{denied} denied cells");

    // Every allowed cell reaches its handler: whatever it answers, it is
    // not an auth refusal.
    for (rpc, roles) in RPCS {
        for (who, c) in &callers[3..] {
            if *who != "admin" && !roles.contains(who) {
                continue;
            }
            let (code, message) = call(c, rpc, queued.id, doomed.id, "w1").await;
            assert!(
                !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                "{rpc} as {who} is allowed, got {code:?}: {message}"
            );
        }
    }

    // Who did what, in the event log.
    let events = viewer.events(doomed.id).await.unwrap();
    let created = &events[0];
    assert!(
        created.message.contains("created by app-client"),
        "{created:?}"
    );
    let retried: Vec<_> = events
        .iter()
        .filter(|e| e.message.starts_with("retried by "))
        .map(|e| e.message.as_str())
        .collect();
    // Admin's cells run first: its retry re-queued the canceled migration,
    // so the client's found nothing to retry.
    assert_eq!(retried, ["retried by ops-admin"]);
    assert!(
        events
            .iter()
            .any(|e| e.message == "canceled by app-client: not needed"),
        "{events:?}"
    );
    let m = viewer.get_migration(queued.id).await.unwrap();
    assert_eq!(m.state(), MigrationState::Canceled);
    assert_eq!(m.reason, "canceled by ops-admin: matrix");
    let logs = coord.logs();
    for words in ["pool slots set by ops-admin", "worker drained by ops-admin"] {
        assert!(logs.contains(words), "the log says {words:?}");
    }
}

async fn sighup_reloads_the_tokens_file(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let t = tokens(tmp.path()).await;
    let (bob, bob_line) = make_token("client", "bob").await;
    let original = std::fs::read_to_string(&t.file).unwrap();
    std::fs::write(&t.file, format!("{original}{bob_line}\n")).unwrap();
    let file = t.file.to_str().unwrap();
    let coord = Coordinator::start(backend, &tmp.path().join("c"), &["--auth-tokens", file]).await;
    let anon = Client::connect(&coord.url()).await;
    let client = anon.with_token(Some(&t.client));
    let bob_client = anon.with_token(Some(&bob));
    bob_client.list_plans().await.expect("bob's token works");

    // A worker binary with its token in a file runs a migration.
    let token_file = tmp.path().join("worker.token");
    std::fs::write(&token_file, format!("{}\n", t.worker)).unwrap();
    let _worker = Worker::start_with(
        &coord.url(),
        2,
        &tmp.path().join("shared"),
        "w-auth",
        &["--token-file", token_file.to_str().unwrap()],
    );
    let m = client
        .create(CreateMigrationRequest {
            plan_source: Some(PlanSource::InlinePlan(plan(
                "one",
                vec![stage("s", vec![task("noop", json!({}))])],
            ))),
            subject: "project/auth".into(),
            ..Default::default()
        })
        .await
        .expect("create as client");
    let done = client.wait_for_terminal(m.id, WAIT).await;
    assert_eq!(done.state(), MigrationState::Succeeded, "{}", done.reason);

    // Bob's line goes, carol's comes; SIGHUP.
    let (carol, carol_line) = make_token("viewer", "carol").await;
    std::fs::write(&t.file, format!("{original}{carol_line}\n")).unwrap();
    coord.hangup();
    let carol_client = anon.with_token(Some(&carol));
    wait_for("bob refused after SIGHUP", WAIT, async || {
        matches!(bob_client.list_plans().await, Err(s) if s.code() == Code::Unauthenticated)
            .then_some(())
    })
    .await;
    carol_client
        .list_plans()
        .await
        .expect("carol's token works");
    client
        .list_plans()
        .await
        .expect("the client's token still works");

    // A file that no longer parses: logged, the tokens in force stay.
    std::fs::write(&t.file, format!("{original}admin broken\n")).unwrap();
    coord.hangup();
    wait_for("the bad reload logged", WAIT, async || {
        coord.logs().contains("not reloaded").then_some(())
    })
    .await;
    let logs = coord.logs();
    assert!(logs.contains("line 7"), "names the bad line:\n{logs}");
    carol_client
        .list_plans()
        .await
        .expect("carol's token is still in force");
    assert!(client.list_plans().await.is_ok());
    assert!(
        !logs.contains(&t.client) && !logs.contains(&carol),
        "no token reaches the log"
    );
}

async fn no_tokens_means_loopback_only(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    std::fs::create_dir_all(&dir).unwrap();
    let database = backend.database_for(&dir).await;
    let serve = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(&binaries().coordinator);
        cmd.args(["serve", "--database", &database]).args(args);
        cmd.env_remove("STAGECOACH_AUTH_TOKENS")
            .env_remove("STAGECOACH_ALLOW_UNAUTHENTICATED")
            .env_remove("STAGECOACH_LISTEN");
        cmd
    };
    let out = tokio::time::timeout(WAIT, serve(&["--listen", "0.0.0.0:0"]).output())
        .await
        .expect("exits at once")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("not a loopback address"))
        .unwrap_or_else(|| panic!("one clear line:\n{stderr}"));
    for words in [
        "--listen",
        "0.0.0.0:0",
        "--auth-tokens",
        "--allow-unauthenticated",
    ] {
        assert!(line.contains(words), "{words}: {line}");
    }
    assert!(out.stdout.is_empty(), "never listened");

    // A bad tokens file stops the start, naming the line.
    let bad = tmp.path().join("bad-tokens");
    std::fs::write(&bad, "# ok\nadmin root not-a-hash\n").unwrap();
    let out = serve(&[
        "--listen",
        "0.0.0.0:0",
        "--auth-tokens",
        bad.to_str().unwrap(),
    ])
    .output()
    .await
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 2") && stderr.contains("not hex"),
        "{stderr}"
    );

    // Opted in: it starts, and warns.
    let open =
        Coordinator::start_at(backend, &dir, "0.0.0.0:0", &["--allow-unauthenticated"]).await;
    let logs = open.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("WITHOUT tokens")),
        "{logs}"
    );
    drop(open);

    // With tokens it starts there too, and a call needs one.
    let t = tokens(&tmp.path().join("t")).await;
    let authed = Coordinator::start_at(
        backend,
        &dir,
        "0.0.0.0:0",
        &["--auth-tokens", t.file.to_str().unwrap()],
    )
    .await;
    let url = format!("http://127.0.0.1:{}", authed.addr().port());
    let c = Client::connect(&url).await;
    let err = c.list_plans().await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    c.with_token(Some(&t.viewer)).list_plans().await.unwrap();
    let logs = authed.logs();
    let second = logs.rfind("coordinator starting").unwrap();
    assert!(
        !logs[second..].contains("WITHOUT tokens") && logs[second..].contains("auth on"),
        "{logs}"
    );
}

/// A worker token bound to `eu-*` cannot subscribe, heartbeat or report as
/// another worker id: forging a running worker's id needs its token too.
async fn a_worker_token_acts_only_as_its_worker_ids(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let (eu, line) = make_token_with("worker", "fleet-eu", &["--worker-ids", "eu-*"]).await;
    assert!(line.ends_with(" eu-*"), "{line}");
    let file = tmp.path().join("tokens");
    std::fs::write(&file, format!("{line}\n")).unwrap();
    let coord = Coordinator::start(
        backend,
        &tmp.path().join("c"),
        &["--auth-tokens", file.to_str().unwrap()],
    )
    .await;
    let c = Client::connect(&coord.url()).await.with_token(Some(&eu));
    let subscribe = |id: &str| SubscribeRequest {
        worker_id: id.into(),
        kinds: vec!["noop".into()],
        slots: 1,
        ..Default::default()
    };
    let mut w = c.workers.clone();
    let denied = [
        w.subscribe(subscribe("us-1")).await.map(|_| ()),
        w.heartbeat(HeartbeatRequest {
            worker_id: "us-1".into(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        w.fail(FailRequest {
            worker_id: "us-1".into(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
    ];
    for answer in denied {
        let status = answer.expect_err("another worker's id is refused");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("eu-*"), "{status:?}");
    }
    w.subscribe(subscribe("eu-1"))
        .await
        .expect("its own worker ids are fine");
    w.heartbeat(HeartbeatRequest {
        worker_id: "eu-1".into(),
        ..Default::default()
    })
    .await
    .expect("heartbeat as itself");
}
