//! The durable state of the product behind one trait, [`Store`], with two implementations:
//! [`sqlite::SqliteStore`] (embedded default) and [`scylla::ScyllaStore`] (scaled out), plus
//! [`crate::remote::RemoteStore`] (the same trait over the history service's internal HTTP API)
//! and [`AnyStore`], the enum the binaries pick from a URL.
//!
//! Two kinds of writes, on purpose:
//! - **The event log projection** ([`Store::apply`]): messages, edits, tombstones, pins and read
//!   markers arrive in batches from the persistence stream (or, embedded, straight from the
//!   in-process broker). Every write is idempotent — a message is keyed by its id, a pin by
//!   (room, message id), a marker only moves forward — so a batch replayed after a crash changes
//!   nothing. Room-state events in a batch are ignored: see below.
//! - **Room state** (rooms, members, roles, bans, mutes): written synchronously by the gateway
//!   before it publishes the event, because a join right after a ban must see the ban and a
//!   `create_room` must detect a taken id atomically.
//!
//! ## Replays in any order converge
//! The stream consumer acknowledges entries only after they are written, and entries of a dead
//! consumer are reclaimed by another one later — so a batch can be applied again *after* newer
//! batches of the same room. Every projection write is therefore ordered by the event's `seq`,
//! not by arrival: an edit only replaces content written by an older seq, a delete is final,
//! pin/unpin of one message keep the state of the highest seq, a marker keeps the highest seq.
//! An edit or delete that arrives before its message (its message was in a reclaimed batch) is
//! kept aside and folded in when the message arrives. A seq holds one message: the first
//! stored keeps it, a different message reusing it is dropped ([`seq_conflict`]); an edit of
//! a deleted message is dropped too. Both backends pass the same contract tests for this
//! (`tests/integration/contract.rs`).

pub mod any;
pub mod scylla;
pub mod sqlite;

pub use any::AnyStore;

use std::future::Future;

use proto::rooms::{MemberInfo, MessageView, PinView, ReadMarker, Role, RoomInfo};
use proto::{MessageId, RoomId, ServerEvent, Timestamp, UserRef};
use serde::{Deserialize, Serialize};

/// The highest seq per room among `events` (receipts excluded: their seq is a read marker).
pub fn last_seqs(events: &[ServerEvent]) -> std::collections::HashMap<&RoomId, u64> {
    let mut out = std::collections::HashMap::new();
    for ev in events {
        let seq = ev.seq();
        if let (true, Some(room)) = (seq > 0, ev.room()) {
            let e = out.entry(room).or_insert(0);
            *e = seq.max(*e);
        }
    }
    out
}

/// Store failures. `Unavailable` means "retry later" (the backend is down or overloaded);
/// `Conflict` and `NotFound` are answers about the data; `Internal` is a bug or a broken
/// invariant. Mapped to protocol codes once, in [`StoreError::code`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("room already exists")]
    Conflict,
    #[error("not found")]
    NotFound,
    #[error("store error: {0}")]
    Internal(String),
}

impl StoreError {
    /// The protocol error code (and so the HTTP status) this failure is reported as.
    pub fn code(&self) -> proto::ErrorCode {
        use proto::ErrorCode;
        match self {
            StoreError::Unavailable(_) => ErrorCode::Unavailable,
            StoreError::Conflict => ErrorCode::Conflict,
            StoreError::NotFound => ErrorCode::NotFound,
            StoreError::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// Reports a message that reuses the seq of a different stored message. A seq is assigned
/// once, so a second message with it means the broker lost its state (see "Redis" in
/// docs/operations.md); every store keeps the message it stored first and drops the newcomer,
/// never merging the two. Logged, and counted in `chat_store_seq_conflicts_total`.
pub fn seq_conflict(room: &RoomId, seq: u64, kept: MessageId, dropped: MessageId) {
    metrics::counter!("chat_store_seq_conflicts_total").increment(1);
    tracing::error!(
        %room,
        seq,
        kept = %kept,
        dropped = %dropped,
        "a different message reused a stored seq; kept the first"
    );
}

/// A page request on a room's messages, by seq cursor. Cursors are seqs, which never change,
/// so paging stays exact while new messages are appended between pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "dir", rename_all = "snake_case")]
pub enum Page {
    /// Newest first, seq < `before` (None: from the newest).
    Before { before: Option<u64>, limit: u32 },
    /// Oldest first, seq > `after`.
    After { after: u64, limit: u32 },
}

/// A ban in force (or expired but not yet removed: check `until`; `None` is permanent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ban {
    pub user: UserRef,
    pub by: UserRef,
    pub reason: Option<String>,
    pub until: Option<Timestamp>,
    pub at: Timestamp,
}

/// Everything a gateway needs to authorize commands in one room, loaded once per room per
/// node and then kept current by the room's own events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomState {
    pub info: RoomInfo,
    pub members: Vec<MemberInfo>,
    pub bans: Vec<Ban>,
}

impl Ban {
    /// True while the ban keeps the user out at `now`.
    pub fn active_at(&self, now: Timestamp) -> bool {
        self.until.is_none_or(|t| t > now)
    }
}

/// One membership to store ([`Store::put_members`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberPut {
    pub room: RoomId,
    pub user: UserRef,
    pub role: Role,
}

