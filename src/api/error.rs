//! The one error type of the client API: an HTTP status, a stable machine-readable `code`
//! and a message stating the rule, rendered as `{"code": "...", "message": "..."}` (and as
//! a gRPC status for the gRPC API).

use crate::auth::AuthError;
use crate::chat::ValidationError;
use crate::node::router::ShardError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// For `503 overloaded`: when to try again, in milliseconds (HTTP: a `Retry-After`
    /// header in whole seconds; WebSocket: `retry_after_ms` in the error frame).
    pub retry_after_ms: Option<u64>,
}

/// The JSON body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after_ms: None }
    }
    /// `503 overloaded`: refused at once because a bound on in-flight work was reached;
    /// nothing was written, so a retry after `retry_after_ms` is safe.
    pub fn overloaded(message: impl Into<String>, retry_after_ms: u64) -> Self {
        Self {
            retry_after_ms: Some(retry_after_ms),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
        }
    }
    /// `429 rate_limited`: the user's send rate was exceeded; nothing was written.
    pub fn rate_limited(message: impl Into<String>, retry_after_ms: u64) -> Self {
        Self {
            retry_after_ms: Some(retry_after_ms),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let code = match e {
            AuthError::Missing => "missing_token",
            AuthError::Expired => "token_expired",
            _ => "invalid_token",
        };
        ApiError::new(StatusCode::UNAUTHORIZED, code, e.to_string())
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        let code = match e {
            ValidationError::BadUserId { .. } => "invalid_user",
            ValidationError::BadConversationId { .. } => "invalid_conversation",
            ValidationError::BadClientMsgId => "invalid_client_msg_id",
            ValidationError::EmptyText => "empty_text",
            ValidationError::TextTooLong { .. } => "text_too_long",
            ValidationError::ControlCharacters => "invalid_text",
            ValidationError::SelfSend => "self_send",
        };
        ApiError::bad_request(code, e.to_string())
    }
}

impl From<ShardError> for ApiError {
    fn from(e: ShardError) -> Self {
        match &e {
            ShardError::NotFound { .. } => ApiError::not_found("not_found", e.to_string()),
            ShardError::Invalid(_) => ApiError::bad_request("invalid_request", e.to_string()),
            ShardError::Timeout { .. } => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                // Not only sends time out (admin operations, reads): the hint says what holds.
                format!("{e}; a send retried with the same client_msg_id is not stored twice"),
            ),
            ShardError::NotLeader { .. }
            | ShardError::NotReplica { .. }
            | ShardError::Moved { .. }
            | ShardError::Unavailable { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())
            }
            ShardError::Storage(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
            ShardError::Overloaded { retry_after_ms, .. } => {
                ApiError::overloaded(format!("{e}; nothing was written"), *retry_after_ms)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { code: self.code.to_string(), message: self.message };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(ms) = self.retry_after_ms {
            let secs = ms.div_ceil(1000).max(1);
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(secs));
        }
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the oversized body was never read, so the server closes the
            // connection after this answer; saying so keeps the client from reusing it
            // for its next request (which would then fail with an incomplete message).
            resp.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
        }
        resp
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        use tonic::Code;
        let code = match e.status {
            StatusCode::BAD_REQUEST => Code::InvalidArgument,
            StatusCode::UNAUTHORIZED => Code::Unauthenticated,
            StatusCode::FORBIDDEN => Code::PermissionDenied,
            StatusCode::NOT_FOUND => Code::NotFound,
            StatusCode::GATEWAY_TIMEOUT => Code::DeadlineExceeded,
            StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
            StatusCode::TOO_MANY_REQUESTS => Code::ResourceExhausted,
            _ => Code::Internal,
        };
        tonic::Status::new(code, format!("{}: {}", e.code, e.message))
    }
}
