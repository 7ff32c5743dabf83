// Chat web client: one ES module, no build step, same origin only.
//
// Layout of this file:
//   1. constants and small helpers (DOM builder, JWT payload decode, ids)
//   2. state: the session, the rooms (each with its own ordered timeline of items)
//   3. connection: WebSocket, heartbeat, backoff + jitter, drain (`reconnect` frame)
//   4. frame handlers, one per server frame `type`
//   5. history (HTTP): first page, older pages (infinite scroll), gap fill after reconnect
//   6. rendering: room list, header, timeline, pins, typing line, members, composer
//   7. user actions: sign-in, send, typing, read markers, menus, create room
//
// Safety rule: user data only ever reaches the DOM as text (textContent, text nodes,
// attribute values). The only innerHTML used is for constant SVG icons.

const TOKEN_KEY = 'chat.token';
const ROOMS_KEY = 'chat.rooms';
const CURRENT_KEY = 'chat.current';

const BACKOFF_START_MS = 500;
const BACKOFF_CAP_MS = 15000;
const OFFLINE_AFTER_ATTEMPTS = 5; // failed reconnects (about 15 s) before the dot turns red
const TYPING_REPEAT_MS = 3000;
const TYPING_IDLE_MS = 2000;
const TYPING_EXPIRE_MS = 5000;
const READ_DEBOUNCE_MS = 500;
const ACK_TIMEOUT_MS = 15000;
const PAGE_SIZE = 50;
const GAP_PAGE_SIZE = 100;
const GAP_MAX_PAGES = 20;
const PENDING_KEY_BASE = 1e15; // pending (unacked) messages sort after every real seq
const EDGE_KEY = -Infinity;

// ---------------------------------------------------------------------------
// 1. helpers

const $ = (sel, root = document) => root.querySelector(sel);

/** Build an element. Children that are strings become text nodes (never parsed as HTML). */
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  if (props) {
    for (const [k, v] of Object.entries(props)) {
      if (v == null || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'text') el.textContent = v;
      else if (k === 'dataset') { for (const [dk, dv] of Object.entries(v)) if (dv != null) el.dataset[dk] = String(dv); }
      else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
  }
  for (const c of children.flat()) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

/** replaceChildren() that skips null/false (the DOM would render them as the text "null"). */
function fill(node, ...kids) {
  node.replaceChildren(...kids.flat().filter((k) => k != null && k !== false));
}

const ICONS = {
  public: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M5 9h14M5 15h14M10 4l-2 16M16 4l-2 16"/></svg>',
  private: '<svg viewBox="0 0 24 24" aria-hidden="true"><rect x="5" y="11" width="14" height="9" rx="2"/><path d="M8 11V8a4 4 0 0 1 8 0v3"/></svg>',
  restricted: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M2 12s3.6-6 10-6 10 6 10 6-3.6 6-10 6S2 12 2 12z"/><circle cx="12" cy="12" r="2.5"/></svg>',
  more: '<svg viewBox="0 0 24 24" aria-hidden="true"><circle cx="5" cy="12" r="1.6"/><circle cx="12" cy="12" r="1.6"/><circle cx="19" cy="12" r="1.6"/></svg>',
  pin: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M9 4h6l-1 6 3 3H7l3-3-1-6zM12 13v7"/></svg>',
};
function icon(name, cls = 'icon') {
  const span = h('span', { class: cls, 'aria-hidden': 'true' });
  span.innerHTML = ICONS[name] || ''; // constant markup only
  return span;
}

const VIS_LABEL = { public: 'Public room', private: 'Private room', restricted: 'Restricted room' };
const VIS_HINT = {
  public: 'Listed; anyone may join, read and post.',
  restricted: 'Listed; anyone may join and read, only members added by an admin may post.',
  private: 'Listed only to members; only members added by an admin may join.',
};

function decodeJwtPayload(token) {
  try {
    const part = token.split('.')[1];
    if (!part) return null;
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '=');
    const bin = atob(b64);
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    return null;
  }
}

