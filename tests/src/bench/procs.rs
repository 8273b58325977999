//! The real `coordinator` and `worker` processes a bench run starts, and
//! where their executables come from.
//!
//! The bench builds them with its *own* cargo profile and target directory
//! (read from `current_exe()`), so `cargo run --release --bin bench`
//! measures release binaries of the current tree and the debug smoke test
//! measures debug ones. The e2e harness's [`crate::binaries`] assumes a
//! test binary under `<profile>/deps/`, which a `[[bin]]` is not, hence a
//! layout of its own here. The coordinator is started here rather than with
//! [`crate::Coordinator`] because the bench also points it at PostgreSQL.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::process::tail;

/// The line the coordinator prints on stdout once it serves.
const LISTENING: &str = "stagecoach coordinator listening on ";

/// The two executables a bench run starts.
#[derive(Debug, Clone)]
pub struct Executables {
    pub coordinator: PathBuf,
    pub worker: PathBuf,
}

impl Executables {
    /// For a harness binary (`fuzz`, `chaos`): the e2e helpers find the
    /// executables beside a test binary under `<profile>/deps/`, which a
    /// `[[bin]]` is not, so build them with this binary's profile and point
    /// the helpers at them (`STAGECOACH_BIN_DIR`), unless that is set
    /// already. Call it before any other thread starts.
    pub fn point_harness_at_them() -> anyhow::Result<()> {
        if std::env::var_os("STAGECOACH_BIN_DIR").is_some() {
            return Ok(());
        }
        let exes = Executables::locate_or_build(None)?;
        if let Some(dir) = exes.coordinator.parent() {
            // SAFETY: the caller runs this before starting any thread.
            unsafe { std::env::set_var("STAGECOACH_BIN_DIR", dir) };
        }
        Ok(())
    }

    /// Takes them from `bin_dir`, or builds them with the running
    /// executable's profile and target directory.
    pub fn locate_or_build(bin_dir: Option<&Path>) -> anyhow::Result<Executables> {
        match bin_dir {
            Some(dir) => Self::existing(dir),
            None => {
                let layout = Layout::of_current_exe()?;
                layout.build()?;
                Self::existing(&layout.profile_dir)
            }
        }
    }

    /// Copies both into `dir` as `bench-coordinator` and `bench-worker`:
    /// a build that replaces the originals during a long run then does not
    /// change what later measurements start, and on a shared machine the
    /// bench's processes are told apart from (and not stopped with) other
    /// `coordinator` and `worker` processes by name.
    pub fn copy_to(&self, dir: &Path) -> anyhow::Result<Executables> {
        std::fs::create_dir_all(dir)?;
        let copy = |from: &Path, name: &str| -> anyhow::Result<PathBuf> {
            let to = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
            std::fs::copy(from, &to)
                .with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
            Ok(to)
        };
        Ok(Executables {
            coordinator: copy(&self.coordinator, "bench-coordinator")?,
            worker: copy(&self.worker, "bench-worker")?,
        })
    }

    fn existing(dir: &Path) -> anyhow::Result<Executables> {
        let exe = |name: &str| dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
        let found = Executables {
            coordinator: exe("coordinator"),
            worker: exe("worker"),
        };
        for p in [&found.coordinator, &found.worker] {
            if !p.is_file() {
                bail!("executable {} does not exist", p.display());
            }
        }
        Ok(found)
    }
}

/// Where cargo put the running executable.
#[derive(Debug)]
pub struct Layout {
    /// `target/<profile dir>` or `target/<triple>/<profile dir>`.
    pub profile_dir: PathBuf,
    /// The `--target-dir`.
    pub target_dir: PathBuf,
    profile: String,
    triple: Option<String>,
}

