//! The coordinator's error type. Every variant maps to one gRPC code (in
//! `grpc::status`) and carries a message that says what was wrong and how to
//! fix it, because these messages are what a grpcurl user reads.

/// Errors of the scheduling core and the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request or plan is malformed; `field` names the offending field.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A second unfinished migration for a busy subject, or a taken name.
    #[error("{0}")]
    AlreadyExists(String),
    /// A report named a lease that is no longer live (I4).
    #[error("{0}")]
    LeaseNotHeld(String),
    /// The transition is not allowed from the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The database failed; the operation did not happen.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date at start.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A limit on what the server holds at once (open streams) is reached;
    /// the message names the flag. Retry later, when some are closed.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A batch of reports this one was part of could not be committed.
    #[error("the report was not recorded: {0}; send it again")]
    NotRecorded(String),
    /// The coordinator is shutting down; try another one or retry shortly.
    #[error("the coordinator is shutting down; reconnect to another coordinator or retry shortly")]
    ShuttingDown,
    /// Stored data could not be decoded; a bug or a hand-edited database.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Result with the coordinator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
