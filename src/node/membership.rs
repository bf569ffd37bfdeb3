//! Replica moves: a shard's replica goes from one node to another while the cluster serves.
//!
//! A shard's placement is its Raft group's membership: replicated in the group's own log,
//! durable with it, changed only through openraft (`add_learner`, then `change_membership`
//! with joint consensus). There is no second copy to keep in step; what a node needs for
//! routing it learns (below).
//!
//! One move of shard S from node A to node B ([`Node::move_replica`], run by whichever node
//! the operator asked, `POST /v1/admin/shards/{S}/move`):
//!
//! 1. If A leads S, the leadership goes to another voter first (`transfer_leader`).
//! 2. B hosts S ([`Node::host_shard`], a peer call): an empty, uninitialized group, recorded
//!    in B's data folder (`cluster/hosted`), so it survives restarts.
//! 3. S's leader adds B as a learner and waits until B holds every entry (by log, or by
//!    the streamed snapshot when the log was purged), then replaces A by B among the voters
//!    (`ShardOp::ChangeReplica`: `change_membership`, joint consensus). It returns once the
//!    new membership is committed.
//! 4. A drops S ([`Node::drop_shard`]) once S's leader confirms A is in no committed
//!    membership of S any more: A records that S went (and to which voters), stops its
//!    group, deletes its state and snapshot files, and forgets S in its write-ahead log.
//!
//! Every step checks where it stands first, so running the same move again after a failure
//! (a node down, a timeout) goes on from where it stopped. A dead A (replacing a lost
//! machine) cannot drop S: the move still completes, and A, should it come back with its
//! data, finds S's group without it (its pre-votes get no answers; the leader no longer
//! sends to it) until an operator drops or wipes it.
//!
//! Routing. A node that hosts S routes by its group's membership. Otherwise it routes by
//! what it learnt (`Node::routes`): a node that dropped S answers requests for S with
//! [`ShardError::Moved`] (the voters S went to), and the router follows that, keeping the
//! newest by membership index. Before any move, the placement function gives the first
//! guess, and every node it names either hosts S or dropped it (and so knows where it went),
//! so a chain of answers always leads to S.
//!
//! Safety. A node forgets S only after S's committed membership leaves it out, so it never
//! votes in S again with a forgotten vote. Should S come back to it later, its group starts
//! empty, and an empty log would grant any candidate's vote (openraft checks only the log
//! and the lease): so a node answers votes and pre-votes of a group only while that group's
//! own membership lists it as a voter (`Node::votes_in`), which a returning replica reaches
//! only through the log, as a learner promoted by the leader. Before its group is dropped,
//! the state machine is closed (`StateMachine::close`): openraft's state-machine worker may
//! still hold queued applies after `Raft::shutdown`, and none may write after the delete. Moves need cluster version 3:
//! the write-ahead log record of a forgotten shard is unknown to older builds.

use super::router::{ShardError, ShardOp, ShardReply};
use super::shard_handle::{Limits, ShardHandle};
use super::Node;
use crate::config::Config;
use crate::raft::network::RawError;
use crate::raft::pipe::Kind;
use crate::shard::{NodeId, Placement, ShardId};
use crate::storage::flusher::Flusher;
use crate::storage::wal::Wal;
use crate::storage::Storage;
use openraft::{BasicNode, ChangeMembers};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What starting and stopping groups at runtime needs.
pub struct Kit {
    pub(super) storage: Storage,
    wal: Wal,
    flusher: Flusher,
    limits: Limits,
    cache_budget: usize,
    /// One host or drop at a time on this node (each rewrites the hosted set).
    changing: tokio::sync::Mutex<()>,
}

impl Kit {
    pub fn new(storage: Storage, wal: Wal, flusher: Flusher, limits: Limits, cache_budget: usize) -> Self {
        Self { storage, wal, flusher, limits, cache_budget, changing: tokio::sync::Mutex::new(()) }
    }
}

/// Each shard's share of the message cache: the cache divided by the shards a node holds
/// when replicas are spread evenly (a node that joins empty gets the same share per shard).
pub fn cache_budget(cfg: &Config, placement: &Placement) -> usize {
    let nodes = placement.nodes().len().max(1) as u64;
    let per_node = (u64::from(placement.shard_count()) * nodes.min(3)).div_ceil(nodes).max(1);
    (cfg.cache_bytes as u64 / per_node) as usize
}

