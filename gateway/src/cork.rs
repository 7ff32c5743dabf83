//! Corking: while a batch of work runs on a thread — the events one broker read returned, the
//! events one publisher delivers for others, a join's replay — frames sent to idle sessions are
//! queued instead of written one by one, and each session that got any is written once when
//! the batch ends. Under load many frames for one socket become ready together, and one
//! `write()` for all of them costs a fraction of one per frame (the kernel's send path is most
//! of a delivery's CPU); at low load a batch holds one frame and nothing changes.
//!
//! A cork is per thread and never held across an `.await` ([`corked`] takes a closure), so a
//! task that moves threads cannot leave frames behind in a cork nobody flushes.

use std::cell::RefCell;
use std::sync::Arc;

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
        for outbox in dirty {
            outbox.flush();
        }
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
    fn a_panicking_batch_still_uncorks_its_thread() {
        let r = std::panic::catch_unwind(|| corked(|| panic!("boom")));
        assert!(r.is_err());
        CORK.with_borrow(|c| assert!(c.is_none()));
    }
}
