//! Configuration: one typed struct, from flags with `STAGECOACH_…`
//! environment fallbacks and sane defaults, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::domain::{MAX_STAGES, MAX_STATIC_TASKS, RequestLimits};
use crate::engine::Timing;
use crate::store::Limits;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings of `coordinator serve`.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on (use port 0 for an ephemeral port).
    #[arg(long, env = "STAGECOACH_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Address of the HTTP port (`/metrics`, the dashboard at `/`,
    /// `/healthz`), or `off`.
    #[arg(long, env = "STAGECOACH_HTTP_LISTEN", default_value = "127.0.0.1:9464")]
    pub http_listen: HttpListen,
    /// Database URL: `sqlite://PATH` (created if missing), a plain path, or
    /// `postgres://USER:PASSWORD@HOST:PORT/DB` (several coordinators may share it).
    #[arg(
        long,
        env = "STAGECOACH_DATABASE_URL",
        default_value = "sqlite://stagecoach.db"
    )]
    pub database: String,
    /// How often workers send heartbeats, in milliseconds.
    #[arg(
        long,
        env = "STAGECOACH_HEARTBEAT_INTERVAL_MS",
        default_value_t = 1_000
    )]
    pub heartbeat_interval_ms: u64,
    /// How long a lease lasts without a heartbeat, in milliseconds.
    #[arg(long, env = "STAGECOACH_LEASE_DURATION_MS", default_value_t = 10_000)]
    pub lease_duration_ms: u64,
    /// How often to sweep for expired leases, due retries and deadlines, in milliseconds.
    #[arg(long, env = "STAGECOACH_SWEEP_INTERVAL_MS", default_value_t = 500)]
    pub sweep_interval_ms: u64,
    /// Slots of the `default` pool when it is first created.
    #[arg(long, env = "STAGECOACH_DEFAULT_POOL_SLOTS", default_value_t = 10)]
    pub default_pool_slots: u32,
    /// Lease expiries a task survives: after each of the first N it is
    /// assigned again (N + 1 assignments at most), and the next expiry makes
    /// it dead, failing its migration with "lost its worker N+1 times". 0:
    /// the first expiry does. Reported failures count separately (a stage's
    /// `max_attempts`).
    #[arg(long, env = "STAGECOACH_MAX_REASSIGNMENTS", default_value_t = 5)]
    pub max_reassignments: u32,
    /// Largest request message a client or worker may send, in bytes; a
    /// larger one is refused with `RESOURCE_EXHAUSTED`.
    #[arg(
        long,
        env = "STAGECOACH_MAX_REQUEST_BYTES",
        default_value_t = crate::grpc::DEFAULT_MAX_REQUEST_BYTES
    )]
    pub max_request_bytes: usize,
    /// Largest task payload, migration parameters or completion output, in
    /// bytes of JSON text; a larger one is refused with `INVALID_ARGUMENT`.
    #[arg(
        long,
        env = "STAGECOACH_MAX_PAYLOAD_BYTES",
        default_value_t = RequestLimits::DEFAULT_MAX_PAYLOAD_BYTES
    )]
    pub max_payload_bytes: usize,
    /// Largest checkpoint a heartbeat may carry for one lease, in bytes.
    #[arg(
        long,
        env = "STAGECOACH_MAX_CHECKPOINT_BYTES",
        default_value_t = RequestLimits::DEFAULT_MAX_CHECKPOINT_BYTES
    )]
    pub max_checkpoint_bytes: usize,
    /// Most tasks a plan may declare up front (tasks added at run time are
    /// bounded by `--max-tasks-per-completion`).
    #[arg(
        long,
        env = "STAGECOACH_MAX_TASKS_PER_PLAN",
        default_value_t = RequestLimits::DEFAULT_MAX_TASKS_PER_PLAN
    )]
    pub max_tasks_per_plan: usize,
    /// Most stages a plan may have.
    #[arg(
        long,
        env = "STAGECOACH_MAX_STAGES_PER_PLAN",
        default_value_t = RequestLimits::DEFAULT_MAX_STAGES_PER_PLAN
    )]
    pub max_stages_per_plan: usize,
    /// Most tasks one completion may add to later stages.
    #[arg(
        long,
        env = "STAGECOACH_MAX_TASKS_PER_COMPLETION",
        default_value_t = RequestLimits::DEFAULT_MAX_TASKS_PER_COMPLETION
    )]
    pub max_tasks_per_completion: usize,
    /// Most WatchMigration streams open at once; one more is refused with
    /// `RESOURCE_EXHAUSTED` until another closes.
    #[arg(
        long,
        env = "STAGECOACH_MAX_WATCH_STREAMS",
        default_value_t = RequestLimits::DEFAULT_MAX_WATCH_STREAMS
    )]
    pub max_watch_streams: usize,
    /// Most worker Subscribe streams open at once; one more is refused with
    /// `RESOURCE_EXHAUSTED` until another closes.
    #[arg(
        long,
        env = "STAGECOACH_MAX_WORKER_STREAMS",
        default_value_t = RequestLimits::DEFAULT_MAX_WORKER_STREAMS
    )]
    pub max_worker_streams: usize,
    /// How long a new connection may take to send its HTTP/2 preface (its
    /// first 24 bytes), in milliseconds; a slower one is closed.
    #[arg(
        long,
        env = "STAGECOACH_HANDSHAKE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub handshake_timeout_ms: u64,
    /// How long a connection may stay without a call (no request, no open
    /// stream), in milliseconds, before it is closed; clients connect again
    /// on their next call. 0: idle connections stay open.
    #[arg(long, env = "STAGECOACH_IDLE_TIMEOUT_MS", default_value_t = 300_000)]
    pub idle_timeout_ms: u64,
    /// How often to ping an HTTP/2 connection that sent nothing, in
    /// milliseconds; one that does not answer within
    /// `--keepalive-timeout-ms` is closed (a vanished peer does not hold
    /// its streams and their places for ever). 0: no pings.
    #[arg(
        long,
        env = "STAGECOACH_KEEPALIVE_INTERVAL_MS",
        default_value_t = 30_000
    )]
    pub keepalive_interval_ms: u64,
    /// How long a ping may go unanswered, in milliseconds.
    #[arg(
        long,
        env = "STAGECOACH_KEEPALIVE_TIMEOUT_MS",
        default_value_t = 20_000
    )]
    pub keepalive_timeout_ms: u64,
    /// Log format.
    #[arg(
        long,
        env = "STAGECOACH_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// TLS and mutual TLS (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
    #[command(flatten)]
    pub tls: crate::tls::TlsConfig,
    /// Tokens file: lines `ROLE NAME SHA256HEX` (`coordinator token create`
    /// makes them); every call then needs `authorization: Bearer TOKEN`.
    /// Re-read on SIGHUP.
    #[arg(long, env = "STAGECOACH_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,
    /// Serve without tokens on a non-loopback address (anyone who reaches
    /// the port may run, cancel and report anything).
    #[arg(long, env = "STAGECOACH_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,
}

