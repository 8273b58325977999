//! `worker sample`: runs the sample project export on a running cluster and
//! waits for it — the docker-compose `sample` service.
//!
//! It creates the sample source database in the directory the workers share
//! (so every worker can read it at the same path), puts the sample plan,
//! creates the migration and polls it until it ends, printing each stage's
//! progress. Polling `GetMigration`, rather than following `WatchMigration`,
//! lets it switch to another coordinator between two polls if the one it
//! talks to goes away. It exits 0 only if the migration succeeded.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use stagecoach_handlers::sample;
use stagecoach_proto::json::json_to_struct;
use stagecoach_proto::v1::{self as pb, migration_service_client::MigrationServiceClient};
use stagecoach_worker::tls::coordinator_endpoint;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// How long to keep trying to reach some coordinator at start.
const CONNECT_PATIENCE: Duration = Duration::from_secs(60);
/// How often to ask for the migration's progress.
const POLL: Duration = Duration::from_millis(500);

/// Settings of `worker sample`.
#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// gRPC addresses of the coordinators, comma-separated; any one that
    /// answers is used.
    #[arg(
        long,
        env = "STAGECOACH_COORDINATOR",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: Vec<String>,

    #[arg(
        long,
        env = "STAGECOACH_SHARED_DIR",
        help = "Directory shared by every worker; the source database and the archive go there [default: <tmp>/stagecoach-shared]"
    )]
    shared_dir: Option<PathBuf>,

    /// The migration's subject (one unfinished run per subject).
    #[arg(long, default_value = "project/sample")]
    subject: String,

    /// Size of the sample source database (1 = some thousands of rows).
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    scale: u32,

    /// Seconds to wait for the migration to end.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,

    /// Bearer token, when the coordinator requires one.
    #[arg(long, env = "STAGECOACH_TOKEN", hide_env_values = true)]
    token: Option<String>,

    #[command(flatten)]
    tls: crate::tls::TlsArgs,
}

