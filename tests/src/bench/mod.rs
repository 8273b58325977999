//! The benchmark command: a real coordinator and real worker processes on
//! loopback, measured beside baselines taken in the same run on the same
//! machine.
//!
//! ```text
//! cargo run --release -p stagecoach-tests --bin bench -- [--quick]
//!     [--backend sqlite|postgres|all] [--runs N] [--out FILE.json]
//! ```
//!
//! # Layout
//!
//! | module | what it holds |
//! |---|---|
//! | [`options`] | the flags and the sizes they imply (full or `--quick`) |
//! | [`procs`] | building and starting the `coordinator` and `worker` executables, their RSS |
//! | [`postgres`] | a throwaway PostgreSQL server for `--backend postgres` |
//! | [`raw`] | a raw in-process worker on the generated client, stamping each assignment |
//! | [`scenarios`] | the measurements: throughput, latencies, scale |
//! | [`baselines`] | a bare tonic echo and bare sqlx transactions |
//! | [`cpu`] | CPU time per task of each process, from `/proc` |
//! | [`report`] | figures, the terminal table and the JSON document |
//! | [`stats`] | percentiles and medians |
//!
//! # What is measured
//!
//! Every run measures, in this order: the echo baseline, then per backend
//! the sqlx baseline, throughput, stage transition latency, start latency
//! and (unless `--no-scale`; tiny with `--quick`) the fan-out, idle streams
//! and queued-pool tests. Runs are whole passes, so noise from other work
//! on the machine spreads over every figure instead of spoiling one; the
//! table shows each figure's median over the runs, and the JSON keeps every
//! run's value. Targets are printed for information and never asserted.

pub mod baselines;
pub mod cpu;
pub mod options;
pub mod postgres;
pub mod procs;
pub mod raw;
pub mod report;
pub mod scenarios;
pub mod stats;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

pub use options::{Backend, BackendChoice, Options, Sizes};
pub use report::{Figure, Report, Target};

use postgres::PgServer;
use procs::{Executables, Layout};
use report::{Git, Machine, count};
use scenarios::scale::CREATE_CONCURRENCY;
use scenarios::{Env, latency, scale, throughput};

/// Runs the bench, prints the table, writes the JSON to
/// [`Options::out`] (or `<target>/bench/results.json`), and returns the
/// report. Failed runs are recorded in the report, not returned as errors;
/// an error means the bench could not run at all.
pub async fn run(opts: Options) -> anyhow::Result<(Report, PathBuf)> {
    let started = Instant::now();
    let mut report = Report::new(&opts, report::now_utc(), Git::probe(), Machine::probe());
    report.figures = catalog(&opts);
    let out = match &opts.out {
        Some(p) => p.clone(),
        None => default_out()?,
    };
    let built = Executables::locate_or_build(opts.bin_dir.as_deref())?;
    let work_parent = opts.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&work_parent)?;
    let work = tempfile::Builder::new()
        .prefix("stagecoach-bench-")
        .tempdir_in(&work_parent)
        .context("create the bench's temp dir")?;
    eprintln!(
        "bench: {} run(s), {} sizes, files in {}",
        opts.runs,
        if opts.quick { "quick" } else { "full" },
        work.path().display()
    );
    let exes = built.copy_to(&work.path().join("bin"))?;

    let backends = opts.backends();
    let pg = if backends.contains(&Backend::Postgres) {
        match PgServer::start().await {
            Ok(s) => Some(s),
            Err(e) => {
                report.set_unavailable(
                    Backend::Postgres,
                    &format!("no throwaway PostgreSQL server: {e:#}"),
                );
                None
            }
        }
    } else {
        None
    };
    let env = Env::new(exes, opts.clone(), work.path().to_path_buf(), pg);
    if env.pg.is_some()
        && let Err(why) = probe_postgres(&env).await
    {
        report.set_unavailable(Backend::Postgres, &why);
    }
    let available: Vec<Backend> = backends
        .into_iter()
        .filter(|b| !report.unavailable.contains_key(b.name()))
        .collect();

    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    for run in 1..=opts.runs {
        eprintln!("bench: run {run}/{}", opts.runs);
        one_pass(&env, &available, &mut report).await;
        // Written after every pass, so a long run that is stopped early
        // still leaves the runs it finished.
        report.runs_done = run;
        report.duration_s = started.elapsed().as_secs_f64();
        report.summarise();
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(&out, json).with_context(|| format!("write {}", out.display()))?;
        if run < opts.runs {
            eprintln!(
                "bench: after {run} of {} runs:\n{}",
                opts.runs,
                report.table()
            );
        }
    }
    drop(env);
    println!("{}", report.table());
    println!(
        "{} on {} ({} cpus, {} MB; load at start {}); commit {}{}; {:.0} s",
        report.date,
        report.machine.cpu_model,
        report.machine.nproc,
        report.machine.memory_mb,
        report.machine.loadavg_at_start,
        report.git.commit,
        if report.git.dirty { " (dirty)" } else { "" },
        report.duration_s
    );
    println!("results: {}", out.display());
    for f in report.failures() {
        eprintln!("bench: {} failed {} time(s):", f.key, f.errors.len());
        for e in &f.errors {
            eprintln!("  {e}");
        }
    }
    Ok((report, out))
}

