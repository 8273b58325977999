//! The web dashboard at `/` of the HTTP port: migrations (filtered, paged),
//! one migration (a Gantt chart of its stages from the event log, running
//! tasks, the log's tail), pools and workers, updated live.
//!
//! Two routers, because the two halves are guarded differently:
//!
//! - [`pages`]: the page itself (`/`, `/app.js`, `/style.css`), embedded in
//!   the binary and open to all — it holds no data, and a browser must load
//!   it before it can ask for a token;
//! - [`api`]: the JSON under `/api/…` ([`api`](mod@api)) and the live
//!   change feed `/api/live` ([`live`]), which the HTTP port's token check
//!   guards like every other read.
//!
//! The page is plain JavaScript without a build step. It keeps a token in
//! `sessionStorage` and sends it as `Authorization: Bearer`; the live feed
//! is server-sent events read with `fetch()` rather than `EventSource`,
//! which cannot send that header (a token in the URL would land in logs).
//! Everything from the server goes into the DOM as text, never as markup.
//!
//! Everything shown comes from the [`Coordinator`] the gRPC handlers call;
//! the serde types here are the dashboard's own, converted at this edge.

mod api;
mod live;
mod timeline;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::Semaphore;

use super::HttpState;
use crate::engine::Coordinator;
use timeline::Timelines;

/// Open `/api/live` streams at once, over all clients; one more is
/// answered `503`.
const MAX_LIVE_STREAMS: usize = 64;

/// What the dashboard's API handlers read.
#[derive(Clone)]
struct Dashboard {
    core: Arc<Coordinator>,
    /// Stage spans and log tails read from event logs so far, per migration.
    timelines: Arc<Timelines>,
    /// One permit per open `/api/live` stream.
    live_streams: Arc<Semaphore>,
}

/// The JSON API and the live feed; merge it into the guarded router.
pub fn api(state: &HttpState) -> Router<HttpState> {
    let dashboard = Dashboard {
        core: state.core.clone(),
        timelines: Arc::new(Timelines::default()),
        live_streams: Arc::new(Semaphore::new(MAX_LIVE_STREAMS)),
    };
    Router::new()
        .route("/api/migrations", get(api::list_migrations))
        .route("/api/migrations/{id}", get(api::get_migration))
        .route("/api/pools", get(api::list_pools))
        .route("/api/workers", get(api::list_workers))
        .route("/api/live", get(live::live))
        .route("/api/{*rest}", get(api::no_such_endpoint))
        .with_state(dashboard)
}

/// The page and its assets, open to all.
pub fn pages() -> Router<HttpState> {
    Router::new()
        .route("/", get(|| asset(INDEX_HTML, "text/html; charset=utf-8")))
        .route(
            "/app.js",
            get(|| asset(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/style.css",
            get(|| asset(STYLE_CSS, "text/css; charset=utf-8")),
        )
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Only our own script and style run, and the page cannot be framed: a
/// subject that slipped into markup could still not run a script.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // A new binary may bring a new page: revalidate instead of caching.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
