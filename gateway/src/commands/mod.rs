//! What each client command does: one struct per command (`proto::client`), one [`Run::run`]
//! each, grouped in files by subject:
//!
//! | file | commands |
//! |---|---|
//! | [`join`] | `join`, `leave` (and leaving every room when a session ends) |
//! | [`messages`] | `message`, `edit`, `delete`, `typing`, `stop_typing` |
//! | [`rooms`] | `create_room`, `update_room`, `delete_room`, `list_rooms` |
//! | [`members`] | `add_member`, `remove_member`, `kick`, `set_role` |
//! | [`sanctions`] | `ban`, `unban`, `mute`, `unmute` |
//! | [`pins`] | `pin`, `unpin` |
//! | [`receipts`] | `read` |
//! | [`refresh`] | `refresh` (a new token for the connection) |
//!
//! Every permission decision goes through [`guard`], which asks the rules in
//! `history_service::access` on this node's cached room state and makes the broker confirm
//! that the state has not changed since. Failures become one typed [`CommandError`].
//!
//! **Who sends a command, and where its answer goes.** A command runs for an [`Origin`]: a
//! user's connection, or the application's backend through the server API
//! ([`crate::server_api`]). Both run the same code: the same validation, events, seqs and
//! persistence. Only the guard tells them apart ([`guard::Actor`]): a user is held to the
//! room's rules, the server to none (beyond what keeps a room whole). A command returns its
//! answer ([`Ack`], or a session command's own frame) instead of sending it: [`handle`] sends
//! it to the session as `ack` (or an `error`) echoing the command's `ref`, the server API
//! turns it into JSON. Commands that act on the connection itself (`join`, `leave`, `typing`,
//! `read`, `refresh`...) exist for sessions only ([`RunOnSession`]).
//!
//! Room-state changes (the commands of `rooms`, `members`, `sanctions`) are decided on state
//! read from the store, written to the store, then published as an event that replaces the
//! room's state version ([`publish_change`]); the caller's `ack` follows the publish, so once
//! anyone has seen the ack, every node decides on the new state.

mod find;
pub mod guard;
pub mod join;
pub mod members;
pub mod messages;
pub mod pins;
pub mod receipts;
pub mod refresh;
pub mod rooms;
pub mod sanctions;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use history_service::access::Denied;
use history_service::store::RoomState;
use history_service::StoreError;
use proto::auth::Identity;
use proto::client::{DecodeError, DecodeErrorKind};
use proto::{Command, ErrorCode, Inbound, MessageId, Ref, RoomId, ServerEvent, Timestamp, UserRef};
use serde::Serialize;

use crate::broker::{new_state_version, Broker, BrokerError, StateCheck};
use crate::hub::SessionHandle;
use crate::node::Node;
use crate::room_state::LoadError;

pub use guard::Actor;
pub use join::{join, leave_room};
pub use rooms::list_rooms;

/// The session a command comes from, as commands see it: who, its outbound queue, its rooms.
pub struct Caller {
    pub handle: SessionHandle,
    pub identity: Identity,
    pub rooms: HashSet<RoomId>,
    /// While the session's reader answers frames that came in together, its answers wait in
    /// the queue and go out in one write when it has answered them all ([`Caller::release`]).
    /// Atomic only so that the reader can release while its read borrows the handle.
    holding: AtomicBool,
}

impl Caller {
    pub fn new(handle: SessionHandle, identity: Identity) -> Self {
        Self {
            handle,
            identity,
            rooms: HashSet::new(),
            holding: AtomicBool::new(false),
        }
    }

    pub fn user(&self) -> &UserRef {
        &self.identity.user
    }

    /// Queues a direct answer to this session (held while the caller holds, see [`Caller::hold`]).
    pub fn send(&self, ev: &ServerEvent) {
        let frame = Bytes::from(ev.to_json());
        match self.holding.load(Ordering::Relaxed) {
            true => self.handle.hold(frame),
            false => self.handle.send(frame),
        }
    }

