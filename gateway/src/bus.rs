//! Reading frames that arrive from the broker: enough of each frame to route it, without
//! decoding the whole event.

use proto::{EventKind, RoomId};
use serde::Deserialize;

/// The parts of a room frame a node needs: its type, seq, and subject user.
#[derive(Deserialize)]
pub struct Peek {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub user: Option<PeekUser>,
}

#[derive(Deserialize)]
pub struct PeekUser {
    pub id: String,
}

pub fn peek(frame: &[u8]) -> Option<Peek> {
    let mut p: Peek = serde_json::from_slice(frame).ok()?;
    if EventKind::parse(&p.kind) == Some(EventKind::Receipt) {
        // A receipt's `seq` is the reader's marker, not the room's event seq: the frame is
        // ephemeral, and must not be mistaken for (or ordered against) stored events.
        p.seq = 0;
    }
    Some(p)
}

/// The room and seq of a stored room event (None for any other frame): for node-targeted
/// copies of room events (`room_created` to everyone, `member_added` to its user).
pub fn stored_room(frame: &[u8]) -> Option<(RoomId, u64)> {
    /// `room` is the room's id, or its settings (with `id`) in `room_created`/`room_updated`.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Room {
        Id(RoomId),
        Info { id: RoomId },
    }
    #[derive(Deserialize)]
    struct Stored {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        seq: u64,
        room: Option<Room>,
    }
    let f: Stored = serde_json::from_slice(frame).ok()?;
    let room = match f.room? {
        Room::Id(id) | Room::Info { id } => id,
    };
    // A receipt's `seq` is a read marker, not an event's (see [`peek`]).
    (f.seq > 0 && f.kind != "receipt").then_some((room, f.seq))
}

/// The user an ephemeral frame is about and who must not receive it: the typist of
/// `typing`/`stop_typing`, the joiner of `join` (who gets `joined` instead).
pub fn excluded_user(p: &Peek) -> Option<&str> {
    let skips = EventKind::parse(&p.kind).is_some_and(EventKind::skips_its_user);
    skips
        .then(|| p.user.as_ref().map(|u| u.id.as_str()))
        .flatten()
}

/// The kind of a frame, read from its first bytes without parsing it: stored frames start
/// `{"seq":N,"type":"…"`, others `{"type":"…"` (serde writes the tag first).
pub fn kind_of(frame: &[u8]) -> Option<EventKind> {
    const TAG: &[u8] = b"\"type\":\"";
    let head = &frame[..frame.len().min(48)];
    let start = head.windows(TAG.len()).position(|w| w == TAG)? + TAG.len();
    let len = frame[start..].iter().take(32).position(|&b| b == b'"')?;
    EventKind::parse(std::str::from_utf8(&frame[start..start + len]).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_of_reads_the_tag_of_stored_and_plain_frames() {
        assert_eq!(
            kind_of(br#"{"seq":12,"type":"banned","room":"a"}"#),
            Some(EventKind::Banned)
        );
        assert_eq!(
            kind_of(br#"{"type":"typing","room":"a"}"#),
            Some(EventKind::Typing)
        );
        assert_eq!(kind_of(br#"{"type":"warp","room":"a"}"#), None);
        assert_eq!(kind_of(br#"{"room":"a"}"#), None);
        assert_eq!(kind_of(b""), None);
    }

    #[test]
    fn stored_room_reads_the_room_as_an_id_or_as_settings() {
        let room = RoomId::new("a").unwrap();
        assert_eq!(
            stored_room(br#"{"seq":1,"type":"room_created","room":{"id":"a","name":"A"}}"#),
            Some((room.clone(), 1))
        );
        assert_eq!(
            stored_room(br#"{"seq":7,"type":"member_added","room":"a","user":{"id":"u"}}"#),
            Some((room, 7))
        );
        assert_eq!(stored_room(br#"{"type":"notice","content":"hi"}"#), None);
        assert_eq!(stored_room(br#"{"type":"typing","room":"a"}"#), None);
        assert_eq!(
            stored_room(br#"{"type":"receipt","room":"a","seq":3}"#),
            None
        );
    }

    #[test]
    fn a_receipt_is_not_a_stored_event() {
        let p = peek(br#"{"type":"receipt","room":"a","user":{"id":"u","name":"U"},"seq":7}"#);
        assert_eq!(p.map(|p| p.seq), Some(0));
        let p = peek(br#"{"seq":7,"type":"message","room":"a"}"#);
        assert_eq!(p.map(|p| p.seq), Some(7));
    }
}
