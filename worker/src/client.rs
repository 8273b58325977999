//! The worker's side of `WorkerService`: one lazily connected channel per
//! coordinator address, which of them the Subscribe stream is on, and the
//! worker id and credentials every call carries.
//!
//! Each channel reconnects by itself after its coordinator goes away; a call
//! made while it is down fails fast with `UNAVAILABLE`.
//!
//! With several addresses (coordinators sharing one database), unary calls
//! go first to the coordinator the stream is on, and a call that finds it
//! unreachable is tried on the others, in the worker's order, before its
//! caller backs off. That is safe because every call is idempotent and every
//! coordinator of the database knows every lease (they are keyed by worker id
//! and fencing token, not by connection).
//!
//! The addresses are shuffled once per worker, and the stream moves through
//! them round-robin in that order: a fleet spreads over the coordinators at
//! start, and the workers of a coordinator that dies spread over the others
//! instead of all landing on its neighbour in the list.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rand::seq::SliceRandom;
use stagecoach_proto::v1::worker_service_client::WorkerServiceClient;
use stagecoach_proto::v1::{
    CompleteRequest, Completion, FailRequest, Failure, HeartbeatRequest, HeartbeatResponse,
    LeaseStatus, ReportResponse, SubscribeRequest, WorkerMessage,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};
use tracing::debug;

use crate::builder::Config;

/// How long one report may take before it is retried.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

type Client = WorkerServiceClient<Channel>;

struct Target {
    url: String,
    client: Client,
}

pub(crate) struct Coordinator {
    /// In this worker's (shuffled) order; never empty.
    targets: Vec<Target>,
    /// Index into `targets` of the coordinator the stream is on, or was last
    /// on: unary calls start there.
    current: AtomicUsize,
    worker_id: String,
    authorization: Option<MetadataValue<Ascii>>,
}

impl Coordinator {
    /// Must be called inside a Tokio runtime: the channels spawn their
    /// connection tasks (lazily, on first use).
    pub(crate) fn new(config: &Config) -> Self {
        let mut targets: Vec<Target> = config
            .coordinators
            .iter()
            .map(|a| Target {
                url: a.url.clone(),
                client: WorkerServiceClient::new(a.endpoint.connect_lazy()),
            })
            .collect();
        targets.shuffle(&mut rand::rng());
        Self {
            targets,
            current: AtomicUsize::new(0),
            worker_id: config.worker_id.clone(),
            authorization: config.authorization.clone(),
        }
    }

    pub(crate) fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// How many addresses there are.
    pub(crate) fn len(&self) -> usize {
        self.targets.len()
    }

    /// The address at `index` (in this worker's order).
    pub(crate) fn url(&self, index: usize) -> &str {
        &self.targets[index % self.targets.len()].url
    }

    /// The index after `index`, round-robin.
    pub(crate) fn next(&self, index: usize) -> usize {
        (index + 1) % self.targets.len()
    }

    fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
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

    /// Opens the stream on the coordinator at `index`; once it is open, unary
    /// calls go there first. `instance` is the run's secret that lets it
    /// take its own worker id's stream over when it reconnects before the
    /// coordinator noticed the old stream die.
    pub(crate) async fn subscribe(
        &self,
        index: usize,
        kinds: Vec<String>,
        slots: u32,
        name: String,
        instance: u64,
    ) -> Result<Streaming<WorkerMessage>, Status> {
        let index = index % self.targets.len();
        let message = SubscribeRequest {
            worker_id: self.worker_id.clone(),
            kinds,
            slots,
            name,
            instance,
        };
        // No timeout: the stream lives as long as the connection.
        let response = self.targets[index]
            .client
            .clone()
            .subscribe(self.request(message, None))
            .await?;
        self.current.store(index, Ordering::Relaxed);
        Ok(response.into_inner())
    }

