//! A hand-rolled worker over raw gRPC, for tests that must control exactly
//! which reports reach the coordinator and when: duplicates, late reports
//! with a stale fencing token, reports for tasks never assigned, batches.
//!
//! [`FakeWorker::subscribe`] opens a `Subscribe` stream, checks that its
//! first message is a `Welcome`, and then, in the background, collects what
//! the stream sends and heartbeats at the interval the coordinator asked for
//! (renewing every lease it was assigned, unless told otherwise). Heartbeats
//! matter even without leases: the coordinator only offers work to workers
//! it heard from recently. Reports are never sent on their own: the test
//! calls [`FakeWorker::complete`] or [`FakeWorker::fail`], and every call is
//! counted ([`FakeWorker::report_calls`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value as Json;
use stagecoach_proto::json::json_to_struct;
use stagecoach_proto::v1::worker_message::Message;
use stagecoach_proto::v1::worker_service_client::WorkerServiceClient;
use stagecoach_proto::v1::{
    Assignment, CancelNotice, CompleteRequest, Completion, FailRequest, Failure, HeartbeatRequest,
    LeaseStatus, LeaseToken, NewTask, ReportResponse, SubscribeRequest,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::transport::Channel;

/// A worker the test drives by hand.
#[derive(Debug)]
pub struct FakeWorker {
    id: String,
    client: WorkerServiceClient<Channel>,
    inbox: mpsc::UnboundedReceiver<Message>,
    /// Leases the heartbeat loop renews.
    renewing: Arc<Mutex<Vec<LeaseToken>>>,
    /// The `lease_secret` of every assignment received, by (task, attempt):
    /// filled into reports and heartbeats that leave it 0, as the SDK does.
    secrets: Secrets,
    /// When set, the heartbeat loop sends nothing at all.
    silent: Arc<AtomicBool>,
    /// When set, new assignments are not added to `renewing`.
    no_renew: Arc<AtomicBool>,
    report_calls: AtomicUsize,
    cancels: Vec<CancelNotice>,
    background: Vec<JoinHandle<()>>,
}

impl FakeWorker {
    /// Subscribes as `id` for `kinds` with `slots` slots on the coordinator
    /// at `url` (`http://ADDR`). Panics if the first message is not a
    /// `Welcome`.
    pub async fn subscribe(url: &str, id: &str, kinds: &[&str], slots: u32) -> FakeWorker {
        let channel = Channel::from_shared(url.to_string())
            .expect("coordinator url")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("fake worker {id}: connect to {url}: {e}"));
        let mut client = WorkerServiceClient::new(channel);
        let mut stream = client
            .subscribe(SubscribeRequest {
                worker_id: id.to_string(),
                kinds: kinds.iter().map(|k| k.to_string()).collect(),
                slots,
                name: format!("fake worker {id}"),
                instance: 0,
            })
            .await
            .unwrap_or_else(|s| panic!("fake worker {id}: Subscribe: {s}"))
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
        let welcome = match first {
            Ok(Ok(Some(m))) => match m.message {
                Some(Message::Welcome(w)) => w,
                other => panic!("fake worker {id}: first message is not a Welcome: {other:?}"),
            },
            other => panic!("fake worker {id}: no Welcome: {other:?}"),
        };

        let (tx, inbox) = mpsc::unbounded_channel();
        let renewing = Arc::new(Mutex::new(Vec::new()));
        let secrets = Secrets::default();
        let silent = Arc::new(AtomicBool::new(false));
        let no_renew = Arc::new(AtomicBool::new(false));
        let reader = {
            let (renewing, no_renew) = (renewing.clone(), no_renew.clone());
            let secrets = secrets.clone();
            tokio::spawn(async move {
                while let Ok(Some(m)) = stream.message().await {
                    let Some(m) = m.message else { continue };
                    if let Message::Assignment(a) = &m
                        && let Some(lease) = a.lease
                    {
                        lock(&secrets.0).insert(key(lease), a.lease_secret);
                    }
                    if let Message::Assignment(a) = &m
                        && !no_renew.load(Ordering::SeqCst)
                        && let Some(lease) = a.lease
                    {
                        lock(&renewing).push(lease);
                    }
                    if tx.send(m).is_err() {
                        return;
                    }
                }
            })
        };
        let interval = Duration::from_millis(welcome.heartbeat_interval_ms.max(10).into());
        let heartbeats = {
            let (mut client, id) = (client.clone(), id.to_string());
            let (renewing, silent) = (renewing.clone(), silent.clone());
            let secrets = secrets.clone();
            tokio::spawn(async move {
                loop {
                    if !silent.load(Ordering::SeqCst) {
                        let leases = lock(&renewing)
                            .iter()
                            .map(|l| LeaseStatus {
                                lease: Some(*l),
                                lease_secret: secrets.of(*l),
                                ..Default::default()
                            })
                            .collect();
                        let req = HeartbeatRequest {
                            worker_id: id.clone(),
                            leases,
                        };
                        // A lost heartbeat is what some tests want; never fail here.
                        let _ = client.heartbeat(req).await;
                    }
                    tokio::time::sleep(interval).await;
                }
            })
        };
        FakeWorker {
            id: id.to_string(),
            client,
            inbox,
            renewing,
            secrets,
            silent,
            no_renew,
            report_calls: AtomicUsize::new(0),
            cancels: Vec::new(),
            background: vec![reader, heartbeats],
        }
    }

    /// The id it subscribed with.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Waits for the next assignment, keeping cancel notices that arrive
    /// before it (see [`Self::cancels`]). Panics after `timeout`.
    pub async fn next_assignment(&mut self, timeout: Duration) -> Assignment {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.inbox.recv()).await {
                Ok(Some(Message::Assignment(a))) => return a,
                Ok(Some(Message::Cancel(c))) => self.cancels.push(c),
                Ok(Some(Message::Welcome(_))) => {}
                Ok(None) => panic!("fake worker {}: the stream ended", self.id),
                Err(_) => panic!("fake worker {}: no assignment within {timeout:?}", self.id),
            }
        }
    }

    /// Waits for a cancel notice for `lease`. Panics after `timeout`.
    pub async fn wait_for_cancel(&mut self, lease: LeaseToken, timeout: Duration) -> CancelNotice {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(c) = self.cancels.iter().find(|c| c.lease == Some(lease)) {
                return c.clone();
            }
            match tokio::time::timeout_at(deadline, self.inbox.recv()).await {
                Ok(Some(Message::Cancel(c))) => self.cancels.push(c),
                Ok(Some(other)) => panic!("fake worker {}: unexpected {other:?}", self.id),
                Ok(None) => panic!("fake worker {}: the stream ended", self.id),
                Err(_) => panic!(
                    "fake worker {}: no cancel notice for {lease:?} within {timeout:?}",
                    self.id
                ),
            }
        }
    }

    /// A client of the coordinator it subscribed to, for reports sent from
    /// other tasks while this one waits for assignments (not counted in
    /// [`Self::report_calls`]).
    pub fn raw_client(&self) -> WorkerServiceClient<Channel> {
        self.client.clone()
    }

    /// Cancel notices received so far while waiting for assignments.
    pub fn cancels(&self) -> &[CancelNotice] {
        &self.cancels
    }

    /// Stops every heartbeat: its leases run out, and the coordinator soon
    /// stops offering it work (as if the process hung).
    pub fn go_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
    }

    /// Keeps heartbeating but no longer renews `lease`, so it expires.
    pub fn stop_renewing(&self, lease: LeaseToken) {
        lock(&self.renewing).retain(|l| *l != lease);
    }

    /// From now on, leases it is assigned are not renewed.
    pub fn never_renew(&self) {
        self.no_renew.store(true, Ordering::SeqCst);
    }

    /// The `lease_secret` its assignment of `lease` carried (0: never
    /// assigned to it).
    pub fn secret_of(&self, lease: LeaseToken) -> u64 {
        self.secrets.of(lease)
    }

    /// Sends `Complete` with these completions as one call. A completion
    /// without a `lease_secret` gets the one of its lease's assignment to
    /// this worker, if there was one.
    pub async fn complete(
        &self,
        mut completions: Vec<Completion>,
    ) -> Result<ReportResponse, Status> {
        self.report_calls.fetch_add(1, Ordering::SeqCst);
        for c in &mut completions {
            if c.lease_secret == 0 {
                c.lease_secret = c.lease.map_or(0, |l| self.secrets.of(l));
            }
        }
        let req = CompleteRequest {
            worker_id: self.id.clone(),
            completions,
        };
        Ok(self.client.clone().complete(req).await?.into_inner())
    }

    /// Sends `Fail` with these failures as one call, filling in secrets as
    /// [`Self::complete`] does.
    pub async fn fail(&self, mut failures: Vec<Failure>) -> Result<ReportResponse, Status> {
        self.report_calls.fetch_add(1, Ordering::SeqCst);
        for f in &mut failures {
            if f.lease_secret == 0 {
                f.lease_secret = f.lease.map_or(0, |l| self.secrets.of(l));
            }
        }
        let req = FailRequest {
            worker_id: self.id.clone(),
            failures,
        };
        Ok(self.client.clone().fail(req).await?.into_inner())
    }

    /// How many `Complete` and `Fail` calls it made.
    pub fn report_calls(&self) -> usize {
        self.report_calls.load(Ordering::SeqCst)
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        for task in &self.background {
            task.abort();
        }
    }
}

