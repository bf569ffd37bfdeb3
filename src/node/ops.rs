//! Shard operations executed on this node when it leads the shard: proposals (through the
//! shard's [`ShardHandle`](super::shard_handle::ShardHandle)), linearizable reads served from
//! local state, and the entry into the coordinated send ([`super::send`]).

use super::router::{ShardError, ShardOp, ShardReply};
use super::shard_handle::Admission;
use super::Node;
use crate::chat::{Command, Reply};
use crate::raft::group::Group;
use crate::shard::ShardId;
use crate::storage::keys;
use crate::storage::sm::now_ms;
use std::sync::Arc;
use tokio::time::Instant;

pub(crate) fn storage_err(e: impl std::fmt::Display) -> ShardError {
    ShardError::Storage(e.to_string())
}

impl Node {
    pub(crate) async fn execute_local(
        self: &Arc<Self>,
        shard: ShardId,
        op: ShardOp,
        deadline: Instant,
    ) -> Result<ShardReply, ShardError> {
        let Some(handle) = self.local.handle(shard) else {
            return Err(match self.route(shard) {
                Some((index, voters)) => ShardError::Moved { shard, index, voters },
                None => ShardError::NotReplica { shard },
            });
        };
        match op {
            ShardOp::Write(cmd) => handle.propose(cmd, Admission::Internal, deadline).await.map(ShardReply::Written),
            ShardOp::Send { from, to, client_msg_id, text, attempt, admitted } => {
                let admission = if admitted { Admission::Internal } else { Admission::Client };
                self.coordinate_send(&handle, from, to, client_msg_id, text, attempt, admission, deadline).await
            }
            ShardOp::Members => self.members_local(shard, deadline).await.map(ShardReply::Members),
            ShardOp::ChangeReplica { from, to } => {
                self.change_replica_local(shard, from, to, deadline).await.map(ShardReply::Members)
            }
            ShardOp::TransferLeader { to } => {
                self.transfer_leader(shard, to, deadline).await.map(|()| ShardReply::Leader(to))
            }
            ShardOp::PlacementLock(op) => {
                if shard != super::directory::DIRECTORY_SHARD {
                    return Err(ShardError::Invalid(format!("the placement lock is kept by shard 0, not {shard}")));
                }
                handle.linearize(deadline).await?;
                Ok(ShardReply::Lock(self.placement_lock_here(op)))
            }
            read => {
                handle.linearize(deadline).await?;
                let _whole_entries = handle.group.sm.read_lock().await;
                self.read_local(&handle.group, read)
            }
        }
    }

    /// Proposes `cmd` on local shard `shard` (which this node must lead) and waits until it
    /// is applied here.
    pub(crate) async fn propose(
        &self,
        shard: ShardId,
        cmd: Command,
        admission: Admission,
        deadline: Instant,
    ) -> Result<Reply, ShardError> {
        let handle = self.local.handle(shard).ok_or(ShardError::NotReplica { shard })?;
        handle.propose(cmd, admission, deadline).await
    }

    /// See [`ShardHandle::linearize`](super::shard_handle::ShardHandle::linearize).
    pub(crate) async fn linearize(&self, shard: ShardId, deadline: Instant) -> Result<(), ShardError> {
        let handle = self.local.handle(shard).ok_or(ShardError::NotReplica { shard })?;
        handle.linearize(deadline).await
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
            ShardOp::Account { user } => Ok(ShardReply::Account(view.account(&user).map_err(storage_err)?)),
            ShardOp::RevokedBefore { user } => {
                Ok(ShardReply::LastSeq(view.revoked_before(&user).map_err(storage_err)?))
            }
            ShardOp::Nodes => Ok(ShardReply::Nodes(view.nodes().map_err(storage_err)?)),
            ShardOp::Write(_)
            | ShardOp::Send { .. }
            | ShardOp::TransferLeader { .. }
            | ShardOp::Members
            | ShardOp::ChangeReplica { .. }
            | ShardOp::PlacementLock(_) => Err(ShardError::Invalid("not a read".into())),
        }
    }
}
