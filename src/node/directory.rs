//! The cluster's node table: which nodes exist and where they listen, replicated, so that a
//! node joins or leaves without anyone editing the other nodes' configs or restarting them.
//!
//! - The source of truth is the records `N/<id>` on the directory shard ([`DIRECTORY_SHARD`]),
//!   written by [`Command::SetNode`] through its Raft log. A removed id stays removed: the
//!   command refuses any later record for it.
//! - A node's address book is its config's `members` (the seeds, which also name the nodes
//!   the cluster was created with) overlaid by the table: a record wins for its id, and a
//!   removed id is dropped. The book is saved in the data folder (`cluster/directory`), so a
//!   restarted node dials every node it knew before any shard answers it.
//! - Every [`REFRESH`] each node reads the table from the directory shard's leader and
//!   updates its [`Peers`](crate::raft::network::Peers) and `GET /v1/nodes`.
//! - Joining: a node started with `initial_cluster_state = "existing"` registers its own
//!   addresses (retrying until the cluster answers); `admin add-node` then gives it shards.
//! - Leaving: `admin remove-node` and `replace-node`, once the node holds no replica, mark it
//!   removed (`POST /v1/admin/nodes/{id}/remove`). The other nodes drop it on their next
//!   refresh; the removed node, when it learns it (a refresh, or its saved book at start),
//!   stops, and refuses to start again with that id.
//! - All of this needs `cluster_version` 4; below it the table is neither written nor read
//!   and the book is the config's `members`, as before.

use super::router::{ShardError, ShardOp, ShardReply};
use super::Node;
use crate::chat::{Command, NodeRecord, Reply};
use crate::config::{Config, NodeAddr};
use crate::shard::{NodeId, ShardId};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The shard that holds the node table.
pub const DIRECTORY_SHARD: ShardId = 0;
/// How often a node reads the table.
pub const REFRESH: Duration = Duration::from_secs(2);
/// The cluster version that has the node table.
pub const VERSION: u32 = 4;

/// This node's view of the node table.
pub struct Directory {
    /// The config's members: the base of the book.
    seeds: Vec<NodeAddr>,
    /// The table as last read (or saved), by id.
    table: Mutex<BTreeMap<NodeId, NodeRecord>>,
    /// Set when this node finds itself removed: the server stops.
    removed: watch::Sender<bool>,
}

pub fn record(a: &NodeAddr, removed: bool) -> NodeRecord {
    NodeRecord {
        id: a.id,
        peer: a.peer.clone(),
        grpc: a.grpc.clone(),
        http: a.http.clone(),
        public_url: a.public_url.clone(),
        removed,
    }
}

fn addr(r: &NodeRecord) -> NodeAddr {
    NodeAddr {
        id: r.id,
        grpc: r.grpc.clone(),
        http: r.http.clone(),
        peer: r.peer.clone(),
        public_url: r.public_url.clone(),
    }
}

impl Directory {
    pub fn new(cfg: &Config, saved: Vec<NodeRecord>) -> Self {
        Self {
            seeds: cfg.members(),
            table: Mutex::new(saved.into_iter().map(|r| (r.id, r)).collect()),
            removed: watch::channel(false).0,
        }
    }

    /// The nodes of the cluster as this node knows them: seeds overlaid by the table,
    /// removed ones left out. By id.
    pub fn members(&self) -> Vec<NodeAddr> {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: BTreeMap<NodeId, NodeAddr> = self.seeds.iter().map(|a| (a.id, a.clone())).collect();
        for (id, r) in table.iter() {
            if r.removed {
                all.remove(id);
            } else {
                all.insert(*id, addr(r));
            }
        }
        all.into_values().collect()
    }

    /// Everything this node knows: its seeds, overlaid by the table (removed ones included,
    /// marked). What it answers a peer's [`Kind::Book`](crate::raft::pipe::Kind::Book).
    pub fn known(&self) -> Vec<NodeRecord> {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: BTreeMap<NodeId, NodeRecord> = self.seeds.iter().map(|a| (a.id, record(a, false))).collect();
        all.extend(table.iter().map(|(id, r)| (*id, r.clone())));
        all.into_values().collect()
    }

