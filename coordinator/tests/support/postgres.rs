//! A throwaway PostgreSQL server for tests: one per test binary, started on
//! first use, and a fresh database for every test ([`fresh_database`]), so
//! tests run in parallel without seeing each other's rows.
//!
//! Self-contained (std and `tempfile` only), so any test crate can include
//! it with `#[path = ".../support/postgres.rs"] mod postgres;`.
//!
//! # Finding PostgreSQL
//!
//! `initdb` and `postgres` come from `$STAGECOACH_PG_BIN` if set, else from
//! `PATH`, else from the newest `/usr/lib/postgresql/*/bin` (Debian's
//! layout). Without them every test that needs the server fails and says how
//! to install them (`apt-get install postgresql`): a backend that is silently
//! skipped is a backend that is not tested.
//!
//! # Running as root
//!
//! PostgreSQL refuses to run as root. Under root (CI, containers) the data
//! directory is handed to the `postgres` OS user and `initdb` and `postgres`
//! run through `runuser -u postgres --`; otherwise they run as the current
//! user.
//!
//! # Stopping it, whatever happens
//!
//! The server is started by a small watchdog shell, a child of the test
//! binary, whose standard input is a pipe from the test binary. The watchdog
//! starts `postgres` in the background and then blocks reading that pipe.
//! The pipe reaches end-of-file when the test binary closes it — or when the
//! kernel does, because the test binary died in any way at all: a normal
//! exit, a failed test, an abort, `SIGKILL`. Then the watchdog stops the
//! server with an immediate shutdown (`SIGQUIT` to the postmaster), waits
//! for it, and deletes the data directory. The watchdog runs in its own
//! process group, so a Ctrl-C that kills the test binary does not kill the
//! watchdog before it has cleaned up.
//!
//! On a normal exit (all tests passed, or some failed: libtest then calls
//! `exit`), a `libc` `atexit` hook closes the pipe and *waits* for the
//! watchdog, so no `postgres` process outlives `cargo test`. The pipe's
//! write end is close-on-exec, so processes a test spawns never hold it open.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The running server of this test binary.
pub struct TestPostgres {
    /// Where `initdb`, `postgres` and `psql` live.
    bin: PathBuf,
    /// The TCP port on 127.0.0.1.
    port: u16,
    /// The watchdog; taken when the server is stopped.
    watchdog: Mutex<Option<Child>>,
}

static SERVER: OnceLock<TestPostgres> = OnceLock::new();
static DATABASES: AtomicU64 = AtomicU64::new(0);

/// The server of this test binary, started on first use.
pub fn server() -> &'static TestPostgres {
    SERVER.get_or_init(TestPostgres::start)
}

/// Creates an empty database on the server and returns its URL.
pub fn fresh_database() -> String {
    server().create_database()
}

/// The watchdog: starts the server, waits for end-of-file on stdin, stops
/// the server, removes its directory. `$1` the data directory, `$2` the
/// directory to remove, the rest the command that runs `postgres`.
const WATCHDOG: &str = r#"
data=$1; base=$2; shift 2
"$@" >"$base/postgres.log" 2>&1 &
server=$!
while read -r _; do :; done
if [ -f "$data/postmaster.pid" ]; then
    kill -QUIT "$(head -n 1 "$data/postmaster.pid")" 2>/dev/null
fi
wait "$server"
rm -rf "$base"
"#;

