//! Protocol error codes and WebSocket close codes, mapped once to HTTP statuses here.

use serde::{Deserialize, Serialize};

/// The `code` of an `error` frame and of an HTTP error body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Bad JSON, bad field, unknown type.
    Invalid,
    Unauthorized,
    Forbidden,
    NotFound,
    /// Room id taken.
    Conflict,
    TooLarge,
    /// Comes with `retry_after_ms`.
    RateLimited,
    Muted,
    Banned,
    RoomFull,
    /// A backend is down; retry.
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Invalid => "invalid",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Muted => "muted",
            ErrorCode::Banned => "banned",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status that carries this code in the HTTP API.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::Invalid => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden | ErrorCode::Muted | ErrorCode::Banned => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict | ErrorCode::RoomFull => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

/// The body of every HTTP error: `{"error":{"code":..,"message":..}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpError {
    pub error: HttpErrorBody,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl HttpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: HttpErrorBody {
                code,
                message: message.into(),
            },
        }
    }
}

/// WebSocket close codes the server uses.
pub mod close {
    /// A WebSocket protocol violation (a continuation frame with no message to continue, a
    /// new message inside a fragmented one).
    pub const PROTOCOL: u16 = 1002;
    /// A text message that is not UTF-8.
    pub const INVALID_UTF8: u16 = 1007;
    /// Policy violation: persistent abuse, token expired while connected, removed by the server.
    pub const POLICY: u16 = 1008;
    /// A message (one frame, or the fragments of one) over `max_frame_bytes`.
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    /// The node is restarting (drain): reconnect elsewhere.
    pub const RESTARTING: u16 = 1012;
    /// The client reads too slowly and its outbound queue overflowed.
    pub const SLOW_CONSUMER: u16 = 1013;
}
