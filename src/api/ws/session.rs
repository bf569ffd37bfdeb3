//! One WebSocket connection.
//!
//! Three parts: a writer task that owns the socket's sending half and drains a bounded
//! queue (and pings); the reader loop (this function) that handles incoming frames,
//! keepalive and auth; and, once authenticated, the pusher ([`super::push`]). Requests run
//! as tasks (at most `ws_max_in_flight` at once) and reply through the same queue. A frame
//! that cannot be queued within `ws_slow_consumer_ms` closes the connection with 4008: the
//! queue never grows past `ws_queue_frames`.
//!
//! Runtimes. Under the client listener (`api::listener`) the reader and the writer run on
//! the listener's front runtime, and everything that does node work (request tasks, the
//! pusher, token checks) on the node's runtime (`work`). So a send past the node's
//! admission limit is answered with its `overloaded` error frame by the reader at once,
//! without waiting for a turn on the busy node runtime.

use super::protocol::{self, close, ClientFrame, Cursor};
use crate::api::{ops, ApiError};
use crate::auth::Principal;
use crate::node::Node;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

const AUTH_WINDOW: Duration = Duration::from_secs(10);

/// The sending side of a connection, shared by the pusher and request tasks.
#[derive(Clone)]
pub struct Conn {
    pub node: Arc<Node>,
    out: mpsc::Sender<Out>,
    close: mpsc::Sender<(u16, String)>,
    slow: Duration,
}

impl Conn {
    /// Queues a frame; false if the connection is gone or was just closed as too slow.
    pub async fn send(&self, text: String) -> bool {
        match tokio::time::timeout(self.slow, self.out.send(Out::Text(text))).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            Err(_) => {
                self.node.metrics.ws_slow_closes.inc();
                self.close_now(close::SLOW_CONSUMER, "slow consumer: reconnect and resume from your last cursor");
                false
            }
        }
    }

    /// Closes after the frames already queued (so an error frame before it is delivered).
    pub fn close(&self, code: u16, reason: &str) {
        let reason: String = reason.chars().take(120).collect();
        if let Err(mpsc::error::TrySendError::Full(Out::Close(code, reason))) =
            self.out.try_send(Out::Close(code, reason))
        {
            let _ = self.close.try_send((code, reason));
        }
    }

    /// Closes ahead of the queue (the queue is what is stuck).
    pub fn close_now(&self, code: u16, reason: &str) {
        let reason: String = reason.chars().take(120).collect();
        let _ = self.close.try_send((code, reason));
    }

    async fn error(&self, id: Option<Value>, e: &ApiError) {
        self.send(protocol::error_frame(id, e)).await;
    }
}

/// What the writer sends, in order.
pub enum Out {
    Text(String),
    Close(u16, String),
}

struct ConnectionGauge(Arc<Node>);
impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.metrics.ws_connections.dec();
    }
}

/// Runs `f` on the node's runtime and waits for it (`None` if it panicked or was cancelled).
async fn on_node<T: Send + 'static>(work: &Handle, f: impl Future<Output = T> + Send + 'static) -> Option<T> {
    work.spawn(f).await.ok()
}

