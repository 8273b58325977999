//! Headless Chromium for the dashboard tests, driven over the DevTools
//! protocol (CDP): a test opens a page at a viewport size, runs JavaScript in
//! it and waits until a condition holds, as a user's browser would see it.
//!
//! Chromium is found on `PATH` (`chromium`, `chromium-browser`,
//! `google-chrome`) or at `STAGECOACH_CHROMIUM`. When it is missing and the
//! tests run as root (CI containers), Debian's `chromium` is installed with
//! `apt-get` once per test process; otherwise the test fails saying how to
//! install it: a browser test that is silently skipped tests nothing.
//!
//! Each [`Chromium`] is its own process with a fresh profile in a temporary
//! directory, started with `--remote-debugging-port=0`; the port it picked
//! is read from `DevToolsActivePort` in that profile. One WebSocket carries
//! every command; each page is a target attached with `flatten`, so its
//! commands name its session. Dropping a [`Chromium`] kills it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use serde_json::{Value as Json, json};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The executables tried, in order.
const NAMES: [&str; 3] = ["chromium", "chromium-browser", "google-chrome"];
/// How long Chromium may take to open its DevTools port.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one DevTools command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Json>>>>;

/// A running headless Chromium.
pub struct Chromium {
    child: Child,
    sink: tokio::sync::Mutex<Sink>,
    pending: Pending,
    /// Uncaught exceptions of every page, as "session: text".
    exceptions: Arc<Mutex<Vec<String>>>,
    next_id: AtomicU64,
    profile: TempDir,
}

/// One tab, at a fixed viewport.
pub struct Page<'a> {
    browser: &'a Chromium,
    session: String,
}

impl Chromium {
    /// Starts Chromium (installing it first if it is missing and we are
    /// root) and connects to its DevTools port. Panics saying why if it
    /// cannot.
    pub async fn launch() -> Chromium {
        let exe = tokio::task::spawn_blocking(executable)
            .await
            .expect("finding chromium panicked");
        let profile = tempfile::Builder::new()
            .prefix("stagecoach-chromium-")
            .tempdir()
            .expect("create a chromium profile dir");
        let log = profile.path().join("chromium.log");
        let log_file = std::fs::File::create(&log).expect("create the chromium log");
        let mut cmd = Command::new(&exe);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            // Containers often have a 64 MB /dev/shm.
            "--disable-dev-shm-usage",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", exe.display()));
        let endpoint = devtools_endpoint(profile.path(), &mut child, &log).await;
        let (ws, _) = tokio_tungstenite::connect_async(endpoint.as_str())
            .await
            .unwrap_or_else(|e| panic!("connect to chromium's DevTools at {endpoint}: {e}"));
        let (sink, mut stream) = ws.split();
        let pending: Pending = Arc::default();
        let exceptions: Arc<Mutex<Vec<String>>> = Arc::default();
        let (answers, seen) = (pending.clone(), exceptions.clone());
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Ok(text) = msg.to_text() else { continue };
                let Ok(value) = serde_json::from_str::<Json>(text) else {
                    continue;
                };
                if let Some(id) = value.get("id").and_then(Json::as_u64) {
                    let tx = lock(&answers).remove(&id);
                    if let Some(tx) = tx {
                        let _ = tx.send(value);
                    }
                } else if value["method"] == "Runtime.exceptionThrown" {
                    let details = &value["params"]["exceptionDetails"];
                    let text = details["exception"]["description"]
                        .as_str()
                        .or(details["text"].as_str())
                        .unwrap_or("?");
                    lock(&seen).push(format!("{}: {text}", value["sessionId"]));
                }
            }
        });
        Chromium {
            child,
            sink: tokio::sync::Mutex::new(sink),
            pending,
            exceptions,
            next_id: AtomicU64::new(1),
            profile,
        }
    }

    /// Sends one DevTools command (to a page's `session`, or the browser)
    /// and returns its `result`; panics on an error answer or a timeout.
    pub async fn command(&self, session: Option<&str>, method: &str, params: Json) -> Json {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            msg["sessionId"] = json!(session);
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        self.sink
            .lock()
            .await
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap_or_else(|e| panic!("send {method} to chromium: {e}"));
        let answer = tokio::time::timeout(COMMAND_TIMEOUT, rx)
            .await
            .unwrap_or_else(|_| {
                panic!("chromium did not answer {method} within {COMMAND_TIMEOUT:?}")
            })
            .unwrap_or_else(|_| panic!("chromium closed its DevTools connection during {method}"));
        if let Some(error) = answer.get("error") {
            panic!(
                "chromium refused {method} {params}: {error}",
                params = msg["params"]
            );
        }
        answer["result"].clone()
    }

    /// Opens a new tab of `width` × `height` CSS pixels (`mobile`: a
    /// phone's viewport meta handling and touch), blank.
    pub async fn page(&self, width: u32, height: u32, mobile: bool) -> Page<'_> {
        let target = self
            .command(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = self
            .command(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        let session = attached["sessionId"]
            .as_str()
            .expect("attachToTarget answers a sessionId")
            .to_string();
        let page = Page {
            browser: self,
            session,
        };
        page.command("Runtime.enable", json!({})).await;
        page.command("Page.enable", json!({})).await;
        page.command(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
        page
    }

    /// Uncaught JavaScript exceptions of its pages so far.
    pub fn exceptions(&self) -> Vec<String> {
        lock(&self.exceptions).clone()
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.profile.path().join("chromium.log")).unwrap_or_default()
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            let exceptions = self.exceptions();
            eprintln!(
                "===== chromium: {} page exceptions =====\n{}",
                exceptions.len(),
                exceptions.join("\n")
            );
        }
    }
}

