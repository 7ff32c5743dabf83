//! Finding the message a command is about (edit, delete, pin).

use history_service::Store;
use proto::rooms::MessageView;
use proto::{ErrorCode, MessageId, RoomId, ServerEvent};

use super::{err, Result};
use crate::broker::Broker;
use crate::node::Node;

/// A live (not deleted) message, as of now: the store's copy, brought up to date by the
/// room's recovery window — the store is written from the persistence log, so in scaled mode
/// it may not have the message yet, or not its latest edit or its deletion.
pub async fn find_message(node: &Node, room: &RoomId, id: MessageId) -> Result<MessageView> {
    let not_found = || err(ErrorCode::NotFound, "no such message");
    let mut found = node.rooms.store().message(room, id).await?;
    if found.as_ref().is_some_and(|m| m.deleted) {
        return Err(not_found());
    }
    let after = found.as_ref().map_or(0, |m| m.seq);
    let recent = node.broker.recover(room, Some(after), None).await?;
    for (_, frame) in &recent.events {
        match serde_json::from_slice::<ServerEvent>(frame) {
            Ok(ServerEvent::Message {
                seq,
                room,
                id: m,
                user,
                content,
                ts,
                reply_to,
                ..
            }) if m == id && found.is_none() => {
                found = Some(MessageView {
                    room,
                    id,
                    seq,
                    user,
                    content: Some(content),
                    ts,
                    reply_to,
                    edited_at: None,
                    deleted: false,
                })
            }
            Ok(ServerEvent::MessageEdited {
                id: m,
                content,
                edited_at,
                ..
            }) if m == id => {
                if let Some(f) = found.as_mut() {
                    f.content = Some(content);
                    f.edited_at = Some(edited_at);
                }
            }
            Ok(ServerEvent::MessageDeleted { id: m, .. }) if m == id => return Err(not_found()),
            _ => {}
        }
    }
    found.ok_or_else(not_found)
}