function uuid() {
  if (globalThis.crypto?.randomUUID) {
    try { return crypto.randomUUID(); } catch { /* insecure context: fall through */ }
  }
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function fmtTime(ts) {
  if (!ts) return '';
  const d = new Date(ts);
  return Number.isNaN(d.getTime()) ? '' : d.toLocaleTimeString();
}
function fmtFull(ts) {
  const d = new Date(ts);
  return Number.isNaN(d.getTime()) ? '' : d.toLocaleString();
}

function hueOf(str) {
  let x = 0;
  for (const ch of String(str)) x = (x * 31 + ch.codePointAt(0)) >>> 0;
  return x % 360;
}
function avatar(user, cls = 'avatar') {
  const name = user?.name || user?.id || '?';
  const el = h('span', { class: cls, 'aria-hidden': 'true' }, [...name][0].toUpperCase());
  el.style.setProperty('--hue', String(hueOf(user?.id || name)));
  return el;
}

const validRoomId = (id) => typeof id === 'string' && /^[a-z0-9_-]{1,64}$/.test(id);

function slugify(s) {
  return s.toLowerCase().normalize('NFKD').replace(/[\u0300-\u036f]/g, '')
    .replace(/[^a-z0-9_-]+/g, '-').replace(/^-+|-+$/g, '').slice(0, 64);
}

function plural(n, one, many) { return `${n} ${n === 1 ? one : many}`; }

// ---------------------------------------------------------------------------
// 2. state

const S = {
  token: null,
  claims: null,
  me: { id: '', name: '' },
  globalAdmin: false,
  ws: null,
  conn: 'offline', // connected | reconnecting | offline
  gotHello: false,
  attempt: 0,
  failedHandshakes: 0,
  reconnectTimer: null,
  moveAt: 0, // drain: reconnect no earlier than this (ms epoch)
  moveTimer: null,
  heartbeatTimer: null,
  lastFrameAt: 0,
  heartbeatS: 25,
  limits: {},
  rooms: new Map(),
  roomsLoaded: false,
  current: null,
  users: new Map(), // id -> display name
  refs: new Map(), // ref -> { kind, room, msg?, ... }
  unsupported: new Set(), // background commands this server refused as unknown
  refSeq: 0,
  pendingSeq: 0,
  typing: null, // my own typing state { room, sentAt, idle }
  readTimer: null,
  pendingCreate: null,
  openMenu: null,
  editing: null,
};

function newRoom(id) {
  return {
    id,
    name: id,
    topic: '',
    visibility: 'public',
    member_count: null,
    online_count: 0,
    max_members: null,
    members_can_pin: false,
    unread: 0,
    role: null,
    want: false, // the user wants to be in this room (re-joined on reconnect)
    joined: false, // the server confirmed with `joined` on the current socket
    joining: false,
    banned: false,
    mutedMe: false,
    mutedUntil: null,
    synced: false, // the timeline is complete from some point up to lastSeq
    lastSeq: 0,
    readSent: 0,
    items: [], // sorted by key; {key, kind:'msg'|'sys'|'edge', el, msg?}
    byId: new Map(),
    pending: new Map(), // client_msg_id -> msg
    sysSeen: new Set(),
    sysBase: -1,
    sysN: 0,
    nextBefore: undefined, // undefined: unknown, null: reached the start
    olderPromise: null,
    online: new Map(), // id -> name
    members: new Map(), // id -> {id,name,role,muted_until}
    pins: [], // [{id, seq, user, content, by, pinnedAt}], most recent first
    markers: new Map(), // user id -> seq
    typing: new Map(), // user id -> {name, timer}
    draft: '',
    scrollTop: null,
    atBottom: true,
    newCount: 0,
    edgeEl: null,
  };
}

function getRoom(id, create = true) {
  if (id == null) return null;
  id = String(id);
  let r = S.rooms.get(id);
  if (!r && create) { r = newRoom(id); S.rooms.set(id, r); }
  return r || null;
}
const cur = () => (S.current ? S.rooms.get(S.current) || null : null);

function normUser(u) {
  if (u == null) return { id: '', name: '' };
  if (typeof u === 'string' || typeof u === 'number') {
    const id = String(u);
    return { id, name: S.users.get(id) || id };
  }
  const id = String(u.id ?? u.user_id ?? u.sub ?? '');
  const name = u.name || u.display_name || S.users.get(id) || id;
  return { id, name };
}
function rememberUser(u) {
  if (u?.id && u.name && u.name !== u.id) S.users.set(u.id, u.name);
  else if (u?.id && !S.users.has(u.id)) S.users.set(u.id, u.name || u.id);
}
const nameOf = (id) => S.users.get(String(id)) || String(id);

function normMsg(m, roomId) {
  const user = normUser(m.user ?? (m.user_id != null ? { id: m.user_id, name: m.user_name ?? m.name } : null));
  rememberUser(user);
  return {
    room: String(m.room ?? roomId),
    id: m.id != null ? String(m.id) : null,
    seq: typeof m.seq === 'number' ? m.seq : (m.seq != null ? Number(m.seq) : null),
    ts: m.ts ?? m.created_at ?? null,
    user,
    content: m.deleted ? '' : (m.content ?? ''),
    editedAt: m.edited_at ?? (m.edited ? true : null),
    deleted: !!m.deleted,
    replyTo: m.reply_to != null ? String(m.reply_to) : null,
    clientId: m.client_msg_id ?? null,
    status: 'sent',
    ref: null,
    el: null,
    item: null,
  };
}

function roomAdmin(room) {
  return S.globalAdmin || room?.role === 'owner' || room?.role === 'admin';
}
function canPin(room) {
  return roomAdmin(room) || (!!room?.members_can_pin && !!room?.joined);
}
const isMine = (msg) => !!S.me.id && msg.user.id === S.me.id;

function saveRooms() {
  const want = [...S.rooms.values()].filter((r) => r.want).map((r) => r.id);
  try {
    sessionStorage.setItem(ROOMS_KEY, JSON.stringify(want));
    if (S.current) sessionStorage.setItem(CURRENT_KEY, S.current);
    else sessionStorage.removeItem(CURRENT_KEY);
  } catch { /* storage full or disabled */ }
}

// ---------------------------------------------------------------------------
// DOM references

const el = {};
function bindElements() {
  for (const id of [
    'login-screen', 'login-form', 'login-sub', 'login-name', 'login-name-group', 'login-token', 'login-token-group',
    'login-error', 'login-button', 'login-mode-toggle', 'app', 'sidebar', 'scrim', 'sidebar-toggle', 'sidebar-close',
    'room-list', 'create-room-button', 'me', 'me-avatar', 'me-name', 'me-role', 'signout-button', 'main', 'room-name',
    'room-topic', 'conn-dot', 'conn-label', 'members-toggle', 'online-count', 'online-avatars', 'leave-button', 'delete-room-button',
    'notice-banner', 'notice-dismiss', 'pinned-bar', 'pinned-items', 'message-list', 'empty-state',
    'new-messages-button', 'typing-line', 'composer-form', 'composer', 'send-button', 'join-button',
    'members-panel', 'members-close', 'online-users', 'create-room-dialog', 'create-room-form', 'new-room-name',
    'new-room-id', 'new-room-visibility', 'new-room-visibility-hint', 'new-room-topic', 'new-room-max',
    'create-room-error', 'create-room-cancel', 'create-room-submit', 'toasts',
  ]) {
    el[id.replace(/-([a-z])/g, (_, c) => c.toUpperCase())] = document.getElementById(id);
  }
}

// ---------------------------------------------------------------------------
// 3. connection

function setConn(state, detail) {
  S.conn = state;
  document.body.dataset.conn = state;
  const labels = { connected: 'Connected', reconnecting: 'Reconnecting…', offline: 'Offline' };
  const label = detail || labels[state];
  el.connDot.dataset.state = state;
  el.connDot.setAttribute('aria-label', label);
  el.connDot.title = label;
  el.connLabel.textContent = label;
  renderComposer();
  renderHeader();
}

function wsUrl() {
  return location.origin.replace(/^http/, 'ws') + '/ws?token=' + encodeURIComponent(S.token);
}

function connect() {
  clearTimeout(S.reconnectTimer);
  S.reconnectTimer = null;
  if (!S.token) return;
  if (S.ws && (S.ws.readyState === WebSocket.CONNECTING || S.ws.readyState === WebSocket.OPEN)) return;
  if (tokenExpired()) { signOut('Your session has expired. Please sign in again.'); return; }
  if (S.conn !== 'offline' || S.attempt === 0) setConn('reconnecting', S.attempt === 0 && !S.everConnected ? 'Connecting…' : undefined);
  let ws;
  try {
    ws = new WebSocket(wsUrl());
  } catch {
    scheduleReconnect();
    return;
  }
  S.ws = ws;
  S.gotHello = false;
  ws.onopen = () => { if (S.ws === ws) S.lastFrameAt = Date.now(); };
  ws.onmessage = (ev) => {
    if (S.ws !== ws) return;
    S.lastFrameAt = Date.now();
    let frame;
    try { frame = JSON.parse(ev.data); } catch { return; }
    if (!frame || typeof frame !== 'object') return;
    try {
      handleFrame(frame);
    } catch (err) {
      console.warn('chat: failed to handle frame', frame.type, err);
    }
  };
  ws.onclose = (ev) => { if (S.ws === ws) socketGone(ev.code, ev.reason); };
  ws.onerror = () => { /* a close event follows */ };
}

/** Forget the current socket (used for heartbeat timeouts and drain moves). */
function dropSocket(code = 4000, reason = '') {
  const ws = S.ws;
  if (!ws) return;
  S.ws = null;
  try { ws.close(code, reason); } catch { /* already closed */ }
  socketGone(code, reason);
}

function socketGone(code) {
  const hadHello = S.gotHello;
  S.ws = null;
  S.gotHello = false;
  stopHeartbeat();
  clearTimeout(S.moveTimer);
  if (S.typing) { clearTimeout(S.typing.idle); S.typing = null; }
  for (const room of S.rooms.values()) {
    room.joined = false;
    room.joining = false;
    for (const t of room.typing.values()) clearTimeout(t.timer);
    room.typing.clear();
  }
  renderTyping();
  renderMain();
  if (!S.token) { setConn('offline'); return; }
  if (!hadHello) S.failedHandshakes++;
  let delay;
  if (S.moveAt > Date.now()) delay = S.moveAt - Date.now();
  else if (S.moveAt) delay = 0;
  S.moveAt = 0;
  // Several refused handshakes in a row, or a policy close: check whether the token is still good.
  if (code === 1008 || (!hadHello && (!S.everConnected || S.failedHandshakes % 3 === 0))) {
    checkToken().then((ok) => { if (ok && S.token) scheduleReconnect(delay); });
    setConn('reconnecting');
    return;
  }
  scheduleReconnect(delay);
}

function scheduleReconnect(delay) {
  if (!S.token || S.reconnectTimer) return;
  if (delay == null) {
    const base = Math.min(BACKOFF_CAP_MS, BACKOFF_START_MS * 2 ** S.attempt);
    delay = Math.min(BACKOFF_CAP_MS, base * (0.75 + Math.random() * 0.5)); // ±25 % jitter
    S.attempt++;
  }
  // Amber while a quick retry is likely to work; red ("offline") once the browser says it has
  // no network or several attempts in a row have failed (the label says when the next one is).
  if (navigator.onLine === false) setConn('offline', 'Offline · waiting for the network');
  else if (S.attempt > OFFLINE_AFTER_ATTEMPTS) setConn('offline', `Offline · retrying in ${Math.ceil(delay / 1000)} s`);
  else setConn('reconnecting');
  S.reconnectTimer = setTimeout(() => { S.reconnectTimer = null; connect(); }, delay);
}

async function checkToken() {
  if (tokenExpired()) { signOut('Your session has expired. Please sign in again.'); return false; }
  try {
    const res = await fetch('/api/rooms', { headers: { Authorization: `Bearer ${S.token}` } });
    if (res.status === 401) { signOut('The server did not accept your token. Please sign in again.'); return false; }
  } catch { /* server unreachable: keep retrying */ }
  return true;
}

function tokenExpired() {
  const exp = S.claims?.exp;
  return typeof exp === 'number' && exp * 1000 < Date.now();
}

function startHeartbeat() {
  stopHeartbeat();
  const period = Math.max(5, Number(S.heartbeatS) || 25) * 1000;
  S.heartbeatTimer = setInterval(() => {
    const old = Date.now() - 60_000;
    for (const [ref, meta] of S.refs) if (meta.at < old && meta.kind !== 'message') S.refs.delete(ref);
    if (!S.ws || S.ws.readyState !== WebSocket.OPEN) return;
    if (Date.now() - S.lastFrameAt > period * 2 + 5000) { dropSocket(4000, 'heartbeat timeout'); return; }
    rawSend({ type: 'ping' });
    // Online counts of rooms we are not in only come with the listing: refresh it now and then.
    if (document.visibilityState === 'visible') rawSend({ type: 'list_rooms' });
  }, period);
}
function stopHeartbeat() { clearInterval(S.heartbeatTimer); S.heartbeatTimer = null; }

function rawSend(frame) {
  if (!S.ws || S.ws.readyState !== WebSocket.OPEN) return false;
  S.ws.send(JSON.stringify(frame));
  return true;
}

/** Send a command with a fresh `ref`; `meta` is remembered to route the answer. */
function send(frame, meta) {
  const ref = `r${++S.refSeq}`;
  frame.ref = ref;
  if (meta) S.refs.set(ref, { ...meta, at: Date.now() });
  if (!rawSend(frame)) { S.refs.delete(ref); return null; }
  return ref;
}

function sendJoin(room) {
  const frame = { type: 'join', room: room.id };
  if (room.synced) frame.since = room.lastSeq;
  room.joining = true;
  send(frame, { kind: 'join', room: room.id });
}

// ---------------------------------------------------------------------------
// 4. frames

const handlers = {
  hello: onHello,
  ack: onAck,
  error: onError,
  pong: () => {},
  joined: onJoined,
  left: onLeft,
  message: onMessage,
  message_edited: onMessageEdited,
  message_deleted: onMessageDeleted,
  typing: onTyping,
  stop_typing: onStopTyping,
  join: onPresenceJoin,
  leave: onPresenceLeave,
  online_users: onOnlineUsers,
  receipt: onReceipt,
  pinned: onPinned,
  unpinned: onUnpinned,
  room_created: onRoomCreated,
  room_updated: onRoomUpdated,
  room_deleted: onRoomDeleted,
  member_added: onMemberAdded,
  member_removed: onMemberRemoved,
  member_updated: onMemberUpdated,
  banned: onBanned,
  unbanned: onUnbanned,
  muted: onMuted,
  unmuted: onUnmuted,
  rooms: onRooms,
  notice: onNotice,
  reconnect: onReconnectFrame,
};

function handleFrame(f) {
  // Any stored room event advances that room's "last seq seen" (used as `since`).
  if (typeof f.seq === 'number' && f.type !== 'joined' && f.type !== 'ack') {
    const rid = roomIdOf(f);
    const room = rid != null ? S.rooms.get(rid) : null;
    if (room && room.synced) room.lastSeq = Math.max(room.lastSeq, f.seq);
  }
  const fn = handlers[f.type];
  if (fn) fn(f);
}

function roomIdOf(f) {
  const r = f.room;
  if (r == null) return null;
  return typeof r === 'object' ? String(r.id ?? r.room ?? '') : String(r);
}

function onHello(f) {
  S.gotHello = true;
  S.everConnected = true;
  S.attempt = 0;
  S.failedHandshakes = 0;
  if (f.user) {
    const u = normUser(f.user);
    S.me = { id: u.id || S.me.id, name: u.name || S.me.name };
    rememberUser(S.me);
  }
  if (f.limits && typeof f.limits === 'object') S.limits = f.limits;
  if (f.heartbeat_s) S.heartbeatS = f.heartbeat_s;
  S.lastFrameAt = Date.now();
  startHeartbeat();
  setConn('connected');
  renderMe();
  send({ type: 'list_rooms' });
  for (const room of S.rooms.values()) if (room.want) sendJoin(room);
  renderRoomList();
  renderMain();
}

function onAck(f) {
  const meta = f.ref != null ? S.refs.get(String(f.ref)) : null;
  if (!meta) return;
  S.refs.delete(String(f.ref));
  if (meta.kind === 'message') ackMessage(meta, f);
  else if (meta.kind === 'create_room') createdRoom(meta.roomId);
}

/** Background commands whose refusals are not worth a toast (the UI shows the state anyway). */
const QUIET = new Set(['read', 'typing', 'stop_typing', 'ping']);

function onError(f) {
  const meta = f.ref != null ? S.refs.get(String(f.ref)) : null;
  if (meta) S.refs.delete(String(f.ref));
  const code = f.code || 'error';
  const text = f.message || code;
  if (meta && QUIET.has(meta.kind)) {
    // A server that does not know the command yet: stop sending it on this page.
    if (code === 'invalid' && /not supported/i.test(text)) S.unsupported.add(meta.kind);
    console.debug('chat: %s refused: %s %s', meta.kind, code, text);
    return;
  }
  if (meta?.kind === 'message') {
    const room = getRoom(meta.room, false);
    const msg = meta.msg;
    if (code === 'rate_limited' && room && (msg.retries || 0) < 3) {
      msg.retries = (msg.retries || 0) + 1;
      const wait = Math.max(100, Number(f.retry_after_ms) || 1000);
      setTimeout(() => { if (msg.status === 'pending' && room.pending.has(msg.clientId)) transmit(room, msg); }, wait);
      return;
    }
    if (room) markFailed(room, msg, `${code}: ${text}`);
  } else if (meta?.kind === 'join') {
    const room = getRoom(meta.room, false);
    if (room) {
      room.joining = false;
      if (['banned', 'forbidden', 'not_found', 'room_full', 'unauthorized'].includes(code)) {
        room.want = false;
        if (code === 'banned') room.banned = true;
        saveRooms();
      }
      renderRoomList();
      renderMain();
    }
  } else if (meta?.kind === 'create_room') {
    showCreateError(`${text} (${code})`);
    S.pendingCreate = null;
  }
  toast(`${code}: ${text}`, { code });
}

function onJoined(f) {
  if (f.ref != null) S.refs.delete(String(f.ref));
  const info = typeof f.room === 'object' && f.room ? f.room : { id: f.room };
  const room = getRoom(info.id ?? f.room);
  if (!room) return;
  applyRoomInfo(room, info);
  const role = extractRole(f, info);
  if (role) room.role = role;
  const wasSynced = room.synced;
  room.joined = true;
  room.joining = false;
  room.want = true;
  room.banned = false;
  saveRooms();
  if (Array.isArray(f.online)) setOnline(room, f.online);
  if (Array.isArray(f.pins)) setPins(room, f.pins); else fetchPins(room);
  const joinedSeq = typeof f.seq === 'number' ? f.seq : null;
  if (wasSynced && joinedSeq != null && joinedSeq < room.lastSeq) {
    // The room's sequence went backwards: the server lost its state. What we show can no
    // longer be matched up by seq, so start over from the server's history.
    resetTimeline(room, joinedSeq);
  } else if (!wasSynced) {
    loadInitialHistory(room, joinedSeq);
  } else if (f.recovered === false) {
    fillGap(room, joinedSeq);
  } else if (joinedSeq != null) {
    room.lastSeq = Math.max(room.lastSeq, joinedSeq);
  }
  fetchMembers(room);
  fetchReceipts(room);
  // Messages still waiting for an ack go out again with the same client_msg_id (idempotent).
  for (const msg of room.pending.values()) if (msg.status === 'pending') transmit(room, msg);
  if (!S.current) selectRoom(room.id);
  renderRoomList();
  if (room.id === S.current) { renderMain(); scheduleRead(); }
}

function extractRole(f, info) {
  const me = S.me.id;
  const fromList = (list) => Array.isArray(list)
    ? list.find((m) => normUser(m.user ?? m).id === me)?.role : undefined;
  const role = info.role ?? info.my_role ?? f.role ?? f.my_role ?? f.member?.role ?? f.me?.role
    ?? fromList(info.members) ?? fromList(f.members);
  if (role) return String(role);
  const owner = info.owner ?? info.owner_id ?? info.created_by;
  if (owner != null && me && normUser(owner).id === me) return 'owner';
  return null;
}

function applyRoomInfo(room, info) {
  if (!info || typeof info !== 'object') return;
  for (const k of ['name', 'topic', 'visibility', 'max_members', 'members_can_pin', 'member_count', 'online_count']) {
    if (info[k] !== undefined) room[k] = info[k];
  }
  if (!room.name) room.name = room.id;
}

function onLeft(f) {
  const room = getRoom(roomIdOf(f), false);
  if (!room) return;
  loseRoom(room);
  renderRoomList();
  renderMain();
}

function onMessage(f) {
  const room = getRoom(roomIdOf(f), false);
  if (!room) return;
  const msg = normMsg(f, room.id);
  if (msg.seq != null) room.lastSeq = Math.max(room.lastSeq, msg.seq);
  // My own optimistic message coming back?
  if (msg.clientId && room.pending.has(msg.clientId)) {
    const mine = room.pending.get(msg.clientId);
    settleMessage(room, mine, msg);
    return;
  }
  const known = msg.id && room.byId.get(msg.id);
  if (known) { Object.assign(known, { content: msg.content, editedAt: msg.editedAt, deleted: msg.deleted }); updateMsgEl(room, known); return; }
  const live = room.id === S.current && document.visibilityState === 'visible';
  clearTyping(room, msg.user.id);
  insertMessage(room, msg, { live: true });
  if (!isMine(msg) && !live) { room.unread++; renderRoomItem(room); renderTitle(); }
}

function onMessageEdited(f) {
  const room = getRoom(roomIdOf(f), false);
  const msg = room?.byId.get(String(f.id));
  if (!msg) return;
  msg.content = f.content ?? msg.content;
  msg.editedAt = f.edited_at ?? new Date().toISOString();
  updateMsgEl(room, msg);
  const pin = room.pins.find((p) => p.id === msg.id);
  if (pin) { pin.content = msg.content; renderPins(); }
}

function onMessageDeleted(f) {
  const room = getRoom(roomIdOf(f), false);
  if (!room) return;
  const id = String(f.id);
  const msg = room.byId.get(id);
  if (msg) { msg.deleted = true; msg.content = ''; updateMsgEl(room, msg); }
  const before = room.pins.length;
  room.pins = room.pins.filter((p) => p.id !== id);
  if (room.pins.length !== before) renderPins();
  if (f.by != null && msg) {
    const by = normUser(f.by);
    if (by.id && by.id !== msg.user.id) addSystem(room, `${by.name} deleted a message from ${msg.user.name}.`, f.seq, 'moderation');
  }
}

function onTyping(f) {
  const room = getRoom(roomIdOf(f), false);
  if (!room) return;
  const u = normUser(f.user);
  if (!u.id || u.id === S.me.id) return;
  rememberUser(u);
  const prev = room.typing.get(u.id);
  if (prev) clearTimeout(prev.timer);
  room.typing.set(u.id, { name: u.name, timer: setTimeout(() => clearTyping(room, u.id), TYPING_EXPIRE_MS) });
  if (room.id === S.current) renderTyping();
}
function onStopTyping(f) {
  const room = getRoom(roomIdOf(f), false);
  if (room) clearTyping(room, normUser(f.user).id);
}
function clearTyping(room, uid) {
  const t = room.typing.get(uid);
  if (!t) return;
  clearTimeout(t.timer);
  room.typing.delete(uid);
  if (room.id === S.current) renderTyping();
}

function onPresenceJoin(f) {
  const room = getRoom(roomIdOf(f), false);
  if (!room) return;
  const u = normUser(f.user);
  rememberUser(u);
  const wasOnline = room.online.has(u.id);
  room.online.set(u.id, u.name);
  room.online_count = Math.max(room.online_count || 0, room.online.size);
  if (!wasOnline && u.id !== S.me.id) addSystem(room, `${u.name} joined.`, null, 'presence');
  renderRoomItem(room);
  if (room.id === S.current) { renderMembers(); renderHeader(); }
}
function onPresenceLeave(f) {
  const room = getRoom(roomIdOf(f), false);
  if (!room) return;
  const u = normUser(f.user);
  const wasOnline = room.online.delete(u.id);
  room.online_count = room.online.size;
  clearTyping(room, u.id);
  if (u.id !== S.me.id && wasOnline) addSystem(room, `${u.name} left.`, null, 'presence');
  renderRoomItem(room);
  if (room.id === S.current) { renderMembers(); renderHeader(); }
}

function onOnlineUsers(f) {
  const room = getRoom(roomIdOf(f), false);
  if (!room) return;
  if (Array.isArray(f.users)) setOnline(room, f.users);
  room.online_count = typeof f.count === 'number' ? f.count : room.online.size;
  renderRoomItem(room);
  if (room.id === S.current) { renderMembers(); renderHeader(); }
}
function setOnline(room, users) {
  room.online.clear();
  for (const raw of users) {
    const u = normUser(raw);
    if (!u.id) continue;
    rememberUser(u);
    room.online.set(u.id, u.name);
  }
  room.online_count = room.online.size;
}

function onReceipt(f) {
  const room = getRoom(roomIdOf(f), false);
  if (!room) return;
  const u = normUser(f.user);
  const seq = Number(f.seq);
  if (!u.id || !Number.isFinite(seq)) return;
  rememberUser(u);
  room.markers.set(u.id, Math.max(room.markers.get(u.id) || 0, seq));
  if (u.id === S.me.id) {
    room.readSent = Math.max(room.readSent, seq);
  } else {
    refreshTicks(room);
  }
}

function normPin(p, room) {
  const m = p && typeof p.message === 'object' && p.message ? p.message : (p?.content !== undefined || p?.seq !== undefined ? p : null);
  const id = String(m?.id ?? p?.message_id ?? p?.id ?? p?.message ?? '');
  const local = room.byId.get(id);
  const user = normUser(m?.user ?? local?.user ?? null);
  return {
    id,
    seq: m?.seq ?? local?.seq ?? null,
    user,
    content: local?.content ?? (m?.deleted ? '' : m?.content) ?? '',
    by: p?.by != null ? normUser(p.by) : null,
    pinnedAt: p?.pinned_at ?? null,
  };
}
function setPins(room, pins) {
  room.pins = pins.map((p) => normPin(p, room)).filter((p) => p.id);
  if (room.id === S.current) renderPins();
  refreshAllMsgs(room);
}
function onPinned(f) {
  const room = getRoom(roomIdOf(f), false);
  if (!room) return;
  const pin = normPin(f, room);
  if (!pin.id) return;
  room.pins = [pin, ...room.pins.filter((p) => p.id !== pin.id)];
  if (room.id === S.current) renderPins();
  const msg = room.byId.get(pin.id);
  if (msg) updateMsgEl(room, msg);
  const by = pin.by?.name || 'Someone';
  addSystem(room, `${by} pinned a message${pin.user.name ? ` from ${pin.user.name}` : ''}.`, f.seq, 'pin');
}
function onUnpinned(f) {
  const room = getRoom(roomIdOf(f), false);
  if (!room) return;
  const id = String(f.id ?? f.message_id ?? f.message?.id ?? '');
  room.pins = room.pins.filter((p) => p.id !== id);
  if (room.id === S.current) renderPins();
  const msg = room.byId.get(id);
  if (msg) updateMsgEl(room, msg);
  const by = f.by != null ? normUser(f.by).name : 'Someone';
  addSystem(room, `${by} unpinned a message.`, f.seq, 'pin');
}

function onRoomCreated(f) {
  const info = typeof f.room === 'object' && f.room ? f.room : { ...f, id: f.room };
  const room = getRoom(info.id);
  if (!room) return;
  applyRoomInfo(room, info);
  const role = extractRole(f, info);
  if (role) room.role = role;
  const meta = f.ref != null ? S.refs.get(String(f.ref)) : null;
  if (meta) S.refs.delete(String(f.ref));
  if ((meta?.kind === 'create_room') || S.pendingCreate?.roomId === room.id) {
    if (!room.role) room.role = 'owner';
    createdRoom(room.id);
  }
  renderRoomList();
  send({ type: 'list_rooms' });
}

function createdRoom(roomId) {
  if (!S.pendingCreate || S.pendingCreate.roomId !== roomId) return;
  S.pendingCreate = null;
  const room = getRoom(roomId);
  if (!room.role) room.role = 'owner';
  closeCreateDialog();
  room.want = true;
  saveRooms();
  selectRoom(room.id);
}

function onRoomUpdated(f) {
  const rid = roomIdOf(f);
  const room = getRoom(rid, false);
  if (!room) return;
  const changes = typeof f.room === 'object' && f.room ? { ...f, ...f.room } : { ...f };
  if (changes.settings && typeof changes.settings === 'object') Object.assign(changes, changes.settings);
  const before = { name: room.name, topic: room.topic, visibility: room.visibility };
  applyRoomInfo(room, changes);
  const by = f.by != null ? normUser(f.by).name : 'Someone';
  if (room.topic !== before.topic) addSystem(room, `${by} changed the topic to “${room.topic || ''}”.`, f.seq, 'room');
  else if (room.name !== before.name) addSystem(room, `${by} renamed the room to “${room.name}”.`, f.seq, 'room');
  else if (room.visibility !== before.visibility) addSystem(room, `${by} made the room ${room.visibility}.`, f.seq, 'room');
  else addSystem(room, `${by} updated the room settings.`, f.seq, 'room');
  renderRoomItem(room);
  if (room.id === S.current) { renderHeader(); refreshAllMsgs(room); }
}

function onRoomDeleted(f) {
  const id = roomIdOf(f);
  const room = getRoom(id, false);
  if (!room) return;
  S.rooms.delete(room.id);
  saveRooms();
  if (S.current === room.id) {
    S.current = null;
    saveRooms();
    renderMain();
  }
  toast(`Room “${room.name}” was deleted.`, { kind: 'info' });
  renderRoomList();
  send({ type: 'list_rooms' });
}

function targetOf(f) { return normUser(f.user ?? f.target ?? f.user_id); }
function byOf(f) { return f.by != null ? normUser(f.by).name : null; }
function reasonOf(f) { return f.reason ? ` (${f.reason})` : ''; }
function untilOf(f) {
  if (f.until || f.expires_at || f.muted_until) return f.until || f.expires_at || f.muted_until;
  if (f.duration_s) return new Date(Date.now() + f.duration_s * 1000).toISOString();
  return null;
}

function onMemberAdded(f) {
  const room = getRoom(roomIdOf(f));
  const u = targetOf(f);
  rememberUser(u);
  room.members.set(u.id, { ...(room.members.get(u.id) || {}), id: u.id, name: u.name, role: f.role || 'member' });
  if (u.id === S.me.id) room.role = f.role || room.role || 'member';
  addSystem(room, `${u.id === S.me.id ? 'You were' : `${u.name} was`} added to the room${f.role && f.role !== 'member' ? ` as ${f.role}` : ''}${byOf(f) ? ` by ${byOf(f)}` : ''}.`, f.seq, 'moderation');
  afterMembershipChange(room);
}

function onMemberRemoved(f) {
  const room = getRoom(roomIdOf(f), false);
  if (!room) return;
  const u = targetOf(f);
  room.members.delete(u.id);
  room.online.delete(u.id);
  const by = byOf(f);
  if (u.id === S.me.id) {
    loseRoom(room);
    addSystem(room, `You were removed from the room${by ? ` by ${by}` : ''}${reasonOf(f)}.`, f.seq, 'moderation');
    toast(`You were removed from “${room.name}”.`, { kind: 'info' });
  } else {
    addSystem(room, `${u.name} was removed${by ? ` by ${by}` : ''}${reasonOf(f)}.`, f.seq, 'moderation');
  }
  afterMembershipChange(room);
}

function onMemberUpdated(f) {
  const room = getRoom(roomIdOf(f), false);
  if (!room) return;
  const u = targetOf(f);
  const m = room.members.get(u.id) || { id: u.id, name: u.name };
  if (f.role) m.role = f.role;
  room.members.set(u.id, m);
  if (u.id === S.me.id && f.role) room.role = f.role;
  if (f.role) addSystem(room, `${u.id === S.me.id ? 'You are' : `${u.name} is`} now ${f.role}.`, f.seq, 'moderation');
  afterMembershipChange(room);
}

function onBanned(f) {
  const room = getRoom(roomIdOf(f), false);
  if (!room) return;
  const u = targetOf(f);
  room.members.delete(u.id);
  room.online.delete(u.id);
  const by = byOf(f);
  const until = untilOf(f);
  const tail = `${by ? ` by ${by}` : ''}${until ? ` until ${fmtFull(until)}` : ''}${reasonOf(f)}`;
  if (u.id === S.me.id) {
    loseRoom(room);
    room.banned = true;
    addSystem(room, `You were banned from the room${tail}.`, f.seq, 'moderation');
    toast(`You were banned from “${room.name}”.`, { kind: 'info' });
  } else {
    addSystem(room, `${u.name} was banned${tail}.`, f.seq, 'moderation');
  }
  afterMembershipChange(room);
}
function onUnbanned(f) {
  const room = getRoom(roomIdOf(f), false);
  if (!room) return;
  const u = targetOf(f);
  if (u.id === S.me.id) room.banned = false;
  addSystem(room, `${u.id === S.me.id ? 'You were' : `${u.name} was`} unbanned${byOf(f) ? ` by ${byOf(f)}` : ''}.`, f.seq, 'moderation');
  afterMembershipChange(room);
}

function onMuted(f) {
  const room = getRoom(roomIdOf(f), false);
  if (!room) return;
  const u = targetOf(f);
  const until = untilOf(f);
  const m = room.members.get(u.id) || { id: u.id, name: u.name, role: 'member' };
  m.muted_until = until || 'forever';
  room.members.set(u.id, m);
  if (u.id === S.me.id) {
    room.mutedMe = true;
    room.mutedUntil = until;
    clearTimeout(room.muteTimer);
    if (until) {
      const ms = new Date(until).getTime() - Date.now();
      if (ms > 0 && ms < 2 ** 31) room.muteTimer = setTimeout(() => { room.mutedMe = false; renderComposer(); }, ms);
    }
  }
  addSystem(room, `${u.id === S.me.id ? 'You were' : `${u.name} was`} muted${byOf(f) ? ` by ${byOf(f)}` : ''}${until ? ` until ${fmtFull(until)}` : ''}.`, f.seq, 'moderation');
  afterMembershipChange(room);
}
function onUnmuted(f) {
  const room = getRoom(roomIdOf(f), false);
  if (!room) return;
  const u = targetOf(f);
  const m = room.members.get(u.id);
  if (m) m.muted_until = null;
  if (u.id === S.me.id) { room.mutedMe = false; clearTimeout(room.muteTimer); }
  addSystem(room, `${u.id === S.me.id ? 'You were' : `${u.name} was`} unmuted${byOf(f) ? ` by ${byOf(f)}` : ''}.`, f.seq, 'moderation');
  afterMembershipChange(room);
}

function loseRoom(room) {
  room.joined = false;
  room.joining = false;
  room.want = false;
  for (const t of room.typing.values()) clearTimeout(t.timer);
  room.typing.clear();
  room.online.delete(S.me.id);
  room.online_count = room.online.size;
  room.online.clear();
  for (const msg of room.pending.values()) markFailed(room, msg, 'You are no longer in this room.');
  saveRooms();
}

function afterMembershipChange(room) {
  renderRoomList();
  if (room.id === S.current) { renderMain(); refreshAllMsgs(room); }
}

function onRooms(f) {
  const list = Array.isArray(f.rooms) ? f.rooms : [];
  const seen = new Set();
  for (const info of list) {
    const id = info?.id ?? info?.room;
    if (id == null) continue;
    const room = getRoom(id);
    seen.add(room.id);
    applyRoomInfo(room, info);
    if (typeof info.unread === 'number' && room.id !== S.current) room.unread = info.unread;
  }
  // The listing is authoritative for what this user may see; keep rooms we are in.
  for (const room of [...S.rooms.values()]) {
    if (!seen.has(room.id) && !room.want && !room.joined && room.id !== S.current) S.rooms.delete(room.id);
  }
  S.roomsLoaded = true;
  renderRoomList();
  renderHeader();
  renderTitle();
  const wanted = S.wantedOnLoad;
  if (wanted && S.rooms.has(wanted) && !S.current) { S.wantedOnLoad = null; selectRoom(wanted); }
}

function onNotice(f) {
  const banner = el.noticeBanner;
  $('.notice-content', banner).textContent = String(f.content ?? '');
  const t = $('.notice-time', banner);
  t.textContent = f.ts ? fmtTime(f.ts) : '';
  if (f.ts) t.setAttribute('datetime', f.ts);
  banner.hidden = false;
}

function onReconnectFrame(f) {
  const ms = Math.max(0, Number(f.after_ms) || 0);
  const ws = S.ws;
  S.moveAt = Date.now() + ms;
  clearTimeout(S.moveTimer);
  // Keep receiving until it is our turn, then move to a healthy node. If the server
  // closes first (1012), socketGone() still waits until moveAt.
  S.moveTimer = setTimeout(() => {
    if (S.ws === ws && ws) { S.moveAt = 0; dropSocket(1000, 'moving'); }
  }, ms);
}

// ---------------------------------------------------------------------------
// 5. history over HTTP

async function api(path) {
  const res = await fetch(path, { headers: { Authorization: `Bearer ${S.token}`, Accept: 'application/json' } });
  let body = null;
  try { body = await res.json(); } catch { /* empty body */ }
  if (!res.ok) {
    const err = new Error(body?.error?.message || `HTTP ${res.status}`);
    err.status = res.status;
    err.code = body?.error?.code || String(res.status);
    throw err;
  }
  return body;
}
const roomPath = (room) => `/api/rooms/${encodeURIComponent(room.id)}`;

function pageMessages(data) {
  return Array.isArray(data) ? data : (Array.isArray(data?.messages) ? data.messages : []);
}
function nextBeforeOf(data, msgs, limit) {
  if (data && 'next_before' in data) return data.next_before ?? null;
  if (msgs.length < limit) return null;
  const seqs = msgs.map((m) => Number(m.seq)).filter(Number.isFinite);
  return seqs.length ? Math.min(...seqs) : null;
}

async function loadInitialHistory(room, joinedSeq) {
  if (room.initialPromise) return room.initialPromise;
  room.initialPromise = (async () => {
    setEdge(room, 'loading');
    try {
      const data = await api(`${roomPath(room)}/messages?limit=${PAGE_SIZE}`);
      const msgs = pageMessages(data);
      let maxSeq = 0;
      mutateTimeline(room, () => {
        for (const m of msgs) {
          const msg = upsertFromHistory(room, m);
          if (msg?.seq != null) maxSeq = Math.max(maxSeq, msg.seq);
        }
      }, { bulk: true, toBottom: true });
      room.nextBefore = nextBeforeOf(data, msgs, PAGE_SIZE);
      room.synced = true;
      room.lastSeq = Math.max(room.lastSeq, maxSeq, joinedSeq ?? 0, ...[...room.byId.values()].map((m) => m.seq || 0));
      setEdge(room, room.nextBefore == null ? 'start' : 'more');
      refreshTicks(room);
      if (joinedSeq != null && joinedSeq > maxSeq) catchUp(room, maxSeq, joinedSeq);
      if (room.id === S.current) { fillViewport(room); scheduleRead(); }
    } catch (err) {
      setEdge(room, 'error');
      if (err.status !== 403) toast(`Could not load history: ${err.message}`, { code: err.code });
      // Live events still arrive: from here on the timeline is complete, so a reconnect can
      // recover with `since`; "Try again" pages back from the oldest message we have.
      if (!room.synced && joinedSeq != null) {
        const seqs = [...room.byId.values()].map((m) => m.seq).filter((x) => x != null);
        room.synced = true;
        room.lastSeq = Math.max(room.lastSeq, joinedSeq, ...seqs);
        room.nextBefore = seqs.length ? Math.min(...seqs) : joinedSeq + 1;
      }
    } finally {
      room.initialPromise = null;
    }
  })();
  return room.initialPromise;
}

/**
 * The history service may persist asynchronously (scaled mode): what was stored before our
 * `joined` (seq <= toSeq) can be missing from the first page; fetch that range a few times
 * more. Later events come live, so they are not taken from here.
 */
async function catchUp(room, fromSeq, toSeq) {
  let after = fromSeq;
  for (const wait of [250, 750, 1500]) {
    await new Promise((r) => setTimeout(r, wait));
    try {
      const data = await api(`${roomPath(room)}/messages?after=${after}&limit=${GAP_PAGE_SIZE}`);
      const all = pageMessages(data);
      const msgs = all.filter((m) => Number(m.seq) <= toSeq);
      if (msgs.length < all.length) after = toSeq; // the range is complete
      mutateTimeline(room, () => { for (const m of msgs) upsertFromHistory(room, m); }, { bulk: true });
      for (const m of msgs) after = Math.max(after, Number(m.seq) || 0);
      refreshTicks(room);
    } catch { return; }
    if (after >= toSeq) return;
  }
}

async function fillGap(room, joinedSeq) {
  let after = room.lastSeq;
  try {
    for (let page = 0; page < GAP_MAX_PAGES; page++) {
      const data = await api(`${roomPath(room)}/messages?after=${after}&limit=${GAP_PAGE_SIZE}`);
      const msgs = pageMessages(data);
      mutateTimeline(room, () => { for (const m of msgs) upsertFromHistory(room, m); }, { bulk: true });
      const top = Math.max(after, ...msgs.map((m) => Number(m.seq) || 0));
      const next = data?.next_after ?? (msgs.length >= GAP_PAGE_SIZE ? top : null);
      after = top;
      if (next == null || msgs.length === 0) break;
      if (page === GAP_MAX_PAGES - 1) { resetTimeline(room); return; } // too far behind: start afresh
    }
    room.lastSeq = Math.max(room.lastSeq, after, joinedSeq ?? 0);
    refreshTicks(room);
    if (joinedSeq != null && joinedSeq > after) catchUp(room, after, joinedSeq);
  } catch (err) {
    toast(`Could not load missed messages: ${err.message}`, { code: err.code });
  }
}

function resetTimeline(room, joinedSeq = null) {
  for (const it of room.items) it.el?.remove();
  const pending = [...room.pending.values()];
  room.items = [];
  room.byId.clear();
  room.sysSeen.clear();
  room.synced = false;
  room.lastSeq = 0;
  room.readSent = 0;
  room.nextBefore = undefined;
  room.edgeEl = null;
  for (const msg of pending) insertItem(room, { key: PENDING_KEY_BASE + ++S.pendingSeq, kind: 'msg', msg });
  if (room.id === S.current) renderTimeline();
  loadInitialHistory(room, joinedSeq);
}

function loadOlder(room) {
  if (room.olderPromise) return room.olderPromise;
  if (!room.synced) return loadInitialHistory(room, null);
  if (room.nextBefore == null) return Promise.resolve();
  room.olderPromise = (async () => {
    setEdge(room, 'loading');
    try {
      const data = await api(`${roomPath(room)}/messages?before=${room.nextBefore}&limit=${PAGE_SIZE}`);
      const msgs = pageMessages(data);
      mutateTimeline(room, () => {
        for (const m of msgs) upsertFromHistory(room, m);
        room.nextBefore = msgs.length === 0 ? null : nextBeforeOf(data, msgs, PAGE_SIZE);
        setEdge(room, room.nextBefore == null ? 'start' : 'more');
      }, { bulk: true });
      refreshTicks(room);
    } catch (err) {
      setEdge(room, 'error');
      toast(`Could not load older messages: ${err.message}`, { code: err.code });
    } finally {
      room.olderPromise = null;
    }
  })();
  return room.olderPromise;
}

/** Keep loading older pages while the list does not fill the viewport. */
async function fillViewport(room) {
  for (let i = 0; i < 5 && room.id === S.current && room.nextBefore != null; i++) {
    const list = el.messageList;
    if (list.scrollHeight > list.clientHeight + 40) return;
    await loadOlder(room);
  }
}

function upsertFromHistory(room, raw) {
  const msg = normMsg(raw, room.id);
  if (!msg.id) return null;
  const known = room.byId.get(msg.id);
  if (known) {
    known.content = msg.content;
    known.deleted = msg.deleted;
    known.editedAt = msg.editedAt ?? known.editedAt;
    updateMsgEl(room, known);
    return known;
  }
  if (msg.clientId && room.pending.has(msg.clientId)) {
    settleMessage(room, room.pending.get(msg.clientId), msg);
    return room.byId.get(msg.id);
  }
  insertMessage(room, msg, { live: false });
  return msg;
}

async function fetchPins(room) {
  try {
    const data = await api(`${roomPath(room)}/pins`);
    const pins = Array.isArray(data) ? data : (data?.pins || data?.messages || []);
    setPins(room, pins);
  } catch { /* optional */ }
}
async function fetchMembers(room) {
  try {
    const data = await api(`${roomPath(room)}/members`);
    const list = Array.isArray(data) ? data : (data?.members || []);
    room.members.clear();
    for (const m of list) {
      const u = normUser(m.user ?? (m.user_id != null ? { id: m.user_id, name: m.name ?? m.user_name } : m));
      if (!u.id) continue;
      rememberUser(u);
      room.members.set(u.id, { id: u.id, name: u.name, role: m.role || 'member', muted_until: m.muted_until ?? null });
    }
    const mine = room.members.get(S.me.id);
    if (mine?.role) room.role = mine.role;
    if (mine?.muted_until && new Date(mine.muted_until).getTime() > Date.now()) room.mutedMe = true;
    afterMembershipChange(room);
  } catch { /* optional: members may be hidden */ }
}
async function fetchReceipts(room) {
  try {
    const data = await api(`${roomPath(room)}/receipts`);
    for (const m of data?.markers || []) {
      const u = normUser(m.user ?? m.user_id);
      if (!u.id) continue;
      room.markers.set(u.id, Math.max(room.markers.get(u.id) || 0, Number(m.seq) || 0));
      if (u.id === S.me.id) room.readSent = Math.max(room.readSent, Number(m.seq) || 0);
    }
    refreshTicks(room);
  } catch { /* optional */ }
}

// ---------------------------------------------------------------------------
// 6. rendering

function renderTitle() {
  let total = 0;
  for (const r of S.rooms.values()) total += r.unread || 0;
  const room = cur();
  const base = room ? `${room.name} · Chat` : 'Chat';
  document.title = total ? `(${total}) ${base}` : base;
}

function renderMe() {
  el.meName.textContent = S.me.name || S.me.id;
  el.meRole.textContent = S.globalAdmin ? 'Administrator' : '';
  el.me.dataset.user = S.me.id;
  el.meAvatar.replaceWith(Object.assign(avatar(S.me), { id: 'me-avatar' }));
  el.meAvatar = document.getElementById('me-avatar');
}

function sortedRooms() {
  return [...S.rooms.values()].sort((a, b) =>
    (Number(b.want || b.joined) - Number(a.want || a.joined)) || a.name.localeCompare(b.name) || a.id.localeCompare(b.id));
}

function renderRoomList() {
  const list = el.roomList;
  list.dataset.loaded = S.roomsLoaded ? 'true' : 'false';
  const rooms = sortedRooms();
  const rows = [];
  let lastGroup = null;
  for (const room of rooms) {
    const group = room.want || room.joined ? 'Joined' : 'Browse';
    if (group !== lastGroup && rooms.some((r) => !(r.want || r.joined))) {
      rows.push(h('li', { class: 'room-group', role: 'presentation' }, group));
    }
    lastGroup = group;
    if (!room.li) room.li = h('li', { class: 'room-row' });
    renderRoomItem(room);
    rows.push(room.li);
  }
  if (!rooms.length) {
    rows.push(h('li', { class: 'room-empty' }, S.roomsLoaded ? 'No rooms yet. Create one with +.' : 'Loading rooms…'));
  }
  list.replaceChildren(...rows);
  renderTitle();
}

function renderRoomItem(room) {
  if (!room.li) return;
  if (!room.btn) {
    room.btn = h('button', { type: 'button', class: 'room-item', dataset: { room: room.id }, onclick: () => selectRoom(room.id) },
      h('span', { class: 'vis-icon' }),
      h('span', { class: 'visually-hidden vis-text' }),
      h('span', { class: 'room-item-name' }),
      h('span', { class: 'unread' }),
      h('span', { class: 'online-count' }));
    room.li.replaceChildren(room.btn);
  }
  const b = room.btn;
  const active = room.id === S.current;
  const vis = room.visibility || 'public';
  b.className = `room-item${active ? ' active' : ''}${room.want || room.joined ? ' is-joined' : ''}${room.unread ? ' has-unread' : ''}`;
  b.dataset.visibility = vis;
  if (active) b.setAttribute('aria-current', 'page'); else b.removeAttribute('aria-current');
  if (room.topic) b.title = room.topic; else b.removeAttribute('title');
  const visEl = $('.vis-icon', b);
  if (visEl.dataset.vis !== vis) {
    visEl.dataset.vis = vis;
    visEl.title = VIS_LABEL[vis] || vis;
    visEl.replaceChildren(icon(vis, 'icon'));
  }
  $('.vis-text', b).textContent = `${VIS_LABEL[vis] || vis}: `;
  $('.room-item-name', b).textContent = room.name || room.id;
  const unread = $('.unread', b);
  unread.textContent = String(room.unread || 0);
  unread.hidden = !room.unread;
  unread.setAttribute('aria-label', `${room.unread || 0} unread`);
  const oc = $('.online-count', b);
  const n = room.online_count || 0;
  oc.textContent = String(n);
  oc.dataset.n = String(n);
  oc.title = `${n} online`;
  oc.setAttribute('aria-label', `${n} online`);
}

function renderMain() {
  const room = cur();
  el.main.dataset.room = room ? room.id : '';
  el.main.dataset.joined = room?.joined ? 'true' : 'false';
  el.emptyState.hidden = !!room;
  el.messageList.hidden = !room;
  renderHeader();
  renderComposer();
  renderMembers();
  renderPins();
  renderTyping();
}

function renderHeader() {
  const room = cur();
  el.roomName.textContent = room ? room.name || room.id : 'No room selected';
  el.roomTopic.textContent = room ? room.topic || VIS_LABEL[room.visibility] || '' : '';
  el.leaveButton.hidden = !(room && (room.joined || room.want));
  const canDelete = !!room && room.joined && (S.globalAdmin || room.role === 'owner');
  el.deleteRoomButton.hidden = !canDelete;
  if (!canDelete || el.deleteRoomButton.dataset.room !== room?.id) disarmDeleteRoom();
  const online = room ? room.online : new Map();
  const count = !room ? 0 : room.joined ? Math.max(room.online.size, room.online_count || 0) : (room.online_count || 0);
  el.onlineCount.textContent = String(count);
  el.membersToggle.hidden = !room;
  el.onlineAvatars.replaceChildren(...[...online].slice(0, 3).map(([id, name]) => avatar({ id, name }, 'avatar avatar-xs')));
  renderTitle();
}

function renderComposer() {
  const room = cur();
  const connected = S.conn === 'connected';
  let disabled = true;
  let placeholder = 'Select a room';
  if (room) {
    if (!connected) placeholder = S.conn === 'reconnecting' ? 'Reconnecting…' : 'Offline';
    else if (room.banned) placeholder = 'You are banned from this room';
    else if (!room.joined) placeholder = room.joining ? 'Joining…' : 'Join this room to chat';
    else if (room.mutedMe) placeholder = 'You are muted in this room';
    else { disabled = false; placeholder = `Message ${room.visibility === 'private' ? '' : '#'}${room.name || room.id}`; }
  }
  el.composer.disabled = disabled;
  el.sendButton.disabled = disabled;
  el.composer.placeholder = placeholder;
  const showJoin = !!room && connected && !room.joined && !room.joining && !room.banned;
  el.joinButton.hidden = !showJoin;
  el.sendButton.hidden = showJoin;
  el.composer.hidden = showJoin;
}

function renderTyping() {
  const room = cur();
  const names = room ? [...room.typing.values()].map((t) => t.name) : [];
  let text = '';
  if (names.length === 1) text = `${names[0]} is typing…`;
  else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) text = `${names.length} people are typing…`;
  el.typingLine.textContent = text;
  el.typingLine.classList.toggle('active', !!text);
}

