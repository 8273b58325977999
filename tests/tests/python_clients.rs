//! Clients in another language: the Python examples of
//! `worker/examples/python/`, their stubs generated from our proto by their
//! own `generate.sh`, against the real coordinator with bearer tokens (the
//! worker's from `$STAGECOACH_TOKEN`, the client's from `--token`):
//!
//! - `client.py` stores a plan (a noop fan-out, then a sleep longer than a
//!   lease), runs it and follows it to the end, printing stage progress, and
//!   exits 0; `worker.py` (2 slots) ran every task, its heartbeats kept the
//!   sleep's lease alive, and the checker finds the log clean (I1–I12). A
//!   plan whose sleep payload is bad fails, and `client.py` exits 1. SIGTERM
//!   stops the worker cleanly;
//! - a report naming the Python worker's id and lease token but not its
//!   lease secret, sent through the generated stubs, is FAILED_PRECONDITION
//!   and changes nothing: the worker's own report, with the secret, wins;
//! - `kill -9` of the Python worker mid-sleep: its lease expires, a second
//!   Python worker runs the task's next attempt, the migration succeeds;
//! - SIGTERM of the Python worker mid-sleep: past its drain bound it
//!   cancels the task and hands the lease back (TASK_RETRYING, no expiry);
//!   another Python worker runs it;
//! - with `--tls-ca`, both scripts run a migration on a coordinator that
//!   serves TLS only; without it the client is turned away (exit 1).
//!
//! SQLite only: what is on trial is the Python side of the protocol, not
//! the store. The first run builds a virtualenv under the target
//! directory (see `stagecoach_tests::python`); later runs reuse it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use stagecoach_proto::v1::{Event, EventKind, ListMigrationsRequest, Migration, MigrationState};
use stagecoach_tests::binaries::binaries;
use stagecoach_tests::python::{Examples, PythonProcess, python};
use stagecoach_tests::{
    Backend, Client, Coordinator, FAST, assert_ok, check_worker_slots, of_kind, wait_for,
};
use tonic::transport::{Certificate, ClientTlsConfig};

const WAIT: Duration = Duration::from_secs(90);

/// Slots of every Python worker.
const SLOTS: u32 = 2;

