//! The WebSocket front end, `/v1/ws`: requests over the socket and pushed delivery.
//! The wire protocol is specified in `docs/protocol.md`.
//!
//! - [`protocol`]: client frames, server frames, cursors and close codes.
//! - [`session`]: one connection: auth, request dispatch, the bounded outgoing queue,
//!   keepalive and the slow-consumer close.
//! - [`push`]: turns the user's inbox into pushed messages and receipts, resuming from a
//!   cursor and following the user shard's leader.

pub mod protocol;
pub mod push;
pub mod session;

use super::listener::FrontRuntime;
use super::ApiError;
use crate::node::Node;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;
use std::sync::Arc;

/// Frames larger than this end the connection at the WebSocket layer (close 1009);
/// frames over `max_body_bytes` but under this get a `frame_too_large` error frame.
pub const HARD_FRAME_LIMIT: usize = 1 << 20;

#[derive(Debug, Deserialize)]
pub struct WsQuery {
    access_token: Option<String>,
    cursor: Option<String>,
}

/// `GET /v1/ws`: authenticate (header or `access_token`; or later with an `auth` frame),
/// check the cursor, upgrade.
pub async fn upgrade(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    query: Result<Query<WsQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    front: Option<Extension<FrontRuntime>>,
) -> Response {
    let r = async {
        let ws = ws.map_err(|e| ApiError::bad_request("not_websocket", e.body_text()))?;
        let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
        let header = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let token = header.map(str::to_string).or(q.access_token.map(|t| format!("Bearer {t}")));
        let who = match token {
            Some(t) => Some(super::ops::authenticate(&node, Some(&t)).await?),
            None => None,
        };
        let cursor = q.cursor.as_deref().map(protocol::Cursor::parse).transpose()?;
        Ok::<_, ApiError>((ws, who, cursor))
    }
    .await;
    match r {
        Ok((ws, who, cursor)) => ws
            .max_message_size(HARD_FRAME_LIMIT)
            .on_upgrade(move |socket| async move {
                // The session's reader and writer go to the listener's front runtime; its node
                // work stays on this one (`session`).
                let work = tokio::runtime::Handle::current();
                match front {
                    Some(Extension(FrontRuntime(f))) => drop(f.spawn(session::run(node, socket, who, cursor, work))),
                    None => session::run(node, socket, who, cursor, work).await,
                }
            })
            .into_response(),
        Err(e) => e.into_response(),
    }
}