function renderPins() {
  const room = cur();
  const pins = room?.pins || [];
  el.pinnedBar.hidden = pins.length === 0;
  el.pinnedItems.replaceChildren(...pins.map((p) => {
    const label = p.content ? p.content.replace(/\s+/g, ' ').slice(0, 140) : (p.seq != null ? `Message #${p.seq}` : 'Message');
    return h('button', {
      type: 'button',
      class: 'pin-chip',
      dataset: { pinId: p.id, seq: p.seq },
      title: `${p.user.name ? `${p.user.name}: ` : ''}${p.content || ''}${p.by ? `\nPinned by ${p.by.name}` : ''}`,
      onclick: () => jumpTo(room, p.id, p.seq),
    }, p.user.name ? h('span', { class: 'pin-author' }, `${p.user.name}:`) : null, h('span', { class: 'pin-text' }, label));
  }));
}

function renderMembers() {
  const room = cur();
  const list = el.onlineUsers;
  if (!room) { list.replaceChildren(h('li', { class: 'member-empty' }, 'Pick a room to see who is here.')); return; }
  const admin = roomAdmin(room) && room.joined;
  const rows = [];
  const seen = new Set();
  const entry = (id, name, online) => {
    seen.add(id);
    const m = room.members.get(id);
    const role = m?.role && m.role !== 'member' ? m.role : null;
    const muted = !!m?.muted_until && (m.muted_until === 'forever' || new Date(m.muted_until).getTime() > Date.now());
    const canAct = admin && id !== S.me.id && m?.role !== 'owner' && (room.role === 'owner' || S.globalAdmin || m?.role !== 'admin');
    const li = h('li', { class: `member${online ? ' online' : ''}`, dataset: { user: id, online: online ? 'true' : 'false' } },
      h('span', { class: 'member-avatar' }, avatar({ id, name }), h('span', { class: 'presence', 'aria-hidden': 'true' })),
      h('span', { class: 'member-main' },
        h('span', { class: 'member-name' }, name, id === S.me.id ? h('span', { class: 'you' }, ' (you)') : null),
        h('span', { class: 'member-meta' },
          online ? 'online' : 'offline',
          role ? h('span', { class: 'badge' }, role) : null,
          muted ? h('span', { class: 'badge badge-warn' }, 'muted') : null)),
      canAct ? h('span', { class: 'member-actions' },
        h('button', { type: 'button', class: 'chip-btn', dataset: { action: muted ? 'unmute' : 'mute' }, 'aria-label': `${muted ? 'Unmute' : 'Mute'} ${name}`, onclick: () => moderate(room, muted ? 'unmute' : 'mute', id, name) }, muted ? 'Unmute' : 'Mute'),
        h('button', { type: 'button', class: 'chip-btn', dataset: { action: 'kick' }, 'aria-label': `Kick ${name}`, onclick: () => moderate(room, 'kick', id, name) }, 'Kick'),
        h('button', { type: 'button', class: 'chip-btn danger', dataset: { action: 'ban' }, 'aria-label': `Ban ${name}`, onclick: () => moderate(room, 'ban', id, name) }, 'Ban'),
      ) : null);
    rows.push(li);
  };
  const online = [...room.online].sort((a, b) => a[1].localeCompare(b[1]));
  if (online.length) rows.push(h('li', { class: 'member-group', role: 'presentation' }, `Online — ${online.length}`));
  for (const [id, name] of online) entry(id, name, true);
  const offline = [...room.members.values()].filter((m) => !seen.has(m.id)).sort((a, b) => a.name.localeCompare(b.name));
  if (offline.length) rows.push(h('li', { class: 'member-group', role: 'presentation' }, `Members — ${offline.length}`));
  for (const m of offline) entry(m.id, m.name, false);
  if (!rows.length) rows.push(h('li', { class: 'member-empty' }, room.joined ? 'Nobody here yet.' : 'Join the room to see who is here.'));
  const focused = list.contains(document.activeElement) ? document.activeElement : null;
  const fUser = focused?.closest('[data-user]')?.dataset.user;
  const fAction = focused?.dataset.action;
  list.replaceChildren(...rows);
  if (fUser && fAction) {
    const again = [...list.querySelectorAll('[data-user]')].find((n) => n.dataset.user === fUser)
      ?.querySelector(`[data-action="${fAction}"]`);
    again?.focus();
  }
}

