//! Where things live in Redis. Rooms are spread over `CHAT_REDIS_PARTITIONS` partitions by a
//! stable hash of the room id; every key of a room and its partition's persistence stream
//! carry the partition's hash tag (`{p17}`), so they share one cluster slot and one Lua
//! script can touch them all atomically. On a Redis Cluster the partitions (and with them the
//! rooms and the persistence streams) spread over the shards; on one primary they are just
//! names.
//!
//! - `chat:{pN}:persist` — partition N's persistence stream, consumed by the history service
//!   (consumer group `history`).
//! - `chat:{pN}:epoch` — partition N's epoch: a random id that changes whenever Redis lost
//!   (or may have lost) the partition's data; see `gateway::broker::redis`.
//! - `chat:{pN}:<room>:…` — the room's keys (`gateway::broker::redis` lists them).
//! - `chat:partitions` — the partition count the deployment runs with; every process checks
//!   it at start, because a process counting differently would put rooms elsewhere.
//! - `chat:persist` — the persistence stream of builds before partitions ([`LEGACY_STREAM`]).

/// The first part of every key.
pub const PREFIX: &str = "chat";
/// The key that records the partition count.
pub const COUNT_KEY: &str = "chat:partitions";
/// The one persistence stream of builds before partitions (one primary only). A history
/// service drains it when it is there, so that an upgrade loses none of what the old
/// gateways acknowledged and the old history service had not stored yet.
pub const LEGACY_STREAM: &str = "chat:persist";

/// A room's partition: FNV-1a (32 bit) of its id, modulo the partition count. Stable across
/// versions and processes: changing it (or the count) moves rooms to other keys.
pub fn of(room: &str, partitions: u16) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in room.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % u32::from(partitions.max(1))) as u16
}

/// `chat:{pN}` — the start of every key of partition N.
pub fn base(p: u16) -> String {
    format!("{PREFIX}:{{p{p}}}")
}

/// Partition N's persistence stream.
pub fn stream(p: u16) -> String {
    format!("{}:persist", base(p))
}

/// Partition N's epoch key.
pub fn epoch(p: u16) -> String {
    format!("{}:epoch", base(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_map_to_stable_partitions() {
        // Fixed values: a change here moves every deployed room to other keys.
        assert_eq!(of("general", 64), of("general", 64));
        assert_eq!(of("", 64), (0x811c_9dc5u32 % 64) as u16);
        assert_eq!(of("a", 1 << 10), (0xe40c_292cu32 % 1024) as u16);
        assert!(of("anything", 1) == 0);
        assert_eq!(stream(17), "chat:{p17}:persist");
        assert_eq!(epoch(3), "chat:{p3}:epoch");
    }

    #[test]
    fn rooms_spread_over_partitions() {
        let mut count = [0u32; 16];
        for i in 0..1600 {
            count[of(&format!("room-{i}"), 16) as usize] += 1;
        }
        assert!(count.iter().all(|&c| (50..=150).contains(&c)), "{count:?}");
    }
}
