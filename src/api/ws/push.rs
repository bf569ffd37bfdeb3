//! Pushed delivery for one connection: the user's inbox, expanded into frames.
//!
//! The pusher keeps a [`Cursor`] of what it has queued. It subscribes to the inbox on the
//! user shard's leader from the cursor's event, skips the frames of that event already
//! delivered, and turns each event into frames: a `Messages` range becomes one `message`
//! frame per seq, read (linearizably) from the conversation's shard in pages of at most
//! 200; a receipt becomes one `receipt` frame. When the subscription breaks (leader change,
//! node loss) it re-subscribes from the cursor, so nothing is skipped or repeated. Ranges of
//! one conversation are contiguous and in seq order, hence so are its pushes.

use super::protocol::{close, Cursor};
use super::session::Conn;
use crate::chat::{InboxEvent, UserId};
use crate::node::router::{ShardError, ShardOp, ShardReply};
use crate::storage::sm::now_ms;
use serde_json::json;
use std::time::Duration;

const PAGE: u64 = 200;

fn backoff(attempt: usize) -> Duration {
    Duration::from_millis((20u64 << attempt.min(5)).min(500))
}

pub async fn run(conn: Conn, user: UserId, start: Option<Cursor>) {
    let node = conn.node.clone();
    // The user's last inbox event: live delivery starts after it, and a resume cursor
    // may not point past it.
    let shard = node.placement.shard_of_user(&user);
    let mut attempt = 0;
    let last = loop {
        match node.call(shard, ShardOp::InboxLast { user: user.clone() }, node.request_deadline()).await {
            Ok(ShardReply::LastSeq(last)) => break last,
            Ok(_) | Err(_) => {
                attempt += 1;
                tokio::time::sleep(backoff(attempt)).await;
            }
        }
    };
    let mut cur = match start {
        Some(c) if c.event > last + 1 => {
            conn.close(close::INVALID_CURSOR, &format!("cursor {c} is past the end of your stream (event {last})"));
            return;
        }
        Some(c) => {
            node.metrics.ws_resumes.inc();
            c
        }
        None => Cursor { event: last + 1, frames: 0 },
    };
    if !conn.send(json!({ "type": "ready", "user": user, "cursor": cur.to_string() }).to_string()).await {
        return;
    }
    let mut attempt = 0;
    loop {
        let mut rx = match node.subscribe_inbox(&user, cur.event - 1, attempt).await {
            Ok(rx) => rx,
            Err(e) => {
                if let ShardError::Invalid(m) = &e {
                    conn.close(close::INVALID_CURSOR, m);
                    return;
                }
                node.inbox_failed(&user, &e);
                attempt += 1;
                tokio::time::sleep(backoff(attempt)).await;
                continue;
            }
        };
        while let Some(item) = rx.recv().await {
            match item {
                Ok((n, event)) => {
                    if n < cur.event {
                        continue;
                    }
                    let skip = if n == cur.event { cur.frames } else { 0 };
                    if skip > event.frames() {
                        conn.close(close::INVALID_CURSOR, "cursor names more frames than its event has");
                        return;
                    }
                    if !expand(&conn, n, &event, skip, &mut cur).await {
                        return;
                    }
                    attempt = 0;
                }
                Err(ShardError::Invalid(m)) => {
                    conn.close(close::INVALID_CURSOR, &m);
                    return;
                }
                Err(e) => {
                    tracing::debug!(user = %user, cause = %e, "inbox subscription ended; re-subscribing");
                    node.inbox_failed(&user, &e);
                    attempt += 1;
                    break;
                }
            }
        }
        tokio::time::sleep(backoff(attempt)).await;
    }
}

/// Queues the frames of event `n` after the first `skip`; false if the connection is gone.
async fn expand(conn: &Conn, n: u64, event: &InboxEvent, skip: u64, cur: &mut Cursor) -> bool {
    let node = &conn.node;
    match event {
        InboxEvent::Receipt { conversation, by, receipt, seq, .. } => {
            if skip == 0 {
                let c = Cursor { event: n, frames: 1 };
                let f = json!({"type": "receipt", "cursor": c.to_string(), "conversation_id": conversation,
                               "by": by, "receipt": receipt, "seq": seq});
                if !conn.send(f.to_string()).await {
                    return false;
                }
                node.metrics.ws_pushes.inc();
            }
            *cur = Cursor { event: n, frames: 1 };
            true
        }
        InboxEvent::Messages { conversation, after_seq, to_seq, .. } => {
            let shard = node.placement.shard_of_conversation(conversation);
            let mut last = after_seq + skip;
            *cur = Cursor { event: n, frames: skip };
            let mut attempt = 0;
            while last < *to_seq {
                let op = ShardOp::History {
                    conversation: conversation.clone(),
                    before: None,
                    after: Some(last),
                    limit: (to_seq - last).min(PAGE) as u32,
                };
                let page = match node.call(shard, op, node.request_deadline()).await {
                    // Every message of the range is gone (message retention): nothing to push.
                    Ok(ShardReply::History { messages, .. }) if messages.first().is_some_and(|m| m.seq > *to_seq) => {
                        last = *to_seq;
                        continue;
                    }
                    Ok(ShardReply::History { messages, .. }) if !messages.is_empty() => messages,
                    other => {
                        // The conversation shard is electing or unreachable: wait, retry.
                        tracing::debug!(?other, "history page for a push unavailable; retrying");
                        attempt += 1;
                        tokio::time::sleep(backoff(attempt)).await;
                        continue;
                    }
                };
                for m in page {
                    if m.seq <= last || m.seq > *to_seq {
                        continue;
                    }
                    let c = Cursor { event: n, frames: m.seq - after_seq };
                    let lag = now_ms().saturating_sub(m.ts);
                    let f = json!({"type": "message", "cursor": c.to_string(), "conversation_id": conversation,
                                   "seq": m.seq, "from": m.from, "text": m.text, "ts": m.ts,
                                   "client_msg_id": m.client_msg_id});
                    if !conn.send(f.to_string()).await {
                        return false;
                    }
                    node.metrics.ws_pushes.inc();
                    node.metrics.ws_push_lag_seconds.observe(lag as f64 / 1e3);
                    last = m.seq;
                    *cur = c;
                }
            }
            true
        }
    }
}
