//! The TLS flags every command of the `worker` binary shares: the worker
//! itself, `health-check` and `sample` all talk to `https://` coordinators
//! the same way.

use std::path::PathBuf;

use stagecoach_worker::ClientTls;

/// TLS to `https://` coordinators.
#[derive(Debug, clap::Args)]
pub struct TlsArgs {
    /// PEM file with the CA certificate(s) to trust for `https://`
    /// coordinators [default: the system's trusted roots].
    #[arg(long, env = "STAGECOACH_TLS_CA")]
    tls_ca: Option<PathBuf>,

    /// PEM file with the certificate to present to a coordinator that
    /// requires client certificates (its --tls-client-ca); with
    /// --tls-client-key.
    #[arg(long, env = "STAGECOACH_TLS_CLIENT_CERT")]
    tls_client_cert: Option<PathBuf>,

    /// PEM file with the private key of --tls-client-cert.
    #[arg(long, env = "STAGECOACH_TLS_CLIENT_KEY")]
    tls_client_key: Option<PathBuf>,
}

impl TlsArgs {
    /// Reads and checks the files; `None` when no TLS flag is given.
    pub fn load(&self) -> anyhow::Result<Option<ClientTls>> {
        Ok(ClientTls::from_files(
            self.tls_ca.as_deref(),
            self.tls_client_cert.as_deref(),
            self.tls_client_key.as_deref(),
        )?)
    }
}
