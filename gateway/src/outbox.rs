//! A session's outbound queue: bounded, filled by any task (fan-out, answers, pongs), drained
//! by the session's writer alone.
//!
//! Why not tokio's mpsc: a bounded channel allocates ~1.8 KB up front (its first block of 32
//! slots and the channel state) and keeps every block a burst made it grow, for the life of
//! the connection. A gateway holds tens of thousands of mostly idle sessions, so the queue
//! must cost nothing while empty: this one is a `VecDeque` that is released whenever the
//! writer empties it.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

/// What a session's writer sends.
#[derive(Debug)]
pub enum Outbound {
    /// A text frame, shared by every recipient.
    Text(Bytes),
    /// A pong answering the client's ping.
    Pong(Bytes),
}

/// The queue was full; the item was not queued.
#[derive(Debug)]
pub struct Full;

#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<VecDeque<Outbound>>,
    /// Wakes the writer. `notify_one` keeps a permit when the writer is not waiting yet, so
    /// an item pushed between its empty check and its wait is not missed.
    ready: Notify,
    capacity: usize,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            capacity,
        }
    }

    /// Queues an item unless `capacity` items are already waiting.
    pub fn push(&self, out: Outbound) -> Result<(), Full> {
        let mut q = self.queue.lock().expect("outbox lock");
        if q.len() >= self.capacity {
            return Err(Full);
        }
        q.push_back(out);
        drop(q);
        self.ready.notify_one();
        Ok(())
    }

    /// The next item, if one is waiting. Emptying the queue releases its memory.
    pub fn try_pop(&self) -> Option<Outbound> {
        let mut q = self.queue.lock().expect("outbox lock");
        let out = q.pop_front();
        if q.is_empty() && q.capacity() > 0 {
            *q = VecDeque::new();
        }
        out
    }

    /// Waits for the next item. One consumer only (the session's writer). Cancel safe: items
    /// stay queued until popped.
    pub async fn pop(&self) -> Outbound {
        loop {
            if let Some(out) = self.try_pop() {
                return out;
            }
            self.ready.notified().await;
        }
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.queue.lock().expect("outbox lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn text(s: &'static str) -> Outbound {
        Outbound::Text(Bytes::from(s))
    }

    fn body(o: Outbound) -> Bytes {
        match o {
            Outbound::Text(b) | Outbound::Pong(b) => b,
        }
    }

    #[test]
    fn bounded_and_in_order() {
        let o = Outbox::new(2);
        o.push(text("a")).unwrap();
        o.push(text("b")).unwrap();
        assert!(
            o.push(text("c")).is_err(),
            "a third item passes a capacity of 2"
        );
        assert_eq!(o.len(), 2);
        assert_eq!(body(o.try_pop().unwrap()), "a");
        o.push(text("d")).unwrap();
        assert_eq!(body(o.try_pop().unwrap()), "b");
        assert_eq!(body(o.try_pop().unwrap()), "d");
        assert!(o.try_pop().is_none());
    }

    #[test]
    fn an_emptied_queue_holds_no_memory() {
        let o = Outbox::new(100);
        for _ in 0..50 {
            o.push(text("x")).unwrap();
        }
        while o.try_pop().is_some() {}
        assert_eq!(o.queue.lock().unwrap().capacity(), 0);
    }

    #[tokio::test]
    async fn the_writer_wakes_for_an_item_pushed_while_it_waits() {
        let o = Arc::new(Outbox::new(8));
        let writer = tokio::spawn({
            let o = o.clone();
            async move { body(o.pop().await) }
        });
        tokio::task::yield_now().await; // the writer is likely waiting now; either way works
        o.push(text("late")).unwrap();
        assert_eq!(writer.await.unwrap(), "late");
    }

    #[tokio::test]
    async fn a_pop_abandoned_by_select_loses_nothing() {
        let o = Outbox::new(8);
        // pop() dropped while waiting, as when another select! branch wins
        tokio::select! {
            biased;
            _ = std::future::ready(()) => {}
            _ = o.pop() => unreachable!("empty"),
        }
        o.push(text("kept")).unwrap();
        assert_eq!(body(o.pop().await), "kept");
    }
}