// ---- timeline ---------------------------------------------------------------

function findIndex(room, key) {
  // first index whose key > key
  let lo = 0, hi = room.items.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (room.items[mid].key <= key) lo = mid + 1; else hi = mid;
  }
  return lo;
}

function insertItem(room, item) {
  const i = findIndex(room, item.key);
  room.items.splice(i, 0, item);
  if (room.id === S.current) {
    const next = room.items[i + 1];
    const list = el.messageList;
    if (next?.el?.parentNode === list) list.insertBefore(item.el, next.el);
    else list.append(item.el);
  }
}
function removeItem(room, item) {
  const i = room.items.indexOf(item);
  if (i >= 0) room.items.splice(i, 1);
  item.el?.remove();
}

function isNearBottom() {
  const l = el.messageList;
  return l.scrollHeight - l.scrollTop - l.clientHeight < 60;
}
function scrollToBottom() {
  const l = el.messageList;
  l.scrollTop = l.scrollHeight;
  const room = cur();
  if (room) { room.atBottom = true; room.newCount = 0; }
  el.newMessagesButton.hidden = true;
}

/**
 * Apply changes to a room's timeline. For the visible room: stick to the bottom when the
 * user was there, otherwise keep the first visible item where it was (manual scroll anchoring).
 */
function mutateTimeline(room, fn, { bulk = false, toBottom = false } = {}) {
  if (room.id !== S.current || S.mutating) { fn(); return; } // nested calls: the outer one anchors
  const list = el.messageList;
  const stick = toBottom || isNearBottom();
  let anchor = null;
  let anchorTop = 0;
  if (!stick) {
    const top = list.getBoundingClientRect().top;
    for (const child of list.children) {
      if (child.classList.contains('history-edge')) continue; // always first: useless as an anchor
      const r = child.getBoundingClientRect();
      if (r.bottom > top) { anchor = child; anchorTop = r.top; break; }
    }
  }
  if (bulk) list.setAttribute('aria-busy', 'true');
  S.mutating = true;
  try { fn(); } finally {
    S.mutating = false;
    if (bulk) list.removeAttribute('aria-busy');
  }
  if (stick) scrollToBottom();
  else if (anchor?.isConnected) list.scrollTop += anchor.getBoundingClientRect().top - anchorTop;
}

