//! One session per WebSocket: a reader that parses frames and runs commands, a writer that
//! drains the bounded outbound queue ([`crate::writer`]); both end together.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Role, WebSocket, WebSocketError, WebSocketRead};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use proto::auth::Identity;
use proto::errors::close;
use proto::{ErrorCode, RoomId, ServerEvent};
use tokio::io::ReadHalf;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use crate::commands::{self, Caller};
use crate::hub::SessionHandle;
use crate::node::Node;
use crate::outbox::{Outbound, Outbox};
use crate::reassembly::Reassembly;
use crate::writer::Writer;

/// Rejected commands in a row after which a flooding client is closed with 1008.
const MAX_STRIKES: u32 = 200;

/// The per-connection token bucket, and how many commands in a row it refused.
struct Admission {
    limiter: DefaultDirectRateLimiter,
    strikes: u32,
}

/// What a session starts from: the upgraded socket, who is on it, and its place under the
/// node's connection limit (held for the session's life).
pub struct Start {
    pub node: Arc<Node>,
    pub ws: WebSocket<TokioIo<Upgraded>>,
    pub identity: Identity,
    pub auto_join: Option<RoomId>,
    pub permit: OwnedSemaphorePermit,
}

/// Everything a session keeps for its life, in one allocation. The session's future borrows
/// from it instead of owning it: an `async fn` stores each argument twice (as captured and as
/// a local), and this future lives as long as the connection, times every idle connection
/// of the node.
struct Session {
    reader: Reader,
    writer: Writer,
    /// Milliseconds since the session started when the client last sent anything.
    last_seen: AtomicU64,
    _permit: OwnedSemaphorePermit,
}

/// The read side of a session, with what the commands it runs work with. One struct, so the
/// reader's future holds one reference to it rather than one per field, twice (see `Session`).
struct Reader {
    node: Arc<Node>,
    caller: Caller,
    admission: Admission,
    /// The session's `connect` span.
    connect: tracing::Span,
    read: WebSocketRead<ReadHalf<TokioIo<Upgraded>>>,
    reassembly: Reassembly,
    /// A room named in the upgrade URL, joined before the first frame is read.
    auto_join: Option<RoomId>,
    started: tokio::time::Instant,
}

/// Registers the session and returns it running. Spawn the future as its own task.
///
/// The session has one `connect` span, which its commands' spans follow from; the future is
/// not instrumented with it: entering a span on every poll cost ~2.5 % of the CPU of a
/// fan-out, where most polls are the writer's wake-ups.
pub fn run(start: Box<Start>) -> impl std::future::Future<Output = ()> + Send + 'static {
    let id = start.node.next_session_id();
    let span = tracing::info_span!(
        target: history_service::telemetry::TRACES_ONLY,
        "connect",
        otel.kind = "server",
        user = %start.identity.user.id,
        session = id,
    );
    let session = span.in_scope(|| open(*start, id, span.clone()));
    run_session(session)
}

