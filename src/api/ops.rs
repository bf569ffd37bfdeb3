//! The client operations, shared by the HTTP and gRPC front ends: authenticate, check the
//! request, authorize (users act as themselves and read only their own conversations),
//! then route to the owning shard's leader.

use super::ApiError;
use crate::auth::Principal;
use crate::chat::types::{validate_client_msg_id, validate_text};
use crate::chat::{ConversationId, Message, ReceiptKind, UserId};
use crate::node::admission::Permit;
use crate::node::router::{ShardOp, ShardReply};
use crate::node::Node;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_PAGE: u32 = 200;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    pub to: String,
    pub client_msg_id: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendResponse {
    pub conversation_id: String,
    pub seq: u64,
    pub ts: u64,
    /// True when this `client_msg_id` was already sent: nothing new was written.
    pub duplicate: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryResponse {
    pub conversation_id: String,
    pub last_seq: u64,
    pub messages: Vec<Message>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConversationSummary {
    pub conversation_id: String,
    pub peer: String,
    pub last_seq: u64,
    pub last_ts: u64,
    pub last_from: Option<String>,
    pub preview: String,
    pub read_seq: u64,
    pub unread: u64,
    /// Receipts from the peer: their devices received / read your messages up to here.
    pub peer_delivered_seq: u64,
    pub peer_read_seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConversationsResponse {
    pub conversations: Vec<ConversationSummary>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarkReadRequest {
    pub seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MarkReadResponse {
    pub read_seq: u64,
    pub unread: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub user: String,
}

/// Verifies the bearer token and registers its user on first sight.
pub async fn authenticate(node: &Arc<Node>, header: Option<&str>) -> Result<Principal, ApiError> {
    let who = node.keys.verify_header(header)?;
    if node.token_revoked(&who).await? {
        return Err(token_revoked());
    }
    node.ensure_registered(&who.user, node.request_deadline()).await?;
    Ok(who)
}

/// Revokes every token of `user` issued before this second; returns the mark. This node
/// knows at once, the others within `revocation_check_secs`.
pub async fn revoke_tokens(node: &Arc<Node>, user: &UserId) -> Result<u64, ApiError> {
    node.require_version(2, "token revocation")?;
    let before = crate::auth::now_secs();
    let cmd = crate::chat::Command::RevokeTokens { user: user.clone(), before };
    node.call(node.placement.shard_of_user(user), ShardOp::Write(cmd), node.request_deadline()).await?;
    node.note_revocation(user, before);
    tracing::info!(%user, before, "tokens revoked");
    Ok(before)
}

/// A token issued before its user's revocation mark.
pub fn token_revoked() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::UNAUTHORIZED,
        "token_revoked",
        "this token was revoked (a password change or a log-out everywhere); log in again",
    )
}

fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(l) if (1..=MAX_PAGE).contains(&l) => Ok(l),
        Some(l) => Err(ApiError::bad_request("invalid_limit", format!("limit must be in 1..={MAX_PAGE}, got {l}"))),
    }
}

/// Parses a conversation id and checks that `who` takes part in it.
fn own_conversation(who: &Principal, id: &str) -> Result<ConversationId, ApiError> {
    let c = ConversationId::parse(id)?;
    if !c.has_participant(&who.user) {
        return Err(ApiError::forbidden(format!("{} is not a participant of conversation {c}", who.user)));
    }
    Ok(c)
}

fn unexpected(r: ShardReply) -> ApiError {
    ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("unexpected shard reply {r:?}"))
}

/// Fault injection for tests (`RAFTCHAT_FAULT=stall-runtime`): an admitted send whose text
/// contains [`STALL_MARKER`] blocks the thread running it (with one worker thread, the node's
/// whole runtime) while it holds its admission permit, until a file [`STALL_RELEASE`]
/// appears in the data folder or [`STALL_AT_MOST`] has passed. Off unless the variable is set.
pub const STALL_RUNTIME: &str = "stall-runtime";
pub const STALL_MARKER: &str = "[stall-runtime]";
pub const STALL_RELEASE: &str = "release-stall";
pub const STALL_AT_MOST: std::time::Duration = std::time::Duration::from_secs(30);

