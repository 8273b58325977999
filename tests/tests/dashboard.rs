//! The web dashboard on the HTTP port (`--http-listen`), against a real
//! coordinator and worker:
//!
//! - its JSON API (status codes, filters, paging, one migration's spans,
//!   tail and leased tasks, pools, workers, the live feed, the token check)
//!   over plain HTTP/1.1, on both backends;
//! - the page in a real headless Chromium ([`Chromium`]): the list with its
//!   states, the Gantt chart and the event tail, a migration finishing on an
//!   open page without a reload, a subject holding markup shown as text, no
//!   horizontal overflow at 390 px, and the token prompt (a worker token
//!   gets the 403 message, a viewer token the data). The browser tests run
//!   on SQLite only: what they add is the page, not the store.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value as Json, json};
use stagecoach_proto::v1::MigrationState;
use stagecoach_tests::binaries::binaries;
use stagecoach_tests::chromium::{Chromium, Page};
use stagecoach_tests::plans::{StageExt, create_inline, plan, retry, stage, task};
use stagecoach_tests::{Backend, Client, Cluster, Coordinator, of_kind, on_both_backends};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

on_both_backends!(api_lists_filters_pages_and_shows_one_migration);

const WAIT: Duration = Duration::from_secs(60);
/// A subject a careless page would turn into markup that runs a script.
const HOSTILE: &str = "<img src=x onerror=\"window.__pwned=1\">project/<b>7</b>";

// --- a small HTTP/1.1 client -------------------------------------------------

/// One answer.
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Json {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// `GET base + path`, with `authorization: Bearer token` when given.
async fn get(base: &str, path: &str, token: Option<&str>) -> Reply {
    let mut conn = open(base, path, token).await;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.expect("read the answer");
    let raw = String::from_utf8(raw).expect("utf-8 answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let mut reply = Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    };
    if reply
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        reply.body = dechunk(&reply.body);
    }
    reply
}

/// Sends the request and returns the connection, to read the answer from.
async fn open(base: &str, path: &str, token: Option<&str>) -> TcpStream {
    let addr = base.strip_prefix("http://").expect("an http:// base");
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}connection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.expect("send");
    conn
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// Reads the open connection until its text so far holds `want`; panics
/// after `timeout`, showing what came.
async fn read_until(conn: &mut TcpStream, seen: &mut String, want: &str, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while !seen.contains(want) {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            other => panic!("no {want:?} on the live feed ({other:?}); got:\n{seen}"),
        }
    }
}

fn ids(page: &Json) -> Vec<i64> {
    page["migrations"]
        .as_array()
        .expect("migrations")
        .iter()
        .map(|m| m["id"].as_i64().expect("id"))
        .collect()
}

// --- the API ---------------------------------------------------------------

