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
//!   It first asks its seeds which nodes they know ([`Book`]), which also tells it the nodes
//!   the cluster was created with (the placement function's input, used from its next
//!   start on).
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
    /// What peers said they know, while this node cannot read the table itself: below the
    /// table, above the seeds; dropped on the next good read.
    heard: Mutex<BTreeMap<NodeId, NodeRecord>>,
    /// One address book update at a time (they run from several tasks).
    updating: Mutex<()>,
    /// The nodes the cluster was created with (the placement function's input), once known:
    /// from the data folder, or, for a node that joined a running cluster, from a peer.
    founders: Mutex<Option<Vec<NodeId>>>,
    /// Set when this node finds itself removed: the server stops.
    removed: watch::Sender<bool>,
    /// Whether this node re-replicates when it leads the directory shard, removed nodes
    /// counting as dead (`node::repair`): told to peers in [`Book::repairs`].
    repairs: bool,
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
    pub fn new(cfg: &Config, saved: Vec<NodeRecord>, founders: Option<Vec<NodeId>>) -> Self {
        Self {
            founders: Mutex::new(founders),
            seeds: cfg.members(),
            table: Mutex::new(saved.into_iter().map(|r| (r.id, r)).collect()),
            heard: Mutex::new(BTreeMap::new()),
            updating: Mutex::new(()),
            removed: watch::channel(false).0,
            repairs: cfg.replace_dead_after_secs > 0 && cfg.cluster_version >= VERSION,
        }
    }

    /// Seeds, overlaid by what peers said, overlaid by the table; removed ones included.
    fn view(&self) -> BTreeMap<NodeId, NodeRecord> {
        let mut all: BTreeMap<NodeId, NodeRecord> = self.seeds.iter().map(|a| (a.id, record(a, false))).collect();
        let heard = self.heard.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (id, r) in heard.into_iter().chain(table) {
            // A removal is final, whoever reported it.
            if !all.get(&id).is_some_and(|o| o.removed) {
                all.insert(id, r);
            }
        }
        all
    }

    /// The nodes of the cluster as this node knows them (removed ones left out), by id.
    pub fn members(&self) -> Vec<NodeAddr> {
        self.view().values().filter(|r| !r.removed).map(addr).collect()
    }

    /// Everything this node knows, removed nodes included (marked), and the founders if
    /// known: what it answers a peer's [`Kind::Book`](crate::raft::pipe::Kind::Book).
    pub fn known(&self) -> Book {
        Book { nodes: self.view().into_values().collect(), founders: self.founders(), repairs: Some(self.repairs) }
    }

    /// The nodes the cluster was created with, if this node knows them.
    pub fn founders(&self) -> Option<Vec<NodeId>> {
        self.founders.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `id` is known to be removed.
    pub fn is_removed(&self, id: NodeId) -> bool {
        self.view().get(&id).is_some_and(|r| r.removed)
    }

    /// The table as last read.
    pub fn table(&self) -> Vec<NodeRecord> {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Resolves once this node has been found removed.
    pub fn on_removed(&self) -> watch::Receiver<bool> {
        self.removed.subscribe()
    }

    /// Replaces what peers said by these answers (a removal wins over any other record of
    /// the same id).
    fn hear(&self, answers: Vec<Vec<NodeRecord>>) {
        let mut heard: BTreeMap<NodeId, NodeRecord> = BTreeMap::new();
        for r in answers.into_iter().flatten() {
            if !heard.get(&r.id).is_some_and(|o| o.removed) {
                heard.insert(r.id, r);
            }
        }
        *self.heard.lock().unwrap_or_else(|p| p.into_inner()) = heard;
    }

    /// Replaces the table (and forgets what peers said); true when the table changed.
    fn set(&self, records: Vec<NodeRecord>) -> bool {
        self.heard.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let next: BTreeMap<NodeId, NodeRecord> = records.into_iter().map(|r| (r.id, r)).collect();
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if *table == next {
            return false;
        }
        *table = next;
        true
    }
}

/// A peer's answer to [`Kind::Book`](crate::raft::pipe::Kind::Book).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Book {
    pub nodes: Vec<NodeRecord>,
    /// The nodes the cluster was created with, when the peer knows them.
    #[serde(default)]
    pub founders: Option<Vec<NodeId>>,
    /// Whether the peer re-replicates a removed node's replicas at once when it leads the
    /// directory shard (`remove-node --force` needs that of the leader); None from builds
    /// before that rule.
    #[serde(default)]
    pub repairs: Option<bool>,
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
        let changed = self.directory.set(records);
        self.sync_book(changed);
    }

    /// Asks every peer it knows which nodes they know, and adds what is new: how a node
    /// that joined finds the nodes beyond its seeds (the directory shard's leader among
    /// them) before it can read the table itself.
    pub async fn ask_peers_for_nodes(self: &Arc<Self>) {
        let ttl = self.peers.rpc_timeout();
        let books = self.peers.ask_all(self.id, crate::raft::pipe::Kind::Book, DIRECTORY_SHARD, ttl).await;
        let mut answers = Vec::new();
        let mut founders: BTreeMap<Vec<NodeId>, usize> = BTreeMap::new();
        for (_, answer) in books {
            let book: Book = answer.ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
            if let Some(f) = book.founders.filter(|f| !f.is_empty()) {
                *founders.entry(f).or_default() += 1;
            }
            answers.push(book.nodes);
        }
        // The answer most peers give (none on a tie): one peer with a wrong record does not
        // decide.
        let mut counts: Vec<(usize, Vec<NodeId>)> = founders.into_iter().map(|(f, n)| (n, f)).collect();
        counts.sort_by_key(|c| std::cmp::Reverse(c.0));
        if let Some((n, f)) = counts.first() {
            if counts.get(1).is_none_or(|(m, _)| m < n) {
                self.learn_founders(f.clone());
            }
        }
        self.directory.hear(answers);
        self.sync_book(false);
    }

    /// A node that joined a running cluster records the founders a peer reported (the
    /// placement function's input from its next start on: its guesses of where shards are
    /// then match the other nodes').
    fn learn_founders(&self, founders: Vec<NodeId>) {
        let mut known = self.directory.founders.lock().unwrap_or_else(|p| p.into_inner());
        if known.is_some() {
            return;
        }
        match self.kit.storage.set_founders(&founders) {
            Ok(()) => {
                tracing::info!(?founders, "learnt the nodes the cluster was created with");
                *known = Some(founders);
            }
            Err(e) => tracing::warn!(cause = %e, "could not save the cluster's founders"),
        }
    }

    /// Makes the peers' address book match what this node knows; saves the table when it
    /// changed; stops the node when it finds itself removed.
    fn sync_book(self: &Arc<Self>, table_changed: bool) {
        let _one = self.directory.updating.lock().unwrap_or_else(|p| p.into_inner());
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
        if table_changed {
            if let Err(e) = self.kit.storage.set_directory(&self.directory.table()) {
                tracing::warn!(cause = %e, "could not save the node table");
            }
        }
        if self.directory.is_removed(self.id) {
            tracing::error!(node = self.id, "this node was removed from the cluster: stopping");
            self.directory.removed.send_replace(true);
        }
    }

    /// Node `id`'s peer address; an id not in the address book makes this node read the node
    /// table first (a node that registered a moment ago).
    pub async fn peer_addr(self: &Arc<Self>, id: NodeId) -> Option<String> {
        if self.directory.is_removed(id) {
            return None;
        }
        if let Some(a) = self.peers.addr(id) {
            return Some(a);
        }
        if self.cfg.cluster_version >= VERSION {
            if let Err(e) = self.refresh_directory().await {
                tracing::debug!(cause = %e, "node table not read");
            }
        }
        self.peers.addr(id)
    }

    /// Registers this node's own addresses in the table, retrying until the cluster answers.
    async fn register_self(self: &Arc<Self>, mut stop: watch::Receiver<bool>) {
        // A node without a `nodes` list is a cluster of one, its addresses the ones it binds
        // (perhaps 0.0.0.0): not addresses to give to others.
        let me = self.cfg.nodes.iter().find(|m| m.id == self.id).cloned();
        let Some(me) = me else { return };
        if me.peer.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_unspecified()) {
            tracing::warn!(peer = %me.peer, "not registering in the node table: this node's peer address in `nodes` is unspecified (0.0.0.0 or ::); give the address other nodes reach it at");
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, peer: &str, removed: bool) -> NodeRecord {
        NodeRecord { id, peer: peer.into(), grpc: "g".into(), http: "h".into(), public_url: None, removed }
    }

    #[test]
    fn the_book_is_seeds_then_hearsay_then_the_table_and_a_removal_is_final() {
        let cfg = Config {
            node_id: 1,
            nodes: vec![
                NodeAddr { id: 1, grpc: "g".into(), http: "h".into(), peer: "p1".into(), public_url: None },
                NodeAddr { id: 2, grpc: "g".into(), http: "h".into(), peer: "p2-old".into(), public_url: None },
            ],
            ..Config::default()
        };
        let d = Directory::new(&cfg, vec![rec(3, "p3", false)], None);
        let peers = |d: &Directory| d.members().into_iter().map(|m| (m.id, m.peer)).collect::<Vec<_>>();
        assert_eq!(peers(&d), vec![(1, "p1".into()), (2, "p2-old".into()), (3, "p3".into())]);
        // Peers say node 2 moved, node 4 joined, node 3 was removed (one of them disagrees).
        d.hear(vec![vec![rec(2, "p2", false), rec(4, "p4", false), rec(3, "p3", true)], vec![rec(3, "p3", false)]]);
        assert_eq!(peers(&d), vec![(1, "p1".into()), (2, "p2".into()), (4, "p4".into())]);
        assert!(d.is_removed(3));
        // A read of the table replaces the hearsay; a removal stays whoever says otherwise.
        assert!(d.set(vec![rec(2, "p2", false), rec(3, "p3", true)]));
        assert_eq!(peers(&d), vec![(1, "p1".into()), (2, "p2".into())]);
        d.hear(vec![vec![rec(3, "p3", false)]]);
        assert!(d.is_removed(3));
        assert!(!d.set(vec![rec(2, "p2", false), rec(3, "p3", true)]), "unchanged");
    }
}
