//! Leadership transfer and leader balancing.
//!
//! openraft 0.9 has no leadership transfer. With at most three voters per shard (raftchat
//! keeps three replicas; a transfer whose target and leader would not be a majority of
//! every voter set is refused) it can be made
//! from what it has: the leader waits until the target's log matches its own, then asks the
//! target ([`Kind::Elect`] on the pipe, or unary) to start an election at once
//! (`trigger().elect()`, which skips the pre-vote). The target's vote request carries a
//! higher term and a log as long as the leader's; the leader grants it (its own election is
//! older than its lease) and steps down, and the target has its majority (itself and the old
//! leader). Raft's safety is untouched: it is an ordinary election, started on purpose.
//! Writes pause for about one round trip; proposals caught in between fail with "not
//! leader" and the router retries them on the new leader.
//!
//! Balancing. Shards are placed so that each shard's first replica (its preferred leader)
//! spreads leadership evenly, and a fresh cluster starts that way. After a failure the
//! survivors take over and, until now, kept the leadership. Every `balance_every_secs` each
//! node looks at the shards it leads: where the preferred leader is another node that
//! answers and is caught up, it transfers the leadership back to it, one shard per round, so
//! the cluster returns to an even spread without disturbing more than one shard at a time.

use super::router::ShardError;
use super::Node;
use crate::raft::network::RawError;
use crate::raft::pipe::Kind;
use crate::shard::{NodeId, ShardId};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

