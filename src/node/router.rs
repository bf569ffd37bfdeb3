//! Routing shard operations to the shard's leader, wherever it is.
//!
//! [`Node::call`] runs an operation on the leader of its shard: locally when this node
//! leads, otherwise forwarded over gRPC. A "not leader" answer with a hint is followed at
//! once; no hint, an unreachable peer or a shard without a leader is retried on the next
//! replica with a capped backoff until the request's deadline. A forwarded attempt gets at
//! most twice `rpc_timeout`, so a frozen or partitioned node costs one attempt, not the whole
//! request. Every operation is idempotent (see [`crate::chat::command`]), so a retry after a
//! lost or late reply is safe.

use super::Node;
use crate::chat::{Command, ConversationId, IndexEntry, Message, Reply, UserId};
use crate::pb;
use crate::raft::pipe::{Kind as PipeKind, PipeError};
use crate::shard::{NodeId, ShardId};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// An operation on one shard, executed by its leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ShardOp {
    /// Propose a command as is.
    Write(Command),
    /// The coordinated send, run by the conversation shard's leader.
    Send {
        from: UserId,
        to: UserId,
        client_msg_id: String,
        text: String,
        /// Random id of the client request, kept across the router's retries (see
        /// `Command::Append::attempt`).
        attempt: u64,
        /// Set by the router once an earlier try of this request may have been written (a
        /// timeout or a lost reply): the request was admitted then, so this try is not
        /// refused as overload, which would tell the client "not written" about a message
        /// that may be stored.
        #[serde(default)]
        admitted: bool,
    },
    /// Linearizable reads.
    History {
        conversation: ConversationId,
        before: Option<u64>,
        after: Option<u64>,
        limit: u32,
    },
    Recent {
        user: UserId,
        cursor: Option<Vec<u8>>,
        limit: u32,
    },
    LastSeq {
        conversation: ConversationId,
    },
    UserExists {
        user: UserId,
    },
    /// Number of the user's last inbox event (delivery starts after it).
    InboxLast {
        user: UserId,
    },
    /// The user's password account (hash, generation, sessions), for a login.
    Account {
        user: UserId,
    },
    /// When the user's tokens were last revoked (seconds; 0: never).
    RevokedBefore {
        user: UserId,
    },
    /// Move the shard's leadership to node `to` (run by the leader; `node::balance`).
    /// The shard's membership, as its leader sees it after a linearizable check.
    Members,
    /// A replica move's step on the leader (`node::membership`): `to` joins as a learner,
    /// catches up and replaces `from` among the voters.
    ChangeReplica {
        from: NodeId,
        to: NodeId,
    },
    TransferLeader {
        to: NodeId,
    },
    /// The cluster's node table (a linearizable read of the directory shard).
    Nodes,
    /// The placement lease, kept by the directory shard's leader (`node::placement_lock`).
    PlacementLock(super::placement_lock::LockOp),
}

impl ShardOp {
    /// See `ShardOp::Send::admitted`.
    fn mark_admitted(&mut self) {
        if let ShardOp::Send { admitted, .. } = self {
            *admitted = true;
        }
    }

