//! The RPC latency layer: each call to a Stagecoach service is observed in
//! `stagecoach_rpc_duration_seconds{service, method, code}` once its
//! response has ended, so the count of the histogram is the count of calls.
//!
//! Outside the token check and the request size limit, so refused calls
//! (`UNAUTHENTICATED`, `RESOURCE_EXHAUSTED`) are counted too. The status
//! code of a successful call travels in the response's trailers, after the
//! body: the response body is wrapped to read them. A response dropped
//! before its trailers (the client went away) counts as `CANCELLED`.
//!
//! The `method` label takes only the methods of the Stagecoach protos
//! (read from the descriptor set the server is built with); any other path
//! is `unknown`, so a client sending made-up paths cannot grow the label
//! set.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use http_body::{Body as _, Frame, SizeHint};
use prometheus::Histogram;
use prost::Message;
use stagecoach_proto::code_name;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Bytes, Context, Poll, Service, http};
use tonic::server::NamedService;
use tonic::{Code, Status};

use super::Metrics;

/// Every Stagecoach method by path (`/stagecoach.v1.MigrationService/
/// CreateMigration`): its service and method labels.
#[derive(Clone)]
pub struct RpcMethods {
    by_path: Arc<HashMap<String, (String, String)>>,
}

impl RpcMethods {
    /// The methods of `descriptor_set` (an encoded `FileDescriptorSet`).
    pub fn from_descriptors(descriptor_set: &[u8]) -> Result<Self, prost::DecodeError> {
        let set = prost_types::FileDescriptorSet::decode(descriptor_set)?;
        let mut by_path = HashMap::new();
        for file in &set.file {
            for service in &file.service {
                let service_name = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    let path = format!("/{service_name}/{}", method.name());
                    by_path.insert(path, (service_name.clone(), method.name().to_string()));
                }
            }
        }
        Ok(RpcMethods {
            by_path: Arc::new(by_path),
        })
    }

    /// The methods of Stagecoach's own protos.
    pub fn stagecoach() -> Self {
        Self::from_descriptors(stagecoach_proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set built into this binary decodes")
    }

    fn labels(&self, path: &str) -> (&str, &str) {
        match self.by_path.get(path) {
            Some((service, method)) => (service, method),
            None => ("unknown", "unknown"),
        }
    }
}

/// A service whose calls are observed (module doc).
#[derive(Clone)]
pub struct ObserveRpc<S> {
    inner: S,
    metrics: Metrics,
    methods: RpcMethods,
}

impl<S> ObserveRpc<S> {
    pub fn new(inner: S, metrics: Metrics, methods: RpcMethods) -> Self {
        Self {
            inner,
            metrics,
            methods,
        }
    }
}

impl<S: NamedService> NamedService for ObserveRpc<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for ObserveRpc<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let (service, method) = self.methods.labels(req.uri().path());
        let call = Call {
            metrics: self.metrics.clone(),
            service: service.to_string(),
            method: method.to_string(),
            started,
        };
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            // A trailers-only response (every error) has its status in its
            // headers and no body to wait for.
            if let Some(code) = status_code(response.headers()) {
                call.end(code);
                return Ok(response);
            }
            if response.body().is_end_stream() {
                call.end(Code::Unknown);
                return Ok(response);
            }
            Ok(response.map(|body| {
                Body::new(Timed {
                    inner: body,
                    call: Some(call),
                })
            }))
        })
    }
}

/// One call being observed.
struct Call {
    metrics: Metrics,
    service: String,
    method: String,
    started: Instant,
}

impl Call {
    fn end(self, code: Code) {
        let histogram: Histogram = self
            .metrics
            .rpc(&self.service, &self.method, code_name(code));
        histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// A response body that ends its call's observation when its trailers
/// pass (or it is dropped).
struct Timed {
    inner: Body,
    call: Option<Call>,
}

impl Timed {
    fn end(&mut self, code: Code) {
        if let Some(call) = self.call.take() {
            call.end(code);
        }
    }
}

impl http_body::Body for Timed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = status_code(trailers).unwrap_or(Code::Unknown);
                    self.end(code);
                }
            }
            Poll::Ready(Some(Err(status))) => self.end(status.code()),
            // Ended without trailers: no status was sent.
            Poll::Ready(None) => self.end(Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        self.end(Code::Cancelled);
    }
}

/// The `grpc-status` of a header map, if it has one.
fn status_code(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?;
    Some(Code::from_bytes(value.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stagecoach_method_has_labels_and_other_paths_are_unknown() {
        let methods = RpcMethods::stagecoach();
        assert_eq!(
            methods.labels("/stagecoach.v1.MigrationService/CreateMigration"),
            ("stagecoach.v1.MigrationService", "CreateMigration")
        );
        assert_eq!(
            methods.labels("/stagecoach.v1.WorkerService/Complete"),
            ("stagecoach.v1.WorkerService", "Complete")
        );
        assert_eq!(
            methods.labels("/stagecoach.v1.MigrationService/Nuke"),
            ("unknown", "unknown")
        );
        assert_eq!(methods.labels("garbage"), ("unknown", "unknown"));
    }
}
