//! What a handler sees and returns: the [`Handler`] trait, the [`TaskContext`]
//! of one attempt, and its outcome, [`TaskOutput`] or [`TaskError`].
//!
//! These are the only types a handler author needs; everything about leases,
//! heartbeats and reporting stays in the runtime. Progress and checkpoints are
//! only *recorded* here (a cheap lock) and sent by the heartbeat loop, so a
//! handler may call [`TaskContext::progress`] on every row without flooding
//! the coordinator.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use futures::future::BoxFuture;
use serde_json::Value;
use stagecoach_proto::v1::{LeaseToken, RetryPolicy};
use tokio_util::sync::CancellationToken;

/// The code that runs one kind of task.
///
/// Any `Fn(TaskContext) -> impl Future<Output = Result<TaskOutput, TaskError>>`
/// (an `async fn` or a closure returning an `async` block) is a handler; a
/// struct that needs configuration may implement the trait directly and be
/// registered with [`WorkerBuilder::handler_impl`](crate::WorkerBuilder::handler_impl).
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt. Return [`TaskError::retryable`] for failures another
    /// attempt may fix and [`TaskError::fatal`] for the rest.
    fn run(&self, ctx: TaskContext) -> BoxFuture<'_, Result<TaskOutput, TaskError>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<TaskOutput, TaskError>> + Send + 'static,
{
    fn run(&self, ctx: TaskContext) -> BoxFuture<'_, Result<TaskOutput, TaskError>> {
        Box::pin(self(ctx))
    }
}

/// The result of a successful attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOutput {
    /// Stored with the task; any JSON object (other values are wrapped as
    /// `{"value": …}` on the wire).
    pub output: Value,
    /// Tasks to add to later stages of the same migration (fan-out).
    pub add_tasks: Vec<NewTask>,
}

impl TaskOutput {
    /// An output of `{}` that adds no tasks.
    pub fn empty() -> Self {
        Self::new(Value::Object(Default::default()))
    }

    /// An output that adds no tasks.
    pub fn new(output: Value) -> Self {
        Self {
            output,
            add_tasks: Vec::new(),
        }
    }

    /// Adds a task of `kind` to the later stage named `stage`.
    pub fn add_task(
        mut self,
        stage: impl Into<String>,
        kind: impl Into<String>,
        payload: Value,
    ) -> Self {
        self.add_tasks.push(NewTask::new(stage, kind, payload));
        self
    }
}

/// A task added at run time to a later stage of the same migration.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// Name of a later stage that has not started yet.
    pub stage: String,
    /// The handler to run.
    pub kind: String,
    /// The task's input, a JSON object.
    pub payload: Value,
    /// Attempts it gets; 0 means the stage's retry policy.
    pub max_attempts: u32,
    /// Its own retry and timeout settings: each non-zero field replaces the
    /// stage's.
    pub retry: Option<RetryPolicy>,
}

impl NewTask {
    /// A task that follows its stage's retry policy.
    pub fn new(stage: impl Into<String>, kind: impl Into<String>, payload: Value) -> Self {
        Self {
            stage: stage.into(),
            kind: kind.into(),
            payload,
            max_attempts: 0,
            retry: None,
        }
    }

    /// The same task with its own retry and timeout settings.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = Some(retry);
        self
    }
}

/// Why an attempt failed, and whether trying again may help.
///
/// Retry behaviour is part of the type: a retryable error makes the
/// coordinator try the task again (with backoff, while attempts remain); a
/// fatal one makes it dead at once and fails the migration with `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    /// What went wrong; becomes the migration's reason if the task dies.
    pub message: String,
    /// True when another attempt may succeed.
    pub retryable: bool,
}

impl TaskError {
    /// A failure another attempt may fix (a timeout, a busy resource).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure no retry can fix (bad input, failed verification).
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.retryable { "retryable" } else { "fatal" };
        write!(f, "{} ({kind})", self.message)
    }
}

impl std::error::Error for TaskError {}

/// The latest progress and checkpoint a handler recorded, shared between its
/// [`TaskContext`] and the lease table the heartbeat loop reads.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub(crate) done: u64,
    pub(crate) total: u64,
    pub(crate) checkpoint: Option<Vec<u8>>,
    /// Bumped on every saved checkpoint; the heartbeat loop sends the
    /// checkpoint only while `checkpoint_version > acked_version`.
    pub(crate) checkpoint_version: u64,
    pub(crate) acked_version: u64,
}

pub(crate) type SharedProgress = Arc<Mutex<Progress>>;

