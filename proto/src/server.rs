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
        /// The epoch the room's seqs count in (opaque); a later `join` sends it back beside
        /// `since`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
        /// Users online in the room: all of them in a room of up to 100, else 100 of them.
        online: Vec<UserRef>,
        /// How many users are online in the room (exact).
        #[serde(default)]
        online_count: u64,
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
        /// Big rooms, whose users are not announced one by one (`join`/`leave`): some of the
        /// users who came online since the node's previous announcement...
        #[serde(default, skip_serializing_if = "Option::is_none")]
        joined: Option<Vec<UserRef>>,
        /// ...and how many (exact).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        joined_count: Option<u64>,
        /// Likewise for users who went offline.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        left: Option<Vec<UserRef>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        left_count: Option<u64>,
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
    /// The connection's token expires at `expires_at` (in `expires_in_s` seconds, by the
    /// server's clock): send `refresh {token}` before, or the connection is closed (1008).
    TokenExpiring {
        expires_at: Timestamp,
        expires_in_s: u64,
    },
}

/// The `type` of a server frame, for code that routes frames by kind — read from a typed
/// event ([`ServerEvent::kind`]) or from the tag of a serialized one ([`EventKind::parse`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Hello,
    Ack,
    Error,
    Pong,
    Joined,
    Left,
    Message,
    MessageEdited,
    MessageDeleted,
    Typing,
    StopTyping,
    Join,
    Leave,
    OnlineUsers,
    Receipt,
    Pinned,
    Unpinned,
    RoomCreated,
    RoomUpdated,
    RoomDeleted,
    MemberAdded,
    MemberRemoved,
    MemberUpdated,
    Banned,
    Unbanned,
    Muted,
    Unmuted,
    Rooms,
    Notice,
    Reconnect,
    TokenExpiring,
}

/// Whom a stored room event takes out of the room on every node, once it is delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evicts {
    /// The event's `user` (`banned`, `member_removed`).
    Subject,
    /// Everyone (`room_deleted`).
    Everyone,
}

impl EventKind {
    /// Every kind, in declaration order.
    pub const ALL: [EventKind; 31] = {
        use EventKind::*;
        [
            Hello,
            Ack,
            Error,
            Pong,
            Joined,
            Left,
            Message,
            MessageEdited,
            MessageDeleted,
            Typing,
            StopTyping,
            Join,
            Leave,
            OnlineUsers,
            Receipt,
            Pinned,
            Unpinned,
            RoomCreated,
            RoomUpdated,
            RoomDeleted,
            MemberAdded,
            MemberRemoved,
            MemberUpdated,
            Banned,
            Unbanned,
            Muted,
            Unmuted,
            Rooms,
            Notice,
            Reconnect,
            TokenExpiring,
        ]
    };

    /// The wire name (the frame's `type`).
    pub fn as_str(self) -> &'static str {
        use EventKind::*;
        match self {
            Hello => "hello",
            Ack => "ack",
            Error => "error",
            Pong => "pong",
            Joined => "joined",
            Left => "left",
            Message => "message",
            MessageEdited => "message_edited",
            MessageDeleted => "message_deleted",
            Typing => "typing",
            StopTyping => "stop_typing",
            Join => "join",
            Leave => "leave",
            OnlineUsers => "online_users",
            Receipt => "receipt",
            Pinned => "pinned",
            Unpinned => "unpinned",
            RoomCreated => "room_created",
            RoomUpdated => "room_updated",
            RoomDeleted => "room_deleted",
            MemberAdded => "member_added",
            MemberRemoved => "member_removed",
            MemberUpdated => "member_updated",
            Banned => "banned",
            Unbanned => "unbanned",
            Muted => "muted",
            Unmuted => "unmuted",
            Rooms => "rooms",
            Notice => "notice",
            Reconnect => "reconnect",
            TokenExpiring => "token_expiring",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        use EventKind::*;
        Some(match s {
            "hello" => Hello,
            "ack" => Ack,
            "error" => Error,
            "pong" => Pong,
            "joined" => Joined,
            "left" => Left,
            "message" => Message,
            "message_edited" => MessageEdited,
            "message_deleted" => MessageDeleted,
            "typing" => Typing,
            "stop_typing" => StopTyping,
            "join" => Join,
            "leave" => Leave,
            "online_users" => OnlineUsers,
            "receipt" => Receipt,
            "pinned" => Pinned,
            "unpinned" => Unpinned,
            "room_created" => RoomCreated,
            "room_updated" => RoomUpdated,
            "room_deleted" => RoomDeleted,
            "member_added" => MemberAdded,
            "member_removed" => MemberRemoved,
            "member_updated" => MemberUpdated,
            "banned" => Banned,
            "unbanned" => Unbanned,
            "muted" => Muted,
            "unmuted" => Unmuted,
            "rooms" => Rooms,
            "notice" => Notice,
            "reconnect" => Reconnect,
            "token_expiring" => TokenExpiring,
            _ => return None,
        })
    }