/// At start: a shard this node does not host but still has state of (a drop cut short by
/// a crash) is deleted now.
pub async fn forget_leftovers(
    storage: &Storage,
    wal: &Wal,
    data_dir: &Path,
    hosted: &[ShardId],
) -> Result<(), crate::server::NodeError> {
    if storage.hosted()?.is_none() {
        return Ok(());
    }
    for shard in wal.shards() {
        if hosted.contains(&shard) {
            continue;
        }
        tracing::warn!(shard, "deleting what is left of a shard this node gave away");
        storage.clear_shard(shard)?;
        remove_snapshots(data_dir, shard);
        wal.forget(shard).await.map_err(|e| crate::server::NodeError::Serve(format!("write-ahead log: {e}")))?;
    }
    Ok(())
}

fn remove_snapshots(data_dir: &Path, shard: ShardId) {
    let dir = data_dir.join("snapshots").join(format!("s{shard}"));
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(shard, dir = %dir.display(), cause = %e, "cannot delete the snapshots of a dropped shard");
        }
    }
}

/// A shard's membership as its leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    pub leader: NodeId,
    /// Index of the log entry of this membership.
    pub index: u64,
    /// Whether that entry is committed.
    pub committed: bool,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// In the middle of a voter change (a joint config: `voters` holds both sets); the
    /// next move of the shard finishes it. False from builds before this field.
    #[serde(default)]
    pub joint: bool,
}

/// What a move did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoveOutcome {
    pub shard: ShardId,
    pub voters: Vec<NodeId>,
    /// Whether the node the replica left deleted its copy (false when it did not answer,
    /// e.g. a dead node being replaced).
    pub dropped: bool,
    pub note: Option<String>,
}

impl Node {
    /// The voters of `shard` as this node knows them: its own group's membership if it
    /// hosts the shard, else what it learnt of a move, else the placement at creation.
    pub fn replicas(&self, shard: ShardId) -> Vec<NodeId> {
        if let Some(g) = self.local.group(shard) {
            let m = g.raft.metrics().borrow().membership_config.clone();
            let mut voters: Vec<NodeId> = m.membership().voter_ids().collect();
            if !voters.is_empty() {
                // The preferred leader (placement at creation) first, if still a voter.
                let first = self.placement.replicas(shard).first().copied();
                if let Some(pos) = first.and_then(|f| voters.iter().position(|v| *v == f)) {
                    voters[..=pos].rotate_right(1);
                }
                return voters;
            }
        }
        if let Some((_, v)) = self.route(shard) {
            if !v.is_empty() {
                return v;
            }
        }
        self.placement.replicas(shard)
    }

    /// This node's answer to [`Kind::Locate`]: the membership of its group of `shard`, or
    /// where it learnt the shard went.
    pub fn locate_answer(&self, shard: ShardId) -> Option<(u64, Vec<NodeId>)> {
        if let Some(g) = self.local.group(shard) {
            let mc = g.raft.metrics().borrow().membership_config.clone();
            let voters: Vec<NodeId> = mc.membership().voter_ids().collect();
            if !voters.is_empty() {
                return Some((mc.log_id().map(|l| l.index).unwrap_or(0), voters));
            }
        }
        self.route(shard)
    }

    /// Asks every peer where `shard` is and keeps the newest answer: for a router whose
    /// guesses all answered "not a replica" (a node that joined, or guesses from before a
    /// move whose nodes were wiped). Returns whether it learnt anything new.
    pub(crate) async fn locate(&self, shard: ShardId, deadline: Instant) -> bool {
        let ttl = deadline
            .saturating_duration_since(Instant::now())
            .min(self.peers.rpc_timeout())
            .max(Duration::from_millis(100));
        let mut learnt = false;
        for (_, answer) in self.peers.ask_all(self.id, Kind::Locate, shard, ttl).await {
            let located = answer.ok().and_then(|b| serde_json::from_slice::<Option<(u64, Vec<NodeId>)>>(&b).ok());
            if let Some(Some((index, voters))) = located {
                if !voters.is_empty() {
                    learnt |= self.learn_route(shard, index, voters);
                }
            }
        }
        learnt
    }

