//! Assembles and runs a coordinator: store, core, background loops and the
//! gRPC server (three services, health and reflection on one port, TLS
//! on it when configured).
//! Shutdown is a parameter, so tests and the demo drive it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use stagecoach_proto::v1::admin_service_server::AdminServiceServer;
use stagecoach_proto::v1::migration_service_server::MigrationServiceServer;
use stagecoach_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

use crate::auth::{Auth, Authorize};
use crate::background::Background;
use crate::config::Config;
use crate::conn::{Conn, Connections, CountCalls, Timeouts};
use crate::engine::{
    Coordinator, run_dispatcher, run_remote_effects, run_stream_claims, run_sweeper,
};
use crate::grpc::{AdminApi, MigrationApi, RequestLimit, WorkerApi};
use crate::metrics::{Metrics, ObserveRpc, RpcMethods};
use crate::store::Store;

/// Why a coordinator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Auth(#[from] crate::auth::TokenFileError),
    #[error("could not open the database: {0}")]
    Store(#[from] crate::error::Error),
    #[error("could not build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Background(#[from] crate::background::Stopped),
}

/// Opens the configured store (the backend the URL's scheme names) and
/// prepares the default pool.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, ServeError> {
    config.validate()?;
    let store = crate::store::open(&config.database, config.limits()).await?;
    store
        .ensure_pool("default", config.default_pool_slots)
        .await?;
    Ok(store)
}

/// A Stagecoach service behind the token check, then the request size
/// limit: a refused call is answered before its body is decoded. Every
/// call, refused or not, is timed for `/metrics` (`metrics::ObserveRpc`).
fn guarded<S>(
    service: S,
    limit: usize,
    auth: &Auth,
    observe: &(Metrics, RpcMethods),
) -> ObserveRpc<Authorize<RequestLimit<S>>> {
    let guarded = Authorize::new(RequestLimit::new(service, limit), auth.clone());
    ObserveRpc::new(guarded, observe.0.clone(), observe.1.clone())
}

/// The tokens of `--auth-tokens`, or auth off; says at start which it is.
fn load_auth(config: &Config) -> Result<Auth, ServeError> {
    let Some(path) = &config.auth_tokens else {
        if config.is_open_to_others() {
            tracing::warn!(
                listen = %config.listen,
                "--allow-unauthenticated: serving WITHOUT tokens on a non-loopback address; anyone who can reach it may run, cancel and report anything"
            );
        } else {
            tracing::info!("auth off: no --auth-tokens file, serving on loopback only");
        }
        return Ok(Auth::off());
    };
    let auth = Auth::load(path)?;
    let tokens = auth.table().map_or(0, |t| t.len());
    tracing::info!(file = %path.display(), tokens, "auth on: every call needs a bearer token (SIGHUP re-reads the file)");
    if tokens == 0 {
        tracing::warn!(file = %path.display(), "the tokens file holds no token: every call but health and reflection is refused");
    }
    Ok(auth)
}

/// The bound sockets of a coordinator: gRPC, and the HTTP port unless
/// `--http-listen off`. Bound by the caller, so it knows the ports (`:0`).
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: Option<TcpListener>,
}