function insertMessage(room, msg, { live }) {
  if (msg.id) room.byId.set(msg.id, msg);
  const key = msg.seq != null ? msg.seq : PENDING_KEY_BASE + ++S.pendingSeq;
  const item = { key, kind: 'msg', msg, el: null };
  msg.item = item;
  buildMsgEl(room, msg);
  item.el = msg.el;
  if (room.id !== S.current) { insertItem(room, item); return; }
  const wasBottom = live && !S.mutating ? isNearBottom() : true;
  mutateTimeline(room, () => insertItem(room, item));
  if (live && !wasBottom && !isMine(msg)) {
    room.newCount++;
    el.newMessagesButton.textContent = `${plural(room.newCount, 'new message', 'new messages')} ↓`;
    el.newMessagesButton.hidden = false;
  }
  if (live) scheduleRead();
}

function addSystem(room, text, seq, kind = 'info') {
  let key;
  if (typeof seq === 'number') {
    if (room.sysSeen.has(seq)) return;
    room.sysSeen.add(seq);
    key = seq;
  } else {
    // Ephemeral events sit just after the latest stored event seen so far, in arrival order.
    let last = 0;
    for (let i = room.items.length - 1; i >= 0; i--) {
      const k = room.items[i].key;
      if (Number.isFinite(k) && k < PENDING_KEY_BASE) { last = Math.floor(k); break; }
    }
    const base = Math.max(room.lastSeq, last);
    if (base !== room.sysBase) { room.sysBase = base; room.sysN = 0; }
    key = base + (1 - 1 / (++room.sysN + 1));
  }
  const now = new Date().toISOString();
  const node = h('li', { class: `system system-${kind}`, dataset: { seq: typeof seq === 'number' ? seq : null } },
    h('span', { class: 'system-text' }, text), h('time', { class: 'time', datetime: now }, fmtTime(now)));
  mutateTimeline(room, () => insertItem(room, { key, kind: 'sys', el: node }));
}

