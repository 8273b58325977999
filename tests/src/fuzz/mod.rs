//! `fuzz`: drives a live coordinator (a real process on loopback, with two
//! real workers) with generated hostile input for a bounded count or time,
//! and checks that it never crashes, never answers merely-bad input with
//! `INTERNAL` or `UNKNOWN`, stays SERVING, keeps its memory bounded, and
//! that the invariant checker passes on every migration at the end.
//!
//! | module | what it holds |
//! |---|---|
//! | [`values`] | hostile field values: numbers, strings, Structs, timestamps |
//! | [`calls`] | one generated request of each of the 22 RPCs, and sending it |
//! | [`raw`] | TCP garbage, broken HTTP/2 prefaces, garbage gRPC frames |
//! | [`checks`] | health, RSS, and the named list of known findings |
//! | [`report`] | the counts and the table printed at the end |
//!
//! Request number `n` of a run with seed `S` is generated from its own RNG,
//! seeded from `S` and `n`, so a violation names both; the request's ids
//! are drawn from what the run learned so far, so a replay with the same
//! seed and concurrency 1 generates the same requests.

pub mod calls;
pub mod checks;
pub mod http;
pub mod raw;
pub mod report;
pub mod values;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::backend::Backend;
use crate::checker::check_invariants;
use crate::client::Client;
use crate::cluster::FAST;
use crate::process::{Coordinator, Worker};
use calls::{Call, Known, good_plan, is_server_fault};
use http::HttpProbe;
use raw::Raw;
pub use report::Report;

/// The fuzzer's flags.
#[derive(Debug, Clone, Parser)]
#[command(name = "fuzz", about = "Hostile input against a live coordinator")]
pub struct Options {
    /// `sqlite` or `postgres` (a throwaway server, started here).
    #[arg(long, value_parser = parse_backend, default_value = "sqlite")]
    pub backend: Backend,
    /// Stop after this many requests.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Stop after this long (`90s`, `10m`, `1h`).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// The run's seed; a random one (printed) when not given.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Fail when the coordinator's RSS goes over this many MiB.
    #[arg(long, default_value_t = 512)]
    pub max_rss_mb: u64,
    /// Per thousand requests, how many are raw frames rather than gRPC.
    #[arg(long, default_value_t = 30)]
    pub raw_per_mille: u32,
    /// Per thousand requests, how many go to the HTTP port (metrics,
    /// dashboard, its API).
    #[arg(long, default_value_t = 30)]
    pub http_per_mille: u32,
}

impl Options {
    /// A short run for tests.
    pub fn smoke(backend: Backend, duration: Duration) -> Options {
        Options {
            backend,
            requests: None,
            duration: Some(duration),
            seed: None,
            concurrency: 4,
            max_rss_mb: 512,
            raw_per_mille: 30,
            http_per_mille: 30,
        }
    }
}

pub fn parse_backend(s: &str) -> Result<Backend, String> {
    match s {
        "sqlite" => Ok(Backend::Sqlite),
        "postgres" | "postgresql" => Ok(Backend::Postgres),
        _ => Err(format!("unknown backend {s:?}: sqlite or postgres")),
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        "ms" => Ok(Duration::from_millis(n)),
        _ => Err(format!("bad duration unit in {s:?}: ms, s, m or h")),
    }
}

/// What the request tasks and the monitor share.
struct Shared {
    seed: u64,
    url: String,
    limit: u64,
    deadline: Option<Instant>,
    raw_per_mille: u32,
    http_per_mille: u32,
    /// The HTTP port's address.
    http: std::net::SocketAddr,
    next: AtomicU64,
    stop: AtomicBool,
    known: RwLock<Known>,
    report: Mutex<Report>,
}

impl Shared {
    fn report(&self) -> std::sync::MutexGuard<'_, Report> {
        self.report.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn violation(&self, v: String) {
        eprintln!("fuzz: VIOLATION {v}");
        self.report().violations.push(v);
    }
}

