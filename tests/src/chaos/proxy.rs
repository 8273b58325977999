//! A TCP proxy of our own, in this process, between two real processes
//! (workers and a coordinator; coordinators and PostgreSQL), so the harness
//! can break the network between them without root or `tc`: close every
//! connection, black-hole (accept, forward nothing) or delay.
//!
//! Each accepted connection is a task pumping both directions chunk by
//! chunk; before forwarding a chunk it waits while the proxy is black-holed
//! and sleeps the current latency. Dropping the connections bumps an epoch
//! every connection task watches, so they close at once, both sides.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does to the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards at once.
    Pass,
    /// Accepts connections but forwards nothing (a partition that does not
    /// reset connections); what is held is forwarded when it ends.
    Blackhole,
    /// Forwards each chunk after this delay.
    Latency(Duration),
}

/// A listening proxy to one target address.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    epoch: Arc<watch::Sender<u64>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = Arc::new(watch::Sender::new(Mode::Pass));
        let epoch = Arc::new(watch::Sender::new(0));
        let accept = tokio::spawn(accept_loop(listener, target, mode.clone(), epoch.clone()));
        Ok(Proxy {
            addr,
            mode,
            epoch,
            accept,
        })
    }

    /// The address to connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets what the proxy does from now on, to open connections too.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Closes every open connection (both sides see a reset or an end of
    /// stream); new ones are accepted as usual.
    pub fn drop_connections(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.drop_connections();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    epoch: Arc<watch::Sender<u64>>,
) {
    while let Ok((inbound, _)) = listener.accept().await {
        let _ = inbound.set_nodelay(true);
        tokio::spawn(connection(
            inbound,
            target,
            mode.subscribe(),
            epoch.subscribe(),
        ));
    }
}

/// One proxied connection, until either side closes or the epoch changes.
async fn connection(
    inbound: TcpStream,
    target: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    mut epoch: watch::Receiver<u64>,
) {
    // Black-holed: the client's connect succeeds, nothing reaches the target.
    tokio::select! {
        open = mode.wait_for(|m| *m != Mode::Blackhole) => if open.is_err() { return },
        _ = epoch.changed() => return,
    }
    let Ok(upstream) = TcpStream::connect(target).await else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (up_read, up_write) = upstream.into_split();
    tokio::select! {
        _ = pump(in_read, up_write, mode.clone()) => {}
        _ = pump(up_read, in_write, mode) => {}
        _ = epoch.changed() => {}
    }
}

/// Copies `from` to `to` chunk by chunk, obeying the mode before each write.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut mode: watch::Receiver<Mode>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let now = match mode.wait_for(|m| *m != Mode::Blackhole).await {
            Ok(m) => *m,
            Err(_) => return,
        };
        if let Mode::Latency(d) = now {
            tokio::time::sleep(d).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback, and a proxy to it.
    async fn echo_behind_proxy() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Proxy::start(target).await.unwrap()
    }

    async fn round_trip(s: &mut TcpStream, within: Duration) -> Option<Duration> {
        let began = tokio::time::Instant::now();
        s.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        match tokio::time::timeout(within, s.read_exact(&mut buf)).await {
            Ok(Ok(_)) if &buf == b"ping" => Some(began.elapsed()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn passes_blackholes_delays_and_drops() {
        let proxy = echo_behind_proxy().await;
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let second = Duration::from_secs(1);
        assert!(round_trip(&mut s, second).await.is_some(), "pass");

        proxy.set(Mode::Blackhole);
        assert!(
            round_trip(&mut s, Duration::from_millis(300))
                .await
                .is_none(),
            "black-holed, yet answered"
        );
        proxy.set(Mode::Pass);
        // What was held is forwarded once the black hole ends.
        let mut held = [0u8; 4];
        tokio::time::timeout(second, s.read_exact(&mut held))
            .await
            .expect("the held bytes arrive")
            .unwrap();
        assert_eq!(&held, b"ping");

        proxy.set(Mode::Latency(Duration::from_millis(150)));
        let took = round_trip(&mut s, second).await.expect("delayed, not lost");
        assert!(
            took >= Duration::from_millis(300),
            "two delayed hops took {took:?}"
        );
        proxy.set(Mode::Pass);

        proxy.drop_connections();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(second, s.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "still open: {read:?}"
        );
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(
            round_trip(&mut again, second).await.is_some(),
            "new connections pass"
        );
    }
}
