//! Corking: while a batch of work runs on a thread — the events one broker read returned, the
//! events one publisher delivers for others, a join's replay — frames sent to idle sessions are
//! queued instead of written one by one, and each session that got any is written once when
//! the batch ends. Under load many frames for one socket become ready together, and one
//! `write()` for all of them costs a fraction of one per frame (the kernel's send path is most
//! of a delivery's CPU); at low load a batch holds one frame and nothing changes.
//!
//! A cork is per thread and never held across an `.await` ([`corked`] takes a closure), so a
//! task that moves threads cannot leave frames behind in a cork nobody flushes.
//!
//! A session that a batch wrote less than [`HOLD`] ago is not written again at once: it waits
//! for the flusher thread, which writes every waiting session [`HOLD`] after the first one
//! began to wait. Under load each socket is so written at most about once per [`HOLD`], with
//! everything that came for it meanwhile: one broker read holds one message at a few
//! thousand messages a second, and the sockets' writes, not the reads, are what costs. A
//! session that gets a frame now and then (a small room, any room at low load) is written at
//! once, as before: the hold costs latency only where it saves writes.

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use crate::outbox::{Full, Outbound, Outbox};

thread_local! {
    /// The sessions given frames by the running batch, to flush when it ends; None: not corked.
    static CORK: RefCell<Option<Vec<Arc<Outbox>>>> = const { RefCell::new(None) };
}

/// Runs `f` corked (see the module docs). Nested calls join the outer batch.
pub fn corked<T>(f: impl FnOnce() -> T) -> T {
    let outer = CORK.with_borrow_mut(|c| {
        if c.is_some() {
            return true;
        }
        *c = Some(Vec::new());
        false
    });
    if outer {
        return f();
    }
    // Flushes on the way out, also when `f` panics: a cork left in place would hold every
    // later frame of this thread.
    let _flush = Flush;
    f()
}

struct Flush;

impl Drop for Flush {
    fn drop(&mut self) {
        let dirty = CORK.with_borrow_mut(Option::take).unwrap_or_default();
        let now = now_us();
        let mut wait = Vec::new();
        for outbox in dirty {
            match written_lately(outbox.corked_at(), now) {
                true => wait.push(outbox),
                false => outbox.flush_corked(now),
            }
        }
        if wait.is_empty() {
            return;
        }
        let mut waiting = WAITING.lock().expect("cork lock");
        let first = waiting.is_empty();
        waiting.append(&mut wait);
        drop(waiting);
        if first {
            FLUSHER.call_once(start_flusher);
            WAKE.notify_one();
        }
    }
}

/// How long a session written by a batch waits before a batch writes it again: under load,
/// the longest a frame waits for its write; at low load nothing waits.
pub const HOLD: Duration = Duration::from_micros(1000);
const HOLD_US: u32 = HOLD.as_micros() as u32;

/// Microseconds since the process's first use of the cork, plus [`HOLD`] (so that an outbox's
/// initial 0 reads as long ago), wrapping every 71 minutes: only differences up to [`HOLD`]
/// are ever asked of it (a wrap at worst holds one batch once).
pub fn now_us() -> u32 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let since = EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u32;
    since.wrapping_add(HOLD_US)
}

/// True when a session that a batch wrote at `at` was written less than [`HOLD`] before `now`.
fn written_lately(at: u32, now: u32) -> bool {
    now.wrapping_sub(at) < HOLD_US
}

/// The sessions waiting for the flusher thread.
static WAITING: Mutex<Vec<Arc<Outbox>>> = Mutex::new(Vec::new());
/// Wakes the flusher thread for the first session that waits.
static WAKE: Condvar = Condvar::new();
static FLUSHER: Once = Once::new();

/// Writes the waiting sessions [`HOLD`] after the first of them began to wait.
fn start_flusher() {
    std::thread::Builder::new()
        .name("cork-flusher".into())
        .spawn(|| loop {
            let mut waiting = WAITING.lock().expect("cork lock");
            while waiting.is_empty() {
                waiting = WAKE.wait(waiting).expect("cork lock");
            }
            drop(waiting);
            std::thread::sleep(HOLD);
            let due = std::mem::take(&mut *WAITING.lock().expect("cork lock"));
            let now = now_us();
            for outbox in due {
                outbox.flush_corked(now);
            }
        })
        .expect("start the cork flusher thread");
}

/// Queues `out` for the running batch's flush; returns the items waiting in the session's
/// queue. `Err(out)` when this thread is not corked: send it the usual way.
pub fn defer(outbox: &Arc<Outbox>, out: Outbound) -> Result<Result<usize, Full>, Outbound> {
    CORK.with_borrow_mut(|c| {
        let Some(dirty) = c.as_mut() else {
            return Err(out);
        };
        Ok(outbox.defer(out).map(|d| {
            if d.first {
                dirty.push(outbox.clone());
            }
            d.waiting
        }))
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn only_a_corked_thread_defers_and_the_batch_flushes_each_session_once() {
        let a: Arc<Outbox> = Arc::new(Outbox::new(8));
        let text = |s: &'static str| Outbound::Text(Bytes::from(s));
        assert!(
            defer(&a, text("x")).is_err(),
            "not corked: sent the usual way"
        );
        let waiting = corked(|| {
            let first = defer(&a, text("1")).unwrap().unwrap();
            // A nested batch joins the outer one.
            let second = corked(|| defer(&a, text("2")).unwrap().unwrap());
            CORK.with_borrow(|c| assert_eq!(c.as_ref().map(Vec::len), Some(1), "listed once"));
            (first, second)
        });
        assert_eq!(waiting, (1, 2));
        CORK.with_borrow(|c| assert!(c.is_none(), "uncorked after the batch"));
        // No socket attached: the flush leaves both for the writer.
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn written_lately_means_less_than_the_hold_ago_across_the_wrap() {
        assert!(written_lately(100, 100));
        assert!(written_lately(100, 100 + HOLD_US - 1));
        assert!(!written_lately(100, 100 + HOLD_US));
        assert!(
            !written_lately(0, now_us()),
            "a new session is written at once"
        );
        assert!(written_lately(u32::MAX - 10, 5), "across the wrap");
        assert!(!written_lately(u32::MAX - HOLD_US, 5));
    }

    #[test]
    fn a_session_written_lately_waits_for_the_flusher_and_others_do_not() {
        let lately: Arc<Outbox> = Arc::new(Outbox::new(8));
        let idle: Arc<Outbox> = Arc::new(Outbox::new(8));
        let at = now_us();
        lately.flush_corked(at);
        corked(|| {
            for o in [&lately, &idle] {
                defer(o, Outbound::Text(Bytes::from("x"))).unwrap().unwrap();
            }
        });
        assert!(
            !WAITING
                .lock()
                .unwrap()
                .iter()
                .any(|w| Arc::ptr_eq(w, &idle)),
            "not written lately: flushed at once"
        );
        assert!(written_lately(idle.corked_at(), now_us()), "and marked");
        // The session written lately is flushed again a hold after it was written, at the
        // earliest (by the flusher; by the batch itself only if the batch came that late).
        let deadline = Instant::now() + Duration::from_secs(10);
        while lately.corked_at() == at {
            assert!(Instant::now() < deadline, "never flushed");
            std::thread::yield_now();
        }
        assert!(lately.corked_at().wrapping_sub(at) >= HOLD_US);
    }

    #[test]
    fn a_panicking_batch_still_uncorks_its_thread() {
        let r = std::panic::catch_unwind(|| corked(|| panic!("boom")));
        assert!(r.is_err());
        CORK.with_borrow(|c| assert!(c.is_none()));
    }
}