/// The RNG of request `n` of a run with `seed`.
pub fn request_rng(seed: u64, n: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Runs the fuzzer as `opts` says and returns what it counted; violations
/// are in the report, not an error (errors are failures to set up).
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let seed = opts.seed.unwrap_or_else(rand::random);
    eprintln!("fuzz: backend {}, seed {seed}", opts.backend);
    let dir = tempfile::Builder::new()
        .prefix("stagecoach-fuzz-")
        .tempdir()
        .context("temp dir")?;
    let coordinator =
        Coordinator::start(opts.backend, &dir.path().join("coordinator"), &FAST).await;
    let pid = coordinator.pid().context("coordinator pid")?;
    let url = coordinator.url();
    let shared_dir = dir.path().join("shared");
    let workers: Vec<Worker> = ["w1", "w2"]
        .iter()
        .map(|id| Worker::start(&url, 4, &shared_dir, id))
        .collect();
    let client = Client::connect(&url).await;
    client
        .wait_for_workers(&["w1", "w2"], Duration::from_secs(30))
        .await;

    let mut known = Known {
        workers: vec!["w1".into(), "w2".into()],
        pools: vec!["default".into()],
        ..Known::default()
    };
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..3 {
        let plan = client
            .put_plan(good_plan(&format!("fz-seed-{i}"), &mut rng))
            .await
            .context("a valid plan")?;
        known.plans.push(plan.name);
    }
    // At least one real migration runs whatever the generators pick.
    let first = client
        .create_migration("fz-seed-0", "fz/setup", &serde_json::json!({}))
        .await
        .context("a valid migration")?;
    known.add_migration(first.id);

    let rss_before = checks::rss_kib(pid).unwrap_or(0);
    let start = Instant::now();
    let shared = Arc::new(Shared {
        seed,
        url: url.clone(),
        limit: opts.requests.unwrap_or(u64::MAX),
        deadline: opts.duration.map(|d| start + d),
        raw_per_mille: opts.raw_per_mille,
        http_per_mille: opts.http_per_mille,
        http: coordinator
            .http_addr()
            .context("the coordinator's HTTP port")?,
        next: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        known: RwLock::new(known),
        report: Mutex::new(Report {
            backend: opts.backend.to_string(),
            seed,
            rss_kib: (rss_before, rss_before, 0),
            ..Report::default()
        }),
    });
    if opts.requests.is_none() && opts.duration.is_none() {
        anyhow::bail!("give --requests N or --duration D");
    }

    let mut tasks = JoinSet::new();
    for _ in 0..opts.concurrency.max(1) {
        tasks.spawn(requests(shared.clone(), client.clone(), coordinator.addr()));
    }
    let monitor = tokio::spawn(monitor(
        shared.clone(),
        client.clone(),
        pid,
        opts.max_rss_mb,
    ));
    while let Some(r) = tasks.join_next().await {
        r.context("a request task panicked")?;
    }
    shared.stop.store(true, Ordering::SeqCst);
    monitor.await.context("the monitor panicked")?;
    let elapsed = start.elapsed();

    // Let in-flight work settle, then the final checks.
    tokio::time::sleep(Duration::from_secs(1)).await;
    final_checks(&shared, &client, pid).await;
    let mut report = shared.report().clone();
    report.elapsed = elapsed;
    report.requests = report.requests.min(shared.limit);
    drop(workers);
    drop(coordinator);
    if !report.violations.is_empty() {
        eprintln!("fuzz: keeping {} for its logs", dir.path().display());
        let _ = dir.keep();
    }
    Ok(report)
}

