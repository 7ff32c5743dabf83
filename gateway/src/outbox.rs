//! A session's outbound queue: bounded, filled by any task (fan-out, answers, pongs), drained
//! by the session's writer alone. It also holds the socket's write half between the writer's
//! writes, so a frame for an idle session is written by whoever sends it (see [`Outbox::push`]).
//!
//! Why not tokio's mpsc: a bounded channel allocates ~1.8 KB up front (its first block of 32
//! slots and the channel state) and keeps every block a burst made it grow, for the life of
//! the connection. A gateway holds tens of thousands of mostly idle sessions, so the queue
//! must cost nothing while empty: this one is a `VecDeque` that is released whenever the
//! writer empties it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use fastwebsockets::{Frame, Payload};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use metrics::Counter;
use tokio::io::{AsyncWrite, WriteHalf};
use tokio::sync::Notify;

/// The socket's write half.
pub type SocketWrite = WriteHalf<TokioIo<Upgraded>>;

/// What a session's writer sends.
#[derive(Debug)]
pub enum Outbound {
    /// A text frame, shared by every recipient.
    Text(Bytes),
    /// A pong answering the client's ping.
    Pong(Bytes),
    /// The unwritten rest of a frame a direct write sent in part, as it goes on the wire.
    Rest(Bytes),
}

impl Outbound {
    /// Appends the item, as it goes on the wire, to `buf`.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        match self {
            Outbound::Text(b) => crate::wire::encode(buf, Frame::text(Payload::Borrowed(b))),
            Outbound::Pong(b) => crate::wire::encode(buf, Frame::pong(Payload::Borrowed(b))),
            Outbound::Rest(b) => buf.extend_from_slice(b),
        }
    }
}

/// The longest close reason: a close frame's payload is at most 125 bytes, 2 of them the code.
pub const MAX_CLOSE_REASON: usize = 123;

/// The queue was full; the item was not queued.
#[derive(Debug)]
pub struct Full;

/// Where a deferred item went ([`Outbox::defer`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Deferred {
    /// Into an empty queue: the caller flushes this outbox once its batch is done. (Behind
    /// other items, someone already flushes them or the writer already takes them.)
    pub first: bool,
    /// Items waiting now.
    pub waiting: usize,
}

/// Items one flush writes at most (the writer takes the rest, as many per write).
const FLUSH_MAX: usize = 64;

#[derive(Debug)]
struct State<W> {
    queue: VecDeque<Outbound>,
    /// The socket, while the writer is not using it (see [`Outbox::push`]).
    io: Option<W>,
    /// The close frame's reason, when the close request gave one ([`Outbox::close_with`]).
    close_reason: Option<Box<str>>,
}

/// `W` is the socket's write half; generic so tests can watch what is written.
#[derive(Debug)]
pub struct Outbox<W = SocketWrite> {
    state: Mutex<State<W>>,
    /// Wakes the writer for a queued item or a close request. `notify_one` keeps a permit
    /// when the writer is not waiting yet, so nothing sent between its check and its wait is
    /// missed.
    ready: Notify,
    /// The close code asked for; 0 while none is.
    close: AtomicU16,
    /// When a corked batch last flushed this session, in the cork's microseconds (0: never,
    /// which the cork's clock reads as long ago): a session written by a batch a moment ago
    /// waits for the next flush (see `cork`).
    corked_at: AtomicU32,
    capacity: usize,
    frames_out: Counter,
}