    pub(crate) fn route(&self, shard: ShardId) -> Option<(u64, Vec<NodeId>)> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).get(&shard).cloned()
    }

    /// Keeps the newest of what this node knows of where `shard` is.
    pub(crate) fn learn_route(&self, shard: ShardId, index: u64, voters: Vec<NodeId>) -> bool {
        let mut r = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        match r.get(&shard) {
            Some((i, v)) if *i > index || (*i == index && *v == voters) => false,
            _ => {
                r.insert(shard, (index, voters));
                true
            }
        }
    }

    /// Hosts `shard` (an empty group that a leader will fill), durably. Nothing to do if it
    /// already does.
    pub async fn host_shard(self: &Arc<Self>, shard: ShardId) -> Result<(), ShardError> {
        if shard >= self.placement.shard_count() {
            return Err(ShardError::Invalid(format!("this cluster has shards 0..{}", self.placement.shard_count())));
        }
        let kit = &self.kit;
        let _one = kit.changing.lock().await;
        if self.local.contains(shard) {
            return Ok(());
        }
        // Whatever an earlier stay of this shard left (a drop cut short) goes first: the
        // replica starts empty and gets its state from the leader.
        let leftover = |e: String| ShardError::Storage(format!("clearing what shard {shard} left here: {e}"));
        kit.storage.clear_shard(shard).map_err(|e| leftover(e.to_string()))?;
        remove_snapshots(&self.cfg.data_dir, shard);
        if kit.wal.shards().contains(&shard) {
            kit.wal.forget(shard).await.map_err(|e| leftover(e.to_string()))?;
        }
        // Recorded before the group exists: after a crash it still votes for no one.
        let mut moved_in = kit.storage.moved_in().map_err(|e| ShardError::Storage(e.to_string()))?;
        if !moved_in.contains(&shard) {
            moved_in.push(shard);
            moved_in.sort_unstable();
            kit.storage.set_moved_in(&moved_in).map_err(|e| ShardError::Storage(e.to_string()))?;
        }
        let g = crate::raft::group::start(
            &self.cfg,
            shard,
            &[],
            &kit.storage,
            &kit.wal,
            &kit.flusher,
            &self.peers,
            &self.metrics,
            kit.cache_budget,
            true,
        )
        .await
        .map_err(|e| ShardError::Storage(e.to_string()))?;
        self.local.insert(ShardHandle::start(g, kit.limits, self.metrics.clone()));
        let mut hosted = self.local.shards();
        hosted.sort_unstable();
        kit.storage.set_hosted(&hosted).map_err(|e| ShardError::Storage(e.to_string()))?;
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&shard);
        self.save_routes()?;
        tracing::info!(shard, "hosting shard (a replica moves here)");
        Ok(())
    }

    /// Drops `shard` from this node once its leader confirms that no committed membership
    /// includes this node: deletes its state, snapshots and log.
    pub async fn drop_shard(self: &Arc<Self>, shard: ShardId, deadline: Instant) -> Result<(), ShardError> {
        let kit = &self.kit;
        let _one = kit.changing.lock().await;
        let Some(handle) = self.local.handle(shard) else {
            return Ok(());
        };
        let m = match self.call(shard, ShardOp::Members, deadline).await? {
            ShardReply::Members(m) => m,
            other => return Err(ShardError::Storage(format!("unexpected reply {other:?}"))),
        };
        if !m.committed || m.voters.contains(&self.id) || m.learners.contains(&self.id) {
            return Err(ShardError::Invalid(format!(
                "node {} is still in shard {shard}'s membership (voters {:?}, learners {:?}{}): move its replica away first",
                self.id,
                m.voters,
                m.learners,
                if m.committed { "" } else { ", not committed yet" }
            )));
        }
        // Where it went, first: from here on this node answers requests for it with that.
        self.learn_route(shard, m.index, m.voters.clone());
        self.local.remove(shard);
        self.save_routes()?;
        let mut hosted = self.local.shards();
        hosted.sort_unstable();
        kit.storage.set_hosted(&hosted).map_err(|e| ShardError::Storage(e.to_string()))?;
        if let Err(e) = handle.group.raft.shutdown().await {
            tracing::warn!(shard, cause = %e, "raft shutdown of a dropped shard");
        }
        handle.group.sm.close().await;
        drop(handle);
        kit.storage.clear_shard(shard).map_err(|e| ShardError::Storage(e.to_string()))?;
        remove_snapshots(&self.cfg.data_dir, shard);
        kit.wal.forget(shard).await.map_err(|e| ShardError::Storage(format!("write-ahead log: {e}")))?;
        let mut moved_in = kit.storage.moved_in().map_err(|e| ShardError::Storage(e.to_string()))?;
        moved_in.retain(|s| *s != shard);
        kit.storage.set_moved_in(&moved_in).map_err(|e| ShardError::Storage(e.to_string()))?;
        self.metrics.forget_shard(shard);
        tracing::info!(shard, voters = ?m.voters, "dropped shard (its replica moved away)");
        Ok(())
    }

    fn save_routes(&self) -> Result<(), ShardError> {
        let mut v: Vec<(ShardId, u64, Vec<NodeId>)> = self
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(s, _)| !self.local.contains(**s))
            .map(|(s, (i, v))| (*s, *i, v.clone()))
            .collect();
        v.sort_unstable();
        self.kit.storage.set_moved(&v).map_err(|e| ShardError::Storage(e.to_string()))
    }

    /// The leader's side of [`ShardOp::Members`]: its membership after a linearizable check.
    pub(crate) async fn members_local(&self, shard: ShardId, deadline: Instant) -> Result<Members, ShardError> {
        let handle = self.local.handle(shard).ok_or(ShardError::NotReplica { shard })?;
        handle.linearize(deadline).await?;
        let m = handle.group.raft.metrics().borrow().clone();
        let mc = m.membership_config.clone();
        let voters: Vec<NodeId> = mc.membership().voter_ids().collect();
        let learners: Vec<NodeId> = mc.membership().learner_ids().collect();
        let index = mc.log_id().map(|l| l.index).unwrap_or(0);
        let committed = handle.group.committed() >= index;
        let joint = mc.membership().get_joint_config().len() > 1;
        Ok(Members { leader: self.id, index, committed, voters, learners, joint })
    }

    /// The leader's side of a move ([`ShardOp::ChangeReplica`]): `to` becomes a learner,
    /// catches up, and replaces `from` among the voters.
    pub(crate) async fn change_replica_local(
        self: &Arc<Self>,
        shard: ShardId,
        from: NodeId,
        to: NodeId,
        deadline: Instant,
    ) -> Result<Members, ShardError> {
        let handle = self.local.handle(shard).ok_or(ShardError::NotReplica { shard })?;
        let group = handle.group.clone();
        let unavailable = |e: String| ShardError::Unavailable { shard, reason: e };
        // Held until this call returns and every change it started has finished (each
        // spawned change keeps a clone).
        let one = tokio::time::timeout_at(deadline, handle.membership.clone().lock_owned())
            .await
            .map_err(|_| unavailable("another membership change of the shard is running".into()))?;
        let one = Arc::new(one);
        let mut m = self.members_local(shard, deadline).await?;
        if m.joint {
            // A change cut short between its two steps left a joint config (both voter
            // sets): finish it first, to the newer set, so the checks below see plain voters.
            let last = cut_short_change(&group).unwrap_or_default();
            tracing::warn!(shard, voters = ?last, "finishing a membership change cut short");
            finish_change(&group.raft, ChangeMembers::ReplaceAllVoters(last), deadline, one.clone()).await.map_err(
                |e| match e {
                    None => ShardError::Timeout { shard },
                    Some(ShardError::Unavailable { reason, .. }) => {
                        unavailable(format!("finishing a joint config: {reason}"))
                    }
                    Some(e) => e,
                },
            )?;
            m = self.members_local(shard, deadline).await?;
        }
        if m.voters.contains(&to) && !m.voters.contains(&from) {
            return Ok(m);
        }
        if !m.voters.contains(&from) && from != to {
            return Err(ShardError::Invalid(format!("node {from} is not a voter of shard {shard} ({:?})", m.voters)));
        }
        if m.voters.contains(&to) {
            return Err(ShardError::Invalid(format!(
                "node {to} already holds a replica of shard {shard} ({:?})",
                m.voters
            )));
        }
        if from == self.id {
            return Err(ShardError::Invalid(format!("node {from} leads shard {shard}: move the leadership first")));
        }
        // The node table read afresh: a node removed a moment ago (its removal checked that no
        // shard lists it, so this move must not list it after) is refused here, before the
        // learner and again before the voters change.
        let removed = |n: NodeId| ShardError::Invalid(format!("node {n} was removed from the cluster"));
        self.refresh_directory_within(deadline).await;
        if self.directory.is_removed(to) {
            return Err(removed(to));
        }
        let addr =
            self.peer_addr(to).await.ok_or_else(|| ShardError::Invalid(format!("node {to} is not a known peer")))?;
        if !m.learners.contains(&to) && !m.voters.contains(&to) {
            // Blocks until the learner holds the leader's log (or the deadline).
            let add = group.raft.add_learner(to, BasicNode::new(addr), true);
            match tokio::time::timeout_at(deadline, add).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(unavailable(format!("adding node {to} as a learner: {e}"))),
                Err(_) => return Err(ShardError::Timeout { shard }),
            }
        }
        self.refresh_directory_within(deadline).await;
        if self.directory.is_removed(to) {
            return Err(removed(to));
        }
        let mut voters: BTreeSet<NodeId> = m.voters.iter().copied().collect();
        voters.remove(&from);
        voters.insert(to);
        finish_change(&group.raft, ChangeMembers::ReplaceAllVoters(voters), deadline, one.clone()).await.map_err(
            |e| match e {
                None => ShardError::Timeout { shard },
                Some(ShardError::Unavailable { reason, .. }) => unavailable(format!("changing the voters: {reason}")),
                Some(e) => e,
            },
        )?;
        tracing::info!(shard, from, to, "replica moved");
        self.members_local(shard, deadline).await
    }

    /// Reads the node table afresh, giving it at most a quarter of what is left before
    /// `deadline` (and one RPC timeout); on failure the table as last read stands.
    async fn refresh_directory_within(self: &Arc<Self>, deadline: Instant) {
        let budget = (deadline.saturating_duration_since(Instant::now()) / 4).min(self.peers.rpc_timeout());
        let _ = tokio::time::timeout(budget, self.refresh_directory()).await;
    }

    /// Moves `shard`'s replica from `from` to `to` (module docs); safe to run again.
    pub async fn move_replica(
        self: &Arc<Self>,
        shard: ShardId,
        from: NodeId,
        to: NodeId,
        deadline: Instant,
    ) -> Result<MoveOutcome, ShardError> {
        if from == to {
            return Err(ShardError::Invalid("a replica moves between two different nodes".into()));
        }
        for n in [from, to] {
            // A removed node's replicas still move away (re-replication after a forced
            // removal): only the node that takes them must be a member.
            if n == from && self.directory.is_removed(n) {
                continue;
            }
            if n != self.id && self.peer_addr(n).await.is_none() {
                return Err(ShardError::Invalid(format!("node {n} is not a member of this cluster")));
            }
        }
        let m = match self.call(shard, ShardOp::Members, deadline).await? {
            ShardReply::Members(m) => m,
            other => return Err(ShardError::Storage(format!("unexpected reply {other:?}"))),
        };
        let done = m.voters.contains(&to) && !m.voters.contains(&from);
        // In a joint config both voter sets are listed: the leader finishes it first.
        if m.voters.contains(&to) && m.voters.contains(&from) && !m.joint {
            return Err(ShardError::Invalid(format!(
                "node {to} already holds a replica of shard {shard} (voters {:?}): pick a node that does not",
                m.voters
            )));
        }
        if !done {
            if !m.voters.contains(&from) {
                return Err(ShardError::Invalid(format!(
                    "node {from} holds no replica of shard {shard} (voters {:?})",
                    m.voters
                )));
            }
            if m.leader == from {
                // Another voter, one that answers if there is one.
                let others: Vec<NodeId> = m.voters.iter().copied().filter(|v| *v != from).collect();
                let answering = |v: &NodeId| *v == self.id || !self.peers.suspect(*v);
                let other = others.iter().copied().find(answering).or(others.first().copied()).ok_or_else(|| {
                    ShardError::Invalid(format!("shard {shard} has one voter; add a replica before moving it"))
                })?;
                self.call(shard, ShardOp::TransferLeader { to: other }, deadline).await?;
            }
            self.peer_shard_call(to, Kind::Host, shard, deadline).await?;
            match self.call(shard, ShardOp::ChangeReplica { from, to }, deadline).await? {
                ShardReply::Members(_) => {}
                other => return Err(ShardError::Storage(format!("unexpected reply {other:?}"))),
            }
        }
        let after = match self.call(shard, ShardOp::Members, deadline).await? {
            ShardReply::Members(m) => m,
            other => return Err(ShardError::Storage(format!("unexpected reply {other:?}"))),
        };
        self.learn_route(shard, after.index, after.voters.clone());
        // The node left behind deletes its copy; a dead one cannot, and the move stands.
        let drop_budget =
            Instant::now() + Duration::from_secs(10).min(deadline.saturating_duration_since(Instant::now()));
        let (dropped, note) = match self.peer_shard_call(from, Kind::Drop, shard, drop_budget).await {
            Ok(()) => (true, None),
            Err(e) => (false, Some(format!("node {from} did not drop its copy of shard {shard}: {e}"))),
        };
        Ok(MoveOutcome { shard, voters: after.voters, dropped, note })
    }

    /// Asks `node` (this one included) to host or drop `shard`.
    async fn peer_shard_call(
        self: &Arc<Self>,
        node: NodeId,
        kind: Kind,
        shard: ShardId,
        deadline: Instant,
    ) -> Result<(), ShardError> {
        if node == self.id {
            return match kind {
                Kind::Host => self.host_shard(shard).await,
                _ => self.drop_shard(shard, deadline).await,
            };
        }
        let ttl = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
        let reply = match self.peers.call_raw(node, kind, shard, ttl, Vec::new()).await {
            Ok(r) => r,
            Err(RawError::UnknownCall) => {
                return Err(ShardError::Invalid(format!("node {node} runs a build without replica moves")))
            }
            Err(RawError::Failed(e)) => {
                return Err(ShardError::Unavailable { shard, reason: format!("node {node}: {e}") })
            }
        };
        serde_json::from_slice::<Result<(), ShardError>>(&reply).map_err(|e| ShardError::Unavailable {
            shard,
            reason: format!("node {node} sent an undecodable reply: {e}"),
        })?
    }
}

