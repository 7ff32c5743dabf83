// A uWebSockets.js relay speaking the benchmark subset of the chat protocol, for the
// side-by-side benchmarks in docs/benchmarks.md (driven by `loadgen --target chat`, exactly as
// the gateway is). An upper bound for a raw relay: no persistence, no recovery, no permissions.
//
//   PORT=18200 node server.js                                   # one process
//   PORT=18201 REDIS_URL=redis://127.0.0.1:18289 node server.js # one of N processes
//
// Wire (text frames, JSON):
//   GET /ws?token=<JWT>  -> {"type":"hello",...}; with JWT_SECRET set the HS256 token is
//                           verified (signature, exp) as the gateway does, else any token is
//                           taken and only its payload is read (sub, name)
//   join {room, ref}     -> joined {ref, room:{id}, seq} (seq: this process's last seq there)
//   message {room, content, ref} -> ack {ref, id, seq, ts} to the sender, and
//                           message {room, id, seq, user, content, ts} to every member
//                           (sender included) on every process
//   leave {room, ref}    -> left {ref, room};  ping -> pong;  anything else -> error
//
// Fan-out: each room is a uWS topic; a message is published to the local topic at once (uWS
// buffers a turn's writes per socket and sends them with one syscall at the end of the turn)
// and, with REDIS_URL, to the Redis channel of the room ("uws:room:<id>") prefixed with this
// process's id. A process subscribes to a room's channel while it has local members there and
// relays what other processes published into its local topic. seq is a per-process,
// per-room counter (not global: an upper bound does less work, not more).
'use strict';

const crypto = require('node:crypto');
const uWS = require('uwebsockets');

const port = Number(process.env.PORT || 18200);
const host = process.env.HOST || '127.0.0.1';
const redisUrl = process.env.REDIS_URL;
const nodeId = process.env.NODE_ID || `uws-${port}`;
const secret = process.env.JWT_SECRET ? Buffer.from(process.env.JWT_SECRET) : null;

// Limits, as the gateway's defaults.
const MAX_FRAME_BYTES = 64 * 1024;
const MAX_CONTENT_CHARS = 4000;
const MAX_ROOMS_PER_CONNECTION = 100;
const ROOM_ID = /^[a-z0-9_-]{1,64}$/;
// A reader that falls this far behind is skipped by publishes (uWS drops, and the generator
// counts the loss), never allowed to grow memory without bound.
const MAX_BACKPRESSURE = 4 * 1024 * 1024;

const seqs = new Map();
let nextId = 0;
let nextSession = 0;
let pub = null;
let sub = null;
const prefix = Buffer.from(`${nodeId}|`);

function channel(room) {
  return `uws:room:${room}`;
}

// The identity in a token: verified with JWT_SECRET, else read as given.
function identity(token) {
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  let header;
  let claims;
  try {
    header = JSON.parse(Buffer.from(parts[0], 'base64url').toString());
    claims = JSON.parse(Buffer.from(parts[1], 'base64url').toString());
  } catch {
    return null;
  }
  if (typeof claims.sub !== 'string' || claims.sub.length === 0) return null;
  if (secret) {
    if (header.alg !== 'HS256') return null;
    const want = crypto.createHmac('sha256', secret).update(`${parts[0]}.${parts[1]}`).digest();
    const got = Buffer.from(parts[2], 'base64url');
    if (got.length !== want.length || !crypto.timingSafeEqual(got, want)) return null;
    if (typeof claims.exp !== 'number' || claims.exp * 1000 <= Date.now()) return null;
  }
  const name = typeof claims.name === 'string' ? claims.name : claims.sub;
  return { id: claims.sub, name };
}

function send(ws, obj) {
  ws.send(JSON.stringify(obj), false, false);
}

function error(ws, ref, code, message) {
  send(ws, { type: 'error', ref, code, message });
}

const app = uWS.App();

