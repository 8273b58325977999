//! `coordinator demo`: the whole system on one machine, in one command.
//!
//! Starts a coordinator on a fresh SQLite file and an ephemeral loopback port,
//! starts local workers (the real worker SDK with the built-in handlers,
//! talking gRPC to the coordinator like remote ones), creates a sample source
//! database, runs the sample project export and prints per-stage progress from
//! the `WatchMigration` stream until the migration finishes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use stagecoach_handlers::{register_builtin, sample};
use stagecoach_proto::json::json_to_struct;
use stagecoach_proto::v1::{self as pb, migration_service_client::MigrationServiceClient};
use stagecoach_worker::Worker;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use stagecoach_coordinator::config::{Config, HttpListen, LogFormat};
use stagecoach_coordinator::domain::RequestLimits;

/// Settings of `coordinator demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Directory for the demo's files: coordinator database, source database,
    /// the workers' shared directory and the archive. Demo files in it are
    /// replaced.
    #[arg(long, default_value = "stagecoach-demo")]
    pub dir: PathBuf,
    /// Local worker processes to start.
    #[arg(long, default_value_t = 3)]
    pub workers: u32,
    /// Slots of each worker.
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
    /// Size of the sample source database (1 = some thousands of rows).
    #[arg(long, default_value_t = 1)]
    pub scale: u32,
    /// Address of the dashboard and `/metrics` (another free port when this
    /// one is taken), or `off`.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub http_listen: HttpListen,
    /// Keep the coordinator, its workers and the dashboard running after
    /// the migration ended, until Ctrl-C.
    #[arg(long)]
    pub stay: bool,
}

/// Runs the demo; `Ok(true)` when the migration succeeded.
pub async fn run(args: DemoArgs, shutdown: CancellationToken) -> anyhow::Result<bool> {
    if args.workers == 0 || args.slots == 0 {
        bail!("--workers and --slots must be at least 1");
    }
    let dir = prepare_dir(&args.dir)?;
    let source = sample::create_source_database(&dir.join("source.db"), args.scale.max(1))
        .await
        .context("creating the sample source database")?;
    let shared = dir.join("shared");

    let config = Config {
        listen: "127.0.0.1:0".parse()?,
        database: format!("sqlite://{}", dir.join("coordinator.db").display()),
        heartbeat_interval_ms: 500,
        lease_duration_ms: 5_000,
        sweep_interval_ms: 250,
        default_pool_slots: 10,
        max_reassignments: 5,
        max_request_bytes: stagecoach_coordinator::grpc::DEFAULT_MAX_REQUEST_BYTES,
        max_payload_bytes: RequestLimits::DEFAULT_MAX_PAYLOAD_BYTES,
        max_checkpoint_bytes: RequestLimits::DEFAULT_MAX_CHECKPOINT_BYTES,
        max_tasks_per_plan: RequestLimits::DEFAULT_MAX_TASKS_PER_PLAN,
        max_stages_per_plan: RequestLimits::DEFAULT_MAX_STAGES_PER_PLAN,
        max_tasks_per_completion: RequestLimits::DEFAULT_MAX_TASKS_PER_COMPLETION,
        max_watch_streams: RequestLimits::DEFAULT_MAX_WATCH_STREAMS,
        max_worker_streams: RequestLimits::DEFAULT_MAX_WORKER_STREAMS,
        handshake_timeout_ms: 10_000,
        idle_timeout_ms: 300_000,
        keepalive_interval_ms: 30_000,
        keepalive_timeout_ms: 20_000,
        // Loopback only, so no tokens are needed.
        auth_tokens: None,
        allow_unauthenticated: false,
        log_format: LogFormat::Text,
        tls: Default::default(),
        http_listen: args.http_listen,
    };
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    let http = match args.http_listen.addr() {
        None => None,
        Some(at) => match tokio::net::TcpListener::bind(at).await {
            Ok(l) => Some(l),
            // A second demo, or a coordinator, has the port: take another.
            Err(_) => Some(tokio::net::TcpListener::bind((at.ip(), 0)).await?),
        },
    };
    let dashboard = http
        .as_ref()
        .map(|l| l.local_addr().map(|a| format!("http://{a}/")))
        .transpose()?;
    let server = tokio::spawn(stagecoach_coordinator::server::run(
        config,
        stagecoach_coordinator::server::Listeners {
            grpc: listener,
            http,
        },
        shutdown.clone(),
        || {},
    ));

    let mut workers = Vec::new();
    for i in 0..args.workers {
        let builder = Worker::builder()
            .coordinator(url.clone())
            .worker_id(format!("demo-worker-{i}"))
            .slots(args.slots);
        let worker = register_builtin(builder, shared.clone()).build()?;
        let stop = shutdown.clone();
        workers.push(tokio::spawn(async move {
            worker.run(async move { stop.cancelled().await }).await
        }));
    }

    println!(
        "Stagecoach demo: a parallel project export on a local coordinator and {} workers",
        args.workers
    );
    println!(
        "  coordinator  {addr} (database {})",
        dir.join("coordinator.db").display()
    );
    println!(
        "  source       {} ({} tables, {} rows)",
        source.path.display(),
        source.tables.len(),
        source.total_rows()
    );
    if let Some(dashboard) = &dashboard {
        println!("  dashboard    {dashboard}");
    }
    let outcome = drive(&url, &source.path, &shutdown).await;
    let ended = Instant::now();
    if args.stay && !shutdown.is_cancelled() {
        println!(
            "\nthe migration ended; coordinator, workers and dashboard keep running (--stay): Ctrl-C stops them"
        );
        shutdown.cancelled().await;
    }
    shutdown.cancel();
    for w in workers {
        if let Ok(Err(e)) = w.await {
            eprintln!("worker stopped with an error: {e}");
        }
    }
    server.await?.context("coordinator")?;
    let (migration, started) = outcome?;

    let elapsed = ended.duration_since(started);
    if migration.state != pb::MigrationState::Succeeded as i32 {
        println!(
            "\nmigration {} {}: {}",
            migration.id,
            state_name(migration.state),
            migration.reason
        );
        return Ok(false);
    }
    let archive = sample::archive_path(&shared, migration.id);
    let bytes = std::fs::metadata(&archive).map(|m| m.len()).unwrap_or(0);
    println!(
        "\nmigration {} succeeded in {:.2}s",
        migration.id,
        elapsed.as_secs_f64()
    );
    println!("  archive   {} ({bytes} bytes)", archive.display());
    println!(
        "  exported  {} tables, {} rows, in parallel on {} slots; verified against the source",
        source.tables.len(),
        source.total_rows(),
        args.workers * args.slots
    );
    Ok(true)
}