#[tokio::test(flavor = "multi_thread")]
async fn a_python_worker_and_client_run_a_migration() {
    let (s, mut worker) = Setup::with_worker("py-1").await;

    // 2.5 s of sleep on a 1.5 s lease: only heartbeats keep it.
    let plan = s.plan_file("fan-out-then-sleep", 6, json!({"ms": 2_500}));
    let out = Examples::output(s.client(&plan, "python/1"), WAIT).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client.py: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "stored plan fan-out-then-sleep v1",
        "stage 1/2 fan-out      6/6 done  0 running  succeeded",
        "stage 2/2 sleep        1/1 done  0 running  succeeded",
        "succeeded in",
    ] {
        assert!(
            stdout.contains(line),
            "client.py printed no {line:?}:\n{stdout}"
        );
    }

    let m = s.migration_of("python/1").await;
    assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);
    let (_, events) = s.admin.check(m.id).await;
    for kind in [EventKind::TaskAssigned, EventKind::TaskSucceeded] {
        let of = of_kind(&events, kind);
        assert_eq!(of.len(), 7, "{kind:?} once per task");
        assert!(of.iter().all(|e| e.worker_id == "py-1"), "{of:?}");
    }
    assert!(
        events
            .iter()
            .all(|e| e.worker_id.is_empty() || e.worker_id == "py-1")
    );
    for kind in [EventKind::TaskLeaseExpired, EventKind::TaskRetrying] {
        assert!(of_kind(&events, kind).is_empty(), "no {kind:?}: {events:?}");
    }
    let most = check_worker_slots(&events, |_| SLOTS as usize);
    assert_ok("I12", most.map(|_| ()));

    // A bad payload: the Python handler refuses it, the task dies, the
    // migration fails and the client says so with exit code 1.
    let bad = s.plan_file("bad-sleep", 1, json!({"ms": "soon"}));
    let out = Examples::output(s.client(&bad, "python/2"), WAIT).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "client.py:\n{stdout}");
    let m = s.migration_of("python/2").await;
    assert_eq!(m.state(), MigrationState::Failed);
    assert!(
        m.reason
            .contains("payload \"ms\" must be a non-negative integer"),
        "{}",
        m.reason
    );
    assert!(stdout.contains(" failed in "), "{stdout}");
    s.admin.check(m.id).await;

    worker.terminate();
    let status = worker.wait_exit(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "worker.py on SIGTERM: {status:?}"
    );
    assert!(worker.logs().contains("worker stopped worker_id=py-1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_report_with_a_forged_lease_secret_is_refused() {
    let (s, worker) = Setup::with_worker("py-1").await;
    let (client, m, assigned) = s
        .until_the_sleep_runs(&worker, "forged", 0, 6_000, "python/forged")
        .await;

    // The right worker id and lease token, any secret but the lease's.
    let forge = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python_clients/forge_report.py");
    let task_id = assigned.task_id.to_string();
    let attempt = assigned.attempt.to_string();
    let args = [
        "--coordinator",
        &s.address,
        "--token",
        &s.worker_token,
        "--worker-id",
        "py-1",
        "--task-id",
        &task_id,
        "--attempt",
        &attempt,
    ];
    let out = Examples::output(s.examples.command(&forge, &args), WAIT).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "forge_report.py: {out:?}");
    let answers: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(answers.len(), 2, "{stdout}");
    for (answer, rpc) in answers.iter().zip(["Complete", "Fail"]) {
        assert_eq!(answer["rpc"], rpc);
        assert_eq!(answer["code"], "FAILED_PRECONDITION", "{answer}");
    }

    let (_, events) = s.client_succeeded(client, m.id).await;
    let done = of_kind(&events, EventKind::TaskSucceeded);
    assert_eq!(done.len(), 1);
    assert_eq!(
        (done[0].task_id, done[0].attempt, done[0].worker_id.as_str()),
        (assigned.task_id, 1, "py-1"),
        "the worker's own report, with the secret, was accepted"
    );
    let rejected = of_kind(&events, EventKind::ReportRejected);
    assert_eq!(rejected.len(), 2, "both forged reports are logged");
    assert!(
        rejected
            .iter()
            .all(|e| e.task_id == assigned.task_id && e.id < done[0].id),
        "refused while the lease was live, so for the secret alone: {rejected:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_python_workers_task_is_redone_by_another() {
    let (s, mut first) = Setup::with_worker("py-a").await;
    let (client, m, sleeping) = s
        .until_the_sleep_runs(&first, "crash", 3, 4_000, "python/crash")
        .await;
    first.kill9().await;
    let _second = s.worker("py-b");

    let (_, events) = s.client_succeeded(client, m.id).await;
    let of_task = |kind| -> Vec<(u32, String)> {
        of_kind(&events, kind)
            .into_iter()
            .filter(|e| e.task_id == sleeping.task_id)
            .map(|e| (e.attempt, e.worker_id.clone()))
            .collect()
    };
    assert_eq!(
        of_task(EventKind::TaskLeaseExpired),
        [(1, "py-a".to_string())]
    );
    assert_eq!(
        of_task(EventKind::TaskAssigned),
        [(1, "py-a".to_string()), (2, "py-b".to_string())]
    );
    assert_eq!(of_task(EventKind::TaskSucceeded), [(2, "py-b".to_string())]);
    let most = check_worker_slots(&events, |_| SLOTS as usize);
    assert_ok("I12", most.map(|_| ()));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_scripts_speak_tls_with_tls_ca() {
    let s = Setup::start(true).await;
    let _worker = s.worker("py-tls");
    s.admin.wait_for_workers(&["py-tls"], WAIT).await;
    let plan = s.plan_file("over-tls", 2, json!({"ms": 100}));
    let out = Examples::output(s.client(&plan, "python/tls"), WAIT).await;
    assert!(out.status.success(), "client.py over TLS: {out:?}");
    let m = s.migration_of("python/tls").await;
    let (m, events) = s.admin.check(m.id).await;
    assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);
    let done = of_kind(&events, EventKind::TaskSucceeded);
    assert_eq!(done.len(), 3);
    assert!(done.iter().all(|e| e.worker_id == "py-tls"), "{done:?}");

    // Without --tls-ca the client speaks plaintext, and gets nowhere.
    let cmd = s.client_without_tls(&plan, "python/plaintext");
    let out = Examples::output(cmd, WAIT).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr.contains("UNAVAILABLE"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_python_worker_hands_its_task_back() {
    let s = Setup::start(false).await;
    let mut first = s.worker_with("py-1", &["--drain-timeout", "0.2"]);
    s.admin.wait_for_workers(&["py-1"], WAIT).await;
    let (client, m, sleeping) = s
        .until_the_sleep_runs(&first, "hand-back", 0, 4_000, "python/term")
        .await;
    first.terminate();
    let status = first.wait_exit(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "worker.py on SIGTERM: {status:?}"
    );
    let _second = s.worker("py-2");

    let (_, events) = s.client_succeeded(client, m.id).await;
    let retrying = of_kind(&events, EventKind::TaskRetrying);
    assert_eq!(retrying.len(), 1, "handed back, not left to expire");
    assert_eq!(
        (
            retrying[0].task_id,
            retrying[0].attempt,
            retrying[0].worker_id.as_str()
        ),
        (sleeping.task_id, 1, "py-1")
    );
    assert!(
        retrying[0].message.contains("canceled"),
        "{:?}",
        retrying[0].message
    );
    assert!(of_kind(&events, EventKind::TaskLeaseExpired).is_empty());
    let done = of_kind(&events, EventKind::TaskSucceeded);
    assert_eq!((done[0].attempt, done[0].worker_id.as_str()), (2, "py-2"));
}

/// A coordinator with a tokens file, stubs generated for it, and clients.
struct Setup {
    /// Reads everything, as the test's own judge.
    admin: Client,
    examples: Examples,
    /// `127.0.0.1:PORT`, as the Python scripts take it.
    address: String,
    /// The coordinator's certificate, when it serves TLS.
    tls_ca: Option<PathBuf>,
    worker_token: String,
    client_token: String,
    coordinator: Coordinator,
    dir: Option<tempfile::TempDir>,
}

impl Setup {
    /// With `tls`, the coordinator serves TLS only, with a self-signed
    /// certificate for 127.0.0.1 that every client is given as `--tls-ca`.
    async fn start(tls: bool) -> Setup {
        // Building the venv blocks; its panic says what is missing.
        let python = tokio::task::spawn_blocking(python)
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let dir = tempfile::Builder::new()
            .prefix("stagecoach-python-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path();
        let mut lines = Vec::new();
        let mut tokens = Vec::new();
        for (role, name) in [
            ("admin", "ops"),
            ("worker", "py-fleet"),
            ("client", "py-app"),
        ] {
            let (token, line) = create_token(role, name).await;
            tokens.push(token);
            lines.push(line);
        }
        let file = path.join("tokens");
        std::fs::write(&file, lines.join("\n") + "\n").expect("write tokens");
        let mut args: Vec<String> = FAST.iter().map(|a| a.to_string()).collect();
        args.extend(["--auth-tokens".into(), utf8(&file).into()]);
        let tls_ca = tls.then(|| {
            let made = rcgen::generate_simple_self_signed(["127.0.0.1".to_string()])
                .expect("a self-signed certificate");
            let (cert, key) = (path.join("cert.pem"), path.join("key.pem"));
            std::fs::write(&cert, made.cert.pem()).expect("write cert.pem");
            std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key.pem");
            args.extend(["--tls-cert".into(), utf8(&cert).into(), "--tls-key".into()]);
            args.push(utf8(&key).into());
            cert
        });
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let coordinator =
            Coordinator::start(Backend::Sqlite, &path.join("coordinator"), &args).await;
        let examples = python.generate_stubs(&path.join("stubs"));
        let url = coordinator.url();
        let admin = match &tls_ca {
            Some(ca) => {
                let pem = std::fs::read(ca).expect("read cert.pem");
                let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
                Client::connect_tls(&url, tls)
                    .await
                    .with_token(Some(&tokens[0]))
            }
            None => Client::connect_with_token(&url, Some(&tokens[0])).await,
        };
        Setup {
            tls_ca,
            admin,
            examples,
            address: coordinator.addr().to_string(),
            worker_token: tokens[1].clone(),
            client_token: tokens[2].clone(),
            coordinator,
            dir: Some(dir),
        }
    }

    /// [`Self::start`], and `worker.py` with id `id`, connected.
    async fn with_worker(id: &str) -> (Setup, PythonProcess) {
        let s = Setup::start(false).await;
        let worker = s.worker(id);
        s.admin.wait_for_workers(&[id], WAIT).await;
        (s, worker)
    }

    /// Starts `client.py` in the background on plan `name` (`noops` noop
    /// tasks, then a sleep of `ms`) for `subject`, and waits until the sleep
    /// runs on `worker`, the one worker there is; returns the running
    /// client, the migration and the sleep's TASK_ASSIGNED.
    async fn until_the_sleep_runs(
        &self,
        worker: &PythonProcess,
        name: &str,
        noops: usize,
        ms: u64,
        subject: &str,
    ) -> (PythonProcess, Migration, Event) {
        let plan = self.plan_file(name, noops, json!({"ms": ms}));
        let log = self.path().join("client.log");
        let client = Examples::spawn(self.client(&plan, subject), "client.py", &log);
        let m = wait_for(&format!("a migration of {subject}"), WAIT, async || {
            self.find_migration(subject).await
        })
        .await;
        let sleep_stage = u32::from(noops > 0);
        let assigned = self
            .admin
            .wait_for_event(m.id, "the sleep's TASK_ASSIGNED", WAIT, |e| {
                e.kind() == EventKind::TaskAssigned && e.stage_index == Some(sleep_stage)
            })
            .await;
        let held = format!("task assigned task_id={} ", assigned.task_id);
        wait_for("the worker to start the sleep", WAIT, async || {
            worker.logs().contains(&held).then_some(())
        })
        .await;
        (client, m, assigned)
    }

    /// Waits until `client` exits, asserts it exited 0 and the migration
    /// succeeded, and returns it with its log, checked.
    async fn client_succeeded(
        &self,
        mut client: PythonProcess,
        migration_id: i64,
    ) -> (Migration, Vec<Event>) {
        let status = client.wait_exit(WAIT).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "client.py: {status:?}\n{}",
            client.logs()
        );
        let (m, events) = self.admin.check(migration_id).await;
        assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);
        (m, events)
    }

    fn path(&self) -> PathBuf {
        self.coordinator
            .dir()
            .parent()
            .expect("the coordinator's dir is in the test's")
            .to_path_buf()
    }

    /// `worker.py` with id `id` and [`SLOTS`] slots, its token from
    /// `$STAGECOACH_TOKEN`.
    fn worker(&self, id: &str) -> PythonProcess {
        self.worker_with(id, &[])
    }

    /// [`Self::worker`] with more flags.
    fn worker_with(&self, id: &str, extra: &[&str]) -> PythonProcess {
        let slots = SLOTS.to_string();
        let args = [
            "--coordinator",
            &self.address,
            "--worker-id",
            id,
            "--slots",
            &slots,
        ];
        let mut cmd = self.examples.command(Path::new("worker.py"), &args);
        cmd.args(self.tls_args())
            .args(extra)
            .env("STAGECOACH_TOKEN", &self.worker_token);
        Examples::spawn(cmd, id, &self.path().join(format!("{id}.log")))
    }

    /// `client.py` running the plan in `plan_file` for `subject`.
    fn client(&self, plan_file: &Path, subject: &str) -> tokio::process::Command {
        let mut cmd = self.client_without_tls(plan_file, subject);
        cmd.args(self.tls_args());
        cmd
    }

    /// [`Self::client`] without `--tls-ca`, so over plaintext.
    fn client_without_tls(&self, plan_file: &Path, subject: &str) -> tokio::process::Command {
        let args = [
            "--coordinator",
            &self.address,
            "--token",
            &self.client_token,
            "--plan-file",
            utf8(plan_file),
            "--subject",
            subject,
            "--timeout",
            "80",
        ];
        self.examples.command(Path::new("client.py"), &args)
    }

    /// `--tls-ca FILE` when the coordinator serves TLS.
    fn tls_args(&self) -> Vec<&str> {
        match &self.tls_ca {
            Some(ca) => vec!["--tls-ca", utf8(ca)],
            None => Vec::new(),
        }
    }

    /// A plan named `name`: stage `fan-out` of `noops` noop tasks (none if
    /// 0), then stage `sleep` of one sleep task with `sleep_payload`.
    fn plan_file(&self, name: &str, noops: usize, sleep_payload: Value) -> PathBuf {
        let mut stages = Vec::new();
        if noops > 0 {
            let tasks: Vec<Value> = (0..noops)
                .map(|i| json!({"kind": "noop", "payload": {"part": i}}))
                .collect();
            stages.push(json!({"name": "fan-out", "tasks": tasks}));
        }
        stages
            .push(json!({"name": "sleep", "tasks": [{"kind": "sleep", "payload": sleep_payload}]}));
        let path = self.path().join(format!("{name}.json"));
        let plan = json!({"name": name, "stages": stages});
        std::fs::write(&path, plan.to_string()).expect("write plan");
        path
    }

    /// The migration of `subject` (there is one), as it is now.
    async fn migration_of(&self, subject: &str) -> Migration {
        self.find_migration(subject)
            .await
            .unwrap_or_else(|| panic!("no migration of {subject}"))
    }

    async fn find_migration(&self, subject: &str) -> Option<Migration> {
        let page = self
            .admin
            .migrations
            .clone()
            .list_migrations(ListMigrationsRequest {
                subject: subject.to_string(),
                ..Default::default()
            })
            .await
            .expect("ListMigrations")
            .into_inner();
        page.migrations.into_iter().next()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("===== test files kept in {} =====", dir.keep().display());
        }
    }
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}

/// `coordinator token create`: the token, and its tokens-file line.
async fn create_token(role: &str, name: &str) -> (String, String) {
    let out = tokio::process::Command::new(&binaries().coordinator)
        .args(["token", "create", "--role", role, "--name", name])
        .output()
        .await
        .expect("run coordinator token create");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    match stdout.lines().collect::<Vec<_>>()[..] {
        [token, line] => (token.to_string(), line.to_string()),
        _ => panic!("token create printed {stdout:?}, wanted the token and its line"),
    }
}
