//! What each client command does. Every command is validated and authorized here, then
//! published through the broker; failures become one typed [`CommandError`], mapped once to
//! an `error` frame that echoes the command's `ref`.

use std::sync::Arc;

use bytes::Bytes;
use proto::client::{DecodeError, DecodeErrorKind};
use proto::rooms::RoomSummary;
use proto::{Command, ErrorCode, Inbound, MessageId, Ref, RoomId, ServerEvent, Timestamp};

use history_service::{Store, StoreError};
use proto::rooms::{Role, RoomInfo, Visibility};

use crate::broker::{Broker, BrokerError, Dedupe, Published};
use crate::moderation::{self, state_of};
use crate::node::Node;
use crate::rooms::{Access, MemberChange};
use crate::session::SessionState;

/// `client_msg_id` longer than this is refused.
const MAX_CLIENT_MSG_ID: usize = 64;

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

impl From<BrokerError> for CommandError {
    fn from(e: BrokerError) -> Self {
        tracing::warn!(error = %e, "broker failure");
        CommandError::new(ErrorCode::Unavailable, "a backend is unavailable; retry")
    }
}

impl From<StoreError> for CommandError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) | StoreError::Internal(_) => {
                tracing::warn!(error = %e, "store failure");
                CommandError::new(e.code(), "the store is unavailable; retry")
            }
            other => CommandError::new(other.code(), other.to_string()),
        }
    }
}

impl From<DecodeError> for CommandError {
    fn from(e: DecodeError) -> Self {
        CommandError::new(ErrorCode::Invalid, e.kind.to_string())
    }
}

pub type Result<T = ()> = std::result::Result<T, CommandError>;