function setEdge(room, state) {
  if (!room.edgeEl) {
    room.edgeEl = h('li', { class: 'history-edge' });
    insertItem(room, { key: EDGE_KEY, kind: 'edge', el: room.edgeEl });
  }
  const node = room.edgeEl;
  node.dataset.state = state;
  if (state === 'loading') node.replaceChildren(h('span', { class: 'spinner', 'aria-hidden': 'true' }), 'Loading messages…');
  else if (state === 'start') fill(node, h('span', { class: 'edge-title' }, `This is the beginning of ${room.name || room.id}.`), room.topic ? h('span', { class: 'edge-topic' }, room.topic) : null);
  else if (state === 'error') node.replaceChildren('Could not load messages. ', h('button', { type: 'button', class: 'btn-link', onclick: () => loadOlder(room) }, 'Try again'));
  else node.replaceChildren();
}

function renderTimeline() {
  const room = cur();
  const list = el.messageList;
  if (!room) { list.replaceChildren(); return; }
  list.replaceChildren(...room.items.map((i) => i.el));
  if (room.scrollTop == null || room.atBottom) scrollToBottom();
  else list.scrollTop = room.scrollTop;
  el.newMessagesButton.hidden = !room.newCount;
}

function buildMsgEl(room, msg) {
  msg.el = h('li', { class: 'msg', tabindex: '-1' });
  updateMsgEl(room, msg);
  return msg.el;
}

function updateMsgEl(room, msg) {
  const node = msg.el;
  if (!node) return;
  const mine = isMine(msg);
  const pinned = room.pins.some((p) => p.id === msg.id);
  node.className = `msg${mine ? ' own' : ''}${msg.deleted ? ' deleted' : ''}${pinned ? ' pinned' : ''} status-${msg.status}`;
  if (msg.id) node.dataset.id = msg.id; else node.dataset.id = msg.clientId || '';
  if (msg.seq != null) node.dataset.seq = String(msg.seq); else delete node.dataset.seq;
  if (msg.clientId) node.dataset.clientMsgId = msg.clientId;
  node.dataset.user = msg.user.id;
  node.dataset.status = msg.status;
  if (msg.deleted) node.dataset.deleted = 'true'; else delete node.dataset.deleted;

  const time = h('time', { class: 'time', datetime: msg.ts || null, title: msg.ts ? fmtFull(msg.ts) : null }, fmtTime(msg.ts));
  const meta = h('div', { class: 'meta' },
    h('span', { class: 'author' }, msg.user.name || msg.user.id),
    time,
    msg.editedAt && !msg.deleted ? h('span', { class: 'edited', title: typeof msg.editedAt === 'string' ? `Edited ${fmtFull(msg.editedAt)}` : 'Edited' }, '(edited)') : null,
    pinned ? h('span', { class: 'pinned-mark', title: 'Pinned' }, icon('pin', 'icon icon-xs'), h('span', { class: 'visually-hidden' }, 'pinned')) : null);

  let reply = null;
  if (msg.replyTo) {
    const target = room.byId.get(msg.replyTo);
    reply = h('div', { class: 'reply-to' }, '↪ ', target ? `${target.user.name}: ${target.deleted ? 'deleted message' : target.content.slice(0, 80)}` : 'a message');
  }

  let content;
  if (S.editing?.msg === msg) {
    if (!S.editing.node) S.editing.node = buildEditor(room, msg);
    content = S.editing.node;
  } else if (msg.deleted) {
    content = h('div', { class: 'content deleted-text' }, 'This message was deleted.');
  } else {
    content = h('div', { class: 'content' }, msg.content); // text only
  }

  const footer = [];
  if (mine) footer.push(h('span', { class: 'ticks' }));
  if (msg.status === 'pending') footer.push(h('span', { class: 'send-state' }, 'Sending…'));
  if (msg.status === 'failed') {
    footer.push(h('span', { class: 'send-state failed', title: msg.error || '' }, 'Not sent. '),
      h('button', { type: 'button', class: 'btn-link', dataset: { action: 'retry' }, onclick: () => retryMessage(room, msg) }, 'Retry'),
      h('button', { type: 'button', class: 'btn-link', dataset: { action: 'discard' }, onclick: () => discardMessage(room, msg) }, 'Discard'));
  }

  const actions = actionsFor(room, msg);
  const menuBtn = actions.length ? h('button', {
    type: 'button', class: 'msg-menu icon-btn', 'aria-label': 'Message actions', 'aria-haspopup': 'menu', 'aria-expanded': 'false',
    onclick: (e) => { e.stopPropagation(); toggleMenu(room, msg); },
  }, icon('more', 'icon')) : null;

  // One-click pin/unpin beside the menu for whoever may pin.
  const pinAction = actions.find((a) => a === 'pin' || a === 'unpin');
  const pinBtn = pinAction ? h('button', {
    type: 'button', class: `msg-pin icon-btn${pinAction === 'unpin' ? ' active' : ''}`, dataset: { action: pinAction },
    'aria-label': pinAction === 'pin' ? 'Pin message' : 'Unpin message', title: pinAction === 'pin' ? 'Pin' : 'Unpin',
    'aria-pressed': pinAction === 'unpin' ? 'true' : 'false',
    onclick: (e) => { e.stopPropagation(); messageAction(room, msg, pinAction); },
  }, icon('pin', 'icon')) : null;

  const focusedEditor = S.editing?.msg === msg && S.editing.node?.contains(document.activeElement) ? document.activeElement : null;
  fill(node,
    avatar(msg.user),
    h('div', { class: 'msg-body' }, meta, reply, content, footer.length ? h('div', { class: 'msg-foot' }, footer) : null),
    pinBtn || menuBtn ? h('div', { class: 'msg-tools' }, pinBtn, menuBtn) : null);
  focusedEditor?.focus({ preventScroll: true });
  if (S.openMenu?.msg === msg) {
    if (menuBtn) {
      node.append(S.openMenu.menu);
      menuBtn.setAttribute('aria-expanded', 'true');
      S.openMenu.button = menuBtn;
    } else {
      S.openMenu = null;
    }
  }
  if (mine) updateTicks(room, msg);
}

function actionsFor(room, msg) {
  if (!msg.id || msg.seq == null || msg.status !== 'sent' || msg.deleted || !room.joined) return [];
  const out = [];
  if (canPin(room)) out.push(room.pins.some((p) => p.id === msg.id) ? 'unpin' : 'pin');
  if (isMine(msg)) out.push('edit');
  if (isMine(msg) || roomAdmin(room)) out.push('delete');
  return out;
}

function refreshAllMsgs(room) {
  for (const it of room.items) if (it.kind === 'msg') updateMsgEl(room, it.msg);
}

function updateTicks(room, msg) {
  const t = msg.el && $('.ticks', msg.el);
  if (!t) return;
  if (msg.status !== 'sent' || msg.seq == null) {
    t.textContent = '';
    t.removeAttribute('title');
    t.dataset.readBy = '0';
    return;
  }
  const readers = [];
  for (const [uid, seq] of room.markers) if (uid !== S.me.id && seq >= msg.seq) readers.push(nameOf(uid));
  if (readers.length) {
    t.textContent = '✓✓';
    t.classList.add('read');
    t.title = `Read by ${readers.length}: ${readers.sort().join(', ')}`;
    t.setAttribute('aria-label', t.title);
  } else {
    t.textContent = '✓';
    t.classList.remove('read');
    t.title = 'Sent';
    t.setAttribute('aria-label', 'Sent');
  }
  t.dataset.readBy = String(readers.length);
}
function refreshTicks(room) {
  for (const it of room.items) if (it.kind === 'msg' && isMine(it.msg)) updateTicks(room, it.msg);
}

// ---- optimistic send ---------------------------------------------------------

function ackMessage(meta, f) {
  const room = getRoom(meta.room, false);
  if (!room) return;
  const msg = meta.msg;
  settleMessage(room, msg, { id: f.id != null ? String(f.id) : msg.id, seq: typeof f.seq === 'number' ? f.seq : Number(f.seq), ts: f.ts || msg.ts });
}

/** Turn a pending message into a stored one (on ack or on its own `message` echo). */
function settleMessage(room, msg, stored) {
  clearTimeout(msg.ackTimer);
  if (msg.clientId) room.pending.delete(msg.clientId);
  const id = stored.id != null ? String(stored.id) : msg.id;
  const dup = id && room.byId.get(id);
  if (dup && dup !== msg) {
    // The echo already rendered it: keep one copy.
    removeItem(room, msg.item);
    dup.status = 'sent';
    updateMsgEl(room, dup);
    return;
  }
  msg.id = id;
  if (Number.isFinite(stored.seq)) msg.seq = stored.seq;
  if (stored.ts) msg.ts = stored.ts;
  if (stored.content !== undefined && stored.user) msg.content = stored.content;
  msg.status = 'sent';
  msg.error = null;
  if (msg.id) room.byId.set(msg.id, msg);
  if (msg.seq != null) {
    room.lastSeq = Math.max(room.lastSeq, msg.seq);
    if (msg.item && msg.item.key !== msg.seq) {
      mutateTimeline(room, () => {
        removeItem(room, msg.item);
        msg.item.key = msg.seq;
        insertItem(room, msg.item);
      });
    }
  }
  updateMsgEl(room, msg);
}

