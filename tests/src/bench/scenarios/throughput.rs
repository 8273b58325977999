//! Throughput: one migration of N `noop` tasks in one stage, run by real
//! worker processes, timed from CreateMigration's reply to the migration's
//! success seen on WatchMigration — and the CPU time each process spent
//! per task over the same span (see `cpu`). The create's own round trip is
//! a figure of its own: storing N tasks is not part of running them. So is
//! reading the finished migration's event log back through ListEvents, a
//! page at a time, as a client catching up would: its cost must grow with
//! the page, not with the log.
//!
//! The plan is sent inline, in one message: a `noop` TaskSpec is 8 bytes on
//! the wire, so 100,000 tasks are about 0.8 MB, under the coordinator's
//! 4 MB decode limit (the client's limits are raised anyway).

use std::path::Path;

use anyhow::Context;
use stagecoach_proto::v1::ListEventsRequest;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::{
    Env, budget, create, migrations, plan, stage, wait_for_workers, watch_until_succeeded, with_log,
};
use crate::bench::cpu;
use crate::bench::options::Backend;
use crate::bench::procs::{CoordinatorProc, WorkerProcs};

/// What one throughput run measured.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub tasks_per_s: f64,
    /// CreateMigration's round trip: the plan's tasks stored, the first
    /// stage started, the first assignments handed out.
    pub create_s: f64,
    pub cpu: cpu::PerTask,
    /// Events per second read back by [`REPLAY_PAGE`]-event pages.
    pub replay_events_per_s: f64,
}

/// Events per ListEvents page in the replay (the API's default).
const REPLAY_PAGE: u32 = 1000;

/// Tasks completed per second, and the CPU time they took.
pub async fn run(env: &Env, backend: Backend) -> anyhow::Result<Throughput> {
    let (coordinator, channel, dir) = env.coordinator(backend, "throughput").await?;
    let result = measure(env, &coordinator, &channel, &dir).await;
    let result = with_log(result, &coordinator);
    coordinator.stop().await;
    result
}

async fn measure(
    env: &Env,
    coordinator: &CoordinatorProc,
    channel: &Channel,
    dir: &Path,
) -> anyhow::Result<Throughput> {
    let tasks = env.sizes.throughput_tasks;
    let workers = WorkerProcs::start(
        &env.exes,
        &coordinator.url(),
        env.opts.workers,
        env.opts.slots,
        dir,
    )?;
    wait_for_workers(channel, &workers.ids).await?;

    let plan = plan("bench-throughput", vec![stage("noop", "noop", tasks)]);
    let parts = cpu::Parts {
        coordinator: coordinator.pid().context("the coordinator has exited")?,
        workers: workers.pids(),
        database: cpu::database_name(coordinator.database()),
    };
    let sent = Instant::now();
    let m = create(&mut migrations(channel), plan, "bench/throughput", "").await?;
    let start = Instant::now();
    let create_s = (start - sent).as_secs_f64();
    let before = parts.sample()?;
    let done = watch_until_succeeded(channel, m.id, budget(tasks.into())).await;
    let after = parts.sample();
    workers.stop().await;
    let tasks_per_s = f64::from(tasks) / (done? - start).as_secs_f64();
    Ok(Throughput {
        tasks_per_s,
        create_s,
        cpu: parts.per_task(&before, &after?, tasks),
        replay_events_per_s: replay(channel, m.id, 2 * u64::from(tasks)).await?,
    })
}

/// Reads a migration's whole event log, page by page: events per second.
/// Fails if it holds fewer than `at_least` events (each task was assigned
/// and succeeded at least once), so a short read cannot pass for speed.
async fn replay(channel: &Channel, migration_id: i64, at_least: u64) -> anyhow::Result<f64> {
    let mut client = migrations(channel);
    let (mut cursor, mut events) = (0, 0u64);
    let start = Instant::now();
    loop {
        let page = client
            .list_events(ListEventsRequest {
                migration_id,
                after_event_id: cursor,
                limit: REPLAY_PAGE,
            })
            .await
            .context("ListEvents")?
            .into_inner()
            .events;
        let Some(last) = page.last() else { break };
        cursor = last.id;
        events += page.len() as u64;
    }
    let elapsed = start.elapsed();
    anyhow::ensure!(
        events >= at_least,
        "the event log of migration {migration_id} read back {events} events, expected at least {at_least}"
    );
    Ok(events as f64 / elapsed.as_secs_f64())
}
