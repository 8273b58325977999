//! [`Worker::run`]: subscribe, run assignments, reconnect, drain.
//!
//! Three things run at once, sharing a [`Runtime`]:
//! - the subscription loop (here): opens `Subscribe`, spawns one task per
//!   assignment, applies cancel notices, and on any end of the stream
//!   reconnects — to the next coordinator address when there are several,
//!   backing off after each full round ([`Rounds`]) — warning on every attempt
//!   so a worker never goes silently deaf;
//! - the heartbeat loop ([`crate::heartbeat`]);
//! - one task per assignment ([`crate::task`]), which reports its own
//!   outcome and so outlives any one stream.
//!
//! Shutdown is a future passed in by the caller (a signal in the binary, a
//! channel in tests). When it resolves the stream is dropped, so the
//! coordinator gives this worker no more work, and in-flight tasks get the
//! drain bound to finish and report.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use stagecoach_proto::json::struct_to_json;
use stagecoach_proto::v1::worker_message::Message;
use stagecoach_proto::v1::{Assignment, Completion, Failure, WorkerMessage};
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, Streaming};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::backoff::Backoff;
use crate::batch::Batcher;
use crate::builder::{Config, Worker};
use crate::client::Coordinator;
use crate::handler::{Handler, SharedProgress, TaskContext, TaskInfo};
use crate::heartbeat::heartbeat_loop;
use crate::leases::{LeaseTable, Timing};
use crate::task::{CANCEL_GRACE, execute};

/// How long canceled tasks get to hand their leases back after the drain
/// bound passed: enough for a handler ignoring cancellation to be dropped
/// (`CANCEL_GRACE`) and its failure reported.
const HAND_BACK_GRACE: Duration = Duration::from_secs(CANCEL_GRACE.as_secs() + 2);

/// Why [`Worker::run`] stopped without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The coordinator refused the subscription for a reason retrying cannot
    /// fix (bad request or credentials); with several addresses, every one of
    /// them refused since the last successful subscription.
    #[error("the coordinator at {coordinator} refused this worker ({code:?}): {message}")]
    Refused {
        coordinator: String,
        code: Code,
        message: String,
    },
}

/// State shared by the subscription loop, the heartbeat loop and the tasks.
pub(crate) struct Runtime {
    pub(crate) coordinator: Coordinator,
    pub(crate) leases: LeaseTable,
    /// One permit per slot; a task holds one from start to accepted report.
    pub(crate) slots: Arc<Semaphore>,
    /// Outcomes waiting to go out together (see `batch`).
    pub(crate) completions: Batcher<Completion>,
    pub(crate) failures: Batcher<Failure>,
    /// `None` until the first `Welcome`.
    timing: watch::Sender<Option<Timing>>,
}

impl Runtime {
    /// The coordinator's timing, or defaults before the first `Welcome`.
    pub(crate) fn timing(&self) -> Timing {
        self.timing.borrow().unwrap_or(Timing::from_welcome(0, 0))
    }

    pub(crate) fn watch_timing(&self) -> watch::Receiver<Option<Timing>> {
        self.timing.subscribe()
    }
}

impl Worker {
    /// Runs until `shutdown` resolves, then drains in-flight tasks (see
    /// [`WorkerBuilder::drain_timeout`](crate::WorkerBuilder::drain_timeout)).
    ///
    /// Losing the coordinator is not an error: the worker reconnects (to the
    /// next address, when it has several) with backoff for as long as it
    /// runs. It returns an error only when the coordinators refuse it
    /// outright.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        let Worker { config, handlers } = self;
        let rt = Arc::new(Runtime {
            coordinator: Coordinator::new(&config),
            leases: LeaseTable::default(),
            slots: Arc::new(Semaphore::new(config.slots as usize)),
            completions: Batcher::default(),
            failures: Batcher::default(),
            timing: watch::Sender::new(None),
        });
        let mut kinds: Vec<String> = handlers.keys().cloned().collect();
        kinds.sort();
        let coordinators: Vec<&str> = config.coordinators.iter().map(|a| a.url.as_str()).collect();
        info!(
            worker_id = %config.worker_id,
            coordinators = ?coordinators,
            slots = config.slots,
            kinds = ?kinds,
            "worker starting"
        );