impl<W: AsyncWrite + Unpin> Outbox<W> {
    /// Call after the metrics recorder is installed (the frame counter's handle is kept).
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                io: None,
                close_reason: None,
            }),
            ready: Notify::new(),
            close: AtomicU16::new(0),
            corked_at: AtomicU32::new(0),
            capacity,
            frames_out: metrics::counter!("chat_frames_out_total"),
        }
    }

    /// Hands the outbox the socket's write half: from now on an item pushed to an empty queue
    /// is written at once.
    pub fn attach(&self, io: W) {
        self.lock().io = Some(io);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<W>> {
        self.state.lock().expect("outbox lock")
    }

    /// Sends an item, or queues it unless `capacity` items are already waiting. Returns how
    /// many items wait now (0 when it was written).
    ///
    /// With `direct`, an item for an idle session (nothing queued, the writer not writing, no
    /// close asked for) goes straight into the socket from the caller's thread: a fan-out to
    /// an idle session then costs one `send`, not a wake-up and a poll of its task. Whatever
    /// the socket does not take at once is queued for the writer, in order.
    pub fn push(&self, out: Outbound, direct: bool) -> Result<usize, Full> {
        let direct = direct && self.closing().is_none();
        let mut s = self.lock();
        if direct && s.queue.is_empty() {
            if let Some(io) = s.io.as_mut() {
                match write_now(io, &out) {
                    Direct::Written => {
                        self.frames_out.increment(1);
                        return Ok(0);
                    }
                    Direct::Partly(rest) => {
                        s.queue.push_back(Outbound::Rest(rest));
                        drop(s);
                        self.frames_out.increment(1);
                        self.ready.notify_one();
                        return Ok(1);
                    }
                    // The socket is full or failed: the writer takes the item from the queue
                    // and meets the socket's condition itself.
                    Direct::NotWritten => {}
                }
            }
        }
        if s.queue.len() >= self.capacity {
            return Err(Full);
        }
        s.queue.push_back(out);
        let waiting = s.queue.len();
        drop(s);
        self.ready.notify_one();
        Ok(waiting)
    }

    /// Queues an item for a flush later in the same batch of work ([`Outbox::flush`]), without
    /// writing it or waking the writer: frames for one session that become ready together —
    /// one broker batch, one fan-out pass — then go out in one write.
    pub fn defer(&self, out: Outbound) -> Result<Deferred, Full> {
        let mut s = self.lock();
        if s.queue.len() >= self.capacity {
            return Err(Full);
        }
        let first = s.queue.is_empty();
        s.queue.push_back(out);
        Ok(Deferred {
            first,
            waiting: s.queue.len(),
        })
    }

    /// Writes what is queued with one non-blocking write when the session is idle (the
    /// writer not writing, no close asked for); whatever the socket does not take, and
    /// anything past [`FLUSH_MAX`] items, is left to the writer, which is woken for it.
    pub fn flush(&self) {
        let mut guard = self.lock();
        let State { queue, io, .. } = &mut *guard;
        if queue.is_empty() {
            return;
        }
        let (Some(io), None) = (io.as_mut(), self.closing()) else {
            // The writer has the socket (it takes the queue when its write is done) or a
            // close is due (the writer sends what is queued, then the close frame).
            drop(guard);
            self.ready.notify_one();
            return;
        };
        let (mut items, mut frames) = (0, 0);
        let written = WIRE.with_borrow_mut(|wire| {
            wire.clear();
            for out in queue.iter().take(FLUSH_MAX) {
                out.encode(wire);
                items += 1;
                // The rest of a frame was counted when its start was written.
                frames += u64::from(!matches!(out, Outbound::Rest(_)));
            }
            write_once(io, wire)
        });
        let rest = match written {
            Direct::NotWritten => None,
            Direct::Written => Some(None),
            Direct::Partly(rest) => Some(Some(rest)),
        };
        if let Some(rest) = rest {
            queue.drain(..items);
            if let Some(rest) = rest {
                queue.push_front(Outbound::Rest(rest));
            }
            self.frames_out.increment(frames);
            if queue.is_empty() {
                *queue = VecDeque::new();
                return;
            }
        }
        drop(guard);
        self.ready.notify_one();
    }

    /// When a corked batch last flushed this session (see `corked_at`).
    pub fn corked_at(&self) -> u32 {
        self.corked_at.load(Ordering::Relaxed)
    }

    /// Flushes (see [`Self::flush`]) for a corked batch at `now` (the cork's microseconds).
    pub fn flush_corked(&self, now: u32) {
        self.corked_at.store(now, Ordering::Relaxed);
        self.flush();
    }

    /// Asks the writer to send a close frame with `code` and stop; the first code wins. It acts
    /// on it even when the queue is full, and nothing is written directly from then on.
    pub fn close(&self, code: u16) {
        if self
            .close
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.ready.notify_one();
        }
    }

    /// [`Self::close`] with the close frame's reason (at most [`MAX_CLOSE_REASON`] bytes; cut
    /// at a character boundary). The reason is in place before the writer can see the code.
    pub fn close_with(&self, code: u16, reason: &str) {
        let mut s = self.lock();
        if self
            .close
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let mut end = reason.len().min(MAX_CLOSE_REASON);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            s.close_reason = Some(reason[..end].into());
            drop(s);
            self.ready.notify_one();
        }
    }

    /// The reason given with the close request, if any.
    pub fn close_reason(&self) -> Option<Box<str>> {
        self.lock().close_reason.take()
    }

    /// The close code asked for, if any.
    pub fn closing(&self) -> Option<u16> {
        match self.close.load(Ordering::Acquire) {
            0 => None,
            c => Some(c),
        }
    }

    /// Waits until a close is asked for (the code) or an item is queued (`None`). One
    /// consumer only (the session's writer). Cancel safe.
    pub async fn next(&self) -> Option<u16> {
        loop {
            if let Some(code) = self.closing() {
                return Some(code);
            }
            if !self.lock().queue.is_empty() {
                return None;
            }
            self.ready.notified().await;
        }
    }

    /// Waits until a close is asked for. For the writer while it writes (then nothing else
    /// waits on the outbox). Cancel safe.
    pub async fn closed(&self) {
        while self.closing().is_none() {
            self.ready.notified().await;
        }
    }

    /// For the writer: the socket, with up to `max` queued items encoded into `buf`, in one
    /// critical section, so no direct write can slip in between them. The rest of a frame a
    /// direct write began always comes along, even with `max` 0: whatever the writer sends
    /// next (a close frame) must not land inside it. `None` once the writer has kept the
    /// socket (after the close frame). Emptying the queue releases its memory.
    pub fn take(&self, buf: &mut Vec<u8>, max: usize) -> Option<(W, usize)> {
        let mut s = self.lock();
        let io = s.io.take()?;
        let (mut n, mut frames) = (0, 0);
        while n < max || matches!(s.queue.front(), Some(Outbound::Rest(_))) {
            let Some(out) = s.queue.pop_front() else {
                break;
            };
            out.encode(buf);
            n += 1;
            // The rest of a frame was counted when its start was written.
            frames += u64::from(!matches!(out, Outbound::Rest(_)));
        }
        if s.queue.is_empty() && s.queue.capacity() > 0 {
            s.queue = VecDeque::new();
        }
        drop(s);
        self.frames_out.increment(frames);
        Some((io, n))
    }

    /// For the writer: gives the socket back after a write.
    pub fn put_back(&self, io: W) {
        self.lock().io = Some(io);
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pops the next queued item (the writer takes items with the socket, by [`Self::take`]).
    #[cfg(test)]
    pub fn try_pop(&self) -> Option<Outbound> {
        self.lock().queue.pop_front()
    }
}

