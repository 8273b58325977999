//! The `worker` binary: the SDK with every built-in handler registered.
//! It only parses flags, sets up logging and waits for a signal; everything
//! else lives in the library.
//!
//! Two small tools share the binary, so one container image has all an
//! operator needs: `worker health-check` ([`health`]) and `worker
//! sample` ([`sample`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use stagecoach_worker::Worker;
use tracing_subscriber::EnvFilter;

mod health;
mod sample;
mod tls;

/// Runs Stagecoach tasks: subscribes to a coordinator, runs the built-in
/// handlers (noop, sleep, fail, panic, hang, and the sample project export), and drains
/// gracefully on SIGINT or SIGTERM.
#[derive(Debug, Parser)]
#[command(name = "worker", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    run: Args,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ask a coordinator's grpc.health.v1 service; exit 0 only if SERVING
    /// (for container health checks).
    HealthCheck(health::HealthArgs),
    /// Run the sample project export on a running cluster and wait for it:
    /// creates a source database in the shared directory, puts the plan,
    /// creates the migration, exits 0 if it succeeds.
    Sample(sample::SampleArgs),
}

/// Settings of the worker itself (no subcommand).
#[derive(Debug, clap::Args)]
struct Args {
    /// gRPC address of the coordinator; several coordinators sharing one
    /// database as a comma-separated list (the worker streams from one and
    /// fails over to the others).
    #[arg(
        long,
        env = "STAGECOACH_COORDINATOR",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: Vec<String>,

    /// Tasks run at once (1-10000).
    #[arg(long, env = "STAGECOACH_WORKER_SLOTS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    slots: u32,

    #[arg(
        long,
        env = "STAGECOACH_SHARED_DIR",
        help = "Directory shared by every worker, where the sample export writes [default: <tmp>/stagecoach-shared]"
    )]
    shared_dir: Option<PathBuf>,

    #[arg(
        long,
        env = "STAGECOACH_WORKER_ID",
        help = "Stable id of this worker [default: <hostname>-<pid>-<random>]"
    )]
    worker_id: Option<String>,

    /// Free text shown to operators [default: the host name].
    #[arg(long, env = "STAGECOACH_WORKER_NAME")]
    name: Option<String>,

    /// Bearer token, when the coordinator requires one (a `worker` role
    /// token from `coordinator token create`).
    #[arg(long, env = "STAGECOACH_TOKEN", hide_env_values = true)]
    token: Option<String>,

    #[command(flatten)]
    tls: tls::TlsArgs,

    /// A file holding the bearer token (its first line), instead of
    /// --token: keeps the secret out of the process list.
    #[arg(long, env = "STAGECOACH_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,

    /// Seconds in-flight tasks get to finish on shutdown before they are
    /// canceled.
    #[arg(long, env = "STAGECOACH_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    drain_timeout_secs: u64,

    /// Log format (the level comes from RUST_LOG, default info).
    #[arg(long, env = "STAGECOACH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => {
            init_logging(cli.run.log_format, "info");
            run(cli.run).await.map(|()| ExitCode::SUCCESS)
        }
        Some(Command::HealthCheck(args)) => health::run(args).await,
        Some(Command::Sample(args)) => {
            init_logging(LogFormat::Text, "warn");
            sample::run(args).await
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One readable line (with its causes) rather than a backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shared_dir = args
        .shared_dir
        .unwrap_or_else(|| std::env::temp_dir().join("stagecoach-shared"));
    let coordinators = args
        .coordinator
        .iter()
        .map(|c| c.trim())
        .filter(|c| !c.is_empty());
    let mut builder = Worker::builder()
        .coordinators(coordinators)
        .slots(args.slots)
        .drain_timeout(Duration::from_secs(args.drain_timeout_secs));
    if let Some(id) = args.worker_id {
        builder = builder.worker_id(id);
    }
    if let Some(name) = args.name {
        builder = builder.name(name);
    }
    let token = match (args.token, args.token_file) {
        (Some(token), _) => Some(token),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("--token-file {}: cannot read it", path.display()))?;
            let token = text.lines().next().unwrap_or_default().trim().to_string();
            if token.is_empty() {
                anyhow::bail!("--token-file {}: the file is empty", path.display());
            }
            Some(token)
        }
        (None, None) => None,
    };
    if let Some(token) = token {
        builder = builder.token(token);
    }
    if let Some(tls) = args.tls.load()? {
        builder = builder.tls(tls);
    }
    let worker = stagecoach_handlers::register_builtin(builder, shared_dir.clone())
        .build()
        .context("invalid worker configuration")?;
    std::fs::create_dir_all(&shared_dir).with_context(|| {
        format!(
            "cannot create the shared directory {}",
            shared_dir.display()
        )
    })?;
    tracing::info!(shared_dir = %shared_dir.display(), "built-in handlers registered");

    worker.run(shutdown_signal()).await?;
    Ok(())
}

fn init_logging(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes in files and `docker logs`.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received; shutting down"),
        () = terminate => tracing::info!("SIGTERM received; shutting down"),
    }
}
