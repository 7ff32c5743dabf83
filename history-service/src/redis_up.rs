//! Whether this process reaches Redis, for readiness and the `chat_redis_up` gauge.
//!
//! Readiness takes a pod out of its Service so that traffic goes to one that works. A Redis
//! blip (a restart, a Sentinel or Cluster failover: seconds) hits every pod at once, and each
//! rides it out on its own (commands answer `unavailable` and clients retry; pub/sub and the
//! consumer reconnect): failing readiness then would take every pod out together and turn a
//! few seconds of retries into a full outage at the load balancer. So a process stays ready
//! through an outage shorter than [`UNREADY_AFTER`], and reports it at once through
//! `chat_redis_up` (0 while down) for an alert; a longer one (this pod cut off, or Redis down
//! for good) makes it unready.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long Redis may stay unreachable before the process reports itself unready.
pub const UNREADY_AFTER: Duration = Duration::from_secs(30);

/// Up or down, and since when.
#[derive(Debug, Default)]
pub struct RedisUp {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    up: bool,
    /// When it last went down (`None`: never up yet, or up).
    down_since: Option<Instant>,
    ever_up: bool,
}

impl RedisUp {
    /// Records what the last attempt found.
    pub fn set(&self, up: bool) {
        let mut s = self.state.lock().expect("redis_up lock");
        if up {
            s.ever_up = true;
            s.down_since = None;
        } else if s.up || s.down_since.is_none() {
            s.down_since = Some(Instant::now());
        }
        s.up = up;
        // The gauge `chat_redis_up`: 1 while Redis answers, 0 while it does not.
        metrics::gauge!("chat_redis_up").set(if up { 1.0 } else { 0.0 });
    }

    /// Reachable now.
    pub fn up(&self) -> bool {
        self.state.lock().expect("redis_up lock").up
    }

    /// Ready as far as Redis goes: it answers, or it answered before and has been down for
    /// less than [`UNREADY_AFTER`].
    pub fn ready(&self) -> bool {
        let s = self.state.lock().expect("redis_up lock");
        s.up || (s.ever_up && s.down_since.is_some_and(|t| t.elapsed() < UNREADY_AFTER))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_outage_keeps_readiness_a_first_connection_is_needed() {
        let r = RedisUp::default();
        assert!(!r.ready(), "not ready before Redis answered once");
        r.set(false);
        assert!(!r.ready());
        r.set(true);
        assert!(r.ready() && r.up());
        r.set(false);
        r.set(false);
        assert!(!r.up());
        assert!(r.ready(), "a blip does not make the process unready");
        r.state.lock().unwrap().down_since = Some(Instant::now() - UNREADY_AFTER);
        assert!(!r.ready(), "a long outage does");
        r.set(true);
        assert!(r.ready());
    }
}
