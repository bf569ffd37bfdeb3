//! The vocabulary every layer shares: openraft's type configuration of the shard groups,
//! and node and shard ids. Storage, the Raft glue and the node all import it from here, so
//! `storage/` does not reach up into `raft/`.

use crate::chat::{Command, Reply};

pub use crate::shard::{NodeId, ShardId};

/// The test-only fault injected into this process (`RAFTCHAT_FAULT`, docs/operations.md),
/// read once; every layer that has a fault point asks here.
pub fn fault() -> Option<&'static str> {
    static FAULT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    FAULT.get_or_init(|| std::env::var("RAFTCHAT_FAULT").ok().filter(|s| !s.is_empty())).as_deref()
}

openraft::declare_raft_types!(
    /// openraft types of every shard group.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = crate::storage::snapshot::SnapFile,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
