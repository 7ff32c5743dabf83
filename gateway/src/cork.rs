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
//! Batches that keep coming are written together: a batch that ends less than [`HOLD`] after
//! the last flush leaves its sessions to the next one — the first batch to end after [`HOLD`]
//! has passed, or the flusher thread at that moment — so under load each socket is written
//! at most once per [`HOLD`] with everything that came for it meanwhile (one broker read holds
//! one message at a few thousand messages a second; the sockets' writes, not the reads, are
//! what costs). An idle node flushes at once: a batch after a quiet spell waits for nothing.

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex, Once};
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
        if dirty.is_empty() {
            return;
        }
        let mut held = HELD.lock().expect("cork lock");
        let Some(due) = held.batch_ended(Instant::now(), dirty) else {
            drop(held);
            FLUSHER.call_once(start_flusher);
            WAKE.notify_one();
            return;
        };
        drop(held);
        for outbox in due {
            outbox.flush();
        }
    }
}

/// How long a batch that ends soon after a flush may wait for the next one: under load, the
/// longest a frame waits for its write; at low load nothing waits.
pub const HOLD: Duration = Duration::from_micros(1000);

/// The sessions whose frames wait for the next flush (see the module docs).
static HELD: Mutex<Held<Arc<Outbox>>> = Mutex::new(Held::new());
/// Wakes the flusher thread for sessions that were held.
static WAKE: Condvar = Condvar::new();
static FLUSHER: Once = Once::new();

/// Flushes held sessions when their [`HOLD`] is up and no batch came to do it.
fn start_flusher() {
    std::thread::Builder::new()
        .name("cork-flusher".into())
        .spawn(|| loop {
            let mut held = HELD.lock().expect("cork lock");
            let due = loop {
                match held.due(Instant::now()) {
                    Ok(due) => break due,
                    Err(Some(wait)) => held = WAKE.wait_timeout(held, wait).expect("cork lock").0,
                    Err(None) => held = WAKE.wait(held).expect("cork lock"),
                }
            };
            drop(held);
            for outbox in due {
                outbox.flush();
            }
        })
        .expect("start the cork flusher thread");
}

/// What waits for the next flush, and when the last one was. Generic for the tests.
#[derive(Debug)]
struct Held<T> {
    waiting: Vec<T>,
    last_flush: Option<Instant>,
}

impl<T> Held<T> {
    const fn new() -> Self {
        Self {
            waiting: Vec::new(),
            last_flush: None,
        }
    }

    /// A batch ended at `now` with `dirty` sessions: everything to flush now (these and any held
    /// before), or `None` when they are held for the next flush.
    fn batch_ended(&mut self, now: Instant, mut dirty: Vec<T>) -> Option<Vec<T>> {
        if self.last_flush.is_some_and(|last| now < last + HOLD) {
            self.waiting.append(&mut dirty);
            return None;
        }
        self.last_flush = Some(now);
        dirty.append(&mut self.waiting);
        Some(dirty)
    }

    /// For the flusher at `now`: the held sessions if their time is up; else how long until
    /// it is (`None`: nothing is held).
    fn due(&mut self, now: Instant) -> Result<Vec<T>, Option<Duration>> {
        if self.waiting.is_empty() {
            return Err(None);
        }
        let at = self.last_flush.map_or(now, |last| last + HOLD);
        if now < at {
            return Err(Some(at - now));
        }
        self.last_flush = Some(now);
        Ok(std::mem::take(&mut self.waiting))
    }
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
    fn batches_close_together_are_held_for_one_flush_and_an_idle_one_is_not() {
        let t0 = Instant::now();
        let mut h = Held::new();
        assert_eq!(
            h.batch_ended(t0, vec![1]),
            Some(vec![1]),
            "the first batch: at once"
        );
        let soon = t0 + HOLD / 4;
        assert_eq!(
            h.batch_ended(soon, vec![2]),
            None,
            "right after a flush: held"
        );
        assert_eq!(h.batch_ended(soon, vec![3]), None);
        assert_eq!(
            h.due(soon),
            Err(Some(HOLD - HOLD / 4)),
            "the flusher waits out the hold"
        );
        assert_eq!(
            h.due(t0 + HOLD),
            Ok(vec![2, 3]),
            "then flushes everything held"
        );
        assert_eq!(h.due(t0 + HOLD), Err(None), "nothing left: it sleeps");

        // A batch that ends after the hold is up takes the held sessions along.
        assert_eq!(h.batch_ended(t0 + HOLD + HOLD / 2, vec![4]), None);
        assert_eq!(h.batch_ended(t0 + HOLD * 2, vec![5]), Some(vec![5, 4]));
        assert_eq!(h.due(t0 + HOLD * 2), Err(None));

        // After a quiet spell: at once again.
        assert_eq!(h.batch_ended(t0 + HOLD * 50, vec![6]), Some(vec![6]));
    }

    #[test]
    fn held_sessions_are_flushed_by_the_flusher_thread() {
        // Another thread's flush just happened: this batch is held, the flusher writes it.
        let a: Arc<Outbox> = Arc::new(Outbox::new(8));
        HELD.lock().unwrap().last_flush = Some(Instant::now());
        corked(|| {
            defer(&a, Outbound::Text(Bytes::from("x")))
                .unwrap()
                .unwrap()
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        // Waits for the event (the held list emptied by the flusher), bounded.
        while HELD
            .lock()
            .unwrap()
            .waiting
            .iter()
            .any(|o| Arc::ptr_eq(o, &a))
        {
            assert!(Instant::now() < deadline, "the flusher never flushed");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_panicking_batch_still_uncorks_its_thread() {
        let r = std::panic::catch_unwind(|| corked(|| panic!("boom")));
        assert!(r.is_err());
        CORK.with_borrow(|c| assert!(c.is_none()));
    }
}
