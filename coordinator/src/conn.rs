//! Connection timeouts the HTTP/2 server does not have: the handshake
//! timeout (`--handshake-timeout-ms`) and the idle timeout
//! (`--idle-timeout-ms`).
//!
//! hyper's HTTP/2 server waits for a client's connection preface (24
//! bytes, `PRI * HTTP/2.0…`) for as long as the client likes, and its
//! keep-alive pings start only after it: a peer that opens a TCP
//! connection and sends part of the preface, or nothing, would hold a
//! socket and a task for ever. And a client that answers pings but sends
//! no call holds them just as long. [`Conn`] wraps each accepted
//! connection and fails its reads, so hyper closes it, when the preface
//! has not arrived within the handshake timeout, or when no call has been
//! open on it for the idle timeout. Under TLS the preface count is of bytes
//! on the wire (the TLS handshake has its own 10 s timeout in `tls.rs`).
//!
//! Which calls are open is known only above HTTP/2, so [`Calls`], a tower
//! layer around every service, counts them per connection in an
//! [`Activity`] that the connection shares through [`Connections`], keyed
//! by the peer's address. A closed idle connection costs a client
//! nothing: gRPC clients connect again on their next call.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// Length of the HTTP/2 client connection preface (RFC 9113, 3.4).
const PREFACE_BYTES: usize = 24;

/// The open connections' activity, by peer address.
#[derive(Debug, Default)]
pub struct Connections {
    by_peer: Mutex<HashMap<SocketAddr, Arc<Activity>>>,
}

/// Calls open on one connection, and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    open: AtomicUsize,
    /// Milliseconds after `since` at which a call last started or ended.
    last_ms: AtomicU64,
    since: Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            open: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            since: Instant::now(),
        }
    }

    fn touch(&self) {
        let ms = self.since.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// A call started; it counts as open until the guard drops (its
    /// response, stream included, has ended).
    pub fn call(self: &Arc<Self>) -> OpenCall {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.touch();
        OpenCall(self.clone())
    }

    /// When the connection turns idle: `None` while a call is open.
    fn idle_since(&self) -> Option<Instant> {
        if self.open.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.since + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// One open call of a connection (see [`Activity::call`]).
#[derive(Debug)]
pub struct OpenCall(Arc<Activity>);

impl Drop for OpenCall {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connections {
    /// The activity of the connection from `peer`, if it is open.
    pub fn get(&self, peer: SocketAddr) -> Option<Arc<Activity>> {
        let by_peer = self.by_peer.lock().unwrap_or_else(PoisonError::into_inner);
        by_peer.get(&peer).cloned()
    }

    /// The activity of a call's connection, from the connect info tonic
    /// puts in each request's extensions (plain or TLS).
    pub fn of_request<B>(&self, req: &http::Request<B>) -> Option<Arc<Activity>> {
        let ext = req.extensions();
        let peer = ext
            .get::<TcpConnectInfo>()
            .or_else(|| {
                ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                    .map(|tls| tls.get_ref())
            })
            .and_then(|info| info.remote_addr())?;
        self.get(peer)
    }

    fn open(self: &Arc<Self>, peer: Option<SocketAddr>) -> Arc<Activity> {
        let activity = Arc::new(Activity::new());
        if let Some(peer) = peer {
            let mut by_peer = self.by_peer.lock().unwrap_or_else(PoisonError::into_inner);
            by_peer.insert(peer, activity.clone());
        }
        activity
    }

    fn close(&self, peer: SocketAddr) {
        let mut by_peer = self.by_peer.lock().unwrap_or_else(PoisonError::into_inner);
        by_peer.remove(&peer);
    }
}

/// How long a connection may wait for its preface, and stay without calls.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub handshake: Duration,
    /// `None`: idle connections stay open.
    pub idle: Option<Duration>,
}

/// An accepted connection under [`Timeouts`].
pub struct Conn {
    inner: TcpStream,
    peer: Option<SocketAddr>,
    connections: Arc<Connections>,
    activity: Arc<Activity>,
    idle: Option<Duration>,
    /// Bytes read so far, counted up to [`PREFACE_BYTES`].
    read: usize,
    /// Until the preface arrived: its deadline; then the next idle check.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Conn {
    pub fn new(inner: TcpStream, timeouts: Timeouts, connections: &Arc<Connections>) -> Self {
        let peer = inner.peer_addr().ok();
        Self {
            activity: connections.open(peer),
            connections: connections.clone(),
            peer,
            inner,
            // Calls are matched to their connection by the peer's address:
            // without one, none would count and a busy connection would
            // look idle.
            idle: timeouts.idle.filter(|_| peer.is_some()),
            read: 0,
            timer: Some(Box::pin(tokio::time::sleep(timeouts.handshake))),
        }
    }

    fn preface_arrived(&self) -> bool {
        self.read >= PREFACE_BYTES
    }

    /// Whether the connection is to be closed now; otherwise the timer is
    /// set to the next moment that may close it, registered with `cx`.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<&'static str> {
        loop {
            let timer = self.timer.as_mut()?;
            if timer.as_mut().poll(cx).is_pending() {
                return None;
            }
            if !self.preface_arrived() {
                return Some("no HTTP/2 connection preface within --handshake-timeout-ms");
            }
            let idle = self.idle?;
            let now = Instant::now();
            let next = match self.activity.idle_since() {
                Some(since) if since + idle <= now => {
                    return Some("no call for --idle-timeout-ms");
                }
                Some(since) => since + idle,
                // A call is open: look again an idle period later.
                None => now + idle,
            };
            self.timer
                .as_mut()
                .expect("timer set above")
                .as_mut()
                .reset(next);
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(peer) = self.peer {
            self.connections.close(peer);
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let had_preface = this.preface_arrived();
                this.read = (this.read + buf.filled().len() - before).min(PREFACE_BYTES);
                if !had_preface && this.preface_arrived() {
                    // From now on the timer watches for idleness.
                    this.activity.touch();
                    this.timer = this.idle.map(|idle| Box::pin(tokio::time::sleep(idle)));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some(why) = this.expired(cx) else {
                    return Poll::Pending;
                };
                tracing::debug!(peer = ?this.peer, "closing a connection: {why}");
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)))
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The tower layer that counts each connection's open calls (see the
/// module docs); put around every service with `Server::layer`.
#[derive(Debug, Clone)]
pub struct CountCalls(pub Arc<Connections>);

impl<S> tower_layer::Layer<S> for CountCalls {
    type Service = Calls<S>;

    fn layer(&self, inner: S) -> Calls<S> {
        Calls {
            inner,
            connections: self.0.clone(),
        }
    }
}

/// A service whose calls count as open on their connection until their
/// response body ends.
#[derive(Debug, Clone)]
pub struct Calls<S> {
    inner: S,
    connections: Arc<Connections>,
}

impl<S, B, R> tonic::codegen::Service<http::Request<B>> for Calls<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Counted<R>>;
    type Error = S::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call = self.connections.of_request(&req).map(|a| a.call());
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Counted { body, _call: call }))
        })
    }
}

/// A response body that holds its call open until it is dropped.
#[derive(Debug)]
pub struct Counted<R> {
    body: R,
    _call: Option<OpenCall>,
}

impl<R: http_body::Body + Unpin> http_body::Body for Counted<R> {
    type Data = R::Data;
    type Error = R::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