    /// Adds what a peer knows to the table: nodes this one has never heard of, and
    /// removals. True when anything changed. (The directory shard's table replaces it all
    /// on the next refresh.)
    fn merge(&self, records: Vec<NodeRecord>) -> bool {
        let seeds: Vec<NodeId> = self.seeds.iter().map(|a| a.id).collect();
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for r in records {
            let known = table.get(&r.id);
            let new = known.is_none() && (!seeds.contains(&r.id) || r.removed);
            let removal = known.is_some_and(|k| !k.removed) && r.removed;
            if new || removal {
                table.insert(r.id, r);
                changed = true;
            }
        }
        changed
    }

    /// Whether the table says `id` was removed.
    pub fn is_removed(&self, id: NodeId) -> bool {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).get(&id).is_some_and(|r| r.removed)
    }

    /// The table as last read.
    pub fn table(&self) -> Vec<NodeRecord> {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Resolves once this node has been found removed.
    pub fn on_removed(&self) -> watch::Receiver<bool> {
        self.removed.subscribe()
    }

    /// Replaces the table; true when it changed.
    fn set(&self, records: Vec<NodeRecord>) -> bool {
        let next: BTreeMap<NodeId, NodeRecord> = records.into_iter().map(|r| (r.id, r)).collect();
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if *table == next {
            return false;
        }
        *table = next;
        true
    }
}

/// Why [`Node::set_node`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SetNodeError {
    #[error("node {0} was removed from this cluster; a removed id is never taken back (start the node with a new node_id and an empty data folder)")]
    Removed(NodeId),
    #[error("{0}")]
    Shard(#[from] ShardError),
}

impl Node {
    /// Writes `rec` into the node table (on the directory shard's leader).
    pub async fn set_node(self: &Arc<Self>, rec: NodeRecord, deadline: Instant) -> Result<(), SetNodeError> {
        let id = rec.id;
        match self.call(DIRECTORY_SHARD, ShardOp::Write(Command::SetNode { node: rec }), deadline).await? {
            ShardReply::Written(Reply::NodeSet(true)) => Ok(()),
            ShardReply::Written(Reply::NodeSet(false)) => Err(SetNodeError::Removed(id)),
            other => Err(ShardError::Storage(format!("unexpected reply to set_node: {other:?}")).into()),
        }
    }

    /// Reads the node table from the directory shard's leader and applies it: the address
    /// book, the saved copy, and this node's own removal.
    pub async fn refresh_directory(self: &Arc<Self>) -> Result<(), ShardError> {
        let deadline = Instant::now() + self.peers.rpc_timeout() * 2;
        let ShardReply::Nodes(records) = self.call(DIRECTORY_SHARD, ShardOp::Nodes, deadline).await? else {
            return Err(ShardError::Storage("unexpected reply to a node table read".into()));
        };
        self.apply_directory(records);
        Ok(())
    }

    fn apply_directory(self: &Arc<Self>, records: Vec<NodeRecord>) {
        if self.directory.set(records) {
            self.directory_changed();
        }
    }

    /// Asks every peer it knows which nodes they know, and adds what is new: how a node
    /// that joined finds the nodes beyond its seeds (the directory shard's leader among
    /// them) before it can read the table itself.
    pub async fn ask_peers_for_nodes(self: &Arc<Self>) {
        use futures::StreamExt;
        let ttl = self.peers.rpc_timeout();
        let peers: Vec<NodeId> = self.peers.ids().into_iter().filter(|p| *p != self.id).collect();
        let mut asks: futures::stream::FuturesUnordered<_> = peers
            .iter()
            .map(|p| async move {
                let call = self.peers.call_raw(*p, crate::raft::pipe::Kind::Book, DIRECTORY_SHARD, ttl, Vec::new());
                match tokio::time::timeout(ttl, call).await {
                    Ok(Ok(b)) => serde_json::from_slice::<Vec<NodeRecord>>(&b).unwrap_or_default(),
                    _ => Vec::new(),
                }
            })
            .collect();
        let mut changed = false;
        while let Some(records) = asks.next().await {
            changed |= self.directory.merge(records);
        }
        if changed {
            self.directory_changed();
        }
    }

