//! raftchat's Jepsen-style consistency harness.
//!
//! - [`history`]: invoke/ok/fail/info operations, JSON lines and EDN output.
//! - [`checker`]: the verdict over a history (lost writes, duplicates, incompatible
//!   orders, stale reads, push streams, recent lists).
//! - [`net`]: network namespaces on a bridge, iptables partitions.
//! - [`db`]: the raftchat nodes under test, one per namespace, with kill, pause, clock.
//! - [`lazyfs`]: a FUSE filesystem that drops unsynced writes (the `power` nemesis).
//! - [`client`]: workers that invoke operations and push subscribers.
//! - [`nemesis`]: the fault schedule and its timeline.
//! - [`plot`]: latency and throughput over time with fault windows shaded (SVG).
//! - [`run`]: one test run end to end, and its output folder.

pub mod checker;
pub mod client;
pub mod db;
pub mod history;
pub mod lazyfs;
pub mod nemesis;
pub mod net;
pub mod plot;
pub mod run;
