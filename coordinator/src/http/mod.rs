//! The HTTP port (`--http-listen`, default `127.0.0.1:9464`): what an
//! operator reads with a browser or a Prometheus scraper rather than a
//! gRPC client.
//!
//! It is a second listener, not a route on the gRPC port, so it can be
//! bound to another interface than the API (metrics on an internal network,
//! the API behind a load balancer) and so plain HTTP/1.1 tools work.
//! Everything it shows comes from the same [`Coordinator`] the gRPC
//! handlers call: there is no second source of truth.
//!
//! Tokens work as on the gRPC port: with a tokens file every route but
//! `/healthz` and the dashboard's page itself (`/`, `/app.js`, `/style.css`:
//! no data, see `dashboard`) needs `authorization: Bearer TOKEN` of a role
//! that may read pools and workers ([`HTTP_READ`]); no token answers `401`,
//! another role `403`, with the same messages as gRPC.

mod metrics;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{Auth, HTTP_READ};
use crate::engine::Coordinator;

mod dashboard;

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub core: Arc<Coordinator>,
    pub auth: Auth,
}

/// Every route of the HTTP port.
pub fn router(state: HttpState) -> Router {
    // Routes that need a token when auth is on.
    let guarded: Router<HttpState> = Router::new()
        .merge(dashboard::api(&state))
        .merge(metrics::routes());
    let guarded = guarded.layer(middleware::from_fn_with_state(
        state.clone(),
        require_reader,
    ));
    Router::new()
        .merge(guarded)
        .merge(dashboard::pages())
        // For load balancers and container checks, which hold no token.
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown`; open requests finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// The token check of the gRPC port, answered in HTTP terms.
async fn require_reader(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    match state.auth.check(&path, HTTP_READ, req.headers()) {
        Ok(_) => next.run(req).await,
        Err(status) => {
            let code = match status.code() {
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            let mut response = (code, format!("{}\n", status.message())).into_response();
            if code == StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}
