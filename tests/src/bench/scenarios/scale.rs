//! Scale: what one coordinator holds.
//!
//! - **fan-out**: a migration whose first stage has F `bench.fanout` tasks
//!   (raw worker), each completing with `add_tasks` of K `noop` tasks to a
//!   dynamic second stage that real workers run: F × (1 + K) tasks (full:
//!   100 × 10,000, a million), tasks/s from CreateMigration's reply to
//!   success, and the coordinator's peak RSS (VmHWM).
//! - **streams**: N idle worker streams (distinct ids, a kind no task has)
//!   over C HTTP/2 connections: time until every stream got its Welcome,
//!   and the coordinator's RSS while they are open.
//! - **queued**: Q migrations of one raw task each queued in a one-slot
//!   pool; the admission delay when the slot frees: the raw worker sends
//!   Complete for the running migration's task → the next migration's
//!   assignment arrives (it usually overtakes the Complete reply, as in the
//!   stage transition figure). Median over several frees.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use stagecoach_proto::v1::admin_service_client::AdminServiceClient;
use stagecoach_proto::v1::worker_message::Message;
use stagecoach_proto::v1::worker_service_client::WorkerServiceClient;
use stagecoach_proto::v1::{CreatePoolRequest, NewTask, StageSpec, SubscribeRequest};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::{
    Env, FANOUT_KIND, RAW_KIND, budget, connect, create, migrations, plan, stage, wait_for_workers,
    watch_until_succeeded, with_log,
};
use crate::bench::options::Backend;
use crate::bench::procs::{CoordinatorProc, Memory, WorkerProcs};
use crate::bench::raw::RawWorker;
use crate::bench::stats::{median, ms};

/// Completions of fan-out tasks in flight at once.
const FANOUT_CONCURRENCY: usize = 4;
/// Creates in flight at once while queueing migrations.
pub const CREATE_CONCURRENCY: usize = 32;

/// Result of the fan-out migration.
#[derive(Debug, Clone, Copy)]
pub struct Fanout {
    pub tasks_per_s: f64,
    pub peak_rss_mb: f64,
    /// Seconds until every fan-out task had added its tasks.
    pub fanout_s: f64,
}

pub async fn fanout(env: &Env, backend: Backend) -> anyhow::Result<Fanout> {
    let (coordinator, channel, dir) = env.coordinator(backend, "fanout").await?;
    let result = measure_fanout(env, &coordinator, &channel, &dir).await;
    let result = with_log(result, &coordinator);
    coordinator.stop().await;
    result
}

async fn measure_fanout(
    env: &Env,
    coordinator: &CoordinatorProc,
    channel: &Channel,
    dir: &Path,
) -> anyhow::Result<Fanout> {
    let (fan, per) = (env.sizes.fanout_tasks, env.sizes.fanout_per_task);
    let total = env.sizes.fanout_total();
    let workers = WorkerProcs::start(
        &env.exes,
        &coordinator.url(),
        env.opts.workers,
        env.opts.slots,
        dir,
    )?;
    wait_for_workers(channel, &workers.ids).await?;
    let mut raw =
        RawWorker::subscribe(channel.clone(), "bench-fanout", &[FANOUT_KIND], fan).await?;
    let work = StageSpec {
        name: "work".into(),
        dynamic: true,
        ..Default::default()
    };
    let plan = plan(
        "bench-fanout",
        vec![stage("fanout", FANOUT_KIND, fan), work],
    );
    let m = create(&mut migrations(channel), plan, "bench/fanout", "").await?;
    let start = Instant::now();
    let watch = {
        let channel = channel.clone();
        tokio::spawn(async move { watch_until_succeeded(&channel, m.id, budget(total)).await })
    };

    // Complete the fan-out tasks as they arrive, a few at a time: the
    // coordinator runs each as one transaction anyway.
    let added: Arc<Vec<NewTask>> = Arc::new(
        (0..per)
            .map(|_| NewTask {
                stage: "work".into(),
                kind: "noop".into(),
                ..Default::default()
            })
            .collect(),
    );
    let completer = raw.completer();
    let mut inflight = JoinSet::new();
    for _ in 0..fan {
        let a = raw.next(Duration::from_secs(60)).await?;
        let lease = a.lease()?;
        if inflight.len() >= FANOUT_CONCURRENCY
            && let Some(r) = inflight.join_next().await
        {
            r??;
        }
        let (completer, added) = (completer.clone(), added.clone());
        inflight.spawn(async move { completer.complete(lease, added.to_vec()).await });
    }
    while let Some(r) = inflight.join_next().await {
        r??;
    }
    let fanout_s = start.elapsed().as_secs_f64();
    let done = watch.await.context("the watch task")??;
    let memory = coordinator.memory()?;
    workers.stop().await;
    Ok(Fanout {
        tasks_per_s: total as f64 / (done - start).as_secs_f64(),
        peak_rss_mb: memory.peak_mb,
        fanout_s,
    })
}