/// What an access check on one room needs about one user: cheap point reads, unlike
/// [`RoomState`], which lists every member.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomAccess {
    pub info: RoomInfo,
    /// The user's membership, when a member.
    pub member: Option<MemberInfo>,
    /// The user's ban row, expired or not (check [`Ban::active_at`]).
    pub ban: Option<Ban>,
}

/// `muted_until` of a member muted without an end. `MemberInfo` has no separate flag, so an
/// open-ended mute is reported as the last millisecond that still formats as RFC 3339.
pub const MUTED_FOREVER: Timestamp = Timestamp(253_402_300_799_999);

/// The durable store. All methods are cancel-safe to drop (a dropped write may or may not have
/// happened; retrying it is safe, writes are idempotent).
pub trait Store: Send + Sync + 'static {
    /// Applies a batch of stored events (with their seq) and receipts, idempotently.
    /// Handles `message`, `message_edited`, `message_deleted` (tombstone, and unpins it),
    /// `pinned`, `unpinned`, `receipt` (marker moves forward only); ignores other events.
    /// Returns once the batch is durable. Events whose seq is 0 (not assigned) are skipped
    /// with a warning: their order relative to others is unknown.
    fn apply(&self, events: &[ServerEvent]) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The highest seq of every stored event the store was given for the room (messages,
    /// edits, deletes, pins, and the room-state events it does not otherwise keep); 0 when
    /// none. A broker that lost its data numbers the room's events on from here, so it never
    /// hands out a seq the store already saw. The default reads the newest message and pins
    /// (what a store that does not track it knows); backends override it.
    fn last_seq(&self, room: &RoomId) -> impl Future<Output = Result<u64, StoreError>> + Send {
        async move {
            let newest = Page::Before {
                before: None,
                limit: 1,
            };
            let messages = self.messages(room, newest).await?;
            let pins = self.pins(room).await?;
            Ok(messages
                .iter()
                .map(|m| m.seq)
                .chain(pins.iter().map(|p| p.message.seq))
                .max()
                .unwrap_or(0))
        }
    }

    /// A page of a room's messages, tombstones included (`deleted: true`, no content).
    /// At most `limit` rows; fewer only when no more exist in that direction.
    fn messages(
        &self,
        room: &RoomId,
        page: Page,
    ) -> impl Future<Output = Result<Vec<MessageView>, StoreError>> + Send;

    /// One message (or its tombstone) by id; None when unknown in this room.
    fn message(
        &self,
        room: &RoomId,
        id: MessageId,
    ) -> impl Future<Output = Result<Option<MessageView>, StoreError>> + Send;

    /// Pinned messages, most recently pinned first; deleted messages are never pinned.
    fn pins(&self, room: &RoomId) -> impl Future<Output = Result<Vec<PinView>, StoreError>> + Send;

    /// Every read marker of the room (one per user, at its highest seq).
    fn markers(
        &self,
        room: &RoomId,
    ) -> impl Future<Output = Result<Vec<ReadMarker>, StoreError>> + Send;

    /// One user's read marker in the room (its seq), None when the user has none. A join and
    /// a room listing need only the caller's marker: reading all of a big room's is O(members).
    /// The default goes through [`Store::markers`]; backends override it with a point read.
    fn marker(
        &self,
        room: &RoomId,
        user: &str,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send {
        async move {
            Ok(self
                .markers(room)
                .await?
                .into_iter()
                .find(|m| m.user == user)
                .map(|m| m.seq))
        }
    }

    /// Several read markers at once, one answer per `(room, user)` asked, in order: a join
    /// storm's marker reads, batched by the gateway into one call (one round trip to the
    /// history service instead of one per join). The default reads them concurrently with
    /// [`Store::marker`].
    fn markers_of(
        &self,
        keys: &[(RoomId, String)],
    ) -> impl Future<Output = Result<Vec<Option<u64>>, StoreError>> + Send {
        async move {
            futures_util::future::try_join_all(
                keys.iter().map(|(room, user)| self.marker(room, user)),
            )
            .await
        }
    }

    /// Creates a room with its creator as owner; `Conflict` when the id is taken (also by a
    /// deleted room: ids are not reused, so old history never leaks into a new room).
    /// `info.owner` is stored as `owner.id` whatever it said.
    fn create_room(
        &self,
        info: &RoomInfo,
        owner: &UserRef,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Replaces a room's settings (`NotFound` when absent or deleted). `owner` and
    /// `created_at` are kept from creation.
    fn update_room(&self, info: &RoomInfo) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Marks a room deleted: it disappears from listings and state; its id stays taken.
    /// `NotFound` when the id was never used; deleting a deleted room is a no-op.
    fn delete_room(&self, room: &RoomId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A room's settings, members and bans; None when absent or deleted.
    fn room_state(
        &self,
        room: &RoomId,
    ) -> impl Future<Output = Result<Option<RoomState>, StoreError>> + Send;

    /// Every live room with its member count, for listings (callers filter private rooms by
    /// membership).
    fn rooms(&self) -> impl Future<Output = Result<Vec<(RoomInfo, u64)>, StoreError>> + Send;

    /// Adds a member or changes its role and display name (upsert; `joined_at` and a mute are
    /// kept). `NotFound` when the room is absent or deleted.
    fn put_member(
        &self,
        room: &RoomId,
        user: &UserRef,
        role: Role,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Several [`Store::put_member`]s at once (first-time joins of public rooms, batched by
    /// the gateway): one answer per entry, in order — true when stored, false when its room is
    /// absent or deleted. The default runs them concurrently (SQLite commits them together).
    fn put_members(
        &self,
        puts: &[MemberPut],
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send {
        async move {
            let each = puts.iter().map(|p| async move {
                match self.put_member(&p.room, &p.user, p.role).await {
                    Ok(()) => Ok(true),
                    Err(StoreError::NotFound) => Ok(false),
                    Err(e) => Err(e),
                }
            });
            futures_util::future::try_join_all(each).await
        }
    }

    /// Removes a membership (and its mute). Removing a non-member is a no-op.
    fn remove_member(
        &self,
        room: &RoomId,
        user: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Mutes (`muted: true`) until `until`, or without end when `until` is None — reported as
    /// [`MUTED_FOREVER`]; `muted: false` clears the mute (`until` ignored). Mutes belong to
    /// memberships: `NotFound` when `user` is not a member.
    fn set_mute(
        &self,
        room: &RoomId,
        user: &str,
        until: Option<Timestamp>,
        muted: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records a ban (upsert by user). It does not remove the membership: the gateway does
    /// both. `NotFound` when the room is absent or deleted.
    fn put_ban(
        &self,
        room: &RoomId,
        ban: &Ban,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Lifts a ban; lifting a ban that does not exist is a no-op.
    fn remove_ban(
        &self,
        room: &RoomId,
        user: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A room's settings plus one user's membership and ban: what an HTTP read needs to
    /// authorize, without listing every member. None when the room is absent or deleted.
    /// The default goes through [`Store::room_state`]; backends override it with point reads.
    fn access(
        &self,
        room: &RoomId,
        user: &str,
    ) -> impl Future<Output = Result<Option<RoomAccess>, StoreError>> + Send {
        async move {
            Ok(self.room_state(room).await?.map(|state| RoomAccess {
                member: state.members.into_iter().find(|m| m.user.id == user),
                ban: state.bans.into_iter().find(|b| b.user.id == user),
                info: state.info,
            }))
        }
    }
}
