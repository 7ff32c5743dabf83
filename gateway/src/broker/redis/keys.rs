//! The names of a room's keys and channel. Every one carries the hash tag of the room's
//! partition (`{p17}`, see `history_service::partitions`), shared with the partition's
//! persistence stream and epoch, so one Lua script may touch them all on a Redis Cluster.

use history_service::partitions;
use proto::RoomId;

/// A room's place in Redis.
#[derive(Clone, Debug)]
pub struct RoomKeys {
    pub partition: u16,
    /// `chat:{pN}:r:<room>`: the room's channel, and the start of its keys.
    base: String,
}

impl RoomKeys {
    pub fn new(room: &RoomId, partitions: u16) -> Self {
        let partition = partitions::of(room.as_str(), partitions);
        Self {
            partition,
            base: format!("{}:r:{room}", partitions::base(partition)),
        }
    }

    /// One of the room's keys: `chat:{pN}:r:<room>:<suffix>`.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.base)
    }

    /// The room's sharded pub/sub channel.
    pub fn channel(&self) -> &str {
        &self.base
    }

    /// The partition's epoch.
    pub fn epoch(&self) -> String {
        partitions::epoch(self.partition)
    }

    /// The partition's persistence stream.
    pub fn persist(&self) -> String {
        partitions::stream(self.partition)
    }

    /// The partition's set of rooms with presence entries (swept for dead nodes' users).
    pub fn presence_rooms(&self) -> String {
        presence_rooms(self.partition)
    }
}

/// Partition N's set of rooms with presence entries.
pub fn presence_rooms(p: u16) -> String {
    format!("{}:presence-rooms", partitions::base(p))
}

/// The room a channel belongs to (`chat:{pN}:r:<room>`).
pub fn room_of_channel(ch: &[u8]) -> Option<RoomId> {
    let ch = std::str::from_utf8(ch).ok()?;
    let rest = ch.strip_prefix(partitions::PREFIX)?.strip_prefix(":{p")?;
    let (_, room) = rest.split_once("}:r:")?;
    RoomId::new(room).ok()
}

/// The room's seq counter under the key layout before partitions (`chat:{room}:seq`): an
/// upgraded deployment's rooms number on from it.
pub fn legacy_seq(room: &RoomId) -> String {
    format!("{}:{{{room}}}:seq", partitions::PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_keys_share_its_partition_slot() {
        let room = RoomId::new("general").unwrap();
        let k = RoomKeys::new(&room, 64);
        let slot = history_service::redis_conn::slot_of;
        for key in [
            k.key("seq"),
            k.epoch(),
            k.persist(),
            k.channel().to_string(),
        ] {
            assert_eq!(slot(&key), slot(&k.persist()), "{key}");
        }
        assert_eq!(room_of_channel(k.channel().as_bytes()), Some(room));
        assert_eq!(
            room_of_channel(b"chat:{p3}:r:a-b_c"),
            RoomId::new("a-b_c").ok()
        );
        assert_eq!(room_of_channel(b"chat:nodes"), None);
        assert_eq!(room_of_channel(b"chat:{p3}:persist"), None);
        assert_eq!(legacy_seq(&RoomId::new("x").unwrap()), "chat:{x}:seq");
    }
}
