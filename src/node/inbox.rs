//! Inbox streams: a user's delivery events, read from the user's shard.
//!
//! [`Node::local_inbox`] serves events after a given number from this node's replica:
//! first the stored backlog in pages, then live events from the state machine's broadcast,
//! falling back to storage whenever it sees a gap (a lagged receiver, a snapshot install).
//! Only applied (hence committed) events exist, so every event is final. The stream ends
//! with an error when this node stops leading the shard, so subscribers move to the new
//! leader. [`Node::subscribe_inbox`] finds that leader, locally or over gRPC.

use super::router::ShardError;
use super::Node;
use crate::chat::state::Store;
use crate::chat::{InboxEvent, UserId};
use crate::pb;
use crate::storage::sm::InboxNotice;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

pub type InboxItem = Result<(u64, InboxEvent), ShardError>;

const PAGE: usize = 256;
const LEADER_CHECK: Duration = Duration::from_millis(250);
/// How often a stream re-confirms leadership with a quorum: a leader cut off from its
/// followers may not notice by itself, and its stream would silently stall.
const QUORUM_CHECK: Duration = Duration::from_secs(2);

impl Node {
    /// Streams `user`'s inbox events numbered after `after` from this node, which must lead
    /// the user's shard. `after` beyond the last event is an error (a bad cursor).
    pub fn local_inbox(self: &Arc<Self>, user: UserId, after: u64) -> Result<mpsc::Receiver<InboxItem>, ShardError> {
        let shard = self.placement.shard_of_user(&user);
        let group = self.local.group(shard).ok_or_else(|| match self.route(shard) {
            Some((index, voters)) => ShardError::Moved { shard, index, voters },
            None => ShardError::NotReplica { shard },
        })?;
        let leader = group.raft.metrics().borrow().current_leader;
        if leader != Some(self.id) {
            return Err(ShardError::NotLeader { shard, leader });
        }
        let mut live = group.sm.inbox_tx.subscribe();
        let last = group.sm.view.inbox_last(&user).map_err(|e| ShardError::Storage(e.to_string()))?;
        if after > last {
            return Err(ShardError::Invalid(format!("cursor event {after} is past the inbox's last event {last}")));
        }
        let first = group.sm.view.inbox_first(&user).map_err(|e| ShardError::Storage(e.to_string()))?;
        if after + 1 < first {
            return Err(ShardError::Invalid(format!(
                "cursor event {after} is older than the oldest kept event {first} (inbox_retention_secs): resync with history and connect without a cursor"
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        let node = self.clone();
        tokio::spawn(async move {
            let mut sent = after;
            let mut metrics = group.raft.metrics();
            let mut quorum_check = tokio::time::interval_at(tokio::time::Instant::now() + QUORUM_CHECK, QUORUM_CHECK);
            'outer: loop {
                // Backlog from storage, in pages.
                loop {
                    let page = match group.sm.view.inbox_page(&user, sent, PAGE) {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = tx.send(Err(ShardError::Storage(e.to_string()))).await;
                            return;
                        }
                    };
                    if page.is_empty() {
                        break;
                    }
                    for (n, e) in page {
                        if tx.send(Ok((n, e))).await.is_err() {
                            return;
                        }
                        sent = n;
                    }
                }
                // Live events.
                loop {
                    tokio::select! {
                        msg = live.recv() => match msg {
                            Ok(InboxNotice::Event(u, n, e)) if u == user => {
                                if n <= sent {
                                    continue;
                                }
                                if n != sent + 1 {
                                    continue 'outer;
                                }
                                if tx.send(Ok((n, e))).await.is_err() {
                                    return;
                                }
                                sent = n;
                            }
                            Ok(InboxNotice::Event(..)) => {}
                            Ok(InboxNotice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => continue 'outer,
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                        changed = tokio::time::timeout(LEADER_CHECK, metrics.changed()) => {
                            if let Ok(Err(_)) = changed {
                                return;
                            }
                            let leader = metrics.borrow().current_leader;
                            if leader != Some(node.id) {
                                let _ = tx.send(Err(ShardError::NotLeader { shard, leader })).await;
                                return;
                            }
                        }
                        _ = quorum_check.tick() => {
                            let deadline = tokio::time::Instant::now() + QUORUM_CHECK;
                            if let Err(e) = node.linearize(shard, deadline).await {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        }
                        _ = tx.closed() => return,
                    }
                }
            }
        });
        Ok(rx)
    }

    /// Opens `user`'s inbox after event `after` on the node believed to lead the user's
    /// shard (a replica picked by `attempt` once hints run out). Errors, including "not the
    /// leader, try node X", arrive as items; the caller re-subscribes after
    /// [`Node::inbox_failed`].
    pub async fn subscribe_inbox(
        self: &Arc<Self>,
        user: &UserId,
        after: u64,
        attempt: usize,
    ) -> Result<mpsc::Receiver<InboxItem>, ShardError> {
        let shard = self.placement.shard_of_user(user);
        let replicas = self.replicas(shard);
        let target = match self.leader_hint(shard) {
            Some(l) if attempt == 0 || attempt % 2 == 1 => l,
            _ => replicas[attempt % replicas.len()],
        };
        if target == self.id {
            self.local_inbox(user.clone(), after)
        } else {
            self.remote_inbox(target, user, after).await
        }
    }

    /// Learns from a failed subscription: follow a leader hint, or forget a dead one.
    pub fn inbox_failed(&self, user: &UserId, err: &ShardError) {
        let shard = self.placement.shard_of_user(user);
        match err {
            ShardError::NotLeader { leader: Some(l), .. } => self.set_leader_hint(shard, Some(*l)),
            ShardError::Moved { index, voters, .. } => {
                self.learn_route(shard, *index, voters.clone());
                self.set_leader_hint(shard, None);
            }
            _ => self.set_leader_hint(shard, None),
        }
    }

    async fn remote_inbox(
        &self,
        target: u64,
        user: &UserId,
        after: u64,
    ) -> Result<mpsc::Receiver<InboxItem>, ShardError> {
        let shard = self.placement.shard_of_user(user);
        let unavailable = move |reason: String| ShardError::Unavailable { shard, reason };
        let mut client = self.peers.client(target).map_err(|e| unavailable(e.to_string()))?;
        let req = self.peers.request(
            target,
            pb::SubscribeRequest { user: user.to_string(), after },
            Duration::from_secs(86_400 * 365),
        );
        let open = tokio::time::timeout(self.peers.rpc_timeout(), client.subscribe(req)).await;
        let mut stream = match open {
            Ok(Ok(s)) => s.into_inner(),
            Ok(Err(s)) => return Err(unavailable(format!("node {target}: {}", s.message()))),
            Err(_) => return Err(unavailable(format!("node {target}: subscribe timed out"))),
        };
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    m = stream.message() => match m {
                        Ok(Some(item)) => decode(&item.payload).and_then(|r| r),
                        Ok(None) => Err(unavailable(format!("node {target} ended the subscription"))),
                        Err(s) => Err(unavailable(format!("node {target}: {}", s.message()))),
                    },
                    _ = tx.closed() => return,
                };
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

fn decode(payload: &[u8]) -> Result<InboxItem, ShardError> {
    serde_json::from_slice(payload).map_err(|e| ShardError::Storage(format!("undecodable inbox item: {e}")))
}
