// Fan-out: ROOMS rooms × MEMBERS members; SENDERS members per room post RATE messages/s each.
// Every message carries its send time (`k6:<ms>`); every member records the delivery latency
// (Trend `delivery_latency`) and, from the room's gap-free `seq`, whether any message was
// missed (Rate `delivered`). Senders also count acks against sends.
//
//   k6 run -e WS_URL=ws://127.0.0.1:18080 -e JWT_SECRET=... -e ROOMS=10 -e MEMBERS=50 \
//          -e SENDERS=1 -e RATE=5 -e DURATION=60 loadtest/k6/chat-fanout.js
//
// Env: ROOMS (10), MEMBERS per room (20), SENDERS per room (1), RATE msgs/s per sender (2),
// DURATION seconds (30), WARMUP seconds before sending (3), ROOM_PREFIX (k6-fanout-),
// P95_MS (50), P99_MS (100), MIN_DELIVERED (0.999); see lib/chat.js for URL and token settings.
import { WebSocket } from 'k6/experimental/websockets';
import { setInterval, clearInterval, setTimeout } from 'k6/timers';
import { Counter, Rate, Trend } from 'k6/metrics';
import { check } from 'k6';
import { envInt, envStr, parse, roomSeq, token, wsUrl } from './lib/chat.js';

const ROOMS = envInt('ROOMS', 10);
const MEMBERS = envInt('MEMBERS', 20);
const SENDERS = envInt('SENDERS', 1);
const RATE = envInt('RATE', 2);
const DURATION = envInt('DURATION', 30);
const WARMUP = envInt('WARMUP', 3);
const PREFIX = envStr('ROOM_PREFIX', 'k6-fanout-');

const latency = new Trend('delivery_latency', true);
const delivered = new Rate('delivered');
const sent = new Counter('messages_sent');
const acked = new Counter('messages_acked');
const received = new Counter('messages_received');
const errors = new Counter('chat_errors');
const joined = new Rate('joined_ok');

export const options = {
  scenarios: {
    fanout: {
      executor: 'per-vu-iterations',
      vus: ROOMS * MEMBERS,
      iterations: 1,
      maxDuration: `${DURATION + WARMUP + 60}s`,
    },
  },
  thresholds: {
    delivery_latency: [`p(95)<${envInt('P95_MS', 50)}`, `p(99)<${envInt('P99_MS', 100)}`],
    delivered: [`rate>=${envStr('MIN_DELIVERED', '0.999')}`],
    joined_ok: ['rate>=0.99'],
    messages_received: ['count>0'],
    chat_errors: ['count==0'],
  },
};

export default function () {
  const n = __VU - 1;
  const room = `${PREFIX}${n % ROOMS}`;
  const isSender = Math.floor(n / ROOMS) < SENDERS;
  const user = `${envStr('USER_PREFIX', 'k6-fanout-')}${n}`;
  const ws = new WebSocket(wsUrl(token(user)));
  let lastSeq = null;
  let timer = null;
  let ref = 0;

  ws.onmessage = (e) => {
    const f = parse(e.data);
    if (!f) return;
    // Any stored room event moves the seq (the room's creation by a concurrent joiner, for
    // one); only a seq that never arrived is a missed delivery.
    const seq = roomSeq(f, room);
    if (seq !== null) {
      if (lastSeq !== null && seq > lastSeq + 1) {
        for (let i = lastSeq + 1; i < seq; i++) delivered.add(false);
      }
      if (lastSeq === null || seq > lastSeq) lastSeq = seq;
    }
    switch (f.type) {
      case 'hello':
        ws.send(JSON.stringify({ type: 'join', room, ref: 'join' }));
        break;
      case 'joined':
        joined.add(true);
        lastSeq = f.seq;
        if (isSender) {
          setTimeout(() => {
            timer = setInterval(() => {
              ws.send(JSON.stringify({ type: 'message', room, content: `k6:${Date.now()}`, ref: ++ref }));
              sent.add(1);
            }, 1000 / RATE);
          }, WARMUP * 1000);
        }
        // Everyone leaves at the same time; senders stop 2 s before to let the last arrive.
        setTimeout(() => timer !== null && clearInterval(timer), (WARMUP + DURATION - 2) * 1000);
        setTimeout(() => ws.close(), (WARMUP + DURATION) * 1000);
        break;
      case 'message': {
        if (f.room !== room) return;
        delivered.add(true);
        received.add(1);
        const m = /^k6:(\d+)$/.exec(f.content || '');
        if (m) latency.add(Date.now() - Number(m[1]));
        break;
      }
      case 'ack':
        acked.add(1);
        break;
      case 'error':
        errors.add(1, { code: f.code });
        if (f.ref === 'join') {
          joined.add(false);
          ws.close();
        }
        break;
    }
  };
  ws.onerror = (e) => {
    errors.add(1, { code: 'socket' });
    check(e, { 'socket without error': () => false });
  };
}