/// Result of the idle-streams test.
#[derive(Debug, Clone, Copy)]
pub struct Streams {
    /// Seconds from the first Subscribe to the last Welcome.
    pub all_welcomed_s: f64,
    /// Coordinator memory with every stream open.
    pub memory: Memory,
}

pub async fn streams(env: &Env, backend: Backend) -> anyhow::Result<Streams> {
    let (coordinator, channel, _dir) = env.coordinator(backend, "streams").await?;
    drop(channel);
    let result = with_log(measure_streams(env, &coordinator).await, &coordinator);
    coordinator.stop().await;
    result
}

async fn measure_streams(env: &Env, coordinator: &CoordinatorProc) -> anyhow::Result<Streams> {
    let (n, conns) = (env.sizes.streams, env.sizes.stream_connections.max(1));
    let mut channels = Vec::with_capacity(conns as usize);
    for _ in 0..conns {
        channels.push(connect(&coordinator.url()).await?);
    }
    let start = Instant::now();
    let mut subscribing = JoinSet::new();
    for i in 0..n {
        let mut client = WorkerServiceClient::new(channels[(i % conns) as usize].clone());
        subscribing.spawn(async move {
            let mut stream = client
                .subscribe(SubscribeRequest {
                    worker_id: format!("bench-idle-{i}"),
                    // A kind no task has: the stream only ever gets its Welcome.
                    kinds: vec!["bench.idle".into()],
                    slots: 1,
                    name: "bench idle stream".into(),
                    instance: 0,
                })
                .await
                .with_context(|| format!("Subscribe of idle stream {i}"))?
                .into_inner();
            match stream.message().await {
                Ok(Some(m)) if matches!(m.message, Some(Message::Welcome(_))) => {
                    Ok((Instant::now(), stream))
                }
                other => bail!("idle stream {i}: expected a Welcome, got {other:?}"),
            }
        });
    }
    let mut open = Vec::with_capacity(n as usize);
    let mut last = start;
    let deadline = Duration::from_secs(120) + Duration::from_millis(10 * u64::from(n));
    while let Some(r) = tokio::time::timeout(deadline, subscribing.join_next())
        .await
        .context("idle streams still waiting for their Welcome")?
    {
        let (at, stream) = r??;
        last = last.max(at);
        open.push(stream);
    }
    let all_welcomed_s = (last - start).as_secs_f64();
    // Let the coordinator settle (dispatch passes over the new workers)
    // before reading its memory with every stream still open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let memory = coordinator.memory()?;
    drop(open);
    Ok(Streams {
        all_welcomed_s,
        memory,
    })
}

/// Result of the queued-pool test.
#[derive(Debug, Clone, Copy)]
pub struct Queued {
    /// Median admission delay when the slot frees, ms.
    pub admission_ms: f64,
    /// Seconds it took to queue every migration.
    pub create_s: f64,
}

pub async fn queued(env: &Env, backend: Backend) -> anyhow::Result<Queued> {
    let (coordinator, channel, _dir) = env.coordinator(backend, "queued").await?;
    let result = with_log(measure_queued(env, &channel).await, &coordinator);
    coordinator.stop().await;
    result
}

async fn measure_queued(env: &Env, channel: &Channel) -> anyhow::Result<Queued> {
    let (n, frees) = (env.sizes.queued, env.sizes.queued_frees);
    if frees >= n {
        bail!("{frees} frees need more than {n} queued migrations");
    }
    AdminServiceClient::new(channel.clone())
        .create_pool(CreatePoolRequest {
            name: "bench-queue".into(),
            slots: 1,
        })
        .await
        .context("CreatePool")?;
    let mut raw = RawWorker::subscribe(channel.clone(), "bench-raw", &[RAW_KIND], 1).await?;

    let start = Instant::now();
    let mut creating = JoinSet::new();
    for i in 0..n {
        if creating.len() >= CREATE_CONCURRENCY
            && let Some(r) = creating.join_next().await
        {
            r??;
        }
        let mut client = migrations(channel);
        creating.spawn(async move {
            let plan = plan("bench-queued", vec![stage("only", RAW_KIND, 1)]);
            create(
                &mut client,
                plan,
                &format!("bench/queued/{i}"),
                "bench-queue",
            )
            .await
            .map(drop)
        });
    }
    while let Some(r) = creating.join_next().await {
        r??;
    }
    let create_s = start.elapsed().as_secs_f64();

    // The first migration was admitted while the others were queued; its
    // assignment may be waiting already. Every free after it is timed.
    let first = raw.next(Duration::from_secs(60)).await?;
    let mut sent = tokio::time::Instant::now();
    raw.complete(first.lease()?, Vec::new()).await?;
    let mut delays = Vec::with_capacity(frees as usize);
    for _ in 0..frees {
        let a = raw.next(Duration::from_secs(60)).await?;
        delays.push(ms(a.at.saturating_duration_since(sent)));
        sent = tokio::time::Instant::now();
        raw.complete(a.lease()?, Vec::new()).await?;
    }
    Ok(Queued {
        admission_ms: median(&delays).context("no frees timed")?,
        create_s,
    })
}