/// Serves on `listeners` until `shutdown` is cancelled, then drains: worker
/// and watch streams end, in-flight calls finish, the loops stop.
///
/// `on_ready` is called once the store is open and migrated, just before
/// the server starts answering.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(),
) -> Result<(), ServeError> {
    // The TLS files first: a wrong one stops the start before the
    // database is touched.
    let tls = config.tls.load()?;
    let auth = load_auth(&config)?;
    tokio::spawn(auth.clone().reload_on_sighup(shutdown.clone()));
    let store = open_store(&config).await?;
    let remote = store.remote_effects().await?;
    let core = Coordinator::with_limits(
        store,
        config.timing(),
        config.request_limits(),
        shutdown.clone(),
    );
    let mut background = Background::new(shutdown.clone());
    if let Some(remote) = remote {
        let listener = run_remote_effects(core.clone(), remote, shutdown.clone());
        background.spawn("listener of other coordinators", ok(listener));
    }
    let dispatcher = run_dispatcher(core.clone(), shutdown.clone());
    background.spawn("dispatcher", ok(dispatcher));
    background.spawn("sweeper", ok(run_sweeper(core.clone(), shutdown.clone())));
    let claims = run_stream_claims(core.clone(), shutdown.clone());
    background.spawn("renewal of worker stream claims", ok(claims));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<MigrationServiceServer<MigrationApi>>()
        .await;
    health.set_serving::<WorkerServiceServer<WorkerApi>>().await;
    health.set_serving::<AdminServiceServer<AdminApi>>().await;
    // Both reflection versions: grpcurl and many generated tools still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(stagecoach_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    if let Some(listener) = listeners.http {
        let router = crate::http::router(crate::http::HttpState {
            core: core.clone(),
            auth: auth.clone(),
        });
        let serve = crate::http::serve(listener, router, shutdown.clone());
        background.spawn("HTTP port", serve);
    }
    let reflection_v1alpha = reflection().build_v1alpha()?;

    // One limit for the three services; an over-limit request is answered
    // RESOURCE_EXHAUSTED naming it (see `grpc::RequestLimit`).
    let limit = config.max_request_bytes;
    let timeouts = Timeouts {
        handshake: Duration::from_millis(config.handshake_timeout_ms),
        idle: Some(config.idle_timeout_ms)
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis),
    };
    let connections = Arc::new(Connections::default());
    let observe = (core.metrics().clone(), RpcMethods::stagecoach());
    on_ready();
    let drain = {
        let core = core.clone();
        async move {
            shutdown.cancelled().await;
            tracing::info!("shutting down: closing worker streams");
            core.close_streams();
        }
    };
    let keepalive = Some(config.keepalive_interval_ms)
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    let mut server = tonic::transport::Server::builder()
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(Some(Duration::from_millis(config.keepalive_timeout_ms)))
        // The kernel's probes too: a peer gone without a FIN or RST.
        .tcp_keepalive(Some(Duration::from_secs(60)))
        // Counts each connection's open calls, for the idle timeout.
        .layer(CountCalls(connections.clone()));
    if let Some(tls) = tls {
        tracing::info!(
            mutual = config.tls.tls_client_ca.is_some(),
            "serving TLS only"
        );
        server = server.tls_config(tls)?;
    }
    server
        // Health answers without a token, but bad input gets the same
        // client error codes as everywhere else (`grpc::RequestLimit`).
        .add_service(RequestLimit::new(health_service, limit))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(guarded(
            MigrationServiceServer::new(MigrationApi::new(core.clone()))
                .max_decoding_message_size(limit),
            limit,
            &auth,
            &observe,
        ))
        .add_service(guarded(
            WorkerServiceServer::new(WorkerApi::new(core.clone())).max_decoding_message_size(limit),
            limit,
            &auth,
            &observe,
        ))
        .add_service(guarded(
            AdminServiceServer::new(AdminApi::new(core.clone())).max_decoding_message_size(limit),
            limit,
            &auth,
            &observe,
        ))
        .serve_with_incoming_shutdown(
            // TCP_NODELAY: without it Nagle's algorithm meets delayed ACKs and
            // every small reply (an assignment, a report's answer) waits ~40 ms.
            // Each connection must send its preface in time, and be closed
            // when idle (see `conn`).
            TcpIncoming::from(listeners.grpc)
                .with_nodelay(Some(true))
                .map(move |conn| conn.map(|c| Conn::new(c, timeouts, &connections))),
            drain,
        )
        .await?;
    let stopped = background.join().await;
    // Every stream has ended: the worker ids it served are free at once.
    if let Err(e) = core.release_stream_claims().await {
        tracing::warn!(error = %e, "forgetting this coordinator's worker streams in the database failed; other processes may take their worker ids once the claims expire");
    }
    stopped?;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// A loop that ends only at shutdown, as a task [`Background`] supervises.
async fn ok(task: impl Future<Output = ()>) -> Result<(), std::convert::Infallible> {
    task.await;
    Ok(())
}
