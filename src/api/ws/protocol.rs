//! Frames of the WebSocket protocol (see `docs/protocol.md`).

use crate::api::ApiError;
use serde::Deserialize;
use serde_json::{json, Value};
use std::fmt;

/// Close codes (4000–4999 are the application's).
pub mod close {
    /// The token was missing, invalid or expired, or no `auth` frame came in time.
    pub const UNAUTHORIZED: u16 = 4001;
    /// The resume cursor does not exist in this user's stream.
    pub const INVALID_CURSOR: u16 = 4002;
    /// No frame (not even a pong) for three ping intervals.
    pub const IDLE: u16 = 4004;
    /// The client read too slowly; reconnect with its last cursor.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The server is shutting down; reconnect (to any node) with the last cursor.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A frame was larger than the hard limit (1 MiB).
    pub const TOO_BIG: u16 = 1009;
}

/// A position in a user's delivery stream: every event before `event` was delivered,
/// and the first `frames` frames of `event`. Written `"<event>.<frames>"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub event: u64,
    pub frames: u64,
}

impl Cursor {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let bad = || {
            ApiError::bad_request("invalid_cursor", format!("cursor must be '<event>.<frame>' as pushed, got {s:?}"))
        };
        let (e, f) = s.split_once('.').ok_or_else(bad)?;
        let event: u64 = e.parse().map_err(|_| bad())?;
        let frames: u64 = f.parse().map_err(|_| bad())?;
        if event == 0 {
            return Err(bad());
        }
        Ok(Self { event, frames })
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.event, self.frames)
    }
}

/// A request from the client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    Auth {
        id: Option<Value>,
        token: String,
        cursor: Option<String>,
    },
    Send {
        id: Option<Value>,
        to: String,
        client_msg_id: String,
        text: String,
    },
    History {
        id: Option<Value>,
        conversation_id: String,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    },
    Conversations {
        id: Option<Value>,
        limit: Option<u32>,
        cursor: Option<String>,
    },
    MarkRead {
        id: Option<Value>,
        conversation_id: String,
        seq: u64,
    },
    /// Delivered receipt: this device received the conversation's messages up to `seq`.
    Ack {
        id: Option<Value>,
        conversation_id: String,
        seq: u64,
    },
}

pub const TYPES: &[&str] = &["auth", "send", "history", "conversations", "mark_read", "ack"];

/// Parses a text frame. On failure returns the request id (if readable) and the error.
pub fn parse(text: &str) -> Result<ClientFrame, (Option<Value>, ApiError)> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| (None, ApiError::bad_request("invalid_json", format!("frame is not JSON: {e}"))))?;
    let id = v.get("id").cloned();
    let Some(t) = v.get("type").and_then(Value::as_str) else {
        return Err((id, ApiError::bad_request("missing_type", "every frame needs a string \"type\"")));
    };
    if !TYPES.contains(&t) {
        return Err((id, ApiError::bad_request("unknown_type", format!("unknown frame type {t:?}; known: {TYPES:?}"))));
    }
    serde_json::from_value(v).map_err(|e| (id, ApiError::bad_request("invalid_request", e.to_string())))
}

pub fn error_frame(id: Option<Value>, e: &ApiError) -> String {
    let mut v = json!({ "type": "error", "code": e.code, "message": e.message });
    if let Some(ms) = e.retry_after_ms {
        v["retry_after_ms"] = json!(ms);
    }
    if let Some(id) = id {
        v["id"] = id;
    }
    v.to_string()
}

/// A reply frame: `body`'s fields plus `type` and the request's `id`.
pub fn reply(kind: &str, id: Option<Value>, body: impl serde::Serialize) -> String {
    let mut v = serde_json::to_value(body).unwrap_or_else(|_| json!({}));
    if !v.is_object() {
        v = json!({ "result": v });
    }
    v["type"] = json!(kind);
    if let Some(id) = id {
        v["id"] = id;
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor::parse("17.3").unwrap();
        assert_eq!((c.event, c.frames), (17, 3));
        assert_eq!(c.to_string(), "17.3");
        for bad in ["", "17", "a.b", "0.0", "1.-1", "1.2.3"] {
            assert!(Cursor::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn frames_are_checked_with_clear_codes() {
        assert_eq!(parse("nope").unwrap_err().1.code, "invalid_json");
        assert_eq!(parse("{}").unwrap_err().1.code, "missing_type");
        let (id, e) = parse(r#"{"type":"photo","id":7}"#).unwrap_err();
        assert_eq!((id, e.code), (Some(json!(7)), "unknown_type"));
        assert_eq!(parse(r#"{"type":"send","to":"bob"}"#).unwrap_err().1.code, "invalid_request");
        assert_eq!(
            parse(r#"{"type":"ack","conversation_id":"a~b","seq":1,"x":1}"#).unwrap_err().1.code,
            "invalid_request"
        );
        assert!(matches!(parse(r#"{"type":"ack","conversation_id":"a~b","seq":1}"#), Ok(ClientFrame::Ack { .. })));
    }
}
