//! The connection handshake timeout (`--handshake-timeout-ms`).
//!
//! hyper's HTTP/2 server waits for a client's connection preface (24
//! bytes, `PRI * HTTP/2.0…`) for as long as the client likes, and its
//! keep-alive pings start only after it: a peer that opens a TCP
//! connection and sends part of the preface, or nothing, would hold a
//! socket and a task for ever. [`Preface`] wraps each accepted connection
//! and fails its reads once the timeout passes before the first 24 bytes
//! arrived, so hyper closes it. Under TLS the count is of bytes on the
//! wire (the TLS handshake has its own 10 s timeout in `tls.rs`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Length of the HTTP/2 client connection preface (RFC 9113, 3.4).
const PREFACE_BYTES: usize = 24;

/// An accepted connection that must send its first 24 bytes in time.
pub struct Preface {
    inner: TcpStream,
    /// Bytes read so far, counted up to [`PREFACE_BYTES`].
    read: usize,
    /// `None` once the preface arrived.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Preface {
    pub fn new(inner: TcpStream, timeout: Duration) -> Self {
        Self {
            inner,
            read: 0,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
        }
    }
}

impl AsyncRead for Preface {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.read += buf.filled().len() - before;
                if this.read >= PREFACE_BYTES {
                    this.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                // Polling the timer registers this read to be woken by it.
                let late = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if !late {
                    return Poll::Pending;
                }
                tracing::debug!(
                    bytes = this.read,
                    "closing a connection that did not send its HTTP/2 preface in time (--handshake-timeout-ms)"
                );
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 connection preface within --handshake-timeout-ms",
                )))
            }
        }
    }
}

impl AsyncWrite for Preface {
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

impl Connected for Preface {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
