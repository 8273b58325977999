//! `coordinator demo` (being written).
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {}
pub async fn run(_: DemoArgs, _: tokio_util::sync::CancellationToken) -> anyhow::Result<bool> { Ok(true) }
