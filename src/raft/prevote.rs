//! Pre-vote: a node starts an election only when a majority of its group agrees that the
//! group has no working leader.
//!
//! Why. openraft 0.9 has no pre-vote. A node cut off from its peers (a partition, a long
//! pause) times out and raises its term again and again; when it comes back, its answer to
//! the healthy leader's next AppendEntries carries that higher term and the leader steps
//! down (openraft `replication`: `HigherVote`), so every return of such a node costs each of
//! its groups an election and a pause of writes. Independent fault runs saw terms climb to
//! hundreds in twenty minutes.
//!
//! How. With `prevote` on (the default), openraft's own election timer is off
//! (`enable_elect = false`) and [`spawn`]'s task decides instead, for every group this node
//! votes in:
//!
//! - A follower that has not heard from a leader (an AppendEntries or snapshot it accepted,
//!   [`Contact::note`]) for a randomized election timeout asks the other voters "would you
//!   vote?" ([`Kind::PreVote`], on the pipe or unary). It changes nothing on either side.
//! - A voter says yes only if it has not heard from a leader for `election_timeout_max`
//!   itself, and, if it is the leader, if no quorum acknowledged it for that long. That is
//!   openraft's own leader lease: a voter refuses a real vote for that long after its last
//!   AppendEntries, so a pre-vote won any earlier would start an election bound to fail,
//!   and every failed one raises the candidate's term.
//! - With yes from a majority (itself included) the node calls openraft's
//!   `trigger().elect()`; the real vote then runs as before (terms, log check). Without,
//!   it waits another randomized timeout. A single-voter group elects at once.
//!
//! So a node that comes back from isolation finds its peers hearing from their leader, gets
//! no majority and never raises its term: the leader stays. An older peer that does not
//! know the question counts as yes, as if it ran its own timer (rolling upgrades).
//!
//! Safety does not depend on this: delaying or skipping an election is always safe, and the
//! vote itself is openraft's. Liveness does: if a majority of voters is up and the leader is
//! gone, every follower's contact ages past the timeout, so some follower's question gets a
//! majority within about two election timeouts.

use super::network::Peers;
use super::pipe::Kind;
use crate::shard::{NodeId, ShardId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// When this node last heard from a leader of one group (ms on a process clock).
#[derive(Clone, Debug)]
pub struct Contact(Arc<AtomicU64>);

impl Default for Contact {
    /// Starting up counts as contact: a node waits one timeout before asking.
    fn default() -> Self {
        Self(Arc::new(AtomicU64::new(now_ms())))
    }
}

impl Contact {
    pub fn note(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    pub fn since(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.0.load(Ordering::Relaxed)))
    }
}

/// The question, as sent.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PreVote {
    pub candidate: NodeId,
}

/// A voter's answer to [`PreVote`] for `group` (see the module docs); `lease` is
/// `election_timeout_max`.
pub fn answer(node: NodeId, raft: &super::Raft, contact: &Contact, lease: Duration) -> bool {
    let m = raft.metrics().borrow().clone();
    if m.current_leader == Some(node) {
        return m.millis_since_quorum_ack.is_none_or(|ms| ms >= lease.as_millis() as u64);
    }
    contact.since() >= lease
}

/// What the election task needs of a group.
#[derive(Clone)]
pub struct Member {
    pub shard: ShardId,
    pub raft: super::Raft,
    pub contact: Contact,
    /// When this node (last) became the group's leader, ms on this module's clock; 0 while
    /// it is not the leader ([`leading_for`]).
    pub leading_since: Arc<AtomicU64>,
}

/// How long this node has led, as noted by the election task (at most one tick late);
/// `None` while it does not lead or no task notes it (`prevote` off).
pub fn leading_for(since: &AtomicU64) -> Option<Duration> {
    match since.load(Ordering::Relaxed) {
        0 => None,
        t => Some(Duration::from_millis(now_ms().saturating_sub(t))),
    }
}

