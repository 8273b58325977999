//! The worker's side of `WorkerService`: one lazily connected channel, and
//! the worker id and credentials every call carries.
//!
//! The channel reconnects by itself after the coordinator goes away; a call
//! made while it is down fails fast with `UNAVAILABLE`, which the callers
//! retry with backoff.

use std::time::Duration;

use stagecoach_proto::v1::worker_service_client::WorkerServiceClient;
use stagecoach_proto::v1::{
    CompleteRequest, Completion, FailRequest, Failure, HeartbeatRequest, HeartbeatResponse,
    LeaseStatus, ReportResponse, SubscribeRequest, WorkerMessage,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

use crate::builder::Config;

/// How long one report may take before it is retried.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub(crate) struct Coordinator {
    client: WorkerServiceClient<Channel>,
    worker_id: String,
    authorization: Option<MetadataValue<Ascii>>,
}

impl Coordinator {
    /// Must be called inside a Tokio runtime: the channel spawns its
    /// connection task.
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            client: WorkerServiceClient::new(config.endpoint.connect_lazy()),
            worker_id: config.worker_id.clone(),
            authorization: config.authorization.clone(),
        }
    }

    pub(crate) fn worker_id(&self) -> &str {
        &self.worker_id
    }

    fn request<T>(&self, message: T, timeout: Option<Duration>) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(auth) = &self.authorization {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        request
    }

    pub(crate) async fn subscribe(
        &self,
        kinds: Vec<String>,
        slots: u32,
        name: String,
    ) -> Result<Streaming<WorkerMessage>, Status> {
        let message = SubscribeRequest {
            worker_id: self.worker_id.clone(),
            kinds,
            slots,
            name,
        };
        // No timeout: the stream lives as long as the connection.
        let response = self
            .client
            .clone()
            .subscribe(self.request(message, None))
            .await?;
        Ok(response.into_inner())
    }

    pub(crate) async fn heartbeat(
        &self,
        leases: Vec<LeaseStatus>,
        timeout: Duration,
    ) -> Result<HeartbeatResponse, Status> {
        let message = HeartbeatRequest {
            worker_id: self.worker_id.clone(),
            leases,
        };
        let request = self.request(message, Some(timeout));
        Ok(self.client.clone().heartbeat(request).await?.into_inner())
    }

    pub(crate) async fn complete(&self, completion: Completion) -> Result<ReportResponse, Status> {
        let message = CompleteRequest {
            worker_id: self.worker_id.clone(),
            completions: vec![completion],
        };
        let request = self.request(message, Some(REPORT_TIMEOUT));
        Ok(self.client.clone().complete(request).await?.into_inner())
    }

    pub(crate) async fn fail(&self, failure: Failure) -> Result<ReportResponse, Status> {
        let message = FailRequest {
            worker_id: self.worker_id.clone(),
            failures: vec![failure],
        };
        let request = self.request(message, Some(REPORT_TIMEOUT));
        Ok(self.client.clone().fail(request).await?.into_inner())
    }
}
