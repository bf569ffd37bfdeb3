//! The vocabulary every layer shares: openraft's type configuration of the shard groups,
//! and node and shard ids. Storage, the Raft glue and the node all import it from here, so
//! `storage/` does not reach up into `raft/`.

use crate::chat::{Command, Reply};

pub use crate::shard::{NodeId, ShardId};

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