    fn directory_changed(self: &Arc<Self>) {
        let members = self.directory.members();
        let book: Vec<(NodeId, String)> = members.iter().map(|m| (m.id, m.peer.clone())).collect();
        let before: Vec<(NodeId, String)> =
            self.peers.ids().into_iter().filter_map(|id| Some((id, self.peers.addr(id)?))).collect();
        let mut sorted = before;
        sorted.sort();
        if sorted != book {
            let ids: Vec<NodeId> = members.iter().map(|m| m.id).collect();
            tracing::info!(nodes = ?ids, "address book changed (node table)");
            if let Err(e) = self.peers.update(&book) {
                tracing::warn!(cause = %e, "node table has an unusable address; address book unchanged");
            }
        }
        if let Err(e) = self.kit.storage.set_directory(&self.directory.table()) {
            tracing::warn!(cause = %e, "could not save the node table");
        }
        if self.directory.is_removed(self.id) {
            tracing::error!(node = self.id, "this node was removed from the cluster: stopping");
            self.directory.removed.send_replace(true);
        }
    }

    /// Node `id`'s peer address; an id not in the address book makes this node read the node
    /// table first (a node that registered a moment ago).
    pub async fn peer_addr(self: &Arc<Self>, id: NodeId) -> Option<String> {
        if let Some(a) = self.peers.addr(id) {
            return Some(a);
        }
        if self.cfg.cluster_version >= VERSION && !self.directory.is_removed(id) {
            if let Err(e) = self.refresh_directory().await {
                tracing::debug!(cause = %e, "node table not read");
            }
        }
        self.peers.addr(id)
    }

    /// Registers this node's own addresses in the table, retrying until the cluster answers.
    async fn register_self(self: &Arc<Self>, mut stop: watch::Receiver<bool>) {
        let me = self.cfg.members().into_iter().find(|m| m.id == self.id);
        let Some(me) = me else { return };
        let mut wait = Duration::from_millis(200);
        let started = Instant::now();
        let mut warned = false;
        loop {
            let deadline = Instant::now() + Duration::from_millis(self.cfg.request_timeout_ms);
            let cause = match self.set_node(record(&me, false), deadline).await {
                Ok(()) => {
                    tracing::debug!(node = self.id, "registered in the cluster's node table");
                    let _ = self.refresh_directory().await;
                    return;
                }
                Err(SetNodeError::Removed(id)) => {
                    tracing::error!(node = id, "{}", SetNodeError::Removed(id));
                    self.directory.removed.send_replace(true);
                    return;
                }
                Err(SetNodeError::Shard(e)) => {
                    if attempt_learns(&e) {
                        self.ask_peers_for_nodes().await;
                    }
                    e
                }
            };
            if !warned && started.elapsed() >= Duration::from_secs(30) {
                warned = true;
                tracing::warn!(%cause, "this node could not register its addresses in the node table for 30 s (is a majority of shard 0's replicas up, and does `members` name a running node?); still trying");
            } else {
                tracing::debug!(%cause, "cannot register in the node table yet; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }
}

/// The directory task: this node registers its own addresses (a no-op when the table has
/// them already; a new or moved node is how the others learn of it), then reads the table
/// every [`REFRESH`].
pub fn spawn(node: Arc<Node>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        if node.cfg.cluster_version < VERSION {
            return;
        }
        node.ask_peers_for_nodes().await;
        node.register_self(stop.clone()).await;
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Err(e) = node.refresh_directory().await {
                // The directory shard may be electing, led by an older build, or led by a
                // node this one has no address for yet.
                tracing::debug!(cause = %e, "node table not read this round");
                node.ask_peers_for_nodes().await;
            }
        }
    })
}

/// Whether a failed call may have failed for lack of an address (then asking peers helps).
fn attempt_learns(e: &ShardError) -> bool {
    matches!(e, ShardError::Unavailable { .. } | ShardError::Timeout { .. } | ShardError::NotReplica { .. })
}
