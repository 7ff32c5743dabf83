//! What travels between gateway nodes and to the history service, besides the client frames
//! themselves.
//!
//! - A room channel carries client frames as they are: every node fans the same bytes out.
//! - A stored event gets its seq put in front by the broker: `{"seq":N,` + the rest of the
//!   frame, which was serialized without `seq` ([`with_seq`]). The Redis broker's Lua script
//!   does the same concatenation; a test keeps them equal.
//! - The node channel carries frames addressed to every connection or to one user's
//!   connections: `all\n<frame>` or `user:<id>\n<frame>` ([`NodeMessage`]), and notes to
//!   the nodes themselves: `state:<room>\n` (the room's state changed without a room event),
//!   `disconnect:<id>\n<reason>` (close every connection of the user).

/// Puts `seq` in front of a frame serialized without one. `frame` must be a JSON object.
pub fn with_seq(frame: &[u8], seq: u64) -> Vec<u8> {
    debug_assert!(frame.first() == Some(&b'{'));
    let rest = &frame[1..];
    let mut out = Vec::with_capacity(frame.len() + 24);
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(seq.to_string().as_bytes());
    if rest != b"}" {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    out
}

/// A frame for connections chosen by user rather than by room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeTarget<'a> {
    /// Every connection on every node (site-wide notices, public room announcements).
    All,
    /// Every connection of one user.
    User(&'a str),
    /// No connection: every node drops its cached state of this room (a membership changed
    /// without a room event, as when someone joins a public room). The frame is empty.
    RoomState(&'a str),
    /// Every connection of one user is closed (1008); the frame is the close reason (UTF-8).
    Disconnect(&'a str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMessage<'a> {
    pub target: NodeTarget<'a>,
    pub frame: &'a [u8],
}

impl<'a> NodeMessage<'a> {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.frame.len() + 16);
        match self.target {
            NodeTarget::All => out.extend_from_slice(b"all"),
            NodeTarget::User(u) => {
                out.extend_from_slice(b"user:");
                out.extend_from_slice(u.as_bytes());
            }
            NodeTarget::RoomState(r) => {
                out.extend_from_slice(b"state:");
                out.extend_from_slice(r.as_bytes());
            }
            NodeTarget::Disconnect(u) => {
                out.extend_from_slice(b"disconnect:");
                out.extend_from_slice(u.as_bytes());
            }
        }
        out.push(b'\n');
        out.extend_from_slice(self.frame);
        out
    }

    pub fn decode(bytes: &'a [u8]) -> Option<Self> {
        let nl = bytes.iter().position(|&b| b == b'\n')?;
        let (head, frame) = (&bytes[..nl], &bytes[nl + 1..]);
        let target = if head == b"all" {
            NodeTarget::All
        } else if let Some(user) = head.strip_prefix(b"user:") {
            NodeTarget::User(std::str::from_utf8(user).ok()?)
        } else if let Some(user) = head.strip_prefix(b"disconnect:") {
            NodeTarget::Disconnect(std::str::from_utf8(user).ok()?)
        } else {
            NodeTarget::RoomState(std::str::from_utf8(head.strip_prefix(b"state:")?).ok()?)
        };
        Some(NodeMessage { target, frame })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_goes_in_front() {
        assert_eq!(with_seq(br#"{"type":"x"}"#, 7), br#"{"seq":7,"type":"x"}"#);
        assert_eq!(with_seq(b"{}", 1), br#"{"seq":1}"#);
    }

    #[test]
    fn node_messages_round_trip() {
        for target in [
            NodeTarget::All,
            NodeTarget::User("ann"),
            NodeTarget::RoomState("lobby"),
            NodeTarget::Disconnect("ann"),
        ] {
            let m = NodeMessage {
                target,
                frame: b"{\"a\":\"\\n\"}",
            };
            assert_eq!(NodeMessage::decode(&m.encode()), Some(m));
        }
        assert_eq!(NodeMessage::decode(b"nope"), None);
        assert_eq!(NodeMessage::decode(b"bogus\n{}"), None);
    }
}
