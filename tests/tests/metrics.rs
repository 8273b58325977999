//! `/metrics` of a real coordinator, scraped over HTTP and parsed strictly
//! (`stagecoach_tests::metrics`):
//!
//! - after a migration that succeeds (two stages, six tasks), one that dies
//!   after retries, one canceled while its task runs, one whose task no
//!   worker handles (it stays ready) and a CreateMigration refused as
//!   INVALID_ARGUMENT, every family is there with its type and says what
//!   happened: migrations by state, pool slots, ready tasks, live leases,
//!   dead tasks, retries, deaths, recorded reports, task and stage
//!   duration counts, the RPC counts of CreateMigration by code, the
//!   reports the group commits held, the connected workers;
//! - with a tokens file: no token answers 401, a worker token 403, a viewer
//!   token 200 (and `/healthz` needs none); scrapes within a second share
//!   one database read;
//! - two coordinators on one PostgreSQL database report the same
//!   database-read gauges, and each its own workers.

use std::time::Duration;

use serde_json::json;
use stagecoach_proto::v1::{CreateMigrationRequest, EventKind, MigrationState};
use stagecoach_tests::metrics::{Scrape, get};
use stagecoach_tests::plans::{StageExt, create_inline, plan, retry, stage, task};
use stagecoach_tests::{Backend, Client, Cluster, Coordinator, Fleet, on_both_backends};

on_both_backends!(the_families_count_what_happened);

const WAIT: Duration = Duration::from_secs(90);

/// The families read from the database, the same on every coordinator.
const DATABASE_FAMILIES: [&str; 7] = [
    "stagecoach_migrations",
    "stagecoach_pool_slots",
    "stagecoach_pool_slots_used",
    "stagecoach_pool_paused",
    "stagecoach_tasks_ready",
    "stagecoach_leases_live",
    "stagecoach_tasks_dead",
];

/// Scrapes `base` with `token`, expecting 200 and the text format.
async fn scrape(base: &str, token: Option<&str>) -> Scrape {
    let answer = get(base, "/metrics", token).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        answer.content_type.as_deref(),
        Some("text/plain; version=0.0.4")
    );
    Scrape::parse(&answer.body).unwrap_or_else(|e| panic!("{e}\n{}", answer.body))
}

/// Creates `req` and waits until its migration ends; its final state.
async fn run(client: &Client, req: CreateMigrationRequest) -> MigrationState {
    let m = client.create(req).await.expect("CreateMigration");
    client.wait_for_terminal(m.id, WAIT).await.state()
}

/// A migration whose only task no worker handles: it runs, and its task
/// stays ready.
async fn create_stuck(client: &Client, subject: &str) -> i64 {
    let stuck = plan(
        "stuck",
        vec![stage("s", vec![task("nobody.handles", json!({}))])],
    );
    let m = client.create(create_inline(stuck, subject)).await;
    m.expect("CreateMigration").id
}

