//! TLS end to end: a coordinator started with `--tls-cert`/`--tls-key`
//! serves a real worker process (`https://`, `--tls-ca`), a TLS client, the
//! health service and `worker health-check` on its one port, and refuses
//! plaintext clients and clients that do not trust its CA. With
//! `--tls-client-ca` (mutual TLS) it also refuses clients without a
//! certificate, or with one its CA did not sign, and serves those with one:
//! a worker process, a client, `worker health-check` and `worker sample`.
//!
//! Certificates are made at run time with rcgen: a CA, a server certificate
//! for `localhost` and 127.0.0.1, a client certificate, and a second CA with
//! a client certificate of its own, the impostor.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;
use stagecoach_proto::v1::MigrationState;
use stagecoach_tests::binaries::binaries;
use stagecoach_tests::{Backend, Client, Coordinator, Worker, on_both_backends};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

on_both_backends!(
    tls_serves_a_worker_and_clients_and_refuses_plaintext,
    mutual_tls_refuses_clients_without_a_certificate_of_its_ca
);

/// The PEM files of one test, in its temporary directory.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A CA the coordinator knows nothing of, and a client certificate it signed.
    other_ca: PathBuf,
    other_client_cert: PathBuf,
    other_client_key: PathBuf,
}

impl Pki {
    fn create(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).expect("create the certificate dir");
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("write a PEM file");
            path
        };
        let (ca_pem, ca) = certificate_authority("Stagecoach test CA");
        let (other_ca_pem, other_ca) = certificate_authority("Somebody else's CA");
        let (server_cert, server_key) = leaf(
            &ca,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) =
            leaf(&ca, &["worker-1"], ExtendedKeyUsagePurpose::ClientAuth);
        let (other_client_cert, other_client_key) = leaf(
            &other_ca,
            &["impostor"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Pki {
            ca: write("ca.pem", ca_pem),
            server_cert: write("server.pem", server_cert),
            server_key: write("server.key", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client.key", client_key),
            other_ca: write("other-ca.pem", other_ca_pem),
            other_client_cert: write("other-client.pem", other_client_cert),
            other_client_key: write("other-client.key", other_client_key),
        }
    }

    /// Client settings that trust our CA and present no certificate.
    fn trusting(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&self.ca)))
    }

    /// Client settings that trust our CA and present our client certificate.
    fn with_certificate(&self) -> ClientTlsConfig {
        self.trusting().identity(Identity::from_pem(
            read(&self.client_cert),
            read(&self.client_key),
        ))
    }
}

fn certificate_authority(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("self-signed CA");
    (cert.pem(), Issuer::new(params, key))
}

/// A certificate for `names` signed by `issuer`, and its key.
fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names.clone()).expect("leaf params");
    params
        .distinguished_name
        .push(DnType::CommonName, &names[0]);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("signed leaf");
    (cert.pem(), key.serialize_pem())
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}

/// How a client that should not be served was turned away: at connect, or
/// on its first call (a TLS 1.3 server checks the client's certificate
/// after the client considers the handshake done). Panics if it is served.
async fn refusal(url: &str, tls: Option<ClientTlsConfig>) -> String {
    let attempt = async {
        match Client::try_connect(url, tls).await {
            Err(e) => format!("connect: {e:?}"),
            Ok(client) => match client.pool("default").await {
                Err(status) => format!("call: {status}"),
                Ok(pool) => panic!("{url} served a client it should refuse: {pool:?}"),
            },
        }
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .unwrap_or_else(|_| "no answer within 15 s".to_string())
}

/// A two-stage plan of noop tasks, run to success and checked.
async fn run_a_migration(client: &Client, subject: &str) {
    client
        .put_plan_json(&json!({
            "name": "over-tls",
            "stages": [
                {"name": "a", "tasks": [{"kind": "noop"}, {"kind": "noop"}, {"kind": "noop"}]},
                {"name": "b", "tasks": [{"kind": "sleep", "payload": {"ms": 50}}]}
            ]
        }))
        .await
        .expect("PutPlan over TLS");
    let created = client
        .create_migration("over-tls", subject, &json!({}))
        .await
        .expect("CreateMigration over TLS");
    let (m, _events) = client
        .finish_and_check(created.id, Duration::from_secs(60))
        .await;
    assert_eq!(m.state(), MigrationState::Succeeded, "{m:?}");
}

/// `worker health-check` against `url` with `args`; its exit status and output.
async fn health_check(url: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(&binaries().worker)
        .args(["health-check", "--coordinator", url, "--timeout-secs", "10"])
        .args(args)
        .output()
        .await
        .expect("run worker health-check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn tls_serves_a_worker_and_clients_and_refuses_plaintext(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::create(&dir.path().join("pki"));
    let coordinator = Coordinator::start(
        backend,
        &dir.path().join("coordinator"),
        &[
            "--tls-cert",
            arg(&pki.server_cert),
            "--tls-key",
            arg(&pki.server_key),
        ],
    )
    .await;
    let url = coordinator.url();
    assert!(url.starts_with("https://"), "{url}");
    let worker = Worker::start_with(
        &url,
        4,
        &dir.path().join("shared"),
        "w1",
        &["--tls-ca", arg(&pki.ca)],
    );

    let client = Client::connect_tls(&url, pki.trusting()).await;
    client
        .wait_for_workers(&[worker.id()], Duration::from_secs(30))
        .await;
    run_a_migration(&client, "project/tls").await;

    // Health answers on the same TLS port, to our client and to the
    // `worker health-check` a container runs.
    let health = HealthClient::new(client.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Health/Check over TLS")
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);
    let (ok, out) = health_check(&url, &["--tls-ca", arg(&pki.ca)]).await;
    assert!(ok, "worker health-check over TLS failed: {out}");
    assert!(out.contains("SERVING"), "{out}");

    // Plaintext on the TLS port is refused, and so is a client that trusts
    // another CA (it cannot tell the coordinator from an impostor).
    let plaintext = url.replacen("https://", "http://", 1);
    let why = refusal(&plaintext, None).await;
    eprintln!("plaintext client refused: {why}");
    let other = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&pki.other_ca)));
    let why = refusal(&url, Some(other)).await;
    eprintln!("client trusting another CA refused: {why}");
    let (ok, out) = health_check(&url, &["--tls-ca", arg(&pki.other_ca)]).await;
    assert!(!ok, "health-check trusting another CA succeeded: {out}");
    // TLS settings beside an http:// address are a mistake, said at start.
    let (ok, out) = health_check(&plaintext, &["--tls-ca", arg(&pki.ca)]).await;
    assert!(!ok && out.contains("use https://"), "{out}");
}

