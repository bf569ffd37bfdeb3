//! Commands replicated through a shard's Raft log, and their replies.
//!
//! Every command is idempotent, so the router may retry one after a leader change or a
//! lost reply without changing its effect: `Append` deduplicates on
//! `(conversation, from, client_msg_id)`, index updates merge by max seq, read markers
//! only move forward, registration and outbox completion are set operations.

use super::types::{ConversationId, NodeRecord, ReceiptKind, UserId};
use serde::{Deserialize, Serialize};

/// The `cluster_version` from which inbox events are proposed `uncounted`: applying them
/// does not write the user's inbox counter (`n/<user>`, one sled write per event on every
/// replica, two per message), because this build reads the number of a user's last event
/// from the last event itself. Builds before it read the counter, so while any node may run
/// one (a rolling upgrade at `cluster_version` 5), every event keeps it up to date.
pub const UNCOUNTED_VERSION: u32 = 6;

/// The `cluster_version` from which index updates are proposed `lazy_order`: a message
/// within [`crate::chat::types::ORDER_WINDOW_MS`] of the timestamp in its entry's recency
/// key leaves the key in place (two sled writes fewer per user per message on every
/// replica). Builds before it expect the key at the entry's `last_ts`, so the flag waits
/// until every node runs a build that knows it.
pub const LAZY_ORDER_VERSION: u32 = 7;

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Append a message to a conversation (on the conversation's shard).
    Append {
        conversation: ConversationId,
        from: UserId,
        to: UserId,
        client_msg_id: String,
        text: String,
        /// The proposing leader's clock, ms since the epoch; the applied ts never goes
        /// backwards within a conversation.
        ts: u64,
        /// Random id of the client request this proposal serves, the same for every
        /// internal retry of that request (router retries, re-forwarding). A repeated
        /// `client_msg_id` is reported as `duplicate` only when its attempt differs, i.e.
        /// when the client itself sent it again.
        #[serde(default)]
        attempt: u64,
    },
    /// Merge a message into `user`'s recent-conversations index (on the user's shard).
    IndexUpdate {
        user: UserId,
        conversation: ConversationId,
        from: UserId,
        seq: u64,
        ts: u64,
        preview: String,
        /// The inbox event this adds leaves the user's inbox counter alone (see
        /// [`UNCOUNTED_VERSION`]).
        #[serde(default, skip_serializing_if = "is_false")]
        uncounted: bool,
        /// The entry's recency key may stay where it is (see [`LAZY_ORDER_VERSION`]).
        #[serde(default, skip_serializing_if = "is_false")]
        lazy_order: bool,
    },
    /// Move `user`'s read marker in `conversation` forward to `seq` (on the user's shard).
    MarkRead { user: UserId, conversation: ConversationId, seq: u64 },
    /// The index updates of these messages are committed; drop them from the outbox.
    OutboxDone { items: Vec<(ConversationId, u64)> },
    /// Record that `user` exists (on the user's shard).
    Register { user: UserId },
    /// Create `user`'s password account (on the user's shard); registers the user too.
    /// `claim_existing` lets an operator give an account to a user registered without one.
    CreateAccount { user: UserId, password: String, claim_existing: bool },
    /// A login: a new session (refresh token hash `id`) for `user`, valid until `expires_ms`.
    AddSession { user: UserId, id: String, expires_ms: u64, now_ms: u64 },
    /// A refresh: session `old` is replaced by `new` if it is live at `now_ms`.
    RotateSession { user: UserId, old: String, new: String, expires_ms: u64, now_ms: u64 },
    /// A logout: session `id` ends (a no-op when it is gone already).
    EndSession { user: UserId, id: String },
    /// A password change: new hash, and every session of the user ends.
    SetPassword { user: UserId, password: String },
    /// Every token of `user` issued before `before` (seconds since the epoch) is refused
    /// from now on (on the user's shard). The mark only moves forward.
    RevokeTokens { user: UserId, before: u64 },
    /// Restore: write these records of a backup as they are (`raftchat admin restore`). The
    /// first chunk of a shard (`first`) is refused unless the shard holds no chat data yet,
    /// so a restore never mixes into a live shard.
    Ingest { records: Vec<(Vec<u8>, Vec<u8>)>, first: bool },
    /// Invite `invite` (its id) is used by `user` (on the invite's shard); first use wins.
    UseInvite { invite: String, user: UserId },
    /// Several commands in one log entry, applied in order (the shard handle's batching);
    /// answered by [`Reply::Batch`] with one reply per command.
    Batch(Vec<Command>),
    /// `by` received or read `user`'s messages in `conversation` up to `seq` (on `user`'s
    /// shard, so it reaches `user`'s devices through their inbox).
    Receipt {
        user: UserId,
        conversation: ConversationId,
        by: UserId,
        receipt: ReceiptKind,
        seq: u64,
        /// The proposer's clock (ms), stamped on the inbox event.
        #[serde(default)]
        ts: u64,
        /// As in [`Command::IndexUpdate`].
        #[serde(default, skip_serializing_if = "is_false")]
        uncounted: bool,
    },
    /// Add, update or remove a node in the cluster's node table (on the directory shard,
    /// `node::directory`). A removed id stays removed: any later record for it is refused
    /// ([`Reply::NodeSet`] `false`). Cluster version 4.
    SetNode { node: NodeRecord },
    /// Retention: delete up to `limit` records of `kind` older than `before_ms`, scanning in
    /// key order from just after `after` (empty: the start). Proposed by the shard leader's
    /// sweeper with its clock; every replica deletes the same records because the scan
    /// depends only on the state at this entry. Answered by [`Reply::Swept`].
    Sweep { kind: SweepKind, before_ms: u64, after: Vec<u8>, limit: u32 },
}

