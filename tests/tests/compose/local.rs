//! Running compose services as local processes: where Docker's host names,
//! ports and volumes point here, the processes themselves, and the waits.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use stagecoach_tests::Client;
use stagecoach_tests::binaries::binaries;
use stagecoach_tests::process::tail;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::files::{Image, Service};
use crate::postgres;

/// How often, and how long, a health check is retried (compose: interval ×
/// retries).
const HEALTH_POLL: Duration = Duration::from_millis(250);
const HEALTH_PATIENCE: Duration = Duration::from_secs(60);

/// The coordinators' gRPC port inside their containers (docker-compose.yml).
const GRPC_PORT: u16 = 50051;

/// Where Docker's names point on this machine.
pub struct Local {
    pub dir: PathBuf,
    /// `(host, container port)` → `127.0.0.1:port`.
    pub hosts: BTreeMap<(String, u16), String>,
    /// Volume mount point → local directory.
    pub mounts: BTreeMap<String, PathBuf>,
    /// PostgreSQL, or `None` for a SQLite file per coordinator.
    pub postgres: Option<u16>,
    /// Every service name, i.e. every host name of the compose network.
    pub services: BTreeSet<String>,
}

/// Whether `value` addresses `host:PORT` (alone, in a URL or in a list).
fn names_host(value: &str, host: &str) -> bool {
    value.match_indices(host).any(|(at, _)| {
        let before = value[..at].chars().next_back();
        let after = &value[at + host.len()..];
        matches!(before, None | Some('/' | '@' | ','))
            && after.starts_with(':')
            && after[1..].starts_with(|c: char| c.is_ascii_digit())
    })
}

impl Local {
    /// `http://ADDR` of a service's gRPC port (or PostgreSQL's), as seen
    /// from here.
    pub fn url(&self, service: &str) -> String {
        let addr = self
            .hosts
            .iter()
            .find(|((host, port), _)| host == service && [GRPC_PORT, 5432].contains(port))
            .map(|(_, addr)| addr)
            .unwrap_or_else(|| panic!("service {service} has no mapped port"));
        format!("http://{addr}")
    }

    /// Panics if `value` still addresses a compose host name.
    fn assert_mapped(&self, service: &str, what: &str, value: &str) {
        for host in &self.services {
            assert!(
                !names_host(value, host),
                "service {service}: {what} {value:?} still names {host}; map it in this test"
            );
        }
    }

    /// The value as `service` sees it here.
    pub fn rewrite(&self, service: &str, value: &str) -> String {
        let mut out = value.to_string();
        for ((host, port), local) in &self.hosts {
            out = out.replace(&format!("{host}:{port}"), local);
            if host == service {
                // Inside its own container, a service reaches itself on
                // loopback and listens on every interface.
                for own in ["0.0.0.0", "127.0.0.1", "localhost"] {
                    out = out.replace(&format!("{own}:{port}"), local);
                }
            }
        }
        for (target, dir) in &self.mounts {
            if out == *target || out.starts_with(&format!("{target}/")) {
                out = format!("{}{}", dir.display(), &out[target.len()..]);
            }
        }
        out
    }

    /// The environment of `service`'s container: the image's, then the
    /// service's, as seen here.
    pub fn environment(&self, name: &str, s: &Service, image: &Image) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = image
            .env
            .iter()
            .chain(&s.environment)
            .map(|(k, v)| (k.clone(), self.rewrite(name, v)))
            .collect();
        if self.postgres.is_none() {
            for (k, v) in &mut env {
                if k == "STAGECOACH_DATABASE_URL" && v.starts_with("postgres") {
                    *v = format!("sqlite://{}", self.dir.join(format!("{name}.db")).display());
                }
            }
        }
        for (k, v) in &env {
            self.assert_mapped(name, k, v);
        }
        env
    }

    pub fn command(&self, name: &str, s: &Service, image: &Image, argv: &[String]) -> Command {
        let program = match argv[0].as_str() {
            "coordinator" => binaries().coordinator.clone(),
            "worker" => binaries().worker.clone(),
            other => panic!("service {name} runs {other:?}, which this test cannot start"),
        };
        let args: Vec<String> = argv[1..].iter().map(|a| self.rewrite(name, a)).collect();
        for arg in &args {
            self.assert_mapped(name, "argument", arg);
        }
        let mut cmd = Command::new(program);
        cmd.args(args)
            // A container starts with its image's environment, not ours.
            .env_clear()
            .envs(self.environment(name, s, image))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }
}

