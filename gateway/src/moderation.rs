//! Room management and moderation commands: create/update/delete rooms, membership and roles,
//! bans and mutes, pins. Each one authorizes against the room's state ([`crate::rooms`]),
//! writes the store first (so the next reader on any node sees it), then publishes the stored
//! event, whose arrival on every node invalidates that node's cache and removes banned, kicked
//! or deleted-room sessions ([`crate::hub::Hub::deliver`]). The caller gets `ack {ref, seq}`.

use std::sync::Arc;

use bytes::Bytes;
use history_service::store::{Ban, RoomState};
use history_service::Store;
use proto::envelope::NodeTarget;
use proto::rooms::{MessageView, Role, RoomInfo, Visibility};
use proto::{ErrorCode, MessageId, Ref, RoomId, ServerEvent, Timestamp, UserRef};

use crate::broker::{Broker, PinChange, PinOutcome};
use crate::commands::{CommandError, Result};
use crate::node::Node;
use crate::rooms::Access;
use crate::session::SessionState;

/// Pins per room at most.
pub const MAX_PINS: usize = 50;
const MAX_NAME_CHARS: usize = 100;
const MAX_TOPIC_CHARS: usize = 500;
const MAX_REASON_CHARS: usize = 500;
/// `max_members` at most (and a duration's bound: ten years).
const MAX_MEMBERS_LIMIT: u32 = 1_000_000;
const MAX_DURATION_S: u64 = 10 * 365 * 24 * 3600;

fn err(code: ErrorCode, message: impl Into<String>) -> CommandError {
    CommandError::new(code, message)
}

/// A banned user is answered `banned` by every command on the room, before any other refusal
/// (they learn why, not just that they may not).
pub fn not_banned(access: &Access) -> Result {
    if access.banned() {
        Err(err(ErrorCode::Banned, "you are banned from this room"))
    } else {
        Ok(())
    }
}

/// The room's state, or `not_found`.
pub async fn state_of(node: &Node, room: &RoomId) -> Result<Arc<RoomState>> {
    node.rooms
        .state(room)
        .await?
        .ok_or_else(|| err(ErrorCode::NotFound, format!("no room {room}")))
}

/// The room's state read from the store, not the cache: moderation is rare, and its target may
/// have joined a public room on another node a moment ago (that node's announcement of the
/// membership, [`Node::membership_changed`], may still be on its way).
async fn fresh_state_of(node: &Node, room: &RoomId) -> Result<Arc<RoomState>> {
    node.rooms.invalidate(room);
    state_of(node, room).await
}

