//! `WorkerService`: the stream that pushes assignments and the unary reports.
//!
//! A batch report answers each report in `results`; a request with exactly
//! one report that is rejected fails the call with that report's status, so
//! grpcurl users and simple clients see `FAILED_PRECONDITION` directly.

use std::pin::Pin;
use std::sync::Arc;

use stagecoach_proto::v1::{self as pb, worker_service_server::WorkerService};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::convert::{self, lease_to_pb};
use super::status::code_of;
use super::text::{Texts, checked};
use crate::auth::Caller;
use crate::domain::{LeaseToken, ReportAck};
use crate::engine::{Coordinator, Instance, WorkerEvent, WorkerSpec};
use crate::error::{Error, Result};

/// The worker API.
pub struct WorkerApi {
    core: Arc<Coordinator>,
}

impl WorkerApi {
    pub fn new(core: Arc<Coordinator>) -> Self {
        Self { core }
    }
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::WorkerMessage, Status>> + Send>>;

/// Unregisters the worker when its stream is dropped (client gone or
/// shutdown), so it is not offered work it can no longer receive.
struct Registration {
    core: Arc<Coordinator>,
    worker_id: String,
    conn: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        tracing::info!(worker_id = %self.worker_id, "worker stream closed");
        self.core.unsubscribe(&self.worker_id, self.conn);
    }
}

fn worker_stream(
    welcome: pb::WorkerMessage,
    rx: mpsc::UnboundedReceiver<WorkerEvent>,
    registration: Registration,
) -> SubscribeStream {
    let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |e| {
        // The closure owns the registration: dropping the stream drops it.
        let _keep = &registration;
        Ok(convert::worker_event_to_pb(e))
    });
    Box::pin(tokio_stream::once(Ok(welcome)).chain(events))
}

fn results(
    leases: Vec<LeaseToken>,
    outcomes: Vec<Result<ReportAck>>,
) -> Result<pb::ReportResponse, Status> {
    if outcomes.len() == 1
        && let Some(Err(_)) = outcomes.first()
    {
        let Some(Err(e)) = outcomes.into_iter().next() else {
            unreachable!()
        };
        return Err(e.into());
    }
    let results = leases
        .into_iter()
        .zip(outcomes)
        .map(|(lease, r)| match r {
            Ok(ack) => pb::ReportResult {
                lease: Some(lease_to_pb(lease)),
                accepted: true,
                duplicate: ack == ReportAck::Duplicate,
                code: 0,
                message: String::new(),
            },
            Err(e) => pb::ReportResult {
                lease: Some(lease_to_pb(lease)),
                accepted: false,
                duplicate: false,
                code: code_of(&e) as i32,
                message: e.to_string(),
            },
        })
        .collect();
    Ok(pb::ReportResponse { results })
}

/// A heartbeat or report names the worker id it subscribed with, 1-200
/// characters as Subscribe requires: a longer one names no worker, and
/// would only be stored in the REPORT_REJECTED event it causes.
fn require_worker_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 200 {
        return Err(Error::invalid(
            "worker_id",
            "the worker_id given to Subscribe is required (1-200 characters)",
        ));
    }
    Ok(())
}

/// The request, once its strings are checked and the worker id it names is
/// one the caller's token may act as (a worker token may be bound to worker
/// ids: `auth::Caller::may_act_as`). This check reads the body, so it is
/// here and not in the auth layer, which sees only the call's headers.
fn as_worker<T: Texts>(req: Request<T>, worker_id: fn(&T) -> &String) -> Result<T, Status> {
    let caller = req.extensions().get::<Caller>().cloned();
    let r = checked(req)?;
    if let Some(caller) = caller {
        caller.may_act_as(worker_id(&r))?;
    }
    Ok(r)
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = as_worker(req, |r| &r.worker_id)?;
        let spec = WorkerSpec {
            worker_id: r.worker_id,
            name: r.name,
            kinds: r.kinds,
            slots: r.slots,
        };
        let (conn, rx) = self
            .core
            .subscribe(spec.clone(), Instance(r.instance))
            .await?;
        tracing::info!(worker_id = %spec.worker_id, kinds = ?spec.kinds, slots = spec.slots, "worker subscribed");
        let timing = self.core.timing();
        let welcome = pb::WorkerMessage {
            message: Some(pb::worker_message::Message::Welcome(pb::Welcome {
                heartbeat_interval_ms: timing.heartbeat_interval.as_millis() as u32,
                lease_duration_ms: timing.lease_duration.as_millis() as u32,
            })),
        };
        let registration = Registration {
            core: self.core.clone(),
            worker_id: spec.worker_id,
            conn,
        };
        Ok(Response::new(worker_stream(welcome, rx, registration)))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = as_worker(req, |r| &r.worker_id)?;
        require_worker_id(&r.worker_id)?;
        let leases = r
            .leases
            .iter()
            .enumerate()
            .map(|(i, s)| convert::lease_status_from_pb(i, s))
            .collect::<Result<Vec<_>>>()?;
        let out = self.core.heartbeat(&r.worker_id, &leases).await?;
        Ok(Response::new(pb::HeartbeatResponse {
            renewed: out
                .renewed
                .into_iter()
                .map(|(lease, at)| pb::LeaseRenewal {
                    lease: Some(lease_to_pb(lease)),
                    expires_at: Some(convert::timestamp(at)),
                })
                .collect(),
            cancel: out
                .cancel
                .into_iter()
                .map(|(lease, reason)| pb::CancelNotice {
                    lease: Some(lease_to_pb(lease)),
                    reason,
                })
                .collect(),
        }))
    }

    async fn complete(
        &self,
        req: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let r = as_worker(req, |r| &r.worker_id)?;
        require_worker_id(&r.worker_id)?;
        if r.completions.is_empty() {
            return Err(Error::invalid("completions", "send at least one completion").into());
        }
        let reports = r
            .completions
            .into_iter()
            .enumerate()
            .map(|(i, c)| convert::completion_from_pb(i, c))
            .collect::<Result<Vec<_>>>()?;
        let leases = reports.iter().map(|c| c.lease).collect();
        let outcomes = self.core.complete(&r.worker_id, &reports).await;
        Ok(Response::new(results(leases, outcomes)?))
    }

    async fn fail(
        &self,
        req: Request<pb::FailRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let r = as_worker(req, |r| &r.worker_id)?;
        require_worker_id(&r.worker_id)?;
        if r.failures.is_empty() {
            return Err(Error::invalid("failures", "send at least one failure").into());
        }
        let reports = r
            .failures
            .into_iter()
            .enumerate()
            .map(|(i, f)| convert::failure_from_pb(i, f))
            .collect::<Result<Vec<_>>>()?;
        let leases = reports.iter().map(|f| f.lease).collect();
        let outcomes = self.core.fail(&r.worker_id, &reports).await;
        Ok(Response::new(results(leases, outcomes)?))
    }
}
