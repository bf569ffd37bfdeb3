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
//!
//! The front runtime. The listener runs on a small runtime of its own ([`start`]; threads
//! named `raftchat-front`, one for a node of up to four cores): it accepts connections, reads
//! requests, writes answers and does TLS, and hands each request to the node's runtime to be
//! handled. Before that, a [`Gate`] may place a request on the front runtime itself; the HTTP
//! API uses it to refuse sends past the node's admission limit (`api::http::front_gate`).
//! Why: when a node is overloaded its runtime is what is busy (applying batches of hundreds
//! of commands, replicating), and a refusal that waits for a turn there is not "at once".
//! The front threads are idle most of the time, so the kernel runs them soon after a request
//! arrives. A handler on the node's runtime is aborted when its connection drops the answer,
//! as it was when it ran in the connection's task.

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

/// Where a request is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// On the listener's front runtime (cheap answers that must not wait for the node).
    Front,
    /// On the node's runtime (everything else).
    Node,
}

/// Looks at a request as soon as its head is read, on the front runtime, and says where it
/// is handled; may read the body and add extensions.
pub type Gate = Arc<
    dyn Fn(
            hyper::Request<hyper::body::Incoming>,
        ) -> futures::future::BoxFuture<'static, (Place, hyper::Request<axum::body::Body>)>
        + Send
        + Sync,
>;

/// The listener's front runtime, in every request's extensions (the WebSocket sessions run
/// their reader and writer on it, `api::ws::session`).
#[derive(Clone)]
pub struct FrontRuntime(pub tokio::runtime::Handle);

/// The listener running on its front runtime.
pub struct Running {
    done: Option<tokio::task::JoinHandle<()>>,
    /// Lives until the node has stopped: the sockets of upgraded WebSockets belong to it.
    rt: Option<tokio::runtime::Runtime>,
}

impl Running {
    /// Completes when the listener has stopped accepting and its connections have finished.
    pub async fn finished(&mut self) {
        if let Some(done) = self.done.as_mut() {
            let _ = done.await;
            self.done = None;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // Dropped from async code, where a runtime may not block to stop.
            rt.shutdown_background();
        }
    }
}

/// Threads of the front runtime for a node runtime of `node_workers`: one for up to four,
/// a quarter of them beyond (TLS and HTTP parsing for a large node's clients).
pub fn front_threads(node_workers: usize) -> usize {
    (node_workers / 4).max(1)
}

/// Starts [`serve`] on a runtime of its own (threads `raftchat-front`); requests are handled
/// on the runtime of the caller.
pub fn start(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    metrics: Metrics,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: impl Future<Output = ()> + Send + 'static,
    gate: Gate,
) -> io::Result<Running> {
    let node_rt = tokio::runtime::Handle::current();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(front_threads(node_rt.metrics().num_workers()))
        .thread_name("raftchat-front")
        .enable_all()
        .build()?;
    // The socket moves to the front runtime's reactor.
    let moved = {
        let _in = rt.enter();
        listener.into_std().and_then(TcpListener::from_std)
    };
    let listener = match moved {
        Ok(l) => l,
        Err(e) => {
            rt.shutdown_background();
            return Err(e);
        }
    };
    let done = rt.spawn(serve(listener, app, limits, metrics, tls, stop, gate, node_rt));
    Ok(Running { done: Some(done), rt: Some(rt) })
}

/// Aborts a request's handler on the node's runtime when its connection drops the answer
/// (the client went away, the connection idled out), as if it ran in the connection's task.
struct Handling(tokio::task::JoinHandle<Result<axum::response::Response, std::convert::Infallible>>);

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `app` on `listener` under `limits` until `stop` completes, then lets open
/// connections finish. Requests run on `node_rt` unless `gate` places them on this runtime.
#[allow(clippy::too_many_arguments)]
async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    metrics: Metrics,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: impl Future<Output = ()> + Send + 'static,
    gate: Gate,
    node_rt: tokio::runtime::Handle,
) {
    let front = FrontRuntime(tokio::runtime::Handle::current());
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
        let (routes, gate, node_rt, front) = (app.clone(), gate.clone(), node_rt.clone(), front.clone());
        let svc = TowerToHyperService::new(tower::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(axum::extract::ConnectInfo(addr));
            req.extensions_mut().insert(front.clone());
            let (routes, gate, node_rt) = (routes.clone(), gate.clone(), node_rt.clone());
            async move {
                let (place, req) = gate(req).await;
                let answer = tower::ServiceExt::oneshot(routes, req);
                if place == Place::Front {
                    return answer.await;
                }
                let mut handling = Handling(node_rt.spawn(answer));
                match (&mut handling.0).await {
                    Ok(r) => r,
                    // The node's runtime is shutting down under the request.
                    Err(e) if e.is_cancelled() => {
                        tracing::debug!("a request's handler was cancelled");
                        Ok(axum::response::IntoResponse::into_response(super::ApiError::new(
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "unavailable",
                            "the node is stopping; retry on another node",
                        )))
                    }
                    Err(e) => {
                        tracing::error!(cause = %e, "a request's handler failed");
                        Ok(axum::response::IntoResponse::into_response(super::ApiError::new(
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            "internal",
                            "the request's handler failed",
                        )))
                    }
                }
            }
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
