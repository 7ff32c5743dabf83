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

/// Every client command of protocol v1, one struct per command (a handler takes one value).
/// Unknown fields are ignored; an unknown `type` is an error ([`DecodeErrorKind::UnknownType`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    Join(Join),
    Leave(Leave),
    Message(SendMessage),
    Edit(Edit),
    Delete(Delete),
    Typing(Typing),
    StopTyping(StopTyping),
    Read(Read),
    Pin(Pin),
    Unpin(Unpin),
    CreateRoom(CreateRoom),
    UpdateRoom(UpdateRoom),
    DeleteRoom(DeleteRoom),
    AddMember(AddMember),
    RemoveMember(RemoveMember),
    /// `kick` is `remove_member` by another name: the membership ends, the connections leave.
    Kick(RemoveMember),
    Ban(Ban),
    Unban(Unban),
    Mute(Mute),
    Unmute(Unmute),
    SetRole(SetRole),
    Refresh(Refresh),
    ListRooms,
    Ping,
}

/// `join`: enter a room; with `since`, replay the stored events after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Join {
    pub room: RoomId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// The room's epoch `since` counts in (as `joined` gave it): a `since` from another epoch
    /// is not replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Leave {
    pub room: RoomId,
}

/// `message`: post to a room.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SendMessage {
    pub room: RoomId,
    pub content: String,
    /// Idempotency key: a repeat is answered with the first publication's ack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MessageId>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Edit {
    pub room: RoomId,
    pub id: MessageId,
    pub content: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delete {
    pub room: RoomId,
    pub id: MessageId,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Typing {
    pub room: RoomId,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StopTyping {
    pub room: RoomId,
}

/// `read`: the user has read the room up to `seq`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Read {
    pub room: RoomId,
    pub seq: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pin {
    pub room: RoomId,
    pub id: MessageId,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Unpin {
    pub room: RoomId,
    pub id: MessageId,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreateRoom {
    pub room: RoomId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub visibility: Visibility,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_members: Option<u32>,
}

/// `update_room`: the settings given change, the others stay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateRoom {
    pub room: RoomId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility: Option<Visibility>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_members: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members_can_pin: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeleteRoom {
    pub room: RoomId,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AddMember {
    pub room: RoomId,
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

/// `remove_member` and `kick`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemoveMember {
    pub room: RoomId,
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ban {
    pub room: RoomId,
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Unban {
    pub room: RoomId,
    pub user: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mute {
    pub room: RoomId,
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Unmute {
    pub room: RoomId,
    pub user: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetRole {
    pub room: RoomId,
    pub user: String,
    pub role: Role,
}

/// `refresh`: a new token for this connection (same user), before the current one expires.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Refresh {
    pub token: String,
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
    "refresh",
    "list_rooms",
    "ping",
];

impl Command {
    /// The room the command acts on, if any.
    pub fn room(&self) -> Option<&RoomId> {
        use Command::*;
        Some(match self {
            Join(c) => &c.room,
            Leave(c) => &c.room,
            Message(c) => &c.room,
            Edit(c) => &c.room,
            Delete(c) => &c.room,
            Typing(c) => &c.room,
            StopTyping(c) => &c.room,
            Read(c) => &c.room,
            Pin(c) => &c.room,
            Unpin(c) => &c.room,
            CreateRoom(c) => &c.room,
            UpdateRoom(c) => &c.room,
            DeleteRoom(c) => &c.room,
            AddMember(c) => &c.room,
            RemoveMember(c) | Kick(c) => &c.room,
            Ban(c) => &c.room,
            Unban(c) => &c.room,
            Mute(c) => &c.room,
            Unmute(c) => &c.room,
            SetRole(c) => &c.room,
            Refresh(_) | ListRooms | Ping => return None,
        })
    }

    /// The wire name of the command, for metrics and logs.
    pub fn name(&self) -> &'static str {
        use Command::*;
        match self {
            Join(_) => "join",
            Leave(_) => "leave",
            Message(_) => "message",
            Edit(_) => "edit",
            Delete(_) => "delete",
            Typing(_) => "typing",
            StopTyping(_) => "stop_typing",
            Read(_) => "read",
            Pin(_) => "pin",
            Unpin(_) => "unpin",
            CreateRoom(_) => "create_room",
            UpdateRoom(_) => "update_room",
            DeleteRoom(_) => "delete_room",
            AddMember(_) => "add_member",
            RemoveMember(_) => "remove_member",
            Kick(_) => "kick",
            Ban(_) => "ban",
            Unban(_) => "unban",
            Mute(_) => "mute",
            Unmute(_) => "unmute",
            SetRole(_) => "set_role",
            Refresh(_) => "refresh",
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