function transmit(room, msg) {
  clearTimeout(msg.ackTimer);
  msg.status = 'pending';
  msg.error = null;
  updateMsgEl(room, msg);
  if (S.conn !== 'connected' || !room.joined) return; // goes out again after (re)join
  const frame = { type: 'message', room: room.id, content: msg.content, client_msg_id: msg.clientId };
  if (msg.replyTo) frame.reply_to = msg.replyTo;
  msg.ref = send(frame, { kind: 'message', room: room.id, msg });
  msg.ackTimer = setTimeout(() => {
    if (msg.status === 'pending' && S.conn === 'connected') markFailed(room, msg, 'No answer from the server.');
  }, ACK_TIMEOUT_MS);
}

function markFailed(room, msg, why) {
  clearTimeout(msg.ackTimer);
  msg.status = 'failed';
  msg.error = why;
  updateMsgEl(room, msg);
}
function retryMessage(room, msg) {
  msg.retries = 0;
  transmit(room, msg);
}
function discardMessage(room, msg) {
  room.pending.delete(msg.clientId);
  removeItem(room, msg.item);
}

function sendComposer() {
  const room = cur();
  if (!room || el.composer.disabled) return;
  const content = el.composer.value.replace(/\s+$/, '');
  if (!content.trim()) return;
  const max = Number(S.limits?.max_content_chars) || 0;
  if (max && [...content].length > max) {
    toast(`Message is too long (${[...content].length} / ${max} characters).`, { code: 'too_large' });
    return;
  }
  const msg = {
    room: room.id, id: null, seq: null, ts: new Date().toISOString(), user: { ...S.me },
    content, editedAt: null, deleted: false, replyTo: null, clientId: uuid(), status: 'pending', ref: null, el: null, item: null,
  };
  room.pending.set(msg.clientId, msg);
  insertMessage(room, msg, { live: false });
  scrollToBottom();
  transmit(room, msg);
  el.composer.value = '';
  room.draft = '';
  autosize();
  stopTyping();
}

// ---- typing (mine) -----------------------------------------------------------

function onComposerInput() {
  autosize();
  const room = cur();
  if (!room) return;
  room.draft = el.composer.value;
  if (!room.joined || S.conn !== 'connected') return;
  if (!el.composer.value.trim()) { stopTyping(); return; }
  if (S.typing && S.typing.room !== room.id) stopTyping();
  if (!S.typing) S.typing = { room: room.id, sentAt: 0, idle: null };
  const now = Date.now();
  if (now - S.typing.sentAt >= TYPING_REPEAT_MS) {
    send({ type: 'typing', room: room.id }, { kind: 'typing', room: room.id });
    S.typing.sentAt = now;
  }
  clearTimeout(S.typing.idle);
  S.typing.idle = setTimeout(stopTyping, TYPING_IDLE_MS);
}
function stopTyping() {
  if (!S.typing) return;
  clearTimeout(S.typing.idle);
  send({ type: 'stop_typing', room: S.typing.room }, { kind: 'stop_typing', room: S.typing.room });
  S.typing = null;
}

function autosize() {
  const c = el.composer;
  c.style.height = 'auto';
  c.style.height = `${Math.min(c.scrollHeight, 200)}px`;
}

// ---- read markers ------------------------------------------------------------

function scheduleRead() {
  clearTimeout(S.readTimer);
  S.readTimer = setTimeout(sendRead, READ_DEBOUNCE_MS);
}
function highestVisibleSeq(room) {
  const bounds = el.messageList.getBoundingClientRect();
  for (let i = room.items.length - 1; i >= 0; i--) {
    const it = room.items[i];
    if (it.kind !== 'msg' || it.msg.seq == null || !it.el?.isConnected) continue;
    const r = it.el.getBoundingClientRect();
    if (r.top < bounds.bottom - 2) return r.bottom > bounds.top ? it.msg.seq : 0;
  }
  return 0;
}
function sendRead() {
  const room = cur();
  if (!room || !room.joined || document.visibilityState !== 'visible' || S.conn !== 'connected') return;
  const seq = highestVisibleSeq(room);
  if (seq > room.readSent && !S.unsupported.has('read')) {
    room.readSent = seq;
    send({ type: 'read', room: room.id, seq }, { kind: 'read', room: room.id });
  }
  if (room.unread && isNearBottom()) { room.unread = 0; renderRoomItem(room); renderTitle(); }
}

// ---- navigation --------------------------------------------------------------

function selectRoom(id) {
  const prev = cur();
  if (prev) {
    prev.scrollTop = el.messageList.scrollTop;
    prev.atBottom = isNearBottom();
    prev.draft = el.composer.value;
  }
  if (S.typing) stopTyping();
  closeMenu();
  S.editing = null;
  const room = getRoom(id);
  S.current = room.id;
  // The address names the open room, so it can be bookmarked or shared (#room=ID).
  const hash = `#room=${room.id}`;
  if (location.hash !== hash) history.replaceState(null, '', `${location.pathname}${location.search}${hash}`);
  room.unread = 0;
  room.newCount = 0;
  saveRooms();
  if (!room.want) { room.want = true; saveRooms(); }
  if (!room.joined && !room.joining && S.conn === 'connected' && !room.banned) sendJoin(room);
  if (!room.edgeEl) setEdge(room, room.synced ? (room.nextBefore == null ? 'start' : 'more') : 'loading');
  renderTimeline();
  renderRoomList();
  renderMain();
  el.composer.value = room.draft || '';
  autosize();
  closeSidebar();
  if (room.synced) { fillViewport(room); scheduleRead(); }
}

async function jumpTo(room, id, seq) {
  if (room.id !== S.current) selectRoom(room.id);
  let msg = room.byId.get(id);
  for (let guard = 0; !msg?.el?.isConnected && guard < 40; guard++) {
    if (room.nextBefore == null && room.synced) break;
    const oldest = room.items.find((i) => i.kind === 'msg' && i.msg.seq != null)?.msg.seq;
    if (seq != null && oldest != null && oldest <= seq && room.synced) break;
    await loadOlder(room);
    msg = room.byId.get(id);
  }
  if (!msg?.el?.isConnected) { toast('That message is not available any more.', { kind: 'info' }); return; }
  msg.el.scrollIntoView({ block: 'center' });
  room.atBottom = isNearBottom();
  msg.el.classList.remove('flash');
  void msg.el.offsetWidth; // restart the animation
  msg.el.classList.add('flash');
  msg.el.focus({ preventScroll: true });
}

// ---- menus -------------------------------------------------------------------

function closeMenu() {
  if (!S.openMenu) return;
  const { menu, button } = S.openMenu;
  menu.remove();
  button.setAttribute('aria-expanded', 'false');
  S.openMenu = null;
}

function toggleMenu(room, msg) {
  if (S.openMenu?.msg === msg) { closeMenu(); return; }
  closeMenu();
  const button = $('.msg-menu', msg.el);
  if (!button) return;
  const labels = { pin: 'Pin message', unpin: 'Unpin message', edit: 'Edit message', delete: 'Delete message' };
  const menu = h('div', { class: 'menu', role: 'menu' }, actionsFor(room, msg).map((a) => h('button', {
    type: 'button', role: 'menuitem', class: `menu-item${a === 'delete' ? ' danger' : ''}`, dataset: { action: a },
    onclick: (e) => { e.stopPropagation(); closeMenu(); messageAction(room, msg, a); },
  }, labels[a])));
  menu.addEventListener('keydown', (e) => {
    const items = [...menu.querySelectorAll('[role=menuitem]')];
    const i = items.indexOf(document.activeElement);
    if (e.key === 'Escape') { e.preventDefault(); const b = S.openMenu?.button; closeMenu(); b?.focus(); }
    else if (e.key === 'ArrowDown') { e.preventDefault(); items[(i + 1) % items.length]?.focus(); }
    else if (e.key === 'ArrowUp') { e.preventDefault(); items[(i - 1 + items.length) % items.length]?.focus(); }
  });
  msg.el.append(menu);
  button.setAttribute('aria-expanded', 'true');
  S.openMenu = { menu, button, msg };
  menu.querySelector('[role=menuitem]')?.focus({ preventScroll: true });
}

function messageAction(room, msg, action) {
  if (S.conn !== 'connected') { toast('Not connected.', { kind: 'info' }); return; }
  if (action === 'pin' || action === 'unpin' || action === 'delete') {
    send({ type: action, room: room.id, id: msg.id }, { kind: action, room: room.id });
  } else if (action === 'edit') {
    if (S.editing && S.editing.msg !== msg) { const prev = S.editing.msg; S.editing = null; updateMsgEl(room, prev); }
    S.editing = { msg, node: null };
    updateMsgEl(room, msg);
    const ta = $('.edit-box textarea', msg.el);
    ta?.focus();
    ta?.setSelectionRange(ta.value.length, ta.value.length);
  }
}

function buildEditor(room, msg) {
  const ta = h('textarea', { class: 'edit-input', rows: '2', 'aria-label': 'Edit message' });
  ta.value = msg.content;
  const done = (save) => {
    const text = ta.value.replace(/\s+$/, '');
    S.editing = null;
    if (save && text.trim() && text !== msg.content) {
      send({ type: 'edit', room: room.id, id: msg.id, content: text }, { kind: 'edit', room: room.id });
    }
    updateMsgEl(room, msg);
    msg.el.focus({ preventScroll: true });
  };
  ta.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); done(true); }
    else if (e.key === 'Escape') { e.preventDefault(); done(false); }
  });
  return h('div', { class: 'content edit-box' }, ta,
    h('div', { class: 'edit-actions' },
      h('button', { type: 'button', class: 'btn btn-ghost btn-sm', onclick: () => done(false) }, 'Cancel'),
      h('button', { type: 'button', class: 'btn btn-primary btn-sm', dataset: { action: 'save' }, onclick: () => done(true) }, 'Save')));
}

// Deleting a room takes two clicks (no blocking confirm() dialog): the first arms the button.
function disarmDeleteRoom() {
  const b = el.deleteRoomButton;
  clearTimeout(S.deleteArmTimer);
  delete b.dataset.armed;
  b.textContent = 'Delete room';
}
function onDeleteRoomClick() {
  const room = cur();
  const b = el.deleteRoomButton;
  if (!room) return;
  if (b.dataset.armed !== 'true' || b.dataset.room !== room.id) {
    b.dataset.armed = 'true';
    b.dataset.room = room.id;
    b.textContent = 'Click again to delete';
    clearTimeout(S.deleteArmTimer);
    S.deleteArmTimer = setTimeout(disarmDeleteRoom, 4000);
    return;
  }
  disarmDeleteRoom();
  if (S.conn !== 'connected') { toast('Not connected.', { kind: 'info' }); return; }
  send({ type: 'delete_room', room: room.id }, { kind: 'delete_room', room: room.id });
}

function moderate(room, action, userId, name) {
  if (S.conn !== 'connected') { toast('Not connected.', { kind: 'info' }); return; }
  send({ type: action, room: room.id, user: userId }, { kind: action, room: room.id });
  const verbs = { kick: 'Removing', ban: 'Banning', mute: 'Muting', unmute: 'Unmuting' };
  toast(`${verbs[action] || action} ${name}…`, { kind: 'info', ttl: 2500 });
}

// ---- toasts ------------------------------------------------------------------

function toast(text, { kind = 'error', code = null, ttl = 6000 } = {}) {
  const node = h('div', { class: `toast toast-${kind}`, role: kind === 'error' ? 'alert' : 'status', dataset: { code } },
    h('span', { class: 'toast-text' }, text),
    h('button', { type: 'button', class: 'icon-btn toast-close', 'aria-label': 'Dismiss', onclick: () => node.remove() }, '×'));
  el.toasts.append(node);
  while (el.toasts.children.length > 4) el.toasts.firstElementChild.remove();
  setTimeout(() => node.remove(), ttl);
}

// ---- create room -------------------------------------------------------------

