//! `create_room`, `update_room`, `delete_room`, `list_rooms`.

use bytes::Bytes;
use history_service::access::Action;
use history_service::Store;
use proto::auth::Identity;
use proto::client::{CreateRoom, DeleteRoom, UpdateRoom};
use proto::envelope::NodeTarget;
use proto::rooms::{RoomInfo, RoomSummary, Visibility};
use proto::{ErrorCode, ServerEvent, Timestamp, UserRef};

use super::{
    check_max_members, check_text, err, guard, publish_change, Ack, Cx, Result, Run, RunOnSession,
    SessionCx, MAX_NAME_CHARS, MAX_TOPIC_CHARS,
};
use crate::broker::{new_state_version, Broker, StateCheck};
use crate::node::Node;

/// Creates a room with `owner` as its owner (the `create_room` command, and a first `join`
/// when rooms are created on demand). Announces it to everyone (public and restricted) or
/// to the owner's connections (private). Returns its seq.
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
    let change = StateCheck::Change(new_state_version());
    let p = node
        .broker
        .publish_stored(&room, &ev.to_json(), None, change)
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

impl Run for CreateRoom {
    /// The room's owner is the session's user, or the server's `as_user`.
    async fn run(self, cx: &mut Cx<'_>) -> Result<Ack> {
        let name = self.name.unwrap_or_else(|| self.room.to_string());
        let topic = self.topic.unwrap_or_default();
        check_text("name", &name, MAX_NAME_CHARS)?;
        check_text("topic", &topic, MAX_TOPIC_CHARS)?;
        check_max_members(self.max_members)?;
        let owner = cx.by();
        let info = RoomInfo {
            id: self.room,
            name,
            topic,
            visibility: self.visibility,
            max_members: self.max_members,
            members_can_pin: false,
            owner: Some(owner.id.clone()),
            created_at: Timestamp::now(),
        };
        let seq = create(cx.node, info, owner).await?;
        Ok(Ack::seq(seq))
    }
}

impl Run for UpdateRoom {
    async fn run(self, cx: &mut Cx<'_>) -> Result<Ack> {
        let actor = cx.actor();
        let decided = guard::decide_fresh(cx.node, &self.room, |st| {
            guard::permits(actor, st, Action::UpdateRoom)
        })
        .await?;
        let mut info = decided.state.info.clone();
        if let Some(name) = self.name {
            check_text("name", &name, MAX_NAME_CHARS)?;
            info.name = name;
        }
        if let Some(topic) = self.topic {
            check_text("topic", &topic, MAX_TOPIC_CHARS)?;
            info.topic = topic;
        }
        if let Some(v) = self.visibility {
            info.visibility = v;
        }
        if self.max_members.is_some() {
            check_max_members(self.max_members)?;
            info.max_members = self.max_members;
        }
        if let Some(p) = self.members_can_pin {
            info.members_can_pin = p;
        }
        cx.node.rooms.store().update_room(&info).await?;
        publish_change(cx.node, &ServerEvent::RoomUpdated { seq: 0, room: info }).await
    }
}

impl Run for DeleteRoom {
    async fn run(self, cx: &mut Cx<'_>) -> Result<Ack> {
        let actor = cx.actor();
        guard::decide_fresh(cx.node, &self.room, |st| {
            guard::permits(actor, st, Action::DeleteRoom)
        })
        .await?;
        cx.node.rooms.store().delete_room(&self.room).await?;
        let ev = ServerEvent::RoomDeleted {
            seq: 0,
            room: self.room,
            by: cx.by().clone(),
        };
        publish_change(cx.node, &ev).await
    }
}

/// `list_rooms`.
pub struct ListRooms;

impl RunOnSession for ListRooms {
    async fn run(self, cx: &mut SessionCx<'_>) -> Result<Option<ServerEvent>> {
        let rooms = list_rooms(cx.node, &cx.caller.identity).await?;
        Ok(Some(ServerEvent::Rooms {
            r#ref: cx.r#ref.clone(),
            rooms,
        }))
    }
}

/// The rooms `who` may see (public, restricted, and private ones they are a member of), with
/// member counts from the store, online counts from presence, and — in rooms where `who` has
/// a read marker — `unread` = the room's last seq − that marker.
pub async fn list_rooms(node: &Node, who: &Identity) -> Result<Vec<RoomSummary>> {
    let mut rooms = node
        .history
        .list_rooms(who)
        .await
        .map_err(|e| err(e.code, e.message))?;
    let store = node.rooms.store();
    for r in &mut rooms {
        let (online, marker, log) = tokio::join!(
            node.broker.presence(&r.id, 0),
            store.marker(&r.id, &who.user.id),
            node.broker.recover(&r.id, None, None)
        );
        r.online_count = online.map_or(0, |o| o.count);
        r.unread = match (marker, log) {
            (Ok(Some(m)), Ok(log)) => Some(log.last_seq.saturating_sub(m)),
            _ => None,
        };
    }
    Ok(rooms)
}