    /// Runs `call` against the current coordinator and, while the answer
    /// says the coordinator could not be reached, against each other one in
    /// turn. Returns the first answer that came from a coordinator, or the
    /// last failure to reach one.
    async fn with_failover<T, F, Fut>(&self, what: &str, call: F) -> Result<T, Status>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let start = self.current();
        let mut index = start;
        loop {
            let result = call(self.targets[index].client.clone()).await;
            match result {
                Err(status) if unreachable(&status) => {
                    let next = self.next(index);
                    if next == start {
                        return Err(status);
                    }
                    debug!(
                        call = what,
                        coordinator = %self.targets[index].url,
                        code = ?status.code(),
                        error = %status.message(),
                        next = %self.targets[next].url,
                        "coordinator unreachable; trying the next one"
                    );
                    index = next;
                }
                answered => {
                    if index != start {
                        debug!(call = what, coordinator = %self.targets[index].url, "answered by another coordinator");
                    }
                    return answered;
                }
            }
        }
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
        self.with_failover("Heartbeat", |mut client| {
            let request = self.request(message.clone(), Some(timeout));
            async move { Ok(client.heartbeat(request).await?.into_inner()) }
        })
        .await
    }

    pub(crate) async fn complete(
        &self,
        completions: Vec<Completion>,
    ) -> Result<ReportResponse, Status> {
        let message = CompleteRequest {
            worker_id: self.worker_id.clone(),
            completions,
        };
        self.with_failover("Complete", |mut client| {
            let request = self.request(message.clone(), Some(REPORT_TIMEOUT));
            async move { Ok(client.complete(request).await?.into_inner()) }
        })
        .await
    }

    pub(crate) async fn fail(&self, failures: Vec<Failure>) -> Result<ReportResponse, Status> {
        let message = FailRequest {
            worker_id: self.worker_id.clone(),
            failures,
        };
        self.with_failover("Fail", |mut client| {
            let request = self.request(message.clone(), Some(REPORT_TIMEOUT));
            async move { Ok(client.fail(request).await?.into_inner()) }
        })
        .await
    }
}

/// Answers that say the coordinator was not reached (or did not answer in
/// time), so another coordinator of the same database may do better:
/// `UNAVAILABLE` (refused or dropped connection), a server-side deadline, and
/// the client's own timeout, which tonic reports as `CANCELLED` — a
/// coordinator that vanished without closing the connection answers nothing
/// until the HTTP/2 keep-alive gives up on it, and its heartbeats must not
/// wait that long.
fn unreachable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{TaskOutput, Worker};

    fn coordinator(urls: &[&str]) -> Coordinator {
        let worker = Worker::builder()
            .coordinators(urls.iter().copied())
            .handler("noop", |_ctx| async { Ok(TaskOutput::empty()) })
            .build()
            .unwrap();
        Coordinator::new(&worker.config)
    }

    #[tokio::test]
    async fn round_robin_visits_every_address_once_per_round() {
        let urls = ["http://a:1", "http://b:1", "http://c:1"];
        let c = coordinator(&urls);
        let mut seen: Vec<&str> = Vec::new();
        let mut index = 0;
        for _ in 0..urls.len() {
            seen.push(c.url(index));
            index = c.next(index);
        }
        assert_eq!(index, 0, "a round ends where it started");
        seen.sort();
        assert_eq!(seen, urls);

        let single = coordinator(&["http://lb:1"]);
        assert_eq!(single.next(0), 0);
        assert_eq!(single.url(single.next(0)), "http://lb:1");
    }

    #[tokio::test]
    async fn the_order_differs_between_workers() {
        let urls = ["http://a:1", "http://b:1", "http://c:1", "http://d:1"];
        let firsts: std::collections::HashSet<String> = (0..200)
            .map(|_| coordinator(&urls).url(0).to_string())
            .collect();
        // 200 workers all starting at one of four addresses: chance 4^-199.
        assert!(firsts.len() > 1, "{firsts:?}");
    }

    #[test]
    fn only_unreachable_coordinators_are_skipped() {
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Cancelled] {
            assert!(unreachable(&Status::new(code, "x")), "{code:?}");
        }
        for code in [
            Code::FailedPrecondition,
            Code::NotFound,
            Code::InvalidArgument,
            Code::Internal,
            Code::Unauthenticated,
        ] {
            assert!(!unreachable(&Status::new(code, "x")), "{code:?}");
        }
    }
}