/// Every figure the options ask for, in table order.
pub fn catalog(opts: &Options) -> Vec<Figure> {
    let s = opts.sizes();
    let conc = opts.concurrency();
    let mut out = vec![Figure::new(
        "echo",
        &format!("baseline: tonic echo, {conc} concurrent"),
        None,
        "calls/s",
    )];
    for b in opts.backends() {
        let k = |name: &str| format!("{}.{name}", b.name());
        let (echo, sqlx) = ("echo".to_string(), k("sqlx_tx"));
        let tasks_target = match b {
            Backend::Sqlite => 25_000.0,
            Backend::Postgres => 20_000.0,
        };
        out.push(Figure::new(
            &sqlx,
            "baseline: sqlx 1-row update tx",
            Some(b),
            "tx/s",
        ));
        for p in ["p50", "p99"] {
            out.push(Figure::new(
                &k(&format!("sqlx_tx_{p}")),
                &format!("baseline: sqlx 1-row update tx {p}"),
                Some(b),
                "ms",
            ));
        }
        out.push(
            Figure::new(
                &k("throughput"),
                &format!(
                    "throughput, {} noop tasks, {}x{} slots",
                    count(s.throughput_tasks.into()),
                    opts.workers,
                    opts.slots
                ),
                Some(b),
                "tasks/s",
            )
            .target(Target::AtLeast(tasks_target))
            .baseline(&echo, Some(0.5))
            .baseline(&sqlx, None),
        );
        out.push(Figure::new(
            &k("throughput_create"),
            &format!(
                "create of the {} noop tasks (round trip)",
                count(s.throughput_tasks.into())
            ),
            Some(b),
            "s",
        ));
        out.push(Figure::new(
            &k("throughput_replay"),
            "event log of that migration read back, pages of 1,000",
            Some(b),
            "events/s",
        ));
        let mut parts = vec![
            ("machine", "all processes and the kernel"),
            ("coordinator", "coordinator"),
            ("workers", "worker processes"),
        ];
        if b == Backend::Postgres {
            parts.push(("database", "PostgreSQL backends"));
        }
        for (part, what) in parts {
            out.push(Figure::new(
                &k(&format!("cpu_{part}")),
                &format!("CPU per throughput task: {what}"),
                Some(b),
                "us/task",
            ));
        }
        for (p, target) in [("p50", None), ("p99", Some(5.0))] {
            let mut f = Figure::new(
                &k(&format!("stage_transition_{p}")),
                &format!("stage transition {p}, {} stages", count(s.stages.into())),
                Some(b),
                "ms",
            )
            .baseline(&k(&format!("sqlx_tx_{p}")), None);
            if let Some(t) = target {
                f = f.target(Target::AtMost(t));
            }
            out.push(f);
        }
        for (p, target) in [("p50", None), ("p99", Some(10.0))] {
            let mut f = Figure::new(
                &k(&format!("start_latency_{p}")),
                &format!("start latency {p}, {} creates", count(s.creates.into())),
                Some(b),
                "ms",
            )
            .baseline(&k(&format!("sqlx_tx_{p}")), None);
            if let Some(t) = target {
                f = f.target(Target::AtMost(t));
            }
            out.push(f);
        }
        if opts.no_scale {
            continue;
        }
        let fan = format!(
            "{} tasks ({}x{} fan-out)",
            count(s.fanout_total()),
            s.fanout_tasks,
            count(s.fanout_per_task.into())
        );
        out.push(
            Figure::new(
                &k("fanout_throughput"),
                &format!("scale: {fan}"),
                Some(b),
                "tasks/s",
            )
            .baseline(&sqlx, None),
        );
        out.push(Figure::new(
            &k("fanout_adds"),
            &format!("scale: fan-out stage done (tasks added), {fan}"),
            Some(b),
            "s",
        ));
        out.push(
            Figure::new(
                &k("fanout_peak_rss"),
                &format!("scale: coordinator peak RSS, {fan}"),
                Some(b),
                "MB",
            )
            .target(Target::AtMost(256.0)),
        );
        let streams = format!(
            "{} idle streams / {} conns",
            count(s.streams.into()),
            s.stream_connections
        );
        out.push(Figure::new(
            &k("streams_welcome"),
            &format!("scale: all welcomed, {streams}"),
            Some(b),
            "s",
        ));
        out.push(
            Figure::new(
                &k("streams_rss"),
                &format!("scale: coordinator peak RSS, {streams}"),
                Some(b),
                "MB",
            )
            .target(Target::AtMost(256.0)),
        );
        out.push(Figure::new(
            &k("queued_admission"),
            &format!(
                "scale: admission on free, {} queued, median of {}",
                count(s.queued.into()),
                s.queued_frees
            ),
            Some(b),
            "ms",
        ));
        out.push(Figure::new(
            &k("queued_creates"),
            &format!(
                "scale: creates queueing {}, {CREATE_CONCURRENCY} in flight",
                count(s.queued.into())
            ),
            Some(b),
            "creates/s",
        ));
    }
    out
}

