//! Reading frames that arrive from the broker: enough of each frame to route it, without
//! decoding the whole event.

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
    serde_json::from_slice(frame).ok()
}

/// The user an ephemeral frame is about and who must not receive it: the typist of
/// `typing`/`stop_typing`, the joiner of `join` (who gets `joined` instead).
pub fn excluded_user(p: &Peek) -> Option<&str> {
    match p.kind.as_str() {
        "typing" | "stop_typing" | "join" => p.user.as_ref().map(|u| u.id.as_str()),
        _ => None,
    }
}