    /// Holds this session's answers from now on, until [`Caller::release`].
    pub fn hold(&self) {
        self.holding.store(true, Ordering::Relaxed);
    }

    /// Writes the held answers, if any, and stops holding.
    pub fn release(&self) {
        if self.holding.swap(false, Ordering::Relaxed) {
            self.handle.flush();
        }
    }

    /// True while the session is in the room. The hub is the truth: a ban, kick or room
    /// deletion takes sessions out of the room there; the session's own list catches up here.
    fn in_room(&mut self, node: &Node, room: &RoomId) -> bool {
        if node.hub.contains(room, self.handle.id) {
            return true;
        }
        self.rooms.remove(room);
        false
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub code: ErrorCode,
    pub message: String,
}

impl CommandError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

pub type Result<T = ()> = std::result::Result<T, CommandError>;

fn err(code: ErrorCode, message: impl Into<String>) -> CommandError {
    CommandError::new(code, message)
}

impl From<BrokerError> for CommandError {
    fn from(e: BrokerError) -> Self {
        match e {
            // Only after the guard's retries: the room's state kept changing under the command.
            BrokerError::Stale => err(ErrorCode::Unavailable, "the room is changing; retry"),
            BrokerError::Unavailable(_) => {
                tracing::warn!(error = %e, "broker failure");
                err(ErrorCode::Unavailable, "a backend is unavailable; retry")
            }
        }
    }
}

impl From<StoreError> for CommandError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) | StoreError::Internal(_) => {
                tracing::warn!(error = %e, "store failure");
                err(e.code(), "the store is unavailable; retry")
            }
            other => err(other.code(), other.to_string()),
        }
    }
}

impl From<LoadError> for CommandError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Broker(e) => e.into(),
            LoadError::Store(e) => e.into(),
        }
    }
}

impl From<Denied> for CommandError {
    fn from(d: Denied) -> Self {
        err(d.code, d.message)
    }
}

impl From<DecodeError> for CommandError {
    fn from(e: DecodeError) -> Self {
        err(ErrorCode::Invalid, e.kind.to_string())
    }
}

/// Where a command comes from.
pub enum Origin<'a> {
    /// A user's connection.
    Session(&'a mut Caller),
    /// The application's backend (the server API), acting as `as_user`: the author of the
    /// messages it publishes, the `by` of the room events it causes.
    Server { as_user: UserRef },
}

/// Where a command runs: the node, and where the command comes from.
pub struct Cx<'a> {
    pub node: &'a Arc<Node>,
    pub origin: Origin<'a>,
}

impl Cx<'_> {
    /// Who the guard decides for.
    pub fn actor(&self) -> Actor<'_> {
        match &self.origin {
            Origin::Session(caller) => Actor::User(&caller.identity),
            Origin::Server { .. } => Actor::Server,
        }
    }

    /// The user the command's events name as their author or `by`.
    pub fn by(&self) -> &UserRef {
        match &self.origin {
            Origin::Session(caller) => caller.user(),
            Origin::Server { as_user } => as_user,
        }
    }

    /// A session must be in the room ([`must_be_in`]). The server is in no room: the guard's
    /// decision finds the room, or answers `not_found`.
    async fn must_be_in(&mut self, room: &RoomId) -> Result {
        match &mut self.origin {
            Origin::Session(caller) => must_be_in(self.node, caller, room).await,
            Origin::Server { .. } => Ok(()),
        }
    }
}