app.ws('/ws', {
  maxPayloadLength: MAX_FRAME_BYTES,
  maxBackpressure: MAX_BACKPRESSURE,
  idleTimeout: 120,
  sendPingsAutomatically: true,
  compression: uWS.DISABLED,

  upgrade: (res, req, context) => {
    // Everything read from req must be read before this handler returns.
    const user = identity(req.getQuery('token') || '');
    if (!user) {
      res
        .writeStatus('401 Unauthorized')
        .writeHeader('content-type', 'application/json')
        .end('{"error":{"code":"unauthorized","message":"missing or invalid token"}}');
      return;
    }
    res.upgrade(
      { user, rooms: new Set() },
      req.getHeader('sec-websocket-key'),
      req.getHeader('sec-websocket-protocol'),
      req.getHeader('sec-websocket-extensions'),
      context,
    );
  },

  open: (ws) => {
    send(ws, {
      type: 'hello',
      session_id: `${nodeId}-${++nextSession}`,
      user: ws.getUserData().user,
      node: nodeId,
      heartbeat_s: 25,
      limits: { max_frame_bytes: MAX_FRAME_BYTES, max_content_chars: MAX_CONTENT_CHARS },
    });
  },

  message: (ws, data, isBinary) => {
    let cmd;
    try {
      cmd = JSON.parse(Buffer.from(data).toString());
    } catch {
      error(ws, null, 'invalid', 'frame is not JSON');
      return;
    }
    if (isBinary || !cmd || typeof cmd !== 'object') {
      error(ws, null, 'invalid', 'expected a JSON object in a text frame');
      return;
    }
    const ref = cmd.ref ?? null;
    const me = ws.getUserData();
    switch (cmd.type) {
      case 'join': {
        if (typeof cmd.room !== 'string' || !ROOM_ID.test(cmd.room)) {
          error(ws, ref, 'invalid', 'room must be 1-64 of [a-z0-9_-]');
          return;
        }
        if (!me.rooms.has(cmd.room) && me.rooms.size >= MAX_ROOMS_PER_CONNECTION) {
          error(ws, ref, 'invalid', `at most ${MAX_ROOMS_PER_CONNECTION} rooms per connection`);
          return;
        }
        me.rooms.add(cmd.room);
        ws.subscribe(cmd.room);
        send(ws, { type: 'joined', ref, room: { id: cmd.room }, seq: seqs.get(cmd.room) || 0 });
        return;
      }
      case 'leave': {
        if (me.rooms.delete(cmd.room)) ws.unsubscribe(cmd.room);
        send(ws, { type: 'left', ref, room: cmd.room });
        return;
      }
      case 'message': {
        const { room, content } = cmd;
        if (typeof room !== 'string' || !me.rooms.has(room)) {
          error(ws, ref, 'forbidden', 'join the room first');
          return;
        }
        if (typeof content !== 'string' || content.length === 0 || content.length > MAX_CONTENT_CHARS) {
          error(ws, ref, 'invalid', `content must be 1-${MAX_CONTENT_CHARS} characters`);
          return;
        }
        const seq = (seqs.get(room) || 0) + 1;
        seqs.set(room, seq);
        const id = `${nodeId}-${++nextId}`;
        const ts = new Date().toISOString();
        const frame = JSON.stringify({ type: 'message', room, id, seq, user: me.user, content, ts });
        send(ws, { type: 'ack', ref, id, seq, ts });
        app.publish(room, frame, false, false);
        if (pub) pub.publish(channel(room), Buffer.concat([prefix, Buffer.from(frame)])).catch(relayFailed);
        return;
      }
      case 'ping':
        send(ws, { type: 'pong', ref });
        return;
      default:
        error(ws, ref, 'invalid', 'unknown type');
    }
  },

  // newCount is the topic's number of local subscribers: follow the room's Redis channel
  // while this process has members there (uWS unsubscribes closed sockets itself).
  subscription: (ws, topic, newCount, oldCount) => {
    if (!sub) return;
    const room = Buffer.from(topic).toString();
    if (oldCount === 0 && newCount > 0) {
      sub.subscribe(channel(room), (msg) => relay(room, msg), true).catch(relayFailed);
    } else if (oldCount > 0 && newCount === 0) {
      sub.unsubscribe(channel(room)).catch(relayFailed);
    }
  },
});

// A message another process published: into the local topic, unless it was our own.
function relay(room, msg) {
  if (msg.length > prefix.length && msg.subarray(0, prefix.length).equals(prefix)) return;
  const bar = msg.indexOf(0x7c); // '|'
  if (bar < 0) return;
  app.publish(room, msg.subarray(bar + 1), false, false);
}

function relayFailed(e) {
  console.error(`redis: ${e.message}`);
}

app.get('/healthz', (res) => {
  res.end('ok\n');
});
app.any('/*', (res) => {
  res.writeStatus('404 Not Found').end();
});

async function main() {
  if (redisUrl) {
    const { createClient } = require('redis');
    pub = createClient({ url: redisUrl });
    sub = pub.duplicate();
    pub.on('error', relayFailed);
    sub.on('error', relayFailed);
    await Promise.all([pub.connect(), sub.connect()]);
  }
  app.listen(host, port, (token) => {
    if (!token) {
      console.error(`cannot listen on ${host}:${port}`);
      process.exit(2);
    }
    const auth = secret ? 'HS256 verified' : 'tokens not verified';
    console.log(`listening on ${host}:${port} (${redisUrl ? 'redis pub/sub' : 'one process'}; ${auth})`);
  });
}

function shutdown() {
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