impl Layout {
    /// Reads the layout from `current_exe()`: a `[[bin]]` lives in the
    /// profile dir, a test binary in its `deps/`.
    pub fn of_current_exe() -> anyhow::Result<Layout> {
        let exe = std::env::current_exe().context("current_exe")?;
        let mut profile_dir = exe
            .parent()
            .with_context(|| format!("unexpected executable location {}", exe.display()))?
            .to_path_buf();
        if profile_dir.file_name().is_some_and(|n| n == "deps") {
            profile_dir.pop();
        }
        let dir_name = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("unexpected profile dir {}", profile_dir.display()))?;
        // `dev` and `test` build into `debug/`, `release` and `bench` into
        // `release/`, custom profiles into their own name.
        let profile = match dir_name {
            "debug" => "dev",
            other => other,
        }
        .to_string();
        let parent = profile_dir
            .parent()
            .with_context(|| format!("unexpected profile dir {}", profile_dir.display()))?;
        // `target/` holds CACHEDIR.TAG; `target/<triple>/` does not.
        let (target_dir, triple) = if parent.join("CACHEDIR.TAG").exists() {
            (parent.to_path_buf(), None)
        } else {
            let triple = parent
                .file_name()
                .and_then(|n| n.to_str())
                .map(String::from);
            (parent.parent().unwrap_or(parent).to_path_buf(), triple)
        };
        Ok(Layout {
            profile_dir,
            target_dir,
            profile,
            triple,
        })
    }

    /// `cargo build` of the two executables with this layout. Waits for
    /// cargo's lock when another build holds it.
    fn build(&self) -> anyhow::Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("the tests crate lives inside the workspace")?;
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.current_dir(root)
            .args(["build", "--bins", "-p", "stagecoach-coordinator-bin"])
            .args(["-p", "stagecoach-worker-bin", "--target-dir"])
            .arg(&self.target_dir)
            .args(["--profile", &self.profile]);
        if let Some(triple) = &self.triple {
            cmd.args(["--target", triple]);
        }
        eprintln!(
            "bench: building coordinator and worker (profile {})…",
            self.profile
        );
        let out = cmd
            .output()
            .with_context(|| format!("could not run {cmd:?}"))?;
        if !out.status.success() {
            bail!(
                "building the coordinator and worker failed ({}): {cmd:?}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// A running `coordinator serve`, killed when dropped.
#[derive(Debug)]
pub struct CoordinatorProc {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    database: String,
}

impl CoordinatorProc {
    /// Starts a coordinator on a free loopback port with its log (and, for
    /// SQLite, usually its database) in `dir`, and waits for its address.
    pub async fn start(
        exes: &Executables,
        dir: &Path,
        database: &str,
    ) -> anyhow::Result<CoordinatorProc> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let log = dir.join("coordinator.log");
        let mut cmd = Command::new(&exes.coordinator);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--database", database])
            // A relative database path lands beside the log, never in the
            // caller's working directory.
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(append(&log)?)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start {cmd:?}"))?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
        let line = match first {
            Ok(Ok(Some(line))) => line,
            other => {
                let _ = child.start_kill();
                bail!(
                    "coordinator did not print its address ({other:?}); {cmd:?}\n{}",
                    tail(&log, 30)
                );
            }
        };
        let addr = line
            .strip_prefix(LISTENING)
            .and_then(|a| a.trim().parse::<SocketAddr>().ok())
            .with_context(|| format!("unexpected first stdout line {line:?}"))?;
        // Keep draining stdout so the server never blocks on a full pipe.
        let mut sink = append(&log)?;
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(sink, "[stdout] {line}");
            }
        });
        Ok(CoordinatorProc {
            child,
            addr,
            log,
            database: database.to_string(),
        })
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The `--database` it was started with.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Its memory: peak (VmHWM) and current (VmRSS) resident set, in MB.
    pub fn memory(&self) -> anyhow::Result<Memory> {
        let pid = self.child.id().context("the coordinator has exited")?;
        Memory::of(pid)
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!("the coordinator exited ({status}):\n{}", self.log_tail(30));
        }
        Ok(())
    }

    /// Kills it and waits until it is gone.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// Peak resident set (VmHWM), MB.
    pub peak_mb: f64,
    /// Current resident set (VmRSS), MB.
    pub current_mb: f64,
}

impl Memory {
    pub fn of(pid: u32) -> anyhow::Result<Memory> {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        let kb = |field: &str| -> anyhow::Result<f64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .with_context(|| format!("no {field} in {path}"))
        };
        Ok(Memory {
            peak_mb: kb("VmHWM:")? / 1024.0,
            current_mb: kb("VmRSS:")? / 1024.0,
        })
    }
}

/// Real `worker` processes with the built-in handlers (`noop` among them),
/// killed when dropped.
#[derive(Debug)]
pub struct WorkerProcs {
    children: Vec<Child>,
    /// The ids they subscribe with.
    pub ids: Vec<String>,
}

impl WorkerProcs {
    /// Starts `count` workers of `slots` slots each, logging to `dir`.
    ///
    /// Their log level is `warn`: a worker logs two lines per task at
    /// `info`, and on a small machine four workers writing 400,000 lines
    /// would measure the workers' logging, not the coordinator.
    pub fn start(
        exes: &Executables,
        url: &str,
        count: u32,
        slots: u32,
        dir: &Path,
    ) -> anyhow::Result<WorkerProcs> {
        let shared = dir.join("shared");
        std::fs::create_dir_all(&shared).with_context(|| format!("create {}", shared.display()))?;
        let mut children = Vec::new();
        let mut ids = Vec::new();
        for i in 1..=count {
            let id = format!("bench-w{i}");
            let log = dir.join(format!("worker-{id}.log"));
            let mut cmd = Command::new(&exes.worker);
            cmd.args(["--coordinator", url, "--slots", &slots.to_string()])
                .arg("--shared-dir")
                .arg(&shared)
                .args(["--worker-id", &id])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(append(&log)?)
                .stderr(append(&log)?)
                .kill_on_drop(true);
            children.push(
                cmd.spawn()
                    .with_context(|| format!("could not start {cmd:?}"))?,
            );
            ids.push(id);
        }
        Ok(WorkerProcs { children, ids })
    }

    /// Their process ids, of those still running.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    /// Kills them and waits until they are gone.
    pub async fn stop(mut self) {
        for c in &mut self.children {
            let _ = c.kill().await;
        }
    }
}

fn append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open log {}", path.display()))
}
