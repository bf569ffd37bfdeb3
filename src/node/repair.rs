//! Re-replication after a node dies, and cleanup when it comes back.
//!
//! - Every [`ROUND`], the leader of the directory shard (one node in the cluster at a time)
//!   calls every node of its address book ([`Kind::Book`], which also keeps their health
//!   fresh). A node that has not answered for `replace_dead_after_secs` is dead: each shard
//!   that lists it as a voter gets a replica move from it to the live node holding the
//!   fewest replicas among those without one of that shard (`Node::move_replica`, the same
//!   move `admin replace-node` makes; a dead node cannot delete its copy, the move completes
//!   all the same). The moves hold the placement lock (`node::placement_lock`, from
//!   `cluster_version` 5): while an operator's placement command holds it, re-replication
//!   waits for a later round. The joint-config finisher below runs from `cluster_version` 4,
//!   like this whole task. One move at a time, each after confirming (linearizably) that this node
//!   still leads shard 0 and that the dead node is still silent; "dead" counts from the first
//!   failed call after the node's last answer. A shard with no spare node stays as it is
//!   (logged once). A node the node table marks removed counts as dead at once, so its
//!   replicas move in the next round: `admin remove-node --force` of a dead machine, and a
//!   replica move onto a node that raced its removal (the removal's check that no shard lists
//!   the node and the move are not atomic; this closes the gap afterwards). Removed nodes
//!   found in no shard are not looked for again for a minute.
//! - Every node, every round: a group it leads that lists a removed node as a learner (a
//!   move onto it cut short by its removal) takes the learner out.
//! - Every node, every round: a group it leads that is in a committed joint config (two
//!   voter sets) with no membership change of it running here was left between the two
//!   steps of a voter change (its leader crashed after the joint config committed, before
//!   it proposed the new voters): the change is finished to the newer set. A joint config
//!   is safe but needs a majority of both sets for every write, and nothing else would
//!   finish it until the next move of that shard.
//! - Every node, every round: a shard it hosts whose group has heard from no leader for
//!   [`SILENT`] may have moved away while this node was down (a leader no longer sends to a
//!   node that left its membership). `Node::drop_shard` asks the shard's leader and drops
//!   the local copy only if no committed membership includes this node; otherwise (a
//!   partition, say) nothing happens.

use super::directory::DIRECTORY_SHARD;
use super::router::{ShardOp, ShardReply};
use super::Node;
use crate::raft::network::RawError;
use crate::raft::pipe::Kind;
use crate::shard::{NodeId, ShardId};
use openraft::ChangeMembers;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How often the repair task looks.
pub const ROUND: Duration = Duration::from_secs(5);
/// A group that heard from no leader this long asks whether it still belongs to its shard.
pub const SILENT: Duration = Duration::from_secs(10);
/// Rounds after which removed nodes found in no shard are looked for again (one minute).
const CLEARED_FOR: u64 = 12;

/// The repair task (module docs); nothing below `cluster_version` 4 (older builds do not
/// answer the probe). With `replace_dead_after_secs` 0 only re-replication is off: the
/// cleanups (copies that moved away, removed learners) run all the same.
pub fn spawn(node: Arc<Node>, mut stop: watch::Receiver<bool>) -> Option<JoinHandle<()>> {
    if node.cfg.cluster_version < super::directory::VERSION {
        return None;
    }
    Some(tokio::spawn(async move {
        let dead_after = Duration::from_secs(node.cfg.replace_dead_after_secs);
        let mut warned: HashSet<(ShardId, NodeId)> = HashSet::new();
        let mut cleared: HashSet<NodeId> = HashSet::new();
        let mut rounds: u64 = 0;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(ROUND) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            node.drop_lost_shards().await;
            node.finish_joint_configs().await;
            node.drop_removed_learners().await;
            // Removed nodes found in no shard are looked for again now and then: a move that
            // raced a removal on a stale node table may list one later.
            rounds += 1;
            if rounds.is_multiple_of(CLEARED_FOR) {
                cleared.clear();
            }
            if !dead_after.is_zero() && node.leads(DIRECTORY_SHARD) {
                node.replace_dead(dead_after, &mut warned, &mut cleared).await;
            }
        }
    }))
}

impl Node {
    fn leads(&self, shard: ShardId) -> bool {
        self.local.group(shard).is_some_and(|g| g.raft.metrics().borrow().current_leader == Some(self.id))
    }

