//! Frames from server to client.
//!
//! Stored room events carry `seq`. The gateway serializes them with `seq: 0`, which is left out
//! of the JSON, and the broker puts the assigned seq in front ([`crate::envelope::with_seq`]),
//! so an event is encoded once and the seq is assigned atomically where it is published.

use serde::{Deserialize, Serialize};

use crate::errors::ErrorCode;
use crate::ids::{MessageId, Ref, RoomId, Timestamp, UserRef};
use crate::rooms::{MessageView, PinView, Role, RoomInfo, RoomSummary};

/// Limits the server enforces, announced in `hello`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_content_chars: usize,
    pub messages_per_s: u32,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent {
    Hello {
        session_id: String,
        user: UserRef,
        node: String,
        heartbeat_s: u32,
        limits: Limits,
    },
    /// Answer to a command without a result frame of its own; for `message` it carries
    /// `id`, `seq` and `ts`.
    Ack {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        r#ref: Option<Ref>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<MessageId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ts: Option<Timestamp>,
    },
    Error {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        r#ref: Option<Ref>,
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    Pong {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        r#ref: Option<Ref>,
    },
    Joined {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        r#ref: Option<Ref>,
        room: RoomInfo,
        /// The room's last stored seq when the join completed.
        seq: u64,
        online: Vec<UserRef>,
        pins: Vec<PinView>,
        recovered: bool,
        /// The caller's role, when a member.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role: Option<Role>,
        /// Stored events after the caller's read marker.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unread: Option<u64>,
    },
    Left {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        r#ref: Option<Ref>,
        room: RoomId,
    },
    Message {
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        room: RoomId,
        id: MessageId,
        user: UserRef,
        content: String,
        ts: Timestamp,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<MessageId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
    },
    MessageEdited {
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        room: RoomId,
        id: MessageId,
        content: String,
        edited_at: Timestamp,
    },
    MessageDeleted {
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        room: RoomId,
        id: MessageId,
        by: UserRef,
    },
    Typing {
        room: RoomId,
        user: UserRef,
    },
    StopTyping {
        room: RoomId,
        user: UserRef,
    },
    Join {
        room: RoomId,
        user: UserRef,
    },
    Leave {
        room: RoomId,
        user: UserRef,
    },
    OnlineUsers {
        room: RoomId,
        users: Vec<UserRef>,
        count: u64,
    },
    /// `user` has read the room up to `seq` (here `seq` is the read marker, not an event seq).
    Receipt {
        room: RoomId,
        user: UserRef,
        seq: u64,
    },
    Pinned {
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        room: RoomId,
        message: MessageView,
        by: UserRef,
        pinned_at: Timestamp,
    },
    Unpinned {
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        room: RoomId,
        id: MessageId,
        by: UserRef,
    },
    RoomCreated {
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        room: RoomInfo,
    },
    RoomUpdated {
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        room: RoomInfo,
    },
    RoomDeleted {
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        room: RoomId,
        by: UserRef,
    },
    MemberAdded {
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        room: RoomId,
        user: UserRef,
        role: Role,
        by: UserRef,
    },
    MemberRemoved {
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        room: RoomId,
        user: UserRef,
        by: UserRef,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    MemberUpdated {
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        room: RoomId,
        user: UserRef,
        role: Role,
        by: UserRef,
    },
    Banned {
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        room: RoomId,
        user: UserRef,
        by: UserRef,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<Timestamp>,
    },
    Unbanned {
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        room: RoomId,
        user: UserRef,
        by: UserRef,
    },
    Muted {
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        room: RoomId,
        user: UserRef,
        by: UserRef,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<Timestamp>,
    },
    Unmuted {
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        room: RoomId,
        user: UserRef,
        by: UserRef,
    },
    Rooms {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        r#ref: Option<Ref>,
        rooms: Vec<RoomSummary>,
    },
    /// Site-wide announcement.
    Notice {
        content: String,
        ts: Timestamp,
    },
    /// The node is draining: reconnect after `after_ms`.
    Reconnect {
        after_ms: u64,
    },
}

impl ServerEvent {
    /// The stored-event seq this frame carries (0 for ephemeral and direct frames).
    pub fn seq(&self) -> u64 {
        use ServerEvent::*;
        match self {
            Message { seq, .. }
            | MessageEdited { seq, .. }
            | MessageDeleted { seq, .. }
            | Pinned { seq, .. }
            | Unpinned { seq, .. }
            | RoomCreated { seq, .. }
            | RoomUpdated { seq, .. }
            | RoomDeleted { seq, .. }
            | MemberAdded { seq, .. }
            | MemberRemoved { seq, .. }
            | MemberUpdated { seq, .. }
            | Banned { seq, .. }
            | Unbanned { seq, .. }
            | Muted { seq, .. }
            | Unmuted { seq, .. } => *seq,
            _ => 0,
        }
    }

    /// Serializes to the JSON text sent on the socket.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("server events always serialize")
    }

    pub fn error(r#ref: Option<Ref>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerEvent::Error {
            r#ref,
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
}