async fn mutual_tls_refuses_clients_without_a_certificate_of_its_ca(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::create(&dir.path().join("pki"));
    let coordinator = Coordinator::start(
        backend,
        &dir.path().join("coordinator"),
        &[
            "--tls-cert",
            arg(&pki.server_cert),
            "--tls-key",
            arg(&pki.server_key),
            "--tls-client-ca",
            arg(&pki.ca),
        ],
    )
    .await;
    let url = coordinator.url();

    // Refused: no certificate, and a certificate of another CA.
    let why = refusal(&url, Some(pki.trusting())).await;
    eprintln!("client without a certificate refused: {why}");
    let impostor = pki.trusting().identity(Identity::from_pem(
        read(&pki.other_client_cert),
        read(&pki.other_client_key),
    ));
    let why = refusal(&url, Some(impostor)).await;
    eprintln!("client with another CA's certificate refused: {why}");
    let (ok, out) = health_check(&url, &["--tls-ca", arg(&pki.ca)]).await;
    assert!(!ok, "health-check without a certificate succeeded: {out}");

    // Served: a worker process and a client with our CA's certificate.
    let identity = [
        "--tls-ca",
        arg(&pki.ca),
        "--tls-client-cert",
        arg(&pki.client_cert),
        "--tls-client-key",
        arg(&pki.client_key),
    ];
    let worker = Worker::start_with(&url, 4, &dir.path().join("shared"), "w1", &identity);
    let client = Client::connect_tls(&url, pki.with_certificate()).await;
    client
        .wait_for_workers(&[worker.id()], Duration::from_secs(30))
        .await;
    run_a_migration(&client, "project/mtls").await;
    let (ok, out) = health_check(&url, &identity).await;
    assert!(ok, "health-check with a certificate failed: {out}");

    // `worker sample` (the compose file's client) with the same flags: the
    // sample export, run by the worker above, succeeds.
    let shared = dir.path().join("shared");
    let out = tokio::process::Command::new(&binaries().worker)
        .args([
            "sample",
            "--coordinator",
            &url,
            "--shared-dir",
            arg(&shared),
        ])
        .args(["--subject", "project/sample-mtls", "--timeout-secs", "120"])
        .args(identity)
        .output()
        .await
        .expect("run worker sample");
    assert!(
        out.status.success(),
        "worker sample over mutual TLS failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for m in client.list_migrations().await.expect("ListMigrations") {
        let (m, _) = client.check(m.id).await;
        assert_eq!(m.state(), MigrationState::Succeeded, "{m:?}");
    }
}

/// A key that is not the certificate's stops the start, naming the flag;
/// nothing is served with a broken identity.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_of_another_certificate_stops_the_coordinator_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::create(&dir.path().join("pki"));
    let out = tokio::process::Command::new(&binaries().coordinator)
        .args(["serve", "--listen", "127.0.0.1:0", "--http-listen", "off"])
        .arg("--database")
        .arg(format!(
            "sqlite://{}",
            dir.path().join("coord.db").display()
        ))
        .args(["--tls-cert", arg(&pki.server_cert)])
        .args(["--tls-key", arg(&pki.client_key)])
        .output()
        .await
        .expect("run coordinator serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a wrong key: {stderr}");
    assert!(
        stderr.contains("--tls-key: ") && stderr.contains("client.key"),
        "the error should name --tls-key and its file: {stderr}"
    );
    assert!(
        !dir.path().join("coord.db").exists(),
        "the database was opened before the TLS files were checked"
    );
}
