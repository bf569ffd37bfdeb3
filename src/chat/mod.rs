//! The chat domain: identifiers, messages, the replicated commands and the pure state
//! machine that applies them.
//!
//! - [`types`]: user and conversation ids, messages, recent-conversation entries.
//! - [`command`]: what a shard's Raft log carries ([`Command`]) and what applying it
//!   returns ([`Reply`]).
//! - [`state`]: `apply(command, store) -> (changes, reply)`, with no I/O.

pub mod command;
pub mod state;
pub mod types;

pub use command::{AccountOutcome, Command, Reply, SweepKind};
pub use types::{
    Account, ConversationId, InboxEvent, IndexEntry, Message, NodeRecord, ReceiptKind, UserId, ValidationError,
};
