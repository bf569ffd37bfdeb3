//! The client HTTP listener: axum's router served by hyper with the limits a public port
//! needs (axum's own `serve` has none of them).
//!
//! - At most `max_connections` connections, and `max_connections_per_ip` from one address;
//!   a connection past either gets `503 too_many_connections` and is closed.
//! - A request's headers must arrive within `header_read_timeout_ms` (slowloris).
//! - A connection on which no byte moves either way for `idle_timeout_ms` is closed
//!   (keep-alive connections left open; WebSockets stay busy with their pings).
//!
//! Shutdown: the accept loop stops, connections finish their requests (hyper's graceful
//! shutdown), upgraded WebSockets are closed by their sessions.

use crate::config::Config;
use crate::metrics::Metrics;
use futures::FutureExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Limits {
    pub fn from_config(c: &Config) -> Self {
        Self {
            max_connections: c.max_connections,
            max_connections_per_ip: c.max_connections_per_ip,
            header_read_timeout: Duration::from_millis(c.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(c.idle_timeout_ms),
        }
    }
}

/// Open connections, in all and per address.
#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Holds one connection's place in the counts until dropped.
struct Slot {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
    metrics: Metrics,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
        self.metrics.http_connections.dec();
    }
}

/// Takes a place for a connection from `ip`, or says which limit is reached.
fn admit(counts: &Arc<Mutex<Counts>>, ip: IpAddr, limits: &Limits, metrics: &Metrics) -> Result<Slot, &'static str> {
    let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
    if c.total >= limits.max_connections {
        return Err("node");
    }
    let n = c.per_ip.entry(ip).or_default();
    if *n >= limits.max_connections_per_ip {
        return Err("address");
    }
    *n += 1;
    c.total += 1;
    metrics.http_connections.inc();
    Ok(Slot { counts: counts.clone(), ip, metrics: metrics.clone() })
}

/// A stream that notes when a byte last moved, and holds the connection's place in the
/// counts for as long as it lives (also after an upgrade to WebSocket).
struct Tracked<S> {
    inner: S,
    last: Arc<AtomicU64>,
    start: Instant,
    _slot: Slot,
}

impl<S> Tracked<S> {
    fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
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
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

async fn refuse(mut sock: TcpStream, which: &str) {
    let body = format!(
        r#"{{"code":"too_many_connections","message":"this node's limit of connections per {which} is reached; retry later or elsewhere"}}"#
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        // Take what the client already sent, so closing does not reset the connection
        // before it reads the answer.
        let mut scratch = [0u8; 16 << 10];
        let _ = tokio::time::timeout(Duration::from_millis(100), sock.read(&mut scratch)).await;
        sock.write_all(head.as_bytes()).await?;
        sock.write_all(body.as_bytes()).await?;
        sock.shutdown().await
    })
    .await;
}

/// Serves `app` on `listener` under `limits` until `stop` completes, then lets open
/// connections finish.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    metrics: Metrics,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let counts = Arc::new(Mutex::new(Counts::default()));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    tokio::pin!(stop);
    loop {
        let (sock, addr) = tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        let slot = match admit(&counts, addr.ip(), &limits, &metrics) {
            Ok(s) => s,
            Err(which) => {
                metrics
                    .shed
                    .with_label_values(&[if which == "node" { "connections" } else { "connections_per_ip" }])
                    .inc();
                tokio::spawn(refuse(sock, which));
                continue;
            }
        };
        let start = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        // Handlers see the client's address as axum's `ConnectInfo` (login limits use it).
        let routes = app.clone();
        let svc = TowerToHyperService::new(tower::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(axum::extract::ConnectInfo(addr));
            tower::ServiceExt::oneshot(routes.clone(), req)
        }));
        let idle = limits.idle_timeout;
        let conn = match &tls {
            None => {
                let io = TokioIo::new(Tracked { inner: sock, last: last.clone(), start, _slot: slot });
                graceful.watch(builder.serve_connection_with_upgrades(io, svc).into_owned()).boxed()
            }
            Some(acceptor) => {
                // The handshake runs in the connection's task, bounded like reading headers.
                let (acceptor, builder, watcher) = (acceptor.clone(), builder.clone(), graceful.watcher());
                let (last, handshake) = (last.clone(), limits.header_read_timeout);
                async move {
                    let tls = match tokio::time::timeout(handshake, acceptor.accept(sock)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%addr, cause = %e, "TLS handshake failed");
                            return Ok(());
                        }
                        Err(_) => return Ok(()),
                    };
                    let io = TokioIo::new(Tracked { inner: tls, last, start, _slot: slot });
                    watcher.watch(builder.serve_connection_with_upgrades(io, svc).into_owned()).await
                }
                .boxed()
            }
        };
        tokio::spawn(async move {
            let idle_watch = async {
                loop {
                    let since = start.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                    if since >= idle {
                        return;
                    }
                    tokio::time::sleep(idle - since).await;
                }
            };
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(%addr, cause = %e, "connection ended with an error");
                },
                _ = idle_watch => tracing::debug!(%addr, "closing an idle connection"),
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
