//! Raw input below gRPC: TCP garbage, partial and wrong HTTP/2 prefaces,
//! and well-formed HTTP/2 requests whose gRPC bodies are not (a gRPC frame
//! is a compression flag, a 4-byte length and a protobuf message).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use rand::rngs::StdRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Status;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Methods whose request bodies the raw calls garble.
const PATHS: &[&str] = &[
    "/stagecoach.v1.MigrationService/PutPlan",
    "/stagecoach.v1.MigrationService/CreateMigration",
    "/stagecoach.v1.MigrationService/GetMigration",
    "/stagecoach.v1.MigrationService/ListEvents",
    "/stagecoach.v1.MigrationService/WatchMigration",
    "/stagecoach.v1.WorkerService/Subscribe",
    "/stagecoach.v1.WorkerService/Complete",
    "/stagecoach.v1.WorkerService/Heartbeat",
    "/stagecoach.v1.AdminService/CreatePool",
    "/stagecoach.v1.AdminService/DrainWorker",
    "/stagecoach.v1.AdminService/NoSuchMethod",
    "/no.such.Service/Call",
    "/grpc.health.v1.Health/Check",
];

/// One raw exchange.
#[derive(Debug, Clone)]
pub enum Raw {
    /// Bytes written on a fresh TCP connection, then read what comes.
    Tcp(Vec<u8>),
    /// An HTTP/2 request to `path` with this body (one or more gRPC frames,
    /// or not even that).
    Grpc { path: String, body: Vec<u8> },
}

impl Raw {
    pub fn generate(rng: &mut StdRng) -> Raw {
        if rng.random_bool(0.3) {
            let bytes = match rng.random_range(0..5) {
                0 => random_bytes(rng, 0..4096),
                1 => PREFACE[..rng.random_range(0..PREFACE.len())].to_vec(),
                2 => {
                    // The preface, then garbage frames.
                    let mut b = PREFACE.to_vec();
                    b.extend(random_bytes(rng, 0..2048));
                    b
                }
                3 => b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\n".to_vec(),
                _ => {
                    // The preface and a frame header claiming a huge frame.
                    let mut b = PREFACE.to_vec();
                    b.extend([0xff, 0xff, 0xff, rng.random(), rng.random(), 0, 0, 0, 1]);
                    b
                }
            };
            return Raw::Tcp(bytes);
        }
        let path = PATHS[rng.random_range(0..PATHS.len())].to_string();
        let body = match rng.random_range(0..6) {
            // A frame whose length is right but whose message is garbage.
            0 => frame(0, &random_bytes(rng, 0..512)),
            // A protobuf message with invalid UTF-8 in string fields 1..=7.
            1 => {
                let mut msg = Vec::new();
                for field in 1..=7u8 {
                    msg.extend([field << 3 | 2, 3, 0xff, 0xc0, 0x80]);
                }
                frame(0, &msg)
            }
            // Compressed, though no compression was agreed.
            2 => frame(1, &random_bytes(rng, 0..64)),
            // A length longer than the body, or absurdly long.
            3 => {
                let mut f = frame(0, &random_bytes(rng, 0..16));
                let claimed: u32 = [100, u32::MAX, 4 << 20][rng.random_range(0..3)];
                f[1..5].copy_from_slice(&claimed.to_be_bytes());
                f
            }
            // Fewer than 5 bytes: not a frame header.
            4 => random_bytes(rng, 0..5),
            // Two frames on a unary call.
            _ => [frame(0, &[]), frame(0, &random_bytes(rng, 0..32))].concat(),
        };
        Raw::Grpc { path, body }
    }

    /// Its name in the report: `raw-tcp`, `raw-health` (the standard
    /// health service, served by tonic-health), or `raw`.
    pub fn rpc(&self) -> &'static str {
        match self {
            Raw::Tcp(_) => "raw-tcp",
            Raw::Grpc { path, .. } if path.starts_with("/grpc.") => "raw-health",
            Raw::Grpc { .. } => "raw",
        }
    }

    /// Sends it to `addr`. Returns the gRPC status the server answered
    /// (None when there is none to expect, or the server reset the stream).
    pub async fn send(&self, addr: SocketAddr) -> Option<Status> {
        let exchange = async {
            match self {
                Raw::Tcp(bytes) => {
                    let mut tcp = TcpStream::connect(addr).await.ok()?;
                    let _ = tcp.write_all(bytes).await;
                    let mut buf = [0u8; 4096];
                    let _ =
                        tokio::time::timeout(Duration::from_millis(50), tcp.read(&mut buf)).await;
                    None
                }
                Raw::Grpc { path, body } => grpc(addr, path, body).await,
            }
        };
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .ok()
            .flatten()
    }
}

async fn grpc(addr: SocketAddr, path: &str, body: &[u8]) -> Option<Status> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let (client, conn) = h2::client::handshake(tcp).await.ok()?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.ok()?;
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .ok()?;
    let (resp, mut send) = client.send_request(req, false).ok()?;
    let _ = send.send_data(Bytes::copy_from_slice(body), true);
    let resp = resp.await.ok()?;
    // A trailers-only answer carries grpc-status in its headers.
    let mut code = status_of(resp.headers());
    let mut recv = resp.into_body();
    while let Some(chunk) = recv.data().await {
        if let Ok(chunk) = chunk {
            let _ = recv.flow_control().release_capacity(chunk.len());
        } else {
            break;
        }
    }
    if let Ok(Some(trailers)) = recv.trailers().await {
        code = code.or_else(|| status_of(&trailers));
    }
    conn.abort();
    code
}

fn status_of(headers: &http::HeaderMap) -> Option<Status> {
    Status::from_header_map(headers)
}

fn frame(flag: u8, msg: &[u8]) -> Vec<u8> {
    let mut f = vec![flag];
    f.extend((msg.len() as u32).to_be_bytes());
    f.extend(msg);
    f
}

fn random_bytes(rng: &mut StdRng, len: std::ops::Range<usize>) -> Vec<u8> {
    let n = rng.random_range(len);
    (0..n).map(|_| rng.random()).collect()
}
