//! `join` and `leave`, and leaving every room when a session ends.
//!
//! A join reads the room's recovery window *after* registering the session in the hub (in the
//! holding state), so every stored event is either in the window it reads or reaches the
//! session live — held until `joined` is sent, then released above the window's last seq
//! (see [`crate::hub::Hub::release`]). The window read also returns the room's state
//! version: when it is not the one the join was decided on, the join is decided again on
//! state read now (and backed out when the answer changed).

use history_service::access::Action;
use history_service::store::{MemberPut, RoomState};
use history_service::Store;
use proto::client::{Join, Leave};
use proto::rooms::{Role, RoomInfo, Visibility};
use proto::{ErrorCode, Ref, RoomId, ServerEvent, Timestamp};

use super::members::role_of;
use super::{
    err, guard, pins, rooms, Actor, Caller, CommandError, Result, RunOnSession, SessionCx,
};
use crate::broker::Broker;
use crate::node::Node;
use crate::online::Change;
use crate::room_state::MemberChange;

impl RunOnSession for Join {
    /// Answers by itself (`joined`, or an `error`): `joined` must be queued before the events
    /// held during the join are released.
    async fn run(self, cx: &mut SessionCx<'_>) -> Result<Option<ServerEvent>> {
        let r#ref = cx.r#ref.clone();
        join(cx.node, cx.caller, r#ref, self).await;
        Ok(None)
    }
}

/// Joins a room and answers `joined`, or an error frame on failure (the upgrade URL's room is
/// joined this way, before the session reads any frame).
pub async fn join(node: &std::sync::Arc<Node>, caller: &mut Caller, r#ref: Option<Ref>, cmd: Join) {
    if let Err(e) = try_join(node, caller, r#ref.clone(), &cmd).await {
        caller.send(&ServerEvent::error(r#ref, e.code, e.message));
    }
}

/// An `epoch` longer than this is refused (the brokers' are 16 hex digits).
const MAX_EPOCH: usize = 64;

/// May `caller` join: read access, and room for one more when joining a public room makes
/// them a member.
fn may_join(st: &RoomState, caller: &Caller) -> Result {
    guard::permits(Actor::User(&caller.identity), st, Action::Read)?;
    if st.info.visibility == Visibility::Public && role_of(st, &caller.user().id).is_none() {
        if let Some(max) = st.info.max_members {
            if st.members.len() >= max as usize {
                return Err(err(
                    ErrorCode::RoomFull,
                    format!("the room is full ({max} members)"),
                ));
            }
        }
    }
    Ok(())
}

async fn try_join(
    node: &std::sync::Arc<Node>,
    caller: &mut Caller,
    r#ref: Option<Ref>,
    cmd: &Join,
) -> Result {
    let (room, since) = (&cmd.room, cmd.since);
    if cmd.epoch.as_ref().is_some_and(|e| e.len() > MAX_EPOCH) {
        return Err(err(
            ErrorCode::Invalid,
            format!("epoch must be at most {MAX_EPOCH} bytes"),
        ));
    }
    if caller.in_room(node, room) {
        return Err(err(ErrorCode::Conflict, "already in this room"));
    }
    let max = node.config.max_rooms_per_connection;
    if caller.rooms.len() >= max {
        return Err(err(
            ErrorCode::Forbidden,
            format!("at most {max} rooms per connection"),
        ));
    }
    if node.config.auto_create_rooms && node.rooms.get(&node.broker, room).await?.is_none() {
        create_on_join(node, caller, room).await?;
    }
    let caller_ref = &*caller;
    let mut decided = guard::decide(node, room, |st| may_join(st, caller_ref)).await?;

    // Dropped (the join fails, or the connection's task ends mid-way), this takes the session
    // out of the room again.
    let joining = node.hub.join(room, caller.handle.clone());
    // Every joiner waits for the subscription, not only the room's first local session: a
    // second joiner that read the room's seq before the first one's SUBSCRIBE took effect
    // would never get the events in between.
    let setup = async {
        node.broker.subscribe(room).await?;
        node.broker.recover(room, since, cmd.epoch.as_deref()).await
    };
    let recovery = match setup.await {
        Ok(r) => r,
        Err(e) => {
            back_out(node, caller, room).await;
            return Err(e.into());
        }
    };
    if recovery.version != decided.version {
        // The room's state changed since this node's copy: decide on what holds now.
        let caller_ref = &*caller;
        match guard::decide_fresh(node, room, |st| may_join(st, caller_ref)).await {
            Ok(now) => decided = now,
            Err(e) => {
                back_out(node, caller, room).await;
                return Err(e);
            }
        }
    }
    // The membership, the read marker and the pins, at once: each is batched with other
    // joins' or cached per room, so a join storm makes a few store calls, not three per join.
    let marker_key = (room.clone(), caller.user().id.clone());
    let state = async {
        tokio::try_join!(
            become_member(
                node,
                caller,
                room,
                &decided.state,
                role_of(&decided.state, &caller.user().id)
            ),
            async { Ok(node.markers.call(marker_key).await?) },
            pins::joined_pins(node, room, recovery.pins.clone()),
        )
    };
    let (role, marker, pins) = match state.await {
        Ok(r) => r,
        Err(e) => {
            back_out(node, caller, room).await;
            return Err(e);
        }
    };
    let info = decided.state.info.clone();

    let recovered = since.is_some() && recovery.complete;
    if recovered {
        // One write for the whole replay.
        crate::cork::corked(|| {
            for (_, frame) in &recovery.events {
                caller.handle.send(frame.clone());
            }
        });
    }
    node.hub
        .seen_up_to(room, caller.handle.id, recovery.last_seq);
    // Marking the user online reads who is online in the same step (capped for big rooms).
    let (newly_online, online) = node
        .broker
        .presence_add(room, caller.user(), crate::node::ONLINE_LIST_MAX)
        .await
        .unwrap_or_default();
    if !node.hub.contains(room, caller.handle.id) {
        // A ban, kick or deletion took this session out while it was joining (its held
        // events went with it): undo the presence and say so instead of a dead `joined`.
        let _ = node.broker.presence_remove(room, &caller.user().id).await;
        return Err(err(
            ErrorCode::Forbidden,
            "removed from the room while joining; retry",
        ));
    }
    caller.rooms.insert(room.clone());
    joining.joined();
    let online_count = online.count;
    let joined = ServerEvent::Joined {
        r#ref,
        room: info,
        seq: recovery.last_seq,
        epoch: Some(recovery.epoch),
        online: online.users,
        online_count,
        pins,
        recovered,
        role,
        unread: Some(recovery.last_seq.saturating_sub(marker.unwrap_or(0))),
    };
    // `joined` and the events held while joining, in one write.
    crate::cork::corked(|| {
        caller.send(&joined);
        node.hub.release(room, caller.handle.id);
    });
    // The room hears of the newcomer after the newcomer has its answer: the announcement is
    // not on the join's critical path.
    if newly_online {
        let change = Change::Joined(caller.user().clone());
        node.presence_changed(room, change, online_count).await;
    }
    Ok(())
}

/// A first `join` of a room id nobody used creates it, public, with the joiner as its owner
/// (as `create_room` would).
async fn create_on_join(node: &Node, caller: &Caller, room: &RoomId) -> Result {
    let info = RoomInfo {
        id: room.clone(),
        name: room.to_string(),
        topic: String::new(),
        visibility: Visibility::Public,
        max_members: None,
        members_can_pin: false,
        owner: Some(caller.user().id.clone()),
        created_at: Timestamp::now(),
    };
    match rooms::create(node, info, caller.user()).await {
        // Another join created it first: join that one.
        Ok(_)
        | Err(CommandError {
            code: ErrorCode::Conflict,
            ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Joining a public room makes the user a member (counted, may pin when allowed); a member
/// whose display name changed has it updated. Returns the caller's role.
async fn become_member(
    node: &Node,
    caller: &Caller,
    room: &RoomId,
    state: &RoomState,
    role: Option<Role>,
) -> Result<Option<Role>> {
    let user = caller.user();
    let stale_name = state
        .members
        .iter()
        .any(|m| m.user.id == user.id && m.user.name != user.name);
    let joins_public = state.info.visibility == Visibility::Public && role.is_none();
    if !(joins_public || stale_name) {
        return Ok(role);
    }
    let Some(r) = role.or(joins_public.then_some(Role::Member)) else {
        return Ok(role);
    };
    // Batched with other joins' memberships; the batch updates this node's copy of the room
    // and tells the other nodes (see `Node::put_members`).
    let put = MemberPut {
        room: room.clone(),
        user: user.clone(),
        role: r,
    };
    if !node.members.call(put).await? {
        return Err(err(ErrorCode::NotFound, format!("no room {room}")));
    }
    Ok(Some(r))
}

/// Undoes a join's registration after it failed.
async fn back_out(node: &Node, caller: &Caller, room: &RoomId) {
    if node.hub.remove(room, caller.handle.id) {
        let _ = node.broker.unsubscribe(room).await;
    }
}

impl RunOnSession for Leave {
    async fn run(self, cx: &mut SessionCx<'_>) -> Result<Option<ServerEvent>> {
        let room = self.room;
        let node = cx.node;
        if !cx.caller.in_room(node, &room) {
            return Err(err(ErrorCode::NotFound, "not in this room"));
        }
        // Leaving a public room ends a plain membership (admins and owners keep theirs).
        // Every node hears of it before the room sees the `leave`.
        if let Ok(Some(copy)) = node.rooms.get(&node.broker, &room).await {
            if copy.state.info.visibility == Visibility::Public
                && role_of(&copy.state, &cx.caller.user().id) == Some(Role::Member)
            {
                let user = cx.caller.user().id.clone();
                node.rooms.store().remove_member(&room, &user).await?;
                node.membership_changed(&room, &[MemberChange::Removed(user)])
                    .await;
            }
        }
        cx.caller.rooms.remove(&room);
        leave_room(node, cx.caller, &room).await;
        Ok(Some(ServerEvent::Left {
            r#ref: cx.r#ref.clone(),
            room,
        }))
    }
}

/// Takes a session out of a room (leave, disconnect, removal); tells the room when the user's
/// last connection left.
///
/// A session an eviction (ban, kick, room deletion) already took out is not counted out of
/// presence again: the eviction did that.
pub async fn leave_room(node: &std::sync::Arc<Node>, caller: &Caller, room: &RoomId) {
    match node.hub.take(room, caller.handle.id) {
        None => return,
        Some(true) => {
            if let Err(e) = node.broker.unsubscribe(room).await {
                tracing::warn!(error = %e, %room, "unsubscribe failed");
            }
        }
        Some(false) => {}
    }
    if let Ok(Some(online)) = node.broker.presence_remove(room, &caller.user().id).await {
        node.stop_typing(room, caller.user(), false).await;
        let change = Change::Left(caller.user().clone());
        node.presence_changed(room, change, online).await;
    }
}