        let stop_heartbeats = CancellationToken::new();
        let heartbeats = tokio::spawn(heartbeat_loop(rt.clone(), stop_heartbeats.clone()));
        let mut session = Session {
            rt,
            config,
            kinds,
            handlers,
            tasks: JoinSet::new(),
        };
        let result = session.subscribe_until(shutdown).await;
        if let Err(e) = &result {
            error!(error = %e, "stopping");
        }
        session.drain().await;
        stop_heartbeats.cancel();
        match heartbeats.await {
            Ok(stats) => info!(?stats, "worker stopped"),
            Err(e) => error!(error = %e, "heartbeat loop crashed"),
        }
        result
    }
}

struct Session {
    rt: Arc<Runtime>,
    config: Config,
    kinds: Vec<String>,
    handlers: HashMap<String, Arc<dyn Handler>>,
    tasks: JoinSet<()>,
}

/// Where the subscription loop is in its rounds over the coordinator
/// addresses.
///
/// A round tries every address once, moving on at once after a failed
/// connect or a lost stream; only a whole round without a `Welcome` backs
/// off. So a worker whose coordinator died is on the next one within one
/// connect attempt, while a fleet facing a cluster that is entirely down
/// still spreads its retries out exactly as with one address.
struct Rounds {
    /// Index of the address to try next (in the client's order).
    index: usize,
    /// Attempts since the last `Welcome` or back-off.
    failed: usize,
    /// Addresses that refused this worker since the last `Welcome`.
    refused: Vec<bool>,
    backoff: Backoff,
}

impl Rounds {
    fn new(addresses: usize) -> Self {
        Self {
            index: 0,
            failed: 0,
            refused: vec![false; addresses],
            backoff: Backoff::default(),
        }
    }

    /// An attempt ended (connect failed, refused, or the stream ended):
    /// how long to wait before the next one, which is zero inside a round.
    fn failed_attempt(&mut self) -> Duration {
        self.failed += 1;
        if self.failed < self.refused.len() {
            return Duration::ZERO;
        }
        self.failed = 0;
        self.backoff.next_delay()
    }

    /// A stream is open and answered: everything starts over.
    fn welcomed(&mut self) {
        self.failed = 0;
        self.refused.fill(false);
        self.backoff.reset();
    }
}