/// Creates the directory and removes the files an earlier demo left there.
fn prepare_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    for f in [
        "coordinator.db",
        "coordinator.db-wal",
        "coordinator.db-shm",
        "source.db",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_dir_all(dir.join("shared"));
    Ok(dir)
}

async fn connect(url: &str) -> anyhow::Result<MigrationServiceClient<Channel>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match MigrationServiceClient::connect(url.to_string()).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context("connecting to the demo coordinator");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Puts the sample plan, creates the migration and follows it to the end.
async fn drive(
    url: &str,
    source: &Path,
    shutdown: &CancellationToken,
) -> anyhow::Result<(pb::Migration, Instant)> {
    let mut client = connect(url).await?;
    let plan = client
        .put_plan(pb::PutPlanRequest {
            source: Some(pb::put_plan_request::Source::PlanJson(
                sample::plan_json().to_string(),
            )),
        })
        .await?
        .into_inner()
        .plan
        .context("PutPlan returned no plan")?;
    let started = Instant::now();
    let created = client
        .create_migration(pb::CreateMigrationRequest {
            plan_source: Some(pb::create_migration_request::PlanSource::PlanName(
                plan.name.clone(),
            )),
            subject: "project/demo".into(),
            parameters: Some(json_to_struct(
                &serde_json::json!({ "source": source.display().to_string() }),
            )),
            ..Default::default()
        })
        .await?
        .into_inner()
        .migration
        .context("CreateMigration returned no migration")?;
    println!(
        "\nmigration {} of plan {} v{} for {}",
        created.id, plan.name, plan.version, created.subject
    );

    let mut stream = client
        .watch_migration(pb::WatchMigrationRequest {
            migration_id: created.id,
            after_event_id: 0,
        })
        .await?
        .into_inner();
    let mut shown: HashMap<u32, (i32, u32, u32, u32)> = HashMap::new();
    let mut last = created;
    loop {
        let msg = tokio::select! {
            m = stream.message() => m?,
            _ = shutdown.cancelled() => bail!("interrupted"),
        };
        let Some(msg) = msg else { break };
        let Some(m) = msg.migration else { continue };
        let count = m.stages.len();
        for s in &m.stages {
            let key = (s.state, s.succeeded, s.running, s.total);
            if s.state == pb::StageState::Pending as i32 || shown.get(&s.index) == Some(&key) {
                continue;
            }
            shown.insert(s.index, key);
            println!(
                "  {:>6.2}s  stage {}/{} {:<8} {:>3}/{:<3} done  {:>2} running  {}",
                started.elapsed().as_secs_f64(),
                s.index + 1,
                count,
                s.name,
                s.succeeded,
                s.total,
                s.running,
                stage_state_name(s.state)
            );
        }
        last = m;
    }
    Ok((last, started))
}

fn state_name(s: i32) -> &'static str {
    match pb::MigrationState::try_from(s) {
        Ok(pb::MigrationState::Succeeded) => "succeeded",
        Ok(pb::MigrationState::Failed) => "failed",
        Ok(pb::MigrationState::Canceled) => "canceled",
        Ok(pb::MigrationState::Running) => "running",
        Ok(pb::MigrationState::Queued) => "queued",
        _ => "unknown",
    }
}

fn stage_state_name(s: i32) -> &'static str {
    match pb::StageState::try_from(s) {
        Ok(pb::StageState::Running) => "running",
        Ok(pb::StageState::Succeeded) => "succeeded",
        Ok(pb::StageState::Failed) => "failed",
        Ok(pb::StageState::Canceled) => "canceled",
        _ => "pending",
    }
}