/// Runs the elections of `groups` until `stop` (module docs).
pub fn spawn(
    node: NodeId,
    groups: Arc<dyn Fn() -> Vec<Member> + Send + Sync>,
    peers: Peers,
    timeouts: (Duration, Duration),
    metrics: crate::metrics::Metrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Ask after `max` (the voters' lease) plus a random share of `max - min`, so that
        // followers of a lost leader do not all ask at once.
        let (min, max) = timeouts;
        let pick = move || max + Duration::from_millis(rand::random::<u64>() % (max - min).as_millis().max(1) as u64);
        // Per group (groups come and go with replica moves).
        let mut wait: HashMap<ShardId, Duration> = HashMap::new();
        // No new question before this, whatever the contact (a lost pre-vote waits a fresh
        // randomized timeout; this node's own asking is not leader contact, so it does not
        // make it refuse its peers' questions meanwhile).
        let mut next_try: HashMap<ShardId, Instant> = HashMap::new();
        // One question per group at a time; questions of different groups run side by
        // side, so a dead voter's silence (up to `rpc_timeout` per question) delays no
        // other group's election.
        let mut asking: HashMap<ShardId, Arc<AtomicBool>> = HashMap::new();
        let mut questions = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                Some(_) = questions.join_next(), if !questions.is_empty() => continue,
                _ = stop.wait_for(|s| *s) => return,
            }
            let members = groups();
            wait.retain(|s, _| members.iter().any(|g| g.shard == *s));
            next_try.retain(|s, _| members.iter().any(|g| g.shard == *s));
            asking.retain(|s, _| members.iter().any(|g| g.shard == *s));
            for g in &members {
                let busy = asking.entry(g.shard).or_insert_with(|| Arc::new(AtomicBool::new(false))).clone();
                if busy.load(Ordering::Acquire) {
                    continue;
                }
                let w = *wait.entry(g.shard).or_insert_with(pick);
                let next = *next_try.entry(g.shard).or_insert_with(Instant::now);
                let m = g.raft.metrics().borrow().clone();
                if m.current_leader == Some(node) {
                    if g.leading_since.load(Ordering::Relaxed) == 0 {
                        g.leading_since.store(now_ms().max(1), Ordering::Relaxed);
                    }
                    // A leader is in contact with itself: when it steps down (a leadership
                    // transfer, a higher term) it waits a whole timeout before asking, rather
                    // than at once (it would win against the leader that just took over, which
                    // has no quorum acknowledgement yet, and undo the transfer).
                    g.contact.note();
                    continue;
                }
                g.leading_since.store(0, Ordering::Relaxed);
                if g.contact.since() < w || Instant::now() < next {
                    continue;
                }
                let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
                if !voters.contains(&node) {
                    continue;
                }
                // Whatever comes of it, the next try waits another randomized timeout.
                let w = pick();
                wait.insert(g.shard, w);
                next_try.insert(g.shard, Instant::now() + w);
                busy.store(true, Ordering::Release);
                let (g, peers, metrics) = (g.clone(), peers.clone(), metrics.clone());
                questions.spawn(async move {
                    let won = majority_says_yes(&peers, &voters, node, g.shard, max).await;
                    metrics.prevotes.with_label_values(&[if won { "won" } else { "lost" }]).inc();
                    if won {
                        tracing::debug!(shard = g.shard, voters = voters.len(), "pre-vote won; starting an election");
                        if let Err(e) = g.raft.trigger().elect().await {
                            tracing::debug!(shard = g.shard, cause = %e, "election not started");
                        }
                    }
                    busy.store(false, Ordering::Release);
                });
            }
        }
    })
}

/// Asks every other voter at once and returns as soon as the outcome is known: a majority
/// (this node included) said yes, or too few answers are left to make one.
async fn majority_says_yes(peers: &Peers, voters: &[NodeId], node: NodeId, shard: ShardId, within: Duration) -> bool {
    use futures::StreamExt;
    let mut asks: futures::stream::FuturesUnordered<_> =
        voters.iter().filter(|v| **v != node).map(|v| ask(peers, *v, shard, node, within)).collect();
    let (mut yes, mut pending) = (1usize, asks.len());
    loop {
        if yes * 2 > voters.len() {
            return true;
        }
        if (yes + pending) * 2 <= voters.len() {
            return false;
        }
        match asks.next().await {
            Some(y) => {
                pending -= 1;
                yes += usize::from(y);
            }
            None => return false,
        }
    }
}

/// Asks `voter`; no answer (down, cut off, timeout) is a no, an older peer's "unknown call"
/// a yes.
async fn ask(peers: &Peers, voter: NodeId, shard: ShardId, candidate: NodeId, within: Duration) -> bool {
    let Ok(payload) = serde_json::to_vec(&PreVote { candidate }) else { return false };
    let ttl = within.min(peers.rpc_timeout()).max(Duration::from_millis(100));
    match tokio::time::timeout(ttl, peers.call_raw(voter, Kind::PreVote, shard, ttl, payload)).await {
        Ok(Ok(reply)) => serde_json::from_slice::<bool>(&reply).unwrap_or(false),
        Ok(Err(super::network::RawError::UnknownCall)) => true,
        _ => false,
    }
}
