// Connect storm: new clients arrive at CONNECT_RATE per second for DURATION seconds; each
// connects (token check before the upgrade), waits for `hello`, joins one of ROOMS rooms,
// holds the connection HOLD seconds and leaves. Trends: `connect_hello` (upgrade → hello),
// `connect_joined` (upgrade → joined); Rate `connect_ok`.
//
//   k6 run -e WS_URL=ws://127.0.0.1:18080 -e JWT_SECRET=... -e CONNECT_RATE=200 \
//          -e DURATION=60 loadtest/k6/connect-storm.js
//
// Env: CONNECT_RATE (20/s), DURATION (20 s), HOLD (5 s), ROOMS (10), ROOM_PREFIX
// (k6-storm-), MAX_VUS (CONNECT_RATE × (HOLD + 5)), P95_MS (500), P99_MS (1000).
import { WebSocket } from 'k6/experimental/websockets';
import { setTimeout, clearTimeout } from 'k6/timers';
import { Rate, Trend } from 'k6/metrics';
import { envInt, envStr, parse, token, wsUrl } from './lib/chat.js';

const RATE = envInt('CONNECT_RATE', 20);
const DURATION = envInt('DURATION', 20);
const HOLD = envInt('HOLD', 5);
const ROOMS = envInt('ROOMS', 10);
const PREFIX = envStr('ROOM_PREFIX', 'k6-storm-');
// Users are shared by 8 connections each (the gateway allows 16 per user by default).
const USERS = Math.max(1, Math.ceil((RATE * (HOLD + 5)) / 8));

const hello = new Trend('connect_hello', true);
const joinedT = new Trend('connect_joined', true);
const ok = new Rate('connect_ok');

export const options = {
  scenarios: {
    storm: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: `${DURATION}s`,
      preAllocatedVUs: Math.min(envInt('MAX_VUS', RATE * (HOLD + 5)), RATE * 2 + 10),
      maxVUs: envInt('MAX_VUS', RATE * (HOLD + 5)),
    },
  },
  thresholds: {
    connect_ok: ['rate>=0.99'],
    connect_joined: [`p(95)<${envInt('P95_MS', 500)}`, `p(99)<${envInt('P99_MS', 1000)}`],
  },
};

// One token per user, fetched once per VU (token fetch is not what this script measures).
const tokens = {};

export default function () {
  const u = (__VU - 1) % USERS;
  const user = `${envStr('USER_PREFIX', 'k6-storm-')}${u}`;
  if (!tokens[user]) tokens[user] = token(user);
  const room = `${PREFIX}${Math.floor(Math.random() * ROOMS)}`;
  const t0 = Date.now();
  let done = false;
  const ws = new WebSocket(wsUrl(tokens[user]));
  const fail = () => {
    if (!done) {
      done = true;
      ok.add(false);
    }
  };
  const guard = setTimeout(() => {
    fail();
    ws.close();
  }, 10000);
  ws.onmessage = (e) => {
    const f = parse(e.data);
    if (!f) return;
    if (f.type === 'hello') {
      hello.add(Date.now() - t0);
      ws.send(JSON.stringify({ type: 'join', room, ref: 'join' }));
    } else if (f.type === 'joined' && !done) {
      done = true;
      joinedT.add(Date.now() - t0);
      ok.add(true);
      clearTimeout(guard);
      setTimeout(() => ws.close(), HOLD * 1000);
    } else if (f.type === 'error' && f.ref === 'join') {
      fail();
      ws.close();
    }
  };
  ws.onerror = () => {
    fail();
  };
  ws.onclose = () => {
    clearTimeout(guard);
    fail();
  };
}

