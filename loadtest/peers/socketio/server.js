// A Socket.IO 4 server of the same shape as the chat gateway's fan-out path, for the
// side-by-side benchmarks in docs/benchmarks.md (driven by `loadgen --target socketio`).
//
//   PORT=18100 node server.js                                   # one node, in-memory adapter
//   PORT=18101 REDIS_URL=redis://127.0.0.1:18089 node server.js # one of N nodes, Redis adapter
//
// Events (client -> server): "join" room  -> the socket joins the room, gets "joined" room
//                            "message" {room, content} -> "message" {room, id, seq, user,
//                            content, ts} to every socket in the room (sender included),
//                            through the adapter (Redis pub/sub when REDIS_URL is set).
// No auth (the gateway's JWT check is cheap next to the fan-out); a per-room counter stands in
// for seq (per node, not global: the gateway does more work here, not less).
'use strict';

const http = require('node:http');
const { Server } = require('socket.io');

const port = Number(process.env.PORT || 18100);
const host = process.env.HOST || '127.0.0.1';
const redisUrl = process.env.REDIS_URL;
const nodeId = process.env.NODE_ID || `sio-${port}`;

const httpServer = http.createServer((req, res) => {
  if (req.url === '/healthz') {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end('ok\n');
    return;
  }
  res.writeHead(404);
  res.end();
});

const io = new Server(httpServer, {
  transports: ['websocket'], // the generator speaks the websocket transport only
  serveClient: false,
  perMessageDeflate: false, // the gateway does not compress either
  maxHttpBufferSize: 64 * 1024, // same frame limit as the gateway
  cors: { origin: true },
});

const seqs = new Map();
let nextId = 0;

io.on('connection', (socket) => {
  const user = { id: socket.id, name: socket.id };
  socket.on('join', (room) => {
    if (typeof room !== 'string' || !/^[a-z0-9_-]{1,64}$/.test(room)) return;
    socket.join(room);
    socket.emit('joined', room);
  });
  socket.on('leave', (room) => {
    if (typeof room === 'string') socket.leave(room);
  });
  socket.on('message', (m) => {
    if (!m || typeof m.room !== 'string' || typeof m.content !== 'string') return;
    if (!socket.rooms.has(m.room) || m.content.length === 0 || m.content.length > 4000) return;
    const seq = (seqs.get(m.room) || 0) + 1;
    seqs.set(m.room, seq);
    io.to(m.room).emit('message', {
      room: m.room,
      id: `${nodeId}-${++nextId}`,
      seq,
      user,
      content: m.content,
      ts: new Date().toISOString(),
    });
  });
});

async function main() {
  if (redisUrl) {
    const { createClient } = require('redis');
    const { createAdapter } = require('@socket.io/redis-adapter');
    const pub = createClient({ url: redisUrl });
    const sub = pub.duplicate();
    await Promise.all([pub.connect(), sub.connect()]);
    io.adapter(createAdapter(pub, sub));
  }
  httpServer.listen(port, host, () => {
    console.log(`listening on ${host}:${port} (${redisUrl ? 'redis adapter' : 'in-memory adapter'})`);
  });
}

function shutdown() {
  io.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
