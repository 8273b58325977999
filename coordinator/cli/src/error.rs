//! [`CliError`]: every way a command can fail, each printed as one line
//! (`error: NOT_FOUND: migration 7 does not exist`) by `main`, never as a
//! Rust debug dump.

use stagecoach_proto::code_name;
use stagecoach_worker::TlsError;

/// A command that could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The coordinator refused or failed a call: its gRPC code and message.
    #[error("{}: {}", code_name(.0.code()), one_line(.0.message()))]
    Rpc(#[from] tonic::Status),

    /// A flag's value cannot be used.
    #[error("{flag} {value:?}: {reason}")]
    BadFlag {
        /// The flag, e.g. `--coordinator`.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is wrong and how to fix it.
        reason: String,
    },

    /// No connection to the coordinator could be made.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The address tried.
        url: String,
        /// Why, with its causes.
        reason: String,
    },

    /// A TLS file is unusable; names the flag and file.
    #[error(transparent)]
    Tls(#[from] TlsError),

    /// A file named on the command line cannot be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file as given.
        path: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The coordinator answered without a field it always sends.
    #[error("the coordinator answered {rpc} without its {field}")]
    Incomplete {
        /// The RPC, e.g. `GetMigration`.
        rpc: &'static str,
        /// The missing field.
        field: &'static str,
    },

    /// Writing the output failed (e.g. a closed pipe).
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

/// `text` with its line breaks as spaces: an error is one line.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `error` with its causes, `: `-separated, on one line.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    one_line(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rpc_error_is_its_code_and_message_on_one_line() {
        let e = CliError::from(tonic::Status::not_found("migration 7\ndoes not exist"));
        assert_eq!(e.to_string(), "NOT_FOUND: migration 7 does not exist");
    }
}