impl Page<'_> {
    pub async fn command(&self, method: &str, params: Json) -> Json {
        self.browser
            .command(Some(&self.session), method, params)
            .await
    }

    /// Loads `url` (waiting for the navigation to be committed, not for the
    /// page's data: use [`Page::wait_for`] for that).
    pub async fn goto(&self, url: &str) {
        let answer = self.command("Page.navigate", json!({"url": url})).await;
        if let Some(error) = answer.get("errorText") {
            panic!("chromium could not load {url}: {error}");
        }
    }

    /// The value of the JavaScript expression `js` (awaited if a promise);
    /// panics with the exception if it throws.
    pub async fn eval(&self, js: &str) -> Json {
        let answer = self
            .command(
                "Runtime.evaluate",
                json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = answer.get("exceptionDetails") {
            panic!("{js} threw: {e}");
        }
        answer["result"]["value"].clone()
    }

    /// Waits until `js` is truthy (checked every 100 ms) and returns its
    /// value; panics after `timeout`, showing `describe` evaluated then.
    pub async fn wait_for(&self, js: &str, timeout: Duration, describe: &str) -> Json {
        // Guarded: a condition on an element not drawn yet must not throw.
        let guarded =
            format!("(() => {{ try {{ return ({js}); }} catch (_) {{ return null; }} }})()");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let value = self.eval(&guarded).await;
            let truthy = !matches!(&value, Json::Null | Json::Bool(false))
                && value != json!(0)
                && value != json!("");
            if truthy {
                return value;
            }
            if tokio::time::Instant::now() >= deadline {
                let seen = self.eval(describe).await;
                panic!(
                    "the page did not get to `{js}` within {timeout:?}; {describe} = {seen}; \
                     page exceptions: {:?}",
                    self.browser.exceptions()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Page<'_> {
    /// Saves a PNG of the whole page (beyond the viewport) to `path`.
    pub async fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let shot = self
            .command(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let data = shot["data"]
            .as_str()
            .expect("captureScreenshot answers data");
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("a base64 screenshot");
        std::fs::write(path, png)
            .unwrap_or_else(|e| panic!("write screenshot {}: {e}", path.display()));
    }
}

/// Where Chromium prints its DevTools endpoint: `DevToolsActivePort` in the
/// profile, the port on its first line and the browser's path on its second.
async fn devtools_endpoint(profile: &Path, child: &mut Child, log: &Path) -> String {
    let file = profile.join("DevToolsActivePort");
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            let mut lines = text.lines();
            if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                return format!("ws://127.0.0.1:{}{}", port.trim(), path.trim());
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "chromium exited ({status}) before opening its DevTools port:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "chromium wrote no {} within {START_TIMEOUT:?}:\n{}",
                file.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Chromium executable, installed once per process when missing.
fn executable() -> PathBuf {
    static FOUND: OnceLock<PathBuf> = OnceLock::new();
    FOUND.get_or_init(|| find().unwrap_or_else(install)).clone()
}

fn find() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("STAGECOACH_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    NAMES.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// `apt-get install chromium` as root; any other case fails saying how.
fn install() -> PathBuf {
    const HOW: &str = "install Chromium (Debian/Ubuntu: `apt-get install -y chromium`), \
                       or point STAGECOACH_CHROMIUM at a Chromium or Chrome executable";
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        panic!(
            "no {} on PATH and not root, so it cannot be installed here: {HOW}",
            NAMES.join(", ")
        );
    }
    let apt = |args: &[&str]| {
        std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    eprintln!("chromium is missing: installing Debian's chromium with apt-get");
    let install = ["install", "-y", "--no-install-recommends", "chromium"];
    // A fresh container has no package lists yet.
    let installed = apt(&install) || (apt(&["update"]) && apt(&install));
    if !installed {
        panic!("`apt-get install chromium` failed: {HOW}");
    }
    find().unwrap_or_else(|| panic!("apt-get installed chromium, but it is not on PATH: {HOW}"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
