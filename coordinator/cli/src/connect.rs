//! The connection to the coordinator: the channel (plain or TLS, built by
//! the worker SDK's `coordinator_endpoint` so both speak TLS the same way),
//! and the bearer token every call carries.

use std::path::Path;
use std::time::Duration;

use stagecoach_proto::v1::admin_service_client::AdminServiceClient;
use stagecoach_proto::v1::migration_service_client::MigrationServiceClient;
use stagecoach_worker::ClientTls;
use stagecoach_worker::tls::coordinator_endpoint;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::args::Global;
use crate::error::{CliError, with_causes};

/// How long connecting may take before the command gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Adds `authorization: Bearer TOKEN` to every call, when there is a token.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// Clients of the two services an operator uses, over one channel.
#[derive(Debug, Clone)]
pub struct Session {
    /// `stagecoach.v1.MigrationService`.
    pub migrations: MigrationServiceClient<Authed>,
    /// `stagecoach.v1.AdminService`.
    pub admin: AdminServiceClient<Authed>,
}

impl Session {
    /// Reads the token and TLS files the flags name, then connects.
    pub async fn connect(global: &Global) -> Result<Session, CliError> {
        let bearer = bearer(global.token.as_deref(), global.token_file.as_deref())?;
        let tls = ClientTls::from_files(
            global.tls_ca.as_deref(),
            global.tls_client_cert.as_deref(),
            global.tls_client_key.as_deref(),
        )?;
        let url = global.coordinator.trim();
        let endpoint =
            coordinator_endpoint(url, tls.as_ref()).map_err(|reason| CliError::BadFlag {
                flag: "--coordinator",
                value: url.to_string(),
                reason,
            })?;
        let channel = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|e| CliError::Connect {
                url: url.to_string(),
                reason: with_causes(&e),
            })?;
        Ok(Session {
            migrations: MigrationServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            admin: AdminServiceClient::with_interceptor(channel, bearer),
        })
    }
}

/// The `authorization` value from `--token` or the first line of
/// `--token-file`; none without either.
fn bearer(token: Option<&str>, token_file: Option<&Path>) -> Result<Bearer, CliError> {
    let (flag, value, token) = match (token, token_file) {
        (Some(token), _) => ("--token", "<hidden>".to_string(), token.trim().to_string()),
        (None, Some(path)) => {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| CliError::BadFlag {
                flag: "--token-file",
                value: shown.clone(),
                reason: format!("cannot read it: {e}"),
            })?;
            let first = text.lines().next().unwrap_or_default().trim().to_string();
            ("--token-file", shown, first)
        }
        (None, None) => return Ok(Bearer(None)),
    };
    if token.is_empty() {
        return Err(CliError::BadFlag {
            flag,
            value,
            reason: "the token is empty".into(),
        });
    }
    let header = format!("Bearer {token}")
        .parse()
        .map_err(|_| CliError::BadFlag {
            flag,
            value,
            reason: "the token has characters a header cannot carry (no control characters)".into(),
        })?;
    Ok(Bearer(Some(header)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_file_gives_its_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  abc123 \nignored\n").unwrap();
        let Bearer(Some(v)) = bearer(None, Some(&file)).unwrap() else {
            panic!("no header")
        };
        assert_eq!(v.to_str().unwrap(), "Bearer abc123");

        std::fs::write(&file, "\n").unwrap();
        let e = bearer(None, Some(&file)).unwrap_err().to_string();
        assert!(
            e.starts_with("--token-file ") && e.ends_with("the token is empty"),
            "{e}"
        );
        let e = bearer(None, Some(&dir.path().join("missing")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read it"), "{e}");
        let e = bearer(Some("a\u{1}b"), None).unwrap_err().to_string();
        assert!(e.starts_with("--token \"<hidden>\""), "{e}");
    }
}
