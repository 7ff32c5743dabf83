//! The writer half of a session: drains the bounded outbound queue to the socket, coalescing
//! whatever is queued into one write, sends heartbeat pings, and closes with the code a
//! [`Kill`] asks for.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, Payload, WebSocketWrite};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;

use crate::hub::{Kill, Outbound};

/// Frames written per flush at most.
const BATCH: usize = 64;
/// Buffer capacity kept between bursts; a larger one is released so idle sessions stay small.
const KEEP_CAPACITY: usize = 16 * 1024;

/// Buffers writes until flush, then hands them to the socket in one go. Allocates only while
/// there is something to write.
pub struct Coalesce<W> {
    inner: W,
    buf: Vec<u8>,
    written: usize,
}

impl<W> Coalesce<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            written: 0,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Coalesce<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.written < this.buf.len() {
            let n = std::task::ready!(
                Pin::new(&mut this.inner).poll_write(cx, &this.buf[this.written..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            this.written += n;
        }
        this.buf.clear();
        this.written = 0;
        if this.buf.capacity() > KEEP_CAPACITY {
            this.buf = Vec::new();
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Milliseconds since the session started when the client last sent anything.
pub type LastSeen = Arc<AtomicU64>;

/// Runs until the queue closes, the socket fails, or a close is requested. Returns the close
/// code sent, if any.
pub async fn run<W: AsyncWrite + Unpin>(
    mut ws: WebSocketWrite<Coalesce<W>>,
    mut rx: mpsc::Receiver<Outbound>,
    kill: Arc<Kill>,
    heartbeat: Duration,
    last_seen: LastSeen,
    started: tokio::time::Instant,
) -> Option<u16> {
    ws.set_writev(false); // everything goes through the coalescing buffer
    let mut ping = tokio::time::interval_at(started + heartbeat, heartbeat);
    let mut batch = Vec::with_capacity(BATCH);
    // Handles looked up once per session: recording is then a couple of atomic operations.
    let frames_out = metrics::counter!("chat_frames_out_total");
    let queue_depth = metrics::histogram!("chat_outbound_queue_depth");
    loop {
        tokio::select! {
            biased;
            code = kill.wait() => {
                let _ = ws.write_frame(Frame::close(code, close_reason(code).as_bytes())).await;
                let _ = ws.flush().await;
                return Some(code);
            }
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    return None;
                }
                frames_out.increment(n as u64);
                // Sampled once per batch: what was queued when the writer woke up.
                queue_depth.record((n + rx.len()) as f64);
                for out in batch.drain(..) {
                    if kill.code().is_some() {
                        break; // the close frame goes next, not the rest of the batch
                    }
                    let frame = match &out {
                        Outbound::Text(b) => Frame::text(Payload::Borrowed(b)),
                        Outbound::Pong(b) => Frame::pong(Payload::Borrowed(b)),
                    };
                    if ws.write_frame(frame).await.is_err() {
                        return None;
                    }
                }
                if ws.flush().await.is_err() {
                    return None;
                }
            }
            _ = ping.tick() => {
                let idle_ms = started.elapsed().as_millis() as u64 - last_seen.load(Ordering::Relaxed);
                if idle_ms > 3 * heartbeat.as_millis() as u64 {
                    kill.close(1001);
                    continue;
                }
                let ok = ws.write_frame(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b"hb"))).await.is_ok();
                if !ok || ws.flush().await.is_err() {
                    return None;
                }
            }
        }
    }
}

fn close_reason(code: u16) -> &'static str {
    use proto::errors::close::*;
    match code {
        POLICY => "policy violation",
        TOO_BIG => "frame too large",
        INTERNAL => "internal error",
        RESTARTING => "node restarting",
        SLOW_CONSUMER => "client too slow",
        1001 => "idle timeout",
        1007 => "invalid utf-8",
        _ => "",
    }
}