    /// Reads change nothing and are served after a leadership check.
    pub fn is_read(&self) -> bool {
        !matches!(
            self,
            ShardOp::Write(_)
                | ShardOp::Send { .. }
                | ShardOp::TransferLeader { .. }
                | ShardOp::Members
                | ShardOp::ChangeReplica { .. }
                | ShardOp::PlacementLock(_)
        )
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ShardOp::Write(c) => c.kind(),
            ShardOp::Send { .. } => "send",
            ShardOp::History { .. } => "history",
            ShardOp::Recent { .. } => "recent",
            ShardOp::LastSeq { .. } => "last_seq",
            ShardOp::UserExists { .. } => "user_exists",
            ShardOp::InboxLast { .. } => "inbox_last",
            ShardOp::Account { .. } => "account",
            ShardOp::RevokedBefore { .. } => "revoked_before",
            ShardOp::TransferLeader { .. } => "transfer_leader",
            ShardOp::Members => "members",
            ShardOp::ChangeReplica { .. } => "change_replica",
            ShardOp::Nodes => "nodes",
            ShardOp::PlacementLock(_) => "placement_lock",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ShardReply {
    Written(Reply),
    Sent {
        conversation: ConversationId,
        seq: u64,
        ts: u64,
        duplicate: bool,
    },
    History {
        last_seq: u64,
        messages: Vec<Message>,
    },
    Recent {
        items: Vec<(ConversationId, IndexEntry)>,
        next: Option<Vec<u8>>,
    },
    LastSeq(u64),
    Exists(bool),
    Account(Option<crate::chat::Account>),
    /// The shard's leader after a transfer.
    Leader(NodeId),
    Members(super::membership::Members),
    Nodes(Vec<crate::chat::NodeRecord>),
    Lock(super::placement_lock::LockAnswer),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ShardError {
    #[error("this node does not lead shard {shard}")]
    NotLeader { shard: ShardId, leader: Option<NodeId> },
    #[error("this node does not replicate shard {shard}")]
    NotReplica { shard: ShardId },
    /// This node gave the shard away; these are its voters since membership entry `index`.
    #[error("shard {shard} moved away from this node (to nodes {voters:?})")]
    Moved { shard: ShardId, index: u64, voters: Vec<NodeId> },
    #[error("shard {shard} is unavailable: {reason}")]
    Unavailable { shard: ShardId, reason: String },
    #[error("shard {shard} did not answer before the deadline; the outcome is unknown")]
    Timeout { shard: ShardId },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{0}")]
    Invalid(String),
    #[error("storage failure: {0}")]
    Storage(String),
    #[error("shard {shard} is overloaded: retry after {retry_after_ms} ms")]
    Overloaded { shard: ShardId, retry_after_ms: u64 },
}

impl ShardError {
    /// The operation may or may not have taken effect (unlike a refusal or a redirect,
    /// which are given before anything is proposed).
    fn outcome_unknown(&self) -> bool {
        matches!(self, ShardError::Timeout { .. } | ShardError::Unavailable { .. })
    }

    fn retryable(&self) -> bool {
        matches!(
            self,
            ShardError::NotLeader { .. }
                | ShardError::NotReplica { .. }
                | ShardError::Moved { .. }
                | ShardError::Unavailable { .. }
        )
    }
}

const MAX_BACKOFF: Duration = Duration::from_millis(400);

impl Node {
    /// Runs `op` on the leader of `shard`, following leader changes until `deadline`.
    pub fn call(
        self: &Arc<Self>,
        shard: ShardId,
        op: ShardOp,
        deadline: Instant,
    ) -> BoxFuture<'static, Result<ShardReply, ShardError>> {
        let node = self.clone();
        Box::pin(async move {
            #[cfg(feature = "fault-stale-reads")]
            if op.is_read() {
                if let Some(group) = node.local.group(shard) {
                    return node.read_local(&group, op);
                }
            }
            let mut op = op;
            let mut replicas = node.replicas(shard);
            let mut target = node.pick_target(&replicas, node.leader_hint(shard), 0);
            let mut backoff = Duration::from_millis(10);
            let mut attempt = 0usize;
            let mut hops = 0usize;
            let mut located = false;
            loop {
                if Instant::now() >= deadline {
                    return Err(ShardError::Timeout { shard });
                }
                let res = if target == node.id {
                    node.execute_local(shard, op.clone(), deadline).await
                } else {
                    node.forward(target, shard, &op, deadline).await
                };
                match res {
                    Ok(r) => {
                        node.set_leader_hint(shard, Some(target));
                        return Ok(r);
                    }
                    Err(ShardError::NotLeader { leader: Some(l), .. })
                        if l != target && hops < 4 && (l == node.id || !node.peers.suspect(l)) =>
                    {
                        hops += 1;
                        target = l;
                    }
                    // No route here, and the guess held no replica: ask the peers once.
                    Err(ShardError::NotReplica { .. }) if !located => {
                        located = true;
                        node.locate(shard, deadline).await;
                        replicas = node.replicas(shard);
                        node.set_leader_hint(shard, None);
                        attempt += 1;
                        target = node.pick_target(&replicas, None, attempt);
                    }
                    // The shard moved: follow it at once (a chain of moves is a few hops).
                    Err(ShardError::Moved { index, voters, .. }) if hops < 8 && !voters.is_empty() => {
                        hops += 1;
                        node.learn_route(shard, index, voters);
                        replicas = node.replicas(shard);
                        node.set_leader_hint(shard, None);
                        target = node.pick_target(&replicas, None, 0);
                    }
                    Err(e)
                        if e.retryable() || (matches!(e, ShardError::Timeout { .. }) && Instant::now() < deadline) =>
                    {
                        tracing::debug!(shard, target, cause = %e, "retrying shard operation");
                        if e.outcome_unknown() {
                            op.mark_admitted();
                        }
                        node.set_leader_hint(shard, None);
                        hops = 0;
                        attempt += 1;
                        replicas = node.replicas(shard);
                        target = node.pick_target(&replicas, None, attempt);
                        let left = deadline.saturating_duration_since(Instant::now());
                        tokio::time::sleep(backoff.min(left)).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }

    /// `preferred` unless it is a peer that recently stopped answering; otherwise the first
    /// healthy replica counting from `attempt`.
    fn pick_target(&self, replicas: &[NodeId], preferred: Option<NodeId>, attempt: usize) -> NodeId {
        let healthy = |n: NodeId| n == self.id || !self.peers.suspect(n);
        if let Some(p) = preferred.filter(|p| healthy(*p)) {
            return p;
        }
        let n = replicas.len();
        (0..n).map(|i| replicas[(attempt + i) % n]).find(|r| healthy(*r)).unwrap_or(replicas[attempt % n])
    }

    async fn forward(
        &self,
        target: NodeId,
        shard: ShardId,
        op: &ShardOp,
        deadline: Instant,
    ) -> Result<ShardReply, ShardError> {
        let unavailable = |reason: String| ShardError::Unavailable { shard, reason };
        // One attempt may not use the whole budget: a frozen or cut-off node keeps its TCP
        // connection open and would hold the request until the deadline, while another
        // replica could already be leading.
        let budget = deadline.saturating_duration_since(Instant::now()).min(self.peers.rpc_timeout() * 2);
        let op_bytes = serde_json::to_vec(op).map_err(|e| ShardError::Invalid(e.to_string()))?;
        let mark = self.peers.mark();
        let piped = self.peers.pipe_usable(target);
        self.peers.count_call(piped, PipeKind::Forward);
        let rpc = async {
            if piped {
                self.peers.pipe_call(target, PipeKind::Forward, shard, budget, op_bytes).await.map_err(|e| match e {
                    // An older peer: the call did not happen; the caller's retry goes unary.
                    PipeError::Unsupported => (false, e.to_string()),
                    e => (true, e.to_string()),
                })
            } else {
                let msg = pb::ForwardRequest { shard, op: op_bytes, budget_ms: budget.as_millis() as u64 };
                let mut client = self.peers.client(target).map_err(|e| (true, e.to_string()))?;
                match client.forward(self.peers.request(target, msg, budget)).await {
                    Ok(r) => Ok(r.into_inner().payload),
                    Err(status) => Err((true, status.message().to_string())),
                }
            }
        };
        let rpc = tokio::time::timeout(budget, rpc);
        // Give up early when Raft traffic shows the peer stopped answering meanwhile.
        let stopped = async {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if self.peers.failed_since(target, mark) {
                    return;
                }
            }
        };
        let outcome = tokio::select! {
            r = rpc => r,
            _ = stopped => {
                self.metrics.forwards.with_label_values(&["peer_stopped"]).inc();
                return Err(unavailable(format!("node {target} stopped answering")));
            }
        };
        let payload = match outcome {
            Ok(Ok(p)) => p,
            Ok(Err((failed, cause))) => {
                self.metrics.forwards.with_label_values(&["transport_error"]).inc();
                if failed {
                    self.peers.note_failure(target, &cause);
                }
                return Err(unavailable(format!("node {target}: {cause}")));
            }
            Err(_) => {
                self.metrics.forwards.with_label_values(&["timeout"]).inc();
                self.peers.note_failure(target, &format_args!("no answer within {budget:?}"));
                return Err(unavailable(format!("node {target} did not answer within {budget:?}")));
            }
        };
        self.peers.note_ok(target);
        self.metrics.forwards.with_label_values(&["ok"]).inc();
        serde_json::from_slice::<Result<ShardReply, ShardError>>(&payload)
            .map_err(|e| unavailable(format!("node {target} sent an undecodable reply: {e}")))?
    }
}