/// In the room, or the reason why not: the room does not exist (or was deleted) → `not_found`,
/// the user is banned → `banned`, else `forbidden` (join first). The reason is read from the
/// store: a refusal is rare, and this node's copy may predate a deletion or a ban.
async fn must_be_in(node: &Node, caller: &mut Caller, room: &RoomId) -> Result {
    if caller.in_room(node, room) {
        return Ok(());
    }
    let actor = Actor::User(&caller.identity);
    guard::decide_fresh(node, room, |st| {
        match guard::permits(actor, st, history_service::access::Action::Read) {
            Err(e) if e.code == ErrorCode::Banned => Err(e),
            _ => Ok(()),
        }
    })
    .await?;
    Err(err(ErrorCode::Forbidden, "join the room first"))
}

/// The answer to a command that acts on a room: the seq of the event it published (plus the
/// message's `id` and `ts` for messages). A session gets it as `ack {ref, seq, id?, ts?}`,
/// the server API as this JSON object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Ack {
    pub seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<MessageId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<Timestamp>,
}

impl Ack {
    fn seq(seq: u64) -> Self {
        Self {
            seq,
            id: None,
            ts: None,
        }
    }

    fn into_event(self, r#ref: Option<Ref>) -> ServerEvent {
        ServerEvent::Ack {
            r#ref,
            id: self.id,
            seq: Some(self.seq),
            ts: self.ts,
        }
    }
}

/// A command any origin may send: what it does, and its answer.
pub trait Run {
    fn run(self, cx: &mut Cx<'_>) -> impl Future<Output = Result<Ack>> + Send;
}

/// A session's command, and the `ref` its answer echoes.
pub struct SessionCx<'a> {
    pub node: &'a Arc<Node>,
    pub caller: &'a mut Caller,
    pub r#ref: Option<Ref>,
}

/// A command that acts on the connection itself (joining, typing, reading, a new token):
/// sessions only. Its answer is the frame to send (None: nothing to send).
pub trait RunOnSession {
    fn run(
        self,
        cx: &mut SessionCx<'_>,
    ) -> impl Future<Output = Result<Option<ServerEvent>>> + Send;
}

