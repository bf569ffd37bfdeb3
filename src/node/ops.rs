//! Shard operations executed on this node when it leads the shard: proposals, batched
//! linearizable reads, and the coordinated cross-shard send.

use super::router::{ShardError, ShardOp, ShardReply};
use super::Node;
use crate::chat::types::preview;
use crate::chat::{Command, ConversationId, Reply, UserId};
use crate::raft::group::Group;
use crate::shard::ShardId;
use crate::storage::keys;
use crate::storage::sm::now_ms;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

/// Fault injection for tests (`RAFTCHAT_FAULT=crash-after-append`): the coordinator aborts
/// between the message commit and the index updates of a message whose text contains
/// [`CRASH_MARKER`]. Off unless the variable is set.
pub const CRASH_AFTER_APPEND: &str = "crash-after-append";
pub const CRASH_MARKER: &str = "[crash-after-append]";

/// Batches linearizable reads: every read waits for one leadership check that *started*
/// after the read arrived; concurrent reads share it (openraft 0.9 sends a heartbeat round
/// per `ensure_linearizable` call).
#[derive(Default)]
pub struct ReadBarrier {
    started: AtomicU64,
    last_ok: tokio::sync::Mutex<u64>,
}

fn storage_err(e: impl std::fmt::Display) -> ShardError {
    ShardError::Storage(e.to_string())
}

impl Node {
    pub(crate) async fn execute_local(
        self: &Arc<Self>,
        shard: ShardId,
        op: ShardOp,
        deadline: Instant,
    ) -> Result<ShardReply, ShardError> {
        let Some(group) = self.groups.get(&shard) else {
            return Err(ShardError::NotReplica { shard });
        };
        match op {
            ShardOp::Write(cmd) => self.propose(group, cmd, deadline).await.map(ShardReply::Written),
            ShardOp::Send { from, to, client_msg_id, text } => {
                self.coordinate_send(group, from, to, client_msg_id, text, deadline).await
            }
            read => {
                self.linearize(group, deadline).await?;
                self.read_local(group, read)
            }
        }
    }

    /// Proposes `cmd` through the shard's Raft log and waits until it is applied here.
    pub(crate) async fn propose(&self, group: &Group, cmd: Command, deadline: Instant) -> Result<Reply, ShardError> {
        let shard = group.shard;
        let kind = cmd.kind();
        let start = std::time::Instant::now();
        let res = tokio::time::timeout_at(deadline, group.raft.client_write(cmd)).await;
        match res {
            Err(_) => Err(ShardError::Timeout { shard }),
            Ok(Ok(resp)) => {
                self.metrics.proposal_seconds.with_label_values(&[kind]).observe(start.elapsed().as_secs_f64());
                Ok(resp.data)
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(ShardError::NotLeader { shard, leader: f.leader_id })
            }
            Ok(Err(e)) => Err(ShardError::Unavailable { shard, reason: e.to_string() }),
        }
    }

