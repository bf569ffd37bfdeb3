//! Raft groups: one openraft instance per (shard, replica node).
//!
//! - [`network`]: openraft's network over tonic; one channel per peer carries every group.
//! - [`pipe`]: one long-lived stream per peer carrying Raft RPCs and forwarded operations.
//! - [`prevote`]: elections start only when a majority agrees the leader is gone.
//! - [`group`]: building a shard's group from the node's storage and config.

pub mod group;
pub mod network;
pub mod pipe;
pub mod prevote;

pub use crate::types::{Raft, TypeConfig};
