//! TLS to the coordinator: [`ClientTls`] says whom to trust (a CA file,
//! or else the system's roots) and, for a coordinator that requires client
//! certificates (mutual TLS), which certificate to present.
//!
//! An `https://` address always uses TLS; an `http://` address never does,
//! so TLS settings beside an `http://` address are refused rather than
//! silently unused.

use std::fmt;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// How a worker or tool talks TLS to `https://` coordinators. The default
/// trusts the system's roots and presents no certificate.
#[derive(Clone, Default)]
pub struct ClientTls {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// A TLS setting that cannot be used, named with what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct TlsError {
    /// The setting at fault: a flag with its file (`--tls-ca ca.pem`) when
    /// read by [`ClientTls::from_files`].
    pub setting: String,
    /// What is wrong with it.
    pub message: String,
}

impl ClientTls {
    /// Trusts the system's roots and presents no certificate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts only the CA certificate(s) in `pem` (instead of the system's
    /// roots).
    pub fn ca_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Result<Self, TlsError> {
        let pem = pem.into();
        certificates("CA certificate", &pem)?;
        self.ca = Some(pem);
        Ok(self)
    }

    /// Presents this certificate (PEM, then any intermediates) and its
    /// private key, for a coordinator that requires client certificates.
    pub fn identity_pem(
        mut self,
        cert: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Result<Self, TlsError> {
        let (cert, key) = (cert.into(), key.into());
        certificates("client certificate", &cert)?;
        private_key("client key", &key)?;
        self.identity = Some((cert, key));
        Ok(self)
    }

    /// Reads the files the binaries' flags name (`--tls-ca`,
    /// `--tls-client-cert`, `--tls-client-key`); `None` when none is given.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<Self>, TlsError> {
        let named = |flag: &str, path: &Path| format!("--{flag} {}", path.display());
        let read = |flag: &str, path: &Path| {
            std::fs::read(path).map_err(|e| TlsError {
                setting: named(flag, path),
                message: format!("cannot read it: {e}"),
            })
        };
        // Name the flag and file in errors about the contents too.
        let rename = |flag: &str, path: &Path| {
            let setting = named(flag, path);
            move |e: TlsError| TlsError {
                setting: setting.clone(),
                message: e.message,
            }
        };
        let mut tls = Self::new();
        if let Some(ca) = ca {
            tls = tls
                .ca_certificate_pem(read("tls-ca", ca)?)
                .map_err(rename("tls-ca", ca))?;
        }
        match (cert, key) {
            (Some(cert), Some(key)) => {
                let cert_pem = read("tls-client-cert", cert)?;
                certificates("", &cert_pem).map_err(rename("tls-client-cert", cert))?;
                let key_pem = read("tls-client-key", key)?;
                tls = tls
                    .identity_pem(cert_pem, key_pem)
                    .map_err(rename("tls-client-key", key))?;
            }
            (Some(_), None) => {
                return Err(TlsError {
                    setting: "--tls-client-cert".into(),
                    message: "given without --tls-client-key, the certificate's private key".into(),
                });
            }
            (None, Some(_)) => {
                return Err(TlsError {
                    setting: "--tls-client-key".into(),
                    message: "given without --tls-client-cert, the certificate it belongs to"
                        .into(),
                });
            }
            (None, None) if ca.is_none() => return Ok(None),
            (None, None) => {}
        }
        Ok(Some(tls))
    }

    /// The tonic settings.
    fn config(&self) -> ClientTlsConfig {
        let config = match &self.ca {
            Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        match &self.identity {
            Some((cert, key)) => config.identity(Identity::from_pem(cert, key)),
            None => config,
        }
    }
}

impl fmt::Debug for ClientTls {
    // Never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca.as_ref().map(|_| "<PEM>"))
            .field("identity", &self.identity.as_ref().map(|_| "<PEM>"))
            .finish()
    }
}

/// The endpoint of a coordinator at `url` (`http://host:port`, or
/// `https://host:port` with `tls`, or the system's roots when `tls` is
/// `None`). The error says what is wrong with the address.
pub fn coordinator_endpoint(url: &str, tls: Option<&ClientTls>) -> Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| e.to_string())?;
    if endpoint.uri().host().is_none_or(str::is_empty) {
        return Err("it has no host".into());
    }
    match endpoint.uri().scheme_str() {
        Some("http") if tls.is_some() => Err(
            "TLS settings are given but the address is http://; use https:// (or drop the TLS settings)"
                .into(),
        ),
        Some("http") => Ok(endpoint),
        Some("https") => {
            let config = tls.cloned().unwrap_or_default().config();
            endpoint.tls_config(config).map_err(|e| {
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    text = format!("{text}: {cause}");
                    source = cause.source();
                }
                if tls.is_none_or(|t| t.ca.is_none()) {
                    text.push_str(" (give the coordinator's CA with --tls-ca)");
                }
                text
            })
        }
        _ => Err("expected http://host:port or https://host:port".into()),
    }
}

fn certificates(what: &str, pem: &[u8]) -> Result<(), TlsError> {
    let error = |message: String| TlsError {
        setting: what.to_string(),
        message,
    };
    match CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>() {
        Ok(certs) if certs.is_empty() => Err(error(
            "no PEM CERTIFICATE block in it (is it a key?)".into(),
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(error(format!("not a PEM certificate file ({e})"))),
    }
}

fn private_key(what: &str, pem: &[u8]) -> Result<(), TlsError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map(|_| ())
        .map_err(|e| TlsError {
            setting: what.to_string(),
            message: format!("no PEM private key in it ({e})"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_need_an_https_address() {
        let tls = ClientTls::new();
        let e = coordinator_endpoint("http://127.0.0.1:1", Some(&tls)).unwrap_err();
        assert!(e.contains("use https://"), "{e}");
        assert!(coordinator_endpoint("http://127.0.0.1:1", None).is_ok());
        assert!(coordinator_endpoint("ftp://127.0.0.1:1", None).is_err());
    }

    #[test]
    fn files_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "hello\n").unwrap();
        let missing = dir.path().join("missing.pem");

        assert!(ClientTls::from_files(None, None, None).unwrap().is_none());
        let e = ClientTls::from_files(Some(&garbage), None, None).unwrap_err();
        assert!(e.setting.starts_with("--tls-ca ") && e.setting.ends_with("garbage.pem"));
        assert!(e.message.contains("no PEM CERTIFICATE"), "{e}");
        let e = ClientTls::from_files(Some(&missing), None, None).unwrap_err();
        assert!(e.message.starts_with("cannot read it"), "{e}");
        let e = ClientTls::from_files(None, Some(&garbage), None).unwrap_err();
        assert_eq!(e.setting, "--tls-client-cert");
        let e = ClientTls::from_files(None, None, Some(&garbage)).unwrap_err();
        assert_eq!(e.setting, "--tls-client-key");
    }
}