/// Every endpoint, its filters and paging, its refusals, the live feed,
/// and a graceful stop with a live stream open.
async fn api_lists_filters_pages_and_shows_one_migration(backend: Backend) {
    let mut cluster = Cluster::start_fast(backend, &[], 1, 4).await;
    let c = cluster.client().await;
    let base = cluster.coordinator.http_url().expect("an HTTP port");

    let three = three_stages();
    let doomed = plan(
        "doomed",
        vec![stage("only", vec![task("fail", json!({}))]).with_retry(retry(1, 0, 0, 0))],
    );
    c.admin
        .clone()
        .create_pool(stagecoach_proto::v1::CreatePoolRequest {
            name: "batch".into(),
            slots: 2,
        })
        .await
        .expect("CreatePool");
    let mut created = Vec::new();
    for (p, subject, pool) in [
        (&three, "project/1", ""),
        (&three, "project/2", "batch"),
        (&doomed, "project/3", ""),
    ] {
        let req = stagecoach_proto::v1::CreateMigrationRequest {
            pool: pool.to_string(),
            ..create_inline(p.clone(), subject)
        };
        let m = c.create(req).await.expect("create");
        c.wait_for_terminal(m.id, WAIT).await;
        created.push(m.id);
    }
    let (m1, m2, m3) = (created[0], created[1], created[2]);

    // The list: newest first, every state, then filters and paging.
    let all = get(&base, "/api/migrations", None).await;
    assert_eq!(all.status, 200, "{}", all.body);
    assert_eq!(all.header("cache-control"), Some("no-store"));
    let all = all.json();
    assert_eq!(ids(&all), [m3, m2, m1]);
    let states: Vec<&str> = all["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["failed", "succeeded", "succeeded"]);
    assert_eq!(all["migrations"][1]["tasks_done"], 4);
    assert_eq!(all["migrations"][1]["tasks_total"], 4);
    assert_eq!(all["next_page_token"], "");

    let first = get(&base, "/api/migrations?page_size=2", None).await.json();
    assert_eq!(ids(&first), [m3, m2]);
    assert_eq!(first["next_page_token"], m2.to_string());
    let token = first["next_page_token"].as_str().unwrap();
    let second = get(
        &base,
        &format!("/api/migrations?page_size=2&page_token={token}"),
        None,
    )
    .await
    .json();
    assert_eq!(
        (ids(&second), &second["next_page_token"]),
        (vec![m1], &json!(""))
    );

    for (query, want) in [
        ("state=succeeded", vec![m2, m1]),
        ("state=failed", vec![m3]),
        ("state=canceled", vec![]),
        ("subject=project%2F2", vec![m2]),
        ("pool=batch", vec![m2]),
        ("pool=default&state=succeeded", vec![m1]),
        ("subject=project%2F9", vec![]),
    ] {
        let page = get(&base, &format!("/api/migrations?{query}"), None).await;
        assert_eq!(page.status, 200, "{query}: {}", page.body);
        assert_eq!(ids(&page.json()), want, "{query}");
    }
    for (query, field) in [
        ("state=done", "state"),
        ("page_size=0", "page_size"),
        ("page_size=501", "page_size"),
        ("page_token=abc", "page_token"),
    ] {
        let bad = get(&base, &format!("/api/migrations?{query}"), None).await;
        assert_eq!(bad.status, 400, "{query}: {}", bad.body);
        assert_eq!(bad.json()["field"], field, "{query}");
    }

    // One migration: spans from the log, one per started stage, and the
    // log's tail ending where the log ends.
    let one = get(&base, &format!("/api/migrations/{m1}"), None).await;
    assert_eq!(one.status, 200, "{}", one.body);
    let one = one.json();
    let events = c.events(m1).await.unwrap();
    let started = of_kind(&events, stagecoach_proto::v1::EventKind::StageStarted);
    let spans = one["spans"].as_array().unwrap();
    assert_eq!(spans.len(), started.len());
    assert_eq!(spans.len(), 3);
    for (span, event) in spans.iter().zip(&started) {
        assert_eq!(span["stage_index"], json!(event.stage_index));
        assert_eq!(span["outcome"], "succeeded");
        assert!(
            span["end_ms"].as_i64() >= span["start_ms"].as_i64(),
            "{span}"
        );
    }
    let tail = one["events"].as_array().unwrap();
    assert_eq!(
        tail.last().unwrap()["id"],
        events.last().unwrap().id,
        "the tail ends with the log"
    );
    assert_eq!(tail.last().unwrap()["kind"], "migration_succeeded");
    assert_eq!(one["log_complete"], true);
    assert_eq!(one["events_read"], events.len());
    assert_eq!(one["migration"]["stages"].as_array().unwrap().len(), 3);
    assert_eq!(one["leased_tasks"], json!([]));
    let failed = get(&base, &format!("/api/migrations/{m3}"), None)
        .await
        .json();
    assert_eq!(failed["spans"][0]["outcome"], "failed");

    for (path, status, field) in [
        ("/api/migrations/999999", 404, None),
        ("/api/migrations/abc", 400, Some("id")),
        ("/api/nothing-here", 404, None),
    ] {
        let reply = get(&base, path, None).await;
        assert_eq!(reply.status, status, "{path}: {}", reply.body);
        let body = reply.json();
        assert!(body["error"].is_string(), "{path}: {body}");
        assert_eq!(body.get("field").and_then(Json::as_str), field, "{path}");
    }

    // A running task shows with its worker and progress, there and among
    // the worker's leases; the pool counts its slot.
    let slow = plan(
        "slow",
        vec![stage("nap", vec![task("sleep", json!({"ms": 4000}))])],
    );
    let m4 = c.create(create_inline(slow, "project/4")).await.unwrap().id;
    let leased = wait_json(&base, &format!("/api/migrations/{m4}"), |d| {
        let t = &d["leased_tasks"][0];
        t["total"]
            .as_u64()
            .is_some_and(|n| n > 0)
            .then(|| t.clone())
    })
    .await;
    assert_eq!(leased["worker_id"], "w1");
    assert_eq!(leased["kind"], "sleep");
    assert_eq!(leased["total"], 4000);
    assert!(leased["done"].as_u64().unwrap() <= 4000);
    let workers = get(&base, "/api/workers", None).await.json();
    let w1 = &workers["workers"][0];
    assert_eq!((&w1["worker_id"], &w1["slots"]), (&json!("w1"), &json!(4)));
    assert_eq!(w1["leases"][0]["task_id"], leased["task_id"]);
    let pools = get(&base, "/api/pools", None).await.json();
    let default = pools["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "default")
        .expect("the default pool")
        .clone();
    assert_eq!(
        (&default["running"], &default["queued"]),
        (&json!(1), &json!(0))
    );
    assert!(default["slots"].as_u64().unwrap() >= 1);

    // The live feed: `ready`, then the ids of migrations that change.
    let mut live = open(&base, "/api/live", None).await;
    let mut seen = String::new();
    read_until(&mut live, &mut seen, "event: ready", WAIT).await;
    assert!(seen.contains("text/event-stream"), "{seen}");
    let m5 = c
        .create(create_inline(three.clone(), "project/5"))
        .await
        .unwrap()
        .id;
    read_until(
        &mut live,
        &mut seen,
        &format!("\"migration_ids\":[{m5}"),
        WAIT,
    )
    .await;
    c.wait_for_terminal(m4, WAIT).await;
    c.wait_for_terminal(m5, WAIT).await;

    // A stop is not held up by an open live stream.
    cluster.coordinator.terminate();
    let exit = cluster.coordinator.wait_exit(Duration::from_secs(20)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "the coordinator did not stop with a live stream open: {exit:?}"
    );
}

/// Three stages of noop tasks (1, 2, 1): three spans in the chart.
fn three_stages() -> stagecoach_proto::v1::Plan {
    plan(
        "three",
        vec![
            stage("extract", vec![task("noop", json!({}))]),
            stage("transform", vec![task("noop", json!({})); 2]),
            stage("load", vec![task("noop", json!({}))]),
        ],
    )
}

/// Polls `path` until `pick` finds what it wants in the answer.
async fn wait_json<T>(base: &str, path: &str, pick: impl Fn(&Json) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let reply = get(base, path, None).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        let body = reply.json();
        if let Some(found) = pick(&body) {
            return found;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{path} never had what the test waits for: {body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// --- tokens ------------------------------------------------------------------

/// A token of every role.
struct Tokens {
    admin: String,
    worker: String,
    viewer: String,
    client: String,
}

/// A coordinator (SQLite, in `dir`) whose tokens file holds a token of
/// every role.
async fn with_tokens(dir: &Path) -> (Coordinator, Tokens) {
    let mut lines = Vec::new();
    let mut made = Vec::new();
    for role in ["admin", "worker", "viewer", "client"] {
        let out = tokio::process::Command::new(&binaries().coordinator)
            .args([
                "token",
                "create",
                "--role",
                role,
                "--name",
                &format!("{role}-1"),
            ])
            .output()
            .await
            .expect("run coordinator token create");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let mut it = text.lines();
        made.push(it.next().expect("the token").to_string());
        lines.push(it.next().expect("the tokens-file line").to_string());
    }
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("tokens");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let [admin, worker, viewer, client] = made.try_into().expect("four tokens");
    let file = file.to_str().expect("a utf-8 path");
    let coord = Coordinator::start(Backend::Sqlite, &dir.join("c"), &["--auth-tokens", file]).await;
    let tokens = Tokens {
        admin,
        worker,
        viewer,
        client,
    };
    (coord, tokens)
}

/// With a tokens file: the page is open, the API needs a viewer or an
/// admin token; 401 without one (saying how), 403 for other roles (saying
/// which role is needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_needs_a_viewer_or_admin_token() {
    let tmp = tempfile::tempdir().unwrap();
    let (coord, t) = with_tokens(tmp.path()).await;
    let base = coord.http_url().unwrap();

    for path in ["/", "/app.js", "/style.css"] {
        let page = get(&base, path, None).await;
        assert_eq!(page.status, 200, "{path} is open: {}", page.body);
        assert!(
            page.header("content-security-policy")
                .is_some_and(|v| v.contains("script-src 'self'")),
            "{path}: {}",
            page.head
        );
    }
    for path in ["/api/migrations", "/api/pools", "/api/workers", "/api/live"] {
        let none = get(&base, path, None).await;
        assert_eq!(none.status, 401, "{path}: {}", none.body);
        assert_eq!(none.header("www-authenticate"), Some("Bearer"));
        for token in [&t.worker, &t.client] {
            let denied = get(&base, path, Some(token)).await;
            assert_eq!(denied.status, 403, "{path}: {}", denied.body);
            assert!(
                denied.body.contains("needs role admin or viewer"),
                "{path}: {}",
                denied.body
            );
        }
    }
    for token in [&t.viewer, &t.admin] {
        let ok = get(&base, "/api/migrations", Some(token)).await;
        assert_eq!(ok.status, 200, "{}", ok.body);
        assert_eq!(ok.json()["migrations"], json!([]));
    }
}

// --- the page in a browser ---------------------------------------------------

/// The text content of the first element matching `selector`, as JS.
fn text_of(selector: &str) -> String {
    format!("document.querySelector({selector:?})?.textContent")
}

/// Saves a screenshot of `page` as `name.png`, the test's artefact: in
/// `STAGECOACH_SCREENSHOTS` when set, else in `dashboard-screenshots/`
/// beside the built binaries (`target/debug/`).
async fn screenshot(page: &Page<'_>, name: &str) {
    let dir = match std::env::var_os("STAGECOACH_SCREENSHOTS") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => binaries()
            .coordinator
            .parent()
            .expect("the binaries' directory")
            .join("dashboard-screenshots"),
    };
    std::fs::create_dir_all(&dir).expect("create the screenshot dir");
    page.screenshot(&dir.join(format!("{name}.png"))).await;
}

/// The page scrolls horizontally by this many pixels (0: it fits).
async fn overflow(page: &Page<'_>) -> i64 {
    page.eval("document.scrollingElement.scrollWidth - window.innerWidth")
        .await
        .as_i64()
        .expect("a number")
}

/// The list, a migration's chart and tail, a live update without reload,
/// hostile subjects as text, and a phone-sized viewport that fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn browser_shows_migrations_and_follows_one_live() {
    let cluster = Cluster::start_fast(Backend::Sqlite, &[], 1, 4).await;
    let c = cluster.client().await;
    let base = cluster.coordinator.http_url().expect("an HTTP port");
    let three = three_stages();
    let done = c
        .create(create_inline(three.clone(), "project/a"))
        .await
        .unwrap()
        .id;
    c.wait_for_terminal(done, WAIT).await;
    let hostile = c
        .create(create_inline(three.clone(), HOSTILE))
        .await
        .unwrap()
        .id;
    c.wait_for_terminal(hostile, WAIT).await;
    let napping = plan(
        "napping",
        vec![stage("nap", vec![task("sleep", json!({"ms": 60_000}))])],
    );
    let canceled = c
        .create(create_inline(napping, "project/c"))
        .await
        .unwrap()
        .id;
    c.cancel(canceled, "by the test").await.unwrap();
    c.wait_for_terminal(canceled, WAIT).await;

    let browser = Chromium::launch().await;
    let page = browser.page(1280, 800, false).await;
    page.goto(&format!("{base}/")).await;

    // The list shows each migration with its state.
    for (id, state) in [
        (done, "succeeded"),
        (hostile, "succeeded"),
        (canceled, "canceled"),
    ] {
        let row = format!("tr[data-migration-id=\"{id}\"] .state");
        page.wait_for(
            &format!("{} === {state:?}", text_of(&row)),
            WAIT,
            &text_of("#view"),
        )
        .await;
    }
    assert_eq!(page.eval(&text_of("#live")).await, "live");
    screenshot(&page, "list").await;
    // The hostile subject is text: no element made of it, no script run.
    let subject = format!("tr[data-migration-id=\"{hostile}\"] .subject");
    assert_eq!(page.eval(&text_of(&subject)).await, HOSTILE);
    assert_eq!(
        page.eval("[document.querySelectorAll('img, b').length, window.__pwned ?? null]")
            .await,
        json!([0, null])
    );

    // One migration: a rect per started stage, the log's tail.
    page.goto(&format!("{base}/#/migrations/{hostile}")).await;
    page.wait_for(
        "document.querySelectorAll('svg#gantt rect.span').length === 3",
        WAIT,
        &text_of("#view"),
    )
    .await;
    let stages = page
        .eval("[...document.querySelectorAll('svg#gantt rect.span.succeeded')].map(r => r.dataset.stage)")
        .await;
    assert_eq!(stages, json!(["0", "1", "2"]));
    assert_eq!(page.eval(&text_of("#migration-subject")).await, HOSTILE);
    let kinds = page
        .eval("[...document.querySelectorAll('tr.event')].map(r => r.dataset.kind)")
        .await;
    let kinds: BTreeSet<&str> = kinds
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Json::as_str)
        .collect();
    for kind in [
        "migration_created",
        "stage_started",
        "task_succeeded",
        "migration_succeeded",
    ] {
        assert!(kinds.contains(kind), "{kind} not in the tail: {kinds:?}");
    }
    // The event message holding the subject is text too.
    let messages = page
        .eval("[...document.querySelectorAll('tr.event .message')].map(m => m.textContent)")
        .await;
    assert!(
        messages.as_array().unwrap().iter().any(|m| m == HOSTILE),
        "{messages}"
    );
    assert_eq!(
        page.eval("document.querySelectorAll('img, b').length")
            .await,
        0
    );
    screenshot(&page, "migration").await;

    // Live: a slow migration's open page follows it to the end, no reload.
    let slow = plan(
        "slow",
        vec![
            stage("warm", vec![task("sleep", json!({"ms": 2500}))]),
            stage("work", vec![task("sleep", json!({"ms": 2500}))]),
        ],
    );
    let live = c
        .create(create_inline(slow, "project/live"))
        .await
        .unwrap()
        .id;
    page.goto(&format!("{base}/#/migrations/{live}")).await;
    page.wait_for(
        &format!("{} === 'running'", text_of("#migration-state")),
        WAIT,
        &text_of("#view"),
    )
    .await;
    page.eval("window.__same_page = true").await;
    // The running task shows with its worker while it sleeps.
    page.wait_for(
        "[...document.querySelectorAll('tr.leased-task')].some(r => r.textContent.includes('w1'))",
        WAIT,
        &text_of("#view"),
    )
    .await;
    screenshot(&page, "running").await;
    page.wait_for(
        &format!("{} === 'succeeded'", text_of("#migration-state")),
        WAIT,
        &text_of("#view"),
    )
    .await;
    assert_eq!(
        c.get_migration(live).await.unwrap().state(),
        MigrationState::Succeeded
    );
    assert_eq!(
        page.eval("window.__same_page").await,
        true,
        "the page reloaded"
    );
    page.wait_for(
        "document.querySelectorAll('svg#gantt rect.span.succeeded').length === 2",
        WAIT,
        &text_of("#view"),
    )
    .await;

    // A phone: every view fits 390 px.
    let phone = browser.page(390, 844, true).await;
    for (route, ready) in [
        (
            "#/",
            "document.querySelectorAll('tr[data-migration-id]').length >= 4",
        ),
        (
            &format!("#/migrations/{hostile}") as &str,
            "document.querySelectorAll('svg#gantt rect.span').length === 3",
        ),
        (
            "#/pools",
            "document.querySelectorAll('tr[data-pool]').length >= 1",
        ),
        (
            "#/workers",
            "document.querySelectorAll('tr[data-worker]').length === 1",
        ),
    ] {
        phone.goto(&format!("{base}/{route}")).await;
        phone.wait_for(ready, WAIT, &text_of("#view")).await;
        let name = match route.trim_start_matches("#/") {
            "" => "migrations".to_string(),
            r => r.replace('/', "-"),
        };
        screenshot(&phone, &format!("phone-{name}")).await;
        let width = phone
            .eval("document.scrollingElement.scrollWidth")
            .await
            .as_i64()
            .unwrap();
        assert!(width <= 390, "{route} is {width} px wide at 390 px");
        assert_eq!(overflow(&phone).await, 0, "{route}");
    }
    assert_eq!(browser.exceptions(), Vec::<String>::new());
}

/// With a tokens file the page asks for a token; a worker token gets the
/// 403 message and the prompt again, a viewer token shows the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn browser_asks_for_a_token() {
    let tmp = tempfile::tempdir().unwrap();
    let (coord, t) = with_tokens(tmp.path()).await;
    let base = coord.http_url().unwrap();
    let admin = Client::connect_with_token(&coord.url(), Some(&t.admin)).await;
    let one = plan("one", vec![stage("s", vec![task("noop", json!({}))])]);
    let id = admin
        .create(create_inline(one, "project/token"))
        .await
        .unwrap()
        .id;

    let browser = Chromium::launch().await;
    let page = browser.page(1280, 800, false).await;
    page.goto(&format!("{base}/")).await;
    page.wait_for(
        "!document.getElementById('auth').hidden",
        WAIT,
        &text_of("body"),
    )
    .await;
    let asked = page.eval(&text_of("#auth-message")).await;
    assert!(
        asked.as_str().unwrap().contains("requires a bearer token"),
        "{asked}"
    );
    assert_eq!(
        page.eval("document.querySelectorAll('tr[data-migration-id]').length")
            .await,
        0
    );

    let enter = |token: &str| {
        format!(
            "(() => {{ document.getElementById('token').value = {token:?}; \
             document.querySelector('#auth form').requestSubmit(); return true; }})()"
        )
    };
    page.eval(&enter(&t.worker)).await;
    let denied = page
        .wait_for(
            &format!(
                "!document.getElementById('error').hidden && {}",
                text_of("#error")
            ),
            WAIT,
            &text_of("body"),
        )
        .await;
    let denied = denied.as_str().unwrap();
    assert!(
        denied.contains("has role worker") && denied.contains("needs role admin or viewer"),
        "{denied}"
    );
    assert_eq!(
        page.eval("document.getElementById('auth').hidden").await,
        false,
        "asked again"
    );

    page.eval(&enter(&t.viewer)).await;
    page.wait_for(
        &format!("document.querySelector('tr[data-migration-id=\"{id}\"]') !== null"),
        WAIT,
        &text_of("body"),
    )
    .await;
    let state = page
        .eval("[document.getElementById('auth').hidden, document.getElementById('error').hidden, sessionStorage.getItem('stagecoach.token')]")
        .await;
    assert_eq!(state, json!([true, true, t.viewer]));
    page.wait_for(
        &format!("{} === 'live'", text_of("#live")),
        WAIT,
        &text_of("#live"),
    )
    .await;
    assert_eq!(browser.exceptions(), Vec::<String>::new());
}