/// `--http-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpListen {
    Off,
    On(SocketAddr),
}

impl HttpListen {
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            HttpListen::Off => None,
            HttpListen::On(addr) => Some(addr),
        }
    }
}

impl std::str::FromStr for HttpListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(HttpListen::Off);
        }
        s.parse()
            .map(HttpListen::On)
            .map_err(|_| format!("{s:?} is neither an address such as 127.0.0.1:9464 nor `off`"))
    }
}

/// The smallest `--max-request-bytes`: a worker's report or a small plan
/// must always fit.
const MIN_REQUEST_BYTES: usize = 64 << 10;

/// A setting that makes no sense, named with how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {message}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub message: String,
}

impl Config {
    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |flag, message: String| Err(ConfigError { flag, message });
        if self.heartbeat_interval_ms == 0 {
            return err("heartbeat-interval-ms", "must be positive".into());
        }
        if self.lease_duration_ms < 2 * self.heartbeat_interval_ms {
            return err(
                "lease-duration-ms",
                format!(
                    "{} ms must be at least twice the heartbeat interval ({} ms), or one late heartbeat loses the lease",
                    self.lease_duration_ms, self.heartbeat_interval_ms
                ),
            );
        }
        if self.sweep_interval_ms == 0 {
            return err("sweep-interval-ms", "must be positive".into());
        }
        if self.default_pool_slots == 0 {
            return err("default-pool-slots", "must be at least 1".into());
        }
        if self.max_request_bytes < MIN_REQUEST_BYTES {
            return err(
                "max-request-bytes",
                format!(
                    "{} is less than {MIN_REQUEST_BYTES}, too small for ordinary requests; the default is {}",
                    self.max_request_bytes,
                    crate::grpc::DEFAULT_MAX_REQUEST_BYTES
                ),
            );
        }
        let positive = [
            ("max-payload-bytes", self.max_payload_bytes),
            ("max-checkpoint-bytes", self.max_checkpoint_bytes),
            ("max-tasks-per-plan", self.max_tasks_per_plan),
            ("max-stages-per-plan", self.max_stages_per_plan),
            ("max-tasks-per-completion", self.max_tasks_per_completion),
            ("max-watch-streams", self.max_watch_streams),
            ("max-worker-streams", self.max_worker_streams),
            ("handshake-timeout-ms", self.handshake_timeout_ms as usize),
            ("keepalive-timeout-ms", self.keepalive_timeout_ms as usize),
        ];
        for (flag, value) in positive {
            if value == 0 {
                return err(flag, "must be at least 1".into());
            }
        }
        if self.max_stages_per_plan > MAX_STAGES {
            return err(
                "max-stages-per-plan",
                format!(
                    "{} is more than {MAX_STAGES}, the most any plan may have",
                    self.max_stages_per_plan
                ),
            );
        }
        if self.max_tasks_per_plan > MAX_STATIC_TASKS {
            return err(
                "max-tasks-per-plan",
                format!(
                    "{} is more than {MAX_STATIC_TASKS}, the most any plan may declare",
                    self.max_tasks_per_plan
                ),
            );
        }
        if self.auth_tokens.is_none() && !self.allow_unauthenticated {
            if !is_loopback(self.listen) {
                return err(
                    "listen",
                    format!(
                        "{} is not a loopback address and no tokens file is given, so anyone who can reach it could run, cancel and report anything; give --auth-tokens FILE (STAGECOACH_AUTH_TOKENS), listen on 127.0.0.1, or pass --allow-unauthenticated",
                        self.listen
                    ),
                );
            }
            if let Some(http) = self.http_listen.addr().filter(|a| !is_loopback(*a)) {
                return err(
                    "http-listen",
                    format!(
                        "{http} is not a loopback address and no tokens file is given, so anyone who can reach it could read every migration, pool and worker; give --auth-tokens FILE (STAGECOACH_AUTH_TOKENS), listen on 127.0.0.1 or `off`, or pass --allow-unauthenticated"
                    ),
                );
            }
        }
        Ok(())
    }

    /// Whether calls go unchecked on an address others can reach: worth a
    /// warning at start.
    pub fn is_open_to_others(&self) -> bool {
        let http_open = self.http_listen.addr().is_some_and(|a| !is_loopback(a));
        self.auth_tokens.is_none() && (!is_loopback(self.listen) || http_open)
    }

    pub fn timing(&self) -> Timing {
        Timing {
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
            lease_duration: Duration::from_millis(self.lease_duration_ms),
            sweep_interval: Duration::from_millis(self.sweep_interval_ms),
        }
    }

    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            max_payload_bytes: self.max_payload_bytes,
            max_checkpoint_bytes: self.max_checkpoint_bytes,
            max_tasks_per_plan: self.max_tasks_per_plan,
            max_stages_per_plan: self.max_stages_per_plan,
            max_tasks_per_completion: self.max_tasks_per_completion,
            max_watch_streams: self.max_watch_streams,
            max_worker_streams: self.max_worker_streams,
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            lease_ms: self.lease_duration_ms as i64,
            heartbeat_interval_ms: self.heartbeat_interval_ms as i64,
            max_reassignments: self.max_reassignments,
        }
    }
}