    /// Shards whose group heard from no leader for [`SILENT`]: dropped if they moved away.
    /// The shards' leaders are asked first, all at once and without holding anything (a
    /// node cut off from its peers only waits out the calls); only a shard whose committed
    /// membership leaves this node out goes on to `drop_shard`, which asks again.
    async fn drop_lost_shards(self: &Arc<Self>) {
        let silent: Vec<ShardId> = self
            .local
            .groups()
            .iter()
            .filter(|g| g.contact.since() >= SILENT && g.raft.metrics().borrow().current_leader != Some(self.id))
            .map(|g| g.shard)
            .collect();
        if silent.is_empty() {
            return;
        }
        let deadline = Instant::now() + self.peers.rpc_timeout() * 2;
        let asks = silent.iter().map(|shard| self.call(*shard, ShardOp::Members, deadline));
        let answers = futures::future::join_all(asks).await;
        for (shard, answer) in silent.into_iter().zip(answers) {
            let gone = matches!(&answer, Ok(ShardReply::Members(m))
                if m.committed && !m.voters.contains(&self.id) && !m.learners.contains(&self.id));
            if !gone {
                continue;
            }
            let deadline = Instant::now() + self.peers.rpc_timeout() * 2;
            match self.drop_shard(shard, deadline).await {
                Ok(()) => tracing::info!(shard, "dropped a copy that moved away while this node was down"),
                Err(e) => tracing::debug!(shard, cause = %e, "silent shard kept"),
            }
        }
    }

    /// Groups this node leads left in a committed joint config (module docs): finished to
    /// the newer voter set, the same step a move makes when it finds one.
    async fn finish_joint_configs(self: &Arc<Self>) {
        for g in self.local.groups() {
            let Some(newer) = super::membership::cut_short_change(&g) else { continue };
            let (leads, index) = {
                let m = g.raft.metrics().borrow().clone();
                (m.current_leader == Some(self.id), m.membership_config.log_id().map(|l| l.index).unwrap_or(0))
            };
            if !leads || g.committed() < index {
                continue;
            }
            // A change running here holds the lock through both of its steps: not one cut short.
            let Some(handle) = self.local.handle(g.shard) else { continue };
            let Ok(one) = handle.membership.clone().try_lock_owned() else { continue };
            tracing::warn!(shard = g.shard, voters = ?newer, "finishing a membership change cut short between its two steps");
            let change = ChangeMembers::ReplaceAllVoters(newer.clone());
            let deadline = Instant::now() + self.peers.rpc_timeout() * 4;
            match super::membership::finish_change(&g.raft, change, deadline, Arc::new(one)).await {
                Ok(()) => {
                    self.metrics.joint_configs_finished.inc();
                    tracing::info!(shard = g.shard, voters = ?newer, "finished a membership change cut short")
                }
                Err(Some(e)) => {
                    tracing::warn!(shard = g.shard, cause = %e, "finishing a joint config failed; retrying next round")
                }
                Err(None) => tracing::warn!(shard = g.shard, "finishing a joint config timed out; retrying next round"),
            }
        }
    }

    /// Groups this node leads that list a removed node as a learner (a move onto it that
    /// raced its removal, cut short when it stopped): the learner is taken out.
    async fn drop_removed_learners(self: &Arc<Self>) {
        for g in self.local.groups() {
            let (leads, joint, learners) = {
                let m = g.raft.metrics().borrow().clone();
                let membership = m.membership_config.membership();
                let learners: BTreeSet<NodeId> =
                    membership.learner_ids().filter(|n| self.directory.is_removed(*n)).collect();
                (m.current_leader == Some(self.id), membership.get_joint_config().len() > 1, learners)
            };
            // Never in the middle of a voter change (a joint config): its second step would
            // find this one in progress.
            if !leads || joint || learners.is_empty() {
                continue;
            }
            // Not while a move of the shard runs here (it holds the lock through its change).
            let Some(handle) = self.local.handle(g.shard) else { continue };
            let Ok(_one) = handle.membership.try_lock() else { continue };
            let change = g.raft.change_membership(ChangeMembers::RemoveNodes(learners.clone()), false);
            match tokio::time::timeout(self.peers.rpc_timeout() * 2, change).await {
                Ok(Ok(_)) => tracing::info!(shard = g.shard, ?learners, "took removed nodes out of the learners"),
                Ok(Err(e)) => tracing::debug!(shard = g.shard, cause = %e, "removed learners kept for now"),
                Err(_) => tracing::debug!(shard = g.shard, "taking removed learners out timed out"),
            }
        }
    }

