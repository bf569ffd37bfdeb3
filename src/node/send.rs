//! The coordinated send and its outbox, together.
//!
//! A send is acknowledged only when the message is committed on its conversation shard
//! and both participants' recent-conversations entries are committed on their user shards:
//!
//! 1. [`Node::coordinate_send`] (on the conversation shard's leader) proposes the `Append`
//!    through the shard's handle, which batches it with other sends and refuses it at once
//!    when the shard is saturated. Applying it assigns the gap-free seq and leaves an outbox
//!    entry.
//! 2. It then commits both index updates ([`Node::update_indexes`]); they go through the
//!    user shards' handles too, so index updates of many messages share log entries.
//! 3. The outbox entry is confirmed afterwards, in batches; a crash before that leaves it
//!    pending and the shard's next leader re-drives it.
//!
//! The outbox:
//!
//! - The confirmer batches the sends acknowledged on this node into one `OutboxDone`
//!   proposal per shard every [`CONFIRM_EVERY`], so confirmation costs little: at low
//!   load each of these is a log entry of its own, replicated, synced and applied like a
//!   message, so the window sets how many entries confirmation adds.
//! - The re-driver runs on each shard's leader once a second: entries that were already
//!   pending one round earlier belong to a coordinator that died (or lost leadership) before
//!   finishing; their index updates are re-proposed (idempotent) and then confirmed.

use super::ops::storage_err;
use super::router::{ShardError, ShardOp, ShardReply};
use super::shard_handle::{Admission, ShardHandle};
use super::Node;
use crate::chat::types::preview;
use crate::chat::{Command, ConversationId, Reply, UserId};
use crate::shard::ShardId;
use crate::storage::sm::now_ms;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub const REDRIVE_EVERY: Duration = Duration::from_millis(1000);

/// How long the confirmer gathers acknowledged sends before proposing their `OutboxDone`s.
/// Well under [`REDRIVE_EVERY`], so that a confirmed entry is not re-driven first. At 20 ms
/// (before) confirmations were about a fifth of all log entries at 250 sends/s.
pub const CONFIRM_EVERY: Duration = Duration::from_millis(200);

/// Fault injection for tests (`RAFTCHAT_FAULT=crash-after-append`): the coordinator aborts
/// between the message commit and the index updates of a message whose text contains
/// [`CRASH_MARKER`]. Off unless the variable is set.
pub const CRASH_AFTER_APPEND: &str = "crash-after-append";
pub const CRASH_MARKER: &str = "[crash-after-append]";

/// Fault injection for tests (`RAFTCHAT_FAULT=slow-confirm`): the confirmer gathers for 30 s
/// instead of [`CONFIRM_EVERY`], so that only the flush of a stopping node confirms in time.
pub const SLOW_CONFIRM: &str = "slow-confirm";

impl Node {
    /// The send protocol, run by the conversation shard's leader (see the module docs).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn coordinate_send(
        self: &Arc<Self>,
        handle: &ShardHandle,
        from: UserId,
        to: UserId,
        client_msg_id: String,
        text: String,
        attempt: u64,
        admission: Admission,
        deadline: Instant,
    ) -> Result<ShardReply, ShardError> {
        let start = std::time::Instant::now();
        let conversation = ConversationId::between(&from, &to).map_err(|e| ShardError::Invalid(e.to_string()))?;
        let text_preview = preview(&text);
        let crash = self.fault.as_deref() == Some(CRASH_AFTER_APPEND) && text.contains(CRASH_MARKER);
        let cmd = Command::Append {
            conversation: conversation.clone(),
            from: from.clone(),
            to: to.clone(),
            client_msg_id,
            text,
            ts: now_ms(),
            attempt,
        };
        let Reply::Appended { seq, ts, duplicate } = handle.propose(cmd, admission, deadline).await? else {
            return Err(ShardError::Storage("append produced an unexpected reply".into()));
        };
        if crash && !duplicate {
            tracing::error!(%conversation, seq, "fault injection: aborting between message commit and index updates");
            std::process::abort();
        }
        // A client's retry may find the first attempt's index updates unfinished: finish them
        // with the original's text. (This node's own retry of the same request carries the
        // same text, so its preview is already right.)
        let preview = if duplicate {
            match handle.group.sm.view.messages(&conversation, seq, seq).map_err(storage_err)?.first() {
                Some(m) => preview(&m.text),
                None => text_preview,
            }
        } else {
            text_preview
        };
        self.update_indexes(&conversation, &from, &to, seq, ts, &preview, deadline).await?;
        let _ = self.outbox_done.send((handle.shard(), conversation.clone(), seq));
        self.metrics.send_seconds.observe(start.elapsed().as_secs_f64());
        Ok(ShardReply::Sent { conversation, seq, ts, duplicate })
    }

    /// Commits the index updates of both participants (idempotent, safe to repeat).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn update_indexes(
        self: &Arc<Self>,
        conversation: &ConversationId,
        from: &UserId,
        to: &UserId,
        seq: u64,
        ts: u64,
        preview: &str,
        deadline: Instant,
    ) -> Result<(), ShardError> {
        let (uncounted, lazy_order) = (self.cfg.uncounted_inbox(), self.cfg.lazy_order());
        let update = |user: &UserId| {
            let cmd = Command::IndexUpdate {
                user: user.clone(),
                conversation: conversation.clone(),
                from: from.clone(),
                seq,
                ts,
                preview: preview.to_string(),
                uncounted,
                lazy_order,
            };
            self.call(self.placement.shard_of_user(user), ShardOp::Write(cmd), deadline)
        };
        let (a, b) = futures::join!(update(from), update(to));
        a?;
        b?;
        Ok(())
    }
}

pub fn spawn(
    node: Arc<Node>,
    rx: mpsc::UnboundedReceiver<(ShardId, ConversationId, u64)>,
    stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    vec![tokio::spawn(confirm(node.clone(), rx, stop.clone())), tokio::spawn(redrive(node, stop))]
}

async fn confirm(
    node: Arc<Node>,
    mut rx: mpsc::UnboundedReceiver<(ShardId, ConversationId, u64)>,
    mut stop: watch::Receiver<bool>,
) {
    let every = if node.fault.as_deref() == Some(SLOW_CONFIRM) { Duration::from_secs(30) } else { CONFIRM_EVERY };
    while let Some(first) = rx.recv().await {
        // A stopping node confirms at once what its last requests finish, before it hands
        // its leaderships off: otherwise the next leaders would re-drive them.
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        let mut by_shard: BTreeMap<ShardId, Vec<(ConversationId, u64)>> = BTreeMap::new();
        by_shard.entry(first.0).or_default().push((first.1, first.2));
        while let Ok((s, c, q)) = rx.try_recv() {
            by_shard.entry(s).or_default().push((c, q));
        }
        for (shard, items) in by_shard {
            let deadline = Instant::now() + Duration::from_secs(5);
            // Failure is harmless: the re-driver confirms whatever stays pending.
            if let Err(e) = node.propose(shard, Command::OutboxDone { items }, Admission::Internal, deadline).await {
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
        for (shard, h) in node.local.all().iter() {
            let group = &h.group;
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
                let _ = node.propose(*shard, Command::OutboxDone { items: done }, Admission::Internal, deadline).await;
            }
        }
        seen = now_seen;
    }
}