/// One run of every measurement.
async fn one_pass(env: &Env, backends: &[Backend], report: &mut Report) {
    let s = env.sizes;
    let baseline_time = Duration::from_millis(s.baseline_ms);
    let r = timed(
        "echo",
        baselines::echo(env.opts.workers, env.opts.slots, baseline_time),
    )
    .await;
    report.record("echo", r);
    for &b in backends {
        let k = |name: &str| format!("{}.{name}", b.name());
        let r = timed(&k("sqlx_tx"), baselines::sqlx_tx(env, b, baseline_time)).await;
        report.record(
            &k("sqlx_tx"),
            r.as_ref().map(|t| t.tx_per_s).map_err(Clone::clone),
        );
        record_latency(report, &k("sqlx_tx"), r.map(|t| t.latency));

        let r = timed(&k("throughput"), throughput::run(env, b)).await;
        let cpu = r.as_ref().map(|t| t.cpu).map_err(Clone::clone);
        let create = r.as_ref().map(|t| t.create_s).map_err(Clone::clone);
        report.record(&k("throughput_create"), create);
        let replay = r
            .as_ref()
            .map(|t| t.replay_events_per_s)
            .map_err(Clone::clone);
        report.record(&k("throughput_replay"), replay);
        report.record(&k("throughput"), r.map(|t| t.tasks_per_s));
        report.record(&k("cpu_machine"), cpu.clone().map(|c| c.machine_us));
        report.record(&k("cpu_coordinator"), cpu.clone().map(|c| c.coordinator_us));
        report.record(&k("cpu_workers"), cpu.clone().map(|c| c.workers_us));
        if b == Backend::Postgres {
            let db = cpu.and_then(|c| {
                c.database_us
                    .ok_or_else(|| "the coordinator's URL names no PostgreSQL database".into())
            });
            report.record(&k("cpu_database"), db);
        }

        let r = timed(&k("stage_transition"), latency::stage_transitions(env, b)).await;
        record_latency(report, &k("stage_transition"), r);

        let r = timed(&k("start_latency"), latency::start(env, b)).await;
        record_latency(report, &k("start_latency"), r);

        if env.opts.no_scale {
            continue;
        }
        let r = timed(&k("fanout"), scale::fanout(env, b)).await;
        report.record(
            &k("fanout_throughput"),
            r.as_ref().map(|f| f.tasks_per_s).map_err(Clone::clone),
        );
        report.record(
            &k("fanout_adds"),
            r.as_ref().map(|f| f.fanout_s).map_err(Clone::clone),
        );
        report.record(&k("fanout_peak_rss"), r.map(|f| f.peak_rss_mb));

        let r = timed(&k("streams"), scale::streams(env, b)).await;
        report.record(
            &k("streams_welcome"),
            r.as_ref().map(|x| x.all_welcomed_s).map_err(Clone::clone),
        );
        report.record(&k("streams_rss"), r.map(|x| x.memory.peak_mb));

        let r = timed(&k("queued"), scale::queued(env, b)).await;
        report.record(
            &k("queued_admission"),
            r.as_ref().map(|q| q.admission_ms).map_err(Clone::clone),
        );
        report.record(
            &k("queued_creates"),
            r.map(|q| f64::from(env.sizes.queued) / q.create_s),
        );
    }
}