impl TestPostgres {
    fn start() -> Self {
        let bin = find_bin();
        let mut log = String::new();
        // Another process may take the chosen port before the server binds
        // it: then start over on another.
        for _ in 0..5 {
            match Self::try_start(&bin) {
                Ok(server) => {
                    // SAFETY: registers a plain `extern "C" fn` without
                    // arguments, which is all `atexit` asks for.
                    unsafe {
                        atexit(stop_at_exit);
                    }
                    return server;
                }
                Err(failed) => {
                    let port_taken = failed.contains("could not bind")
                        || failed.contains("Address already in use");
                    log = failed;
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        panic!("the test PostgreSQL server did not start; its log:\n{log}");
    }

    /// Creates a cluster in a new directory and starts a server on it;
    /// on failure returns the server log (the watchdog removed everything).
    fn try_start(bin: &Path) -> Result<Self, String> {
        let as_root = is_root();
        let base = tempfile::Builder::new()
            .prefix("stagecoach-pg-")
            .tempdir()
            .expect("create a temporary directory for PostgreSQL")
            .keep();
        if as_root {
            run(Command::new("chown").arg("postgres:").arg(&base));
        }
        let data = base.join("data");
        let mut initdb = as_postgres(as_root, &bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync");
        run(&mut initdb);

        let port = free_port();
        let mut postgres = as_postgres(as_root, &bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&base)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=on"])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=32MB"]);
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("stagecoach-pg-watchdog")
            .arg(&data)
            .arg(&base)
            .arg(postgres.get_program())
            .args(postgres.get_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C meant for the test binary
            // must not kill the watchdog before it cleaned up.
            .process_group(0)
            .spawn()
            .expect("spawn the PostgreSQL watchdog (sh)");
        let server = TestPostgres {
            bin: bin.to_path_buf(),
            port,
            watchdog: Mutex::new(Some(watchdog)),
        };
        match server.wait_ready(&base, &data) {
            Ok(()) => Ok(server),
            Err(log) => {
                server.stop();
                Err(log)
            }
        }
    }

    /// Waits until the postmaster reports it is ready and the port accepts
    /// connections; on failure returns the server log.
    fn wait_ready(&self, base: &Path, data: &Path) -> Result<(), String> {
        let log = || std::fs::read_to_string(base.join("postgres.log")).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            // postmaster.pid's 8th line is the server's status.
            let status = std::fs::read_to_string(data.join("postmaster.pid")).unwrap_or_default();
            if status.lines().nth(7).map(str::trim) == Some("ready")
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return Ok(());
            }
            let text = log();
            if text.contains("FATAL") || text.contains("could not bind") {
                return Err(text);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("not ready after 60 s\n{}", log()))
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates an empty database with a name unique in this server and
    /// returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        let psql = if self.bin.join("psql").exists() {
            self.bin.join("psql")
        } else {
            PathBuf::from("psql")
        };
        run(Command::new(psql)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", "postgres", "-c"])
            .arg(format!("CREATE DATABASE {name}")));
        self.url(&name)
    }

    /// Stops the server and waits until it is gone and its directory removed.
    pub fn stop(&self) {
        let child = match self.watchdog.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(mut child) = child {
            // End-of-file on the watchdog's stdin: it stops the server.
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

unsafe extern "C" {
    /// libc's `atexit`; std links libc, so no crate is needed for it.
    fn atexit(callback: extern "C" fn()) -> std::ffi::c_int;
}

extern "C" fn stop_at_exit() {
    if let Some(server) = SERVER.get() {
        server.stop();
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// A command that runs `program` as the `postgres` OS user when we are root.
fn as_postgres(as_root: bool, program: &Path) -> Command {
    if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Runs a command to completion; panics with its output if it fails.
fn run(command: &mut Command) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("could not run {command:?}: {e}"));
    if !output.status.success() {
        panic!(
            "{command:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// A port nobody listens on right now. Another process may take it before
/// the server binds it; `start` then tries another.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free TCP port")
}

/// The directory holding `initdb` and `postgres`.
fn find_bin() -> PathBuf {
    let complete = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("STAGECOACH_PG_BIN") {
        let dir = PathBuf::from(dir);
        assert!(
            complete(&dir),
            "STAGECOACH_PG_BIN={} holds no initdb and postgres",
            dir.display()
        );
        return dir;
    }
    // On PATH, often as symlinks: the real directory also holds psql.
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if let Ok(initdb) = dir.join("initdb").canonicalize()
            && let Some(real) = initdb.parent()
            && complete(real)
        {
            return real.to_path_buf();
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, dir)| complete(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return dir;
    }
    panic!(
        "PostgreSQL is not installed: the store contract tests run every case on PostgreSQL too \
         and need its server binaries (initdb, postgres). Install them with \
         `apt-get install -y postgresql` (Debian/Ubuntu; binaries land in \
         /usr/lib/postgresql/<version>/bin), or point STAGECOACH_PG_BIN at a directory holding them."
    );
}
