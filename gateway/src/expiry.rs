//! Connections whose token expires: told `token_expiring` ahead of time, closed with 1008 at
//! the token's `exp` unless a `refresh` brought a new token.
//!
//! One sweep per node, not a timer per session: a timer in every session's task would cost
//! memory on every idle connection (the task's future holds it) and a timer-wheel entry
//! each. Here a connection costs one entry in a map from due second to the sessions due then,
//! and one task visits the map once a second and takes what is due. An entry is due first at
//! `exp − ahead` (the warning) and then at `exp` (the close), so where a session's entry is
//! follows from its token's `exp` alone: removing it needs no bookkeeping in the session.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use proto::errors::close;
use proto::{ServerEvent, Timestamp};

use crate::hub::{SessionHandle, SessionId};

/// The close reason of a connection whose token expired.
pub const EXPIRED: &str = "token expired";

/// Due second (Unix time) → the sessions due then, with their token's `exp`.
type Due = BTreeMap<u64, HashMap<SessionId, (SessionHandle, u64)>>;

/// The node's watch over its connections' token expiry.
pub struct Expiry {
    /// Seconds before `exp` at which a connection is told `token_expiring`.
    ahead: u64,
    due: Mutex<Due>,
}

/// What the sweep does to a session whose entry is due.
enum Act {
    Warn(SessionHandle, u64),
    Close(SessionHandle),
}

impl Expiry {
    /// Starts the node's sweep (it stops when the returned value is dropped).
    pub fn start(ahead: Duration) -> Arc<Self> {
        let expiry = Arc::new(Self {
            ahead: ahead.as_secs(),
            due: Mutex::default(),
        });
        tokio::spawn(sweep_every_second(Arc::downgrade(&expiry)));
        expiry
    }

    fn warn_at(&self, exp: u64) -> u64 {
        exp.saturating_sub(self.ahead)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Due> {
        self.due.lock().expect("expiry lock")
    }

    /// Watches a new session whose token expires at `exp` (Unix seconds).
    pub fn watch(&self, handle: &SessionHandle, exp: u64) {
        let mut due = self.lock();
        due.entry(self.warn_at(exp))
            .or_default()
            .insert(handle.id, (handle.clone(), exp));
    }

    /// Stops watching a session (it ended); `exp` is its token's.
    pub fn unwatch(&self, session: SessionId, exp: u64) {
        let mut due = self.lock();
        self.take(&mut due, session, exp);
    }

    /// The session's token was replaced: watched until `new_exp` from now on. False when the
    /// session is no longer watched: its token expired and it is being closed.
    pub fn rewatch(&self, handle: &SessionHandle, old_exp: u64, new_exp: u64) -> bool {
        let mut due = self.lock();
        if !self.take(&mut due, handle.id, old_exp) {
            return false;
        }
        due.entry(self.warn_at(new_exp))
            .or_default()
            .insert(handle.id, (handle.clone(), new_exp));
        true
    }

    /// Removes a session's entry from where its `exp` puts it; true when there was one.
    fn take(&self, due: &mut Due, session: SessionId, exp: u64) -> bool {
        for at in [self.warn_at(exp), exp] {
            if let Some(sessions) = due.get_mut(&at) {
                if sessions.remove(&session).is_some() {
                    if sessions.is_empty() {
                        due.remove(&at);
                    }
                    return true;
                }
            }
        }
        false
    }

    /// Warns and closes the sessions due at or before `now` (Unix seconds). Entries are moved
    /// under the lock; frames are sent after it is released.
    fn sweep(&self, now: u64) {
        let acts = {
            let mut due = self.lock();
            let later = due.split_off(&(now + 1));
            let now_due = std::mem::replace(&mut *due, later);
            let mut acts = Vec::new();
            for (handle, exp) in now_due.into_values().flat_map(HashMap::into_values) {
                if exp <= now {
                    acts.push(Act::Close(handle));
                } else {
                    due.entry(exp)
                        .or_default()
                        .insert(handle.id, (handle.clone(), exp));
                    acts.push(Act::Warn(handle, exp));
                }
            }
            acts
        };
        for act in acts {
            match act {
                Act::Warn(handle, exp) => {
                    let ev = ServerEvent::TokenExpiring {
                        expires_at: Timestamp(exp as i64 * 1000),
                        expires_in_s: exp - now,
                    };
                    handle.send(Bytes::from(ev.to_json()));
                }
                Act::Close(handle) => {
                    metrics::counter!("chat_token_expired_closes_total").increment(1);
                    handle.close_with(close::POLICY, EXPIRED);
                }
            }
        }
    }
}

async fn sweep_every_second(expiry: Weak<Expiry>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(expiry) = expiry.upgrade() else {
            return;
        };
        expiry.sweep(proto::auth::now_s());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Outbound, Outbox};
    use proto::UserRef;

