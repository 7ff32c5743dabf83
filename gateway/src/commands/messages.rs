//! `message`, `edit`, `delete`, `typing`, `stop_typing`.

use history_service::access::Action;
use proto::client::{Delete, Edit, SendMessage, StopTyping, Typing};
use proto::{ErrorCode, ServerEvent, Timestamp};

use super::find::find_message;
use super::{err, guard, must_be_in, pins, Ack, Actor, Cx, Result, Run, RunOnSession, SessionCx};
use crate::broker::{Broker, Dedupe, Published, StateCheck};
use crate::node::Node;

/// `client_msg_id` longer than this is refused.
const MAX_CLIENT_MSG_ID: usize = 64;

fn check_content(node: &Node, content: &str) -> Result {
    if content.trim().is_empty() {
        return Err(err(ErrorCode::Invalid, "content must not be empty"));
    }
    let max = node.config.max_content_chars;
    if content.chars().count() > max {
        return Err(err(
            ErrorCode::TooLarge,
            format!("content is over {max} characters"),
        ));
    }
    Ok(())
}

impl Run for SendMessage {
    async fn run(self, cx: &mut Cx<'_>) -> Result<Ack> {
        let SendMessage {
            room,
            content,
            client_msg_id,
            reply_to,
        } = self;
        cx.must_be_in(&room).await?;
        let actor = cx.actor();
        let rule = |st: &_| guard::permits(actor, st, Action::Post);
        let decided = guard::decide(cx.node, &room, rule).await?;
        check_content(cx.node, &content)?;
        if client_msg_id
            .as_ref()
            .is_some_and(|c| c.is_empty() || c.len() > MAX_CLIENT_MSG_ID)
        {
            return Err(err(
                ErrorCode::Invalid,
                format!("client_msg_id must be 1-{MAX_CLIENT_MSG_ID} bytes"),
            ));
        }
        let node = cx.node;
        let user = cx.by().clone();
        let (id, ts) = node.ids.next(Timestamp::now());
        let frame = ServerEvent::Message {
            seq: 0,
            room: room.clone(),
            id,
            user: user.clone(),
            content,
            ts,
            reply_to,
            client_msg_id: client_msg_id.clone(),
        }
        .to_json();
        let key = client_msg_id.map(|c| format!("{room}/{}/{c}", user.id));
        let dedupe = key.as_deref().map(|key| Dedupe { key, id, ts });
        let published = guard::act(node, &room, rule, decided, |v| {
            let (room, frame, dedupe) = (&room, &frame, dedupe.clone());
            async move {
                node.broker
                    .publish_stored(room, frame, dedupe, StateCheck::Expect(v))
                    .await
            }
        })
        .await?;
        let (seq, id, ts) = match published {
            Published::Fresh { seq } => (seq, id, ts),
            Published::Duplicate { seq, id, ts } => (seq, id, ts),
        };
        node.stop_typing(&room, &user, false).await;
        Ok(Ack {
            seq,
            id: Some(id),
            ts: Some(ts),
        })
    }
}

impl Run for Edit {
    async fn run(self, cx: &mut Cx<'_>) -> Result<Ack> {
        let Edit { room, id, content } = self;
        cx.must_be_in(&room).await?;
        let actor = cx.actor();
        let post = |st: &_| guard::permits(actor, st, Action::Post);
        guard::decide(cx.node, &room, post).await?;
        check_content(cx.node, &content)?;
        let message = find_message(cx.node, &room, id).await?;
        let author = message.user.id.as_str();
        let rule = |st: &_| guard::permits(actor, st, Action::Edit { author });
        let decided = guard::decide(cx.node, &room, rule).await?;
        let frame = ServerEvent::MessageEdited {
            seq: 0,
            room: room.clone(),
            id,
            content,
            edited_at: Timestamp::now(),
        }
        .to_json();
        let node = cx.node;
        let published = guard::act(node, &room, rule, decided, |v| {
            let (room, frame) = (&room, &frame);
            async move {
                node.broker
                    .publish_stored(room, frame, None, StateCheck::Expect(v))
                    .await
            }
        })
        .await?;
        Ok(Ack {
            seq: published.seq(),
            id: Some(id),
            ts: None,
        })
    }
}

impl Run for Delete {
    async fn run(self, cx: &mut Cx<'_>) -> Result<Ack> {
        let Delete { room, id } = self;
        let actor = cx.actor();
        // Moderators may delete from outside the room: reading it is enough to start.
        let read = |st: &_| guard::permits(actor, st, Action::Read);
        guard::decide(cx.node, &room, read).await?;
        let message = find_message(cx.node, &room, id).await?;
        let author = message.user.id.as_str();
        let rule = |st: &_| guard::permits(actor, st, Action::Delete { author });
        let decided = guard::decide(cx.node, &room, rule).await?;
        let frame = ServerEvent::MessageDeleted {
            seq: 0,
            room: room.clone(),
            id,
            by: cx.by().clone(),
        }
        .to_json();
        let node = cx.node;
        let published = guard::act(node, &room, rule, decided, |v| {
            let (room, frame) = (&room, &frame);
            async move {
                node.broker
                    .publish_stored(room, frame, None, StateCheck::Expect(v))
                    .await
            }
        })
        .await?;
        pins::unpin_deleted(node, &room, id).await;
        Ok(Ack {
            seq: published.seq(),
            id: Some(id),
            ts: None,
        })
    }
}

impl RunOnSession for Typing {
    async fn run(self, cx: &mut SessionCx<'_>) -> Result<Option<ServerEvent>> {
        let room = self.room;
        must_be_in(cx.node, cx.caller, &room).await?;
        let who = &cx.caller.identity;
        let rule = |st: &_| guard::permits(Actor::User(who), st, Action::Post);
        let decided = guard::decide(cx.node, &room, rule).await?;
        let node = cx.node;
        guard::act(node, &room, rule, decided, |v| {
            let (room, user) = (&room, &who.user);
            async move { node.typing(room, user, v).await }
        })
        .await?;
        Ok(None)
    }
}

impl RunOnSession for StopTyping {
    async fn run(self, cx: &mut SessionCx<'_>) -> Result<Option<ServerEvent>> {
        must_be_in(cx.node, cx.caller, &self.room).await?;
        cx.node
            .stop_typing(&self.room, cx.caller.user(), true)
            .await;
        Ok(None)
    }
}
