//! `pin` and `unpin`. The limit and the pinned/not-pinned answers are decided on the room's
//! pin set in the broker ([`Broker::pin_set`]), atomically across nodes, before the event is
//! published: the store learns of pins only as the persistence log reaches it.

use history_service::access::Action;
use history_service::Store;
use proto::client::{Pin, Unpin};
use proto::rooms::PinView;
use proto::{ErrorCode, MessageId, RoomId, ServerEvent, Timestamp};

use super::find::find_message;
use super::{err, guard, Ack, Cx, Result, Run};
use crate::broker::{Broker, PinChange, PinOutcome, StateCheck};
use crate::node::Node;

/// Pins per room at most.
pub const MAX_PINS: usize = 50;

impl Run for Pin {
    async fn run(self, cx: &mut Cx<'_>) -> Result<Ack> {
        pin(cx, self.room, self.id, PinChange::Pin).await
    }
}

impl Run for Unpin {
    async fn run(self, cx: &mut Cx<'_>) -> Result<Ack> {
        pin(cx, self.room, self.id, PinChange::Unpin).await
    }
}

async fn pin(cx: &mut Cx<'_>, room: RoomId, id: MessageId, change: PinChange) -> Result<Ack> {
    let actor = cx.actor();
    let rule = |st: &_| guard::permits(actor, st, Action::Pin);
    let decided = guard::decide(cx.node, &room, rule).await?;
    let node = cx.node;
    let stored: Vec<MessageId> = node
        .rooms
        .store()
        .pins(&room)
        .await?
        .iter()
        .map(|p| p.message.id)
        .collect();
    let ev = match change {
        PinChange::Pin => ServerEvent::Pinned {
            seq: 0,
            room: room.clone(),
            message: find_message(node, &room, id).await?,
            by: cx.by().clone(),
            pinned_at: Timestamp::now(),
        },
        PinChange::Unpin => ServerEvent::Unpinned {
            seq: 0,
            room: room.clone(),
            id,
            by: cx.by().clone(),
        },
    };
    let outcome = guard::act(node, &room, rule, decided, |v| {
        let (room, stored) = (&room, &stored);
        async move {
            let check = StateCheck::Expect(v);
            node.broker
                .pin_set(room, id, change, MAX_PINS, Some(stored), check)
                .await
        }
    })
    .await?;
    match outcome {
        PinOutcome::Done => {}
        PinOutcome::AlreadyPinned => return Err(err(ErrorCode::Conflict, "already pinned")),
        PinOutcome::NotPinned => return Err(err(ErrorCode::NotFound, "not pinned")),
        PinOutcome::Full => {
            return Err(err(
                ErrorCode::Conflict,
                format!("at most {MAX_PINS} pins per room; unpin one first"),
            ))
        }
    }
    // The pin set took the change under the decision's version: the event needs no check.
    let published = node
        .broker
        .publish_stored(&room, &ev.to_json(), None, StateCheck::Unchecked)
        .await;
    match published {
        Ok(p) => Ok(Ack::seq(p.seq())),
        Err(e) => {
            // Not published: give the change back so the pin set matches what the room saw.
            let undo = node
                .broker
                .pin_set(
                    &room,
                    id,
                    change.undo(),
                    MAX_PINS,
                    Some(&stored),
                    StateCheck::Unchecked,
                )
                .await;
            if let Err(e) = undo {
                tracing::warn!(error = %e, %room, "could not undo a pin change");
            }
            Err(e.into())
        }
    }
}

/// `joined.pins`: this node's copy of the room's pins when it holds exactly the broker's pin
/// set `ids`, else [`pins_now`] read from the store (and cached when complete). See
/// [`crate::pin_views`].
pub async fn joined_pins(
    node: &Node,
    room: &RoomId,
    ids: Option<Vec<MessageId>>,
) -> super::Result<Vec<PinView>> {
    if let Some(pins) = node.pins.get(room, ids.as_deref()) {
        return Ok(pins.to_vec());
    }
    let generation = node.pins.generation();
    let stored = node.rooms.store().pins(room).await?;
    let wanted = ids.as_ref().map(Vec::len);
    let pins = pins_now(node, room, stored, ids).await;
    // A view not found yet (the store behind, the window past it) is looked for again next
    // time instead of being left out of every later join.
    if wanted.is_none_or(|n| n == pins.len()) {
        node.pins
            .put(room, std::sync::Arc::new(pins.clone()), generation);
    }
    Ok(pins)
}

/// The room's pins as of now: the store's, brought up to date by the broker's pin set (`ids`,
/// see [`crate::broker::Recovery::pins`]) — the store learns of pins from the persistence log,
/// so in scaled mode a pin acknowledged a moment ago may not be there yet, nor an unpin. Pins
/// the store does not have yet are read from their `pinned` events in the room's window.
/// Most recently pinned first.
pub async fn pins_now(
    node: &Node,
    room: &RoomId,
    stored: Vec<PinView>,
    ids: Option<Vec<MessageId>>,
) -> Vec<PinView> {
    let Some(ids) = ids else {
        return stored;
    };
    let mut pins: Vec<PinView> = stored
        .into_iter()
        .filter(|p| ids.contains(&p.message.id))
        .collect();
    let missing: Vec<MessageId> = ids
        .into_iter()
        .filter(|id| !pins.iter().any(|p| p.message.id == *id))
        .collect();
    if !missing.is_empty() {
        match node.broker.recover(room, Some(0), None).await {
            Ok(window) => {
                for (_, frame) in window.events.iter().rev() {
                    if let Ok(ServerEvent::Pinned {
                        message,
                        by,
                        pinned_at,
                        ..
                    }) = serde_json::from_slice(frame)
                    {
                        let fresh = !pins.iter().any(|p| p.message.id == message.id);
                        if missing.contains(&message.id) && fresh {
                            pins.push(PinView {
                                message,
                                by,
                                pinned_at,
                            });
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, %room, "pins not yet stored are left out"),
        }
    }
    pins.sort_by_key(|p| std::cmp::Reverse(p.pinned_at));
    pins
}

/// A deleted message leaves the room's pin set (the store unpins it as it stores the delete).
pub async fn unpin_deleted(node: &Node, room: &RoomId, id: MessageId) {
    if let Err(e) = node
        .broker
        .pin_set(
            room,
            id,
            PinChange::Unpin,
            MAX_PINS,
            None,
            StateCheck::Unchecked,
        )
        .await
    {
        tracing::warn!(error = %e, %room, "could not drop a deleted message's pin");
    }
}
