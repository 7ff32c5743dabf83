//! Room settings, roles and the views of rooms, members and messages that frames and the HTTP
//! API share.

use serde::{Deserialize, Serialize};

use crate::ids::{MessageId, RoomId, Timestamp, UserRef};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Listed; anyone may join, read and post.
    #[default]
    Public,
    /// Listed only to members; only members may join, read history or post.
    Private,
    /// Listed; anyone may join and read; only members may post.
    Restricted,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Private => "private",
            Visibility::Restricted => "restricted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "public" => Some(Visibility::Public),
            "private" => Some(Visibility::Private),
            "restricted" => Some(Visibility::Restricted),
            _ => None,
        }
    }
}

/// A member's role in one room. Ordered: `Member < Admin < Owner`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Member,
    Admin,
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "member" => Some(Role::Member),
            "admin" => Some(Role::Admin),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }
}

/// A room's settings, as sent in `joined`, `room_created` and `room_updated`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomInfo {
    pub id: RoomId,
    pub name: String,
    #[serde(default)]
    pub topic: String,
    pub visibility: Visibility,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_members: Option<u32>,
    #[serde(default)]
    pub members_can_pin: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub created_at: Timestamp,
}

/// One row of `rooms` / `GET /api/rooms`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomSummary {
    pub id: RoomId,
    pub name: String,
    #[serde(default)]
    pub topic: String,
    pub visibility: Visibility,
    pub member_count: u64,
    pub online_count: u64,
    /// Stored events after the caller's read marker (absent when unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unread: Option<u64>,
    /// The caller's role in the room; `null` when not a member (a client's "my rooms").
    #[serde(default)]
    pub role: Option<Role>,
}

/// One row of `GET /api/rooms/{room}/members`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub user: UserRef,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub muted_until: Option<Timestamp>,
    pub joined_at: Timestamp,
}

/// A stored message as history and pins show it. A deleted message is a tombstone:
/// `deleted: true` and no content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageView {
    pub room: RoomId,
    pub id: MessageId,
    pub seq: u64,
    pub user: UserRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    pub ts: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MessageId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

/// A pinned message, as in `joined.pins` and `GET /api/rooms/{room}/pins`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PinView {
    pub message: MessageView,
    pub by: UserRef,
    pub pinned_at: Timestamp,
}

/// One read marker: `user` has read every stored event up to `seq`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReadMarker {
    pub user: String,
    pub seq: u64,
    pub at: Timestamp,
}