    /// A stored event that may change a pinned message's view: a pin or unpin, an edit, a
    /// delete.
    pub fn changes_pins(self) -> bool {
        use EventKind::*;
        matches!(self, Pinned | Unpinned | MessageEdited | MessageDeleted)
    }

    /// A stored event that changes the room's state — settings, membership, roles, bans,
    /// mutes — and so what its members may do.
    pub fn changes_room_state(self) -> bool {
        use EventKind::*;
        matches!(
            self,
            RoomCreated
                | RoomUpdated
                | RoomDeleted
                | MemberAdded
                | MemberRemoved
                | MemberUpdated
                | Banned
                | Unbanned
                | Muted
                | Unmuted
        )
    }

    /// Who the event takes out of the room, if anyone.
    pub fn evicts(self) -> Option<Evicts> {
        match self {
            EventKind::Banned | EventKind::MemberRemoved => Some(Evicts::Subject),
            EventKind::RoomDeleted => Some(Evicts::Everyone),
            _ => None,
        }
    }

    /// Ephemeral room frames that are not sent back to the user they are about: the typist's
    /// own `typing`/`stop_typing`, the joiner's own `join` (who gets `joined` instead).
    pub fn skips_its_user(self) -> bool {
        matches!(
            self,
            EventKind::Typing | EventKind::StopTyping | EventKind::Join
        )
    }
}

impl ServerEvent {
    /// The frame's kind.
    pub fn kind(&self) -> EventKind {
        match self {
            ServerEvent::Hello { .. } => EventKind::Hello,
            ServerEvent::Ack { .. } => EventKind::Ack,
            ServerEvent::Error { .. } => EventKind::Error,
            ServerEvent::Pong { .. } => EventKind::Pong,
            ServerEvent::Joined { .. } => EventKind::Joined,
            ServerEvent::Left { .. } => EventKind::Left,
            ServerEvent::Message { .. } => EventKind::Message,
            ServerEvent::MessageEdited { .. } => EventKind::MessageEdited,
            ServerEvent::MessageDeleted { .. } => EventKind::MessageDeleted,
            ServerEvent::Typing { .. } => EventKind::Typing,
            ServerEvent::StopTyping { .. } => EventKind::StopTyping,
            ServerEvent::Join { .. } => EventKind::Join,
            ServerEvent::Leave { .. } => EventKind::Leave,
            ServerEvent::OnlineUsers { .. } => EventKind::OnlineUsers,
            ServerEvent::Receipt { .. } => EventKind::Receipt,
            ServerEvent::Pinned { .. } => EventKind::Pinned,
            ServerEvent::Unpinned { .. } => EventKind::Unpinned,
            ServerEvent::RoomCreated { .. } => EventKind::RoomCreated,
            ServerEvent::RoomUpdated { .. } => EventKind::RoomUpdated,
            ServerEvent::RoomDeleted { .. } => EventKind::RoomDeleted,
            ServerEvent::MemberAdded { .. } => EventKind::MemberAdded,
            ServerEvent::MemberRemoved { .. } => EventKind::MemberRemoved,
            ServerEvent::MemberUpdated { .. } => EventKind::MemberUpdated,
            ServerEvent::Banned { .. } => EventKind::Banned,
            ServerEvent::Unbanned { .. } => EventKind::Unbanned,
            ServerEvent::Muted { .. } => EventKind::Muted,
            ServerEvent::Unmuted { .. } => EventKind::Unmuted,
            ServerEvent::Rooms { .. } => EventKind::Rooms,
            ServerEvent::Notice { .. } => EventKind::Notice,
            ServerEvent::Reconnect { .. } => EventKind::Reconnect,
            ServerEvent::TokenExpiring { .. } => EventKind::TokenExpiring,
        }
    }

    /// The room a room event belongs to (None for session frames: hello, ack, rooms…).
    pub fn room(&self) -> Option<&RoomId> {
        use ServerEvent::*;
        match self {
            RoomCreated { room, .. } | RoomUpdated { room, .. } => Some(&room.id),
            Joined { room, .. } => Some(&room.id),
            Left { room, .. }
            | Message { room, .. }
            | MessageEdited { room, .. }
            | MessageDeleted { room, .. }
            | Typing { room, .. }
            | StopTyping { room, .. }
            | Join { room, .. }
            | Leave { room, .. }
            | OnlineUsers { room, .. }
            | Receipt { room, .. }
            | Pinned { room, .. }
            | Unpinned { room, .. }
            | RoomDeleted { room, .. }
            | MemberAdded { room, .. }
            | MemberRemoved { room, .. }
            | MemberUpdated { room, .. }
            | Banned { room, .. }
            | Unbanned { room, .. }
            | Muted { room, .. }
            | Unmuted { room, .. } => Some(room),
            Hello { .. }
            | Ack { .. }
            | Error { .. }
            | Pong { .. }
            | Rooms { .. }
            | Notice { .. }
            | Reconnect { .. }
            | TokenExpiring { .. } => None,
        }
    }

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
