//! openraft's network over tonic. [`Peers`] holds one lazily connected channel per peer
//! node; every shard group's [`NetworkFactory`] shares it and names its group in each RPC.
//! Payloads are openraft's own serde types as JSON; snapshot chunks travel as raw bytes.
//! Every RPC is bounded by a timeout and carries the cluster's peer key.

use super::pipe::{Kind as PipeKind, PipeError};
use super::TypeConfig;
use crate::pb;
use crate::pb::peer_client::PeerClient;
use crate::shard::{NodeId, ShardId};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

pub const PEER_KEY_HEADER: &str = "x-raftchat-peer";
/// The node id a peer call is meant for: a node refuses a call for another id (a stale or
/// wrong address in its caller's book must not deliver votes or entries to the wrong node).
pub const PEER_TO_HEADER: &str = "x-raftchat-to";

#[derive(Clone)]
pub struct Peers {
    inner: Arc<PeersInner>,
}

struct PeersInner {
    /// The address book: replaced whole when the cluster's node table changes
    /// ([`Peers::update`]), read by cloning the `Arc`.
    book: std::sync::RwLock<Arc<Book>>,
    key: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    rpc_timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
    epoch: std::time::Instant,
    pipe_on: bool,
    calls: Option<prometheus::IntCounterVec>,
}

/// Per peer: its address and channel, its health, its pipe.
#[derive(Default)]
struct Book {
    channels: HashMap<NodeId, (String, Channel)>,
    health: HashMap<NodeId, Arc<Health>>,
    pipes: HashMap<NodeId, Arc<super::pipe::Pipe>>,
}

/// When a peer last answered and last failed to (ms since `epoch`, 0 = never), and whether
/// its being unreachable was logged (one line when it goes, one when it comes back).
#[derive(Default)]
struct Health {
    ok: AtomicU64,
    err: AtomicU64,
    down: std::sync::atomic::AtomicBool,
    /// When "unreachable" was last logged, so a flapping peer logs at most every
    /// [`LOG_DOWN_EVERY`].
    logged_down: AtomicU64,
    /// The first failure after the last success (0: none).
    failing_since: AtomicU64,
}

const LOG_DOWN_EVERY: Duration = Duration::from_secs(30);

/// A peer that failed more recently than it answered, within this window, is suspect.
const SUSPECT_FOR: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("node {0} is not a cluster member")]
    UnknownNode(NodeId),
    #[error("invalid peer address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: String },
}