/// A lease token.
pub fn lease(task_id: i64, attempt: u32) -> LeaseToken {
    LeaseToken { task_id, attempt }
}

/// A completion of `lease` with output `{}` that adds no tasks.
pub fn completion(lease: LeaseToken) -> Completion {
    Completion {
        lease: Some(lease),
        output: Some(json_to_struct(&serde_json::json!({}))),
        add_tasks: Vec::new(),
        // filled in by `FakeWorker::complete` for a lease it was assigned
        lease_secret: 0,
    }
}

/// A completion of `lease` that adds a task of `kind` to stage `stage`.
pub fn completion_adding(lease: LeaseToken, stage: &str, kind: &str, payload: &Json) -> Completion {
    Completion {
        add_tasks: vec![NewTask {
            stage: stage.to_string(),
            kind: kind.to_string(),
            payload: Some(json_to_struct(payload)),
            ..Default::default()
        }],
        ..completion(lease)
    }
}

/// A failure of `lease`.
pub fn failure(lease: LeaseToken, error: &str, retryable: bool) -> Failure {
    Failure {
        lease: Some(lease),
        error: error.to_string(),
        retryable,
        // filled in by `FakeWorker::fail` for a lease it was assigned
        lease_secret: 0,
    }
}

/// Lease secrets by (task id, attempt).
#[derive(Debug, Clone, Default)]
struct Secrets(Arc<Mutex<HashMap<(i64, u32), u64>>>);

impl Secrets {
    fn of(&self, lease: LeaseToken) -> u64 {
        lock(&self.0).get(&key(lease)).copied().unwrap_or(0)
    }
}

fn key(lease: LeaseToken) -> (i64, u32) {
    (lease.task_id, lease.attempt)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
