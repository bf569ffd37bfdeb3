//! A raftchat node: its shard groups, the router to shard leaders and the background tasks.
//! [`crate::server::run`] builds one and hands it to the API listeners; nothing here names
//! the API.
//!
//! - [`router`]: [`ShardOp`](router::ShardOp)s and [`Node::call`], which runs one on the
//!   shard's leader (locally or forwarded).
//! - [`ops`]: what a leader does with an op: propose, linearizable read, coordinated send.
//! - [`admission`]: the node's adaptive limit on in-flight client sends.
//! - [`send`]: the coordinated send and its outbox (confirmation, re-drive after a crash).
//! - [`shard_handle`]: per local shard: proposing, batching, admission, linearizable reads.
//! - [`peer_service`]: the gRPC service peers call (Raft RPCs, forwarded ops).
//! - [`local`]: the shards this node hosts now; [`membership`]: replica moves (hosting and
//!   dropping shards at runtime, routing to where a shard went); [`directory`]: the
//!   replicated node table (joining and leaving without restarts); [`repair`]:
//!   re-replication after a node dies; [`placement_lock`]: one placement change (an
//!   operator's command, or re-replication) at a time.

pub mod admission;
pub mod balance;
pub mod directory;
pub mod inbox;
pub mod local;
pub mod membership;
pub mod ops;
pub mod peer_service;
pub mod placement_lock;
pub mod rate_limit;
pub mod repair;
pub mod retention;
pub mod router;
pub mod send;
pub mod shard_handle;

use crate::auth::Keys;
use crate::chat::{Command, ConversationId, UserId};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::raft::network::Peers;
use crate::shard::{NodeId, Placement, ShardId};
use router::{ShardError, ShardOp, ShardReply};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// The state every request handler and background task of a node shares.
pub struct Node {
    pub id: NodeId,
    pub cfg: Config,
    pub placement: Placement,
    pub keys: Keys,
    pub peers: Peers,
    /// The cluster's node table and this node's address book ([`directory`]).
    pub directory: directory::Directory,
    pub metrics: Metrics,
    /// The shards this node hosts: each one's group, and its proposing, batching,
    /// admission and linearizable reads.
    pub local: local::Local,
    /// What hosting and dropping shards at runtime needs (replica moves).
    pub(crate) kit: membership::Kit,
    /// Where shards this node does not host went, as last learnt: (index of the membership
    /// entry, its voters). See [`membership`].
    pub(crate) routes: Mutex<HashMap<ShardId, (u64, Vec<NodeId>)>>,
    /// Node-wide admission of client sends (an adaptive limit, see [`admission`]).
    pub admission: Arc<admission::Limiter>,
    /// Per-user send rate (`user_send_rate`, `user_send_burst`).
    pub send_rate: rate_limit::PerUser,
    /// Failed logins per user id and per client address (`login_failures_per_*`).
    pub login_failures: rate_limit::LoginFailures,
    pub(crate) leader_hints: Mutex<HashMap<ShardId, NodeId>>,
    pub(crate) known_users: Mutex<HashSet<UserId>>,
    /// Users' token revocation marks as last read, and when (see [`Node::token_revoked`]).
    pub(crate) revocations: Mutex<HashMap<UserId, (u64, std::time::Instant)>>,
    pub(crate) outbox_done: mpsc::UnboundedSender<(ShardId, ConversationId, u64)>,
    /// The placement lease, as this node keeps it while it leads shard 0.
    pub(crate) placement_lock: placement_lock::PlacementLock,
    /// Test-only fault injection (`RAFTCHAT_FAULT`), see `docs/operations.md`.
    pub(crate) fault: Option<String>,
    /// Becomes true when the node starts shutting down (long-lived sessions close).
    pub stopping: watch::Receiver<bool>,
}

impl Node {
    /// This node's answer to a peer's pre-vote for `group` (`raft::prevote`).
    pub fn pre_vote_answer(&self, group: &crate::raft::group::Group) -> bool {
        let lease = Duration::from_millis(self.cfg.election_timeout_max_ms);
        self.votes_in(group) && crate::raft::prevote::answer(self.id, &group.raft, &group.contact, lease)
    }