/// A started service process; killed when dropped, printing its log if the
/// test failed.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn start(name: &str, mut cmd: Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = File::create(&log).expect("create a log file");
        cmd.stdout(file.try_clone().expect("dup the log"))
            .stderr(file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited ({status}); its log:\n{}",
                self.name,
                tail(&self.log, 100)
            );
        }
    }

    /// SIGTERM, as `docker compose stop` sends; waits for the exit.
    pub async fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(pid) = self.child.id() {
            let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
            // SAFETY: kill(2) only sends a signal, to our own child, which
            // has not been reaped (its id is still known).
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        tokio::time::timeout(Duration::from_secs(40), self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!(
                "===== {} ({}) =====\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 200)
            );
        }
    }
}

/// Runs a one-shot command to its end; returns its status and output.
pub async fn run_once(
    name: &str,
    cmd: Command,
    dir: &Path,
    timeout: Duration,
) -> (ExitStatus, String) {
    let mut p = Proc::start(name, cmd, dir);
    let status = tokio::time::timeout(timeout, p.child.wait())
        .await
        .unwrap_or_else(|_| panic!("{name} did not finish within {timeout:?}:\n{}", p.logs()))
        .expect("wait for the process");
    let out = p.logs();
    (status, out)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn host_port(value: &str) -> u16 {
    value
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{value:?} ends in no port"))
}

/// Whether PostgreSQL's server binaries are here, where the helper looks.
pub fn postgres_installed() -> bool {
    let has = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    std::env::var_os("STAGECOACH_PG_BIN").is_some()
        || std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).any(|d| has(&d))
        || std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| has(&e.path().join("bin")))
}

/// Starts the throwaway server and creates what the `postgres` service's
/// environment asks the official image to create; returns its port.
pub async fn start_postgres(service: &Service) -> u16 {
    let user = service.env("POSTGRES_USER").unwrap_or("postgres");
    let password = service.env("POSTGRES_PASSWORD").unwrap_or_default();
    let database = service.env("POSTGRES_DB").unwrap_or(user);
    let server = tokio::task::spawn_blocking(postgres::server)
        .await
        .expect("start the test PostgreSQL");
    let admin = server.url("postgres");
    let port = host_port(admin.rsplit_once('/').expect("a URL with a database").0);
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
        .await
        .expect("connect to the test PostgreSQL");
    for statement in [
        // As the official image does: POSTGRES_USER is a superuser.
        format!("CREATE ROLE \"{user}\" SUPERUSER LOGIN PASSWORD '{password}'"),
        format!("CREATE DATABASE \"{database}\" OWNER \"{user}\""),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement.clone()))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    port
}

/// Runs `service`'s health check until it exits 0.
pub async fn wait_healthy(
    local: &Local,
    name: &str,
    s: &Service,
    image: &Image,
    coordinator: &mut Proc,
) {
    let check = s.healthcheck.as_ref().expect("a health check");
    let deadline = Instant::now() + HEALTH_PATIENCE;
    loop {
        coordinator.assert_running();
        let cmd = local.command(name, s, image, check);
        let (status, out) = run_once(
            &format!("{name}-health"),
            cmd,
            &local.dir,
            Duration::from_secs(15),
        )
        .await;
        if status.success() {
            assert!(out.contains("SERVING"), "{name}: {out}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}'s health check {check:?} did not pass within {HEALTH_PATIENCE:?}: {status}\n{out}"
        );
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

/// The workers connected to each coordinator.
pub async fn connected(clients: &[(&str, Client)]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for (name, client) in clients {
        let ids = client
            .list_workers()
            .await
            .map(|ws| ws.into_iter().map(|w| w.worker_id).collect())
            .unwrap_or_default();
        out.insert(name.to_string(), ids);
    }
    out
}

pub async fn wait_connected(
    what: &str,
    clients: &[(&str, Client)],
    cond: impl Fn(&BTreeMap<String, BTreeSet<String>>) -> bool,
    workers: &mut [Proc],
) -> BTreeMap<String, BTreeSet<String>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = connected(clients).await;
        if cond(&now) {
            return now;
        }
        for w in workers.iter_mut() {
            w.assert_running();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
