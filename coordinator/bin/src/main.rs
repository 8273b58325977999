//! The `coordinator` binary: parse the command line, set up logging, and hand
//! over to `server::run` or `demo::run`.

use clap::{Parser, Subcommand};
use stagecoach_coordinator::auth::{Role, new_token};
use stagecoach_coordinator::config::{Config, LogFormat};
use stagecoach_coordinator::server;
use tokio_util::sync::CancellationToken;

mod demo;

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "The Stagecoach coordinator: multi-stage migrations on a worker fleet"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API (migrations, workers, admin, health, reflection).
    // Boxed: the settings are far larger than the other commands.
    Serve(Box<Config>),
    /// Make bearer tokens for `serve --auth-tokens FILE`.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run a whole local system on a fresh SQLite file with the sample export migration.
    Demo(demo::DemoArgs),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a fresh random token on the first line of stdout, and on the
    /// second the line to append to the tokens file (it holds the token's
    /// SHA-256, not the token).
    Create {
        /// admin (everything), client (MigrationService), worker
        /// (WorkerService), viewer (read-only calls).
        #[arg(long)]
        role: Role,
        /// Who holds it; the event log names it for every action taken with it.
        #[arg(long)]
        name: String,
        /// A worker token only: the worker ids it may act as, comma-separated,
        /// each exact or a prefix ending in '*' (e.g. "eu-*,backup-1").
        #[arg(long)]
        worker_ids: Option<String>,
    },
}

fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            signal().await;
            shutdown.cancel();
        });
    }
    match cli.command {
        Command::Serve(config) => {
            init_logging(config.log_format, "info");
            config.validate()?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|e| anyhow::anyhow!("--listen {}: cannot bind: {e}", config.listen))?;
            let addr = listener.local_addr()?;
            let http = match config.http_listen.addr() {
                None => None,
                Some(at) => Some(tokio::net::TcpListener::bind(at).await.map_err(|e| {
                    anyhow::anyhow!(
                        "--http-listen {at}: cannot bind: {e}; give another address, or `off`"
                    )
                })?),
            };
            let http_addr = http.as_ref().map(|l| l.local_addr()).transpose()?;
            let database = stagecoach_coordinator::config::redacted_url(&config.database);
            // Every setting but secrets: the tokens file holds only hashes,
            // and the database URL's password is masked.
            tracing::info!(
                %addr,
                http = ?http_addr,
                %database,
                ?config.log_format,
                auth_tokens = ?config.auth_tokens,
                config.allow_unauthenticated,
                config.heartbeat_interval_ms,
                config.lease_duration_ms,
                config.sweep_interval_ms,
                config.default_pool_slots,
                config.max_reassignments,
                config.max_request_bytes,
                limits = ?config.request_limits(),
                "coordinator starting"
            );
            // Printed once the store is open: scripts and tests wait for the
            // first line.
            let ready = move || {
                println!("stagecoach coordinator listening on {addr}");
                if let Some(http) = http_addr {
                    println!("stagecoach coordinator http on {http}");
                }
            };
            let listeners = server::Listeners {
                grpc: listener,
                http,
            };
            server::run(*config, listeners, shutdown, ready).await?;
        }
        Command::Token(TokenCommand::Create {
            role,
            name,
            worker_ids,
        }) => {
            let (token, line) = new_token(role, &name, worker_ids.as_deref())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            // One write, so `| head -1` gets both lines or neither and a
            // reader that stops after the token is no error.
            let out = format!("{token}\n{line}\n");
            match std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
                _ => {}
            }
        }
        Command::Demo(args) => {
            init_logging(LogFormat::Text, "warn");
            let ok = demo::run(args, shutdown).await?;
            if !ok {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
