//! Latencies seen by a raw in-process worker:
//!
//! - **stage transition**: a migration of S stages of one raw task each;
//!   from the worker *sending* Complete to the next stage's assignment
//!   arriving on its stream. The coordinator hands out the next stage in the
//!   transaction that records the completion, so the assignment usually
//!   arrives before the Complete reply; timing from the reply (the
//!   benchmark issue's wording) would mostly read 0, so the figure includes
//!   the report's own round trip and commit instead: an upper bound.
//! - **start**: CreateMigration sent → the migration's first assignment at
//!   the worker, over C creates of distinct subjects, one after another
//!   (each task is completed before the next create, so the default pool
//!   never fills).

use std::time::Duration;

use tonic::transport::Channel;

use super::{Env, RAW_KIND, create, migrations, plan, stage, watch_until_succeeded, with_log};
use crate::bench::options::Backend;
use crate::bench::raw::RawWorker;
use crate::bench::stats::{Latency, ms};

/// How long one assignment may take to arrive before the run fails.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(30);

/// Stage transition latency.
pub async fn stage_transitions(env: &Env, backend: Backend) -> anyhow::Result<Latency> {
    let (coordinator, channel, _dir) = env.coordinator(backend, "stages").await?;
    let result = with_log(measure_stages(env, &channel).await, &coordinator);
    coordinator.stop().await;
    result
}

async fn measure_stages(env: &Env, channel: &Channel) -> anyhow::Result<Latency> {
    let stages = env.sizes.stages;
    let mut raw = RawWorker::subscribe(channel.clone(), "bench-raw", &[RAW_KIND], 1).await?;
    let plan = plan(
        "bench-stages",
        (0..stages)
            .map(|i| stage(&format!("s{i}"), RAW_KIND, 1))
            .collect(),
    );
    let m = create(&mut migrations(channel), plan, "bench/stages", "").await?;
    let mut samples = Vec::with_capacity(stages as usize);
    let mut sent = None;
    for _ in 0..stages {
        let a = raw.next(ARRIVAL_TIMEOUT).await?;
        if let Some(sent) = sent {
            samples.push(ms(a.at.saturating_duration_since(sent)));
        }
        sent = Some(tokio::time::Instant::now());
        raw.complete(a.lease()?, Vec::new()).await?;
    }
    watch_until_succeeded(channel, m.id, Duration::from_secs(60)).await?;
    Latency::of(&samples)
}

/// Start latency.
pub async fn start(env: &Env, backend: Backend) -> anyhow::Result<Latency> {
    let (coordinator, channel, _dir) = env.coordinator(backend, "start").await?;
    let result = with_log(measure_start(env, &channel).await, &coordinator);
    coordinator.stop().await;
    result
}

async fn measure_start(env: &Env, channel: &Channel) -> anyhow::Result<Latency> {
    let creates = env.sizes.creates;
    let mut raw = RawWorker::subscribe(channel.clone(), "bench-raw", &[RAW_KIND], 1).await?;
    let mut client = migrations(channel);
    let mut samples = Vec::with_capacity(creates as usize);
    for i in 0..creates {
        let plan = plan("bench-start", vec![stage("only", RAW_KIND, 1)]);
        let sent = tokio::time::Instant::now();
        create(&mut client, plan, &format!("bench/start/{i}"), "").await?;
        let a = raw.next(ARRIVAL_TIMEOUT).await?;
        samples.push(ms(a.at.saturating_duration_since(sent)));
        raw.complete(a.lease()?, Vec::new()).await?;
    }
    Latency::of(&samples)
}