let idEdited = false;
function openCreateDialog() {
  el.createRoomForm.reset();
  idEdited = false;
  el.createRoomError.hidden = true;
  el.createRoomSubmit.disabled = false;
  el.createRoomSubmit.textContent = 'Create room';
  el.newRoomVisibilityHint.textContent = VIS_HINT[el.newRoomVisibility.value];
  if (typeof el.createRoomDialog.showModal === 'function') el.createRoomDialog.showModal();
  else el.createRoomDialog.setAttribute('open', '');
  el.newRoomName.focus();
}
function closeCreateDialog() {
  if (el.createRoomDialog.open) el.createRoomDialog.close();
}
function showCreateError(text) {
  el.createRoomError.textContent = text;
  el.createRoomError.hidden = false;
  el.createRoomSubmit.disabled = false;
  el.createRoomSubmit.textContent = 'Create room';
}
function submitCreateRoom(e) {
  e.preventDefault();
  const name = el.newRoomName.value.trim();
  const id = el.newRoomId.value.trim();
  const visibility = el.newRoomVisibility.value;
  const topic = el.newRoomTopic.value.trim();
  const max = el.newRoomMax.value.trim();
  if (!name) { showCreateError('Give the room a name.'); el.newRoomName.focus(); return; }
  if (!/^[a-z0-9_-]{1,64}$/.test(id)) { showCreateError('The room ID must be 1–64 characters of a–z, 0–9, “-” or “_”.'); el.newRoomId.focus(); return; }
  if (max && !(Number.isInteger(Number(max)) && Number(max) > 0)) { showCreateError('Max members must be a positive whole number.'); el.newRoomMax.focus(); return; }
  if (S.conn !== 'connected') { showCreateError('Not connected. Try again in a moment.'); return; }
  const frame = { type: 'create_room', room: id, name, visibility };
  if (topic) frame.topic = topic;
  if (max) frame.max_members = Number(max);
  S.pendingCreate = { roomId: id };
  el.createRoomError.hidden = true;
  el.createRoomSubmit.disabled = true;
  el.createRoomSubmit.textContent = 'Creating…';
  send(frame, { kind: 'create_room', roomId: id });
}

// ---- sidebar / members panel (narrow screens) -------------------------------

function openSidebar() {
  document.body.classList.add('sidebar-open');
  el.sidebarToggle.setAttribute('aria-expanded', 'true');
  el.scrim.hidden = false;
  el.roomList.querySelector('button')?.focus();
}
function closeSidebar() {
  if (!document.body.classList.contains('sidebar-open')) return;
  document.body.classList.remove('sidebar-open');
  el.sidebarToggle.setAttribute('aria-expanded', 'false');
  el.scrim.hidden = !document.body.classList.contains('members-open');
}
function toggleMembers() {
  const narrow = matchMedia('(max-width: 1023px)').matches;
  if (narrow) {
    const open = !document.body.classList.contains('members-open');
    document.body.classList.toggle('members-open', open);
    el.scrim.hidden = !open && !document.body.classList.contains('sidebar-open');
    el.membersToggle.setAttribute('aria-expanded', String(open));
  } else {
    const hidden = document.body.classList.toggle('members-hidden');
    el.membersToggle.setAttribute('aria-expanded', String(!hidden));
  }
}
function closeOverlays() {
  document.body.classList.remove('sidebar-open', 'members-open');
  el.sidebarToggle.setAttribute('aria-expanded', 'false');
  el.scrim.hidden = true;
}

// ---- sign in / out -----------------------------------------------------------

let tokenMode = false;
function setTokenMode(on, why) {
  tokenMode = on;
  el.loginNameGroup.hidden = on;
  el.loginTokenGroup.hidden = !on;
  el.loginModeToggle.textContent = on ? 'Sign in with a display name instead' : 'Use an access token instead';
  el.loginSub.textContent = on ? 'Paste an access token to continue.' : 'Pick a display name to start chatting.';
  if (why) showLoginError(why, 'info');
  else el.loginError.hidden = true;
  (on ? el.loginToken : el.loginName).focus();
}
function showLoginError(text, kind = 'error') {
  el.loginError.textContent = text;
  el.loginError.dataset.kind = kind;
  el.loginError.hidden = false;
}

async function onLoginSubmit(e) {
  e.preventDefault();
  el.loginError.hidden = true;
  if (tokenMode) {
    const t = el.loginToken.value.trim().replace(/^Bearer\s+/i, '');
    if (!t) { showLoginError('Paste a token first.'); el.loginToken.focus(); return; }
    startSession(t);
    return;
  }
  const name = el.loginName.value.trim();
  if (!name) { showLoginError('Enter a display name.'); el.loginName.focus(); return; }
  el.loginButton.disabled = true;
  el.loginButton.textContent = 'Signing in…';
  try {
    const res = await fetch('/api/dev/token', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
      body: JSON.stringify({ name }),
    });
    // 404 per the protocol; 401/403/405/501 from a proxy or an auth layer mean the same here.
    if ([401, 403, 404, 405, 501].includes(res.status)) {
      setTokenMode(true, 'This server does not hand out development tokens. Paste an access token instead.');
      return;
    }
    let body = null;
    try { body = await res.json(); } catch { /* not JSON */ }
    if (!res.ok || !body?.token) throw new Error(body?.error?.message || `Sign-in failed (HTTP ${res.status}).`);
    startSession(body.token);
  } catch (err) {
    showLoginError(err.message === 'Failed to fetch' ? 'Cannot reach the server.' : err.message);
  } finally {
    el.loginButton.disabled = false;
    el.loginButton.textContent = 'Sign in';
  }
}

function startSession(token) {
  const claims = decodeJwtPayload(token);
  S.token = token;
  S.claims = claims || {};
  if (tokenExpired()) {
    S.token = null;
    try { sessionStorage.removeItem(TOKEN_KEY); } catch { /* ignore */ }
    showLogin('That token has expired. Sign in again.');
    return;
  }
  try { sessionStorage.setItem(TOKEN_KEY, token); } catch { /* ignore */ }
  S.me = { id: String(claims?.sub ?? ''), name: String(claims?.name || claims?.sub || '') };
  rememberUser(S.me);
  S.globalAdmin = Array.isArray(claims?.roles) && claims.roles.includes('admin');
  let wanted = [];
  try { wanted = JSON.parse(sessionStorage.getItem(ROOMS_KEY) || '[]'); } catch { /* ignore */ }
  for (const id of Array.isArray(wanted) ? wanted : []) getRoom(id).want = true;
  // A link to a room (#room=ID) opens it even when it is not listed (private rooms, new rooms).
  if (validRoomId(S.fragmentRoom)) getRoom(S.fragmentRoom).want = true;
  S.wantedOnLoad = S.fragmentRoom || sessionStorage.getItem(CURRENT_KEY);
  if (S.wantedOnLoad && getRoom(S.wantedOnLoad, false)?.want) {
    const id = S.wantedOnLoad;
    S.wantedOnLoad = null;
    selectRoom(id);
  }
  showApp();
  connect();
  // The room list also comes over HTTP, so it shows even before the socket is up.
  api('/api/rooms').then((data) => {
    if (S.token === token && !S.roomsLoaded) onRooms({ rooms: Array.isArray(data) ? data : data?.rooms });
  }).catch(() => { /* the socket's list_rooms will do */ });
}

function signOut(message) {
  S.token = null;
  try {
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(ROOMS_KEY);
    sessionStorage.removeItem(CURRENT_KEY);
  } catch { /* ignore */ }
  clearTimeout(S.reconnectTimer);
  S.reconnectTimer = null;
  const ws = S.ws;
  S.ws = null;
  try { ws?.close(1000, 'sign out'); } catch { /* ignore */ }
  stopHeartbeat();
  S.rooms.clear();
  S.current = null;
  S.roomsLoaded = false;
  S.refs.clear();
  el.messageList.replaceChildren();
  setConn('offline');
  showLogin(message);
}

function showLogin(message) {
  el.app.hidden = true;
  el.loginScreen.hidden = false;
  document.title = 'Sign in · Chat';
  if (message) showLoginError(message, 'info');
  el.loginName.focus();
}
function showApp() {
  el.loginScreen.hidden = true;
  el.app.hidden = false;
  renderMe();
  renderRoomList();
  renderMain();
}

// ---------------------------------------------------------------------------
// 7. wiring

function wire() {
  el.loginForm.addEventListener('submit', onLoginSubmit);
  el.loginModeToggle.addEventListener('click', () => setTokenMode(!tokenMode));
  el.signoutButton.addEventListener('click', () => signOut());

  el.composerForm.addEventListener('submit', (e) => { e.preventDefault(); sendComposer(); el.composer.focus(); });
  el.composer.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      sendComposer();
    }
  });
  el.composer.addEventListener('input', onComposerInput);
  el.composer.addEventListener('blur', () => { if (S.typing && !el.composer.value.trim()) stopTyping(); });
  el.joinButton.addEventListener('click', () => {
    const room = cur();
    if (!room || S.conn !== 'connected') return;
    room.want = true;
    saveRooms();
    sendJoin(room);
    renderComposer();
  });
  el.deleteRoomButton.addEventListener('click', onDeleteRoomClick);
  el.leaveButton.addEventListener('click', () => {
    const room = cur();
    if (!room) return;
    room.want = false;
    saveRooms();
    if (room.joined) send({ type: 'leave', room: room.id }, { kind: 'leave', room: room.id });
    else { room.joining = false; renderRoomList(); renderMain(); }
  });

  el.messageList.addEventListener('scroll', () => {
    const room = cur();
    if (!room) return;
    room.atBottom = isNearBottom();
    room.scrollTop = el.messageList.scrollTop;
    if (room.atBottom) { room.newCount = 0; el.newMessagesButton.hidden = true; }
    if (el.messageList.scrollTop < 200 && room.synced && room.nextBefore != null) loadOlder(room);
    scheduleRead();
  }, { passive: true });
  el.newMessagesButton.addEventListener('click', () => { scrollToBottom(); scheduleRead(); el.composer.focus(); });

  el.noticeDismiss.addEventListener('click', () => { el.noticeBanner.hidden = true; });

  el.createRoomButton.addEventListener('click', openCreateDialog);
  el.createRoomCancel.addEventListener('click', () => { S.pendingCreate = null; closeCreateDialog(); });
  el.createRoomForm.addEventListener('submit', submitCreateRoom);
  el.newRoomName.addEventListener('input', () => { if (!idEdited) el.newRoomId.value = slugify(el.newRoomName.value); });
  el.newRoomId.addEventListener('input', () => { idEdited = el.newRoomId.value !== ''; });
  el.newRoomVisibility.addEventListener('change', () => { el.newRoomVisibilityHint.textContent = VIS_HINT[el.newRoomVisibility.value]; });

  el.sidebarToggle.addEventListener('click', openSidebar);
  el.sidebarClose.addEventListener('click', closeSidebar);
  el.membersToggle.addEventListener('click', toggleMembers);
  el.membersClose.addEventListener('click', closeOverlays);
  el.scrim.addEventListener('click', closeOverlays);

  document.addEventListener('click', (e) => { if (S.openMenu && !S.openMenu.menu.contains(e.target)) closeMenu(); });
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape') {
      if (S.openMenu) { const b = S.openMenu.button; closeMenu(); b.focus(); }
      else if (document.body.classList.contains('sidebar-open') || document.body.classList.contains('members-open')) closeOverlays();
    }
  });
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible') {
      const room = cur();
      if (room) { room.unread = 0; renderRoomItem(room); renderTitle(); }
      scheduleRead();
      if (S.token && !S.ws && S.reconnectTimer && S.attempt > 3) { S.attempt = 0; connect(); }
    }
  });
  window.addEventListener('hashchange', () => {
    const id = new URLSearchParams(location.hash.slice(1)).get('room');
    if (S.token && validRoomId(id) && id !== S.current) selectRoom(id);
  });
  window.addEventListener('online', () => { if (S.token && !S.ws) { S.attempt = 0; connect(); } });
  // The network is gone: do not wait for a heartbeat to notice; reconnect when it is back.
  window.addEventListener('offline', () => {
    if (!S.token) return;
    if (S.ws) dropSocket(4000, 'browser offline');
    else setConn('offline', 'Offline · waiting for the network');
  });
}

function boot() {
  bindElements();
  wire();
  el.newRoomVisibilityHint.textContent = VIS_HINT.public;
  // Token (and optionally a room) may come in the URL fragment: #token=...&room=lobby
  const frag = new URLSearchParams(location.hash.slice(1));
  const fragToken = frag.get('token');
  S.fragmentRoom = frag.get('room');
  if (fragToken) {
    frag.delete('token');
    const rest = frag.toString();
    history.replaceState(null, '', location.pathname + location.search + (rest ? `#${rest}` : ''));
  }
  let stored = null;
  try { stored = sessionStorage.getItem(TOKEN_KEY); } catch { /* ignore */ }
  const token = fragToken || stored;
  if (token) startSession(token);
  else showLogin();
}

boot();
