//! The `stagecoach` binary against a real coordinator and worker (the
//! tests crate's [`Cluster`]): plans from YAML, `run --watch` and its exit
//! status on success and failure, `list`, `events --follow`, `cancel`,
//! `retry`, `verify ID` and `verify --all` on real migrations, bearer tokens,
//! and errors printed as one line naming the gRPC code.
//!
//! On SQLite only: the CLI talks to the API, which answers the same on
//! both backends (the tests crate proves that).

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::Value as Json;
use stagecoach_tests::binaries::binaries;
use stagecoach_tests::{Backend, Cluster, Coordinator};

/// Longest one command may take (a watch included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs `stagecoach ARGS` against `url`, with no token or output format
/// from the environment.
async fn stagecoach(url: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_stagecoach"));
    cmd.args(args)
        .env("STAGECOACH_COORDINATOR", url)
        .env_remove("STAGECOACH_TOKEN")
        .env_remove("STAGECOACH_TOKEN_FILE")
        .env_remove("STAGECOACH_OUTPUT")
        .env_remove("STAGECOACH_TLS_CA")
        .kill_on_drop(true);
    tokio::time::timeout(COMMAND_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("stagecoach {args:?} ran over {COMMAND_TIMEOUT:?}"))
        .expect("run stagecoach")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the exit status, showing both streams otherwise.
#[track_caller]
fn assert_status(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// Runs a command that must succeed; its standard output.
async fn ok(url: &str, args: &[&str]) -> String {
    let out = stagecoach(url, args).await;
    assert_status(&out, 0, &format!("stagecoach {args:?}"));
    stdout(&out)
}

/// Runs a command with `-o json` that must succeed; its document.
async fn ok_json(url: &str, args: &[&str]) -> Json {
    let args: Vec<&str> = args.iter().copied().chain(["-o", "json"]).collect();
    let text = ok(url, &args).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}"))
}

/// Asserts a failed command printed exactly one line, `error: CODE: …`.
#[track_caller]
fn assert_one_line_error(out: &Output, code: &str) {
    assert_status(out, 2, "an error");
    let err = stderr(out);
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with(&format!("error: {code}: ")), "{err:?}");
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path.to_string_lossy().into_owned()
}

