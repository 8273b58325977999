//! Real `coordinator` and `worker` processes, started, signalled and killed
//! the way an operator (or a crash) would.
//!
//! Each process writes its logs (stderr) to a file beside its data, opened in
//! append mode so a restarted coordinator keeps one history. When a test
//! panics, dropping a process prints the tail of its log, so a failing test
//! shows what the servers saw; dropping always kills the process.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::backend::Backend;
use crate::binaries::binaries;

/// How long a coordinator may take to print its address (the first start
/// also creates and migrates its database).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The line the coordinator prints on stdout once it serves.
const LISTENING: &str = "stagecoach coordinator listening on ";

/// The line after it, unless `--http-listen off`.
const HTTP_LISTENING: &str = "stagecoach coordinator http on ";

/// Lines of each log printed when a test fails.
const LOG_TAIL_LINES: usize = 400;

/// A running `coordinator serve` process, with its log (and its SQLite
/// database) in `dir`.
#[derive(Debug)]
pub struct Coordinator {
    child: Child,
    addr: SocketAddr,
    http: Option<SocketAddr>,
    dir: PathBuf,
    backend: Backend,
    extra_args: Vec<String>,
}

impl Coordinator {
    /// Starts a coordinator on `backend` on a free loopback port and waits
    /// until it prints its address. Panics, showing its log, if it does not.
    ///
    /// Its database is `dir`'s ([`Backend::database_for`]: `dir/coord.db`,
    /// or a PostgreSQL database of its own), created if missing and reused
    /// if present, unless `extra_args` names one with `--database` (so
    /// several coordinators can share one).
    pub async fn start(backend: Backend, dir: &Path, extra_args: &[&str]) -> Coordinator {
        Self::start_at(backend, dir, "127.0.0.1:0", extra_args).await
    }

    /// Like [`Coordinator::start`], listening on `listen` (e.g. the address
    /// of a coordinator that was killed, so its workers find it again).
    pub async fn start_at(
        backend: Backend,
        dir: &Path,
        listen: &str,
        extra_args: &[&str],
    ) -> Coordinator {
        let dir = std::path::absolute(dir).expect("absolute coordinator dir");
        std::fs::create_dir_all(&dir).expect("create coordinator dir");
        let log = dir.join("coordinator.log");
        let mut cmd = Command::new(&binaries().coordinator);
        cmd.args(["serve", "--listen", listen]);
        // clap refuses `--database` twice.
        let names_database = extra_args
            .iter()
            .any(|a| *a == "--database" || a.starts_with("--database="));
        if !names_database {
            cmd.arg("--database").arg(backend.database_for(&dir).await);
        }
        // Many coordinators run at once: each gets an HTTP port of its own.
        let http_flag = extra_args
            .iter()
            .position(|a| *a == "--http-listen" || a.starts_with("--http-listen="));
        let http_off = http_flag.is_some_and(|i| {
            extra_args[i] == "--http-listen=off" || extra_args.get(i + 1) == Some(&"off")
        });
        if http_flag.is_none() {
            cmd.args(["--http-listen", "127.0.0.1:0"]);
        }
        cmd.args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(append(&log))
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));

        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        let line = match first {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                panic!(
                    "coordinator exited before printing its address ({status:?}); {cmd:?}\n{}",
                    tail(&log, LOG_TAIL_LINES)
                )
            }
            Err(_) => {
                let _ = child.start_kill();
                panic!(
                    "coordinator printed no address within {START_TIMEOUT:?}; {cmd:?}\n{}",
                    tail(&log, LOG_TAIL_LINES)
                )
            }
        };
        let addr = line
            .strip_prefix(LISTENING)
            .and_then(|a| a.trim().parse::<SocketAddr>().ok())
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first stdout line {line:?}, wanted {LISTENING:?}ADDR\n{}",
                    tail(&log, LOG_TAIL_LINES)
                )
            });
        let http = if http_off {
            None
        } else {
            let line = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
            let line = line.ok().and_then(Result::ok).flatten().unwrap_or_default();
            let http = line
                .strip_prefix(HTTP_LISTENING)
                .and_then(|a| a.trim().parse::<SocketAddr>().ok());
            Some(http.unwrap_or_else(|| {
                panic!(
                    "unexpected second stdout line {line:?}, wanted {HTTP_LISTENING:?}ADDR\n{}",
                    tail(&log, LOG_TAIL_LINES)
                )
            }))
        };
        // Keep draining stdout so a chatty server never blocks on a full pipe.
        let mut sink = append(&log);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(sink, "[stdout] {line}");
            }
        });
        Coordinator {
            child,
            addr,
            http,
            dir,
            backend,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Starts a new process on the same database, address and flags (killing
    /// this one first if it still runs), as after a crash or a deploy.
    pub async fn restart(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill9().await;
        }
        let args: Vec<&str> = self.extra_args.iter().map(String::as_str).collect();
        let listen = self.addr.to_string();
        let next = Coordinator::start_at(self.backend, &self.dir, &listen, &args).await;
        // The old process is gone; replacing it drops nothing that runs.
        *self = next;
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` of its HTTP port (metrics, dashboard), unless it was
    /// started with `--http-listen off`.
    pub fn http_url(&self) -> Option<String> {
        self.http.map(|a| format!("http://{a}"))
    }

    /// The address of its HTTP port, unless `--http-listen off`.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    /// `http://ADDR`, for gRPC clients and workers; `https://ADDR` when it
    /// was started with `--tls-cert` (its certificate must name 127.0.0.1).
    pub fn url(&self) -> String {
        let scheme = if self.extra_args.iter().any(|a| a == "--tls-cert") {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The directory holding its log (and its SQLite database).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The backend it runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Path of its log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("coordinator.log")
    }

    /// Its whole log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills it with SIGKILL (a crash) and waits until it is gone.
    pub async fn kill9(&mut self) {
        kill9(&mut self.child).await;
    }

    /// Sends SIGTERM (a graceful shutdown request); see [`Self::wait_exit`].
    /// SIGHUP: the coordinator re-reads its tokens file.
    pub fn hangup(&self) {
        signal(&self.child, libc::SIGHUP);
    }

    pub fn terminate(&self) {
        terminate(&self.child);
    }

    /// Waits until it exits, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!(
                "===== coordinator log ({}) =====\n{}",
                self.log_path().display(),
                tail(&self.log_path(), LOG_TAIL_LINES)
            );
        }
    }
}

