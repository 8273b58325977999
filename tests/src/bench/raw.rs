//! A raw in-process worker on the generated `WorkerServiceClient`: it
//! subscribes, stamps every assignment the instant it is read off the
//! stream, heartbeats so it stays eligible (and its leases stay live), and
//! completes tasks only when the bench says so. No SDK in between, so the
//! latencies measured are the coordinator's and the network's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use stagecoach_proto::v1::worker_message::Message;
use stagecoach_proto::v1::worker_service_client::WorkerServiceClient;
use stagecoach_proto::v1::{
    Assignment, CompleteRequest, Completion, HeartbeatRequest, LeaseStatus, LeaseToken, NewTask,
    SubscribeRequest,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;

/// An assignment and the instant it came off the stream.
#[derive(Debug)]
pub struct Arrival {
    pub at: Instant,
    pub assignment: Assignment,
}

impl Arrival {
    /// The assignment's lease token.
    pub fn lease(&self) -> anyhow::Result<LeaseToken> {
        self.assignment
            .lease
            .context("an assignment without a lease token")
    }
}

/// Leases held, by (task id, attempt), with their secrets.
type Held = Arc<Mutex<HashMap<(i64, u32), u64>>>;

/// A subscribed raw worker; its background tasks stop when it is dropped.
pub struct RawWorker {
    id: String,
    client: WorkerServiceClient<Channel>,
    arrivals: mpsc::UnboundedReceiver<Arrival>,
    held: Held,
    tasks: Vec<JoinHandle<()>>,
}

impl RawWorker {
    /// Subscribes as `id` for `kinds` with `slots` slots and waits for the
    /// Welcome.
    pub async fn subscribe(
        channel: Channel,
        id: &str,
        kinds: &[&str],
        slots: u32,
    ) -> anyhow::Result<RawWorker> {
        let client = WorkerServiceClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let mut stream = client
            .clone()
            .subscribe(SubscribeRequest {
                worker_id: id.to_string(),
                kinds: kinds.iter().map(|k| k.to_string()).collect(),
                slots,
                name: "bench raw worker".into(),
                instance: 0,
            })
            .await
            .context("Subscribe")?
            .into_inner();
        let interval = match stream.message().await.context("the Welcome")? {
            Some(m) => match m.message {
                Some(Message::Welcome(w)) => Duration::from_millis(w.heartbeat_interval_ms.into()),
                other => bail!("the first message was not a Welcome: {other:?}"),
            },
            None => bail!("the Subscribe stream ended before its Welcome"),
        };
        let held: Held = Arc::default();
        let (tx, arrivals) = mpsc::unbounded_channel();
        let reader = {
            let held = held.clone();
            tokio::spawn(async move {
                while let Ok(Some(msg)) = stream.message().await {
                    let at = Instant::now();
                    match msg.message {
                        Some(Message::Assignment(assignment)) => {
                            if let Some(l) = assignment.lease {
                                lock(&held).insert((l.task_id, l.attempt), assignment.lease_secret);
                            }
                            if tx.send(Arrival { at, assignment }).is_err() {
                                return;
                            }
                        }
                        Some(Message::Cancel(c)) => {
                            if let Some(l) = c.lease {
                                lock(&held).remove(&(l.task_id, l.attempt));
                            }
                        }
                        _ => {}
                    }
                }
                // Dropping `tx` tells `next` the stream is gone.
            })
        };
        let heartbeat = {
            let (mut client, held, id) = (client.clone(), held.clone(), id.to_string());
            tokio::spawn(async move {
                // The coordinator offers work only to workers heard from
                // recently, and leases expire without renewal.
                let mut tick = tokio::time::interval(interval);
                loop {
                    tick.tick().await;
                    let leases = lock(&held)
                        .iter()
                        .map(|(&(task_id, attempt), &lease_secret)| LeaseStatus {
                            lease: Some(LeaseToken { task_id, attempt }),
                            lease_secret,
                            ..Default::default()
                        })
                        .collect();
                    let _ = client
                        .heartbeat(HeartbeatRequest {
                            worker_id: id.clone(),
                            leases,
                        })
                        .await;
                }
            })
        };
        Ok(RawWorker {
            id: id.to_string(),
            client,
            arrivals,
            held,
            tasks: vec![reader, heartbeat],
        })
    }

    /// The next assignment, waiting at most `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<Arrival> {
        match tokio::time::timeout(timeout, self.arrivals.recv()).await {
            Ok(Some(a)) => Ok(a),
            Ok(None) => bail!("raw worker {}: the Subscribe stream ended", self.id),
            Err(_) => bail!("raw worker {}: no assignment within {timeout:?}", self.id),
        }
    }

    /// Completes `lease` (adding `add_tasks` to later stages) and returns
    /// the instant the reply arrived.
    pub async fn complete(
        &self,
        lease: LeaseToken,
        add_tasks: Vec<NewTask>,
    ) -> anyhow::Result<Instant> {
        complete(&self.client, &self.id, &self.held, lease, add_tasks).await
    }

    /// A handle that completes tasks from other tasks (for concurrent
    /// completions).
    pub fn completer(&self) -> Completer {
        Completer {
            client: self.client.clone(),
            id: self.id.clone(),
            held: self.held.clone(),
        }
    }
}

impl Drop for RawWorker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Completes tasks of one raw worker; cheap to clone.
#[derive(Clone)]
pub struct Completer {
    client: WorkerServiceClient<Channel>,
    id: String,
    held: Held,
}

impl Completer {
    /// Like [`RawWorker::complete`].
    pub async fn complete(
        &self,
        lease: LeaseToken,
        add_tasks: Vec<NewTask>,
    ) -> anyhow::Result<Instant> {
        complete(&self.client, &self.id, &self.held, lease, add_tasks).await
    }
}

async fn complete(
    client: &WorkerServiceClient<Channel>,
    id: &str,
    held: &Held,
    lease: LeaseToken,
    add_tasks: Vec<NewTask>,
) -> anyhow::Result<Instant> {
    let lease_secret = lock(held)
        .get(&(lease.task_id, lease.attempt))
        .copied()
        .unwrap_or(0);
    client
        .clone()
        .complete(CompleteRequest {
            worker_id: id.to_string(),
            completions: vec![Completion {
                lease: Some(lease),
                output: None,
                add_tasks,
                lease_secret,
            }],
        })
        .await
        .with_context(|| {
            format!(
                "Complete of task {} attempt {}",
                lease.task_id, lease.attempt
            )
        })?;
    let at = Instant::now();
    lock(held).remove(&(lease.task_id, lease.attempt));
    Ok(at)
}

fn lock(held: &Held) -> std::sync::MutexGuard<'_, HashMap<(i64, u32), u64>> {
    // Every update is one insert or remove: a poisoned set is consistent.
    held.lock().unwrap_or_else(|e| e.into_inner())
}
