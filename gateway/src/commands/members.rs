//! `add_member`, `remove_member` / `kick`, `set_role`.

use bytes::Bytes;
use history_service::access::Action;
use history_service::store::RoomState;
use history_service::Store;
use proto::client::{AddMember, RemoveMember, SetRole};
use proto::envelope::NodeTarget;
use proto::rooms::Role;
use proto::{ErrorCode, ServerEvent, Timestamp};

use super::{check_reason, err, guard, publish_change, user_ref, Ack, Cx, Result, Run};
use crate::broker::Broker;

/// `user`'s role in the room (None: not a member).
pub(super) fn role_of(state: &RoomState, user: &str) -> Option<Role> {
    state
        .members
        .iter()
        .find(|m| m.user.id == user)
        .map(|m| m.role)
}

impl Run for AddMember {
    async fn run(self, cx: &mut Cx<'_>) -> Result<Ack> {
        let AddMember { room, user, role } = self;
        let role = role.unwrap_or(Role::Member);
        let actor = cx.actor();
        let decided = guard::decide_fresh(cx.node, &room, |st| {
            guard::permits(actor, st, Action::AddMember { role })
        })
        .await?;
        let state = &decided.state;
        if role_of(state, &user).is_some() {
            return Err(err(ErrorCode::Conflict, "already a member; use set_role"));
        }
        let now = Timestamp::now();
        if state
            .bans
            .iter()
            .any(|b| b.user.id == user && b.active_at(now))
        {
            return Err(err(ErrorCode::Banned, "that user is banned from this room"));
        }
        if let Some(max) = state.info.max_members {
            if state.members.len() >= max as usize {
                return Err(err(
                    ErrorCode::RoomFull,
                    format!("the room is full ({max} members)"),
                ));
            }
        }
        let target = user_ref(state, &user);
        cx.node
            .rooms
            .store()
            .put_member(&room, &target, role)
            .await?;
        let ev = ServerEvent::MemberAdded {
            seq: 0,
            room,
            user: target.clone(),
            role,
            by: cx.by().clone(),
        };
        let ack = publish_change(cx.node, &ev).await?;
        // The new member learns it even when not in the room (a private room they can now see);
        // with its seq, as the room has it (a connection in the room skips this copy).
        let frame = Bytes::from(proto::envelope::with_seq(&ev.to_json(), ack.seq));
        let _ = cx
            .node
            .broker
            .publish_node(NodeTarget::User(&target.id), frame)
            .await;
        Ok(ack)
    }
}

/// `remove_member` and `kick`: the membership ends (if any) and the user's connections leave.
impl Run for RemoveMember {
    async fn run(self, cx: &mut Cx<'_>) -> Result<Ack> {
        let RemoveMember { room, user, reason } = self;
        check_reason(&reason)?;
        let actor = cx.actor();
        let target = user.as_str();
        let decided = guard::decide_fresh(cx.node, &room, |st| {
            let role = role_of(st, target);
            guard::permits(actor, st, Action::Remove { target, role })
        })
        .await?;
        cx.node.rooms.store().remove_member(&room, &user).await?;
        let ev = ServerEvent::MemberRemoved {
            seq: 0,
            room,
            user: user_ref(&decided.state, &user),
            by: cx.by().clone(),
            reason,
        };
        publish_change(cx.node, &ev).await
    }
}

impl Run for SetRole {
    async fn run(self, cx: &mut Cx<'_>) -> Result<Ack> {
        let SetRole { room, user, role } = self;
        let actor = cx.actor();
        let target = user.as_str();
        let decided = guard::decide_fresh(cx.node, &room, |st| {
            let theirs = role_of(st, target);
            let action = Action::SetRole {
                target,
                role: theirs,
                to: role,
            };
            guard::permits(actor, st, action)
        })
        .await?;
        let Some(member) = decided.state.members.iter().find(|m| m.user.id == user) else {
            return Err(err(ErrorCode::NotFound, "that user is not a member"));
        };
        cx.node
            .rooms
            .store()
            .put_member(&room, &member.user, role)
            .await?;
        let ev = ServerEvent::MemberUpdated {
            seq: 0,
            room,
            user: member.user.clone(),
            role,
            by: cx.by().clone(),
        };
        publish_change(cx.node, &ev).await
    }
}
