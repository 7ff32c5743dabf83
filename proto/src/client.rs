//! Frames from client to server, and the decoder that turns bytes into a typed [`Inbound`]
//! or a typed [`DecodeError`] — never a panic, whatever the bytes.

use serde::{Deserialize, Serialize};

use crate::ids::{MessageId, Ref, RoomId};
use crate::rooms::{Role, Visibility};

/// One decoded client frame: the command plus the `ref` to echo on its answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Inbound {
    pub r#ref: Option<Ref>,
    pub command: Command,
}

/// Every client command of protocol v1. Unknown fields are ignored; an unknown `type` is an
/// error ([`DecodeErrorKind::UnknownType`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    Join {
        room: RoomId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
    },
    Leave {
        room: RoomId,
    },
    Message {
        room: RoomId,
        content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<MessageId>,
    },
    Edit {
        room: RoomId,
        id: MessageId,
        content: String,
    },
    Delete {
        room: RoomId,
        id: MessageId,
    },
    Typing {
        room: RoomId,
    },
    StopTyping {
        room: RoomId,
    },
    Read {
        room: RoomId,
        seq: u64,
    },
    Pin {
        room: RoomId,
        id: MessageId,
    },
    Unpin {
        room: RoomId,
        id: MessageId,
    },
    CreateRoom {
        room: RoomId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default)]
        visibility: Visibility,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_members: Option<u32>,
    },
    UpdateRoom {
        room: RoomId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        visibility: Option<Visibility>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_members: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        members_can_pin: Option<bool>,
    },
    DeleteRoom {
        room: RoomId,
    },
    AddMember {
        room: RoomId,
        user: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role: Option<Role>,
    },
    RemoveMember {
        room: RoomId,
        user: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Kick {
        room: RoomId,
        user: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Ban {
        room: RoomId,
        user: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_s: Option<u64>,
    },
    Unban {
        room: RoomId,
        user: String,
    },
    Mute {
        room: RoomId,
        user: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_s: Option<u64>,
    },
    Unmute {
        room: RoomId,
        user: String,
    },
    SetRole {
        room: RoomId,
        user: String,
        role: Role,
    },
    ListRooms,
    Ping,
}

/// The `type` names of [`Command`], to tell "unknown type" from "bad field".
pub const COMMAND_TYPES: &[&str] = &[
    "join",
    "leave",
    "message",
    "edit",
    "delete",
    "typing",
    "stop_typing",
    "read",
    "pin",
    "unpin",
    "create_room",
    "update_room",
    "delete_room",
    "add_member",
    "remove_member",
    "kick",
    "ban",
    "unban",
    "mute",
    "unmute",
    "set_role",
    "list_rooms",
    "ping",
];

impl Command {
    /// The room the command acts on, if any.
    pub fn room(&self) -> Option<&RoomId> {
        use Command::*;
        match self {
            Join { room, .. }
            | Leave { room }
            | Message { room, .. }
            | Edit { room, .. }
            | Delete { room, .. }
            | Typing { room }
            | StopTyping { room }
            | Read { room, .. }
            | Pin { room, .. }
            | Unpin { room, .. }
            | CreateRoom { room, .. }
            | UpdateRoom { room, .. }
            | DeleteRoom { room }
            | AddMember { room, .. }
            | RemoveMember { room, .. }
            | Kick { room, .. }
            | Ban { room, .. }
            | Unban { room, .. }
            | Mute { room, .. }
            | Unmute { room, .. }
            | SetRole { room, .. } => Some(room),
            ListRooms | Ping => None,
        }
    }

    /// The wire name of the command, for metrics and logs.
    pub fn name(&self) -> &'static str {
        use Command::*;
        match self {
            Join { .. } => "join",
            Leave { .. } => "leave",
            Message { .. } => "message",
            Edit { .. } => "edit",
            Delete { .. } => "delete",
            Typing { .. } => "typing",
            StopTyping { .. } => "stop_typing",
            Read { .. } => "read",
            Pin { .. } => "pin",
            Unpin { .. } => "unpin",
            CreateRoom { .. } => "create_room",
            UpdateRoom { .. } => "update_room",
            DeleteRoom { .. } => "delete_room",
            AddMember { .. } => "add_member",
            RemoveMember { .. } => "remove_member",
            Kick { .. } => "kick",
            Ban { .. } => "ban",
            Unban { .. } => "unban",
            Mute { .. } => "mute",
            Unmute { .. } => "unmute",
            SetRole { .. } => "set_role",
            ListRooms => "list_rooms",
            Ping => "ping",
        }
    }
}

/// Why a frame could not be decoded; carries the frame's `ref` when it could be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind}")]
pub struct DecodeError {
    pub r#ref: Option<Ref>,
    pub kind: DecodeErrorKind,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeErrorKind {
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("frame must be a JSON object with a string `type`")]
    MissingType,
    #[error("unknown type `{0}`")]
    UnknownType(String),
    #[error("invalid `{kind}` command: {detail}")]
    BadField { kind: String, detail: String },
    #[error("`ref` must be a string of at most {max} chars or a number", max = MAX_REF_CHARS)]
    BadRef,
}

/// A `ref` is echoed back verbatim, so its size is bounded.
pub const MAX_REF_CHARS: usize = 128;

/// Decodes one text frame.
pub fn decode(bytes: &[u8]) -> Result<Inbound, DecodeError> {
    // First pass: only `type` and `ref`, so that every error can echo the `ref` and say
    // whether the type is unknown or a field is bad.
    #[derive(Deserialize)]
    struct Head {
        #[serde(rename = "type")]
        kind: Option<serde_json::Value>,
        #[serde(rename = "ref")]
        r#ref: Option<serde_json::Value>,
    }
    let head: Head = serde_json::from_slice(bytes).map_err(|e| DecodeError {
        r#ref: None,
        kind: if e.is_data() {
            DecodeErrorKind::MissingType
        } else {
            DecodeErrorKind::Json(e.to_string())
        },
    })?;
    let r#ref = match head.r#ref {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => Some(Ref::Num(n)),
        Some(serde_json::Value::String(s)) if s.chars().count() <= MAX_REF_CHARS => {
            Some(Ref::Str(s))
        }
        Some(_) => {
            return Err(DecodeError {
                r#ref: None,
                kind: DecodeErrorKind::BadRef,
            })
        }
    };
    let kind = match head.kind {
        Some(serde_json::Value::String(s)) => s,
        _ => {
            return Err(DecodeError {
                r#ref,
                kind: DecodeErrorKind::MissingType,
            })
        }
    };
    if !COMMAND_TYPES.contains(&kind.as_str()) {
        return Err(DecodeError {
            r#ref,
            kind: DecodeErrorKind::UnknownType(kind.chars().take(64).collect()),
        });
    }
    match serde_json::from_slice::<Command>(bytes) {
        Ok(command) => Ok(Inbound { r#ref, command }),
        Err(e) => Err(DecodeError {
            r#ref,
            kind: DecodeErrorKind::BadField {
                kind,
                detail: e.to_string(),
            },
        }),
    }
}

/// Encodes a command with an optional `ref` (used by clients: tests, load generator).
pub fn encode(command: &Command, r#ref: Option<&Ref>) -> String {
    let mut v = serde_json::to_value(command).expect("commands always serialize");
    if let (Some(r), Some(obj)) = (r#ref, v.as_object_mut()) {
        obj.insert(
            "ref".into(),
            serde_json::to_value(r).expect("refs always serialize"),
        );
    }
    v.to_string()
}
