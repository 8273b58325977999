//! The coordinator's own types for migrations, stages, tasks, leases and
//! events. They mirror the state machines of docs/design.md; the gRPC layer
//! converts them to and from protobuf, so nothing below it depends on
//! generated code.

use super::plan::TaskSpec;
use serde_json::Value;

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// The name stored in the database.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $s),+ }
            }

            /// Parses a stored name.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some(Self::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// `queued → running → succeeded | failed | canceled`.
    MigrationState {
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Canceled = "canceled",
    }
);

impl MigrationState {
    /// True for the states a migration ends in.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }
}

string_enum!(
    /// `pending → running → succeeded | failed | canceled`.
    StageState {
        Pending = "pending",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Canceled = "canceled",
    }
);

string_enum!(
    /// `pending → ready → leased → succeeded | failed | canceled`.
    TaskState {
        Pending = "pending",
        Ready = "ready",
        Leased = "leased",
        Succeeded = "succeeded",
        Failed = "failed",
        Canceled = "canceled",
    }
);

string_enum!(
    /// What an event records; one per transition.
    EventKind {
        MigrationCreated = "migration_created",
        MigrationAdmitted = "migration_admitted",
        MigrationSucceeded = "migration_succeeded",
        MigrationFailed = "migration_failed",
        MigrationCanceled = "migration_canceled",
        MigrationRetried = "migration_retried",
        StageStarted = "stage_started",
        StageSucceeded = "stage_succeeded",
        StageFailed = "stage_failed",
        TaskAssigned = "task_assigned",
        TaskSucceeded = "task_succeeded",
        TaskRetrying = "task_retrying",
        TaskDead = "task_dead",
        TaskLeaseExpired = "task_lease_expired",
        TaskAdded = "task_added",
        ReportRejected = "report_rejected",
        TaskCanceled = "task_canceled",
        TaskHandedBack = "task_handed_back",
    }
);

/// Subject status as a client asks for it (docs/design.md, "State machines").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectStatus {
    None,
    Queued,
    Running,
    Finished,
    Regenerating,
    Failed,
}

/// The fencing token of one attempt: `(task id, attempt)`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct LeaseToken {
    pub task_id: i64,
    pub attempt: u32,
}

/// The random secret of one lease, given to its worker with the assignment
/// and required in every report and heartbeat about it: the fencing token
/// `(task id, attempt)` is easy to guess, this is not. Kept beside the token,
/// never in it, so it stays out of events, notices, `ListWorkers` and logs.
/// Never 0: a report without one (0, as an old worker sends) names no lease.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LeaseSecret(pub u64);

impl LeaseSecret {
    /// A fresh secret for a new lease, from the thread's CSPRNG; never 0.
    pub fn random() -> Self {
        Self(rand::random::<u64>().max(1))
    }

    /// As stored in a signed 64-bit column.
    pub fn db(self) -> i64 {
        self.0 as i64
    }

    /// From a signed 64-bit column.
    pub fn from_db(v: i64) -> Self {
        Self(v as u64)
    }
}

impl std::fmt::Debug for LeaseSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Debug output ends up in logs and panics: never the value.
        f.write_str("LeaseSecret(..)")
    }
}

impl std::fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "task {} attempt {}", self.task_id, self.attempt)
    }
}

/// A migration with its per-stage progress, as clients see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Migration {
    pub id: i64,
    pub plan_name: String,
    pub plan_version: u32,
    pub subject: String,
    pub parameters: Value,
    pub pool: String,
    pub state: MigrationState,
    pub reason: String,
    pub idempotency_key: Option<String>,
    pub deadline_ms: Option<i64>,
    pub created_at_ms: i64,
    pub admitted_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub stages: Vec<StageProgress>,
}

/// Progress of one stage of one migration.
#[derive(Debug, Clone, PartialEq)]
pub struct StageProgress {
    pub index: u32,
    pub name: String,
    pub state: StageState,
    pub total: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub canceled: u32,
    pub running: u32,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
}