/// Registers the session with the hub and sends `hello`.
fn open(start: Start, id: u64, connect: tracing::Span) -> Box<Session> {
    let Start {
        node,
        ws,
        identity,
        auto_join,
        permit,
    } = start;
    let started = tokio::time::Instant::now();
    let outbox = Arc::new(Outbox::new(node.config.outbound_queue));
    let handle = SessionHandle::new(
        id,
        Arc::new(identity.user.clone()),
        identity.admin,
        outbox.clone(),
    );
    let quota = Quota::per_second(NonZeroU32::new(node.config.messages_per_s).expect("validated"))
        .allow_burst(NonZeroU32::new(node.config.burst).expect("validated"));
    let caller = Caller::new(handle.clone(), identity);
    let admission = Admission {
        // The node's clock: a clock of its own per session would be calibrated (CPUID, which
        // traps to the hypervisor on a VM) on every connect.
        limiter: RateLimiter::direct_with_clock(quota, node.clock.clone()),
        strikes: 0,
    };
    // `hello` is queued before the session is registered: once registered, site-wide
    // announcements (`room_created`, `notice`) reach it from other threads, and one of them
    // must never come first.
    caller.send(&ServerEvent::Hello {
        session_id: format!("{}-{}", node.name, id),
        user: caller.identity.user.clone(),
        node: node.name.clone(),
        heartbeat_s: node.config.heartbeat_seconds as u32,
        limits: node.limits(),
    });
    node.expiry.watch(&handle, caller.identity.exp);
    node.hub.register(handle);
    metrics::gauge!("chat_connections").increment(1.0);
    // Registered before this check, so a drain either sees this session or is seen here.
    if node.is_draining() {
        crate::shutdown::turn_away(&caller.handle);
    }

    // fastwebsockets reads frames; the writer encodes its own (see `writer`), so the write half
    // is the raw socket half and fastwebsockets' own write half (on a sink) is never used.
    let (r, write) = tokio::io::split(ws.into_inner());
    outbox.attach(write);
    let (mut read, _) = fastwebsockets::after_handshake_split(r, tokio::io::sink(), Role::Server);
    read.set_max_message_size(node.config.max_frame_bytes);
    read.set_auto_close(true);
    read.set_auto_pong(true);
    Box::new(Session {
        writer: Writer::new(outbox, node.config.heartbeat(), started),
        reader: Reader {
            read,
            reassembly: Reassembly::new(node.config.max_frame_bytes),
            auto_join,
            started,
            node,
            caller,
            admission,
            connect,
        },
        last_seen: AtomicU64::new(0),
        _permit: permit,
    })
}

async fn run_session(mut session: Box<Session>) {
    let Session {
        reader,
        writer,
        last_seen,
        _permit,
    } = &mut *session;
    {
        let writing = writer.run(last_seen);
        let reading = read_loop(reader, last_seen);
        tokio::pin!(writing, reading);
        // A close request ends the writer (it sends the close frame), which drops the reader
        // here.
        tokio::select! {
            _ = &mut writing => {}
            _ = &mut reading => {
                (&mut writing).await;
            }
        }
    }

    let Reader {
        node,
        caller,
        connect,
        ..
    } = reader;
    // Boxed: inline, the loop's state would add to every idle connection's task (see read_loop).
    Box::pin(leave_all(node, caller, connect)).await;
    node.hub
        .unregister(&caller.identity.user.id, caller.handle.id);
    node.expiry.unwatch(caller.handle.id, caller.identity.exp);
    metrics::gauge!("chat_connections").decrement(1.0);
}

/// The session's rooms, left when it ends.
async fn leave_all(node: &Arc<Node>, caller: &mut Caller, connect: &tracing::Span) {
    for room in std::mem::take(&mut caller.rooms) {
        let leave = commands::leave_room(node, caller, &room).instrument(connect.clone());
        Box::pin(leave).await; // boxed: see read_loop
    }
}

