//! A scriptable in-process `WorkerService`: it records every call, and its
//! knobs make it refuse, drop streams, fail reports or withhold renewals,
//! so the SDK's runtime can be tested without the real coordinator.
//!
//! Each `Fake` is one coordinator; start two for failover tests. They share
//! nothing, and need not: a fake renews and accepts whatever lease it is
//! told about, as coordinators sharing one database would.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use stagecoach_proto::json::json_to_struct;
use stagecoach_proto::v1::worker_message::Message;
use stagecoach_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use stagecoach_proto::v1::{
    Assignment, CancelNotice, CompleteRequest, Completion, FailRequest, Failure, HeartbeatRequest,
    HeartbeatResponse, LeaseRenewal, LeaseToken, ReportResponse, ReportResult, SubscribeRequest,
    Welcome, WorkerMessage,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Code, Request, Response, Status};

pub type Stream = mpsc::UnboundedSender<Result<WorkerMessage, Status>>;

pub struct State {
    pub subscribes: Vec<SubscribeRequest>,
    pub heartbeats: Vec<HeartbeatRequest>,
    pub completions: Vec<Completion>,
    pub failures: Vec<Failure>,
    pub report_calls: u32,
    pub stream: Option<Stream>,
    pub heartbeat_interval_ms: u32,
    pub lease_duration_ms: u32,
    /// Fail this many report calls with UNAVAILABLE first.
    pub unavailable_reports: u32,
    /// Reject every report with this code.
    pub reject_reports: Option<Code>,
    /// Refuse Subscribe with this code.
    pub refuse_subscribe: Option<Code>,
    /// Renew the leases named in heartbeats.
    pub renew: bool,
    /// Cancel notices for the next heartbeat answer.
    pub cancel_in_heartbeat: Vec<CancelNotice>,
    /// Fail this many heartbeats with UNAVAILABLE first.
    pub unavailable_heartbeats: u32,
    /// Going away: every call fails with UNAVAILABLE and is not recorded.
    pub down: bool,
    /// Calls answered UNAVAILABLE because of `down`.
    pub calls_while_down: u32,
}

#[derive(Clone)]
pub struct Fake {
    state: Arc<Mutex<State>>,
}

impl Default for Fake {
    fn default() -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                subscribes: Vec::new(),
                heartbeats: Vec::new(),
                completions: Vec::new(),
                failures: Vec::new(),
                report_calls: 0,
                stream: None,
                heartbeat_interval_ms: 50,
                lease_duration_ms: 2000,
                unavailable_reports: 0,
                reject_reports: None,
                refuse_subscribe: None,
                renew: true,
                cancel_in_heartbeat: Vec::new(),
                unavailable_heartbeats: 0,
                down: false,
                calls_while_down: 0,
            })),
        }
    }
}

