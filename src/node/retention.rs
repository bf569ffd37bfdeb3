//! Retention: idempotency keys, inbox events and (by policy) messages expire, through the
//! Raft log so that every replica deletes the same records.
//!
//! Every `sweep_interval_secs`, for each shard this node leads, the sweeper proposes
//! [`Command::Sweep`]s of each kind with a cut-off from its clock: each entry scans at most
//! `sweep_batch` records in key order from where the previous one stopped and deletes those
//! older than the cut-off, so no single entry does unbounded work; a pass ends when the
//! scan reaches the end of that kind's records. A new leader starts its passes from the
//! beginning. What goes, and when:
//!
//! - idempotency keys (`client_msg_id` records) older than `dedup_retention_secs` (the
//!   retry horizon: a retry after it is a new message);
//! - inbox events older than `inbox_retention_secs` (a device away longer resumes with
//!   4002 and resyncs from history); a user's last event stays, it numbers the next;
//! - messages older than `message_retention_secs`, when set (0 keeps them forever).
//!
//! A pass scans every record of its kind (they are keyed by conversation or user, not by
//! time), so it costs in proportion to what is retained, not to what expires; hence the
//! hourly default. An expiry index ordered by time would fix that.

use super::shard_handle::Admission;
use super::Node;
use crate::chat::{Command, Reply, SweepKind};
use crate::storage::sm::now_ms;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

pub fn spawn(node: Arc<Node>, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(node, stop))
}

async fn run(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_secs(node.cfg.sweep_interval_secs);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if node.cfg.cluster_version < 2 {
            continue;
        }
        let now = now_ms();
        let mut kinds = vec![
            (SweepKind::Dedup, now.saturating_sub(node.cfg.dedup_retention_secs * 1000)),
            (SweepKind::Inbox, now.saturating_sub(node.cfg.inbox_retention_secs * 1000)),
        ];
        if node.cfg.message_retention_secs > 0 {
            kinds.push((SweepKind::Messages, now.saturating_sub(node.cfg.message_retention_secs * 1000)));
        }
        for shard in node.local.shards() {
            for &(kind, before_ms) in &kinds {
                if *stop.borrow() {
                    return;
                }
                sweep(&node, shard, kind, before_ms).await;
            }
        }
    }
}

/// One pass of `kind` over `shard`, while this node leads it.
async fn sweep(node: &Arc<Node>, shard: crate::shard::ShardId, kind: SweepKind, before_ms: u64) {
    let mut after = Vec::new();
    loop {
        let leads = node.local.group(shard).is_some_and(|g| g.raft.metrics().borrow().current_leader == Some(node.id));
        if !leads {
            return;
        }
        let cmd = Command::Sweep { kind, before_ms, after, limit: node.cfg.sweep_batch };
        let deadline = Instant::now() + Duration::from_secs(10);
        match node.propose(shard, cmd, Admission::Internal, deadline).await {
            Ok(Reply::Swept { deleted, next }) => {
                if deleted > 0 {
                    node.metrics.swept.with_label_values(&[kind.as_str()]).inc_by(deleted);
                    tracing::debug!(shard, kind = kind.as_str(), deleted, "retention sweep");
                }
                match next {
                    Some(n) => after = n,
                    None => return,
                }
            }
            Ok(other) => {
                tracing::warn!(shard, ?other, "unexpected reply to a sweep");
                return;
            }
            Err(e) => {
                tracing::debug!(shard, cause = %e, "retention sweep interrupted; next pass retries");
                return;
            }
        }
        // Leave room for the shard's real work between steps.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
