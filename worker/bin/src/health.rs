//! `worker health-check`: asks a coordinator's `grpc.health.v1.Health/Check`
//! and exits 0 only if it answers SERVING.
//!
//! It lives in the worker binary so the one container image can check its
//! coordinators (docker-compose `healthcheck`) without shipping grpcurl.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use stagecoach_worker::tls::coordinator_endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Settings of `worker health-check`.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// gRPC address of the coordinator to check (one address).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    coordinator: String,

    /// Service to ask about; empty asks about the server as a whole.
    #[arg(long, default_value = "")]
    service: String,

    /// Seconds the whole check may take, connecting included.
    #[arg(long, default_value_t = 5)]
    timeout_secs: u64,

    #[command(flatten)]
    tls: crate::tls::TlsArgs,
}

/// Prints the status; success only for SERVING.
pub async fn run(args: HealthArgs) -> anyhow::Result<ExitCode> {
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    let status = tokio::time::timeout(timeout, check(&args, timeout))
        .await
        .with_context(|| {
            format!(
                "{} did not answer within {}s",
                args.coordinator,
                timeout.as_secs()
            )
        })??;
    println!("{}: {}", args.coordinator, status.as_str_name());
    Ok(if status == ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn check(args: &HealthArgs, timeout: Duration) -> anyhow::Result<ServingStatus> {
    let tls = args.tls.load()?;
    let endpoint = coordinator_endpoint(&args.coordinator, tls.as_ref())
        .map_err(|reason| anyhow::anyhow!("--coordinator {:?}: {reason}", args.coordinator))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to {}", args.coordinator))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .with_context(|| format!("{} answered Health/Check with an error", args.coordinator))?;
    Ok(ServingStatus::try_from(response.into_inner().status).unwrap_or(ServingStatus::Unknown))
}