/// Runs the sample; success only if the migration succeeded.
pub async fn run(args: SampleArgs) -> anyhow::Result<ExitCode> {
    let cluster = Cluster::new(&args)?;
    let shared = args
        .shared_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("stagecoach-shared"));
    let source_dir = shared.join("sample");
    std::fs::create_dir_all(&source_dir)
        .with_context(|| format!("cannot create {}", source_dir.display()))?;
    let source_dir = std::path::absolute(&source_dir)?;
    // A new file per run: an earlier run may still be reading its own.
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let source =
        sample::create_source_database(&source_dir.join(format!("source-{stamp}.db")), args.scale)
            .await
            .context("creating the sample source database")?;
    println!(
        "source      {} ({} tables, {} rows)",
        source.path.display(),
        source.tables.len(),
        source.total_rows()
    );

    let plan = cluster
        .call(|mut c, auth| {
            let mut request = Request::new(pb::PutPlanRequest {
                source: Some(pb::put_plan_request::Source::PlanJson(
                    sample::plan_json().to_string(),
                )),
            });
            authorize(&mut request, auth);
            async move { Ok(c.put_plan(request).await?.into_inner().plan) }
        })
        .await
        .context("PutPlan")?
        .context("PutPlan returned no plan")?;
    let parameters = serde_json::json!({ "source": source.path.display().to_string() });
    let subject = args.subject.clone();
    let created = cluster
        .call(|mut c, auth| {
            let mut request = Request::new(pb::CreateMigrationRequest {
                plan_source: Some(pb::create_migration_request::PlanSource::PlanName(
                    plan.name.clone(),
                )),
                subject: subject.clone(),
                parameters: Some(json_to_struct(&parameters)),
                ..Default::default()
            });
            authorize(&mut request, auth);
            async move { Ok(c.create_migration(request).await?.into_inner().migration) }
        })
        .await
        .map_err(|status| match status.code() {
            Code::AlreadyExists => anyhow::anyhow!(
                "{}; wait for it to end or pass another --subject",
                status.message()
            ),
            _ => anyhow::Error::new(status).context("CreateMigration"),
        })?
        .context("CreateMigration returned no migration")?;
    println!(
        "migration   {} of plan {} v{} for {}",
        created.id, plan.name, plan.version, created.subject
    );

    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut shown = Vec::new();
    let migration = loop {
        let id = created.id;
        let polled = cluster
            .call(|mut c, auth| {
                let mut request = Request::new(pb::GetMigrationRequest { migration_id: id });
                authorize(&mut request, auth);
                async move { Ok(c.get_migration(request).await?.into_inner().migration) }
            })
            .await;
        match polled {
            Ok(Some(m)) => {
                show_progress(&m, started, &mut shown);
                if terminal(m.state) {
                    break m;
                }
            }
            Ok(None) => bail!("GetMigration returned no migration"),
            // Every coordinator unreachable for a moment: keep waiting.
            Err(status) if is_unreachable(status.code()) => {
                eprintln!("no coordinator answered ({}); retrying", status.message());
            }
            Err(status) => return Err(anyhow::Error::new(status).context("GetMigration")),
        }
        if Instant::now() > deadline {
            bail!(
                "migration {id} did not end within {}s (it goes on; follow it with grpcurl)",
                args.timeout_secs
            );
        }
        tokio::time::sleep(POLL).await;
    };

    let elapsed = started.elapsed().as_secs_f64();
    if migration.state != pb::MigrationState::Succeeded as i32 {
        println!(
            "migration {} {} after {elapsed:.2}s: {}",
            migration.id,
            state_name(migration.state),
            migration.reason
        );
        return Ok(ExitCode::FAILURE);
    }
    let archive = sample::archive_path(&shared, migration.id);
    let archive = std::path::absolute(&archive).unwrap_or(archive);
    println!(
        "migration {} succeeded in {elapsed:.2}s\n  archive   {}",
        migration.id,
        archive.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The coordinators, tried in order for each call.
struct Cluster {
    channels: Vec<(String, Channel)>,
    authorization: Option<MetadataValue<Ascii>>,
}

type Client = MigrationServiceClient<Channel>;

impl Cluster {
    fn new(args: &SampleArgs) -> anyhow::Result<Self> {
        let tls = args.tls.load()?;
        let mut channels = Vec::new();
        for url in args
            .coordinator
            .iter()
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
        {
            let endpoint = coordinator_endpoint(url, tls.as_ref())
                .map_err(|reason| anyhow::anyhow!("--coordinator {url:?}: {reason}"))?
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(30));
            channels.push((url.to_string(), endpoint.connect_lazy()));
        }
        if channels.is_empty() {
            bail!("--coordinator: give at least one address");
        }
        let authorization = args
            .token
            .as_ref()
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .context("--token contains characters not allowed in an HTTP header")?;
        Ok(Self {
            channels,
            authorization,
        })
    }

    /// Runs `call` on each coordinator in turn until one answers (at
    /// first, for up to a minute, so the sample may start with the
    /// cluster); returns that answer or the last failure to reach one.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, tonic::Status>
    where
        F: Fn(Client, Option<&MetadataValue<Ascii>>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let give_up = Instant::now() + CONNECT_PATIENCE;
        loop {
            let mut last = None;
            for (url, channel) in &self.channels {
                match call(Client::new(channel.clone()), self.authorization.as_ref()).await {
                    Err(status) if is_unreachable(status.code()) => {
                        eprintln!("{url}: {}", status.message());
                        last = Some(status);
                    }
                    answered => return answered,
                }
            }
            if Instant::now() > give_up {
                return Err(last.expect("at least one coordinator"));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

fn authorize<T>(request: &mut Request<T>, auth: Option<&MetadataValue<Ascii>>) {
    if let Some(auth) = auth {
        request.metadata_mut().insert("authorization", auth.clone());
    }
}

fn is_unreachable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
    )
}

fn terminal(state: i32) -> bool {
    [
        pb::MigrationState::Succeeded,
        pb::MigrationState::Failed,
        pb::MigrationState::Canceled,
    ]
    .iter()
    .any(|s| *s as i32 == state)
}

/// Prints a stage's line when its counts change.
fn show_progress(m: &pb::Migration, started: Instant, shown: &mut Vec<(i32, u32, u32, u32)>) {
    shown.resize(m.stages.len(), (0, 0, 0, 0));
    for (s, last) in m.stages.iter().zip(shown.iter_mut()) {
        let now = (s.state, s.succeeded, s.running, s.total);
        if s.state == pb::StageState::Pending as i32 || *last == now {
            continue;
        }
        *last = now;
        println!(
            "  {:>6.2}s  stage {}/{} {:<8} {:>3}/{:<3} done  {:>2} running  {}",
            started.elapsed().as_secs_f64(),
            s.index + 1,
            m.stages.len(),
            s.name,
            s.succeeded,
            s.total,
            s.running,
            pb::StageState::try_from(s.state)
                .map(|s| s.as_str_name())
                .unwrap_or("?")
        );
    }
}

fn state_name(state: i32) -> &'static str {
    pb::MigrationState::try_from(state)
        .map(|s| s.as_str_name())
        .unwrap_or("in an unknown state")
}