/// A running `worker` process.
#[derive(Debug)]
pub struct Worker {
    child: Child,
    id: String,
    log: PathBuf,
}

impl Worker {
    /// Starts a worker with `slots` slots and id `id` that connects to the
    /// coordinator at `coordinator` (`http://ADDR`, or `ADDR`; several
    /// coordinators of one database as a comma-separated list, which the
    /// worker streams from one at a time and fails over between) and keeps
    /// its files in `shared_dir`. Its log is `worker-ID.log` beside
    /// `shared_dir`.
    pub fn start(coordinator: &str, slots: u32, shared_dir: &Path, id: &str) -> Worker {
        Self::start_with(coordinator, slots, shared_dir, id, &[])
    }

    /// Like [`Worker::start`], passing `extra_args` to `worker` (e.g.
    /// `--tls-ca FILE`).
    pub fn start_with(
        coordinator: &str,
        slots: u32,
        shared_dir: &Path,
        id: &str,
        extra_args: &[&str],
    ) -> Worker {
        let shared_dir = std::path::absolute(shared_dir).expect("absolute shared dir");
        std::fs::create_dir_all(&shared_dir).expect("create shared dir");
        let log = shared_dir
            .parent()
            .unwrap_or(&shared_dir)
            .join(format!("worker-{id}.log"));
        let url = coordinator
            .split(',')
            .map(|a| {
                if a.contains("://") {
                    a.to_string()
                } else {
                    format!("http://{a}")
                }
            })
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(&binaries().worker);
        cmd.args(["--coordinator", &url, "--slots", &slots.to_string()])
            .arg("--shared-dir")
            .arg(&shared_dir)
            .args(["--worker-id", id])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(append(&log))
            .stderr(append(&log))
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
        Worker {
            child,
            id: id.to_string(),
            log,
        }
    }

    /// The id it subscribed with.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Path of its log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Its whole log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The leases (task id, attempt) its log says the coordinator canceled:
    /// by a cancel notice on its stream ("coordinator canceled a task") or
    /// in a heartbeat's answer ("coordinator canceled a lease"). The two
    /// race after a cancel commits; whichever comes first cancels the
    /// handler, and the other may find nothing left to cancel.
    pub fn canceled_leases(&self) -> BTreeSet<(i64, u32)> {
        let field = |line: &str, name: &str| -> Option<String> {
            let rest = line.split(&format!(" {name}=")).nth(1)?;
            rest.split(' ').next().map(String::from)
        };
        self.logs()
            .lines()
            .filter(|l| {
                l.contains("coordinator canceled a task")
                    || l.contains("coordinator canceled a lease")
            })
            .filter_map(|l| {
                let task = field(l, "task_id")?.parse().ok()?;
                let attempt = field(l, "attempt")?.parse().ok()?;
                Some((task, attempt))
            })
            .collect()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills it with SIGKILL (a crash) and waits until it is gone.
    pub async fn kill9(&mut self) {
        kill9(&mut self.child).await;
    }

    /// Sends SIGTERM: it should stop taking work and finish or hand back its
    /// leases; see [`Self::wait_exit`].
    pub fn terminate(&self) {
        terminate(&self.child);
    }

    /// Freezes it with SIGSTOP: its stream stays open, but it sends nothing
    /// (a stalled host, a long GC pause) until [`Self::resume`].
    pub fn freeze(&self) {
        signal(&self.child, libc::SIGSTOP);
    }

    /// Lets a frozen worker run again (SIGCONT).
    pub fn resume(&self) {
        signal(&self.child, libc::SIGCONT);
    }

    /// Waits until it exits, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!(
                "===== worker {} log ({}) =====\n{}",
                self.id,
                self.log.display(),
                tail(&self.log, LOG_TAIL_LINES)
            );
        }
    }
}

async fn kill9(child: &mut Child) {
    // `kill` sends SIGKILL on Unix and reaps the process.
    let _ = child.kill().await;
}

fn terminate(child: &Child) {
    signal(child, libc::SIGTERM);
}

fn signal(child: &Child, signal: libc::c_int) {
    if let Some(pid) = child.id() {
        let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
        // SAFETY: kill(2) only sends a signal; `pid` is our own child, which
        // has not been reaped (its id is still known), so it names no other
        // process.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

fn append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()))
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("<unreadable: {e}>"));
    let all: Vec<&str> = text.lines().collect();
    let skip = all.len().saturating_sub(lines);
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!("... {skip} earlier lines ...\n"));
    }
    for l in &all[skip..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}
