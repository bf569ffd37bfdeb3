//! One shard's Raft group on this node: storage, state machine, cache and the openraft
//! instance, created and (on a fresh cluster) initialized by the shard's preferred leader.

use super::network::{NetworkFactory, Peers};
use super::Raft;
use crate::cache::RecentCache;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::shard::{NodeId, ShardId};
use crate::storage::flusher::Flusher;
use crate::storage::log::LogStore;
use crate::storage::sm::StateMachine;
use crate::storage::wal::Wal;
use crate::storage::Storage;
use openraft::{BasicNode, SnapshotPolicy};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("storage: {0}")]
    Store(#[from] crate::storage::StoreError),
    #[error("openraft config: {0}")]
    Config(String),
    #[error("openraft: {0}")]
    Raft(String),
}

/// A shard group as the node uses it.
#[derive(Clone)]
pub struct Group {
    pub shard: ShardId,
    pub raft: Raft,
    pub sm: StateMachine,
    pub committed_index: Arc<AtomicU64>,
    /// When this node last heard from the group's leader (pre-vote, [`super::prevote`]).
    pub contact: super::prevote::Contact,
    /// The group came to this node by a replica move (not at the cluster's creation): until
    /// its membership, learnt through the log, names this node a voter, it votes for no one
    /// (`Node::votes_in`).
    pub from_move: bool,
    /// When this node became the leader (`prevote::leading_for`).
    pub leading_since: Arc<AtomicU64>,
}

impl Group {
    /// openraft's `append_entries`, noting the leader's contact unless it was refused for a
    /// higher vote (an outdated leader is no contact).
    pub async fn append_entries(
        &self,
        rpc: openraft::raft::AppendEntriesRequest<super::TypeConfig>,
    ) -> Result<openraft::raft::AppendEntriesResponse<NodeId>, openraft::error::RaftError<NodeId>> {
        let res = self.raft.append_entries(rpc).await;
        if matches!(&res, Ok(r) if !matches!(r, openraft::raft::AppendEntriesResponse::HigherVote(_))) {
            self.contact.note();
        }
        res
    }

    pub fn committed(&self) -> u64 {
        self.committed_index.load(Ordering::Relaxed)
    }
}

pub fn raft_config(cfg: &Config, shard: ShardId) -> Result<Arc<openraft::Config>, GroupError> {
    let c = openraft::Config {
        cluster_name: format!("raftchat-shard-{shard}"),
        heartbeat_interval: cfg.heartbeat_ms,
        election_timeout_min: cfg.election_timeout_min_ms,
        election_timeout_max: cfg.election_timeout_max_ms,
        install_snapshot_timeout: cfg.rpc_timeout_ms.max(1_000) * 2,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
        max_in_snapshot_log_to_keep: cfg.keep_logs,
        snapshot_max_chunk_size: 1 << 20,
        // Entries carry batches of commands; bound what one AppendEntries carries so a
        // catching-up follower gets answers within the RPC timeout (openraft uses the
        // heartbeat interval as that timeout).
        max_payload_entries: 64,
        // With pre-votes, elections are started by `prevote`'s task, not openraft's timer.
        enable_elect: !cfg.prevote,
        ..Default::default()
    };
    Ok(Arc::new(c.validate().map_err(|e| GroupError::Config(e.to_string()))?))
}

#[allow(clippy::too_many_arguments)]
pub async fn start(
    cfg: &Config,
    shard: ShardId,
    replicas: &[NodeId],
    storage: &Storage,
    wal: &Wal,
    flusher: &Flusher,
    peers: &Peers,
    metrics: &Metrics,
    cache_budget: usize,
    from_move: bool,
) -> Result<Group, GroupError> {
    let (meta_tree, sm_tree) = storage.shard_trees(shard)?;
    let log = LogStore::new(shard, wal.clone(), flusher.clone());
    let committed_index = log.committed_index.clone();
    let label = shard.to_string();
    // Exported at zero from start-up.
    metrics.outbox_redriven.with_label_values(&[&label]);
    let cache = Arc::new(RecentCache::new(
        cache_budget,
        metrics.cache_hits.with_label_values(&[&label]),
        metrics.cache_misses.with_label_values(&[&label]),
    ));
    let snap_dir = cfg.data_dir.join("snapshots").join(format!("s{shard}"));
    let sm = StateMachine::open(sm_tree, meta_tree, flusher.clone(), cache, snap_dir)?;
    let network = NetworkFactory::new(shard, peers.clone());
    let raft = Raft::new(cfg.node_id, raft_config(cfg, shard)?, network, log, sm.clone())
        .await
        .map_err(|e| GroupError::Raft(e.to_string()))?;

    // The preferred leader (first replica) creates the group once, on a fresh cluster.
    if replicas.first() == Some(&cfg.node_id)
        && !raft.is_initialized().await.map_err(|e| GroupError::Raft(e.to_string()))?
    {
        let members: BTreeMap<NodeId, BasicNode> =
            replicas.iter().map(|id| (*id, BasicNode::new(peers.addr(*id).unwrap_or_default()))).collect();
        match raft.initialize(members).await {
            Ok(()) => tracing::info!(shard, ?replicas, "initialized shard group"),
            Err(e) => tracing::warn!(shard, cause = %e, "initialize skipped"),
        }
    }
    Ok(Group {
        shard,
        raft,
        sm,
        committed_index,
        contact: Default::default(),
        from_move,
        leading_since: Arc::default(),
    })
}
