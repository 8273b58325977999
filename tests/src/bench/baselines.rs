//! Baselines measured in the same run on the same machine, so a figure can
//! be read as a fraction of what the hardware does without Stagecoach:
//!
//! - **echo**: `grpc.health.v1.Health/Check` of `tonic-health` served in
//!   process (its own runtime on its own thread), called with the same
//!   concurrency as the throughput workers (workers × slots, over one
//!   HTTP/2 connection per worker): round trips per second.
//! - **sqlx tx**: single-row `UPDATE` transactions on one connection, one
//!   after another. SQLite: a file beside the coordinators' with WAL and
//!   `synchronous=FULL`, like the coordinator's store (whose single writer
//!   also commits one transaction at a time); PostgreSQL: the same server
//!   the coordinators use, default settings (`fsync`, synchronous commit).
//!   Commits per second, and each commit's latency (p50, p99): every stage
//!   transition and every start is at least one such commit, so a latency
//!   tail the disk gives a bare transaction shows here beside theirs.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, PgConnection, SqliteConnection};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::options::Backend;
use super::scenarios::{Env, connect};
use super::stats::{Latency, ms};

/// Rows of the baseline table; updates walk over them.
const ROWS: i64 = 1_000;

/// Health/Check round trips per second with `connections` × `per_connection`
/// callers, for `duration`.
pub async fn echo(
    connections: u32,
    per_connection: u32,
    duration: Duration,
) -> anyhow::Result<f64> {
    let server = EchoServer::start()?;
    let result = echo_clients(&server.url(), connections, per_connection, duration).await;
    server.stop();
    result
}

async fn echo_clients(
    url: &str,
    connections: u32,
    per_connection: u32,
    duration: Duration,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let mut callers = JoinSet::new();
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(HealthClient::new(connect(url).await?));
    }
    // A short warm-up opens every stream window before the clock starts.
    for c in &clients {
        c.clone()
            .check(HealthCheckRequest::default())
            .await
            .context("Health/Check")?;
    }
    let start = Instant::now();
    let end = start + duration;
    for client in &clients {
        for _ in 0..per_connection {
            let (mut client, done) = (client.clone(), done.clone());
            callers.spawn(async move {
                while Instant::now() < end {
                    client.check(HealthCheckRequest::default()).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, tonic::Status>(())
            });
        }
    }
    while let Some(r) = callers.join_next().await {
        r?.context("Health/Check")?;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// A tonic server with only the health service, on its own runtime and
/// thread so its work does not share the clients' scheduler.
struct EchoServer {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl EchoServer {
    fn start() -> anyhow::Result<EchoServer> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("bench-echo")
            .build()?;
        let thread = std::thread::Builder::new()
            .name("bench-echo".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return eprintln!("bench: echo listener: {e}"),
                    };
                    // Accepted sockets get TCP_NODELAY, as `Server::serve`
                    // would set: a bare tonic server at its best.
                    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                    let (_reporter, health) = tonic_health::server::health_reporter();
                    let served = tonic::transport::Server::builder()
                        .add_service(health)
                        .serve_with_incoming_shutdown(incoming, async {
                            let _ = stopped.await;
                        })
                        .await;
                    if let Err(e) = served {
                        eprintln!("bench: echo server: {e}");
                    }
                })
            })?;
        Ok(EchoServer { addr, stop, thread })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// What the sqlx baseline measured.
#[derive(Debug, Clone, Copy)]
pub struct SqlxTx {
    pub tx_per_s: f64,
    /// Latency of one transaction, `BEGIN` to the end of `COMMIT`.
    pub latency: Latency,
}

/// Runs single-row `UPDATE` transactions on `$conn` for `$duration`;
/// evaluates to a [`SqlxTx`]. A macro rather than a function generic over
/// the sqlx database: the two backends differ only in placeholders.
macro_rules! updates {
    ($conn:expr, $duration:expr, $insert:literal, $update:literal) => {{
        let conn = $conn;
        sqlx::query("CREATE TABLE bench (id BIGINT PRIMARY KEY, n BIGINT NOT NULL)")
            .execute(&mut *conn)
            .await
            .context("create the baseline table")?;
        let mut tx = conn.begin().await?;
        for id in 0..ROWS {
            sqlx::query($insert).bind(id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        let start = Instant::now();
        let mut samples = Vec::new();
        while start.elapsed() < $duration {
            let began = Instant::now();
            let mut tx = conn.begin().await?;
            sqlx::query($update)
                .bind(samples.len() as i64 % ROWS)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            samples.push(ms(began.elapsed()));
        }
        SqlxTx {
            tx_per_s: samples.len() as f64 / start.elapsed().as_secs_f64(),
            latency: Latency::of(&samples)?,
        }
    }};
}

/// Single-row update transactions on `backend`, one after another, for
/// `duration`.
pub async fn sqlx_tx(env: &Env, backend: Backend, duration: Duration) -> anyhow::Result<SqlxTx> {
    let scratch = env.scratch(&format!("{}-sqlx", backend.name()));
    Ok(match backend {
        Backend::Sqlite => {
            std::fs::create_dir_all(&scratch)?;
            let mut conn = sqlite(&scratch).await?;
            updates!(
                &mut conn,
                duration,
                "INSERT INTO bench (id, n) VALUES (?, 0)",
                "UPDATE bench SET n = n + 1 WHERE id = ?"
            )
        }
        Backend::Postgres => {
            let url = env.database(backend, &scratch).await?;
            let mut conn = PgConnection::connect(&url).await?;
            updates!(
                &mut conn,
                duration,
                "INSERT INTO bench (id, n) VALUES ($1, 0)",
                "UPDATE bench SET n = n + 1 WHERE id = $1"
            )
        }
    })
}

async fn sqlite(dir: &Path) -> anyhow::Result<SqliteConnection> {
    let url = format!("sqlite://{}", dir.join("baseline.db").display());
    let options = SqliteConnectOptions::from_str(&url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full);
    Ok(SqliteConnection::connect_with(&options).await?)
}
