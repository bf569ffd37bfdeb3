//! Raft groups: one openraft instance per (shard, replica node).
//!
//! - [`network`]: openraft's network over tonic; one channel per peer carries every group.
//! - [`group`]: building a shard's group from the node's storage and config.

pub mod group;
pub mod network;

use crate::chat::{Command, Reply};
use std::io::Cursor;

openraft::declare_raft_types!(
    /// openraft types of every shard group.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