/// Serves one connection; node work runs on `work` (see the module docs).
pub async fn run(node: Arc<Node>, socket: WebSocket, mut who: Option<Principal>, cursor: Option<Cursor>, work: Handle) {
    node.metrics.ws_connections.inc();
    let _gauge = ConnectionGauge(node.clone());
    let cfg = node.cfg.clone();
    let ping = Duration::from_millis(cfg.ws_ping_ms);
    let (mut sink, mut stream) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(cfg.ws_queue_frames);
    let (close_tx, mut close_rx) = mpsc::channel::<(u16, String)>(1);
    let conn =
        Conn { node: node.clone(), out: out_tx, close: close_tx, slow: Duration::from_millis(cfg.ws_slow_consumer_ms) };

    let mut writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(Instant::now() + ping, ping);
        loop {
            tokio::select! {
                biased;
                c = close_rx.recv() => {
                    if let Some((code, reason)) = c {
                        let _ = sink.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
                    }
                    break;
                }
                m = out_rx.recv() => match m {
                    Some(Out::Text(text)) => if sink.send(Message::Text(text.into())).await.is_err() { break },
                    Some(Out::Close(code, reason)) => {
                        let _ = sink.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
                        break;
                    }
                    None => break,
                },
                _ = tick.tick() => if sink.send(Message::Ping(Default::default())).await.is_err() { break },
            }
        }
        let _ = sink.close().await;
    });

    let mut writer_done = false;
    let mut tasks = JoinSet::new();
    // Request tasks spawned and not yet collected (the pusher is not one).
    let mut requests_held: i64 = 0;
    let permits = Arc::new(Semaphore::new(cfg.ws_max_in_flight));
    if let Some(w) = &who {
        let (c, u) = (conn.clone(), w.user.clone());
        tasks.spawn_on(
            async move {
                super::push::run(c, u, cursor).await;
                false
            },
            &work,
        );
    }
    let opened = Instant::now();
    let mut last_seen = Instant::now();
    let mut close_asked: Option<Instant> = None;
    let mut watchdog = tokio::time::interval(Duration::from_millis(250));
    let revocation_every = Duration::from_secs(cfg.revocation_check_secs);
    let mut revocation_checked = Instant::now();
    let mut stopping = node.stopping.clone();
    let mut stopping = Box::pin(async move {
        let _ = stopping.wait_for(|s| *s).await.map(|_| ());
    });
    loop {
        tokio::select! {
            msg = stream.next() => {
                let msg = match msg {
                    Some(Ok(m)) => m,
                    None => break,
                    Some(Err(e)) => {
                        // The frame could not be read: say why before closing.
                        let text = e.to_string();
                        let (code, reason) = if text.contains("too long") {
                            (close::TOO_BIG, format!("frames are limited to {} bytes", super::HARD_FRAME_LIMIT))
                        } else {
                            (close::PROTOCOL_ERROR, "WebSocket protocol error".to_string())
                        };
                        tracing::debug!(cause = %text, code, "closing a WebSocket after a read error");
                        conn.close_now(code, &reason);
                        writer_done = tokio::time::timeout(Duration::from_secs(1), &mut writer).await.is_ok();
                        break;
                    }
                };
                last_seen = Instant::now();
                match msg {
                    Message::Text(t) => {
                        if t.len() > cfg.max_body_bytes {
                            let e = ApiError::bad_request("frame_too_large", format!("frames are limited to {} bytes", cfg.max_body_bytes));
                            conn.error(None, &e).await;
                            continue;
                        }
                        handle_text(&conn, &work, &mut who, &mut tasks, &mut requests_held, &permits, t.as_str()).await;
                    }
                    Message::Binary(_) => {
                        let e = ApiError::bad_request("binary_not_supported", "raftchat carries text only: send JSON text frames");
                        conn.error(None, &e).await;
                    }
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            // Finished requests leave the set at once, so a long-lived connection holds only
            // what is in flight.
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if matches!(done, Ok(true)) {
                    requests_held -= 1;
                    node.metrics.ws_request_tasks.dec();
                }
            }
            _ = watchdog.tick() => {
                // A revoked token (password change, log-out everywhere) ends its connections.
                if close_asked.is_none() && revocation_checked.elapsed() >= revocation_every {
                    revocation_checked = Instant::now();
                    if let Some(w) = who.clone() {
                        let n = node.clone();
                        let check = tokio::time::timeout(
                            Duration::from_secs(2),
                            on_node(&work, async move { n.token_revoked(&w).await }),
                        )
                        .await;
                        if let (Ok(Some(Ok(true))), Some(w)) = (check, who.as_ref()) {
                            conn.error(None, &super::super::ops::token_revoked()).await;
                            conn.close(close::UNAUTHORIZED, "token_revoked: log in again");
                            close_asked.get_or_insert_with(Instant::now);
                            tracing::debug!(user = %w.user, "closing a WebSocket whose token was revoked");
                        }
                    }
                }
                if let Some(w) = who.as_ref().filter(|w| w.exp <= crate::auth::now_secs()) {
                    if close_asked.is_none() {
                        let e = ApiError::from(crate::auth::AuthError::Expired);
                        conn.error(None, &e).await;
                        conn.close(close::UNAUTHORIZED, "token_expired: reconnect, or send an auth frame with a fresh token before expiry");
                        tracing::debug!(user = %w.user, "closing a WebSocket whose token expired");
                    }
                    close_asked.get_or_insert_with(Instant::now);
                }
                if who.is_none() && opened.elapsed() > AUTH_WINDOW {
                    conn.close(close::UNAUTHORIZED, "no auth frame within 10 s");
                    close_asked.get_or_insert_with(Instant::now);
                }
                if last_seen.elapsed() > ping * 3 {
                    conn.close_now(close::IDLE, "no frame or pong for three ping intervals");
                    close_asked.get_or_insert_with(Instant::now);
                }
                // A writer stuck on a client that never reads is cut off eventually.
                if close_asked.is_some_and(|t| t.elapsed() > conn.slow * 2 + Duration::from_secs(10)) {
                    writer.abort();
                }
            }
            _ = &mut stopping => {
                conn.close(close::GOING_AWAY, "server shutting down: reconnect with your last cursor");
                close_asked.get_or_insert_with(Instant::now);
                writer_done = tokio::time::timeout(Duration::from_secs(2), &mut writer).await.is_ok();
                break;
            }
            _ = &mut writer => {
                writer_done = true;
                break;
            }
        }
    }
    tasks.abort_all();
    node.metrics.ws_request_tasks.sub(requests_held);
    drop(conn);
    // A finished JoinHandle must not be polled again.
    if !writer_done {
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut writer).await;
        writer.abort();
    }
}