    /// The directory shard leader's part (module docs). `cleared`: removed nodes found in no
    /// shard's membership, not looked for again.
    async fn replace_dead(
        self: &Arc<Self>,
        dead_after: Duration,
        warned: &mut HashSet<(ShardId, NodeId)>,
        cleared: &mut HashSet<NodeId>,
    ) {
        let ids: Vec<NodeId> = self.directory.members().iter().map(|m| m.id).filter(|id| *id != self.id).collect();
        let ttl = self.peers.rpc_timeout();
        for (id, answer) in self.peers.ask_all(self.id, Kind::Book, DIRECTORY_SHARD, ttl).await {
            match answer {
                // A build that does not know the call answered all the same.
                Ok(_) | Err(RawError::UnknownCall) => self.peers.note_ok(id),
                Err(e) => self.peers.note_failure(id, &e),
            }
        }
        // A removed node (`remove-node --force` of a dead machine, or a move that raced a
        // removal) never comes back: its replicas move at once.
        let removed: Vec<NodeId> = self
            .directory
            .table()
            .iter()
            .filter(|r| r.removed && r.id != self.id && !cleared.contains(&r.id))
            .map(|r| r.id)
            .collect();
        let is_dead = |id: NodeId| removed.contains(&id) || self.peers.down_for(id).is_some_and(|d| d >= dead_after);
        let dead: Vec<NodeId> = ids.iter().chain(&removed).copied().filter(|id| is_dead(*id)).collect();
        warned.retain(|(_, id)| dead.contains(id));
        if dead.is_empty() {
            return;
        }
        let live: Vec<NodeId> = std::iter::once(self.id)
            .chain(ids.iter().copied().filter(|id| !dead.contains(id) && !self.peers.suspect(*id)))
            .collect();
        // Every shard's voters and learners, from its leader.
        let mut voters: BTreeMap<ShardId, Vec<NodeId>> = BTreeMap::new();
        let mut members: BTreeMap<ShardId, Vec<NodeId>> = BTreeMap::new();
        for shard in 0..self.placement.shard_count() {
            let deadline = Instant::now() + ttl * 2;
            if let Ok(ShardReply::Members(m)) = self.call(shard, ShardOp::Members, deadline).await {
                members.insert(shard, m.voters.iter().chain(&m.learners).copied().collect());
                voters.insert(shard, m.voters);
            }
        }
        for r in &removed {
            if voters.len() as u32 == self.placement.shard_count() && !members.values().any(|m| m.contains(r)) {
                cleared.insert(*r);
            }
        }
        // Held from the first move on (each move reads the shard's membership afresh): no
        // operator's placement command runs meanwhile. Below its cluster_version, no lock.
        let locking = self.cfg.cluster_version >= super::placement_lock::VERSION;
        let mut lease: Option<super::placement_lock::Guard> = None;
        for d in dead {
            let shards: Vec<ShardId> = voters.iter().filter(|(_, v)| v.contains(&d)).map(|(s, _)| *s).collect();
            for shard in shards {
                if lease.as_ref().is_some_and(|g| !g.held()) {
                    tracing::warn!(node = d, "re-replication lost the placement lock; stopping until the next round");
                    return;
                }
                if locking && lease.is_none() {
                    match self.hold_placement_lock(format!("re-replication of node {d}'s replicas (node {})", self.id))
                    {
                        Ok(g) => lease = Some(g),
                        Err(answer) => {
                            let why = answer.refusal().unwrap_or_default();
                            if warned.insert((ShardId::MAX, d)) {
                                tracing::info!(node = d, "re-replication waits: {why}");
                            } else {
                                tracing::debug!(node = d, "re-replication waits: {why}");
                            }
                            return;
                        }
                    }
                }
                // Still leading shard 0 (a linearizable check) and the node still silent:
                // one repairer at a time, and none for a node that came back meanwhile.
                let check = Instant::now() + ttl * 2;
                if self.linearize(DIRECTORY_SHARD, check).await.is_err() || !is_dead(d) {
                    return;
                }
                let held = members.get(&shard).cloned().unwrap_or_default();
                let load = |n: NodeId| voters.values().filter(|v| v.contains(&n)).count();
                let Some(to) = live.iter().copied().filter(|n| !held.contains(n)).min_by_key(|n| (load(*n), *n)) else {
                    if warned.insert((shard, d)) {
                        tracing::warn!(
                            node = d,
                            shard,
                            "node is dead but no live node is free to take its replica: add a node (admin add-node)"
                        );
                    }
                    continue;
                };
                let deadline = Instant::now() + Duration::from_secs(600);
                match self.move_replica(shard, d, to, deadline).await {
                    Ok(out) => {
                        tracing::info!(shard, from = d, to, voters = ?out.voters, "re-replicated a shard of a dead node");
                        members.insert(shard, out.voters.clone());
                        voters.insert(shard, out.voters);
                    }
                    Err(e) if warned.insert((shard, d)) => {
                        tracing::warn!(shard, from = d, to, cause = %e, "re-replicating a shard of a dead node failed; retrying next round");
                    }
                    Err(e) => tracing::debug!(shard, from = d, to, cause = %e, "re-replicating a shard failed again"),
                }
            }
        }
    }
}