/// The id `run -o json` created.
async fn run_id(url: &str, args: &[&str]) -> i64 {
    let json = ok_json(url, args).await;
    json["migration"]["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("no id in {json}"))
}

const PLAN_YAML: &str = "\
name: hello
description: two stages from YAML
stages:
  - name: warm-up
    tasks: [{kind: sleep, payload: {ms: 300}}]
  - name: work
    retry: {max_attempts: 2, initial_backoff_ms: 100}
    tasks:
      - {kind: noop}
      - {kind: sleep, payload: {ms: 100}}
";

#[tokio::test(flavor = "multi_thread")]
async fn a_yaml_plan_runs_watched_and_verifies() {
    let cluster = Cluster::start(Backend::Sqlite, 1, 4).await;
    let url = cluster.coordinator.url();
    let file = write(cluster.dir(), "hello.yaml", PLAN_YAML);

    let put = ok(&url, &["plan", "put", &file]).await;
    assert_eq!(put.trim(), "plan hello version 1 stored: 2 stages, 3 tasks");
    let plans = ok_json(&url, &["plan", "list"]).await;
    assert_eq!(plans[0]["name"], "hello");
    // What `plan show -o json` prints can be stored again.
    let shown = ok(&url, &["plan", "show", "hello", "-o", "json"]).await;
    let again = write(cluster.dir(), "again.json", &shown);
    assert!(
        ok(&url, &["plan", "put", &again])
            .await
            .contains("version 2")
    );

    // Watched to its end: exit 0, a line per stage and the end.
    let out = stagecoach(
        &url,
        &[
            "run",
            "hello",
            "--subject",
            "project/1",
            "--param",
            "rows=3",
            "--deadline",
            "1h",
            "--watch",
        ],
    )
    .await;
    assert_status(&out, 0, "run --watch");
    let text = stdout(&out);
    assert!(text.contains("#1 MIGRATION_CREATED"), "{text}");
    assert!(text.contains("stage 1 work: 2/2 done"), "{text}");
    assert!(
        text.trim_end()
            .lines()
            .last()
            .unwrap()
            .starts_with("migration 1 succeeded after "),
        "{text}"
    );

    // Started unwatched; `events --follow` ends with it.
    let id = run_id(&url, &["run", "hello", "--subject", "project/2"]).await;
    let followed = ok(&url, &["events", &id.to_string(), "--follow"]).await;
    assert!(
        followed.trim_end().ends_with("MIGRATION_SUCCEEDED"),
        "{followed}"
    );
    let client = cluster.client().await;
    let log = client.events(id).await.expect("ListEvents");
    assert_eq!(followed.lines().count(), log.len(), "{followed}");

    let list = ok_json(&url, &["list", "--state", "succeeded"]).await;
    let ids: Vec<i64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![id, 1], "newest first");
    assert_eq!(list[1]["parameters"]["rows"], 3);
    assert!(
        ok(&url, &["list", "--subject", "project/2"])
            .await
            .contains("project/2")
    );
    let status = ok(&url, &["status", "project/1"]).await;
    assert!(status.starts_with("project/1: finished"), "{status}");

    let verified = ok(&url, &["verify", "1"]).await;
    assert!(verified.contains("migration 1 (succeeded, "), "{verified}");
    assert!(
        verified.ends_with("verified 1 migration: 0 violations\n"),
        "{verified}"
    );
    let all = ok_json(&url, &["verify", "--all"]).await;
    assert_eq!(all["passed"], true, "{all}");
    assert_eq!(all["migrations"].as_array().unwrap().len(), 2, "{all}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_exits_non_zero_then_retry_and_cancel() {
    let cluster = Cluster::start(Backend::Sqlite, 1, 4).await;
    let url = cluster.coordinator.url();
    let fixed = cluster.dir().join("fixed");
    let plan = format!(
        "name: flaky\nstages:\n  - name: s\n    tasks:\n      - kind: fail\n        payload: {{message: disk full, unless_file: {:?}}}\n",
        fixed.to_string_lossy()
    );
    ok(
        &url,
        &["plan", "put", &write(cluster.dir(), "flaky.yaml", &plan)],
    )
    .await;

    let out = stagecoach(&url, &["run", "flaky", "--subject", "project/f", "--watch"]).await;
    assert_status(&out, 1, "a migration that fails");
    let last = stdout(&out)
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(last.starts_with("migration 1 failed"), "{last}");
    assert!(last.ends_with("disk full"), "the reason: {last}");

    // Fixed, retried, watched again: success.
    std::fs::write(&fixed, "").unwrap();
    let retried = ok(&url, &["retry", "1"]).await;
    assert!(
        retried.starts_with("migration 1: queued") || retried.starts_with("migration 1: running"),
        "{retried}"
    );
    let out = stagecoach(&url, &["watch", "1"]).await;
    assert_status(&out, 0, "the retried migration");

    // Canceled while it runs: the watch says so and exits 1.
    let slow =
        "name: slow\nstages:\n  - name: s\n    tasks: [{kind: sleep, payload: {ms: 60000}}]\n";
    ok(
        &url,
        &["plan", "put", &write(cluster.dir(), "slow.yaml", slow)],
    )
    .await;
    let id = run_id(&url, &["run", "slow", "--subject", "project/s"]).await;
    let canceled = ok(
        &url,
        &["cancel", &id.to_string(), "--reason", "operator said so"],
    )
    .await;
    assert_eq!(
        canceled.trim(),
        format!("migration {id}: canceled (operator said so)")
    );
    let out = stagecoach(&url, &["watch", &id.to_string()]).await;
    assert_status(&out, 1, "a canceled migration");
    assert!(stdout(&out).contains("canceled"), "{}", stdout(&out));
    // Canceling again is refused, in one line.
    assert_one_line_error(
        &stagecoach(&url, &["cancel", &id.to_string()]).await,
        "FAILED_PRECONDITION",
    );

    let all = ok(&url, &["verify", "--all"]).await;
    assert!(
        all.ends_with("verified 2 migrations: 0 violations\n"),
        "{all}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_is_sent_and_its_absence_is_one_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let made = tokio::process::Command::new(&binaries().coordinator)
        .args(["token", "create", "--role", "admin", "--name", "ops"])
        .output()
        .await
        .expect("coordinator token create");
    assert!(made.status.success(), "{made:?}");
    let made = String::from_utf8(made.stdout).expect("utf-8");
    let mut lines = made.lines();
    let (token, line) = (lines.next().unwrap(), lines.next().unwrap());
    let tokens = write(dir.path(), "tokens", &format!("{line}\n"));
    let coordinator = Coordinator::start(
        Backend::Sqlite,
        &dir.path().join("c"),
        &["--auth-tokens", &tokens],
    )
    .await;
    let url = coordinator.url();

    assert_one_line_error(&stagecoach(&url, &["pools"]).await, "UNAUTHENTICATED");
    assert_one_line_error(
        &stagecoach(&url, &["--token", "sct_wrong", "pools"]).await,
        "UNAUTHENTICATED",
    );
    let pools = ok(&url, &["--token", token, "pools"]).await;
    assert!(pools.contains("default"), "{pools}");
    let token_file = write(dir.path(), "token", &format!("{token}\n"));
    let created = ok(
        &url,
        &[
            "--token-file",
            &token_file,
            "pool",
            "create",
            "bulk",
            "--slots",
            "3",
        ],
    )
    .await;
    assert!(
        created.contains("bulk") && created.contains('3'),
        "{created}"
    );
    let paused = ok_json(
        &url,
        &["--token-file", &token_file, "pool", "pause", "bulk"],
    )
    .await;
    assert_eq!(paused["paused"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_are_one_line_with_the_code() {
    let dir = tempfile::tempdir().expect("temp dir");
    let coordinator = Coordinator::start(Backend::Sqlite, &dir.path().join("c"), &[]).await;
    let url = coordinator.url();

    let out = stagecoach(&url, &["show", "7"]).await;
    assert_one_line_error(&out, "NOT_FOUND");
    assert!(stderr(&out).contains("migration 7"), "{}", stderr(&out));
    assert_one_line_error(
        &stagecoach(&url, &["plan", "show", "nope"]).await,
        "NOT_FOUND",
    );
    assert_one_line_error(&stagecoach(&url, &["verify", "7"]).await, "NOT_FOUND");
    assert_one_line_error(&stagecoach(&url, &["drain", "nobody"]).await, "NOT_FOUND");
    let bad = write(dir.path(), "bad.yaml", "name: bad\nstages: []\n");
    assert_one_line_error(
        &stagecoach(&url, &["plan", "put", &bad]).await,
        "INVALID_ARGUMENT",
    );

    // Not the coordinator's answer, still one line naming what is wrong.
    let out = stagecoach("http://127.0.0.1:1", &["list"]).await;
    assert_status(&out, 2, "no coordinator");
    assert!(
        stderr(&out).starts_with("error: cannot connect to http://127.0.0.1:1: "),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).lines().count(), 1);
    let out = stagecoach(
        &url,
        &[
            "plan",
            "put",
            &dir.path().join("missing.yaml").to_string_lossy(),
        ],
    )
    .await;
    assert_status(&out, 2, "a missing plan file");
    assert!(
        stderr(&out).contains("missing.yaml: cannot read it"),
        "{}",
        stderr(&out)
    );
    let out = stagecoach(&url, &["run", "p", "--subject", "s", "--deadline", "1x"]).await;
    assert_status(&out, 2, "a bad duration");
    assert!(
        stderr(&out).contains("--deadline") && stderr(&out).contains("1h30m"),
        "{}",
        stderr(&out)
    );
}
