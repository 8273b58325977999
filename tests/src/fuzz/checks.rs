//! What the fuzzer checks besides each answer's code: the coordinator is
//! alive and SERVING, its memory stays bounded, and the known findings it
//! may still answer wrongly (named, so CI stays green while they are open).

use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A known finding: answers of `rpc` with `code` whose message contains
/// `message` are counted under (`rpc` is a prefix: `raw` covers
/// `raw-health`) `name`, not as violations. Each must be
/// reported and fixed in the coordinator, then removed from [`KNOWN`].
#[derive(Debug)]
pub struct Known {
    pub name: &'static str,
    pub rpc: &'static str,
    pub code: Code,
    pub message: &'static str,
}

/// The known findings. Fixed so far (each was a violation here first): a
/// request that does not decode as protobuf, e.g. a Struct nested past
/// prost's recursion limit, was tonic's `INTERNAL`; it is now
/// `INVALID_ARGUMENT` (`coordinator/src/grpc/limit.rs`), and so is one sent
/// to the health service, which is behind that layer too since.
///
/// Left as they are: gRPC framing errors only a broken gRPC library can
/// send (raw frames), which tonic answers `INTERNAL` as the gRPC spec asks
/// (<https://grpc.github.io/grpc/core/md_doc_compression.html> for the
/// compressed flag; "error parsing request" in `statuscodes.md`).
pub const KNOWN: &[Known] = &[
    Known {
        name: "grpc-framing: compressed flag without grpc-encoding, or a flag not 0 or 1",
        rpc: "raw",
        code: Code::Internal,
        message: "protocol error: received message with",
    },
    Known {
        name: "grpc-framing: a body that ends inside a frame",
        rpc: "raw",
        code: Code::Internal,
        message: "Unexpected EOF decoding stream",
    },
    Known {
        name: "grpc-framing: a unary call without a request message",
        rpc: "raw",
        code: Code::Internal,
        message: "Missing request message",
    },
];

/// The known finding an answer matches, if any.
pub fn known(rpc: &str, code: Code, message: &str) -> Option<&'static str> {
    KNOWN
        .iter()
        .find(|k| rpc.starts_with(k.rpc) && k.code == code && message.contains(k.message))
        .map(|k| k.name)
}

/// The `grpc.health.v1` status of the whole server ("" service).
pub async fn health(channel: &Channel) -> Result<ServingStatus, String> {
    let resp = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| format!("health check: {s}"))?;
    Ok(resp.into_inner().status())
}

/// The resident set size of process `pid` in KiB (`VmRSS`), None once it is
/// gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