async fn read_loop(reader: &mut Reader, last_seen: &AtomicU64) {
    if let Some(room) = reader.auto_join.take() {
        let span = command_span("join", Some(&room), &reader.connect);
        let cmd = proto::client::Join {
            room,
            since: None,
            epoch: None,
        };
        let join = commands::join(&reader.node, &mut reader.caller, None, cmd);
        Box::pin(join.instrument(span)).await;
    }

    // The close code to end with: 1000 when the client closed or vanished.
    let code = loop {
        // Every frame one read returned is answered before the answers are written, in one
        // write: they are written when the next frame is not there yet.
        let read = {
            // Obligated answers (pong to a ping, the close echo) go through the writer.
            let handle = &reader.caller.handle;
            let mut obligated = |frame: Frame<'_>| {
                match frame.opcode {
                    OpCode::Pong => {
                        handle.send_control(Outbound::Pong(Bytes::copy_from_slice(&frame.payload)))
                    }
                    OpCode::Close => {
                        let code = (frame.payload.len() >= 2)
                            .then(|| u16::from_be_bytes([frame.payload[0], frame.payload[1]]))
                            .filter(|c| {
                                (1000..5000).contains(c) && ![1004, 1005, 1006, 1015].contains(c)
                            })
                            .unwrap_or(1000);
                        // The answers held for the frames before the close go out before it.
                        handle.flush();
                        handle.close(code);
                    }
                    _ => {}
                }
                std::future::ready(Ok::<(), std::io::Error>(()))
            };
            let read = reader.read.read_frame(&mut obligated);
            tokio::pin!(read);
            match futures_util::poll!(read.as_mut()) {
                Poll::Ready(r) => r,
                Poll::Pending => {
                    reader.caller.release();
                    read.await
                }
            }
        };
        let frame = match read {
            Ok(f) => f,
            Err(WebSocketError::FrameTooLarge) => break close::TOO_BIG,
            Err(WebSocketError::InvalidUTF8) => break close::INVALID_UTF8,
            Err(_) => break 1000,
        };
        last_seen.store(
            reader.started.elapsed().as_millis() as u64,
            Ordering::Relaxed,
        );
        let frame = match reader.reassembly.push(frame) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => break e.close_code(),
        };
        let command = match frame.opcode {
            OpCode::Text | OpCode::Binary => {
                crate::telemetry::hot().frames_in.increment(1);
                let decoded = proto::client::decode(&frame.payload);
                drop(frame); // the command owns what it needs: neither is kept while it runs
                             // More bytes came with this frame: its answer waits for theirs.
                if reader.read.buffered() > 0 {
                    reader.caller.hold();
                }
                let r#ref = match &decoded {
                    Ok(inb) => inb.r#ref.clone(),
                    Err(e) => e.r#ref.clone(),
                };
                if !admit(&mut reader.admission, &reader.caller, r#ref) {
                    continue;
                }
                let span = match &decoded {
                    Ok(inb) => {
                        command_span(inb.command.name(), inb.command.room(), &reader.connect)
                    }
                    Err(_) => command_span("invalid", None, &reader.connect),
                };
                // Boxed: a command's future (joins, moderation, store calls) is many KB;
                // inline, every idle connection's task would carry room for it.
                Box::pin(
                    commands::handle(&reader.node, &mut reader.caller, decoded).instrument(span),
                )
            }
            OpCode::Close => break 1000,
            _ => continue,
        };
        command.await;
    };
    reader.caller.release();
    // The writer ends by sending the close frame (the first code asked for wins: one asked for
    // already, or this one); a client that stopped reading gets `writer::CLOSE_GRACE` to take
    // it, then the write gives up.
    reader.caller.handle.close(code);
}

/// One command's span: the root of its own trace (a session lasts hours; a trace per command
/// stays readable), following from the session's `connect` span.
fn command_span(
    name: &'static str,
    room: Option<&RoomId>,
    connect: &tracing::Span,
) -> tracing::Span {
    let span = tracing::info_span!(
        parent: None,
        "command",
        cmd = name,
        room = tracing::field::Empty,
    );
    if let Some(room) = room {
        span.record("room", tracing::field::display(room));
    }
    span.follows_from(connect);
    span
}

/// The per-connection token bucket. A rejected command is answered `rate_limited`; a client
/// that keeps flooding is closed with 1008.
fn admit(admission: &mut Admission, caller: &Caller, r#ref: Option<proto::Ref>) -> bool {
    match admission.limiter.check() {
        Ok(()) => {
            admission.strikes = 0;
            true
        }
        Err(not_until) => {
            use governor::clock::Clock;
            let wait = not_until.wait_time_from(admission.limiter.clock().now());
            admission.strikes += 1;
            metrics::counter!("chat_rate_limited_total").increment(1);
            if admission.strikes > MAX_STRIKES {
                caller.handle.close(close::POLICY);
            } else {
                caller.send(&ServerEvent::Error {
                    r#ref,
                    code: ErrorCode::RateLimited,
                    message: "too many commands".into(),
                    retry_after_ms: Some(wait.as_millis().max(1) as u64),
                });
            }
            false
        }
    }
}
