//! A raftchat node: its shard groups, the router to shard leaders, background tasks and
//! the listeners, started by [`run`] and stopped by the shutdown future it is given.
//!
//! - [`router`]: [`ShardOp`](router::ShardOp)s and [`Node::call`], which runs one on the
//!   shard's leader (locally or forwarded).
//! - [`ops`]: what a leader does with an op: propose, linearizable read, coordinated send.
//! - [`admission`]: the node's adaptive limit on in-flight client sends.
//! - [`send`]: the coordinated send and its outbox (confirmation, re-drive after a crash).
//! - [`shard_handle`]: per local shard: proposing, batching, admission, linearizable reads.
//! - [`peer_service`]: the gRPC service peers call (Raft RPCs, forwarded ops).

pub mod admission;
pub mod inbox;
pub mod ops;
pub mod peer_service;
pub mod router;
pub mod send;
pub mod shard_handle;

use crate::auth::Keys;
use crate::chat::{Command, ConversationId, UserId};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::raft::group::{self, Group};
use crate::raft::network::Peers;
use crate::shard::{NodeId, Placement, ShardId};
use crate::storage::flusher::Flusher;
use crate::storage::Storage;
use router::{ShardError, ShardOp, ShardReply};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("storage: {0}")]
    Store(#[from] crate::storage::StoreError),
    #[error(transparent)]
    Wal(#[from] crate::storage::wal::WalError),
    #[error("shard group: {0}")]
    Group(#[from] group::GroupError),
    #[error("peers: {0}")]
    Peers(#[from] crate::raft::network::PeerError),
    #[error("cannot create data dir {path}: {source}")]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("server failed: {0}")]
    Serve(String),
}

/// The state every request handler and background task of a node shares.
pub struct Node {
    pub id: NodeId,
    pub cfg: Config,
    pub placement: Placement,
    pub keys: Keys,
    pub peers: Peers,
    pub metrics: Metrics,
    pub groups: HashMap<ShardId, Group>,
    /// Proposing, batching, admission and linearizable reads of each local shard.
    pub shards: HashMap<ShardId, shard_handle::ShardHandle>,
    /// Node-wide admission of client sends (an adaptive limit, see [`admission`]).
    pub admission: Arc<admission::Limiter>,
    leader_hints: Mutex<HashMap<ShardId, NodeId>>,
    known_users: Mutex<HashSet<UserId>>,
    pub(crate) outbox_done: mpsc::UnboundedSender<(ShardId, ConversationId, u64)>,
    /// Test-only fault injection (`RAFTCHAT_FAULT`), see `docs/operations.md`.
    pub(crate) fault: Option<String>,
    /// Becomes true when the node starts shutting down (long-lived sessions close).
    pub stopping: watch::Receiver<bool>,
}

impl Node {
    pub fn request_deadline(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.cfg.request_timeout_ms)
    }

    /// Where the shard's leader probably is: this node's own Raft view when it replicates
    /// the shard (it follows elections), else the last leader that answered.
    fn leader_hint(&self, shard: ShardId) -> Option<NodeId> {
        if let Some(g) = self.groups.get(&shard) {
            let l = g.raft.metrics().borrow().current_leader;
            if l.is_some() {
                return l;
            }
        }
        self.leader_hints.lock().unwrap_or_else(|p| p.into_inner()).get(&shard).copied()
    }

    fn set_leader_hint(&self, shard: ShardId, leader: Option<NodeId>) {
        let mut h = self.leader_hints.lock().unwrap_or_else(|p| p.into_inner());
        match leader {
            Some(l) => h.insert(shard, l),
            None => h.remove(&shard),
        };
    }

    fn user_known(&self, u: &UserId) -> bool {
        self.known_users.lock().unwrap_or_else(|p| p.into_inner()).contains(u)
    }

    fn remember_user(&self, u: &UserId) {
        let mut k = self.known_users.lock().unwrap_or_else(|p| p.into_inner());
        if k.len() > 1_000_000 {
            k.clear();
        }
        k.insert(u.clone());
    }

    /// Records that `user` exists (users are registered by their first authenticated call).
    pub async fn ensure_registered(self: &Arc<Self>, user: &UserId, deadline: Instant) -> Result<(), ShardError> {
        if self.user_known(user) {
            return Ok(());
        }
        let shard = self.placement.shard_of_user(user);
        self.call(shard, ShardOp::Write(Command::Register { user: user.clone() }), deadline).await?;
        self.remember_user(user);
        Ok(())
    }

    /// Whether `user` was ever registered (linearizable; positive answers are cached).
    pub async fn user_exists(self: &Arc<Self>, user: &UserId, deadline: Instant) -> Result<bool, ShardError> {
        if self.user_known(user) {
            return Ok(true);
        }
        let shard = self.placement.shard_of_user(user);
        match self.call(shard, ShardOp::UserExists { user: user.clone() }, deadline).await? {
            ShardReply::Exists(true) => {
                self.remember_user(user);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Shards of this node that have no known leader.
    pub fn shards_without_leader(&self) -> Vec<ShardId> {
        let mut v: Vec<ShardId> = self
            .groups
            .values()
            .filter(|g| g.raft.metrics().borrow().current_leader.is_none())
            .map(|g| g.shard)
            .collect();
        v.sort_unstable();
        v
    }

    /// Copies openraft's per-shard metrics into the Prometheus gauges.
    pub fn refresh_metrics(&self) {
        let m = &self.metrics;
        for g in self.groups.values() {
            let rm = g.raft.metrics().borrow().clone();
            let s = g.shard.to_string();
            let l = [s.as_str()];
            m.shard_leader.with_label_values(&l).set(i64::from(rm.current_leader == Some(self.id)));
            m.shard_term.with_label_values(&l).set(rm.current_term as i64);
            m.shard_commit.with_label_values(&l).set(g.committed() as i64);
            m.shard_applied.with_label_values(&l).set(rm.last_applied.map(|x| x.index as i64).unwrap_or(0));
            m.shard_last_log.with_label_values(&l).set(rm.last_log_index.map(|x| x as i64).unwrap_or(0));
            m.shard_snapshot.with_label_values(&l).set(rm.snapshot.map(|x| x.index as i64).unwrap_or(0));
        }
        m.admission_limit.set(self.admission.limit() as i64);
        m.admission_inflight.set(self.admission.inflight() as i64);
    }
}

/// Starts a node from `cfg` and serves until `shutdown` completes, then stops cleanly:
/// listeners stop accepting, in-flight requests finish, Raft groups stop, sled is flushed.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), NodeError> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|source| NodeError::DataDir { path: cfg.data_dir.clone(), source })?;
    let keys = Keys::new(&cfg.load_or_create_secret()?);
    let storage = Storage::open(&cfg.data_dir, cfg.shards)?;
    let metrics = Metrics::new();
    let flusher = Flusher::start(storage.clone(), metrics.clone());
    let wal = crate::storage::wal::Wal::open(&cfg.data_dir.join("wal"), metrics.clone())?;
    let members = cfg.members();
    let placement = Placement::new(cfg.shards, members.iter().map(|m| m.id).collect());
    let peers = Peers::new(
        &members.iter().map(|m| (m.id, m.grpc.clone())).collect::<Vec<_>>(),
        keys.peer_token(),
        Duration::from_millis(cfg.rpc_timeout_ms),
    )?;

    // Bind first so a taken port fails fast, before any Raft group starts.
    let http_listener = tokio::net::TcpListener::bind(cfg.http_addr)
        .await
        .map_err(|source| NodeError::Bind { addr: cfg.http_addr, source })?;
    let grpc_listener = tokio::net::TcpListener::bind(cfg.grpc_addr)
        .await
        .map_err(|source| NodeError::Bind { addr: cfg.grpc_addr, source })?;

    let local = placement.local_shards(cfg.node_id);
    let cache_budget = cfg.cache_bytes / local.len().max(1);
    let mut groups = HashMap::new();
    for shard in &local {
        let g = group::start(
            &cfg,
            *shard,
            &placement.replicas(*shard),
            &storage,
            &wal,
            &flusher,
            &peers,
            &metrics,
            cache_budget,
        )
        .await?;
        groups.insert(*shard, g);
    }
    let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let limits = shard_handle::Limits {
        max_batch: cfg.max_batch,
        batches_in_flight: cfg.batches_in_flight,
        max_queued: cfg.shard_max_queued,
        max_queued_bytes: cfg.shard_max_queued_bytes,
        retry_after_ms: cfg.overload_retry_after_ms,
    };
    let shards = groups
        .iter()
        .map(|(s, g)| (*s, shard_handle::ShardHandle::start(g.clone(), limits, metrics.clone())))
        .collect();
    let node = Arc::new(Node {
        id: cfg.node_id,
        placement,
        keys,
        peers,
        metrics,
        shards,
        admission: admission::Limiter::new(
            64,
            8,
            cfg.node_max_inflight_sends,
            Duration::from_millis(cfg.admission_target_ms),
        ),
        groups,
        leader_hints: Mutex::new(HashMap::new()),
        known_users: Mutex::new(HashSet::new()),
        outbox_done: outbox_tx,
        fault: std::env::var("RAFTCHAT_FAULT").ok().filter(|s| !s.is_empty()),
        stopping: stop_rx.clone(),
        cfg,
    });
    if cfg!(feature = "fault-stale-reads") {
        tracing::warn!("BUILT WITH fault-stale-reads: reads skip the leadership check; this build is for the consistency harness only");
    }
    if cfg!(feature = "fault-unsynced-wal") {
        tracing::warn!("BUILT WITH fault-unsynced-wal: log appends are acknowledged without fsync; this build is for the consistency harness only");
    }
    if let Some(f) = &node.fault {
        tracing::warn!(fault = %f, "FAULT INJECTION ENABLED: this node will misbehave on purpose");
    }
    tracing::info!(node = node.id, shards = ?local, http = %node.cfg.http_addr, grpc = %node.cfg.grpc_addr, "raftchat node starting");

    let (stop_peers_tx, stop_peers_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let tasks = send::spawn(node.clone(), outbox_rx, stop_rx.clone());

    let grpc = {
        let svc = peer_service::PeerService::new(node.clone());
        let chat = crate::api::grpc::ChatService::new(node.clone());
        let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
        let stop = stopped(stop_peers_rx);
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                // Peers cancel RPCs that time out (a partition, a paused node); when a link
                // heals, hundreds of such resets arrive together. h2's default limit (20),
                // meant for untrusted clients, would then tear down the peer connection that
                // carries every shard group. Peer callers are authenticated by the peer key.
                .http2_max_pending_accept_reset_streams(Some(4096))
                .add_service(crate::pb::peer_server::PeerServer::new(svc).max_decoding_message_size(64 << 20))
                .add_service(crate::pb::chat_server::ChatServer::new(chat))
                .serve_with_incoming_shutdown(incoming, stop)
                .await
        })
    };
    let http = {
        let app = crate::api::http::router(node.clone());
        let stop = stopped(stop_rx.clone());
        tokio::spawn(async move { axum::serve(http_listener, app).with_graceful_shutdown(stop).await })
    };

    shutdown.await;
    tracing::info!(node = node.id, "shutting down: draining requests");
    let _ = stop_tx.send(true);
    // In-flight client requests finish (or fail cleanly) before Raft stops under them.
    let drain = Duration::from_millis(node.cfg.request_timeout_ms + 1_000);
    let _ = tokio::time::timeout(drain, http).await;
    let _ = stop_peers_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), grpc).await;
    for t in tasks {
        t.abort();
    }
    for g in node.groups.values() {
        if let Err(e) = g.raft.shutdown().await {
            tracing::warn!(shard = g.shard, cause = %e, "raft shutdown");
        }
    }
    storage.flush().await?;
    tracing::info!(node = node.id, "stopped; data flushed");
    Ok(())
}