/// Runs one decoded (or undecodable) frame.
pub async fn handle(
    node: &Arc<Node>,
    s: &mut SessionState,
    decoded: std::result::Result<Inbound, DecodeError>,
) {
    let (r#ref, result) = match decoded {
        Ok(Inbound { r#ref, command }) => {
            let name = command.name();
            let result = run(node, s, r#ref.clone(), command).await;
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
    if let Err(e) = result {
        s.send(&ServerEvent::error(r#ref, e.code, e.message));
    }
}

async fn run(
    node: &Arc<Node>,
    s: &mut SessionState,
    r#ref: Option<Ref>,
    command: Command,
) -> Result {
    match command {
        Command::Ping => {
            s.send(&ServerEvent::Pong { r#ref });
            Ok(())
        }
        Command::Join { room, since } => {
            join(node, s, r#ref, room, since).await;
            Ok(())
        }
        Command::Leave { room } => {
            if !in_room(node, s, &room) {
                return Err(CommandError::new(ErrorCode::NotFound, "not in this room"));
            }
            // Leaving a public room ends a plain membership (admins and owners keep theirs).
            // Every node hears of it before the room sees the `leave`.
            if let Ok(Some(state)) = node.rooms.state(&room).await {
                let access = Access::of(&state, &s.identity);
                if state.info.visibility == Visibility::Public
                    && access.role() == Some(Role::Member)
                {
                    node.rooms
                        .store()
                        .remove_member(&room, &s.user().id)
                        .await?;
                    let change = MemberChange::Removed(s.user().id.clone());
                    node.membership_changed(&room, change).await;
                }
            }
            s.rooms.remove(&room);
            leave_room(node, s, &room).await;
            s.send(&ServerEvent::Left { r#ref, room });
            Ok(())
        }
        Command::Message {
            room,
            content,
            client_msg_id,
            reply_to,
        } => send_message(node, s, r#ref, room, content, client_msg_id, reply_to).await,
        Command::Edit { room, id, content } => {
            may_post(node, s, &room).await?;
            check_content(node, &content)?;
            let message = moderation::find_message(node, &room, id).await?;
            if message.user.id != s.user().id {
                return Err(CommandError::new(
                    ErrorCode::Forbidden,
                    "only the author may edit",
                ));
            }
            let ev = ServerEvent::MessageEdited {
                seq: 0,
                room: room.clone(),
                id,
                content,
                edited_at: Timestamp::now(),
            };
            moderation::publish_and_ack(node, s, r#ref, &ev, Some(id)).await
        }
        Command::Delete { room, id } => {
            let state = state_of(node, &room).await?;
            let access = Access::of(&state, &s.identity);
            moderation::not_banned(&access)?;
            if !access.may_read() {
                return Err(CommandError::new(
                    ErrorCode::Forbidden,
                    "you may not read this room",
                ));
            }
            let message = moderation::find_message(node, &room, id).await?;
            if message.user.id != s.user().id && !access.moderates() {
                return Err(CommandError::new(
                    ErrorCode::Forbidden,
                    "only the author, a room admin or the owner may delete",
                ));
            }
            let ev = ServerEvent::MessageDeleted {
                seq: 0,
                room: room.clone(),
                id,
                by: s.user().clone(),
            };
            moderation::publish_and_ack(node, s, r#ref, &ev, Some(id)).await?;
            moderation::unpin_deleted(node, &room, id).await;
            Ok(())
        }
        Command::Typing { room } => {
            may_post(node, s, &room).await?;
            node.typing(&room, s.user()).await;
            Ok(())
        }
        Command::StopTyping { room } => {
            must_be_in(node, s, &room).await?;
            node.stop_typing(&room, s.user(), true).await;
            Ok(())
        }
        Command::ListRooms => {
            let rooms = list_rooms(node, &s.identity).await?;
            s.send(&ServerEvent::Rooms { r#ref, rooms });
            Ok(())
        }
        Command::Read { room, seq } => {
            must_be_in(node, s, &room).await?;
            if seq == 0 {
                return Err(CommandError::new(
                    ErrorCode::Invalid,
                    "seq must be at least 1",
                ));
            }
            let seq = crate::receipts::read(node, &room, s.user(), seq).await;
            if r#ref.is_some() {
                s.send(&ServerEvent::Ack {
                    r#ref,
                    id: None,
                    seq: Some(seq),
                    ts: None,
                });
            }
            Ok(())
        }
        Command::Pin { room, id } => moderation::pin(node, s, r#ref, room, id, true).await,
        Command::Unpin { room, id } => moderation::pin(node, s, r#ref, room, id, false).await,
        Command::CreateRoom {
            room,
            name,
            visibility,
            topic,
            max_members,
        } => {
            moderation::create_room(node, s, r#ref, room, name, visibility, topic, max_members)
                .await
        }
        Command::UpdateRoom {
            room,
            name,
            topic,
            visibility,
            max_members,
            members_can_pin,
        } => {
            moderation::update_room(
                node,
                s,
                r#ref,
                room,
                name,
                topic,
                visibility,
                max_members,
                members_can_pin,
            )
            .await
        }
        Command::DeleteRoom { room } => moderation::delete_room(node, s, r#ref, room).await,
        Command::AddMember { room, user, role } => {
            moderation::add_member(node, s, r#ref, room, user, role).await
        }
        Command::RemoveMember { room, user, reason } | Command::Kick { room, user, reason } => {
            moderation::remove_member(node, s, r#ref, room, user, reason).await
        }
        Command::Ban {
            room,
            user,
            reason,
            duration_s,
        } => moderation::ban(node, s, r#ref, room, user, reason, duration_s).await,
        Command::Unban { room, user } => moderation::unban(node, s, r#ref, room, user).await,
        Command::Mute {
            room,
            user,
            duration_s,
        } => moderation::mute(node, s, r#ref, room, user, duration_s, true).await,
        Command::Unmute { room, user } => {
            moderation::mute(node, s, r#ref, room, user, None, false).await
        }
        Command::SetRole { room, user, role } => {
            moderation::set_role(node, s, r#ref, room, user, role).await
        }
    }
}

/// True while the session is in the room. The hub is the truth: a ban, kick or room deletion
/// takes sessions out of the room there; the session's own list catches up here.
fn in_room(node: &Node, s: &mut SessionState, room: &RoomId) -> bool {
    if node.hub.contains(room, s.handle.id) {
        return true;
    }
    s.rooms.remove(room);
    false
}

/// In the room, or the reason why not: the room does not exist (or was deleted) → `not_found`,
/// the user is banned → `banned`, else `forbidden` (join first).
async fn must_be_in(node: &Node, s: &mut SessionState, room: &RoomId) -> Result {
    if in_room(node, s, room) {
        return Ok(());
    }
    let state = state_of(node, room).await?;
    moderation::not_banned(&Access::of(&state, &s.identity))?;
    Err(CommandError::new(
        ErrorCode::Forbidden,
        "join the room first",
    ))
}

/// Joined, allowed to post by the room's visibility and membership, not muted.
async fn may_post(node: &Node, s: &mut SessionState, room: &RoomId) -> Result {
    must_be_in(node, s, room).await?;
    let state = state_of(node, room).await?;
    let access = Access::of(&state, &s.identity);
    if access.banned() {
        return Err(CommandError::new(
            ErrorCode::Banned,
            "you are banned from this room",
        ));
    }
    if !access.may_post() {
        return Err(CommandError::new(
            ErrorCode::Forbidden,
            "only members may post in this room",
        ));
    }
    if let Some(until) = access.muted_until() {
        return Err(CommandError::new(
            ErrorCode::Muted,
            format!("you are muted until {}", until),
        ));
    }
    Ok(())
}

fn check_content(node: &Node, content: &str) -> Result {
    if content.trim().is_empty() {
        return Err(CommandError::new(
            ErrorCode::Invalid,
            "content must not be empty",
        ));
    }
    let max = node.config.max_content_chars;
    if content.chars().count() > max {
        return Err(CommandError::new(
            ErrorCode::TooLarge,
            format!("content is over {max} characters"),
        ));
    }
    Ok(())
}

async fn send_message(
    node: &Arc<Node>,
    s: &mut SessionState,
    r#ref: Option<Ref>,
    room: RoomId,
    content: String,
    client_msg_id: Option<String>,
    reply_to: Option<MessageId>,
) -> Result {
    may_post(node, s, &room).await?;
    check_content(node, &content)?;
    if client_msg_id
        .as_ref()
        .is_some_and(|c| c.is_empty() || c.len() > MAX_CLIENT_MSG_ID)
    {
        return Err(CommandError::new(
            ErrorCode::Invalid,
            format!("client_msg_id must be 1-{MAX_CLIENT_MSG_ID} bytes"),
        ));
    }
    let (id, ts) = node.ids.next(Timestamp::now());
    let user = s.user().clone();
    let ev = ServerEvent::Message {
        seq: 0,
        room: room.clone(),
        id,
        user: user.clone(),
        content,
        ts,
        reply_to,
        client_msg_id: client_msg_id.clone(),
    };
    let key = client_msg_id
        .as_ref()
        .map(|c| format!("{room}/{}/{c}", user.id));
    let dedupe = key.as_deref().map(|key| Dedupe { key, id, ts });
    let (seq, id, ts) = match node
        .broker
        .publish_stored(&room, &ev.to_json(), dedupe)
        .await?
    {
        Published::Fresh { seq } => (seq, id, ts),
        Published::Duplicate { seq, id, ts } => (seq, id, ts),
    };
    node.stop_typing(&room, &user, false).await;
    s.send(&ServerEvent::Ack {
        r#ref,
        id: Some(id),
        seq: Some(seq),
        ts: Some(ts),
    });
    Ok(())
}

/// Joins a room: subscribe, read the recovery window, replay, `joined`, then let live events
/// through (see [`crate::hub::Hub::release`] for why nothing is lost or duplicated).
pub async fn join(
    node: &Arc<Node>,
    s: &mut SessionState,
    r#ref: Option<Ref>,
    room: RoomId,
    since: Option<u64>,
) {
    if let Err(e) = try_join(node, s, r#ref.clone(), &room, since).await {
        s.send(&ServerEvent::error(r#ref, e.code, e.message));
    }
}

async fn try_join(
    node: &Arc<Node>,
    s: &mut SessionState,
    r#ref: Option<Ref>,
    room: &RoomId,
    since: Option<u64>,
) -> Result {
    if in_room(node, s, room) {
        return Err(CommandError::new(
            ErrorCode::Conflict,
            "already in this room",
        ));
    }
    if s.rooms.len() >= node.config.max_rooms_per_connection {
        return Err(CommandError::new(
            ErrorCode::Forbidden,
            format!(
                "at most {} rooms per connection",
                node.config.max_rooms_per_connection
            ),
        ));
    }
    let state = match node.rooms.state(room).await? {
        Some(state) => state,
        None if node.config.auto_create_rooms => {
            let info = RoomInfo {
                id: room.clone(),
                name: room.to_string(),
                topic: String::new(),
                visibility: Visibility::Public,
                max_members: None,
                members_can_pin: false,
                owner: Some(s.user().id.clone()),
                created_at: Timestamp::now(),
            };
            match moderation::create(node, info, s.user()).await {
                // Another join created it first: join that one.
                Ok(_)
                | Err(CommandError {
                    code: ErrorCode::Conflict,
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
            state_of(node, room).await?
        }
        None => {
            return Err(CommandError::new(
                ErrorCode::NotFound,
                format!("no room {room}"),
            ))
        }
    };
    let access = Access::of(&state, &s.identity);
    if access.banned() {
        return Err(CommandError::new(
            ErrorCode::Banned,
            "you are banned from this room",
        ));
    }
    if !access.may_read() {
        return Err(CommandError::new(
            ErrorCode::Forbidden,
            "private room: members only",
        ));
    }
    let mut role = access.role();
    let stale_name = access.member.is_some_and(|m| m.user.name != s.user().name);
    if state.info.visibility == Visibility::Public && (role.is_none() || stale_name) {
        // Joining a public room makes the user a member (counted, may pin when allowed).
        if role.is_none() {
            if let Some(max) = state.info.max_members {
                if access.member_count() >= max as usize {
                    return Err(CommandError::new(
                        ErrorCode::RoomFull,
                        format!("the room is full ({max} members)"),
                    ));
                }
            }
        }
        let r = role.unwrap_or(Role::Member);
        node.rooms.store().put_member(room, s.user(), r).await?;
        node.membership_changed(room, MemberChange::Put(s.user().clone(), r))
            .await;
        role = Some(r);
    } else if stale_name {
        if let Some(r) = role {
            node.rooms.store().put_member(room, s.user(), r).await?;
            node.membership_changed(room, MemberChange::Put(s.user().clone(), r))
                .await;
        }
    }
    let info = state.info.clone();
    let store = node.rooms.store();
    let (pins, marker) = tokio::try_join!(store.pins(room), store.marker(room, &s.user().id))?;
    let marker = marker.unwrap_or(0);

    let joining = node.hub.join(room, s.handle.clone());
    // Every joiner waits for the subscription, not only the room's first local session: a
    // second joiner that read the room's seq before the first one's SUBSCRIBE took effect
    // would never get the events in between.
    let setup = async {
        node.broker.subscribe(room).await?;
        node.broker.recover(room, since).await
    };
    let recovery = match setup.await {
        Ok(r) => r,
        Err(e) => {
            if node.hub.remove(room, s.handle.id) {
                let _ = node.broker.unsubscribe(room).await;
            }
            return Err(e.into());
        }
    };
    let recovered = since.is_some() && recovery.complete;
    if recovered {
        for (_, frame) in &recovery.events {
            s.handle.send(frame.clone());
        }
    }
    node.hub.seen_up_to(room, s.handle.id, recovery.last_seq);
    let newly_online = node
        .broker
        .presence_add(room, s.user())
        .await
        .unwrap_or(false);
    if !node.hub.contains(room, s.handle.id) {
        // A ban, kick or deletion took this session out while it was joining (its held
        // events went with it): undo the presence and say so instead of a dead `joined`.
        let _ = node.broker.presence_remove(room, &s.user().id).await;
        return Err(CommandError::new(
            ErrorCode::Forbidden,
            "removed from the room while joining; retry",
        ));
    }
    s.rooms.insert(room.clone());
    joining.joined();
    if newly_online {
        node.publish_ephemeral(
            room,
            &ServerEvent::Join {
                room: room.clone(),
                user: s.user().clone(),
            },
        )
        .await;
        node.online_changed(room).await;
    }
    let online = node.broker.presence(room).await.unwrap_or_default();
    s.send(&ServerEvent::Joined {
        r#ref,
        room: info,
        seq: recovery.last_seq,
        online,
        pins,
        recovered,
        role,
        unread: Some(recovery.last_seq.saturating_sub(marker)),
    });
    node.hub.release(room, s.handle.id);
    Ok(())
}

/// Takes a session out of a room (leave, disconnect, removal); tells the room when the user's
/// last connection left.
///
/// A session an eviction (ban, kick, room deletion) already took out is not counted out of
/// presence again: the eviction did that.
pub async fn leave_room(node: &Arc<Node>, s: &SessionState, room: &RoomId) {
    match node.hub.take(room, s.handle.id) {
        None => return,
        Some(true) => {
            if let Err(e) = node.broker.unsubscribe(room).await {
                tracing::warn!(error = %e, %room, "unsubscribe failed");
            }
        }
        Some(false) => {}
    }
    if node
        .broker
        .presence_remove(room, &s.user().id)
        .await
        .unwrap_or(false)
    {
        node.stop_typing(room, s.user(), false).await;
        node.publish_ephemeral(
            room,
            &ServerEvent::Leave {
                room: room.clone(),
                user: s.user().clone(),
            },
        )
        .await;
        node.online_changed(room).await;
    }
}

/// The rooms `who` may see (public, restricted, and private ones they are a member of), with
/// member counts from the store, online counts from presence, and — in rooms where `who` has
/// a read marker — `unread` = the room's last seq − that marker.
pub async fn list_rooms(node: &Node, who: &proto::auth::Identity) -> Result<Vec<RoomSummary>> {
    let mut rooms = node
        .history
        .list_rooms(who)
        .await
        .map_err(|e| CommandError::new(e.code, e.message))?;
    let store = node.rooms.store();
    for r in &mut rooms {
        let (online, marker, log) = tokio::join!(
            node.broker.presence(&r.id),
            store.marker(&r.id, &who.user.id),
            node.broker.recover(&r.id, None)
        );
        r.online_count = online.map_or(0, |u| u.len() as u64);
        r.unread = match (marker, log) {
            (Ok(Some(m)), Ok(log)) => Some(log.last_seq.saturating_sub(m)),
            _ => None,
        };
    }
    Ok(rooms)
}

/// Sends a site-wide notice to every connection on every node.
pub async fn notice(node: &Node, content: String) -> std::result::Result<(), BrokerError> {
    let frame = ServerEvent::Notice {
        content,
        ts: Timestamp::now(),
    }
    .to_json();
    node.broker
        .publish_node(proto::envelope::NodeTarget::All, Bytes::from(frame))
        .await
}
