//! TLS on the gRPC port: `--tls-cert` with `--tls-key` serves TLS only
//! (health and reflection too, on the same port), and `--tls-client-ca`
//! also requires every client — workers, tools, grpcurl — to present a
//! certificate signed by that CA (mutual TLS).
//!
//! rustls does the work, through tonic with the `ring` provider. The files
//! are read and checked once at start, before the store is opened, so a
//! wrong path, a key given as the certificate or a key that belongs to
//! another certificate stops the coordinator with the flag at fault, not
//! the first client with a failed handshake.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::ConfigError;

/// How long a client may take to finish its TLS handshake; a connection
/// that sends nothing does not hold a task for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS settings of `coordinator serve`; without `--tls-cert` the port
/// serves plaintext.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsConfig {
    /// PEM file with the coordinator's certificate (then any intermediate
    /// certificates); with --tls-key the port serves TLS only.
    #[arg(long, env = "STAGECOACH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "STAGECOACH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM file with the CA certificate(s) that client certificates must be
    /// signed by: a client without such a certificate is refused at the
    /// handshake (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "STAGECOACH_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsConfig {
    /// Reads and checks the files; `None` when TLS is off.
    pub fn load(&self) -> Result<Option<ServerTlsConfig>, ConfigError> {
        let (cert, key) = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => (cert, key),
            (None, None) => {
                if self.tls_client_ca.is_some() {
                    return err(
                        "tls-client-ca",
                        "needs --tls-cert and --tls-key: client certificates are only asked for over TLS".into(),
                    );
                }
                return Ok(None);
            }
            (Some(_), None) => {
                return err(
                    "tls-cert",
                    "given without --tls-key, the certificate's private key".into(),
                );
            }
            (None, Some(_)) => {
                return err(
                    "tls-key",
                    "given without --tls-cert, the certificate it belongs to".into(),
                );
            }
        };
        let cert_pem = read("tls-cert", cert)?;
        certificates("tls-cert", cert, &cert_pem)?;
        let key_pem = read("tls-key", key)?;
        if let Err(e) = PrivateKeyDer::from_pem_slice(&key_pem) {
            return err(
                "tls-key",
                format!("{}: no PEM private key in it ({e})", key.display()),
            );
        }
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert_pem, key_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        // rustls checks that the key is the certificate's when the server
        // is built; build one now to say which flag is wrong.
        if let Err(e) = Server::builder().tls_config(tls.clone()) {
            return err(
                "tls-key",
                format!(
                    "{} and --tls-cert {} do not make a TLS identity: {}",
                    key.display(),
                    cert.display(),
                    chain(&e)
                ),
            );
        }
        let Some(ca) = &self.tls_client_ca else {
            return Ok(Some(tls));
        };
        let ca_pem = read("tls-client-ca", ca)?;
        certificates("tls-client-ca", ca, &ca_pem)?;
        let tls = tls.client_ca_root(Certificate::from_pem(ca_pem));
        if let Err(e) = Server::builder().tls_config(tls.clone()) {
            return err(
                "tls-client-ca",
                format!("{}: not a usable CA: {}", ca.display(), chain(&e)),
            );
        }
        Ok(Some(tls))
    }
}

fn err<T>(flag: &'static str, message: String) -> Result<T, ConfigError> {
    Err(ConfigError { flag, message })
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).or_else(|e| err(flag, format!("cannot read {}: {e}", path.display())))
}

/// At least one PEM `CERTIFICATE` block, all well formed.
fn certificates(flag: &'static str, path: &Path, pem: &[u8]) -> Result<(), ConfigError> {
    match CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>() {
        Ok(certs) if certs.is_empty() => err(
            flag,
            format!(
                "{}: no PEM CERTIFICATE block in it (is it a key?)",
                path.display()
            ),
        ),
        Ok(_) => Ok(()),
        Err(e) => err(
            flag,
            format!("{}: not a PEM certificate file ({e})", path.display()),
        ),
    }
}

/// An error and its causes on one line: tonic's own message is only
/// "transport error".
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(cert: Option<&Path>, key: Option<&Path>, ca: Option<&Path>) -> TlsConfig {
        TlsConfig {
            tls_cert: cert.map(Path::to_path_buf),
            tls_key: key.map(Path::to_path_buf),
            tls_client_ca: ca.map(Path::to_path_buf),
        }
    }

    fn refused(config: TlsConfig) -> String {
        config
            .load()
            .expect_err("the settings should be refused")
            .to_string()
    }

    #[test]
    fn no_flags_is_plaintext() {
        assert!(TlsConfig::default().load().unwrap().is_none());
    }

    #[test]
    fn each_bad_setting_names_its_flag() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let key_only = dir.path().join("key.pem");
        // A syntactically valid PEM block of the wrong kind.
        std::fs::write(
            &key_only,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();

        let e = refused(config(Some(&garbage), None, None));
        assert!(e.starts_with("--tls-cert: given without --tls-key"), "{e}");
        let e = refused(config(None, Some(&garbage), None));
        assert!(e.starts_with("--tls-key: given without --tls-cert"), "{e}");
        let e = refused(config(None, None, Some(&garbage)));
        assert!(e.starts_with("--tls-client-ca: needs --tls-cert"), "{e}");

        let e = refused(config(Some(&missing), Some(&key_only), None));
        assert!(
            e.starts_with("--tls-cert: cannot read") && e.contains("missing.pem"),
            "{e}"
        );
        let e = refused(config(Some(&garbage), Some(&key_only), None));
        assert!(
            e.starts_with("--tls-cert: ") && e.contains("no PEM CERTIFICATE block"),
            "{e}"
        );
        let e = refused(config(Some(&key_only), Some(&key_only), None));
        assert!(e.contains("(is it a key?)"), "{e}");
    }
}