/// One entry of the append-only event log.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: i64,
    pub migration_id: i64,
    pub at_ms: i64,
    pub kind: EventKind,
    pub stage_index: Option<u32>,
    pub task_id: i64,
    pub attempt: u32,
    pub worker_id: String,
    pub message: String,
}

/// A request to create a migration, already validated by the caller.
#[derive(Debug, Clone)]
pub struct NewMigration {
    pub plan: crate::domain::PlanSpec,
    pub subject: String,
    pub parameters: Value,
    pub pool: String,
    pub deadline_ms: Option<i64>,
    pub idempotency_key: Option<String>,
    /// The name of the token that created it, when auth is on.
    pub created_by: Option<String>,
}

impl NewMigration {
    /// Its MigrationCreated event's message: the subject, and who created
    /// it when a token named them.
    pub fn created_message(&self) -> String {
        match &self.created_by {
            Some(by) => format!("{} (created by {by})", self.subject),
            None => self.subject.clone(),
        }
    }
}

/// A MigrationRetried event's message: who retried it, when known.
pub fn retried_message(by: &str) -> String {
    if by.is_empty() {
        String::new()
    } else {
        format!("retried by {by}")
    }
}

/// A task leased to a worker, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub lease: LeaseToken,
    /// The lease's secret, to be echoed in every report about it.
    pub secret: LeaseSecret,
    pub migration_id: i64,
    pub subject: String,
    pub stage_index: u32,
    pub stage_name: String,
    pub kind: String,
    pub payload: Value,
    pub parameters: Value,
    pub lease_expires_at_ms: i64,
    /// The heartbeat timeout: how far each renewal extends the lease.
    pub lease_ms: i64,
    pub checkpoint: Option<Vec<u8>>,
    pub max_attempts: u32,
}

/// A task a completing task adds to a later stage.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// Name of a later stage of the same plan.
    pub stage: String,
    pub task: TaskSpec,
}

/// A successful attempt, as a worker reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub lease: LeaseToken,
    /// The secret given with the lease's assignment.
    pub secret: LeaseSecret,
    pub output: Value,
    pub add_tasks: Vec<NewTask>,
}

/// A failed attempt, as a worker reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub lease: LeaseToken,
    /// The secret given with the lease's assignment.
    pub secret: LeaseSecret,
    pub error: String,
    pub retryable: bool,
}

/// Progress of one held lease, from a heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseStatus {
    pub lease: LeaseToken,
    /// The secret given with the lease's assignment.
    pub secret: LeaseSecret,
    pub done: u64,
    pub total: u64,
    pub checkpoint: Option<Vec<u8>>,
}

/// What a heartbeat did: leases renewed (with new expiry) and leases the
/// worker must stop.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeartbeatOutcome {
    pub renewed: Vec<(LeaseToken, i64)>,
    pub cancel: Vec<(LeaseToken, String)>,
}

/// How a report was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportAck {
    /// Recorded now.
    Recorded,
    /// The same outcome had been recorded before; nothing changed.
    Duplicate,
}

/// A lease that must be stopped on its worker (cancel, failure, deadline).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revoked {
    pub worker_id: String,
    pub lease: LeaseToken,
    pub reason: String,
}

/// A capacity pool with its usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub slots: u32,
    pub running: u32,
    pub queued: u32,
    pub paused: bool,
}

/// Filters and paging of a migration listing.
#[derive(Debug, Clone, Default)]
pub struct MigrationFilter {
    pub state: Option<MigrationState>,
    pub subject: Option<String>,
    pub pool: Option<String>,
    /// Only ids below this one (the page cursor).
    pub before_id: Option<i64>,
    pub limit: u32,
}

/// What one sweep did; logged and returned for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub leases_expired: u32,
    pub tasks_dead: u32,
    pub deadlines_exceeded: u32,
    pub attempts_timed_out: u32,
}
