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
        Status::new(code, bounded(e.to_string()))
    }
}

/// The most of a message a status carries. Messages quote input through
/// `domain::shown`; this bounds the rest (a list of names, say), so a
/// message never approaches the header limits of clients (16 KiB is
/// common) and turns into their RESOURCE_EXHAUSTED.
const MAX_MESSAGE_BYTES: usize = 2048;

fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("… (cut)");
    }
    message
}

/// The gRPC code of an error.
pub fn code_of(e: &Error) -> Code {
    match e {
        Error::InvalidArgument { .. } => Code::InvalidArgument,
        Error::NotFound(_) => Code::NotFound,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::ResourceExhausted(_) => Code::ResourceExhausted,
        Error::LeaseNotHeld(_) | Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::Database(
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed,
        ) => Code::Unavailable,
        Error::ShuttingDown | Error::NotRecorded(_) => Code::Unavailable,
        Error::Database(_) | Error::Migrate(_) | Error::Corrupt(_) => Code::Internal,
    }
}
