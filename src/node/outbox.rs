//! The outbox: every new message leaves a pending entry on its conversation shard until
//! both participants' index updates are confirmed.
//!
//! - The confirmer batches the sends acknowledged on this node into one `OutboxDone`
//!   proposal per shard (every 20 ms at most), so confirmation costs little.
//! - The re-driver runs on each shard's leader once a second: entries that were already
//!   pending one round earlier belong to a coordinator that died (or lost leadership) before
//!   finishing; their index updates are re-proposed (idempotent) and then confirmed.

use super::router::ShardError;
use super::Node;
use crate::chat::{Command, ConversationId};
use crate::shard::ShardId;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub const REDRIVE_EVERY: Duration = Duration::from_millis(1000);

pub fn spawn(
    node: Arc<Node>,
    rx: mpsc::UnboundedReceiver<(ShardId, ConversationId, u64)>,
    stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    vec![tokio::spawn(confirm(node.clone(), rx)), tokio::spawn(redrive(node, stop))]
}

async fn confirm(node: Arc<Node>, mut rx: mpsc::UnboundedReceiver<(ShardId, ConversationId, u64)>) {
    while let Some(first) = rx.recv().await {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut by_shard: BTreeMap<ShardId, Vec<(ConversationId, u64)>> = BTreeMap::new();
        by_shard.entry(first.0).or_default().push((first.1, first.2));
        while let Ok((s, c, q)) = rx.try_recv() {
            by_shard.entry(s).or_default().push((c, q));
        }
        for (shard, items) in by_shard {
            let Some(group) = node.groups.get(&shard) else {
                continue;
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            // Failure is harmless: the re-driver confirms whatever stays pending.
            if let Err(e) = node.propose(group, Command::OutboxDone { items }, deadline).await {
                tracing::debug!(shard, cause = %e, "outbox confirmation deferred to the re-driver");
            }
        }
    }
}

async fn redrive(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    let mut seen: HashSet<(ShardId, ConversationId, u64)> = HashSet::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REDRIVE_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let mut now_seen = HashSet::new();
        for (shard, group) in &node.groups {
            if group.raft.metrics().borrow().current_leader != Some(node.id) {
                continue;
            }
            let pending = match group.sm.view.pending_all() {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(shard, cause = %e, "cannot read the outbox");
                    continue;
                }
            };
            let mut done = Vec::new();
            for p in pending {
                let key = (*shard, p.conversation.clone(), p.seq);
                if !seen.contains(&key) {
                    now_seen.insert(key);
                    continue;
                }
                let deadline = Instant::now() + Duration::from_secs(5);
                let res: Result<(), ShardError> =
                    node.update_indexes(&p.conversation, &p.from, &p.to, p.seq, p.ts, &p.preview, deadline).await;
                match res {
                    Ok(()) => {
                        tracing::info!(shard, conversation = %p.conversation, seq = p.seq, "re-drove index updates from the outbox");
                        node.metrics.outbox_redriven.with_label_values(&[&shard.to_string()]).inc();
                        done.push((p.conversation, p.seq));
                    }
                    Err(e) => {
                        tracing::warn!(shard, cause = %e, "outbox re-drive failed; will retry");
                        now_seen.insert(key);
                    }
                }
            }
            if !done.is_empty() {
                let deadline = Instant::now() + Duration::from_secs(5);
                let _ = node.propose(group, Command::OutboxDone { items: done }, deadline).await;
            }
        }
        seen = now_seen;
    }
}
