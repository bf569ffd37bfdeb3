//! Node start-up and shutdown: opens storage and the write-ahead log, starts the shard
//! groups, builds the [`Node`], then hands it to the listeners (the API's HTTP/WebSocket
//! server and the gRPC server for peers and clients). The node model never names the API;
//! this module is where the two meet (as garage's `src/garage/server.rs` does).

use crate::auth::{Keys, TokenRules};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::raft::group;
use crate::raft::network::Peers;
use crate::shard::Placement;
use crate::storage::flusher::Flusher;
use crate::storage::Storage;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

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
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("{0}")]
    Removed(#[from] crate::node::directory::SetNodeError),
}

/// Starts a node from `cfg` and serves until `shutdown` completes, then stops cleanly:
/// listeners stop accepting, in-flight requests finish, Raft groups stop, sled is flushed.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), NodeError> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|source| NodeError::DataDir { path: cfg.data_dir.clone(), source })?;
    let rules = TokenRules { max_ttl_secs: cfg.max_token_ttl_secs, leeway_secs: cfg.token_leeway_secs };
    let mut keys = Keys::with_rules(&cfg.load_or_create_secret()?, rules);
    if let (Some(path), Some(issuer)) = (&cfg.jwks_file, &cfg.jwks_issuer) {
        let json = std::fs::read(path)
            .map_err(|e| NodeError::Serve(format!("cannot read jwks_file {}: {e}", path.display())))?;
        let ext = crate::auth::External::from_jwks(&json, issuer, cfg.jwks_audience.as_deref())
            .map_err(|e| NodeError::Serve(format!("jwks_file {}: {e}", path.display())))?;
        tracing::info!(issuer, keys = ext.key_count(), "accepting tokens of an external issuer");
        keys = keys.with_external(ext);
    }
    let tls = match (&cfg.tls_cert_file, &cfg.tls_key_file, &cfg.tls_ca_file) {
        (Some(c), Some(k), Some(ca)) => Some(crate::tls::Tls::load(c, k, ca, cfg.tls_revoked_file.as_deref())?),
        _ => None,
    };
    crate::storage::check_format(&cfg.data_dir, crate::storage::format_for(cfg.cluster_version))?;
    let storage = Storage::open(&cfg.data_dir, cfg.shards, cfg.sled_cache_bytes)?;
    let metrics = Metrics::new();
    let flusher = Flusher::start(storage.clone(), metrics.clone());
    let wal = crate::storage::wal::Wal::open(&cfg.data_dir.join("wal"), metrics.clone())?;
    // The placement function always takes the nodes the cluster was created with (recorded
    // at the first start), so adding a node later moves nothing by itself. A node that
    // joined a running cluster learns them from a peer (`node::directory`) and uses them
    // from its next start on; until then its guesses may miss, and the router then asks its
    // peers (`node::membership`).
    let existing = cfg.initial_cluster_state == crate::config::ClusterState::Existing;
    let joining = existing && wal.is_empty();
    let seed_ids: Vec<u64> = cfg.members().iter().map(|m| m.id).collect();
    let founders = match storage.founders()? {
        Some(f) => Some(f),
        None if existing => None,
        None => {
            storage.set_founders(&seed_ids)?;
            Some(seed_ids.clone())
        }
    };
    // The address book: the config's members overlaid by the node table as last read.
    let saved = if cfg.cluster_version >= crate::node::directory::VERSION { storage.directory()? } else { Vec::new() };
    let directory = crate::node::directory::Directory::new(&cfg, saved, founders.clone());
    if directory.is_removed(cfg.node_id) {
        return Err(crate::node::directory::SetNodeError::Removed(cfg.node_id).into());
    }
    let members = directory.members();
    let founders = founders.unwrap_or(seed_ids);
    let placement = Placement::new(cfg.shards, founders);
    let peers = Peers::new(
        &members.iter().map(|m| (m.id, m.peer.clone())).collect::<Vec<_>>(),
        keys.peer_token(),
        Duration::from_millis(cfg.rpc_timeout_ms),
        tls.as_ref().map(|t| t.peer_client.clone()),
    )?
    .with_pipe(cfg.peer_pipe, metrics.peer_calls.clone());

    // Bind first so a taken port fails fast, before any Raft group starts.
    let http_listener = tokio::net::TcpListener::bind(cfg.http_addr)
        .await
        .map_err(|source| NodeError::Bind { addr: cfg.http_addr, source })?;
    let grpc_listener = tokio::net::TcpListener::bind(cfg.grpc_addr)
        .await
        .map_err(|source| NodeError::Bind { addr: cfg.grpc_addr, source })?;
    let peer_listener = tokio::net::TcpListener::bind(cfg.peer_addr)
        .await
        .map_err(|source| NodeError::Bind { addr: cfg.peer_addr, source })?;

    // What this node hosts: as recorded (replica moves change it), or, on the first start
    // of this data folder (or one from before replica moves), what the placement gives it
    // in a new cluster, or nothing when it joins a running one.
    let recorded = storage.hosted()?;
    let first_start = recorded.is_none();
    let local = match recorded {
        Some(h) => h,
        None if joining => Vec::new(),
        None => placement.local_shards(cfg.node_id),
    };
    crate::node::membership::forget_leftovers(&storage, &wal, &cfg.data_dir, &local).await?;
    let cache_budget = crate::node::membership::cache_budget(&cfg, &placement);
    let moved_in = storage.moved_in()?;
    let mut groups = HashMap::new();
    for shard in &local {
        // A shard of the cluster's creation: its preferred leader initializes the group if
        // it holds no state yet (a no-op once it does). A shard that came by a replica move
        // never: it gets its state from the leader.
        let init = if moved_in.contains(shard) { Vec::new() } else { placement.replicas(*shard) };
        let from_move = moved_in.contains(shard);
        let g = group::start(&cfg, *shard, &init, &storage, &wal, &flusher, &peers, &metrics, cache_budget, from_move)
            .await?;
        groups.insert(*shard, g);
    }
    if first_start {
        storage.set_hosted(&local)?;
    }
    if local.is_empty() {
        tracing::warn!(
            "this node hosts no shard: it serves as a router until `raftchat admin add-node {}` (or a replica move) gives it some",
            cfg.node_id
        );
    }
    let moved = storage.moved()?;
    let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let limits = crate::node::shard_handle::Limits {
        max_batch: cfg.max_batch,
        batches_in_flight: cfg.batches_in_flight,
        max_queued: cfg.shard_max_queued,
        max_queued_bytes: cfg.shard_max_queued_bytes,
        retry_after_ms: cfg.overload_retry_after_ms,
    };
    let handles: Vec<_> = groups
        .values()
        .map(|g| crate::node::shard_handle::ShardHandle::start(g.clone(), limits, metrics.clone()))
        .collect();
    let node = Arc::new(Node {
        id: cfg.node_id,
        placement,
        keys,
        peers,
        directory,
        local: crate::node::local::Local::new(handles),
        kit: crate::node::membership::Kit::new(storage.clone(), wal.clone(), flusher.clone(), limits, cache_budget),
        routes: Mutex::new(moved.into_iter().map(|(s, i, v)| (s, (i, v))).collect()),
        metrics,
        send_rate: crate::node::rate_limit::PerUser::new(cfg.user_send_rate, cfg.user_send_burst),
        login_failures: crate::node::rate_limit::LoginFailures::new(
            cfg.login_failures_per_user_per_minute,
            cfg.login_failures_per_ip_per_minute,
        ),
        admission: crate::node::admission::Limiter::new(
            64,
            8.min(cfg.node_max_inflight_sends),
            cfg.node_max_inflight_sends,
            Duration::from_millis(cfg.admission_target_ms),
        ),
        leader_hints: Mutex::new(HashMap::new()),
        known_users: Mutex::new(HashSet::new()),
        revocations: Mutex::new(HashMap::new()),
        outbox_done: outbox_tx,
        placement_lock: Default::default(),
        fault: crate::types::fault().map(str::to_string),
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
    tracing::info!(node = node.id, shards = ?local, http = %node.cfg.http_addr, grpc = %node.cfg.grpc_addr, peer = %node.cfg.peer_addr, worker_threads = tokio::runtime::Handle::current().metrics().num_workers(), "raftchat node starting");

    let (stop_peers_tx, stop_peers_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = crate::node::send::spawn(node.clone(), outbox_rx, stop_rx.clone());
    tasks.push(crate::node::directory::spawn(node.clone(), stop_rx.clone()));
    tasks.extend(crate::node::repair::spawn(node.clone(), stop_rx.clone()));
    tasks.push(crate::node::retention::spawn(node.clone(), stop_rx.clone()));
    tasks.extend(crate::node::balance::spawn(
        node.clone(),
        Duration::from_secs(node.cfg.balance_every_secs),
        stop_rx.clone(),
    ));
    if node.cfg.prevote {
        let of = node.clone();
        let members = Arc::new(move || {
            of.local
                .groups()
                .iter()
                .map(|g| crate::raft::prevote::Member {
                    shard: g.shard,
                    raft: g.raft.clone(),
                    contact: g.contact.clone(),
                    leading_since: g.leading_since.clone(),
                })
                .collect()
        });
        let timeouts = (
            Duration::from_millis(node.cfg.election_timeout_min_ms),
            Duration::from_millis(node.cfg.election_timeout_max_ms),
        );
        tasks.push(crate::raft::prevote::spawn(
            node.id,
            members,
            node.peers.clone(),
            timeouts,
            node.metrics.clone(),
            stop_rx.clone(),
        ));
    }

    let peer = {
        let svc = crate::node::peer_service::PeerService::new(node.clone(), stop_peers_rx.clone());
        let incoming = tonic::transport::server::TcpIncoming::from(peer_listener).with_nodelay(Some(true));
        let stop = stopped(stop_peers_rx.clone());
        // The key is checked on the request's headers, before its body is read: an unknown
        // caller cannot make the node buffer or decode anything.
        let keys = node.keys.clone();
        let me = node.id;
        let check = move |req: tonic::Request<()>| crate::node::peer_service::check_key(&keys, me, req);
        let svc = crate::pb::peer_server::PeerServer::new(svc).max_decoding_message_size(64 << 20);
        // Peers cancel RPCs that time out (a partition, a paused node); when a link heals,
        // hundreds of such resets arrive together. h2's default limit (20), meant for
        // untrusted clients, would then tear down the peer connection that carries every
        // shard group. Only the peer port raises it.
        let router = tonic::transport::Server::builder()
            .http2_max_pending_accept_reset_streams(Some(4096))
            .add_service(tonic::service::interceptor::InterceptedService::new(svc, check));
        let tls = tls.as_ref().map(|t| t.peer_server.clone());
        tokio::spawn(async move {
            match tls {
                None => router.serve_with_incoming_shutdown(incoming, stop).await,
                Some(cfg) => router.serve_with_incoming_shutdown(crate::tls::incoming(incoming, cfg), stop).await,
            }
        })
    };
    // Clients' gRPC keeps h2's and tonic's defaults (4 MiB messages, 20 pending resets).
    let grpc = {
        let chat = crate::api::grpc::ChatService::new(node.clone());
        let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
        let stop = stopped(stop_rx.clone());
        let router = tonic::transport::Server::builder().add_service(crate::pb::chat_server::ChatServer::new(chat));
        let tls = tls.as_ref().map(|t| t.client_facing.clone());
        tokio::spawn(async move {
            match tls {
                None => router.serve_with_incoming_shutdown(incoming, stop).await,
                Some(cfg) => router.serve_with_incoming_shutdown(crate::tls::incoming(incoming, cfg), stop).await,
            }
        })
    };
    let http = {
        let app = crate::api::http::router(node.clone());
        let stop = stopped(stop_rx.clone());
        let limits = crate::api::listener::Limits::from_config(&node.cfg);
        let metrics = node.metrics.clone();
        let acceptor = tls.as_ref().map(|t| tokio_rustls::TlsAcceptor::from(t.client_facing.clone()));
        let gate = crate::api::http::front_gate(node.clone());
        crate::api::listener::start(http_listener, app, limits, metrics, acceptor, stop, gate)
            .map_err(|e| NodeError::Serve(format!("cannot start the client listener's thread: {e}")))?
    };

    let mut removed = node.directory.on_removed();
    tokio::select! {
        _ = shutdown => {}
        _ = removed.wait_for(|r| *r) => {}
    }
    let removed = *removed.borrow();
    tracing::info!(node = node.id, "shutting down: draining requests");
    let _ = stop_tx.send(true);
    // In-flight client requests finish (or fail cleanly) before Raft stops under them.
    let drain = Duration::from_millis(node.cfg.request_timeout_ms + 1_000);
    let mut http = http;
    if tokio::time::timeout(drain, http.finished()).await.is_err() {
        tracing::warn!(after = ?drain, "shutdown: HTTP requests still running; stopping anyway");
    }
    if tokio::time::timeout(Duration::from_secs(5), grpc).await.is_err() {
        tracing::warn!("shutdown: gRPC requests still running after 5s; stopping anyway");
    }
    // The shards this node leads get a new leader now, not an election timeout after the
    // node is gone (a rolling restart pauses each shard's writes for a round trip).
    if !removed {
        let handoff = node.hand_off_leadership(Duration::from_secs(5));
        match tokio::time::timeout(Duration::from_secs(7), handoff).await {
            Ok((handed, still)) => tracing::info!(handed, still_leading = still, "shutdown: leaderships handed off"),
            Err(_) => tracing::warn!("shutdown: handing leaderships off took over 7s; stopping anyway"),
        }
    }
    // Peers' pipes and subscriptions end with this; their calls go to the new leaders.
    let _ = stop_peers_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(5), peer).await.is_err() {
        tracing::warn!("shutdown: peer connections still open after 5s; stopping anyway");
    }
    for t in tasks {
        t.abort();
    }
    for g in node.local.groups() {
        if let Err(e) = g.raft.shutdown().await {
            tracing::warn!(shard = g.shard, cause = %e, "raft shutdown");
        }
    }
    storage.flush().await?;
    tracing::info!(node = node.id, "stopped; data flushed");
    if removed {
        return Err(crate::node::directory::SetNodeError::Removed(node.id).into());
    }
    Ok(())
}
