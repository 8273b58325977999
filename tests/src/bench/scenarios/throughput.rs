//! Throughput: one migration of N `noop` tasks in one stage, run by real
//! worker processes, timed from CreateMigration's reply to the migration's
//! success seen on WatchMigration.
//!
//! The plan is sent inline, in one message: a `noop` TaskSpec is 8 bytes on
//! the wire, so 100,000 tasks are about 0.8 MB, under the coordinator's
//! 4 MB decode limit (the client's limits are raised anyway).

use std::path::Path;

use tokio::time::Instant;
use tonic::transport::Channel;

use super::{
    Env, budget, create, migrations, plan, stage, wait_for_workers, watch_until_succeeded, with_log,
};
use crate::bench::options::Backend;
use crate::bench::procs::{CoordinatorProc, WorkerProcs};

/// Tasks completed per second.
pub async fn run(env: &Env, backend: Backend) -> anyhow::Result<f64> {
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
) -> anyhow::Result<f64> {
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
    let m = create(&mut migrations(channel), plan, "bench/throughput", "").await?;
    let start = Instant::now();
    let done = watch_until_succeeded(channel, m.id, budget(tasks.into())).await;
    workers.stop().await;
    Ok(f64::from(tasks) / (done? - start).as_secs_f64())
}