/// What a [`Command::Sweep`] expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SweepKind {
    /// Idempotency keys (`client_msg_id` records): the retry horizon.
    Dedup,
    /// Users' inbox events (delivery backlog for devices that were away).
    Inbox,
    /// Messages themselves (message retention policy).
    Messages,
}

impl SweepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SweepKind::Dedup => "dedup",
            SweepKind::Inbox => "inbox",
            SweepKind::Messages => "messages",
        }
    }
}

impl Command {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Append { .. } => "append",
            Command::IndexUpdate { .. } => "index_update",
            Command::MarkRead { .. } => "mark_read",
            Command::OutboxDone { .. } => "outbox_done",
            Command::Register { .. } => "register",
            Command::Receipt { .. } => "receipt",
            Command::CreateAccount { .. } => "create_account",
            Command::AddSession { .. }
            | Command::RotateSession { .. }
            | Command::EndSession { .. }
            | Command::SetPassword { .. } => "session",
            Command::UseInvite { .. } => "use_invite",
            Command::RevokeTokens { .. } => "revoke_tokens",
            Command::Ingest { .. } => "ingest",
            Command::Sweep { .. } => "sweep",
            Command::Batch(_) => "batch",
            Command::SetNode { .. } => "set_node",
        }
    }

    /// Rough size in memory and in the log, for admission control.
    pub fn approx_bytes(&self) -> usize {
        match self {
            Command::Append { text, client_msg_id, .. } => 96 + text.len() + client_msg_id.len(),
            Command::IndexUpdate { preview, .. } => 96 + preview.len(),
            Command::OutboxDone { items } => 16 + items.len() * 48,
            Command::Batch(cmds) => cmds.iter().map(Command::approx_bytes).sum(),
            Command::Ingest { records, .. } => 16 + records.iter().map(|(k, v)| k.len() + v.len() + 8).sum::<usize>(),
            _ => 96,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// `duplicate` is true when `client_msg_id` was seen before and nothing was written.
    Appended {
        seq: u64,
        ts: u64,
        duplicate: bool,
    },
    Indexed,
    ReadMarked {
        read_seq: u64,
        unread: u64,
    },
    Registered {
        new: bool,
    },
    /// What an account or invite command did.
    Account(AccountOutcome),
    /// An ingest: `false` when a first chunk met a shard that holds data already.
    Ingested(bool),
    /// A sweep: records deleted, and where the next one starts (None: the end was reached).
    Swept {
        deleted: u64,
        next: Option<Vec<u8>>,
    },
    /// Blank and membership entries, outbox completion.
    Done,
    /// A [`Command::SetNode`]: `false` when refused (the id was removed from the cluster).
    NodeSet(bool),
    /// The replies of a [`Command::Batch`], in order.
    Batch(Vec<Reply>),
}

/// The outcome of an account command; the refusals change nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountOutcome {
    Created,
    /// The user id has an account already (or is registered and `claim_existing` was off).
    Taken,
    NoAccount,
    SessionAdded,
    SessionRotated,
    /// The refresh token's session is not live: logged out, rotated already, expired, or
    /// ended by a password change.
    SessionUnknown,
    SessionEnded,
    PasswordSet,
    InviteAccepted,
    /// The invite was used by someone else.
    InviteUsed,
}