async fn the_families_count_what_happened(backend: Backend) {
    let cluster = Cluster::start_fast(backend, &[], 2, 4).await;
    let client = cluster.client().await;
    let base = cluster.coordinator.http_url().expect("an HTTP port");

    let ok = plan(
        "ok",
        vec![
            stage("first", vec![task("noop", json!({})); 5]),
            stage("second", vec![task("sleep", json!({"ms": 20}))]),
        ],
    );
    assert_eq!(
        run(&client, create_inline(ok, "project/ok")).await,
        MigrationState::Succeeded
    );
    // Three attempts: two retries, then the task is dead.
    let failing = plan(
        "failing",
        vec![
            stage(
                "s",
                vec![task("fail", json!({"retryable": true, "message": "no"}))],
            )
            .with_retry(retry(3, 20, 40, 0)),
        ],
    );
    assert_eq!(
        run(&client, create_inline(failing, "project/fails")).await,
        MigrationState::Failed
    );
    let long = plan(
        "long",
        vec![stage("s", vec![task("sleep", json!({"ms": 60_000}))])],
    );
    let canceled = client
        .create(create_inline(long, "project/canceled"))
        .await
        .expect("CreateMigration");
    client
        .wait_for_event(canceled.id, "TASK_ASSIGNED", WAIT, |e| {
            e.kind() == EventKind::TaskAssigned
        })
        .await;
    client.cancel(canceled.id, "enough").await.expect("cancel");
    create_stuck(&client, "project/stuck").await;
    let refused = client
        .create(create_inline(
            plan("p", vec![stage("s", vec![task("noop", json!({}))])]),
            "",
        ))
        .await
        .expect_err("an empty subject is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // The canceled lease's worker has stopped its handler and reported it.
    let s = wait_until(&base, None, |s| {
        s.sum("stagecoach_leases_live", &[]) == Some(0.0)
    })
    .await;
    for (family, kind) in [
        ("stagecoach_migrations", "gauge"),
        ("stagecoach_pool_slots", "gauge"),
        ("stagecoach_pool_slots_used", "gauge"),
        ("stagecoach_pool_paused", "gauge"),
        ("stagecoach_tasks_ready", "gauge"),
        ("stagecoach_leases_live", "gauge"),
        ("stagecoach_tasks_dead", "gauge"),
        ("stagecoach_database_read_success", "gauge"),
        ("stagecoach_database_read_duration_seconds", "gauge"),
        ("stagecoach_workers_connected", "gauge"),
        ("stagecoach_workers_ineligible", "gauge"),
        ("stagecoach_worker_slots", "gauge"),
        ("stagecoach_lease_expiries_total", "counter"),
        ("stagecoach_attempt_timeouts_total", "counter"),
        ("stagecoach_deadlines_exceeded_total", "counter"),
        ("stagecoach_task_retries_total", "counter"),
        ("stagecoach_tasks_died_total", "counter"),
        ("stagecoach_reports_total", "counter"),
        ("stagecoach_task_duration_seconds", "histogram"),
        ("stagecoach_stage_duration_seconds", "histogram"),
        ("stagecoach_rpc_duration_seconds", "histogram"),
        ("stagecoach_report_commit_duration_seconds", "histogram"),
        ("stagecoach_report_commit_batch_size", "histogram"),
    ] {
        s.assert_type(family, kind);
    }

    let by_state = |state| {
        s.value(
            "stagecoach_migrations",
            &[("pool", "default"), ("state", state)],
        )
    };
    assert_eq!(
        ["queued", "running", "succeeded", "failed", "canceled"].map(by_state),
        [0.0, 1.0, 1.0, 1.0, 1.0],
        "queued, running (the stuck one), succeeded, failed, canceled"
    );
    let pool = [("pool", "default")];
    assert_eq!(s.value("stagecoach_pool_slots", &pool), 10.0);
    assert_eq!(s.value("stagecoach_pool_slots_used", &pool), 1.0);
    assert_eq!(s.value("stagecoach_pool_paused", &pool), 0.0);
    assert_eq!(
        s.value("stagecoach_tasks_ready", &[("kind", "nobody.handles")]),
        1.0
    );
    assert_eq!(
        s.family("stagecoach_tasks_ready").samples.len(),
        1,
        "no other kind is ready"
    );
    assert_eq!(s.value("stagecoach_tasks_dead", &[]), 1.0);
    assert_eq!(s.value("stagecoach_database_read_success", &[]), 1.0);

    assert_eq!(s.value("stagecoach_task_retries_total", &[]), 2.0);
    assert_eq!(s.value("stagecoach_tasks_died_total", &[]), 1.0);
    assert_eq!(s.value("stagecoach_lease_expiries_total", &[]), 0.0);
    let reports = |report, outcome| {
        s.value(
            "stagecoach_reports_total",
            &[("report", report), ("outcome", outcome)],
        )
    };
    assert_eq!(reports("complete", "recorded"), 6.0, "six tasks succeeded");
    assert_eq!(reports("fail", "recorded"), 3.0, "three failed attempts");
    let tasks = |outcome| {
        s.value(
            "stagecoach_task_duration_seconds_count",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(tasks("succeeded"), 6.0, "one observation per task run");
    assert_eq!(tasks("failed"), 3.0);
    assert!(
        s.value(
            "stagecoach_task_duration_seconds_sum",
            &[("outcome", "succeeded")]
        ) >= 0.02,
        "the sleep task took its 20 ms"
    );
    assert_eq!(
        s.value("stagecoach_stage_duration_seconds_count", &[]),
        2.0,
        "the two stages that succeeded"
    );
    // Every report but the refused ones went through a group commit.
    let committed = s.value("stagecoach_report_commit_batch_size_sum", &[]);
    let stored: f64 = ["recorded", "duplicate", "stale"]
        .iter()
        .map(|o| s.value("stagecoach_reports_total", &[("outcome", o)]))
        .sum();
    assert_eq!(committed, stored);
    assert!(s.value("stagecoach_report_commit_duration_seconds_count", &[]) >= 1.0);

    let create = |code| {
        s.sum(
            "stagecoach_rpc_duration_seconds_count",
            &[
                ("service", "stagecoach.v1.MigrationService"),
                ("method", "CreateMigration"),
                ("code", code),
            ],
        )
    };
    assert_eq!(create("OK"), Some(4.0));
    assert_eq!(create("INVALID_ARGUMENT"), Some(1.0));
    assert!(
        s.value(
            "stagecoach_rpc_duration_seconds_count",
            &[("method", "Complete"), ("code", "OK")]
        ) >= 1.0
    );

    assert_eq!(s.value("stagecoach_workers_connected", &[]), 2.0);
    assert_eq!(s.value("stagecoach_worker_slots", &[]), 8.0);
}

/// Scrapes until `done` holds (the database gauges are cached for a
/// second); the last scrape. Panics after [`WAIT`].
async fn wait_until(base: &str, token: Option<&str>, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = scrape(base, token).await;
        if done(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not so after {WAIT:?}: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `coordinator token create --role ROLE`: the token, and its line for
/// the tokens file.
async fn token(role: &str) -> (String, String) {
    let out = tokio::process::Command::new(&stagecoach_tests::binaries::binaries().coordinator)
        .args(["token", "create", "--role", role, "--name", role])
        .output()
        .await
        .expect("run coordinator token create");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let (token, line) = stdout.split_once('\n').expect("two lines");
    (token.to_string(), line.trim().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_need_a_viewer_token_when_auth_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let (viewer, v) = token("viewer").await;
    let (worker, w) = token("worker").await;
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("{v}\n{w}\n")).unwrap();
    let file = file.to_str().unwrap();
    let coordinator = Coordinator::start(
        Backend::Sqlite,
        &dir.path().join("c"),
        &["--auth-tokens", file],
    )
    .await;
    let base = coordinator.http_url().expect("an HTTP port");

    let none = get(&base, "/metrics", None).await;
    assert_eq!(none.status, 401, "{none:?}");
    assert!(none.body.contains("requires a bearer token"), "{none:?}");
    let wrong = get(&base, "/metrics", Some("not-a-token")).await;
    assert_eq!(wrong.status, 401, "{wrong:?}");
    let as_worker = get(&base, "/metrics", Some(&worker)).await;
    assert_eq!(as_worker.status, 403, "{as_worker:?}");
    assert!(as_worker.body.contains("role worker"), "{as_worker:?}");
    let s = scrape(&base, Some(&viewer)).await;
    assert_eq!(
        s.value("stagecoach_pool_slots", &[("pool", "default")]),
        10.0
    );
    assert_eq!(get(&base, "/healthz", None).await.status, 200);

    // Scrapes within a second share one database read: the same read,
    // down to the nanoseconds it took.
    let read = |s: &Scrape| s.value("stagecoach_database_read_duration_seconds", &[]);
    let started = std::time::Instant::now();
    let first = scrape(&base, Some(&viewer)).await;
    let second = scrape(&base, Some(&viewer)).await;
    if started.elapsed() < Duration::from_millis(900) {
        assert_eq!(read(&first), read(&second), "a second read within a second");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let third = scrape(&base, Some(&viewer)).await;
    assert_ne!(read(&second), read(&third), "no new read after a second");
}

/// Two coordinators on one PostgreSQL database: the same database gauges
/// (whichever coordinator committed what), each its own workers.
#[tokio::test(flavor = "multi_thread")]
async fn two_coordinators_on_one_database_report_the_same_gauges() {
    let mut fleet = Fleet::start(2, &[]).await;
    fleet.add_worker("w1", 3, &[0]);
    fleet.wait_for_streams(&[0], WAIT).await;
    let a = fleet.client(0).await;
    let b = fleet.client(1).await;
    // Created through either coordinator, run by the worker on the first.
    let quick = plan("quick", vec![stage("s", vec![task("noop", json!({})); 4])]);
    assert_eq!(
        run(&b, create_inline(quick, "project/b")).await,
        MigrationState::Succeeded
    );
    create_stuck(&a, "project/a").await;
    create_stuck(&b, "project/b2").await;

    let bases: Vec<String> = fleet
        .coordinators
        .iter()
        .map(|c| c.http_url().expect("an HTTP port"))
        .collect();
    let scrapes = [scrape(&bases[0], None).await, scrape(&bases[1], None).await];
    for family in DATABASE_FAMILIES {
        assert_eq!(
            scrapes[0].family(family),
            scrapes[1].family(family),
            "{family} differs between the coordinators"
        );
    }
    let s = &scrapes[0];
    let by_state = |state| s.value("stagecoach_migrations", &[("state", state)]);
    assert_eq!(by_state("succeeded"), 1.0);
    assert_eq!(by_state("running"), 2.0);
    assert_eq!(
        s.value("stagecoach_tasks_ready", &[("kind", "nobody.handles")]),
        2.0
    );
    assert_eq!(s.value("stagecoach_pool_slots_used", &[]), 2.0);
    // The worker streams from the first coordinator only.
    let workers = |s: &Scrape| s.value("stagecoach_workers_connected", &[]);
    assert_eq!([workers(&scrapes[0]), workers(&scrapes[1])], [1.0, 0.0]);
    assert_eq!(
        scrapes[0].value(
            "stagecoach_task_duration_seconds_count",
            &[("outcome", "succeeded")]
        ),
        4.0,
        "the first coordinator handed out and recorded the four tasks"
    );
}