impl Fake {
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Serves on `listener` until the returned sender is dropped or fired.
    pub fn serve(&self, listener: TcpListener) -> oneshot::Sender<()> {
        let (stop, stopped) = oneshot::channel::<()>();
        let service = WorkerServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                }),
        );
        stop
    }

    /// Starts serving on a fresh port; returns its URL.
    pub async fn start(&self) -> (String, oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        (url, self.serve(listener))
    }

    /// Polls until `cond` holds ([`WAIT`] at most).
    pub async fn wait_for(&self, what: &str, cond: impl Fn(&State) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !cond(&self.state()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends a message on the current Subscribe stream.
    pub async fn send(&self, message: Message) {
        self.wait_for("a Subscribe stream", |s| s.stream.is_some())
            .await;
        let stream = self.state().stream.clone().unwrap();
        stream
            .send(Ok(WorkerMessage {
                message: Some(message),
            }))
            .unwrap();
    }

    pub async fn assign(&self, task_id: i64, kind: &str, payload: Value) {
        self.send(Message::Assignment(assignment(task_id, kind, payload)))
            .await;
    }

    /// Ends the current stream, as a coordinator restart would.
    pub fn drop_stream(&self) {
        self.state().stream = None;
    }

    /// Takes this coordinator away for good, as a shutdown or crash would:
    /// from now on every call fails with UNAVAILABLE, the stream ends, and
    /// the server (started with `start` or `serve`, whose stop handle this
    /// is) stops accepting connections.
    pub fn go_away(&self, server: oneshot::Sender<()>) {
        {
            let mut s = self.state();
            s.down = true;
            s.stream = None;
        }
        let _ = server.send(());
    }

    /// Whether anything subscribed here.
    pub fn subscribed(&self) -> bool {
        !self.state().subscribes.is_empty()
    }

    /// Whether some heartbeat here carried `lease`.
    pub fn heartbeat_named(&self, lease: LeaseToken) -> bool {
        self.state()
            .heartbeats
            .iter()
            .flat_map(|h| &h.leases)
            .any(|l| l.lease == Some(lease))
    }
}

/// Longest a test waits for the worker to do something; generous for a
/// loaded CI machine.
pub const WAIT: Duration = Duration::from_secs(30);

/// Polls until `cond` holds ([`WAIT`] at most); for conditions over several fakes.
pub async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn token(task_id: i64) -> LeaseToken {
    LeaseToken {
        task_id,
        attempt: 1,
    }
}

pub fn assignment(task_id: i64, kind: &str, payload: Value) -> Assignment {
    Assignment {
        lease: Some(token(task_id)),
        migration_id: 7,
        subject: "project/1".into(),
        stage_index: 0,
        stage_name: "only".into(),
        kind: kind.into(),
        payload: Some(json_to_struct(&payload)),
        parameters: Some(json_to_struct(&json!({"region": "eu"}))),
        lease_expires_at: None,
        checkpoint: Some(b"earlier".to_vec()),
        max_attempts: 3,
        lease_duration_ms: 0,
        lease_secret: secret(task_id),
    }
}

/// The `lease_secret` [`assignment`] gives task `task_id`'s lease.
pub fn secret(task_id: i64) -> u64 {
    0x5EC2_E700_0000_0000 | task_id as u64
}

fn accepted(leases: impl Iterator<Item = Option<LeaseToken>>) -> ReportResponse {
    ReportResponse {
        results: leases
            .map(|lease| ReportResult {
                lease,
                accepted: true,
                ..Default::default()
            })
            .collect(),
    }
}

impl Fake {
    /// UNAVAILABLE while `down`, as a coordinator on its way out answers.
    fn up(&self) -> Result<MutexGuard<'_, State>, Status> {
        let mut s = self.state();
        if s.down {
            s.calls_while_down += 1;
            return Err(Status::unavailable("coordinator shutting down"));
        }
        Ok(s)
    }

    fn report_gate(&self) -> Result<(), Status> {
        let mut s = self.up()?;
        s.report_calls += 1;
        if s.unavailable_reports > 0 {
            s.unavailable_reports -= 1;
            return Err(Status::unavailable("coordinator restarting"));
        }
        match s.reject_reports {
            Some(code) => Err(Status::new(code, "lease no longer held")),
            None => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl WorkerService for Fake {
    type SubscribeStream = UnboundedReceiverStream<Result<WorkerMessage, Status>>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut s = self.up()?;
        if let Some(code) = s.refuse_subscribe {
            return Err(Status::new(code, "bad worker"));
        }
        s.subscribes.push(request.into_inner());
        let (tx, rx) = mpsc::unbounded_channel();
        let welcome = Welcome {
            heartbeat_interval_ms: s.heartbeat_interval_ms,
            lease_duration_ms: s.lease_duration_ms,
        };
        tx.send(Ok(WorkerMessage {
            message: Some(Message::Welcome(welcome)),
        }))
        .unwrap();
        s.stream = Some(tx);
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let request = request.into_inner();
        let mut s = self.up()?;
        if s.unavailable_heartbeats > 0 {
            s.unavailable_heartbeats -= 1;
            return Err(Status::unavailable("coordinator restarting"));
        }
        let renewed = if s.renew {
            request
                .leases
                .iter()
                .map(|l| LeaseRenewal {
                    lease: l.lease,
                    expires_at: None,
                })
                .collect()
        } else {
            Vec::new()
        };
        let cancel = std::mem::take(&mut s.cancel_in_heartbeat);
        s.heartbeats.push(request);
        Ok(Response::new(HeartbeatResponse { renewed, cancel }))
    }

    async fn complete(
        &self,
        request: Request<CompleteRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        self.report_gate()?;
        let completions = request.into_inner().completions;
        let response = accepted(completions.iter().map(|c| c.lease));
        self.state().completions.extend(completions);
        Ok(Response::new(response))
    }

    async fn fail(
        &self,
        request: Request<FailRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        self.report_gate()?;
        let failures = request.into_inner().failures;
        let response = accepted(failures.iter().map(|f| f.lease));
        self.state().failures.extend(failures);
        Ok(Response::new(response))
    }
}
