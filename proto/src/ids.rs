//! Identifiers and scalar wire types: room ids, message ids, user references, timestamps.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A room id: 1–64 chars of `[a-z0-9_-]`. Validated on deserialization, so a `RoomId`
/// that exists is always safe to put in a Redis key, a URL path or a file name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RoomId(String);

impl RoomId {
    pub const MAX_LEN: usize = 64;

    pub fn new(id: impl Into<String>) -> Result<Self, InvalidRoomId> {
        let id = id.into();
        let valid = !id.is_empty()
            && id.len() <= Self::MAX_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if valid {
            Ok(Self(id))
        } else {
            Err(InvalidRoomId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
#[error("room id must be 1-64 characters of [a-z0-9_-]")]
pub struct InvalidRoomId;

impl TryFrom<String> for RoomId {
    type Error = InvalidRoomId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<RoomId> for String {
    fn from(r: RoomId) -> String {
        r.0
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for RoomId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// A 64-bit time-ordered message id. On the wire it is a decimal string, because JavaScript
/// numbers lose precision past 2^53; numbers are accepted on input for lenient clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub u64);

impl Serialize for MessageId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr<'a> {
            Num(u64),
            Str(&'a str),
            Owned(String),
        }
        let parse = |s: &str| {
            s.parse::<u64>()
                .map(MessageId)
                .map_err(|_| serde::de::Error::custom("message id must be a decimal string"))
        };
        match Repr::deserialize(d)? {
            Repr::Num(n) => Ok(MessageId(n)),
            Repr::Str(s) => parse(s),
            Repr::Owned(s) => parse(&s),
        }
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Builds time-ordered 64-bit ids: 41 bits of milliseconds since [`MessageIdGen::EPOCH_MS`],
/// 10 bits of worker id (unique per live gateway, handed out by the broker), 12 bits of counter.
/// Ids from one generator strictly increase.
#[derive(Debug)]
pub struct MessageIdGen {
    worker: u64,
    last: std::sync::atomic::AtomicU64,
}

impl MessageIdGen {
    /// 2024-01-01T00:00:00Z: 41 bits of milliseconds from here last until 2093.
    pub const EPOCH_MS: u64 = 1_704_067_200_000;
    pub const WORKER_BITS: u32 = 10;
    const COUNTER_BITS: u32 = 12;

    pub fn new(worker: u16) -> Self {
        Self {
            worker: u64::from(worker) & ((1 << Self::WORKER_BITS) - 1),
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Returns the next id and the timestamp encoded in it.
    pub fn next(&self, now: Timestamp) -> (MessageId, Timestamp) {
        use std::sync::atomic::Ordering;
        let shift = Self::WORKER_BITS + Self::COUNTER_BITS;
        let ms = (now.0 as u64).saturating_sub(Self::EPOCH_MS);
        let base = (ms << shift) | (self.worker << Self::COUNTER_BITS);
        // Lock-free "max(last + 1, base)" keeping the worker bits: when the clock stands still
        // or steps back, ids keep increasing by borrowing from the counter (and then the ms).
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let next = if base > prev {
                base
            } else {
                let bumped = prev + 1;
                if bumped & ((1 << Self::COUNTER_BITS) - 1) == 0 {
                    // counter overflow: move to the next millisecond, same worker
                    (((prev >> shift) + 1) << shift) | (self.worker << Self::COUNTER_BITS)
                } else {
                    bumped
                }
            };
            match self
                .last
                .compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    let ts = Timestamp(((next >> shift) + Self::EPOCH_MS) as i64);
                    return (MessageId(next), ts);
                }
                Err(actual) => prev = actual,
            }
        }
    }
}

/// A user as shown to others: id from the token's `sub`, display name from its `name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UserRef {
    pub id: String,
    pub name: String,
}

/// Milliseconds since the Unix epoch; RFC 3339 UTC with milliseconds on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(d.as_millis() as i64)
    }

    pub fn plus_secs(self, s: u64) -> Self {
        Timestamp(self.0.saturating_add((s as i64).saturating_mul(1000)))
    }

    fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0.max(0) as u64)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_rfc3339_millis(self.to_system_time()).fmt(f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        let t = humantime::parse_rfc3339(&s).map_err(serde::de::Error::custom)?;
        let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        Ok(Timestamp(ms as i64))
    }
}

/// The `ref` a client may attach to a command; echoed on the answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Ref {
    Num(serde_json::Number),
    Str(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_id_rules() {
        assert!(RoomId::new("lobby").is_ok());
        assert!(RoomId::new("a_b-9").is_ok());
        assert!(RoomId::new("x".repeat(64)).is_ok());
        for bad in ["", "Lobby", "a b", "../etc", "a/b", "é", &"x".repeat(65)] {
            assert!(RoomId::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn message_id_is_a_decimal_string() {
        let id = MessageId(u64::MAX);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"18446744073709551615\"");
        assert_eq!(serde_json::from_str::<MessageId>(&json).unwrap(), id);
        assert_eq!(
            serde_json::from_str::<MessageId>("42").unwrap(),
            MessageId(42)
        );
        assert!(serde_json::from_str::<MessageId>("\"4x\"").is_err());
    }

    #[test]
    fn ids_increase_even_when_the_clock_stands_still() {
        let g = MessageIdGen::new(5);
        let now = Timestamp(MessageIdGen::EPOCH_MS as i64 + 1000);
        let mut last = MessageId(0);
        for _ in 0..10_000 {
            let (id, ts) = g.next(now);
            assert!(id > last);
            assert!(ts >= now);
            assert_eq!((id.0 >> 12) & 0x3ff, 5, "worker bits kept");
            last = id;
        }
    }

    #[test]
    fn timestamp_round_trips_rfc3339() {
        let t = Timestamp(1_768_473_000_123);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2026-01-15T10:30:00.123Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
    }
}
