//! The request size limit (`--max-request-bytes`), answered as gRPC means it.
//!
//! tonic refuses a request message over a service's
//! `max_decoding_message_size` before any handler runs, with `OUT_OF_RANGE`
//! and a message that names neither the setting nor the way to change it.
//! gRPC's code for a request over a limit is `RESOURCE_EXHAUSTED`, so
//! [`RequestLimit`] wraps each service and turns that one answer into
//! `RESOURCE_EXHAUSTED` stating the limit in bytes and how to raise it.
//! Likewise a request that is not protobuf of the method's type (garbage,
//! or a Struct nested past prost's recursion limit of 100) gets tonic's
//! `INTERNAL` "failed to decode Protobuf message"; the client's fault, so
//! it becomes `INVALID_ARGUMENT` (found by the fuzzer, `tests/src/fuzz/`).
//! Every other response passes through untouched.

use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::NamedService;

/// The default limit: tonic's own, 4 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 << 20;

/// How tonic's decoder words a message over the limit (tonic 0.14,
/// `codec/decode.rs`): "Error, decoded message length too large: found N
/// bytes, the limit is: L bytes".
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// How tonic's decoder words a request that is not valid protobuf (tonic
/// 0.14, `codec/prost.rs`, answered `INTERNAL`).
const TONIC_UNDECODABLE: &str = "failed to decode Protobuf message";

/// A service whose over-limit requests are answered `RESOURCE_EXHAUSTED`.
/// Give it the limit the inner service was built with.
#[derive(Debug, Clone)]
pub struct RequestLimit<S> {
    inner: S,
    limit: usize,
}

impl<S> RequestLimit<S> {
    pub fn new(inner: S, limit: usize) -> Self {
        Self { inner, limit }
    }
}

impl<S: NamedService> NamedService for RequestLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for RequestLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let limit = self.limit;
        let response = self.inner.call(req);
        Box::pin(async move { response.await.map(|r| relabel(r, limit)) })
    }
}

/// The response, or `RESOURCE_EXHAUSTED` in place of tonic's over-limit
/// `OUT_OF_RANGE` (sent as headers only: the request never reached a handler).
fn relabel(response: http::Response<Body>, limit: usize) -> http::Response<Body> {
    let status = response.headers().get(Status::GRPC_STATUS);
    if !matches!(status.map(|v| v.as_bytes()), Some(b"11" | b"13")) {
        // Not OUT_OF_RANGE (11) or INTERNAL (13): most responses carry no
        // status header at all.
        return response;
    }
    match Status::from_header_map(response.headers()) {
        Some(s) if s.message().starts_with(TONIC_TOO_LARGE) => {
            too_large(s.message(), limit).into_http()
        }
        Some(s)
            if s.code() == tonic::Code::Internal && s.message().starts_with(TONIC_UNDECODABLE) =>
        {
            undecodable(s.message()).into_http()
        }
        _ => response,
    }
}

fn too_large(tonic_message: &str, limit: usize) -> Status {
    // "… found N bytes, …": the size, when tonic said it.
    let size = tonic_message
        .split("found ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .map(|n| format!(" of {n} bytes"))
        .unwrap_or_default();
    Status::resource_exhausted(format!(
        "the request message{size} is over this coordinator's limit of {limit} bytes; \
         send less in one call (fewer reports or tasks, a smaller payload), or raise the \
         limit with --max-request-bytes (STAGECOACH_MAX_REQUEST_BYTES)"
    ))
}

fn undecodable(tonic_message: &str) -> Status {
    // prost's account names the path to the bad field; a Struct nested
    // deep repeats it a hundred times, so keep its end, which says why.
    let detail = tonic_message
        .trim_start_matches(TONIC_UNDECODABLE)
        .trim_start_matches(": ");
    let start = detail.len().saturating_sub(200);
    let start = (start..=detail.len())
        .find(|i| detail.is_char_boundary(*i))
        .unwrap_or(0);
    let ellipsis = if start > 0 { "…" } else { "" };
    Status::invalid_argument(format!(
        "the request is not a protobuf message of this method's type ({ellipsis}{}); \
         payloads, parameters and outputs may nest at most 24 levels",
        &detail[start..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn names_the_size_the_limit_and_the_flag() {
        let tonic = Status::out_of_range(
            "Error, decoded message length too large: found 5242909 bytes, the limit is: 4194304 bytes",
        );
        let answer = relabel(tonic.into_http(), 4194304);
        let s = Status::from_header_map(answer.headers()).unwrap();
        assert_eq!(s.code(), Code::ResourceExhausted);
        for words in [
            "5242909 bytes",
            "limit of 4194304 bytes",
            "--max-request-bytes",
        ] {
            assert!(s.message().contains(words), "{}", s.message());
        }
        // A request that does not decode is the client's fault.
        let tonic = Status::internal(format!(
            "{TONIC_UNDECODABLE}: {}recursion limit reached",
            "Value.kind: Struct.fields: ".repeat(60)
        ));
        let s = Status::from_header_map(relabel(tonic.into_http(), 10).headers()).unwrap();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message().contains("recursion limit reached"),
            "{}",
            s.message()
        );
        assert!(s.message().len() < 400, "{}", s.message());
        // Any other INTERNAL or OUT_OF_RANGE is left alone.
        let other = relabel(Status::internal("database is gone").into_http(), 10);
        let s = Status::from_header_map(other.headers()).unwrap();
        assert_eq!(s.code(), Code::Internal);
        let other = relabel(Status::out_of_range("page 9 of 3").into_http(), 10);
        let s = Status::from_header_map(other.headers()).unwrap();
        assert_eq!((s.code(), s.message()), (Code::OutOfRange, "page 9 of 3"));
    }
}