fn record_latency(report: &mut Report, key: &str, r: Result<stats::Latency, String>) {
    report.record(
        &format!("{key}_p50"),
        r.as_ref().map(|l| l.p50_ms).map_err(Clone::clone),
    );
    report.record(&format!("{key}_p99"), r.map(|l| l.p99_ms));
}

/// Runs one measurement, printing how long it took and what it found.
async fn timed<T: std::fmt::Debug>(
    what: &str,
    f: impl Future<Output = anyhow::Result<T>>,
) -> Result<T, String> {
    let start = Instant::now();
    eprint!("bench:   {what} ... ");
    let r = f.await;
    let secs = start.elapsed().as_secs_f64();
    match &r {
        Ok(v) => eprintln!("{v:?} ({secs:.1} s)"),
        Err(e) => eprintln!("FAILED after {secs:.1} s: {e:#}"),
    }
    r.map_err(|e| format!("{e:#}"))
}

/// Starts a coordinator on a fresh PostgreSQL database and checks that it
/// created its schema there. Err says why PostgreSQL cannot be measured.
async fn probe_postgres(env: &Env) -> Result<(), String> {
    let scratch = env.scratch("postgres-probe");
    let url = env
        .database(Backend::Postgres, &scratch)
        .await
        .map_err(|e| format!("could not create a database: {e:#}"))?;
    let coordinator = procs::CoordinatorProc::start(&env.exes, &scratch, &url)
        .await
        .map_err(|e| {
            let first = format!("{e:#}");
            let reason = first
                .lines()
                .find(|l| l.contains("ERROR") || l.contains("error"))
                .unwrap_or_else(|| first.lines().next().unwrap_or_default())
                .trim()
                .to_string();
            format!("the coordinator does not start on PostgreSQL ({reason})")
        })?;
    // The coordinator prints its address before it opens its store: a call
    // that reads the store says it is open (or that it failed).
    let answered = async {
        let channel = scenarios::connect(&coordinator.url()).await?;
        let mut admin =
            stagecoach_proto::v1::admin_service_client::AdminServiceClient::new(channel);
        tokio::time::timeout(
            Duration::from_secs(60),
            admin.list_pools(stagecoach_proto::v1::ListPoolsRequest {}),
        )
        .await
        .context("no answer to ListPools within 60 s")??;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = answered {
        let log = coordinator.log_tail(10);
        coordinator.stop().await;
        let reason = log
            .lines()
            .rev()
            .find(|l| l.contains("ERROR") || l.contains("rror"))
            .map_or_else(|| format!("{e:#}"), |l| l.trim().to_string());
        return Err(format!(
            "the coordinator does not serve on PostgreSQL ({reason})"
        ));
    }
    let has_schema = async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await?;
        let found: Option<String> =
            sqlx::query_scalar("SELECT to_regclass('public.migrations')::text")
                .fetch_one(&mut conn)
                .await?;
        anyhow::Ok(found.is_some())
    }
    .await;
    coordinator.stop().await;
    match has_schema {
        Ok(true) => Ok(()),
        Ok(false) => Err(
            "the coordinator serves, but not from PostgreSQL: it created no schema there (PostgreSQL support not built in yet?)"
                .into(),
        ),
        Err(e) => Err(format!("could not inspect the coordinator's database: {e:#}")),
    }
}

/// `<target>/bench/results.json`, the target dir being the bench's own.
fn default_out() -> anyhow::Result<PathBuf> {
    let layout = Layout::of_current_exe()?;
    Ok(layout.target_dir.join("bench").join("results.json"))
}
