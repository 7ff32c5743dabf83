//! Room settings as this node knows them, and the authorization of commands against them.
//!
//! Until room management lands, a room that does not exist is created public on first join.

use std::collections::HashMap;
use std::sync::RwLock;

use proto::rooms::{RoomInfo, Visibility};
use proto::{RoomId, Timestamp};

#[derive(Default)]
pub struct Rooms {
    map: RwLock<HashMap<RoomId, RoomInfo>>,
}

impl Rooms {
    /// The room's settings, creating it public when it does not exist.
    pub fn ensure(&self, room: &RoomId) -> RoomInfo {
        if let Some(info) = self.get(room) {
            return info;
        }
        let mut map = self.map.write().expect("rooms lock");
        map.entry(room.clone())
            .or_insert_with(|| RoomInfo {
                id: room.clone(),
                name: room.to_string(),
                topic: String::new(),
                visibility: Visibility::Public,
                max_members: None,
                members_can_pin: false,
                owner: None,
                created_at: Timestamp::now(),
            })
            .clone()
    }

    pub fn get(&self, room: &RoomId) -> Option<RoomInfo> {
        self.map.read().expect("rooms lock").get(room).cloned()
    }

    /// Rooms listed to everyone.
    pub fn listed(&self) -> Vec<RoomInfo> {
        let mut rooms: Vec<RoomInfo> = self
            .map
            .read()
            .expect("rooms lock")
            .values()
            .filter(|r| r.visibility != Visibility::Private)
            .cloned()
            .collect();
        rooms.sort_by(|a, b| a.id.cmp(&b.id));
        rooms
    }
}
