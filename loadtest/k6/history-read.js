// History reads: readers page backwards through ROOM's history with
// `GET /api/rooms/{room}/messages?before=<seq>&limit=LIMIT`, following `next_before` for up to
// PAGES pages, then start again from the newest page. The setup phase seeds SEED messages
// (over one websocket, honouring rate limits) unless SEED=0. Trend `page_read` (ms);
// threshold on its p95/p99 and on HTTP failures.
//
//   k6 run -e WS_URL=ws://127.0.0.1:18080 -e JWT_SECRET=... -e VUS=20 -e DURATION=60 \
//          -e ROOM=general -e SEED=0 loadtest/k6/history-read.js
//
// Env: ROOM (k6-history), SEED (100), VUS (5), DURATION (20 s), LIMIT (50), PAGES (10),
// P95_MS (100), P99_MS (250).
import http from 'k6/http';
import { check } from 'k6';
import { WebSocket } from 'k6/experimental/websockets';
import { setTimeout } from 'k6/timers';
import { Trend, Counter } from 'k6/metrics';
import { HTTP_URL, envInt, envStr, parse, token, wsUrl } from './lib/chat.js';

const ROOM = envStr('ROOM', 'k6-history');
const SEED = envInt('SEED', 100);
const LIMIT = envInt('LIMIT', 50);
const PAGES = envInt('PAGES', 10);
const SEED_SECONDS = envInt('SEED_SECONDS', Math.ceil(SEED / 15) + 5);

const pageRead = new Trend('page_read', true);
const pageMessages = new Counter('page_messages');
const seeded = new Counter('seeded_messages');

export const options = {
  scenarios: {
    seed: {
      executor: 'per-vu-iterations',
      exec: 'seed',
      vus: 1,
      iterations: 1,
      maxDuration: `${SEED_SECONDS + 30}s`,
    },
    read: {
      executor: 'constant-vus',
      exec: 'read',
      vus: envInt('VUS', 5),
      duration: `${envInt('DURATION', 20)}s`,
      startTime: `${SEED > 0 ? SEED_SECONDS : 0}s`,
    },
  },
  thresholds: {
    page_read: [`p(95)<${envInt('P95_MS', 100)}`, `p(99)<${envInt('P99_MS', 250)}`],
    'http_req_failed{name:history_page}': ['rate<0.01'],
    'checks{check:page ok}': ['rate>=0.99'],
    page_messages: ['count>0'],
  },
};

// Seeds SEED messages: one at a time, the next after the ack; waits when rate limited.
export function seed() {
  if (SEED <= 0) return;
  const ws = new WebSocket(wsUrl(token(`${envStr('USER_PREFIX', 'k6-history-')}writer`)));
  let n = 0;
  const next = () => {
    if (n >= SEED) {
      ws.close();
      return;
    }
    ws.send(JSON.stringify({ type: 'message', room: ROOM, content: `history ${n}`, ref: n }));
  };
  ws.onmessage = (e) => {
    const f = parse(e.data);
    if (!f) return;
    if (f.type === 'hello') ws.send(JSON.stringify({ type: 'join', room: ROOM, ref: 'join' }));
    else if (f.type === 'joined') next();
    else if (f.type === 'ack') {
      n++;
      seeded.add(1);
      next();
    } else if (f.type === 'error') {
      if (f.ref === 'join') {
        ws.close();
        return;
      }
      setTimeout(next, Math.min(f.retry_after_ms || 100, 2000));
    }
  };
}

const tokens = {};

export function read() {
  const user = `${envStr('USER_PREFIX', 'k6-history-')}reader${__VU}`;
  if (!tokens[user]) tokens[user] = token(user);
  const headers = { authorization: `Bearer ${tokens[user]}` };
  let before = null;
  for (let p = 0; p < PAGES; p++) {
    let url = `${HTTP_URL}/api/rooms/${ROOM}/messages?limit=${LIMIT}`;
    if (before !== null) url += `&before=${before}`;
    const res = http.get(url, { headers, tags: { name: 'history_page' } });
    const good = check(res, { 'page ok': (r) => r.status === 200 });
    if (!good) return;
    pageRead.add(res.timings.duration);
    const body = res.json();
    pageMessages.add((body.messages || []).length);
    if (body.next_before === null || body.next_before === undefined) return;
    before = body.next_before;
  }
}
