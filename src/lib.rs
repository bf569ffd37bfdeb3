//! raftchat: a strongly consistent, sharded 1:1 chat cluster.
//!
//! Every shard is an openraft group whose log and state live in sled; conversations live
//! on the shard of their id, each user's recent-conversations index on the shard of the
//! user id. Any node accepts any request and forwards it to the shard's leader.
//!
//! Modules, roughly from the bottom up:
//!
//! - [`types`]: the ground floor: openraft's type config, node and shard ids.
//! - [`chat`]: ids, messages, the replicated commands and the pure state machine.
//! - [`shard`]: the stable key-to-shard hash and replica placement.
//! - [`storage`]: the write-ahead log (Raft logs, group commit, fdatasync), sled trees per
//!   shard (state machine, snapshots), openraft's storage traits.
//! - [`cache`]: the write-through cache of the last 24 hours of messages.
//! - [`raft`]: shard groups and the tonic network between nodes.
//! - [`node`]: a running node: routing to leaders, the per-shard handle (batching,
//!   admission, reads), the coordinated send and its outbox, node admission.
//! - [`server`]: start-up and shutdown: storage, groups, the node, then the listeners.
//! - [`api`]: the client API over HTTP/JSON and gRPC.
//! - [`auth`]: HS256 bearer tokens and the peer key.
//! - [`config`]: the node configuration (TOML, flags, `RAFTCHAT_*` env).
//! - [`metrics`]: Prometheus metrics.
//! - [`cli`]: the `raftchat` command line (server, local cluster, client commands).
//! - [`bench`]: `raftchat bench`, the open-loop load tool (raftchat and an etcd peer).
//! - [`fixture`]: starting, killing and restarting real node processes (tests, benchmarks).

pub mod api;
pub mod auth;
pub mod bench;
pub mod cache;
pub mod chat;
pub mod cli;
pub mod config;
pub mod fixture;
pub mod logs;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod server;
pub mod shard;
pub mod storage;
pub mod tls;
pub mod types;

/// Code generated from `proto/raftchat.proto`.
pub mod pb {
    tonic::include_proto!("raftchat");
}

/// Client code generated from `proto/etcd_kv.proto` (the benchmark's etcd peer).
pub mod etcdpb {
    tonic::include_proto!("etcdserverpb");
}
