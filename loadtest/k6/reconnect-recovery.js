// Reconnect and recovery: SENDERS clients post to ROOM at RATE messages/s each; READERS
// clients follow the room, drop their connection every DROP_EVERY seconds (± jitter), stay
// away OFFLINE seconds, and rejoin with `since` = the last seq they saw. The server must
// replay exactly what they missed (`joined.recovered: true`, no seq gap). Counters:
// `recovery_gaps` (missing seqs over all readers) and `duplicates` (a seq received twice or
// out of order), both must be 0; Rates
// `recovered` (joined after a drop said recovered: true) and `rejoin_ok`.
//
//   k6 run -e WS_URL=ws://127.0.0.1:18080 -e JWT_SECRET=... -e READERS=50 \
//          -e DURATION=60 loadtest/k6/reconnect-recovery.js
//
// Env: ROOM (k6-recovery-<timestamp>), SENDERS (1), RATE (5/s per sender), READERS (10),
// DURATION (20 s), DROP_EVERY (4 s), OFFLINE (1 s). Keep RATE × SENDERS × OFFLINE well under
// the server's recovery window (CHAT_RECOVERY_WINDOW, 1000 events by default).
import { WebSocket } from 'k6/experimental/websockets';
import { setInterval, clearInterval, setTimeout } from 'k6/timers';
import { Counter, Rate } from 'k6/metrics';
import { envInt, envStr, parse, roomSeq, token, wsUrl } from './lib/chat.js';

const SENDERS = envInt('SENDERS', 1);
const RATE = envInt('RATE', 5);
const READERS = envInt('READERS', 10);
const DURATION = envInt('DURATION', 20);
const DROP_EVERY = envInt('DROP_EVERY', 4);
const OFFLINE = envInt('OFFLINE', 1);

const gaps = new Counter('recovery_gaps');
const dups = new Counter('duplicates');
const recovered = new Rate('recovered');
const rejoin = new Rate('rejoin_ok');
const received = new Counter('messages_received');
const sent = new Counter('messages_sent');

export const options = {
  scenarios: {
    readers: {
      executor: 'per-vu-iterations',
      exec: 'reader',
      vus: READERS,
      iterations: 1,
      maxDuration: `${DURATION + 60}s`,
    },
    senders: {
      executor: 'per-vu-iterations',
      exec: 'sender',
      vus: SENDERS,
      iterations: 1,
      startTime: '1s',
      maxDuration: `${DURATION + 60}s`,
    },
  },
  thresholds: {
    recovery_gaps: ['count==0'],
    duplicates: ['count==0'],
    recovered: ['rate>=0.99'],
    rejoin_ok: ['rate>=0.99'],
    messages_received: ['count>0'],
  },
};

export function setup() {
  return { room: envStr('ROOM', `k6-recovery-${Date.now() % 1000000000}`) };
}

export function sender(data) {
  const user = `${envStr('USER_PREFIX', 'k6-recovery-')}s${__VU}`;
  const ws = new WebSocket(wsUrl(token(user)));
  let timer = null;
  ws.onmessage = (e) => {
    const f = parse(e.data);
    if (!f) return;
    if (f.type === 'hello') ws.send(JSON.stringify({ type: 'join', room: data.room }));
    if (f.type === 'joined') {
      timer = setInterval(() => {
        ws.send(JSON.stringify({ type: 'message', room: data.room, content: `k6:${Date.now()}` }));
        sent.add(1);
      }, 1000 / RATE);
      // Stop before the readers do, so that their last rejoin sees everything.
      setTimeout(() => {
        clearInterval(timer);
        ws.close();
      }, Math.max(1, DURATION - 3) * 1000);
    }
  };
}

export function reader(data) {
  const user = `${envStr('USER_PREFIX', 'k6-recovery-')}r${__VU}`;
  const tok = token(user);
  const end = Date.now() + DURATION * 1000;
  let lastSeq = null; // survives reconnects: that is the point
  let drops = 0;

  const connect = () => {
    const ws = new WebSocket(wsUrl(tok));
    const rejoining = lastSeq !== null;
    let isJoined = false;
    ws.onmessage = (e) => {
      const f = parse(e.data);
      if (!f) return;
      if (f.type === 'hello') {
        const join = { type: 'join', room: data.room, ref: 'join' };
        if (rejoining) join.since = lastSeq;
        ws.send(JSON.stringify(join));
      } else if (roomSeq(f, data.room) !== null) {
        // Replayed events arrive before `joined`, live ones after; both advance lastSeq. Every
        // stored event counts (the seq numbers them all), messages are also counted received.
        if (lastSeq !== null && f.seq <= lastSeq) {
          dups.add(1);
        } else {
          if (lastSeq !== null && f.seq > lastSeq + 1) gaps.add(f.seq - lastSeq - 1);
          lastSeq = f.seq;
          if (f.type === 'message') received.add(1);
        }
      } else if (f.type === 'joined') {
        isJoined = true;
        if (rejoining) {
          rejoin.add(true);
          recovered.add(f.recovered === true);
        }
        if (lastSeq === null || f.seq > lastSeq) {
          // First join: start from the room's current seq. A rejoin whose replay did not
          // reach `seq` has a gap (counted when the next message arrives, or here).
          if (lastSeq !== null && rejoining && f.recovered === true && f.seq > lastSeq) {
            gaps.add(f.seq - lastSeq);
          }
          lastSeq = f.seq;
        }
        const stay = DROP_EVERY * 1000 * (0.5 + Math.random());
        setTimeout(() => {
          drops++;
          ws.close();
        }, Math.min(stay, Math.max(0, end - Date.now())));
      } else if (f.type === 'error' && f.ref === 'join') {
        if (rejoining) rejoin.add(false);
        ws.close();
      }
    };
    ws.onclose = () => {
      if (!isJoined && rejoining) rejoin.add(false);
      if (Date.now() + OFFLINE * 1000 < end) setTimeout(connect, OFFLINE * 1000);
    };
  };
  connect();
}