async fn handle_text(
    conn: &Conn,
    work: &Handle,
    who: &mut Option<Principal>,
    tasks: &mut JoinSet<bool>,
    requests_held: &mut i64,
    permits: &Arc<Semaphore>,
    text: &str,
) {
    let frame = match protocol::parse(text) {
        Ok(f) => f,
        Err((id, e)) => return conn.error(id, &e).await,
    };
    if let ClientFrame::Auth { id, token, cursor } = frame {
        if let Some(current) = who.as_mut() {
            // A fresh token for the same user extends the connection past the old one's expiry.
            let verified = conn.node.keys.verify(&token).map_err(ApiError::from);
            let verified = match verified {
                Ok(p) => {
                    let (node, q) = (conn.node.clone(), p.clone());
                    match on_node(work, async move { node.token_revoked(&q).await }).await {
                        Some(Ok(true)) => Err(super::super::ops::token_revoked()),
                        _ => Ok(p),
                    }
                }
                other => other,
            };
            return match verified {
                Ok(p) if p.user == current.user => {
                    current.exp = p.exp;
                    current.iat = p.iat;
                    conn.send(protocol::reply("authenticated", id, json!({ "user": p.user, "exp": p.exp }))).await;
                }
                Ok(p) => {
                    let e = ApiError::forbidden(format!(
                        "this connection is {}'s; a token for {} needs a connection of its own",
                        current.user, p.user
                    ));
                    conn.error(id, &e).await;
                }
                Err(e) => conn.error(id, &e).await,
            };
        }
        let cursor = match cursor.as_deref().map(Cursor::parse).transpose() {
            Ok(c) => c,
            Err(e) => {
                conn.error(id, &e).await;
                return conn.close(close::INVALID_CURSOR, "invalid cursor");
            }
        };
        let node = conn.node.clone();
        let authenticated =
            on_node(work, async move { ops::authenticate(&node, Some(&format!("Bearer {token}"))).await })
                .await
                .unwrap_or_else(|| {
                    Err(ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "unavailable", "try again"))
                });
        match authenticated {
            Ok(p) => {
                conn.send(protocol::reply("authenticated", id, json!({ "user": p.user, "exp": p.exp }))).await;
                let (c, u) = (conn.clone(), p.user.clone());
                tasks.spawn_on(
                    async move {
                        super::push::run(c, u, cursor).await;
                        false
                    },
                    work,
                );
                *who = Some(p);
            }
            Err(e) => {
                conn.error(id, &e).await;
                conn.close(close::UNAUTHORIZED, &e.message);
            }
        }
        return;
    }
    let Some(p) = who.clone() else {
        let e = ApiError::new(axum::http::StatusCode::UNAUTHORIZED, "unauthenticated", "send an auth frame first");
        return conn.error(frame_id(&frame), &e).await;
    };
    let Ok(permit) = permits.clone().try_acquire_owned() else {
        let e = ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "busy",
            format!("at most {} requests in flight per connection", conn.node.cfg.ws_max_in_flight),
        );
        return conn.error(frame_id(&frame), &e).await;
    };
    // Node-wide admission, here on the reader, so that a refusal does not wait for the node.
    let mut admitted = None;
    if matches!(frame, ClientFrame::Send { .. }) {
        // The user's token is taken here with the permit, so that one user's flood holds at
        // most their burst of the node's permits.
        if let Err(wait) = conn.node.send_rate.take(&p.user) {
            conn.node.metrics.count_request("ws", "send", "rate_limited");
            return conn.error(frame_id(&frame), &ops::user_rate_limited(&conn.node, &p.user, wait)).await;
        }
        match conn.node.admission.try_acquire() {
            Some(p) => admitted = Some(p),
            None => {
                conn.node.metrics.count_request("ws", "send", "overloaded");
                return conn.error(frame_id(&frame), &ops::node_overloaded(&conn.node)).await;
            }
        }
    }
    let conn = conn.clone();
    conn.node.metrics.ws_request_tasks.inc();
    *requests_held += 1;
    tasks.spawn_on(
        async move {
            let _permit = permit;
            // The node's admission limit times the send from here, where the node starts on it.
            if let Some(p) = admitted.as_mut() {
                p.start_now();
            }
            let id = frame_id(&frame);
            let node = &conn.node;
            let op = match &frame {
                ClientFrame::Send { .. } => "send",
                ClientFrame::History { .. } => "history",
                ClientFrame::Conversations { .. } => "conversations",
                ClientFrame::MarkRead { .. } => "mark_read",
                ClientFrame::Ack { .. } => "ack",
                ClientFrame::Auth { .. } => "auth",
            };
            let text = match frame {
                ClientFrame::Send { id, to, client_msg_id, text } => {
                    ops::send(node, &p, ops::SendRequest { to, client_msg_id, text }, admitted)
                        .await
                        .map(|r| protocol::reply("sent", id, r))
                }
                ClientFrame::History { id, conversation_id, before, after, limit } => {
                    ops::history(node, &p, &conversation_id, before, after, limit)
                        .await
                        .map(|r| protocol::reply("history", id, r))
                }
                ClientFrame::Conversations { id, limit, cursor } => {
                    ops::conversations(node, &p, limit, cursor.as_deref())
                        .await
                        .map(|r| protocol::reply("conversations", id, r))
                }
                ClientFrame::MarkRead { id, conversation_id, seq } => {
                    ops::mark_read(node, &p, &conversation_id, seq).await.map(|r| protocol::reply("marked_read", id, r))
                }
                ClientFrame::Ack { id, conversation_id, seq } => ops::ack_delivered(node, &p, &conversation_id, seq)
                    .await
                    .map(|()| protocol::reply("acked", id, json!({ "conversation_id": conversation_id, "seq": seq }))),
                ClientFrame::Auth { .. } => unreachable!("handled above"),
            };
            match text {
                Ok(t) => {
                    node.metrics.count_request("ws", op, "ok");
                    conn.send(t).await;
                }
                Err(e) => {
                    node.metrics.count_request("ws", op, e.code);
                    conn.error(id, &e).await
                }
            }
            true
        },
        work,
    );
}

fn frame_id(f: &ClientFrame) -> Option<Value> {
    match f {
        ClientFrame::Auth { id, .. }
        | ClientFrame::Send { id, .. }
        | ClientFrame::History { id, .. }
        | ClientFrame::Conversations { id, .. }
        | ClientFrame::MarkRead { id, .. }
        | ClientFrame::Ack { id, .. } => id.clone(),
    }
}
