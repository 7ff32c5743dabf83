//! The one guard: every command's permission decision is made here, with the rules of
//! `history_service::access`, on this node's copy of the room's state
//! ([`crate::room_state`]).
//!
//! A copy may be behind the cluster: another node may just have banned the caller, or added
//! them to a private room. Both directions are covered without a round trip per command:
//! - **An allow** carries the version of the state it was decided on into the broker step
//!   that acts on it (a publish, a pin, a typing frame, a join's recovery read). The broker
//!   refuses the step when the room's state version moved on; the guard then decides again on
//!   state read now, and acts again ([`act`]), up to [`MAX_TRIES`] times.
//! - **A refusal** from a cached copy is looked at again on state read now ([`decide`]):
//!   refusals are rare, and a stale one would lock a user out until the copy is dropped.
//!
//! Room-state changes themselves (moderation) decide on state read now ([`decide_fresh`]):
//! they are rare, and their target may have joined on another node a moment ago.
//!
//! **Who is deciding.** A command's rule asks [`permits`] for its [`Actor`]: a user is held
//! to the room's rules ([`Access::check`]); the server (the application's backend, through
//! the server API) to none but what keeps a room whole ([`Action::keeps_room_whole`]: one
//! owner, never removed). Everything else — the room must exist, validation, the state
//! version the broker checks — is the same for both.

use std::future::Future;
use std::sync::Arc;

use history_service::access::{Access, Action};
use history_service::store::RoomState;
use proto::auth::Identity;
use proto::{ErrorCode, RoomId};

use super::{CommandError, Result};
use crate::broker::{BrokerError, StateVersion};
use crate::node::Node;
use crate::room_state::Versioned;

/// Decisions per command at most when the room's state keeps changing under it.
pub const MAX_TRIES: usize = 3;

/// Who a decision is for.
#[derive(Clone, Copy, Debug)]
pub enum Actor<'a> {
    /// A user, on one of their connections.
    User(&'a Identity),
    /// The application's backend (the server API).
    Server,
}

/// May `actor` do `action` in the room whose state is `st`?
pub fn permits(actor: Actor<'_>, st: &RoomState, action: Action<'_>) -> Result {
    match actor {
        Actor::User(who) => Ok(Access::of_state(st, who).check(action)?),
        Actor::Server => Ok(action.keeps_room_whole()?),
    }
}

/// A decision, and the room's state and state version it was made on.
#[derive(Clone, Debug)]
pub struct Decided {
    pub state: Arc<RoomState>,
    pub version: StateVersion,
}

fn not_found(room: &RoomId) -> CommandError {
    CommandError::new(ErrorCode::NotFound, format!("no room {room}"))
}

fn decided(v: Versioned) -> Decided {
    Decided {
        state: v.state,
        version: v.version,
    }
}

/// Decides `rule` on this node's copy of the room's state; a refusal is confirmed on state
/// read now.
pub async fn decide(
    node: &Node,
    room: &RoomId,
    rule: impl Fn(&RoomState) -> Result,
) -> Result<Decided> {
    let Some(copy) = node.rooms.get(&node.broker, room).await? else {
        return Err(not_found(room));
    };
    match rule(&copy.state) {
        Ok(()) => Ok(decided(copy)),
        Err(e) if copy.fresh => Err(e),
        Err(_) => decide_fresh(node, room, rule).await,
    }
}

/// Decides `rule` on the room's state read now.
pub async fn decide_fresh(
    node: &Node,
    room: &RoomId,
    rule: impl Fn(&RoomState) -> Result,
) -> Result<Decided> {
    let Some(now) = node.rooms.load(&node.broker, room).await? else {
        return Err(not_found(room));
    };
    rule(&now.state)?;
    Ok(decided(now))
}

/// Acts on a decision: `step` gets the version the decision was made on and passes it to the
/// broker, which refuses with [`BrokerError::Stale`] when the room's state changed since. Then
/// the rule is decided again on state read now and, when it still holds, the step retried.
pub async fn act<T, F, Fut>(
    node: &Node,
    room: &RoomId,
    rule: impl Fn(&RoomState) -> Result,
    first: Decided,
    mut step: F,
) -> Result<T>
where
    F: FnMut(StateVersion) -> Fut,
    Fut: Future<Output = std::result::Result<T, BrokerError>>,
{
    let mut version = first.version;
    for _ in 1..MAX_TRIES {
        match step(version).await {
            Err(BrokerError::Stale) => {
                metrics::counter!("chat_stale_state_retries_total").increment(1);
                version = decide_fresh(node, room, &rule).await?.version;
            }
            other => return Ok(other?),
        }
    }
    Ok(step(version).await?)
}