/// One request task: generates and sends requests until the run is over.
async fn requests(shared: Arc<Shared>, client: Client, addr: std::net::SocketAddr) {
    loop {
        let n = shared.next.fetch_add(1, Ordering::SeqCst);
        let late = shared.deadline.is_some_and(|d| Instant::now() >= d);
        if n >= shared.limit || late || shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let mut rng = request_rng(shared.seed, n);
        let seed = shared.seed;
        let pick = rng.random_range(0..1000);
        if pick >= 1000 - shared.http_per_mille.min(1000) {
            let probe = {
                let known = shared.known.read().unwrap_or_else(PoisonError::into_inner);
                HttpProbe::generate(&mut rng, &known.migrations)
            };
            let status = probe.send(shared.http).await;
            let mut report = shared.report();
            report.requests += 1;
            report.count_http(probe.rpc(), status);
            let fault = match status {
                Some(code) => code >= 500,
                None => probe.well_formed,
            };
            if fault {
                drop(report);
                shared.violation(format!(
                    "seed {seed} request #{n} {}: {status:?}; request: {}",
                    probe.rpc(),
                    shown(&String::from_utf8_lossy(&probe.bytes))
                ));
            }
            continue;
        }
        if pick < shared.raw_per_mille {
            let raw = Raw::generate(&mut rng);
            let status = raw.send(addr).await;
            let rpc = raw.rpc();
            let mut report = shared.report();
            report.requests += 1;
            report.count(rpc, status.as_ref().map(|s| s.code()));
            if let Some(s) = status.filter(|s| is_server_fault(s.code())) {
                match checks::known(rpc, s.code(), s.message()) {
                    Some(name) => *report.known.entry(name).or_default() += 1,
                    None => {
                        drop(report);
                        shared.violation(format!(
                            "seed {seed} request #{n} {rpc}: {:?} {:?}; request: {}",
                            s.code(),
                            shown(s.message()),
                            shown(&format!("{raw:?}"))
                        ));
                    }
                }
            }
            continue;
        }
        let call = {
            let known = shared.known.read().unwrap_or_else(PoisonError::into_inner);
            Call::generate(&mut rng, &known)
        };
        let rpc = call.rpc();
        // A violation must show its request: keep a copy while it is sent.
        let sent = call.clone();
        let answer = tokio::time::timeout(Duration::from_secs(30), call.send(&client)).await;
        let Ok((status, learned)) = answer else {
            shared.report().count(rpc, None);
            shared.violation(format!(
                "seed {seed} request #{n} {rpc}: no answer within 30 s; request: {}",
                shown(&format!("{sent:?}"))
            ));
            continue;
        };
        {
            let mut report = shared.report();
            report.requests += 1;
            report.count(rpc, Some(status.code()));
        }
        if is_server_fault(status.code()) {
            let msg = status.message();
            if let Some(name) = checks::known(rpc, status.code(), msg) {
                *shared.report().known.entry(name).or_default() += 1;
            } else {
                shared.violation(format!(
                    "seed {seed} request #{n} {rpc}: {:?} {:?}; request: {}",
                    status.code(),
                    shown(msg),
                    shown(&format!("{sent:?}"))
                ));
            }
        }
        if learned.plan.is_some() || learned.migration.is_some() || learned.pool.is_some() {
            let mut known = shared.known.write().unwrap_or_else(PoisonError::into_inner);
            // Names the generators may repeat: short ones, a few hundred.
            let keep = |known: &Vec<String>, p: &String| {
                p.len() < 100 && known.len() < 300 && !known.contains(p)
            };
            if let Some(p) = learned.plan.filter(|p| keep(&known.plans, p)) {
                known.plans.push(p);
            }
            if let Some(m) = learned.migration {
                known.add_migration(m);
            }
            if let Some(p) = learned.pool.filter(|p| keep(&known.pools, p)) {
                known.pools.push(p);
            }
        }
        if let Some(w) = learned.worker.filter(|w| w.starts_with("fz-w")) {
            let mut known = shared.known.write().unwrap_or_else(PoisonError::into_inner);
            if !known.fake_workers.contains(&w) {
                known.fake_workers.push(w);
            }
        }
    }
}

/// At most 1500 characters of `s`, for a report line.
fn shown(s: &str) -> String {
    if s.len() <= 1500 {
        return s.to_string();
    }
    let mut end = 1500;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

/// Every half second until the run stops: the process is alive, health says
/// SERVING, RSS is under the bound; and the workers' live leases are
/// refreshed for the report generators.
async fn monitor(shared: Arc<Shared>, client: Client, pid: u32, max_rss_mb: u64) {
    let mut last_print = Instant::now();
    while !shared.stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !alive_and_serving(&shared, &client, pid, max_rss_mb).await {
            shared.stop.store(true, Ordering::SeqCst);
            return;
        }
        if let Ok(workers) = client.list_workers().await {
            let mut known = shared.known.write().unwrap_or_else(PoisonError::into_inner);
            known.leases = workers
                .iter()
                .flat_map(|w| w.leases.iter().map(|l| (w.worker_id.clone(), *l)))
                .collect();
            let mut ids: Vec<String> = vec!["w1".into(), "w2".into()];
            ids.extend(workers.into_iter().map(|w| w.worker_id).take(50));
            ids.dedup();
            known.workers = ids;
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            let r = shared.report();
            eprintln!(
                "fuzz: {} requests, RSS peak {} KiB, {} violations",
                r.requests,
                r.rss_kib.1,
                r.violations.len()
            );
        }
    }
}