impl Session {
    /// Keeps a Subscribe stream open until `shutdown` resolves.
    async fn subscribe_until(
        &mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), WorkerError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut rounds = Rounds::new(self.rt.coordinator.len());
        // Proves to a coordinator that a reconnect is this run's, not
        // another process's using the same worker id (WorkerService.Subscribe).
        let instance = rand::random::<u64>().max(1);
        loop {
            let rt = self.rt.clone();
            let url = rt.coordinator.url(rounds.index).to_string();
            let subscribe = rt.coordinator.subscribe(
                rounds.index,
                self.kinds.clone(),
                self.config.slots,
                self.config.name.clone(),
                instance,
            );
            let subscribed = tokio::select! {
                () = &mut shutdown => return Ok(()),
                subscribed = subscribe => subscribed,
            };
            match subscribed {
                Ok(stream) => {
                    let why = tokio::select! {
                        () = &mut shutdown => return Ok(()),
                        why = self.serve(stream, &mut rounds) => why,
                    };
                    warn!(coordinator = %url, reason = %why, "lost the Subscribe stream");
                }
                Err(status) if refused(&status) => {
                    rounds.refused[rounds.index] = true;
                    if rounds.refused.iter().all(|r| *r) {
                        return Err(WorkerError::Refused {
                            coordinator: url,
                            code: status.code(),
                            message: status.message().to_string(),
                        });
                    }
                    // Another coordinator may be configured differently (a
                    // rolling change of tokens); give up only when all refuse.
                    warn!(coordinator = %url, code = ?status.code(), error = %status.message(), "the coordinator refused this worker");
                }
                Err(status) => {
                    warn!(coordinator = %url, code = ?status.code(), error = %status.message(), "could not subscribe");
                }
            }
            self.reap();
            let delay = rounds.failed_attempt();
            let next = rt.coordinator.next(rounds.index);
            if next == rounds.index {
                warn!(
                    coordinator = %url,
                    attempt = rounds.backoff.attempt(),
                    retry_in_ms = delay.as_millis() as u64,
                    held_leases = self.rt.leases.len(),
                    "reconnecting to the coordinator"
                );
            } else {
                warn!(
                    from = %url,
                    to = %rt.coordinator.url(next),
                    attempt = rounds.backoff.attempt(),
                    retry_in_ms = delay.as_millis() as u64,
                    held_leases = self.rt.leases.len(),
                    "switching to another coordinator"
                );
            }
            rounds.index = next;
            if !delay.is_zero() {
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    /// Reads one stream until it ends; returns why it ended.
    async fn serve(&mut self, mut stream: Streaming<WorkerMessage>, rounds: &mut Rounds) -> String {
        loop {
            tokio::select! {
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => log_join(joined),
                message = stream.message() => match message {
                    Ok(Some(WorkerMessage { message: Some(message) })) => self.handle(message, rounds),
                    Ok(Some(WorkerMessage { message: None })) => debug!("empty message on the stream"),
                    Ok(None) => return "the coordinator closed the stream".to_string(),
                    Err(status) => return format!("{:?}: {}", status.code(), status.message()),
                },
            }
        }
    }

    fn handle(&mut self, message: Message, rounds: &mut Rounds) {
        match message {
            Message::Welcome(welcome) => {
                let timing =
                    Timing::from_welcome(welcome.heartbeat_interval_ms, welcome.lease_duration_ms);
                self.rt.timing.send_replace(Some(timing));
                rounds.welcomed();
                info!(
                    worker_id = %self.config.worker_id,
                    coordinator = %self.rt.coordinator.url(rounds.index),
                    heartbeat_interval_ms = timing.heartbeat_interval.as_millis() as u64,
                    lease_duration_ms = timing.lease_duration.as_millis() as u64,
                    "subscribed"
                );
            }
            Message::Assignment(assignment) => self.assign(assignment),
            Message::Cancel(notice) => {
                let Some(token) = notice.lease else { return };
                if self.rt.leases.revoke(token, &notice.reason) {
                    info!(task_id = token.task_id, attempt = token.attempt, reason = %notice.reason, "coordinator canceled a task");
                } else {
                    debug!(
                        task_id = token.task_id,
                        attempt = token.attempt,
                        "cancel notice for a lease not held"
                    );
                }
            }
        }
    }

    fn assign(&mut self, a: Assignment) {
        let Some(lease) = a.lease else {
            warn!(kind = %a.kind, "assignment without a lease token; ignoring it");
            return;
        };
        let progress = SharedProgress::default();
        let cancel = CancellationToken::new();
        // The lease started on the coordinator a moment before it arrived
        // here; the local lease's margin covers that delivery time.
        let duration =
            (a.lease_duration_ms > 0).then(|| Duration::from_millis(a.lease_duration_ms.into()));
        if !self.rt.leases.insert_lease(
            lease,
            a.lease_secret,
            cancel.clone(),
            progress.clone(),
            Instant::now(),
            duration,
        ) {
            debug!(
                task_id = lease.task_id,
                attempt = lease.attempt,
                "repeated assignment; already running it"
            );
            return;
        }
        let span = info_span!(
            "task",
            task_id = lease.task_id,
            attempt = lease.attempt,
            kind = %a.kind,
            migration_id = a.migration_id,
        );
        span.in_scope(|| info!(subject = %a.subject, stage = %a.stage_name, "task assigned"));
        let handler = self.handlers.get(&a.kind).cloned();
        let info = TaskInfo {
            lease,
            migration_id: a.migration_id,
            stage_index: a.stage_index,
            payload: struct_to_json(a.payload.as_ref()),
            parameters: struct_to_json(a.parameters.as_ref()),
            checkpoint: a.checkpoint,
            max_attempts: a.max_attempts,
            subject: a.subject,
            stage_name: a.stage_name,
            kind: a.kind,
        };
        let ctx = TaskContext::new(info, progress, cancel);
        self.tasks
            .spawn(execute(self.rt.clone(), handler, ctx).instrument(span));
    }

    /// Collects tasks that already finished, without waiting.
    fn reap(&mut self) {
        while let Some(joined) = self.tasks.try_join_next() {
            log_join(joined);
        }
    }

    /// Lets in-flight tasks finish within the drain bound, then cancels
    /// them, gives them a short grace to hand their leases back, and
    /// abandons the rest (their leases expire on the coordinator).
    async fn drain(&mut self) {
        self.reap();
        if self.tasks.is_empty() {
            return;
        }
        let bound = self.config.drain_timeout;
        info!(
            in_flight = self.tasks.len(),
            drain_timeout_ms = bound.as_millis() as u64,
            "shutting down: finishing in-flight tasks"
        );
        if tokio::time::timeout(bound, join_all(&mut self.tasks))
            .await
            .is_ok()
        {
            info!("every in-flight task finished");
            return;
        }
        warn!(
            remaining = self.tasks.len(),
            "drain bound passed; canceling the remaining tasks"
        );
        self.rt.leases.cancel_all();
        if tokio::time::timeout(HAND_BACK_GRACE, join_all(&mut self.tasks))
            .await
            .is_err()
        {
            warn!(
                abandoned = self.tasks.len(),
                "tasks did not stop; abandoning them (their leases expire on the coordinator)"
            );
            self.tasks.shutdown().await;
        }
    }
}

/// Refusals that no retry can fix.
fn refused(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied
    )
}

async fn join_all(tasks: &mut JoinSet<()>) {
    while let Some(joined) = tasks.join_next().await {
        log_join(joined);
    }
}

fn log_join(joined: Result<(), JoinError>) {
    // Handler panics are caught inside the task; a panic here is a bug in
    // the runtime itself and must not go unnoticed.
    if let Err(e) = joined
        && e.is_panic()
    {
        error!(error = %e, "a task runner panicked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_round_of_failures_backs_off() {
        let mut rounds = Rounds::new(3);
        assert_eq!(rounds.failed_attempt(), Duration::ZERO);
        assert_eq!(rounds.failed_attempt(), Duration::ZERO);
        let first = rounds.failed_attempt();
        assert!(first > Duration::ZERO && first <= Duration::from_millis(100));
        assert_eq!(rounds.failed_attempt(), Duration::ZERO, "a new round");
        assert_eq!(rounds.failed_attempt(), Duration::ZERO);
        assert!(
            rounds.failed_attempt() >= Duration::from_millis(100),
            "doubled"
        );

        rounds.failed_attempt();
        rounds.refused[1] = true;
        rounds.welcomed();
        assert!(!rounds.refused.iter().any(|r| *r));
        assert_eq!(rounds.failed_attempt(), Duration::ZERO, "starts over");
        assert_eq!(rounds.failed_attempt(), Duration::ZERO);
        assert!(
            rounds.failed_attempt() <= Duration::from_millis(100),
            "reset"
        );
    }

    #[test]
    fn one_address_backs_off_after_every_failure_as_before() {
        let mut rounds = Rounds::new(1);
        assert!(rounds.failed_attempt() > Duration::ZERO);
        assert!(rounds.failed_attempt() > Duration::ZERO);
    }
}