/// Runs one decoded (or undecodable) frame of a session and sends its answer.
pub async fn handle(
    node: &Arc<Node>,
    caller: &mut Caller,
    decoded: std::result::Result<Inbound, DecodeError>,
) {
    let (r#ref, result) = match decoded {
        Ok(Inbound { r#ref, command }) => {
            let name = command.name();
            let mut cx = SessionCx {
                node,
                caller,
                r#ref: r#ref.clone(),
            };
            let result = dispatch(&mut cx, command).await;
            if let Err(e) = &result {
                tracing::debug!(command = name, code = e.code.as_str(), "command refused");
            }
            (r#ref, result)
        }
        Err(e) => {
            if matches!(e.kind, DecodeErrorKind::Json(_)) {
                tracing::debug!("malformed frame");
            }
            (e.r#ref.clone(), Err(e.into()))
        }
    };
    match result {
        Ok(Some(answer)) => caller.send(&answer),
        Ok(None) => {}
        Err(e) => caller.send(&ServerEvent::error(r#ref, e.code, e.message)),
    }
}

async fn dispatch(cx: &mut SessionCx<'_>, command: Command) -> Result<Option<ServerEvent>> {
    match command {
        Command::Join(c) => c.run(cx).await,
        Command::Leave(c) => c.run(cx).await,
        Command::Message(c) => acked(cx, c).await,
        Command::Edit(c) => acked(cx, c).await,
        Command::Delete(c) => acked(cx, c).await,
        Command::Typing(c) => c.run(cx).await,
        Command::StopTyping(c) => c.run(cx).await,
        Command::Read(c) => c.run(cx).await,
        Command::Pin(c) => acked(cx, c).await,
        Command::Unpin(c) => acked(cx, c).await,
        Command::CreateRoom(c) => acked(cx, c).await,
        Command::UpdateRoom(c) => acked(cx, c).await,
        Command::DeleteRoom(c) => acked(cx, c).await,
        Command::AddMember(c) => acked(cx, c).await,
        Command::RemoveMember(c) | Command::Kick(c) => acked(cx, c).await,
        Command::Ban(c) => acked(cx, c).await,
        Command::Unban(c) => acked(cx, c).await,
        Command::Mute(c) => acked(cx, c).await,
        Command::Unmute(c) => acked(cx, c).await,
        Command::SetRole(c) => acked(cx, c).await,
        Command::Refresh(c) => c.run(cx).await,
        Command::ListRooms => rooms::ListRooms.run(cx).await,
        Command::Ping => Ok(Some(ServerEvent::Pong {
            r#ref: cx.r#ref.clone(),
        })),
    }
}

/// Runs a command any origin may send for a session: its answer is an `ack`.
async fn acked(cx: &mut SessionCx<'_>, command: impl Run) -> Result<Option<ServerEvent>> {
    let mut run = Cx {
        node: cx.node,
        origin: Origin::Session(cx.caller),
    };
    let ack = command.run(&mut run).await?;
    Ok(Some(ack.into_event(cx.r#ref.clone())))
}

/// Limits on what clients write.
pub const MAX_NAME_CHARS: usize = 100;
pub const MAX_TOPIC_CHARS: usize = 500;
pub const MAX_REASON_CHARS: usize = 500;
/// `max_members` at most.
pub const MAX_MEMBERS_LIMIT: u32 = 1_000_000;
/// A ban's or mute's `duration_s` at most: ten years.
pub const MAX_DURATION_S: u64 = 10 * 365 * 24 * 3600;

fn check_text(what: &str, text: &str, max: usize) -> Result {
    if text.chars().count() > max {
        return Err(err(
            ErrorCode::TooLarge,
            format!("{what} is over {max} characters"),
        ));
    }
    Ok(())
}

fn check_reason(reason: &Option<String>) -> Result {
    match reason {
        Some(r) => check_text("reason", r, MAX_REASON_CHARS),
        None => Ok(()),
    }
}

fn check_max_members(max: Option<u32>) -> Result {
    match max {
        Some(0) => Err(err(ErrorCode::Invalid, "max_members must be at least 1")),
        Some(m) if m > MAX_MEMBERS_LIMIT => Err(err(
            ErrorCode::Invalid,
            format!("max_members is at most {MAX_MEMBERS_LIMIT}"),
        )),
        _ => Ok(()),
    }
}

/// When a ban or mute of `duration_s` ends (None: never).
fn until_of(duration_s: Option<u64>) -> Result<Option<Timestamp>> {
    match duration_s {
        None => Ok(None),
        Some(0) => Err(err(ErrorCode::Invalid, "duration_s must be at least 1")),
        Some(d) if d > MAX_DURATION_S => Err(err(
            ErrorCode::Invalid,
            format!("duration_s is at most {MAX_DURATION_S}"),
        )),
        Some(d) => Ok(Some(Timestamp::now().plus_secs(d))),
    }
}

/// The display name of a user this node can name: a member's or banned user's stored name,
/// else the id.
fn user_ref(state: &RoomState, id: &str) -> UserRef {
    state
        .members
        .iter()
        .map(|m| &m.user)
        .chain(state.bans.iter().map(|b| &b.user))
        .find(|u| u.id == id)
        .cloned()
        .unwrap_or_else(|| UserRef {
            id: id.to_string(),
            name: id.to_string(),
        })
}

/// Publishes a room-state event (already written to the store) with a new state version;
/// answers with its seq.
async fn publish_change(node: &Node, ev: &ServerEvent) -> Result<Ack> {
    let room = ev
        .room()
        .expect("room-state events name their room")
        .clone();
    debug_assert!(ev.kind().changes_room_state());
    let published = node
        .broker
        .publish_stored(
            &room,
            &ev.to_json(),
            None,
            StateCheck::Change(new_state_version()),
        )
        .await;
    // Read your own writes without a retry: the next command here reloads at once.
    node.rooms.invalidate(&room);
    Ok(Ack::seq(published?.seq()))
}