pub(crate) fn lock(progress: &SharedProgress) -> std::sync::MutexGuard<'_, Progress> {
    // A handler that panicked while holding the lock left plain numbers
    // behind, which are still meaningful.
    progress.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the coordinator said about one task, fixed for the attempt.
#[derive(Debug)]
pub(crate) struct TaskInfo {
    pub(crate) lease: LeaseToken,
    pub(crate) migration_id: i64,
    pub(crate) subject: String,
    pub(crate) stage_index: u32,
    pub(crate) stage_name: String,
    pub(crate) kind: String,
    pub(crate) payload: Value,
    pub(crate) parameters: Value,
    pub(crate) checkpoint: Option<Vec<u8>>,
    pub(crate) max_attempts: u32,
}

/// Everything one attempt of one task may know and do.
///
/// Cheap to clone: a handler may hand clones to the futures it spawns.
#[derive(Debug, Clone)]
pub struct TaskContext {
    info: Arc<TaskInfo>,
    progress: SharedProgress,
    cancel: CancellationToken,
}

impl TaskContext {
    pub(crate) fn new(info: TaskInfo, progress: SharedProgress, cancel: CancellationToken) -> Self {
        Self {
            info: Arc::new(info),
            progress,
            cancel,
        }
    }

    /// The task's input (a JSON object, `{}` when the plan gave none).
    pub fn payload(&self) -> &Value {
        &self.info.payload
    }

    /// The migration's parameters (a JSON object).
    pub fn parameters(&self) -> &Value {
        &self.info.parameters
    }

    /// The migration the task belongs to.
    pub fn migration_id(&self) -> i64 {
        self.info.migration_id
    }

    /// What is migrated, e.g. `project/42`.
    pub fn subject(&self) -> &str {
        &self.info.subject
    }

    /// Name of the task's stage.
    pub fn stage_name(&self) -> &str {
        &self.info.stage_name
    }

    /// Index of the task's stage in its plan, from 0.
    pub fn stage_index(&self) -> u32 {
        self.info.stage_index
    }

    /// The handler name the task was assigned for.
    pub fn kind(&self) -> &str {
        &self.info.kind
    }

    /// The coordinator's id of the task.
    pub fn task_id(&self) -> i64 {
        self.info.lease.task_id
    }

    /// This attempt's number, from 1.
    pub fn attempt(&self) -> u32 {
        self.info.lease.attempt
    }

    /// How many attempts the task gets in all.
    pub fn max_attempts(&self) -> u32 {
        self.info.max_attempts
    }

    /// The last checkpoint an earlier attempt saved, to resume from.
    pub fn checkpoint(&self) -> Option<&[u8]> {
        self.info.checkpoint.as_deref()
    }

    /// Records progress (`done` of `total` units; `total` 0 if unknown). The
    /// heartbeat loop sends the latest value.
    pub fn progress(&self, done: u64, total: u64) {
        let mut p = lock(&self.progress);
        p.done = done;
        p.total = total;
    }

    /// Records a checkpoint that a later attempt receives if this one is
    /// lost. The heartbeat loop sends the latest one.
    pub fn save_checkpoint(&self, checkpoint: Vec<u8>) {
        let mut p = lock(&self.progress);
        p.checkpoint = Some(checkpoint);
        p.checkpoint_version += 1;
    }

    /// True once the attempt must stop: the coordinator canceled it, its
    /// lease was lost, or the worker is shutting down past its drain bound.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when the attempt must stop; race it against the work with
    /// `tokio::select!`.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    pub(crate) fn lease(&self) -> LeaseToken {
        self.info.lease
    }

    pub(crate) fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }
}

/// Constructors for unit tests of handlers, without a coordinator.
#[cfg(any(test, feature = "testing"))]
impl TaskContext {
    /// A context for attempt 1 of task 1 of `migration_id`, subject
    /// `test/<migration_id>`, stage 0 named `test`.
    pub fn for_test(kind: &str, migration_id: i64, payload: Value, parameters: Value) -> Self {
        let info = TaskInfo {
            lease: LeaseToken {
                task_id: 1,
                attempt: 1,
            },
            migration_id,
            subject: format!("test/{migration_id}"),
            stage_index: 0,
            stage_name: "test".to_string(),
            kind: kind.to_string(),
            payload,
            parameters,
            checkpoint: None,
            max_attempts: 3,
        };
        Self::new(info, SharedProgress::default(), CancellationToken::new())
    }

    /// Cancels the attempt, as a cancel notice would.
    pub fn cancel_for_test(&self) {
        self.cancel.cancel();
    }

    /// The latest `(done, total)` the handler recorded.
    pub fn progress_for_test(&self) -> (u64, u64) {
        let p = lock(&self.progress);
        (p.done, p.total)
    }
}