impl Peers {
    /// `members` maps node ids to gRPC addresses (`host:port`).
    /// With `tls`, peers are dialed with mutual TLS (see [`crate::tls`]).
    pub fn new(
        members: &[(NodeId, String)],
        peer_key: &str,
        rpc_timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, PeerError> {
        let key = peer_key
            .parse()
            .map_err(|_| PeerError::BadAddress { addr: "-".into(), reason: "peer key is not ASCII".into() })?;
        let inner = PeersInner {
            book: std::sync::RwLock::new(Arc::new(Book::default())),
            key,
            rpc_timeout,
            tls,
            epoch: std::time::Instant::now(),
            pipe_on: true,
            calls: None,
        };
        let peers = Self { inner: Arc::new(inner) };
        peers.update(members)?;
        Ok(peers)
    }

    /// Replaces the address book by `members` (id, peer address): a peer whose address is
    /// unchanged keeps its channel, health and pipe; a new or moved one gets a fresh
    /// channel; one no longer listed is forgotten (calls to it fail with
    /// [`PeerError::UnknownNode`]). Nothing changes when an address is invalid.
    pub fn update(&self, members: &[(NodeId, String)]) -> Result<(), PeerError> {
        let old = self.book();
        let mut book = Book::default();
        for (id, addr) in members {
            let channel = match old.channels.get(id) {
                Some((a, ch)) if a == addr => ch.clone(),
                _ => self.channel(addr)?,
            };
            let same = old.channels.get(id).is_some_and(|(a, _)| a == addr);
            book.channels.insert(*id, (addr.clone(), channel));
            book.health.insert(*id, old.health.get(id).cloned().unwrap_or_default());
            let pipe = old.pipes.get(id).filter(|_| same).cloned().unwrap_or_default();
            book.pipes.insert(*id, pipe);
        }
        *self.inner.book.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(book);
        Ok(())
    }

    fn book(&self) -> Arc<Book> {
        self.inner.book.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn channel(&self, addr: &str) -> Result<Channel, PeerError> {
        let rpc_timeout = self.inner.rpc_timeout;
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| PeerError::BadAddress { addr: addr.to_string(), reason: e.to_string() })?
            .connect_timeout(rpc_timeout.min(Duration::from_secs(1)))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        Ok(match &self.inner.tls {
            None => ep.connect_lazy(),
            Some(cfg) => {
                let cfg = cfg.clone();
                let connect_timeout = rpc_timeout.min(Duration::from_secs(1));
                ep.connect_with_connector_lazy(tower::service_fn(move |uri: http::Uri| {
                    let cfg = cfg.clone();
                    async move {
                        tokio::time::timeout(connect_timeout, crate::tls::connect(cfg, uri))
                            .await
                            .map_err(|_| std::io::Error::other("TLS connect timed out"))?
                    }
                }))
            }
        })
    }

    /// Whether peer calls use the pipe (`peer_pipe`; on by default), and where calls are
    /// counted (`raftchat_peer_calls_total`). Set before sharing.
    pub fn with_pipe(mut self, on: bool, calls: prometheus::IntCounterVec) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.pipe_on = on;
            inner.calls = Some(calls);
        }
        self
    }

    /// Counts a call in `raftchat_peer_calls_total{transport,kind}`.
    pub fn count_call(&self, piped: bool, kind: PipeKind) {
        if let Some(c) = &self.inner.calls {
            let kind = match kind {
                PipeKind::AppendEntries => "append_entries",
                PipeKind::Vote => "vote",
                PipeKind::Forward => "forward",
                PipeKind::PreVote => "pre_vote",
                PipeKind::Elect => "elect",
                PipeKind::Host => "host_shard",
                PipeKind::Drop => "drop_shard",
                PipeKind::Locate => "locate",
                PipeKind::Book => "book",
            };
            c.with_label_values(&[if piped { "pipe" } else { "unary" }, kind]).inc();
        }
    }

    /// Whether calls to `target` should go over the pipe: pipes are on and the peer is not
    /// known to lack them (an older build). Otherwise use the unary RPCs.
    pub fn pipe_usable(&self, target: NodeId) -> bool {
        self.inner.pipe_on && self.book().pipes.get(&target).is_some_and(|p| p.usable())
    }

    /// One call over the pipe to `target` (see [`super::pipe`]). [`PipeError::Unsupported`]
    /// when the peer turned out not to serve pipes: the call did not happen, and
    /// [`Peers::pipe_usable`] now says false for a while.
    pub async fn pipe_call(
        &self,
        target: NodeId,
        kind: PipeKind,
        group: u32,
        budget: Duration,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, PipeError> {
        if !self.inner.pipe_on {
            return Err(PipeError::Unsupported);
        }
        let pipe = self
            .book()
            .pipes
            .get(&target)
            .cloned()
            .ok_or_else(|| PipeError::Broken(format!("node {target} is not a cluster member")))?;
        let open = || {
            let client = self.client(target).ok()?;
            let mut md = tonic::metadata::MetadataMap::new();
            md.insert(PEER_KEY_HEADER, self.inner.key.clone());
            md.insert(PEER_TO_HEADER, target.into());
            Some((client, md))
        };
        pipe.call(kind, group, budget, payload, open).await
    }

    fn now_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Records that an RPC to `id` (Raft or forwarded) was answered.
    pub fn note_ok(&self, id: NodeId) {
        if let Some(h) = self.book().health.get(&id).cloned() {
            h.ok.store(self.now_ms(), Ordering::Relaxed);
            if h.down.swap(false, Ordering::Relaxed) {
                tracing::info!(peer = id, "peer reachable again");
            }
        }
    }

    /// Records that an RPC to `id` failed. The first failure after a success logs one
    /// WARN line (at most one per peer every 30 s); openraft's own per-retry replication
    /// warnings are off by default (see `main.rs`), so a dead peer costs one log line, not
    /// dozens a second.
    pub fn note_failure(&self, id: NodeId, cause: &dyn std::fmt::Display) {
        if let Some(h) = self.book().health.get(&id).cloned() {
            let now = self.now_ms();
            h.err.store(now, Ordering::Relaxed);
            if h.failing_since.load(Ordering::Relaxed) <= h.ok.load(Ordering::Relaxed) {
                h.failing_since.store(now, Ordering::Relaxed);
            }
            if !h.down.swap(true, Ordering::Relaxed) {
                let last = h.logged_down.load(Ordering::Relaxed);
                if last == 0 || now.saturating_sub(last) >= LOG_DOWN_EVERY.as_millis() as u64 {
                    h.logged_down.store(now, Ordering::Relaxed);
                    let addr = self.addr(id).unwrap_or_else(|| "?".into());
                    tracing::warn!(peer = id, addr, %cause, "peer unreachable; retrying in the background (logged again when it answers)");
                }
            }
        }
    }

    /// A timestamp to pass to [`Peers::failed_since`].
    pub fn mark(&self) -> u64 {
        self.now_ms()
    }

    /// Whether an RPC to `id` failed after `mark` with no success since.
    pub fn failed_since(&self, id: NodeId, mark: u64) -> bool {
        let Some(h) = self.book().health.get(&id).cloned() else { return false };
        let (ok, err) = (h.ok.load(Ordering::Relaxed), h.err.load(Ordering::Relaxed));
        err > ok && err >= mark
    }

    /// Whether `id` recently stopped answering (timeouts, refused connections): the router
    /// then prefers other replicas. Raft heartbeats keep this fresh within milliseconds.
    pub fn suspect(&self, id: NodeId) -> bool {
        let Some(h) = self.book().health.get(&id).cloned() else { return false };
        let (ok, err) = (h.ok.load(Ordering::Relaxed), h.err.load(Ordering::Relaxed));
        err > ok && self.now_ms().saturating_sub(err) < SUSPECT_FOR.as_millis() as u64
    }

    /// How long `id` has been failing without answering since its first failure after its
    /// last answer, while it still fails now (its last failure within the suspect window);
    /// None when it answers or has not been called lately.
    pub fn down_for(&self, id: NodeId) -> Option<Duration> {
        let h = self.book().health.get(&id).cloned()?;
        let (ok, err) = (h.ok.load(Ordering::Relaxed), h.err.load(Ordering::Relaxed));
        let since = h.failing_since.load(Ordering::Relaxed);
        let now = self.now_ms();
        (err > ok && since > ok && now.saturating_sub(err) < SUSPECT_FOR.as_millis() as u64)
            .then(|| Duration::from_millis(now.saturating_sub(since)))
    }

    /// Every node this one has an address for (itself included).
    pub fn ids(&self) -> Vec<NodeId> {
        self.book().channels.keys().copied().collect()
    }

    pub fn addr(&self, id: NodeId) -> Option<String> {
        self.book().channels.get(&id).map(|(a, _)| a.clone())
    }

    pub fn rpc_timeout(&self) -> Duration {
        self.inner.rpc_timeout
    }

    pub fn client(&self, id: NodeId) -> Result<PeerClient<Channel>, PeerError> {
        let ch = self.book().channels.get(&id).map(|(_, ch)| ch.clone()).ok_or(PeerError::UnknownNode(id))?;
        Ok(PeerClient::new(ch).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20))
    }

    /// Wraps `msg` for node `to` with the peer key and a deadline.
    pub fn request<T>(&self, to: NodeId, msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert(PEER_KEY_HEADER, self.inner.key.clone());
        req.metadata_mut().insert(PEER_TO_HEADER, to.into());
        req.set_timeout(timeout);
        req
    }
}