fn check_text(what: &str, text: &str, max: usize) -> Result {
    if text.chars().count() > max {
        return Err(err(
            ErrorCode::TooLarge,
            format!("{what} is over {max} characters"),
        ));
    }
    Ok(())
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

fn check_reason(reason: &Option<String>) -> Result {
    match reason {
        Some(r) => check_text("reason", r, MAX_REASON_CHARS),
        None => Ok(()),
    }
}

/// Publishes a stored room event and acknowledges the caller with its seq (and the message
/// id, for edits and deletes).
pub async fn publish_and_ack(
    node: &Node,
    s: &SessionState,
    r#ref: Option<Ref>,
    ev: &ServerEvent,
    id: Option<MessageId>,
) -> Result {
    let room = ev_room(ev);
    let frame = ev.to_json();
    let p = node.broker.publish_stored(&room, &frame, None).await?;
    if crate::bus::kind_of(&frame).is_some_and(|k| crate::rooms::STATE_EVENTS.contains(&k)) {
        // Read your own writes: the event reaches this node's hub through the broker a moment
        // later (in scaled mode), and the caller's next command must already see the change.
        node.rooms.invalidate(&room);
    }
    s.send(&ServerEvent::Ack {
        r#ref,
        id,
        seq: Some(p.seq()),
        ts: None,
    });
    Ok(())
}

fn ev_room(ev: &ServerEvent) -> RoomId {
    use ServerEvent::*;
    match ev {
        RoomCreated { room, .. } | RoomUpdated { room, .. } => room.id.clone(),
        RoomDeleted { room, .. }
        | MemberAdded { room, .. }
        | MemberRemoved { room, .. }
        | MemberUpdated { room, .. }
        | Banned { room, .. }
        | Unbanned { room, .. }
        | Muted { room, .. }
        | Unmuted { room, .. }
        | Pinned { room, .. }
        | MessageEdited { room, .. }
        | MessageDeleted { room, .. }
        | Unpinned { room, .. } => room.clone(),
        _ => unreachable!("publish is only called with room events"),
    }
}

/// The display name of a user this node can name: a member's stored name, else the id.
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

/// Creates a room with `owner` as its owner (the `create_room` command, and a first `join`
/// when rooms are created on demand). Announces it to everyone (public and restricted) or
/// to the owner's connections (private).
pub async fn create(node: &Node, info: RoomInfo, owner: &UserRef) -> Result<u64> {
    let store = node.rooms.store();
    store.create_room(&info, owner).await.map_err(|e| match e {
        history_service::StoreError::Conflict => {
            err(ErrorCode::Conflict, format!("room id {} is taken", info.id))
        }
        other => other.into(),
    })?;
    let room = info.id.clone();
    let visibility = info.visibility;
    let ev = ServerEvent::RoomCreated {
        seq: 0,
        room: RoomInfo {
            owner: Some(owner.id.clone()),
            ..info
        },
    };
    let p = node
        .broker
        .publish_stored(&room, &ev.to_json(), None)
        .await?;
    let announced = proto::envelope::with_seq(&ev.to_json(), p.seq());
    let target = match visibility {
        Visibility::Private => NodeTarget::User(&owner.id),
        _ => NodeTarget::All,
    };
    node.broker
        .publish_node(target, Bytes::from(announced))
        .await?;
    Ok(p.seq())
}

pub async fn create_room(
    node: &Node,
    s: &SessionState,
    r#ref: Option<Ref>,
    room: RoomId,
    name: Option<String>,
    visibility: Visibility,
    topic: Option<String>,
    max_members: Option<u32>,
) -> Result {
    let name = name.unwrap_or_else(|| room.to_string());
    let topic = topic.unwrap_or_default();
    check_text("name", &name, MAX_NAME_CHARS)?;
    check_text("topic", &topic, MAX_TOPIC_CHARS)?;
    check_max_members(max_members)?;
    let info = RoomInfo {
        id: room,
        name,
        topic,
        visibility,
        max_members,
        members_can_pin: false,
        owner: Some(s.user().id.clone()),
        created_at: Timestamp::now(),
    };
    let seq = create(node, info, s.user()).await?;
    s.send(&ServerEvent::Ack {
        r#ref,
        id: None,
        seq: Some(seq),
        ts: None,
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub async fn update_room(
    node: &Node,
    s: &SessionState,
    r#ref: Option<Ref>,
    room: RoomId,
    name: Option<String>,
    topic: Option<String>,
    visibility: Option<Visibility>,
    max_members: Option<u32>,
    members_can_pin: Option<bool>,
) -> Result {
    let state = fresh_state_of(node, &room).await?;
    let access = Access::of(&state, &s.identity);
    not_banned(&access)?;
    if !access.moderates() {
        return Err(err(
            ErrorCode::Forbidden,
            "only the owner or an admin may update the room",
        ));
    }
    let mut info = state.info.clone();
    if let Some(name) = name {
        check_text("name", &name, MAX_NAME_CHARS)?;
        info.name = name;
    }
    if let Some(topic) = topic {
        check_text("topic", &topic, MAX_TOPIC_CHARS)?;
        info.topic = topic;
    }
    if let Some(v) = visibility {
        info.visibility = v;
    }
    if max_members.is_some() {
        check_max_members(max_members)?;
        info.max_members = max_members;
    }
    if let Some(p) = members_can_pin {
        info.members_can_pin = p;
    }
    node.rooms.store().update_room(&info).await?;
    let ev = ServerEvent::RoomUpdated { seq: 0, room: info };
    publish_and_ack(node, s, r#ref, &ev, None).await
}

pub async fn delete_room(
    node: &Node,
    s: &SessionState,
    r#ref: Option<Ref>,
    room: RoomId,
) -> Result {
    let state = fresh_state_of(node, &room).await?;
    let access = Access::of(&state, &s.identity);
    not_banned(&access)?;
    if !(access.global_admin || access.role() == Some(Role::Owner)) {
        return Err(err(
            ErrorCode::Forbidden,
            "only the owner or a global admin may delete the room",
        ));
    }
    node.rooms.store().delete_room(&room).await?;
    let ev = ServerEvent::RoomDeleted {
        seq: 0,
        room,
        by: s.user().clone(),
    };
    publish_and_ack(node, s, r#ref, &ev, None).await
}

pub async fn add_member(
    node: &Node,
    s: &SessionState,
    r#ref: Option<Ref>,
    room: RoomId,
    user: String,
    role: Option<Role>,
) -> Result {
    let state = fresh_state_of(node, &room).await?;
    let access = Access::of(&state, &s.identity);
    not_banned(&access)?;
    if !access.moderates() {
        return Err(err(
            ErrorCode::Forbidden,
            "only the owner or an admin may add members",
        ));
    }
    let role = role.unwrap_or(Role::Member);
    match role {
        Role::Owner => return Err(err(ErrorCode::Invalid, "role must be member or admin")),
        Role::Admin if !(access.global_admin || access.role() == Some(Role::Owner)) => {
            return Err(err(ErrorCode::Forbidden, "only the owner may add admins"))
        }
        _ => {}
    }
    if access.member_of(&user).is_some() {
        return Err(err(ErrorCode::Conflict, "already a member; use set_role"));
    }
    if state
        .bans
        .iter()
        .any(|b| b.user.id == user && b.active_at(Timestamp::now()))
    {
        return Err(err(ErrorCode::Banned, "that user is banned from this room"));
    }
    if let Some(max) = state.info.max_members {
        if access.member_count() >= max as usize {
            return Err(err(
                ErrorCode::RoomFull,
                format!("the room is full ({max} members)"),
            ));
        }
    }
    let target = user_ref(&state, &user);
    node.rooms.store().put_member(&room, &target, role).await?;
    let ev = ServerEvent::MemberAdded {
        seq: 0,
        room,
        user: target.clone(),
        role,
        by: s.user().clone(),
    };
    publish_and_ack(node, s, r#ref, &ev, None).await?;
    // The new member learns it even when not in the room (a private room they can now see).
    let frame = Bytes::from(ev.to_json());
    let _ = node
        .broker
        .publish_node(NodeTarget::User(&target.id), frame)
        .await;
    Ok(())
}

/// `remove_member` and `kick`: the membership ends (if any) and the user's connections leave.
pub async fn remove_member(
    node: &Node,
    s: &SessionState,
    r#ref: Option<Ref>,
    room: RoomId,
    user: String,
    reason: Option<String>,
) -> Result {
    check_reason(&reason)?;
    let state = fresh_state_of(node, &room).await?;
    let access = Access::of(&state, &s.identity);
    not_banned(&access)?;
    if !access.moderates() {
        return Err(err(
            ErrorCode::Forbidden,
            "only the owner or an admin may remove members",
        ));
    }
    if !access.outranks(&user) {
        return Err(err(ErrorCode::Forbidden, "you cannot remove that user"));
    }
    node.rooms.store().remove_member(&room, &user).await?;
    let ev = ServerEvent::MemberRemoved {
        seq: 0,
        room,
        user: user_ref(&state, &user),
        by: s.user().clone(),
        reason,
    };
    publish_and_ack(node, s, r#ref, &ev, None).await
}

pub async fn ban(
    node: &Node,
    s: &SessionState,
    r#ref: Option<Ref>,
    room: RoomId,
    user: String,
    reason: Option<String>,
    duration_s: Option<u64>,
) -> Result {
    check_reason(&reason)?;
    let until = until_of(duration_s)?;
    let state = fresh_state_of(node, &room).await?;
    let access = Access::of(&state, &s.identity);
    not_banned(&access)?;
    if !access.moderates() {
        return Err(err(
            ErrorCode::Forbidden,
            "only the owner or an admin may ban",
        ));
    }
    if user == s.user().id || !access.outranks(&user) {
        return Err(err(ErrorCode::Forbidden, "you cannot ban that user"));
    }
    let target = user_ref(&state, &user);
    let store = node.rooms.store();
    store
        .put_ban(
            &room,
            &Ban {
                user: target.clone(),
                by: s.user().clone(),
                reason: reason.clone(),
                until,
                at: Timestamp::now(),
            },
        )
        .await?;
    store.remove_member(&room, &user).await?;
    let ev = ServerEvent::Banned {
        seq: 0,
        room,
        user: target,
        by: s.user().clone(),
        reason,
        until,
    };
    publish_and_ack(node, s, r#ref, &ev, None).await
}

pub async fn unban(
    node: &Node,
    s: &SessionState,
    r#ref: Option<Ref>,
    room: RoomId,
    user: String,
) -> Result {
    let state = fresh_state_of(node, &room).await?;
    let access = Access::of(&state, &s.identity);
    not_banned(&access)?;
    if !access.moderates() {
        return Err(err(
            ErrorCode::Forbidden,
            "only the owner or an admin may unban",
        ));
    }
    if !state.bans.iter().any(|b| b.user.id == user) {
        return Err(err(ErrorCode::NotFound, "that user is not banned"));
    }
    node.rooms.store().remove_ban(&room, &user).await?;
    let ev = ServerEvent::Unbanned {
        seq: 0,
        room,
        user: user_ref(&state, &user),
        by: s.user().clone(),
    };
    publish_and_ack(node, s, r#ref, &ev, None).await
}

pub async fn mute(
    node: &Node,
    s: &SessionState,
    r#ref: Option<Ref>,
    room: RoomId,
    user: String,
    duration_s: Option<u64>,
    muted: bool,
) -> Result {
    let until = if muted { until_of(duration_s)? } else { None };
    let state = fresh_state_of(node, &room).await?;
    let access = Access::of(&state, &s.identity);
    not_banned(&access)?;
    if !access.moderates() {
        return Err(err(
            ErrorCode::Forbidden,
            "only the owner or an admin may mute",
        ));
    }
    if muted && (user == s.user().id || !access.outranks(&user)) {
        return Err(err(ErrorCode::Forbidden, "you cannot mute that user"));
    }
    if access.member_of(&user).is_none() {
        return Err(err(ErrorCode::NotFound, "that user is not a member"));
    }
    node.rooms
        .store()
        .set_mute(&room, &user, until, muted)
        .await?;
    let target = user_ref(&state, &user);
    let by = s.user().clone();
    let ev = if muted {
        ServerEvent::Muted {
            seq: 0,
            room,
            user: target,
            by,
            until,
        }
    } else {
        ServerEvent::Unmuted {
            seq: 0,
            room,
            user: target,
            by,
        }
    };
    publish_and_ack(node, s, r#ref, &ev, None).await
}

pub async fn set_role(
    node: &Node,
    s: &SessionState,
    r#ref: Option<Ref>,
    room: RoomId,
    user: String,
    role: Role,
) -> Result {
    let state = fresh_state_of(node, &room).await?;
    let access = Access::of(&state, &s.identity);
    not_banned(&access)?;
    if !(access.global_admin || access.role() == Some(Role::Owner)) {
        return Err(err(ErrorCode::Forbidden, "only the owner may change roles"));
    }
    if role == Role::Owner {
        return Err(err(ErrorCode::Invalid, "role must be member or admin"));
    }
    let Some(member) = access.member_of(&user) else {
        return Err(err(ErrorCode::NotFound, "that user is not a member"));
    };
    if member.role == Role::Owner {
        return Err(err(ErrorCode::Forbidden, "the owner's role cannot change"));
    }
    node.rooms
        .store()
        .put_member(&room, &member.user, role)
        .await?;
    let ev = ServerEvent::MemberUpdated {
        seq: 0,
        room,
        user: member.user.clone(),
        role,
        by: s.user().clone(),
    };
    publish_and_ack(node, s, r#ref, &ev, None).await
}

pub async fn pin(
    node: &Node,
    s: &SessionState,
    r#ref: Option<Ref>,
    room: RoomId,
    id: MessageId,
    pinned: bool,
) -> Result {
    let state = state_of(node, &room).await?;
    let access = Access::of(&state, &s.identity);
    not_banned(&access)?;
    if !access.may_read() || !access.may_pin() {
        return Err(err(ErrorCode::Forbidden, "you may not pin in this room"));
    }
    let stored: Vec<MessageId> = node
        .rooms
        .store()
        .pins(&room)
        .await?
        .iter()
        .map(|p| p.message.id)
        .collect();
    let (change, ev) = if pinned {
        let message = find_message(node, &room, id).await?;
        let ev = ServerEvent::Pinned {
            seq: 0,
            room: room.clone(),
            message,
            by: s.user().clone(),
            pinned_at: Timestamp::now(),
        };
        (PinChange::Pin, ev)
    } else {
        let ev = ServerEvent::Unpinned {
            seq: 0,
            room: room.clone(),
            id,
            by: s.user().clone(),
        };
        (PinChange::Unpin, ev)
    };
    match node
        .broker
        .pin_set(&room, id, change, MAX_PINS, Some(&stored))
        .await?
    {
        PinOutcome::Done => {}
        PinOutcome::AlreadyPinned => return Err(err(ErrorCode::Conflict, "already pinned")),
        PinOutcome::NotPinned => return Err(err(ErrorCode::NotFound, "not pinned")),
        PinOutcome::Full => {
            return Err(err(
                ErrorCode::Conflict,
                format!("at most {MAX_PINS} pins per room; unpin one first"),
            ))
        }
    }
    let published = publish_and_ack(node, s, r#ref, &ev, None).await;
    if published.is_err() {
        // Not published: give the change back so the pin set matches what the room saw.
        let _ = node
            .broker
            .pin_set(&room, id, change.undo(), MAX_PINS, Some(&stored))
            .await;
    }
    published
}

/// A deleted message leaves the room's pin set (the store unpins it as it stores the delete).
pub async fn unpin_deleted(node: &Node, room: &RoomId, id: MessageId) {
    if let Err(e) = node
        .broker
        .pin_set(room, id, PinChange::Unpin, MAX_PINS, None)
        .await
    {
        tracing::warn!(error = %e, %room, "could not drop a deleted message's pin");
    }
}

/// A live (not deleted) message: from the store, or — when the store has not caught up with
/// the persistence stream yet — from the room's recovery window.
pub async fn find_message(node: &Node, room: &RoomId, id: MessageId) -> Result<MessageView> {
    let not_found = || err(ErrorCode::NotFound, "no such message");
    if let Some(m) = node.rooms.store().message(room, id).await? {
        return if m.deleted { Err(not_found()) } else { Ok(m) };
    }
    let recent = node.broker.recover(room, Some(0)).await?;
    let mut found: Option<MessageView> = None;
    for (_, frame) in &recent.events {
        match serde_json::from_slice::<ServerEvent>(frame) {
            Ok(ServerEvent::Message {
                seq,
                room,
                id: m,
                user,
                content,
                ts,
                reply_to,
                ..
            }) if m == id => {
                found = Some(MessageView {
                    room,
                    id,
                    seq,
                    user,
                    content: Some(content),
                    ts,
                    reply_to,
                    edited_at: None,
                    deleted: false,
                })
            }
            Ok(ServerEvent::MessageEdited {
                id: m,
                content,
                edited_at,
                ..
            }) if m == id => {
                if let Some(f) = found.as_mut() {
                    f.content = Some(content);
                    f.edited_at = Some(edited_at);
                }
            }
            Ok(ServerEvent::MessageDeleted { id: m, .. }) if m == id => return Err(not_found()),
            _ => {}
        }
    }
    found.ok_or_else(not_found)
}