    /// Whether this node may vote in `group`: it is a voter by the group's own membership. A group that
    /// came by a replica move starts empty, and openraft grants a vote on the log alone; an
    /// empty (or never promoted) replica must not count towards anyone's majority, or a
    /// stale candidate could win with it (`node::membership`).
    pub fn votes_in(&self, group: &crate::raft::group::Group) -> bool {
        let m = group.raft.metrics().borrow().membership_config.clone();
        let mut voters = m.membership().voter_ids().peekable();
        // A group of the cluster's creation that no leader reached yet votes as ever (the
        // first election needs it); one that came by a move waits for its membership.
        if voters.peek().is_none() {
            return !group.from_move;
        }
        voters.any(|v| v == self.id)
    }

    pub fn request_deadline(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.cfg.request_timeout_ms)
    }

    /// Where the shard's leader probably is: this node's own Raft view when it replicates
    /// the shard (it follows elections), else the last leader that answered.
    fn leader_hint(&self, shard: ShardId) -> Option<NodeId> {
        if let Some(g) = self.local.group(shard) {
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

    pub(crate) fn remember_user(&self, u: &UserId) {
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

    /// Refuses a feature of cluster version `v` while `cluster_version` is below it (a rolling
    /// upgrade is under way: older nodes could not apply its commands).
    pub fn require_version(&self, v: u32, what: &str) -> Result<(), crate::api::ApiError> {
        if self.cfg.cluster_version >= v {
            return Ok(());
        }
        Err(crate::api::ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "upgrade_in_progress",
            format!(
                "{what} needs cluster_version {v}; this node runs with {} until every node is upgraded",
                self.cfg.cluster_version
            ),
        ))
    }

    /// Whether `who`'s token was issued before its user's revocation mark (a password change
    /// or "log out everywhere"). The mark is read from the user's shard (this node's own
    /// replica when it has one, else its leader) and reused for `revocation_check_secs`, so a
    /// revocation reaches every node within that; when the shard cannot be read, the last
    /// mark read is used, and with none the check fails.
    pub async fn token_revoked(self: &Arc<Self>, who: &crate::auth::Principal) -> Result<bool, ShardError> {
        if self.cfg.cluster_version < 2 {
            // No revocation can exist before version 2 (and older nodes cannot be asked).
            return Ok(false);
        }
        let ttl = Duration::from_secs(self.cfg.revocation_check_secs);
        let mark = self.revocation_mark(&who.user, ttl).await?;
        // A mark is a second: tokens issued in it or before are refused (so tokens minted
        // here afterwards start one second later, see `api::accounts`).
        Ok(mark > 0 && who.iat <= mark)
    }

    /// `user`'s revocation mark, read again when the one cached is older than `max_age`.
    pub async fn revocation_mark(self: &Arc<Self>, user: &UserId, max_age: Duration) -> Result<u64, ShardError> {
        use crate::chat::state::Store as _;
        let ttl = max_age;
        let cached = self.revocations.lock().unwrap_or_else(|p| p.into_inner()).get(user).copied();
        let before = match cached {
            Some((b, at)) if at.elapsed() < ttl => b,
            _ => {
                let shard = self.placement.shard_of_user(user);
                // A fresh read (max_age zero) is linearizable, through the shard's leader;
                // otherwise this node's own replica is close enough.
                // Only a voter that hears from its leader: a replica still filling up after a
                // move, or one left behind, could say "never revoked".
                let lease = Duration::from_millis(self.cfg.election_timeout_max_ms);
                let local = self.local.group(shard).filter(|g| {
                    !max_age.is_zero()
                        && self.votes_in(g)
                        && (g.raft.metrics().borrow().current_leader == Some(self.id) || g.contact.since() < lease)
                });
                let read = match local {
                    Some(g) => g.sm.view.revoked_before(user).map_err(|e| ShardError::Storage(e.to_string())),
                    None => {
                        let op = ShardOp::RevokedBefore { user: user.clone() };
                        match self.call(shard, op, Instant::now() + Duration::from_secs(2)).await {
                            Ok(ShardReply::LastSeq(b)) => Ok(b),
                            Ok(other) => Err(ShardError::Storage(format!("unexpected reply {other:?}"))),
                            Err(e) => Err(e),
                        }
                    }
                };
                match (read, cached) {
                    (Ok(b), _) => {
                        self.note_revocation(user, b);
                        b
                    }
                    (Err(_), Some((b, _))) => b,
                    (Err(e), None) => return Err(e),
                }
            }
        };
        Ok(before)
    }

    /// Remembers `user`'s revocation mark (read, or just written by this node).
    pub(crate) fn note_revocation(&self, user: &UserId, before: u64) {
        let mut r = self.revocations.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() > 1_000_000 {
            r.clear();
        }
        let now = std::time::Instant::now();
        let e = r.entry(user.clone()).or_insert((before, now));
        *e = (e.0.max(before), now);
    }

    /// Shards of this node that have no known leader.
    pub fn shards_without_leader(&self) -> Vec<ShardId> {
        let mut v: Vec<ShardId> = self
            .local
            .groups()
            .iter()
            .filter(|g| g.raft.metrics().borrow().current_leader.is_none())
            .map(|g| g.shard)
            .collect();
        v.sort_unstable();
        v
    }

    /// Copies openraft's per-shard metrics into the Prometheus gauges.
    pub fn refresh_metrics(&self) {
        let m = &self.metrics;
        for g in self.local.groups() {
            let rm = g.raft.metrics().borrow().clone();
            let s = g.shard.to_string();
            let l = [s.as_str()];
            m.shard_leader.with_label_values(&l).set(i64::from(rm.current_leader == Some(self.id)));
            m.shard_term.with_label_values(&l).set(rm.current_term as i64);
            m.shard_commit.with_label_values(&l).set(g.committed() as i64);
            m.shard_applied.with_label_values(&l).set(rm.last_applied.map(|x| x.index as i64).unwrap_or(0));
            m.shard_last_log.with_label_values(&l).set(rm.last_log_index.map(|x| x as i64).unwrap_or(0));
            m.shard_snapshot.with_label_values(&l).set(rm.snapshot.map(|x| x.index as i64).unwrap_or(0));
            m.shard_snapshot_bytes.with_label_values(&l).set(shard_snapshot_bytes(&self.cfg.data_dir, g.shard) as i64);
            // On the leader: how far each follower's matched log is behind the leader's
            // last entry. Gone (not stale) on a node that no longer leads the shard.
            let last = rm.last_log_index.unwrap_or(0);
            for follower in self.replicas(g.shard) {
                if follower == self.id {
                    continue;
                }
                let labels = [s.as_str(), &follower.to_string()];
                match rm.replication.as_ref() {
                    Some(r) => {
                        let matched = r.get(&follower).and_then(|m| m.map(|l| l.index)).unwrap_or(0);
                        m.replication_lag.with_label_values(&labels).set(last.saturating_sub(matched) as i64);
                    }
                    None => {
                        let _ = m.replication_lag.remove_label_values(&labels);
                    }
                }
            }
        }
        for (part, bytes) in disk_usage(&self.cfg.data_dir) {
            m.disk_bytes.with_label_values(&[part]).set(bytes as i64);
        }
        m.admission_limit.set(self.admission.limit() as i64);
        m.admission_inflight.set(self.admission.inflight() as i64);
    }
}

/// Bytes on disk of a node's data folder: the write-ahead log (`wal`), sled (`db`), the
/// shards' snapshot files (`snapshots`).
pub fn disk_usage(dir: &std::path::Path) -> [(&'static str, u64); 3] {
    [("wal", walk(&dir.join("wal"))), ("db", walk(&dir.join("db"))), ("snapshots", walk(&dir.join("snapshots")))]
}

/// Bytes of shard `shard`'s snapshot files on this node: its whole state as of its last
/// snapshot (plus a build or receive in progress). The live state shares one sled database
/// and one write-ahead log with the node's other shards, which neither divides by shard.
pub fn shard_snapshot_bytes(dir: &std::path::Path, shard: ShardId) -> u64 {
    walk(&dir.join("snapshots").join(format!("s{shard}")))
}

fn walk(p: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(p) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => walk(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
