//! The run's own PostgreSQL server, which the harness restarts while work
//! runs (`pg_ctl restart -m fast` and `-m immediate`). It is not the test
//! binary's shared throwaway server ([`crate::backend`]): restarting that
//! one would break unrelated tests running beside the harness.
//!
//! Like the shared server it is stopped however the harness ends: a small
//! watchdog shell, in its own process group, blocks reading a pipe from
//! this process; at end of file (drop, exit, or this process killed) it
//! stops the server with an immediate shutdown and deletes its directory.
//! Under root, `initdb` and `pg_ctl` run as the `postgres` user.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Stops the server and removes its files once stdin ends. `$1` the data
/// directory, `$2` the directory to remove, the rest runs `pg_ctl`.
const WATCHDOG: &str = r#"
data=$1; base=$2; shift 2
while read -r _; do :; done
"$@" -D "$data" -m immediate -w stop >/dev/null 2>&1
rm -rf "$base"
"#;

/// How the harness shuts the server down before starting it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// `-m fast`: clients disconnected, a checkpoint, a clean stop.
    Fast,
    /// `-m immediate`: like a power cut; crash recovery on start.
    Immediate,
}

/// Why the server could not be set up or restarted.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "PostgreSQL's pg_ctl and initdb were not found: install them with `apt-get install -y postgresql` or point STAGECOACH_PG_BIN at their directory"
    )]
    NotInstalled,
    #[error("{command} failed ({status}):\n{output}")]
    Failed {
        command: String,
        status: String,
        output: String,
    },
    #[error("{command}: {source}")]
    Io {
        command: String,
        source: std::io::Error,
    },
}

/// A running server on 127.0.0.1, restartable.
#[derive(Debug)]
pub struct ChaosPostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    as_root: bool,
    watchdog: Child,
}

impl ChaosPostgres {
    /// Creates a cluster in a new temporary directory and starts it.
    /// Blocking: call it from `spawn_blocking`.
    pub fn start() -> Result<ChaosPostgres, PgError> {
        let bin = find_bin().ok_or(PgError::NotInstalled)?;
        let as_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        let base = tempfile::Builder::new()
            .prefix("stagecoach-chaos-pg-")
            .tempdir()
            .map_err(|source| PgError::Io {
                command: "create a temporary directory".into(),
                source,
            })?
            .keep();
        if as_root {
            run(Command::new("chown").arg("postgres:").arg(&base))?;
        }
        let data = base.join("data");
        let pg_ctl = command(as_root, &bin.join("pg_ctl"));
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("stagecoach-chaos-pg-watchdog")
            .arg(&data)
            .arg(&base)
            .arg(pg_ctl.get_program())
            .args(pg_ctl.get_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|source| PgError::Io {
                command: "spawn the PostgreSQL watchdog (sh)".into(),
                source,
            })?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|source| PgError::Io {
                command: "find a free port".into(),
                source,
            })?;
        let server = ChaosPostgres {
            bin,
            data,
            port,
            as_root,
            watchdog,
        };
        let mut initdb = command(as_root, &server.bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&server.data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync");
        run(&mut initdb)?;
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_buffers=32MB",
            server.port,
            base.display()
        );
        run(server.pg_ctl().args(["-o", &options, "start"]))?;
        Ok(server)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server the way `how` says and starts it again with the
    /// same options, waiting until it accepts connections. Blocking.
    pub fn restart(&self, how: Shutdown) -> Result<(), PgError> {
        let mode = match how {
            Shutdown::Fast => "fast",
            Shutdown::Immediate => "immediate",
        };
        run(self.pg_ctl().args(["-m", mode, "restart"]))
    }

    fn pg_ctl(&self) -> Command {
        let mut c = command(self.as_root, &self.bin.join("pg_ctl"));
        c.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.data.with_file_name("postgres.log"))
            .args(["-w", "-t", "60"]);
        c
    }
}

impl Drop for ChaosPostgres {
    fn drop(&mut self) {
        // End of file on the watchdog's stdin: it stops the server.
        drop(self.watchdog.stdin.take());
        let _ = self.watchdog.wait();
    }
}

/// `program`, run as the `postgres` user when we are root.
fn command(as_root: bool, program: &Path) -> Command {
    if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(command: &mut Command) -> Result<(), PgError> {
    let shown = format!("{command:?}");
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| PgError::Io {
            command: shown.clone(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(PgError::Failed {
        command: shown,
        status: out.status.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

/// The directory holding `pg_ctl` and `initdb`: `$STAGECOACH_PG_BIN`, else
/// `PATH` (through symlinks), else the newest `/usr/lib/postgresql/*/bin`.
fn find_bin() -> Option<PathBuf> {
    let complete = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("STAGECOACH_PG_BIN") {
        return Some(PathBuf::from(dir)).filter(|d| complete(d));
    }
    let on_path = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .filter_map(|dir| dir.join("pg_ctl").canonicalize().ok())
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .find(|d| complete(d));
    if on_path.is_some() {
        return on_path;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, d)| complete(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}