    /// Returns once this node is confirmed leader by a quorum after the call began and has
    /// applied everything committed before it.
    pub(crate) async fn linearize(&self, group: &Group, deadline: Instant) -> Result<(), ShardError> {
        let shard = group.shard;
        let barrier = &self.barriers[&shard];
        let arrival = barrier.started.load(Ordering::SeqCst);
        let fut = async {
            let mut last_ok = barrier.last_ok.lock().await;
            if *last_ok > arrival {
                return Ok(());
            }
            let id = barrier.started.fetch_add(1, Ordering::SeqCst) + 1;
            match group.raft.ensure_linearizable().await {
                Ok(_) => {
                    *last_ok = id;
                    Ok(())
                }
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    Err(ShardError::NotLeader { shard, leader: f.leader_id })
                }
                Err(e) => Err(ShardError::Unavailable { shard, reason: e.to_string() }),
            }
        };
        tokio::time::timeout_at(deadline, fut).await.map_err(|_| ShardError::Timeout { shard })?
    }

    pub(crate) fn read_local(&self, group: &Group, op: ShardOp) -> Result<ShardReply, ShardError> {
        use crate::chat::state::Store;
        let view = &group.sm.view;
        match op {
            ShardOp::History { conversation, before, after, limit } => {
                let meta = view
                    .conv_meta(&conversation)
                    .map_err(storage_err)?
                    .ok_or_else(|| ShardError::NotFound { what: format!("conversation {conversation}") })?;
                let last = meta.last_seq;
                let limit = u64::from(limit.max(1));
                let (lo, hi) = match (before, after) {
                    (_, Some(a)) => (a.saturating_add(1), a.saturating_add(limit).min(last)),
                    (Some(b), None) => (b.saturating_sub(limit).max(1), b.saturating_sub(1).min(last)),
                    (None, None) => (last.saturating_sub(limit) + 1, last),
                };
                let messages = if lo > hi {
                    Vec::new()
                } else if let Some(page) = group.sm.cache.range(&conversation, lo, hi, now_ms()) {
                    page
                } else {
                    view.messages(&conversation, lo, hi).map_err(storage_err)?
                };
                Ok(ShardReply::History { last_seq: last, messages })
            }
            ShardOp::Recent { user, cursor, limit } => {
                let prefix = keys::order_prefix(&user);
                let after = cursor.map(|c| [prefix.as_slice(), c.as_slice()].concat());
                let mut rows = view.recent(&user, after, limit as usize + 1).map_err(storage_err)?;
                let more = rows.len() > limit as usize;
                rows.truncate(limit as usize);
                let next = if more { rows.last().map(|(_, _, k)| k[prefix.len()..].to_vec()) } else { None };
                Ok(ShardReply::Recent { items: rows.into_iter().map(|(c, e, _)| (c, e)).collect(), next })
            }
            ShardOp::LastSeq { conversation } => {
                let meta = view.conv_meta(&conversation).map_err(storage_err)?;
                meta.map(|m| ShardReply::LastSeq(m.last_seq))
                    .ok_or_else(|| ShardError::NotFound { what: format!("conversation {conversation}") })
            }
            ShardOp::UserExists { user } => Ok(ShardReply::Exists(view.user_exists(&user).map_err(storage_err)?)),
            ShardOp::InboxLast { user } => Ok(ShardReply::LastSeq(view.inbox_last(&user).map_err(storage_err)?)),
            ShardOp::Write(_) | ShardOp::Send { .. } => Err(ShardError::Invalid("not a read".into())),
        }
    }

    /// The send protocol: commit the message on the conversation shard, then both users'
    /// index updates on their shards; only then acknowledge. A crash in between leaves an
    /// outbox entry that the shard's next leader re-drives.
    async fn coordinate_send(
        self: &Arc<Self>,
        group: &Group,
        from: UserId,
        to: UserId,
        client_msg_id: String,
        text: String,
        deadline: Instant,
    ) -> Result<ShardReply, ShardError> {
        let start = std::time::Instant::now();
        let conversation = ConversationId::between(&from, &to).map_err(|e| ShardError::Invalid(e.to_string()))?;
        let cmd = Command::Append {
            conversation: conversation.clone(),
            from: from.clone(),
            to: to.clone(),
            client_msg_id,
            text: text.clone(),
            ts: now_ms(),
        };
        let Reply::Appended { seq, ts, duplicate } = self.propose(group, cmd, deadline).await? else {
            return Err(ShardError::Storage("append produced an unexpected reply".into()));
        };
        if self.fault.as_deref() == Some(CRASH_AFTER_APPEND) && !duplicate && text.contains(CRASH_MARKER) {
            tracing::error!(%conversation, seq, "fault injection: aborting between message commit and index updates");
            std::process::abort();
        }
        let preview = if duplicate {
            // The original's text, not the retry's.
            let m = group.sm.view.messages(&conversation, seq, seq).map_err(storage_err)?;
            m.first().map(|m| preview(&m.text)).unwrap_or_default()
        } else {
            preview(&text)
        };
        self.update_indexes(&conversation, &from, &to, seq, ts, &preview, deadline).await?;
        let _ = self.outbox_done.send((group.shard, conversation.clone(), seq));
        self.metrics.send_seconds.observe(start.elapsed().as_secs_f64());
        Ok(ShardReply::Sent { conversation, seq, ts, duplicate })
    }

    /// Commits the index updates of both participants (idempotent, safe to repeat).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn update_indexes(
        self: &Arc<Self>,
        conversation: &ConversationId,
        from: &UserId,
        to: &UserId,
        seq: u64,
        ts: u64,
        preview: &str,
        deadline: Instant,
    ) -> Result<(), ShardError> {
        let update = |user: &UserId| {
            let cmd = Command::IndexUpdate {
                user: user.clone(),
                conversation: conversation.clone(),
                from: from.clone(),
                seq,
                ts,
                preview: preview.to_string(),
            };
            self.call(self.placement.shard_of_user(user), ShardOp::Write(cmd), deadline)
        };
        let (a, b) = futures::join!(update(from), update(to));
        a?;
        b?;
        Ok(())
    }
}
