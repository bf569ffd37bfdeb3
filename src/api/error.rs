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
}

/// The JSON body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
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
                format!("{e}; retry with the same client_msg_id, it will not create a second message"),
            ),
            ShardError::NotLeader { .. } | ShardError::NotReplica { .. } | ShardError::Unavailable { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())
            }
            ShardError::Storage(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { code: self.code.to_string(), message: self.message };
        (self.status, axum::Json(body)).into_response()
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
            _ => Code::Internal,
        };
        tonic::Status::new(code, format!("{}: {}", e.code, e.message))
    }
}