impl Node {
    /// Moves the leadership of `shard`, which this node must lead, to `to`; returns once `to`
    /// leads it (as this node sees it) or fails by `deadline`.
    pub async fn transfer_leader(
        self: &Arc<Self>,
        shard: ShardId,
        to: NodeId,
        deadline: Instant,
    ) -> Result<(), ShardError> {
        let handle = self.local.handle(shard).ok_or(ShardError::NotReplica { shard })?;
        let group = &handle.group;
        let m = group.raft.metrics().borrow().clone();
        if m.current_leader != Some(self.id) {
            return Err(ShardError::NotLeader { shard, leader: m.current_leader });
        }
        if to == self.id {
            return Ok(());
        }
        if !m.membership_config.membership().voter_ids().any(|v| v == to) {
            return Err(ShardError::Invalid(format!("node {to} is not a voter of shard {shard}")));
        }
        // The target's votes are its own and this node's (module docs): they must be a
        // majority of every voter set (one, or two in a joint config). Always so with the
        // three replicas raftchat keeps; a larger group is refused rather than tried.
        if let Some(c) = short_of_majority(m.membership_config.membership().get_joint_config(), self.id, to) {
            return Err(ShardError::Invalid(format!(
                "shard {shard} has voters {c:?}: a transfer to node {to} would not have a majority of them \
                 (leadership transfer needs a shard of at most three voters)"
            )));
        }
        // openraft's voters, the leader included, refuse a vote for `election_timeout_max`
        // after their vote last changed: a transfer right after this node's own election
        // would fail (and raise the term), so it waits that out first.
        let lease = Duration::from_millis(self.cfg.election_timeout_max_ms + 300);
        if let Some(led) = crate::raft::prevote::leading_for(&group.leading_since) {
            if led < lease {
                let wait = (lease - led).min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(wait).await;
            }
        }
        let lag = |group: &crate::raft::group::Group| {
            let m = group.raft.metrics().borrow().clone();
            let last = m.last_log_index.unwrap_or(0);
            (matched_index(&m, to), last)
        };
        // First close to caught up while writes go on (a far-behind target may take long)...
        loop {
            let (matched, last) = lag(group);
            if matched + 64 >= last {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ShardError::Unavailable {
                    shard,
                    reason: format!("node {to} did not catch up (at {matched} of {last})"),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // ...then no new entries (they wait in the queue, and go to the new leader) until the
        // target holds every entry this node has: under load a leader that keeps appending
        // is always ahead, and voters refuse a candidate whose log is shorter than theirs.
        // Writes wait at most about two election timeouts for this.
        let hold = Duration::from_millis(self.cfg.election_timeout_max_ms * 2);
        let until = deadline.min(Instant::now() + hold);
        let Ok(_paused) = tokio::time::timeout_at(until, handle.pause_proposals()).await else {
            return Err(ShardError::Timeout { shard });
        };
        loop {
            let (matched, last) = lag(group);
            if matched >= last {
                break;
            }
            if Instant::now() >= until {
                return Err(ShardError::Unavailable {
                    shard,
                    reason: format!("node {to} did not catch up (at {matched} of {last})"),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let ttl = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
        let elect = self.peers.call_raw(to, Kind::Elect, shard, ttl, Vec::new());
        let Ok(answer) = tokio::time::timeout_at(Instant::now() + ttl, elect).await else {
            self.metrics.leader_transfers.with_label_values(&["failed"]).inc();
            return Err(ShardError::Timeout { shard });
        };
        match answer {
            // The target answers whether it started an election (a node that is shutting
            // down does not); waiting for it to lead would then only run into the deadline.
            Ok(answer) if serde_json::from_slice::<bool>(&answer).ok() == Some(false) => {
                self.metrics.leader_transfers.with_label_values(&["failed"]).inc();
                return Err(ShardError::Unavailable {
                    shard,
                    reason: format!("node {to} declined to start an election"),
                });
            }
            Ok(_) => {}
            Err(RawError::UnknownCall) => {
                return Err(ShardError::Invalid(format!("node {to} runs a build without leadership transfer")))
            }
            Err(RawError::Failed(e)) => return Err(ShardError::Unavailable { shard, reason: e }),
        }
        let mut rx = group.raft.metrics();
        let became = tokio::time::timeout_at(until, rx.wait_for(|m| m.current_leader == Some(to))).await;
        let ok = matches!(became, Ok(Ok(_)));
        self.metrics.leader_transfers.with_label_values(&[if ok { "ok" } else { "failed" }]).inc();
        if ok {
            tracing::info!(shard, to, "leadership transferred");
            Ok(())
        } else {
            Err(ShardError::Timeout { shard })
        }
    }

    /// Whether `peer` answers a cheap call within half a second (the pipe leaves bounding
    /// the wait to its callers: a partitioned peer would otherwise hold it for seconds).
    async fn answers(&self, peer: NodeId) -> bool {
        let ttl = Duration::from_millis(500);
        let call = self.peers.call_raw(peer, Kind::Locate, 0, ttl, Vec::new());
        matches!(tokio::time::timeout(ttl, call).await, Ok(Ok(_)))
    }

    /// The node that should lead `shard` when all is well: its first replica at the
    /// cluster's creation, while that node is still a voter. After a replica move took it
    /// away the shard has none, and its leadership stays where it is (or where an operator,
    /// e.g. `admin add-node`, puts it).
    pub fn preferred_leader(&self, shard: ShardId) -> Option<NodeId> {
        let group = self.local.group(shard)?;
        let first = self.placement.replicas(shard).first().copied()?;
        let voters = group.raft.metrics().borrow().membership_config.clone();
        let is_voter = voters.membership().voter_ids().any(|v| v == first);
        is_voter.then_some(first)
    }

    /// A peer's request to start an election for `group` at once (the target of a transfer).
    /// A node that is shutting down refuses: it is giving its leaderships away, not taking
    /// new ones (a peer's balancer would otherwise hand a shard back to it).
    pub async fn elect_now(&self, group: &crate::raft::group::Group) -> bool {
        if *self.stopping.borrow() {
            return false;
        }
        group.contact.note();
        group.raft.trigger().elect().await.is_ok()
    }
}

impl Node {
    /// Graceful shutdown: gives the leadership of every shard this node leads to another
    /// voter (the one that answers and has the most of the log), all shards at once, so their
    /// writes pause for about a round trip instead of an election timeout after the node is
    /// gone. Returns (shards handed off, shards this node still leads); what is not handed
    /// off by `within` (no voter answers, a transfer too soon after an election that cannot
    /// wait) is left to an ordinary election.
    pub async fn hand_off_leadership(self: &Arc<Self>, within: Duration) -> (usize, usize) {
        let deadline = Instant::now() + within;
        // Which peers answer at all (one quick call each): a peer that stopped a moment ago
        // still looks caught up, and a transfer to it would wait out the deadline.
        let peers: BTreeSet<NodeId> = self
            .local
            .shards()
            .into_iter()
            .filter_map(|s| self.local.group(s))
            .flat_map(|g| g.raft.metrics().borrow().membership_config.membership().voter_ids().collect::<Vec<_>>())
            .filter(|v| *v != self.id)
            .collect();
        let probes = peers.into_iter().map(|p| async move { (p, self.answers(p).await) });
        let answering: BTreeSet<NodeId> =
            futures::future::join_all(probes).await.into_iter().filter(|(_, ok)| *ok).map(|(p, _)| p).collect();
        let mut transfers = Vec::new();
        let mut unreachable = Vec::new();
        for shard in self.local.shards() {
            let Some(group) = self.local.group(shard) else { continue };
            let m = group.raft.metrics().borrow().clone();
            if m.current_leader != Some(self.id) {
                continue;
            }
            let matched = |p: NodeId| matched_index(&m, p);
            // Voters that answer and are close to caught up, those not suspected first, then
            // those with the most of the log.
            let last = m.last_log_index.unwrap_or(0);
            let mut targets: Vec<NodeId> = m
                .membership_config
                .membership()
                .voter_ids()
                .filter(|v| *v != self.id && answering.contains(v) && matched(*v) + 64 >= last)
                .collect();
            targets.sort_by_key(|v| (self.peers.suspect(*v), std::cmp::Reverse(matched(*v)), *v));
            if targets.is_empty() {
                // A shard with no other voter (a single-node cluster) has nobody to hand to.
                if m.membership_config.membership().voter_ids().any(|v| v != self.id) {
                    unreachable.push(shard);
                }
                continue;
            }
            let node = self.clone();
            transfers.push(async move {
                // A target that is gone or declines fails fast; the next one is tried.
                let mut last = None;
                for to in targets {
                    match node.transfer_leader(shard, to, deadline).await {
                        Ok(()) => return (shard, Ok(to)),
                        Err(e) => last = Some(format!("node {to}: {e}")),
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                (shard, Err(last.unwrap_or_default()))
            });
        }
        if !unreachable.is_empty() {
            tracing::info!(
                shards = ?unreachable,
                "shutdown: no other voter answers and is caught up; these shards' leadership is not handed off"
            );
        }
        let mut handed = 0;
        for (shard, r) in futures::future::join_all(transfers).await {
            match r {
                Ok(to) => {
                    handed += 1;
                    tracing::info!(shard, to, "shutdown: leadership handed off");
                }
                Err(cause) => {
                    tracing::warn!(shard, %cause, "shutdown: leadership not handed off (an election will follow)")
                }
            }
        }
        let still = self
            .local
            .shards()
            .into_iter()
            .filter(|s| self.local.group(*s).is_some_and(|g| g.raft.metrics().borrow().current_leader == Some(self.id)))
            .count();
        (handed, still)
    }
}

/// The last log index the leader knows `peer` holds (0 when it knows none).
fn matched_index(m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>, peer: NodeId) -> u64 {
    m.replication.as_ref().and_then(|r| r.get(&peer).copied().flatten()).map(|l| l.index).unwrap_or(0)
}

/// The first voter set in which a transfer from `leader` to `to` would not have a majority
/// (their two votes), if any.
fn short_of_majority(configs: &[BTreeSet<NodeId>], leader: NodeId, to: NodeId) -> Option<&BTreeSet<NodeId>> {
    configs.iter().find(|c| [leader, to].iter().filter(|n| c.contains(n)).count() * 2 <= c.len())
}

/// The balancer (module docs); `every` zero turns it off.
pub fn spawn(node: Arc<Node>, every: Duration, mut stop: watch::Receiver<bool>) -> Option<tokio::task::JoinHandle<()>> {
    if every.is_zero() {
        return None;
    }
    Some(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            for shard in node.local.shards() {
                let Some(group) = node.local.group(shard) else { continue };
                let m = group.raft.metrics().borrow().clone();
                let preferred = node.preferred_leader(shard);
                let Some(p) = preferred.filter(|p| *p != node.id) else { continue };
                // Only a leader that has been one for a while, to a preferred node that answers.
                let settled = m.millis_since_quorum_ack.is_some_and(|ms| ms < 1_000);
                if m.current_leader != Some(node.id) || !settled || node.peers.suspect(p) {
                    continue;
                }
                // A node that stopped a moment ago (it just handed this shard over) is not
                // suspected yet; a transfer to it would hold the shard's writes for nothing.
                if !node.answers(p).await {
                    continue;
                }
                let deadline = Instant::now() + Duration::from_secs(3);
                match node.transfer_leader(shard, p, deadline).await {
                    Ok(()) => {
                        tracing::info!(shard, to = p, "leader balancing: gave the shard back to its preferred leader")
                    }
                    Err(e) => tracing::debug!(shard, to = p, cause = %e, "leader balancing: transfer did not happen"),
                }
                // One shard per round.
                break;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::short_of_majority;
    use std::collections::BTreeSet;

    fn set(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_transfer_needs_the_leader_and_target_to_be_a_majority_of_every_voter_set() {
        // Three voters, two, one: always a majority.
        assert_eq!(short_of_majority(&[set(&[1, 2, 3])], 1, 2), None);
        assert_eq!(short_of_majority(&[set(&[1, 2])], 1, 2), None);
        // A joint config where both are in both sets, and where the target is new.
        assert_eq!(short_of_majority(&[set(&[1, 2, 3]), set(&[1, 2, 4])], 1, 2), None);
        assert_eq!(short_of_majority(&[set(&[1, 2, 3]), set(&[1, 2, 4])], 1, 4), Some(&set(&[1, 2, 3])));
        // Five voters (raftchat keeps three): two votes are not enough.
        assert_eq!(short_of_majority(&[set(&[1, 2, 3, 4, 5])], 1, 2), Some(&set(&[1, 2, 3, 4, 5])));
        // Four voters: two are half, not a majority.
        assert!(short_of_majority(&[set(&[1, 2, 3, 4])], 1, 2).is_some());
    }
}
