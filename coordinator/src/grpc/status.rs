//! The one mapping from the core's errors to gRPC status codes, so every
//! service answers the same failure with the same code.

use tonic::{Code, Status};

use crate::error::Error;

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = code_of(&e);
        if matches!(
            e,
            Error::Database(_) | Error::Migrate(_) | Error::Corrupt(_)
        ) {
            tracing::error!(error = %e, "request failed");
        }
        Status::new(code, e.to_string())
    }
}

/// The gRPC code of an error.
pub fn code_of(e: &Error) -> Code {
    match e {
        Error::InvalidArgument { .. } => Code::InvalidArgument,
        Error::NotFound(_) => Code::NotFound,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::LeaseNotHeld(_) | Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::Database(
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed,
        ) => Code::Unavailable,
        Error::ShuttingDown | Error::NotRecorded(_) => Code::Unavailable,
        Error::Database(_) | Error::Migrate(_) | Error::Corrupt(_) => Code::Internal,
    }
}
