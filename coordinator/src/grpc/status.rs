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

/// Whether a database error says the database is away for now (restarting,
/// unreachable, out of connections) rather than that the request or the
/// code is wrong: the client should retry, so `UNAVAILABLE`, not
/// `INTERNAL`. Found by the chaos harness restarting PostgreSQL.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| transient_code(&code)),
        _ => false,
    }
}

/// PostgreSQL SQLSTATEs of classes 08 (connection exception), 53
/// (insufficient resources) and 57 (operator intervention: shutdown,
/// restart, "cannot connect now"); SQLite's `SQLITE_BUSY` (5) and its
/// extended codes, should a lock outlast the busy timeout.
fn transient_code(code: &str) -> bool {
    ["08", "53", "57"]
        .iter()
        .any(|class| code.starts_with(class))
        || code.parse::<i32>().is_ok_and(|n| n & 0xff == 5)
}

/// The gRPC code of an error.
pub fn code_of(e: &Error) -> Code {
    match e {
        Error::InvalidArgument { .. } => Code::InvalidArgument,
        Error::NotFound(_) => Code::NotFound,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::ResourceExhausted(_) => Code::ResourceExhausted,
        Error::LeaseNotHeld(_) | Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::Database(e) if is_transient(e) => Code::Unavailable,
        Error::ShuttingDown | Error::NotRecorded(_) => Code::Unavailable,
        Error::Database(_) | Error::Migrate(_) | Error::Corrupt(_) => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::transient_code;

    #[test]
    fn an_absent_database_is_unavailable_and_a_broken_statement_is_not() {
        for code in ["57P01", "57P03", "08006", "53300", "5", "517"] {
            assert!(transient_code(code), "{code}");
        }
        for code in ["42P01", "23505", "22P02", "1", "19", "40001"] {
            assert!(!transient_code(code), "{code}");
        }
    }
}
