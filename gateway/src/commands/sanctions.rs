//! `ban`, `unban`, `mute`, `unmute`. A ban also ends the membership; the `banned` event takes
//! the user's sessions out of the room on every node as it is delivered.

use bytes::Bytes;
use history_service::access::Action;
use history_service::store::Ban as BanRow;
use history_service::Store;
use proto::client::{Ban, Mute, Unban, Unmute};
use proto::envelope::NodeTarget;
use proto::{ErrorCode, ServerEvent, Timestamp};

use super::members::role_of;
use super::{check_reason, err, guard, publish_change, until_of, user_ref, Ack, Cx, Result, Run};
use crate::broker::Broker;

impl Run for Ban {
    async fn run(self, cx: &mut Cx<'_>) -> Result<Ack> {
        let Ban {
            room,
            user,
            reason,
            duration_s,
        } = self;
        check_reason(&reason)?;
        let until = until_of(duration_s)?;
        let actor = cx.actor();
        let target = user.as_str();
        let decided = guard::decide_fresh(cx.node, &room, |st| {
            let role = role_of(st, target);
            guard::permits(actor, st, Action::Ban { target, role })
        })
        .await?;
        let banned = user_ref(&decided.state, &user);
        let store = cx.node.rooms.store();
        let row = BanRow {
            user: banned.clone(),
            by: cx.by().clone(),
            reason: reason.clone(),
            until,
            at: Timestamp::now(),
        };
        store.put_ban(&room, &row).await?;
        store.remove_member(&room, &user).await?;
        let ev = ServerEvent::Banned {
            seq: 0,
            room,
            user: banned,
            by: cx.by().clone(),
            reason,
            until,
        };
        publish_change(cx.node, &ev).await
    }
}

impl Run for Unban {
    async fn run(self, cx: &mut Cx<'_>) -> Result<Ack> {
        let Unban { room, user } = self;
        let actor = cx.actor();
        let decided = guard::decide_fresh(cx.node, &room, |st| {
            guard::permits(actor, st, Action::Unban)
        })
        .await?;
        if !decided.state.bans.iter().any(|b| b.user.id == user) {
            return Err(err(ErrorCode::NotFound, "that user is not banned"));
        }
        cx.node.rooms.store().remove_ban(&room, &user).await?;
        let ev = ServerEvent::Unbanned {
            seq: 0,
            room,
            user: user_ref(&decided.state, &user),
            by: cx.by().clone(),
        };
        let ack = publish_change(cx.node, &ev).await?;
        // The unbanned user is out of the room: their connections learn it this way (with its
        // seq, as the room has it).
        let frame = Bytes::from(proto::envelope::with_seq(&ev.to_json(), ack.seq));
        let target = NodeTarget::User(&user);
        if let Err(e) = cx.node.broker.publish_node(target, frame).await {
            tracing::debug!(error = %e, "could not tell an unbanned user");
        }
        Ok(ack)
    }
}

impl Run for Mute {
    async fn run(self, cx: &mut Cx<'_>) -> Result<Ack> {
        let Mute {
            room,
            user,
            duration_s,
        } = self;
        let until = until_of(duration_s)?;
        let actor = cx.actor();
        let target = user.as_str();
        let decided = guard::decide_fresh(cx.node, &room, |st| {
            let role = role_of(st, target);
            guard::permits(actor, st, Action::Mute { target, role })
        })
        .await?;
        if role_of(&decided.state, &user).is_none() {
            return Err(err(ErrorCode::NotFound, "that user is not a member"));
        }
        let store = cx.node.rooms.store();
        store.set_mute(&room, &user, until, true).await?;
        let ev = ServerEvent::Muted {
            seq: 0,
            room,
            user: user_ref(&decided.state, &user),
            by: cx.by().clone(),
            until,
        };
        publish_change(cx.node, &ev).await
    }
}

impl Run for Unmute {
    async fn run(self, cx: &mut Cx<'_>) -> Result<Ack> {
        let Unmute { room, user } = self;
        let actor = cx.actor();
        let decided = guard::decide_fresh(cx.node, &room, |st| {
            guard::permits(actor, st, Action::Unmute)
        })
        .await?;
        if role_of(&decided.state, &user).is_none() {
            return Err(err(ErrorCode::NotFound, "that user is not a member"));
        }
        let store = cx.node.rooms.store();
        store.set_mute(&room, &user, None, false).await?;
        let ev = ServerEvent::Unmuted {
            seq: 0,
            room,
            user: user_ref(&decided.state, &user),
            by: cx.by().clone(),
        };
        publish_change(cx.node, &ev).await
    }
}