/// The voters a voter change cut short between its two steps was going to: the newer set of
/// the group's joint config, if it is in one.
pub(super) fn cut_short_change(group: &crate::raft::group::Group) -> Option<BTreeSet<NodeId>> {
    let m = group.raft.metrics().borrow().membership_config.clone();
    let joint = m.membership().get_joint_config();
    (joint.len() > 1).then(|| joint.last().cloned()).flatten()
}

/// Runs a membership change on its own task, so that both of its steps (joint config, then
/// the new one) are made even when the caller stops waiting at `deadline`: a change dropped
/// between them would leave the shard in a joint config. The task holds `one` (the shard's
/// membership lock) until it ends. `Err(None)`: the deadline passed (the change goes on).
pub(super) async fn finish_change(
    raft: &crate::types::Raft,
    change: ChangeMembers<NodeId, BasicNode>,
    deadline: Instant,
    one: Arc<tokio::sync::OwnedMutexGuard<()>>,
) -> Result<(), Option<ShardError>> {
    let raft = raft.clone();
    let task = tokio::spawn(async move {
        let _one = one;
        raft.change_membership(change, false).await
    });
    match tokio::time::timeout_at(deadline, task).await {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err(e))) => Err(Some(ShardError::Unavailable { shard: 0, reason: e.to_string() })),
        Ok(Err(e)) => Err(Some(ShardError::Unavailable { shard: 0, reason: format!("the change's task failed: {e}") })),
        Err(_) => Err(None),
    }
}
