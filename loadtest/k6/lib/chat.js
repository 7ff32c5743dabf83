// Shared helpers of the k6 scripts: configuration from the environment and client tokens.
//
//   WS_URL      ws://127.0.0.1:8080          the load balancer (or one gateway): its base
//                                            (ws://host:port) or its endpoint (…/ws)
//   HTTP_URL    derived from WS_URL           for /api/... (http://host:port)
//   JWT_SECRET  unset                         sign HS256 tokens locally with the server's secret
//   TOKEN_URL   HTTP_URL + /api/dev/token     else fetch tokens here (servers on their dev key)
//   USER_PREFIX k6-<script>-                  user ids are PREFIX<n>
import http from 'k6/http';
import crypto from 'k6/crypto';
import encoding from 'k6/encoding';

// The base both URLs are built on: WS_URL without a trailing `/ws` (deploy/local/cluster.sh's
// CLUSTER_WS_URL names the endpoint itself; a bare ws://host:port works too).
const BASE_URL = (__ENV.WS_URL || 'ws://127.0.0.1:8080').replace(/\/+$/, '').replace(/\/ws$/, '');
export const HTTP_URL = (__ENV.HTTP_URL || BASE_URL.replace(/^ws/, 'http')).replace(/\/+$/, '');
const JWT_SECRET = __ENV.JWT_SECRET || '';
const TOKEN_URL = __ENV.TOKEN_URL || `${HTTP_URL}/api/dev/token`;

export function envInt(name, dflt) {
  const v = __ENV[name];
  if (v === undefined || v === '') return dflt;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new Error(`${name} must be a number, got ${v}`);
  return n;
}

export function envStr(name, dflt) {
  const v = __ENV[name];
  return v === undefined || v === '' ? dflt : v;
}

/** A token for user `sub`: HS256-signed with JWT_SECRET, or from the dev token endpoint. */
export function token(sub) {
  if (JWT_SECRET) {
    const b64 = (s) => encoding.b64encode(s, 'rawurl');
    const head = b64(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
    const body = b64(JSON.stringify({ sub, name: sub, exp: Math.floor(Date.now() / 1000) + 6 * 3600 }));
    const sig = crypto.hmac('sha256', JWT_SECRET, `${head}.${body}`, 'base64rawurl');
    return `${head}.${body}.${sig}`;
  }
  const res = http.post(TOKEN_URL, JSON.stringify({ name: sub }), {
    headers: { 'content-type': 'application/json' },
    tags: { name: 'dev_token' },
  });
  if (res.status !== 200) {
    throw new Error(`POST ${TOKEN_URL}: HTTP ${res.status} (set JWT_SECRET when the server has a real key)`);
  }
  return res.json('token');
}

export function wsUrl(tok) {
  return `${BASE_URL}/ws?token=${encodeURIComponent(tok)}`;
}

/** Parses a server frame; null when it is not JSON. */
export function parse(data) {
  try {
    return JSON.parse(data);
  } catch (_) {
    return null;
  }
}

/** Frames that carry a seq but are not room events: answers and read markers. */
const NOT_ROOM_EVENTS = new Set(['joined', 'ack', 'receipt', 'error']);

/**
 * The id of the room a frame is about: `room` is the id in most events, but the room's
 * settings object (with `id`) in `room_created`, `room_updated` and `joined`.
 */
export function roomId(f) {
  return f.room !== null && typeof f.room === 'object' ? f.room.id : f.room;
}

/**
 * The room seq a frame holds when it is a stored room event of `room` (a message, an edit, a
 * pin, `room_created`, a moderation event…), else null. Gap checks must follow every stored
 * event, not only messages: the seq counts them all. (Reading `room` as a plain id missed
 * `room_created`: a reader whose first join read the room's seq before the creator published
 * it got `joined.seq` 0, then `room_created` with seq 1, and counted the first message as a
 * gap.)
 */
export function roomSeq(f, room) {
  return roomId(f) === room && typeof f.seq === 'number' && !NOT_ROOM_EVENTS.has(f.type) ? f.seq : null;
}