fn stall_runtime(node: &Node) {
    let release = node.cfg.data_dir.join(STALL_RELEASE);
    tracing::error!(release = %release.display(), "fault injection: blocking this runtime thread");
    let start = std::time::Instant::now();
    while !release.exists() && start.elapsed() < STALL_AT_MOST {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The refusal of a send past its user's send rate (`429 rate_limited`), counted.
pub fn user_rate_limited(node: &Node, user: &UserId, wait: std::time::Duration) -> ApiError {
    node.metrics.shed.with_label_values(&["user_rate"]).inc();
    ApiError::rate_limited(
        format!(
            "{user} may send {} messages a second (bursts of {}); nothing was written",
            node.cfg.user_send_rate, node.cfg.user_send_burst
        ),
        wait.as_millis() as u64 + 1,
    )
}

/// The refusal of a send past the node's admission limit (`503 overloaded`), counted.
pub fn node_overloaded(node: &Node) -> ApiError {
    node.metrics.shed.with_label_values(&["node"]).inc();
    ApiError::overloaded(
        format!("this node is at its limit of {} sends in flight; nothing was written", node.admission.limit()),
        node.cfg.overload_retry_after_ms,
    )
}

/// A send. `admitted` is the node-wide admission permit when the caller already took it,
/// and with it the user's send-rate token (the HTTP listener's front runtime does,
/// `api::http::front_gate`, and so does a WebSocket session's reader); otherwise both are
/// taken here, or the send is refused with `429 rate_limited` or `503 overloaded`.
pub async fn send(
    node: &Arc<Node>,
    who: &Principal,
    req: SendRequest,
    admitted: Option<Permit>,
) -> Result<SendResponse, ApiError> {
    let to = UserId::parse(&req.to)?;
    validate_client_msg_id(&req.client_msg_id)?;
    validate_text(&req.text, node.cfg.max_text_bytes)?;
    let conversation = ConversationId::between(&who.user, &to)?;
    if admitted.is_none() {
        if let Err(wait) = node.send_rate.take(&who.user) {
            return Err(user_rate_limited(node, &who.user, wait));
        }
    }
    // Node-wide admission: refuse at once rather than queue without bound.
    let Some(permit) = admitted.or_else(|| node.admission.try_acquire()) else {
        return Err(node_overloaded(node));
    };
    let res = send_admitted(node, who, req, to, conversation).await;
    permit.finish(matches!(&res, Err(e) if e.code == "timeout"));
    res
}

async fn send_admitted(
    node: &Arc<Node>,
    who: &Principal,
    req: SendRequest,
    to: UserId,
    conversation: ConversationId,
) -> Result<SendResponse, ApiError> {
    if node.fault.as_deref() == Some(STALL_RUNTIME) && req.text.contains(STALL_MARKER) {
        stall_runtime(node);
    }
    let deadline = node.request_deadline();
    if !node.user_exists(&to, deadline).await? {
        return Err(ApiError::not_found("unknown_user", format!("no user {to}")));
    }
    let shard = node.placement.shard_of_conversation(&conversation);
    // One id per client request: the router's retries of this request carry it, so a retry
    // that finds the message already stored is not reported as the client's duplicate.
    let attempt = rand::random::<u64>().max(1);
    let op = ShardOp::Send {
        from: who.user.clone(),
        to,
        client_msg_id: req.client_msg_id,
        text: req.text,
        attempt,
        admitted: false,
    };
    match node.call(shard, op, deadline).await? {
        ShardReply::Sent { conversation, seq, ts, duplicate } => {
            Ok(SendResponse { conversation_id: conversation.to_string(), seq, ts, duplicate })
        }
        r => Err(unexpected(r)),
    }
}

pub async fn history(
    node: &Arc<Node>,
    who: &Principal,
    conversation_id: &str,
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<u32>,
) -> Result<HistoryResponse, ApiError> {
    let conversation = own_conversation(who, conversation_id)?;
    let limit = page_limit(limit)?;
    if before.is_some() && after.is_some() {
        return Err(ApiError::bad_request("invalid_range", "give at most one of before and after"));
    }
    let shard = node.placement.shard_of_conversation(&conversation);
    let op = ShardOp::History { conversation: conversation.clone(), before, after, limit };
    match node.call(shard, op, node.request_deadline()).await {
        Ok(ShardReply::History { last_seq, messages }) => {
            Ok(HistoryResponse { conversation_id: conversation.to_string(), last_seq, messages })
        }
        Ok(r) => Err(unexpected(r)),
        Err(crate::node::router::ShardError::NotFound { .. }) => {
            Err(ApiError::not_found("unknown_conversation", format!("conversation {conversation} has no messages")))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn conversations(
    node: &Arc<Node>,
    who: &Principal,
    limit: Option<u32>,
    cursor: Option<&str>,
) -> Result<ConversationsResponse, ApiError> {
    let limit = page_limit(limit)?;
    let cursor = match cursor {
        None | Some("") => None,
        Some(c) => Some(decode_cursor(c)?),
    };
    let shard = node.placement.shard_of_user(&who.user);
    let op = ShardOp::Recent { user: who.user.clone(), cursor, limit };
    match node.call(shard, op, node.request_deadline()).await? {
        ShardReply::Recent { items, next } => Ok(ConversationsResponse {
            conversations: items
                .into_iter()
                .map(|(c, e)| ConversationSummary {
                    conversation_id: c.to_string(),
                    peer: e.peer.to_string(),
                    last_seq: e.last_seq,
                    last_ts: e.last_ts,
                    last_from: e.last_from.as_ref().map(|u| u.to_string()),
                    preview: e.preview.clone(),
                    read_seq: e.read_seq,
                    unread: e.unread(),
                    peer_delivered_seq: e.peer_delivered_seq,
                    peer_read_seq: e.peer_read_seq,
                })
                .collect(),
            next_cursor: next.map(|n| B64.encode(n)),
        }),
        r => Err(unexpected(r)),
    }
}

/// A cursor is opaque to clients: the last row's position in the listing's order, 8 bytes of
/// its inverted `last_ts` and its conversation id (`storage::keys::order`; the stored
/// recency key may sit up to a minute behind it, see `ShardView::recent`).
pub fn decode_cursor(c: &str) -> Result<Vec<u8>, ApiError> {
    let bad = || ApiError::bad_request("invalid_cursor", "cursor must be a next_cursor value returned by this API");
    let raw = B64.decode(c).map_err(|_| bad())?;
    if raw.len() <= 8 {
        return Err(bad());
    }
    let conv = std::str::from_utf8(&raw[8..]).map_err(|_| bad())?;
    ConversationId::parse(conv).map_err(|_| bad())?;
    Ok(raw)
}

pub async fn mark_read(
    node: &Arc<Node>,
    who: &Principal,
    conversation_id: &str,
    seq: u64,
) -> Result<MarkReadResponse, ApiError> {
    let conversation = own_conversation(who, conversation_id)?;
    if seq == 0 {
        return Err(ApiError::bad_request("invalid_seq", "seq must be >= 1"));
    }
    let deadline = node.request_deadline();
    check_seq_exists(node, &conversation, seq, deadline).await?;
    let cmd = crate::chat::Command::MarkRead { user: who.user.clone(), conversation: conversation.clone(), seq };
    let (read_seq, unread) =
        match node.call(node.placement.shard_of_user(&who.user), ShardOp::Write(cmd), deadline).await? {
            ShardReply::Written(crate::chat::Reply::ReadMarked { read_seq, unread }) => (read_seq, unread),
            r => return Err(unexpected(r)),
        };
    // The read receipt goes to the peer's inbox (their devices show it).
    send_receipt(node, who, &conversation, ReceiptKind::Read, read_seq, deadline).await?;
    Ok(MarkReadResponse { read_seq, unread })
}

/// A receipt or read mark names a message that exists (checked on the conversation shard, the
/// authority on its last seq).
async fn check_seq_exists(
    node: &Arc<Node>,
    conversation: &ConversationId,
    seq: u64,
    deadline: tokio::time::Instant,
) -> Result<(), ApiError> {
    let conv_shard = node.placement.shard_of_conversation(conversation);
    let last = match node.call(conv_shard, ShardOp::LastSeq { conversation: conversation.clone() }, deadline).await {
        Ok(ShardReply::LastSeq(l)) => l,
        Ok(r) => return Err(unexpected(r)),
        Err(crate::node::router::ShardError::NotFound { .. }) => {
            return Err(ApiError::not_found(
                "unknown_conversation",
                format!("conversation {conversation} has no messages"),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    if seq > last {
        return Err(ApiError::bad_request(
            "seq_out_of_range",
            format!("seq {seq} is past the conversation's last message {last}"),
        ));
    }
    Ok(())
}

/// A delivered receipt: this user's device received the peer's messages up to `seq`.
pub async fn ack_delivered(node: &Arc<Node>, who: &Principal, conversation_id: &str, seq: u64) -> Result<(), ApiError> {
    let conversation = own_conversation(who, conversation_id)?;
    if seq == 0 {
        return Err(ApiError::bad_request("invalid_seq", "seq must be >= 1"));
    }
    let deadline = node.request_deadline();
    check_seq_exists(node, &conversation, seq, deadline).await?;
    send_receipt(node, who, &conversation, ReceiptKind::Delivered, seq, deadline).await
}

async fn send_receipt(
    node: &Arc<Node>,
    who: &Principal,
    conversation: &ConversationId,
    receipt: ReceiptKind,
    seq: u64,
    deadline: tokio::time::Instant,
) -> Result<(), ApiError> {
    let Some(peer) = conversation.peer_of(&who.user) else {
        return Err(ApiError::forbidden("not a participant"));
    };
    let cmd = crate::chat::Command::Receipt {
        user: peer.clone(),
        conversation: conversation.clone(),
        by: who.user.clone(),
        receipt,
        seq,
        ts: crate::storage::sm::now_ms(),
        uncounted: node.cfg.uncounted_inbox(),
    };
    node.call(node.placement.shard_of_user(peer), ShardOp::Write(cmd), deadline).await?;
    Ok(())
}

/// Registers a user; operators only (tokens minted with `--admin`).
pub async fn register(node: &Arc<Node>, who: &Principal, user: &str) -> Result<(), ApiError> {
    if !who.admin {
        return Err(ApiError::forbidden("registering users needs an operator token (raftchat token --admin)"));
    }
    let user = UserId::parse(user)?;
    node.ensure_registered(&user, node.request_deadline()).await?;
    Ok(())
}
