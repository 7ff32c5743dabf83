//! The writer half of a session: drains the bounded outbound queue to the socket, writing
//! whatever is queued in one syscall, sends heartbeat pings, and closes with the code a
//! close request asks for. Frames for an idle session do not pass through here: whoever sends them
//! writes them (see [`Outbox::push`]); the writer takes what the socket did not take at once.
//!
//! Frames are encoded synchronously ([`crate::wire`]) into one buffer per write, instead of
//! through fastwebsockets' `WebSocketWrite`: the session's task then holds no write-side state
//! between writes (no per-frame write future, no buffer kept at the size of the largest
//! burst). Reading stays fastwebsockets' (see `session`).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, Payload};
use metrics::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, Interval};

use crate::outbox::{Outbox, SocketWrite};
use crate::wire::encode;

/// Frames written per syscall at most.
const BATCH: usize = 64;
/// How long a write may stay stuck after a close was requested (a client that stopped
/// reading gets this long to take its queued frames and the close frame).
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// The write side of a session. It lives in the session's box (see `session`), so the
/// session's future holds only what one wait or one write needs. The socket itself stays in
/// the outbox between writes (see [`Outbox::push`]).
pub struct Writer {
    outbox: Arc<Outbox>,
    heartbeat: Duration,
    started: Instant,
    ping: Interval,
    // Looked up once per session: recording is then a couple of atomic operations.
    queue_depth: Histogram,
}

impl Writer {
    /// Call inside the runtime (the heartbeat timer registers with it).
    pub fn new(outbox: Arc<Outbox>, heartbeat: Duration, started: Instant) -> Self {
        Self {
            outbox,
            heartbeat,
            started,
            ping: tokio::time::interval_at(started + heartbeat, heartbeat),
            queue_depth: metrics::histogram!("chat_outbound_queue_depth"),
        }
    }

    /// Runs until the socket fails or a close is requested. Returns the close code sent, if
    /// any. `last_seen`: milliseconds since `started` when the client last sent anything (the
    /// reader stores it); a client silent for three heartbeats is closed with 1001.
    pub async fn run(&mut self, last_seen: &AtomicU64) -> Option<u16> {
        loop {
            // Allocated per write and dropped after it: an idle session holds no buffer.
            let mut buf = Vec::new();
            tokio::select! {
                biased;
                next = self.outbox.next() => {
                    if let Some(code) = next {
                        // The socket is not given back: nothing is written after the close frame.
                        let (mut io, _) = self.outbox.take(&mut buf, 0)?;
                        let given = self.outbox.close_reason();
                        let reason = given.map_or_else(|| close_reason(code, None), String::from);
                        encode(&mut buf, Frame::close(code, reason.as_bytes()));
                        let _ = write_out(&mut io, &buf, &self.outbox).await;
                        return Some(code);
                    }
                    // Sampled once per wake-up: what was queued when the writer woke up.
                    self.queue_depth.record(self.outbox.len() as f64);
                    let (mut io, _) = self.outbox.take(&mut buf, BATCH)?;
                    write_out(&mut io, &buf, &self.outbox).await.ok()?;
                    self.outbox.put_back(io);
                }
                _ = self.ping.tick() => {
                    let idle_ms = self.started.elapsed().as_millis() as u64
                        - last_seen.load(Ordering::Relaxed);
                    if idle_ms > 3 * self.heartbeat.as_millis() as u64 {
                        self.outbox.close(1001);
                        continue;
                    }
                    // Queued frames go first: the socket is taken with them.
                    let (mut io, _) = self.outbox.take(&mut buf, BATCH)?;
                    encode(&mut buf, Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b"hb")));
                    write_out(&mut io, &buf, &self.outbox).await.ok()?;
                    self.outbox.put_back(io);
                }
            }
        }
    }
}

/// Writes one buffer. Once a close is requested, a write stuck on a client that stopped
/// reading gets [`CLOSE_GRACE`], then fails.
async fn write_out(io: &mut SocketWrite, buf: &[u8], outbox: &Outbox) -> std::io::Result<()> {
    let write = async {
        io.write_all(buf).await?;
        io.flush().await
    };
    tokio::pin!(write);
    // Nearly every write completes at once (the socket buffer has room): those skip the
    // close watch, which would register with the outbox's waiters and unregister again.
    if let Poll::Ready(r) = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
        return r;
    }
    let give_up = async {
        outbox.closed().await;
        // Boxed: a timer inline would add its size to every idle connection's task, for a
        // wait that almost never happens.
        Box::pin(tokio::time::sleep(CLOSE_GRACE)).await;
    };
    tokio::select! {
        r = write => r,
        _ = give_up => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// The close frame's reason. Closes a client should come back from tell it when:
/// `; retry_after_ms=<n>` — the hint given with the close, else a jittered default, so that
/// the clients of a room or a node closed together do not all come back at once.
pub fn close_reason(code: u16, retry: Option<u32>) -> String {
    use proto::errors::close::*;
    let (text, spread_ms) = match code {
        POLICY => ("policy violation", None),
        TOO_BIG => ("frame too large", None),
        INTERNAL => ("internal error", Some(RETRY_SPREAD_MS)),
        RESTARTING => ("node restarting", Some(RETRY_SPREAD_MS)),
        SLOW_CONSUMER => ("client too slow", Some(RETRY_SPREAD_MS)),
        1001 => ("idle timeout", None),
        1007 => ("invalid utf-8", None),
        _ => ("", None),
    };
    match retry.or_else(|| spread_ms.map(|ms| rand::random_range(0..ms))) {
        Some(ms) => format!("{text}; retry_after_ms={ms}"),
        None => text.to_string(),
    }
}

/// Closes that come in bunches without a hint of their own (a room whose gap the node could
/// not fill, slow consumers of one burst) spread their clients' returns over this long.
pub const RETRY_SPREAD_MS: u32 = 2000;