/// Why [`Peers::call_raw`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// The peer does not know this call (an older build).
    #[error("the peer does not know this call")]
    UnknownCall,
    #[error("{0}")]
    Failed(String),
}

impl Peers {
    /// The same payload-less call of `kind` to every peer but `me`, all at once, each
    /// bounded by `ttl` (no answer in time is a [`RawError::Failed`]); answers by peer.
    pub async fn ask_all(
        &self,
        me: NodeId,
        kind: PipeKind,
        group: ShardId,
        ttl: Duration,
    ) -> Vec<(NodeId, Result<Vec<u8>, RawError>)> {
        let asks = self.ids().into_iter().filter(|p| *p != me).map(|p| async move {
            let r = match tokio::time::timeout(ttl, self.call_raw(p, kind, group, ttl, Vec::new())).await {
                Ok(r) => r,
                Err(_) => Err(RawError::Failed(format!("no answer within {ttl:?}"))),
            };
            (p, r)
        });
        futures::future::join_all(asks).await
    }

    /// One Raft-level call of `kind` with a JSON payload, on the pipe when usable, else unary
    /// (`Peer/Raft`); the reply's payload. For calls outside openraft (pre-votes).
    pub async fn call_raw(
        &self,
        target: NodeId,
        kind: PipeKind,
        group: ShardId,
        ttl: Duration,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, RawError> {
        let piped = self.pipe_usable(target);
        self.count_call(piped, kind);
        if piped {
            return match self.pipe_call(target, kind, group, ttl, payload).await {
                Ok(r) => Ok(r),
                Err(PipeError::Refused(m)) if m.starts_with(super::pipe::UNKNOWN_KIND) => Err(RawError::UnknownCall),
                Err(e) => Err(RawError::Failed(e.to_string())),
            };
        }
        let raft_kind = match kind {
            PipeKind::AppendEntries => pb::RaftKind::AppendEntries,
            PipeKind::Vote => pb::RaftKind::Vote,
            PipeKind::PreVote => pb::RaftKind::PreVote,
            PipeKind::Elect => pb::RaftKind::Elect,
            PipeKind::Host => pb::RaftKind::HostShard,
            PipeKind::Drop => pb::RaftKind::DropShard,
            PipeKind::Locate => pb::RaftKind::Locate,
            PipeKind::Book => pb::RaftKind::Book,
            PipeKind::Forward => return Err(RawError::Failed("forwards are not raft calls".into())),
        };
        let msg = pb::RaftRequest { group, kind: raft_kind as i32, payload };
        let mut client = self.client(target).map_err(|e| RawError::Failed(e.to_string()))?;
        match client.raft(self.request(target, msg, ttl)).await {
            Ok(r) => Ok(r.into_inner().payload),
            Err(s) if s.code() == tonic::Code::InvalidArgument && s.message().starts_with("unknown raft rpc kind") => {
                Err(RawError::UnknownCall)
            }
            Err(s) => Err(RawError::Failed(s.message().to_string())),
        }
    }
}

pub struct NetworkFactory {
    group: ShardId,
    peers: Peers,
}

impl NetworkFactory {
    pub fn new(group: ShardId, peers: Peers) -> Self {
        Self { group, peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Conn;
    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Conn {
        Conn { group: self.group, target, peers: self.peers.clone() }
    }
}

pub struct Conn {
    group: ShardId,
    target: NodeId,
    peers: Peers,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

fn status_to_rpc<E: std::error::Error>(s: tonic::Status) -> RpcErr<E> {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown => RPCError::Unreachable(Unreachable::new(&s)),
        _ => RPCError::Network(NetworkError::new(&s)),
    }
}

impl Conn {
    fn ttl(&self, option: &RPCOption) -> Duration {
        option.hard_ttl().min(self.peers.rpc_timeout()).max(Duration::from_millis(50))
    }

    async fn call<Req, Resp>(&self, kind: pb::RaftKind, rpc: &Req, ttl: Duration) -> Result<Resp, RpcErr>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
    {
        let payload = serde_json::to_vec(rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let pipe_kind = match kind {
            pb::RaftKind::Vote => PipeKind::Vote,
            _ => PipeKind::AppendEntries,
        };
        let piped = self.peers.pipe_usable(self.target);
        self.peers.count_call(piped, pipe_kind);
        let reply = if piped {
            let piped = self.peers.pipe_call(self.target, pipe_kind, self.group, ttl, payload);
            match tokio::time::timeout(ttl, piped).await {
                Ok(Ok(r)) => r,
                // An older peer: the call did not happen; openraft retries it, unary.
                Ok(Err(e @ PipeError::Unsupported)) => return Err(RPCError::Unreachable(Unreachable::new(&e))),
                Ok(Err(e @ PipeError::Broken(_))) => {
                    self.peers.note_failure(self.target, &e);
                    return Err(RPCError::Unreachable(Unreachable::new(&e)));
                }
                Ok(Err(e @ PipeError::Refused(_))) => {
                    self.peers.note_failure(self.target, &e);
                    return Err(RPCError::Network(NetworkError::new(&e)));
                }
                Err(e) => {
                    self.peers.note_failure(self.target, &format_args!("no answer within {ttl:?}"));
                    return Err(RPCError::Network(NetworkError::new(&e)));
                }
            }
        } else {
            let msg = pb::RaftRequest { group: self.group, kind: kind as i32, payload };
            let mut client = self.peers.client(self.target).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
            match tokio::time::timeout(ttl, client.raft(self.peers.request(self.target, msg, ttl))).await {
                Ok(Ok(r)) => r.into_inner().payload,
                Ok(Err(status)) => {
                    self.peers.note_failure(self.target, &status.message());
                    return Err(status_to_rpc(status));
                }
                Err(e) => {
                    self.peers.note_failure(self.target, &format_args!("no answer within {ttl:?}"));
                    return Err(RPCError::Network(NetworkError::new(&e)));
                }
            }
        };
        self.peers.note_ok(self.target);
        let res: Result<Resp, RaftError<NodeId>> =
            serde_json::from_slice(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        self.call(pb::RaftKind::AppendEntries, &rpc, self.ttl(&option)).await
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.call(pb::RaftKind::Vote, &rpc, self.ttl(&option)).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        let ttl = option.hard_ttl().max(Duration::from_millis(500));
        let enc = |e: serde_json::Error| RPCError::Network(NetworkError::new(&e));
        let msg = pb::SnapshotChunk {
            group: self.group,
            vote: serde_json::to_vec(&rpc.vote).map_err(enc)?,
            meta: serde_json::to_vec(&rpc.meta).map_err(enc)?,
            offset: rpc.offset,
            data: rpc.data,
            done: rpc.done,
        };
        let mut client = self.peers.client(self.target).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let reply = tokio::time::timeout(ttl, client.snapshot(self.peers.request(self.target, msg, ttl)))
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?
            .map_err(status_to_rpc)?
            .into_inner();
        let res: Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> =
            serde_json::from_slice(&reply.payload).map_err(enc)?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}