/// 127.0.0.0/8 and ::1 (also as `::ffff:127.x.y.z`): only this machine can call.
fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// The database URL with any password replaced by `***`, for logs.
pub fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        config: Config,
    }

    fn config(args: &[&str]) -> Config {
        let argv = ["serve"].iter().chain(args);
        Serve::try_parse_from(argv).expect("flags parse").config
    }

    #[test]
    fn the_http_port_is_loopback_unless_tokens_guard_it() {
        assert_eq!(
            config(&[]).http_listen,
            HttpListen::On("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(
            config(&["--http-listen", "off"]).http_listen,
            HttpListen::Off
        );
        let bad = Serve::try_parse_from(["serve", "--http-listen", "everywhere"]);
        let message = bad.err().expect("refused").to_string();
        assert!(
            message.contains("--http-listen") && message.contains("`off`"),
            "{message}"
        );

        let open = config(&["--http-listen", "0.0.0.0:9464"]);
        let refused = open.validate().expect_err("no tokens, not loopback");
        assert_eq!(refused.flag, "http-listen");
        let tokens = ["--auth-tokens", "tokens"];
        let guarded = config(&["--http-listen", "0.0.0.0:9464", tokens[0], tokens[1]]);
        guarded.validate().expect("tokens guard it");
        let opted_in = config(&["--http-listen", "0.0.0.0:9464", "--allow-unauthenticated"]);
        opted_in.validate().expect("the operator chose it");
        assert!(opted_in.is_open_to_others());
    }

    #[test]
    fn passwords_never_reach_the_log() {
        assert_eq!(
            redacted_url("postgres://u:secret@db:5432/x"),
            "postgres://u:***@db:5432/x"
        );
        assert_eq!(redacted_url("postgres://u@db/x"), "postgres://u@db/x");
        assert_eq!(
            redacted_url("sqlite://stagecoach.db"),
            "sqlite://stagecoach.db"
        );
    }
}