    fn session(id: SessionId) -> (SessionHandle, Arc<Outbox>) {
        let outbox = Arc::new(Outbox::new(16));
        let user = Arc::new(UserRef {
            id: format!("u{id}"),
            name: "U".into(),
        });
        (SessionHandle::new(id, user, false, outbox.clone()), outbox)
    }

    fn expiry(ahead: u64) -> Expiry {
        Expiry {
            ahead,
            due: Mutex::default(),
        }
    }

    fn frames(outbox: &Outbox) -> Vec<serde_json::Value> {
        std::iter::from_fn(|| outbox.try_pop())
            .map(|o| match o {
                Outbound::Text(b) => serde_json::from_slice(&b).unwrap(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_session_is_warned_ahead_then_closed_at_exp() {
        let e = expiry(60);
        let (h, out) = session(1);
        e.watch(&h, 1_000);
        e.sweep(939);
        assert!(frames(&out).is_empty(), "nothing before exp - ahead");
        e.sweep(940);
        let got = frames(&out);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["type"], "token_expiring");
        assert_eq!(got[0]["expires_in_s"], 60);
        assert_eq!(got[0]["expires_at"], "1970-01-01T00:16:40.000Z");
        e.sweep(999);
        assert_eq!(out.closing(), None);
        assert!(frames(&out).is_empty(), "warned once");
        e.sweep(1_000);
        assert_eq!(out.closing(), Some(close::POLICY));
        assert_eq!(out.close_reason().as_deref(), Some(EXPIRED));
        assert!(e.lock().is_empty(), "nothing left to watch");
    }

    #[test]
    fn a_late_sweep_warns_and_closes_what_it_missed() {
        let e = expiry(60);
        let (soon, soon_out) = session(1);
        let (gone, gone_out) = session(2);
        e.watch(&soon, 1_030);
        e.watch(&gone, 1_000);
        e.sweep(1_000);
        assert_eq!(frames(&soon_out)[0]["expires_in_s"], 30);
        assert_eq!(gone_out.closing(), Some(close::POLICY));
        assert!(
            frames(&gone_out).is_empty(),
            "an expired token is closed, not warned"
        );
    }

    #[test]
    fn a_refresh_moves_the_deadlines_and_an_ended_session_is_forgotten() {
        let e = expiry(60);
        let (h, out) = session(1);
        e.watch(&h, 1_000);
        e.sweep(950); // warned, now due at 1000
        frames(&out);
        assert!(e.rewatch(&h, 1_000, 5_000));
        e.sweep(1_000);
        assert_eq!(out.closing(), None, "the old exp no longer closes it");
        e.sweep(4_940);
        assert_eq!(frames(&out)[0]["expires_in_s"], 60);
        e.unwatch(h.id, 5_000);
        assert!(e.lock().is_empty());
        e.sweep(5_000);
        assert_eq!(out.closing(), None);

        let (late, _) = session(2);
        e.watch(&late, 6_000);
        e.sweep(6_000);
        assert!(
            !e.rewatch(&late, 6_000, 9_000),
            "too late: the session is being closed"
        );
    }
}