/// What a direct write did.
enum Direct {
    Written,
    /// Written in part; the rest, as it goes on the wire.
    Partly(Bytes),
    NotWritten,
}

thread_local! {
    /// A direct write's wire bytes, reused by every write on this thread (the frame is
    /// encoded with [`Outbound::encode`], as the writer does, without an allocation per write).
    static WIRE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// One non-blocking write of `out`.
///
/// Polled with a no-op waker: a socket that is not ready registers that waker instead of
/// the writer's, which is harmless because the item then goes to the writer, which polls the
/// socket again with its own before it waits.
fn write_now<W: AsyncWrite + Unpin>(io: &mut W, out: &Outbound) -> Direct {
    WIRE.with_borrow_mut(|wire| {
        wire.clear();
        out.encode(wire);
        write_once(io, wire)
    })
}

/// One non-blocking write of `wire` (see [`write_now`] for the waker).
fn write_once<W: AsyncWrite + Unpin>(io: &mut W, wire: &[u8]) -> Direct {
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(io).poll_write(&mut cx, wire) {
        Poll::Ready(Ok(n)) if n == wire.len() => Direct::Written,
        Poll::Ready(Ok(n)) if n > 0 => Direct::Partly(Bytes::copy_from_slice(&wire[n..])),
        _ => Direct::NotWritten,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn text(s: &'static str) -> Outbound {
        Outbound::Text(Bytes::from(s))
    }

    fn wire(items: &[Outbound]) -> Vec<u8> {
        let mut buf = Vec::new();
        for o in items {
            o.encode(&mut buf);
        }
        buf
    }

    /// A socket that takes `budget` more bytes, then is full (`Pending`).
    #[derive(Debug, Default)]
    struct Socket {
        written: Vec<u8>,
        budget: usize,
        /// Writes that took bytes.
        writes: usize,
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.budget);
            if n == 0 {
                return Poll::Pending;
            }
            self.budget -= n;
            self.writes += 1;
            self.written.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn with_socket(capacity: usize, budget: usize) -> Outbox<Socket> {
        let o = Outbox::new(capacity);
        o.attach(Socket {
            budget,
            ..Socket::default()
        });
        o
    }

    #[test]
    fn bounded_and_in_order() {
        let o = Outbox::<Socket>::new(2);
        o.push(text("a"), true).unwrap();
        o.push(text("b"), true).unwrap();
        assert!(
            o.push(text("c"), true).is_err(),
            "a third item passes a capacity of 2"
        );
        assert_eq!(o.len(), 2);
        let mut buf = Vec::new();
        assert!(o.take(&mut buf, 1).is_none(), "no socket yet");
        assert_eq!(body(o.try_pop().unwrap()), "a");
        o.push(text("d"), true).unwrap();
        assert_eq!(body(o.try_pop().unwrap()), "b");
        assert_eq!(body(o.try_pop().unwrap()), "d");
        assert!(o.try_pop().is_none());
    }

    fn body(o: Outbound) -> Bytes {
        match o {
            Outbound::Text(b) | Outbound::Pong(b) | Outbound::Rest(b) => b,
        }
    }

    #[test]
    fn an_idle_session_is_written_at_once_and_a_busy_one_queued() {
        let o = with_socket(8, usize::MAX);
        o.push(text("a"), true).unwrap();
        o.push(Outbound::Pong(Bytes::from("p")), true).unwrap();
        assert!(o.is_empty(), "both written directly");
        o.push(text("closing"), false).unwrap();
        assert_eq!(o.len(), 1, "not direct: queued");
        o.push(text("b"), true).unwrap();
        assert_eq!(o.len(), 2, "behind a queued item: queued");

        // The writer takes the socket with the queue, in order; while it holds the socket
        // nothing is written directly.
        let mut buf = Vec::new();
        let (io, n) = o.take(&mut buf, 64).unwrap();
        assert_eq!(n, 2);
        assert_eq!(buf, wire(&[text("closing"), text("b")]));
        o.push(text("c"), true).unwrap();
        assert_eq!(o.len(), 1, "the writer has the socket: queued");
        assert_eq!(
            io.written,
            wire(&[text("a"), Outbound::Pong(Bytes::from("p"))])
        );
        o.put_back(io);
        let (_, n) = o.take(&mut buf, 64).unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            o.lock().queue.capacity(),
            0,
            "an emptied queue holds no memory"
        );
    }

    #[test]
    fn a_partial_write_queues_the_rest_before_anything_else() {
        let o = with_socket(8, 3);
        o.push(text("hello"), true).unwrap();
        o.push(text("next"), true).unwrap();
        assert_eq!(o.len(), 2, "the rest of the first frame, then the second");
        let mut buf = Vec::new();
        let (io, _) = o.take(&mut buf, 64).unwrap();
        let mut all = io.written.clone();
        all.extend_from_slice(&buf);
        assert_eq!(
            all,
            wire(&[text("hello"), text("next")]),
            "no byte lost or reordered"
        );
    }

    #[test]
    fn a_close_frame_never_lands_inside_a_partly_written_frame() {
        let o = with_socket(8, 3);
        o.push(text("hello"), true).unwrap();
        o.push(text("queued"), true).unwrap();
        o.close(1013);
        let mut buf = Vec::new();
        let (io, n) = o.take(&mut buf, 0).unwrap();
        assert_eq!(n, 1, "the rest of the begun frame, nothing else");
        let mut all = io.written.clone();
        all.extend_from_slice(&buf);
        assert_eq!(all, wire(&[text("hello")]));
    }

    #[test]
    fn a_full_socket_leaves_the_frame_queued() {
        let o = with_socket(8, 0);
        o.push(text("a"), true).unwrap();
        let mut buf = Vec::new();
        let (io, n) = o.take(&mut buf, 64).unwrap();
        assert_eq!((n, io.written.len()), (1, 0));
        assert_eq!(buf, wire(&[text("a")]));
    }

    #[test]
    fn a_large_frame_is_written_at_once_too() {
        let o = with_socket(8, usize::MAX);
        let big = Bytes::from(vec![b'x'; 64 * 1024]);
        o.push(Outbound::Text(big.clone()), true).unwrap();
        o.push(text("small"), true).unwrap();
        let mut buf = Vec::new();
        let (io, n) = o.take(&mut buf, 64).unwrap();
        assert_eq!(n, 0, "nothing queued");
        assert_eq!(io.written, wire(&[Outbound::Text(big), text("small")]));
    }

    #[tokio::test]
    async fn the_writer_wakes_for_an_item_pushed_while_it_waits() {
        let o = Arc::new(Outbox::<Socket>::new(8));
        let writer = tokio::spawn({
            let o = o.clone();
            async move {
                assert_eq!(o.next().await, None, "an item, no close");
                body(o.try_pop().unwrap())
            }
        });
        tokio::task::yield_now().await; // the writer is likely waiting now; either way works
        o.push(text("late"), true).unwrap();
        assert_eq!(writer.await.unwrap(), "late");
    }

    #[tokio::test]
    async fn a_wait_abandoned_by_select_loses_nothing() {
        let o = Outbox::<Socket>::new(8);
        // next() dropped while waiting, as when another select! branch wins
        tokio::select! {
            biased;
            _ = std::future::ready(()) => {}
            _ = o.next() => unreachable!("empty"),
        }
        o.push(text("kept"), true).unwrap();
        assert_eq!(o.next().await, None);
        assert_eq!(body(o.try_pop().unwrap()), "kept");
    }

    #[tokio::test]
    async fn a_close_request_wakes_the_writer_and_stops_direct_writes() {
        let o = Arc::new(with_socket(8, usize::MAX));
        o.push(text("queued"), false).unwrap();
        o.close(1008);
        o.close(1000);
        assert_eq!(
            o.next().await,
            Some(1008),
            "the first code wins, ahead of the queue"
        );
        o.closed().await;
        o.push(text("late"), true).unwrap();
        let mut buf = Vec::new();
        let (io, n) = o.take(&mut buf, 0).unwrap();
        assert_eq!(
            (n, io.written.len(), o.len()),
            (0, 0, 2),
            "nothing written after the close"
        );

        let waiting = Arc::new(Outbox::<Socket>::new(8));
        let writer = tokio::spawn({
            let o = waiting.clone();
            async move { o.closed().await }
        });
        tokio::task::yield_now().await;
        waiting.push(text("not a close"), true).unwrap();
        tokio::task::yield_now().await;
        assert!(!writer.is_finished(), "an item does not end closed()");
        waiting.close(1013);
        writer.await.unwrap();
    }

    /// The socket back from the outbox, to look at what was written.
    fn socket(o: &Outbox<Socket>) -> Socket {
        let mut buf = Vec::new();
        let (io, _) = o.take(&mut buf, 0).unwrap();
        io
    }

    #[test]
    fn deferred_items_go_out_in_one_write_at_the_flush() {
        let o = with_socket(8, usize::MAX);
        let d = o.defer(text("a")).unwrap();
        assert_eq!((d.first, d.waiting), (true, 1));
        let d = o.defer(text("b")).unwrap();
        assert_eq!(
            (d.first, d.waiting),
            (false, 2),
            "the first one's flush takes it"
        );
        o.defer(Outbound::Pong(Bytes::from("p"))).unwrap();
        assert_eq!(o.len(), 3, "nothing written before the flush");
        o.flush();
        assert!(o.is_empty());
        let io = socket(&o);
        assert_eq!(io.writes, 1, "one write for the batch");
        assert_eq!(
            io.written,
            wire(&[text("a"), text("b"), Outbound::Pong(Bytes::from("p"))])
        );
    }

    #[test]
    fn a_flush_the_socket_takes_in_part_leaves_the_rest_first_in_line() {
        let o = with_socket(8, 5);
        o.defer(text("hello")).unwrap();
        o.defer(text("world")).unwrap();
        o.flush();
        o.push(text("later"), true).unwrap();
        let mut buf = Vec::new();
        let (io, _) = o.take(&mut buf, 64).unwrap();
        let mut all = io.written.clone();
        all.extend_from_slice(&buf);
        assert_eq!(all, wire(&[text("hello"), text("world"), text("later")]));
    }

    #[test]
    fn a_flush_writes_nothing_while_the_writer_has_the_socket_or_a_close_is_due() {
        let o = with_socket(8, usize::MAX);
        let mut buf = Vec::new();
        let (io, _) = o.take(&mut buf, 64).unwrap();
        o.defer(text("a")).unwrap();
        o.flush();
        assert_eq!(o.len(), 1, "the writer takes it after its write");
        o.put_back(io);
        o.close(1013);
        o.flush();
        assert_eq!(
            o.len(),
            1,
            "queued for the writer, which sends it before the close"
        );
        assert!(o.defer(text("b")).is_ok());
        let small = Outbox::<Socket>::new(1);
        small.defer(text("x")).unwrap();
        assert!(small.defer(text("y")).is_err(), "bounded like push");
    }

    #[test]
    fn a_close_reason_goes_with_the_winning_code_and_fits_a_close_frame() {
        let o = with_socket(8, usize::MAX);
        o.close_with(1008, &"é".repeat(100));
        o.close_with(1000, "too late");
        assert_eq!(o.closing(), Some(1008));
        let reason = o.close_reason().unwrap();
        assert_eq!(
            reason.len(),
            122,
            "cut at a character boundary under 123 bytes"
        );
        assert!(reason.chars().all(|c| c == 'é'));

        let plain = with_socket(8, usize::MAX);
        plain.close(1013);
        plain.close_with(1008, "a later reason");
        assert_eq!(
            (plain.closing(), plain.close_reason()),
            (Some(1013), None),
            "a losing request leaves no reason"
        );
    }
}
