//! What each client command does. Every command is validated and authorized here, then
//! published through the broker; failures become one typed [`CommandError`], mapped once to
//! an `error` frame that echoes the command's `ref`.

use std::sync::Arc;

use bytes::Bytes;
use proto::client::{DecodeError, DecodeErrorKind};
use proto::rooms::RoomSummary;
use proto::{Command, ErrorCode, Inbound, MessageId, Ref, RoomId, ServerEvent, Timestamp};

use crate::broker::{Broker, BrokerError, Dedupe, Published};
use crate::node::Node;
use crate::session::SessionState;

/// `client_msg_id` longer than this is refused.
const MAX_CLIENT_MSG_ID: usize = 64;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub code: ErrorCode,
    pub message: String,
}

impl CommandError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<BrokerError> for CommandError {
    fn from(e: BrokerError) -> Self {
        tracing::warn!(error = %e, "broker failure");
        CommandError::new(ErrorCode::Unavailable, "a backend is unavailable; retry")
    }
}

impl From<DecodeError> for CommandError {
    fn from(e: DecodeError) -> Self {
        CommandError::new(ErrorCode::Invalid, e.kind.to_string())
    }
}

type Result<T = ()> = std::result::Result<T, CommandError>;

/// Runs one decoded (or undecodable) frame.
pub async fn handle(
    node: &Arc<Node>,
    s: &mut SessionState,
    decoded: std::result::Result<Inbound, DecodeError>,
) {
    let (r#ref, result) = match decoded {
        Ok(Inbound { r#ref, command }) => {
            let name = command.name();
            let result = run(node, s, r#ref.clone(), command).await;
            if let Err(e) = &result {
                tracing::debug!(command = name, code = e.code.as_str(), "command refused");
            }
            (r#ref, result)
        }
        Err(e) => {
            if matches!(e.kind, DecodeErrorKind::Json(_)) {
                tracing::debug!("malformed frame");
            }
            (e.r#ref.clone(), Err(e.into()))
        }
    };
    if let Err(e) = result {
        s.send(&ServerEvent::error(r#ref, e.code, e.message));
    }
}

async fn run(
    node: &Arc<Node>,
    s: &mut SessionState,
    r#ref: Option<Ref>,
    command: Command,
) -> Result {
    match command {
        Command::Ping => {
            s.send(&ServerEvent::Pong { r#ref });
            Ok(())
        }
        Command::Join { room, since } => {
            join(node, s, r#ref, room, since).await;
            Ok(())
        }
        Command::Leave { room } => {
            if !s.rooms.remove(&room) {
                return Err(CommandError::new(ErrorCode::NotFound, "not in this room"));
            }
            leave_room(node, s, &room).await;
            s.send(&ServerEvent::Left { r#ref, room });
            Ok(())
        }
        Command::Message {
            room,
            content,
            client_msg_id,
            reply_to,
        } => send_message(node, s, r#ref, room, content, client_msg_id, reply_to).await,
        Command::Edit { room, id, content } => {
            must_be_in(s, &room)?;
            check_content(node, &content)?;
            let author = find_message(node, &room, id).await?;
            if author != s.user().id {
                return Err(CommandError::new(
                    ErrorCode::Forbidden,
                    "only the author may edit",
                ));
            }
            let ev = ServerEvent::MessageEdited {
                seq: 0,
                room: room.clone(),
                id,
                content,
                edited_at: Timestamp::now(),
            };
            let p = node
                .broker
                .publish_stored(&room, &ev.to_json(), None)
                .await?;
            s.send(&ServerEvent::Ack {
                r#ref,
                id: Some(id),
                seq: Some(p.seq()),
                ts: None,
            });
            Ok(())
        }
        Command::Delete { room, id } => {
            must_be_in(s, &room)?;
            let author = find_message(node, &room, id).await?;
            if author != s.user().id && !s.identity.admin {
                return Err(CommandError::new(
                    ErrorCode::Forbidden,
                    "only the author or an admin may delete",
                ));
            }
            let ev = ServerEvent::MessageDeleted {
                seq: 0,
                room: room.clone(),
                id,
                by: s.user().clone(),
            };
            let p = node
                .broker
                .publish_stored(&room, &ev.to_json(), None)
                .await?;
            s.send(&ServerEvent::Ack {
                r#ref,
                id: Some(id),
                seq: Some(p.seq()),
                ts: None,
            });
            Ok(())
        }
        Command::Typing { room } => {
            must_be_in(s, &room)?;
            node.typing(&room, s.user()).await;
            Ok(())
        }
        Command::StopTyping { room } => {
            must_be_in(s, &room)?;
            node.stop_typing(&room, s.user(), true).await;
            Ok(())
        }
        Command::ListRooms => {
            let rooms = list_rooms(node).await;
            s.send(&ServerEvent::Rooms { r#ref, rooms });
            Ok(())
        }
        other => Err(CommandError::new(
            ErrorCode::Invalid,
            format!("`{}` is not supported by this server yet", other.name()),
        )),
    }
}

fn must_be_in(s: &SessionState, room: &RoomId) -> Result {
    if s.rooms.contains(room) {
        Ok(())
    } else {
        Err(CommandError::new(
            ErrorCode::Forbidden,
            "join the room first",
        ))
    }
}

fn check_content(node: &Node, content: &str) -> Result {
    if content.trim().is_empty() {
        return Err(CommandError::new(
            ErrorCode::Invalid,
            "content must not be empty",
        ));
    }
    let max = node.config.max_content_chars;
    if content.chars().count() > max {
        return Err(CommandError::new(
            ErrorCode::TooLarge,
            format!("content is over {max} characters"),
        ));
    }
    Ok(())
}

async fn send_message(
    node: &Arc<Node>,
    s: &mut SessionState,
    r#ref: Option<Ref>,
    room: RoomId,
    content: String,
    client_msg_id: Option<String>,
    reply_to: Option<MessageId>,
) -> Result {
    must_be_in(s, &room)?;
    check_content(node, &content)?;
    if client_msg_id
        .as_ref()
        .is_some_and(|c| c.is_empty() || c.len() > MAX_CLIENT_MSG_ID)
    {
        return Err(CommandError::new(
            ErrorCode::Invalid,
            format!("client_msg_id must be 1-{MAX_CLIENT_MSG_ID} bytes"),
        ));
    }
    let (id, ts) = node.ids.next(Timestamp::now());
    let user = s.user().clone();
    let ev = ServerEvent::Message {
        seq: 0,
        room: room.clone(),
        id,
        user: user.clone(),
        content,
        ts,
        reply_to,
        client_msg_id: client_msg_id.clone(),
    };
    let key = client_msg_id
        .as_ref()
        .map(|c| format!("{room}/{}/{c}", user.id));
    let dedupe = key.as_deref().map(|key| Dedupe { key, id, ts });
    let (seq, id, ts) = match node
        .broker
        .publish_stored(&room, &ev.to_json(), dedupe)
        .await?
    {
        Published::Fresh { seq } => (seq, id, ts),
        Published::Duplicate { seq, id, ts } => (seq, id, ts),
    };
    node.stop_typing(&room, &user, false).await;
    s.send(&ServerEvent::Ack {
        r#ref,
        id: Some(id),
        seq: Some(seq),
        ts: Some(ts),
    });
    Ok(())
}

/// Joins a room: subscribe, read the recovery window, replay, `joined`, then let live events
/// through (see [`crate::hub::Hub::release`] for why nothing is lost or duplicated).
pub async fn join(
    node: &Arc<Node>,
    s: &mut SessionState,
    r#ref: Option<Ref>,
    room: RoomId,
    since: Option<u64>,
) {
    if let Err(e) = try_join(node, s, r#ref.clone(), &room, since).await {
        s.send(&ServerEvent::error(r#ref, e.code, e.message));
    }
}

async fn try_join(
    node: &Arc<Node>,
    s: &mut SessionState,
    r#ref: Option<Ref>,
    room: &RoomId,
    since: Option<u64>,
) -> Result {
    if s.rooms.contains(room) {
        return Err(CommandError::new(
            ErrorCode::Conflict,
            "already in this room",
        ));
    }
    if s.rooms.len() >= node.config.max_rooms_per_connection {
        return Err(CommandError::new(
            ErrorCode::Forbidden,
            format!(
                "at most {} rooms per connection",
                node.config.max_rooms_per_connection
            ),
        ));
    }
    let info = node.rooms.ensure(room);

    let first = node.hub.add(room, s.handle.clone());
    let setup = async {
        if first {
            node.broker.subscribe(room).await?;
        }
        node.broker.recover(room, since).await
    };
    let recovery = match setup.await {
        Ok(r) => r,
        Err(e) => {
            if node.hub.remove(room, s.handle.id) {
                let _ = node.broker.unsubscribe(room).await;
            }
            return Err(e.into());
        }
    };
    let recovered = since.is_some() && recovery.complete;
    if recovered {
        for (_, frame) in &recovery.events {
            s.handle.send(frame.clone());
        }
    }
    let newly_online = node
        .broker
        .presence_add(room, s.user())
        .await
        .unwrap_or(false);
    s.rooms.insert(room.clone());
    if newly_online {
        node.publish_ephemeral(
            room,
            &ServerEvent::Join {
                room: room.clone(),
                user: s.user().clone(),
            },
        )
        .await;
        node.publish_online(room).await;
    }
    let online = node.broker.presence(room).await.unwrap_or_default();
    s.send(&ServerEvent::Joined {
        r#ref,
        room: info,
        seq: recovery.last_seq,
        online,
        pins: vec![],
        recovered,
        role: None,
        unread: None,
    });
    node.hub.release(room, s.handle.id, recovery.last_seq);
    Ok(())
}

/// Takes a session out of a room (leave, disconnect, removal); tells the room when the user's
/// last connection left.
pub async fn leave_room(node: &Arc<Node>, s: &SessionState, room: &RoomId) {
    if node.hub.remove(room, s.handle.id) {
        if let Err(e) = node.broker.unsubscribe(room).await {
            tracing::warn!(error = %e, %room, "unsubscribe failed");
        }
    }
    if node
        .broker
        .presence_remove(room, &s.user().id)
        .await
        .unwrap_or(false)
    {
        node.stop_typing(room, s.user(), false).await;
        node.publish_ephemeral(
            room,
            &ServerEvent::Leave {
                room: room.clone(),
                user: s.user().clone(),
            },
        )
        .await;
        node.publish_online(room).await;
    }
}

/// The author of a live message, looked up in the room's recovery window.
async fn find_message(node: &Node, room: &RoomId, id: MessageId) -> Result<String> {
    let recent = node.broker.recover(room, Some(0)).await?;
    let not_found = || CommandError::new(ErrorCode::NotFound, "no such message");
    for (_, frame) in recent.events.iter().rev() {
        match serde_json::from_slice::<ServerEvent>(frame) {
            Ok(ServerEvent::MessageDeleted { id: d, .. }) if d == id => return Err(not_found()),
            Ok(ServerEvent::Message { id: m, user, .. }) if m == id => return Ok(user.id),
            _ => {}
        }
    }
    Err(not_found())
}

pub async fn list_rooms(node: &Node) -> Vec<RoomSummary> {
    let mut out = Vec::new();
    for info in node.rooms.listed() {
        let online = node
            .broker
            .presence(&info.id)
            .await
            .map(|u| u.len() as u64)
            .unwrap_or(0);
        out.push(RoomSummary {
            id: info.id,
            name: info.name,
            topic: info.topic,
            visibility: info.visibility,
            member_count: online,
            online_count: online,
            unread: None,
        });
    }
    out
}

/// Sends a site-wide notice to every connection on every node.
pub async fn notice(node: &Node, content: String) -> std::result::Result<(), BrokerError> {
    let frame = ServerEvent::Notice {
        content,
        ts: Timestamp::now(),
    }
    .to_json();
    node.broker
        .publish_node(proto::envelope::NodeTarget::All, Bytes::from(frame))
        .await
}
