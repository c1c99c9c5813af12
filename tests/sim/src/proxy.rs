//! A TCP proxy whose network faults are switched by the test.
//!
//! [`FaultProxy`] listens on `127.0.0.1:0` and forwards every accepted
//! connection to one target address. Point the agent at the proxy instead of
//! the cloud broker and the test decides when the cloud is reachable:
//!
//! * [`FaultProxy::cut`] closes every live connection (both sockets) and
//!   refuses new ones: accepted, then closed at once, so the client sees a
//!   reset or EOF and must reconnect with its backoff.
//! * [`FaultProxy::blackhole`] stops forwarding bytes without closing
//!   anything, and new connections are accepted but go nowhere: the silent
//!   partition that only keep-alive timeouts detect. Bytes read before the
//!   blackhole are held, not dropped, and flow again after `restore`.
//! * [`FaultProxy::restore`] forwards again.
//! * [`FaultProxy::set_delay`] holds every chunk of bytes for a while before
//!   forwarding it, in each direction: a slow, high-latency link (a chunk
//!   waits for the one before it, so throughput drops too).
//!
//! The proxy never alters, reorders or drops bytes of a connection it keeps
//! open; only whole connections are closed. Counters ([`ProxyStats`]) tell the
//! test how many connections were accepted, refused and are live.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Bytes read from one side before they are written to the other.
const PROXY_CHUNK: usize = 16 * 1024;

/// What the proxy does with traffic right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward bytes both ways.
    Forward,
    /// Close live connections and refuse new ones.
    Cut,
    /// Hold bytes and connections open without forwarding anything.
    Blackhole,
}

/// Counters of a [`FaultProxy`], as a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted from clients (including refused ones).
    pub accepted: u64,
    /// Connections closed at once because the proxy was cut.
    pub refused: u64,
    /// Connections currently open through the proxy.
    pub live: u64,
    /// Connections to the target that failed.
    pub upstream_failures: u64,
    /// Bytes forwarded client -> target.
    pub bytes_up: u64,
    /// Bytes forwarded target -> client.
    pub bytes_down: u64,
}

#[derive(Debug, Default)]
struct Counters {
    /// Delay per forwarded chunk, in microseconds.
    delay_us: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    live: AtomicU64,
    upstream_failures: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// See the module docs. Dropping the proxy stops it and closes every
/// connection through it.
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    target: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    counters: Arc<Counters>,
    accept_task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts forwarding from a fresh port on 127.0.0.1 to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = listener.local_addr()?.port();
        let (mode, mode_rx) = watch::channel(ProxyMode::Forward);
        let counters = Arc::new(Counters::default());
        let accept_task = tokio::spawn(accept_loop(
            listener,
            target,
            mode_rx,
            Arc::clone(&counters),
        ));
        Ok(FaultProxy {
            port,
            target,
            mode,
            counters,
            accept_task,
        })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port()`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Where connections are forwarded.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Closes every live connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.set_mode(ProxyMode::Cut);
    }

    /// Stops forwarding without closing anything until `restore`.
    pub fn blackhole(&self) {
        self.set_mode(ProxyMode::Blackhole);
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.set_mode(ProxyMode::Forward);
    }

    /// Sets the mode; see [`ProxyMode`].
    pub fn set_mode(&self, mode: ProxyMode) {
        // `send_replace` never fails, even when no connection is listening.
        self.mode.send_replace(mode);
        tracing::info!(port = self.port, ?mode, "fault proxy mode");
    }

    /// The current mode.
    pub fn mode(&self) -> ProxyMode {
        *self.mode.borrow()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.counters;
        ProxyStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            live: c.live.load(Ordering::Relaxed),
            upstream_failures: c.upstream_failures.load(Ordering::Relaxed),
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
        }
    }

    /// Delays every forwarded chunk by `delay` (zero = no delay), for new
    /// and live connections alike.
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.counters.delay_us.store(us, Ordering::Relaxed);
    }

    /// Connections currently open through the proxy.
    pub fn live_connections(&self) -> u64 {
        self.counters.live.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        // Connection tasks watch the mode channel; closing it (by dropping
        // the sender) ends them, see `forward`.
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    mode: watch::Receiver<ProxyMode>,
    counters: Arc<Counters>,
) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "fault proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        if *mode.borrow() == ProxyMode::Cut {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "fault proxy refused a connection");
            drop(client);
            continue;
        }
        tokio::spawn(connection(
            client,
            target,
            mode.clone(),
            Arc::clone(&counters),
        ));
    }
}

/// Decrements the live counter however the connection task ends.
struct LiveGuard(Arc<Counters>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    client: TcpStream,
    target: SocketAddr,
    mode: watch::Receiver<ProxyMode>,
    counters: Arc<Counters>,
) {
    counters.live.fetch_add(1, Ordering::Relaxed);
    let _live = LiveGuard(Arc::clone(&counters));
    let upstream = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            counters.upstream_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, %target, "fault proxy upstream connect failed");
            return;
        }
    };
    if let Err(e) = client
        .set_nodelay(true)
        .and_then(|()| upstream.set_nodelay(true))
    {
        tracing::debug!(error = %e, "fault proxy could not set TCP_NODELAY");
    }
    let (client_r, client_w) = client.into_split();
    let (up_r, up_w) = upstream.into_split();
    let c = Arc::clone(&counters);
    tokio::join!(
        forward(client_r, up_w, mode.clone(), &counters, move |n| {
            c.bytes_up.fetch_add(n, Ordering::Relaxed);
        }),
        forward(up_r, client_w, mode, &counters, |n| {
            counters.bytes_down.fetch_add(n, Ordering::Relaxed);
        }),
    );
}

/// Copies one direction until EOF, an error or a cut. Returns when the
/// connection must be closed; dropping both halves closes the sockets.
async fn forward(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
    counters: &Counters,
    count: impl Fn(u64),
) {
    let mut buf = vec![0u8; PROXY_CHUNK];
    loop {
        // Wait until forwarding is allowed; a cut (or a dropped proxy) ends
        // the connection.
        if !wait_forward(&mut mode).await {
            return;
        }
        let n = tokio::select! {
            // Cancel-safe: a TcpStream read that loses the race read nothing.
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    // Pass the half-close on so the other side sees EOF too.
                    if let Err(e) = to.shutdown().await {
                        tracing::trace!(error = %e, "fault proxy shutdown");
                    }
                    return;
                }
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let delay = counters.delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_micros(delay)) => {}
                _ = wait_cut(mode.clone()) => return,
            }
        }
        // Bytes already read are held through a blackhole, never dropped.
        if !wait_forward(&mut mode).await {
            return;
        }
        tokio::select! {
            // Not cancel-safe, but the other branch only wins on a cut, after
            // which the connection is closed anyway.
            r = to.write_all(&buf[..n]) => {
                if r.is_err() {
                    return;
                }
                count(n as u64);
            }
            _ = wait_cut(mode.clone()) => return,
        }
    }
}

/// Returns true once the mode is `Forward`, false on `Cut` or when the proxy
/// is gone.
async fn wait_forward(mode: &mut watch::Receiver<ProxyMode>) -> bool {
    loop {
        let current = *mode.borrow_and_update();
        match current {
            ProxyMode::Forward => return true,
            ProxyMode::Cut => return false,
            ProxyMode::Blackhole => {
                if mode.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}

/// Resolves when the proxy is cut or dropped.
async fn wait_cut(mut mode: watch::Receiver<ProxyMode>) {
    loop {
        if *mode.borrow_and_update() == ProxyMode::Cut {
            return;
        }
        if mode.changed().await.is_err() {
            return;
        }
    }
}