/// One round of the liveness checks; false (with a violation) on failure.
async fn alive_and_serving(shared: &Shared, client: &Client, pid: u32, max_rss_mb: u64) -> bool {
    let n = shared.next.load(Ordering::SeqCst);
    let seed = shared.seed;
    let Some(rss) = checks::rss_kib(pid) else {
        shared.violation(format!(
            "seed {seed}: the coordinator exited near request #{n}"
        ));
        return false;
    };
    {
        let mut r = shared.report();
        r.rss_kib.1 = r.rss_kib.1.max(rss);
    }
    if rss > max_rss_mb * 1024 {
        shared.violation(format!(
            "seed {seed}: coordinator RSS {rss} KiB over {max_rss_mb} MiB near request #{n}"
        ));
        return false;
    }
    let health = tokio::time::timeout(Duration::from_secs(10), checks::health(&client.channel));
    match health.await {
        Ok(Ok(ServingStatus::Serving)) => {
            shared.report().health_checks += 1;
            true
        }
        other => {
            // Is the server stuck, or only the shared connection?
            let fresh = async {
                let c = tonic::transport::Channel::from_shared(shared.url.clone())
                    .map_err(|e| e.to_string())?
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
                checks::health(&c).await
            };
            let fresh = tokio::time::timeout(Duration::from_secs(10), fresh).await;
            shared.violation(format!(
                "seed {seed}: health is {other:?} near request #{n} \
                 (on a new connection: {fresh:?})"
            ));
            false
        }
    }
}

/// At the end: alive, SERVING, RSS after; the checker on every migration.
async fn final_checks(shared: &Shared, client: &Client, pid: u32) {
    if !alive_and_serving(shared, client, pid, u64::MAX / 2048).await {
        return;
    }
    shared.report().rss_kib.2 = checks::rss_kib(pid).unwrap_or(0);
    let migrations = match client.list_migrations().await {
        Ok(m) => m,
        Err(s) => return shared.violation(format!("ListMigrations at the end: {s}")),
    };
    for m in &migrations {
        let events = match events(client, m.id).await {
            Ok(e) => e,
            Err(s) => {
                shared.violation(format!("migration {}: ListEvents: {s}", m.id));
                continue;
            }
        };
        if let Err(errors) = check_invariants(m, &events) {
            shared.violation(format!(
                "seed {} migration {}: {}",
                shared.seed,
                m.id,
                errors.join("; ")
            ));
        }
        let mut r = shared.report();
        r.migrations_checked += 1;
        *r.migration_states
            .entry(format!("{:?}", m.state()))
            .or_default() += 1;
    }
}

/// The whole event log of a migration, in pages of 100 read with no
/// response size limit: the fuzzer stores reasons and errors of hundreds of
/// KB, and a page of 1000 such events is over tonic's default 4 MiB (see
/// the report's note on ListEvents).
async fn events(
    client: &Client,
    migration_id: i64,
) -> Result<Vec<stagecoach_proto::v1::Event>, tonic::Status> {
    let mut migrations = client
        .migrations
        .clone()
        .max_decoding_message_size(usize::MAX);
    let mut all: Vec<stagecoach_proto::v1::Event> = Vec::new();
    loop {
        let after = all.last().map_or(0, |e| e.id);
        let page = migrations
            .list_events(stagecoach_proto::v1::ListEventsRequest {
                migration_id,
                after_event_id: after,
                limit: 100,
            })
            .await?
            .into_inner()
            .events;
        match page.last() {
            Some(last) if last.id > after => all.extend(page),
            _ => return Ok(all),
        }
    }
}
