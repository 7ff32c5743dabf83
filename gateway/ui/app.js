// Chat web client: one ES module on top of the client library (/client.js, the same file as
// clients/js/chat-client.js), no build step, same origin only.
//
// The library owns the protocol: the socket, reconnects with backoff, re-joins with `since`,
// re-sending unacknowledged messages, the offline queue, matching answers to commands. This
// file owns what a person sees. Layout:
//   1. constants and small helpers (DOM builder, time formats, friendly error texts)
//   2. state: the session, the rooms (each with its own ordered timeline of items), permissions
//   3. connection: the client, the connection dot and the offline banner
//   4. event handlers, one per server frame `type`
//   5. history over HTTP: first page, older pages (infinite scroll), gap fill, unread counts
//   6. rendering: room list, header, timeline (day separators, grouping, "New messages"),
//      pins bar, typing line, people panel, composer
//   7. user actions: send, typing, read markers, message menus (hover, long-press), dialogs
//      (create room, settings, add member, bans, confirm), moderation, sign-in
//
// Safety rule: user data only ever reaches the DOM as text (textContent, text nodes,
// attribute values). The only innerHTML used is for constant SVG icons.

import { ChatClient, newId, tokenClaims } from '/client.js';

const TOKEN_KEY = 'chat.token';
const ROOMS_KEY = 'chat.rooms';
const LEFT_KEY = 'chat.left';
const CURRENT_KEY = 'chat.current';

const OFFLINE_AFTER_ATTEMPTS = 5; // failed reconnects in a row before the dot turns red
const TYPING_REPEAT_MS = 3000;
const TYPING_IDLE_MS = 2000;
const TYPING_EXPIRE_MS = 5000;
const READ_DEBOUNCE_MS = 500;
const LIST_REFRESH_MS = 30_000; // online counts of rooms we are not in come with the listing
const BANNED_RETRY_MS = [3000, 6000, 12_000, 30_000]; // a banned room on screen asks again
const LONG_PRESS_MS = 500;
const GROUP_GAP_MS = 5 * 60_000; // one author's messages closer than this form a group
const AUTO_JOIN_MAX = 50; // "my rooms" joined by themselves at sign-in (the server allows 100)
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

const validDate = (ts) => { const d = new Date(ts); return Number.isNaN(d.getTime()) ? null : d; };
/** Hours and minutes only; the full date is in the title (hover). */
function fmtTime(ts) {
  const d = ts && validDate(ts);
  return d ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }) : '';
}
function fmtFull(ts) {
  const d = ts && validDate(ts);
  return d ? d.toLocaleString([], { dateStyle: 'full', timeStyle: 'medium' }) : '';
}
const dayKey = (ts) => { const d = ts && validDate(ts); return d ? `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}` : ''; };
function fmtDay(ts) {
  const d = validDate(ts);
  if (!d) return '';
  const today = new Date();
  const yesterday = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 1);
  if (dayKey(d) === dayKey(today)) return 'Today';
  if (dayKey(d) === dayKey(yesterday)) return 'Yesterday';
  return d.toLocaleDateString([], { weekday: 'long', month: 'long', day: 'numeric', ...(d.getFullYear() !== today.getFullYear() ? { year: 'numeric' } : {}) });
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

// What a person reads when the server refuses something: never the server's own wording
// (it is written for developers), by error code and, where it helps, by what was attempted.
const FRIENDLY = {
  invalid: 'The server did not accept that. Check what you entered.',
  unauthorized: 'Your session has expired. Please sign in again.',
  forbidden: 'You do not have permission to do that.',
  not_found: 'That is not there any more.',
  conflict: 'That clashes with a change someone else made. Reload and try again.',
  too_large: 'That is too long.',
  rate_limited: 'You are going a bit fast. Wait a moment and try again.',
  muted: 'You are muted in this room.',
  banned: 'You are banned from this room.',
  room_full: 'This room is full.',
  unavailable: 'The server is busy. Try again in a moment.',
  internal: 'Something went wrong on the server. Try again.',
  disconnected: 'The connection dropped before the server answered. Check and try again.',
  timeout: 'The server did not answer in time. Try again.',
  queue_full: 'Too much is waiting to be sent. Wait until you are back online.',
  not_in_room: 'You are no longer in this room.',
  closed: 'You signed out.',
};
const FRIENDLY_FOR = {
  create_room: { conflict: 'That room ID is already taken. Pick another one.', invalid: 'Check the name, the room ID and the max members.' },
  message: { forbidden: 'Only members can post in this room.' },
  pin: { conflict: 'This message is already pinned, or the room has the most pins it can hold (50).', forbidden: 'Only admins can pin messages here.', not_found: 'That message was deleted.' },
  unpin: { not_found: 'That message is not pinned any more.', forbidden: 'Only admins can unpin messages here.' },
  edit: { forbidden: 'You can only edit your own messages.', not_found: 'That message was deleted.' },
  delete: { forbidden: 'You can only delete your own messages.', not_found: 'That message was already deleted.' },
  add_member: { conflict: 'They are already a member.', banned: 'That user is banned here. Unban them first.', forbidden: 'Only the room owner can add admins.', room_full: 'The room is full.', not_found: 'That room is gone.' },
  set_role: { forbidden: 'Only the room owner can change roles.', not_found: 'They are not a member any more.', invalid: 'That role cannot be given.' },
  kick: { forbidden: 'You cannot remove this person.' },
  remove_member: { forbidden: 'You cannot change this person\'s access.' },
  ban: { forbidden: 'You cannot ban this person.' },
  mute: { forbidden: 'You cannot mute this person.', not_found: 'They are not a member.' },
  unmute: { forbidden: 'You cannot unmute this person.' },
  unban: { not_found: 'They are not banned any more.' },
  update_room: { invalid: 'Check the settings: a name of up to 100 characters, a topic of up to 500, max members a positive number.', forbidden: 'Only the room\'s owner and admins can change its settings.' },
  delete_room: { forbidden: 'Only the room owner can delete it.' },
};
function friendly(err, action) {
  const code = err?.code || 'internal';
  if (code === 'rate_limited' && err.retryAfterMs) return `You are going a bit fast. Try again in ${Math.ceil(err.retryAfterMs / 1000)} s.`;
  return FRIENDLY_FOR[action]?.[code] || FRIENDLY[code] || FRIENDLY.internal;
}

// ---------------------------------------------------------------------------
// 2. state

const S = {
  token: null,
  claims: null,
  me: { id: '', name: '' },
  globalAdmin: false,
  client: null,
  conn: 'offline', // connected | reconnecting | offline
  everConnected: false,
  attempt: 0,
  limits: {},
  rooms: new Map(),
  roomsLoaded: false,
  current: null,
  users: new Map(), // id -> display name
  left: new Set(), // rooms left in this tab (not joined again by the listing)
  pendingSeq: 0,
  typing: null, // my own typing state { room, sentAt, idle }
  readTimer: null,
  openMenu: null, // { menu, msg, button }
  readers: null, // the open "Read by" popover
  editing: null,
  listTimer: null,
};

function newRoom(id) {
  return {
    id,
    name: id,
    topic: '',
    visibility: null, // unknown until the server says
    member_count: null,
    online_count: 0,
    max_members: null,
    members_can_pin: false,
    role: null, // my role: owner | admin | member; null: not a member
    want: false, // the user wants to be in this room (the client keeps it joined)
    joined: false, // the server confirmed with `joined` on the current connection
    joining: false,
    access: null, // why we are not in it: denied | banned | missing | full | error
    mutedMe: false,
    mutedUntil: null,
    synced: false, // the timeline is complete from some point up to lastSeq
    lastSeq: 0,
    readSent: 0,
    myMarker: null, // my read marker as far as known
    unreadBase: 0, // messages from others after my marker when the room was joined
    unreadLive: 0, // ... and since then
    unreadMore: false,
    dividerMarker: null, // my marker when the room was opened ("New messages" goes after it)
    dividerSeq: undefined,
    items: [], // sorted by key; {key, kind:'msg'|'sys'|'edge'|'day'|'divider', el, msg?}
    byId: new Map(),
    pending: new Map(), // client_msg_id -> msg
    sysSeen: new Set(),
    sysBase: -1,
    sysN: 0,
    nextBefore: undefined, // undefined: unknown, null: reached the start
    olderPromise: null,
    initialPromise: null,
    online: new Map(), // id -> name
    members: new Map(), // id -> {id,name,role,muted_until}
    membersLoaded: false,
    receiptsLoaded: false,
    pins: [], // [{id, seq, user, content, by, pinnedAt}], most recent first
    markers: new Map(), // user id -> seq
    typing: new Map(), // user id -> {name, timer}
    draft: '',
    scrollTop: null,
    atBottom: true,
    newCount: 0,
    edgeEl: null,
    decor: new Map(), // key -> day/divider item
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
  const id = String(u.id ?? '');
  return { id, name: u.name || S.users.get(id) || id };
}
function rememberUser(u) {
  if (u?.id && u.name && u.name !== u.id) S.users.set(u.id, u.name);
  else if (u?.id && !S.users.has(u.id)) S.users.set(u.id, u.name || u.id);
}
const nameOf = (id) => S.users.get(String(id)) || String(id);

function normMsg(m, roomId) {
  const user = normUser(m.user);
  rememberUser(user);
  return {
    room: String(m.room ?? roomId),
    id: m.id != null ? String(m.id) : null,
    seq: typeof m.seq === 'number' ? m.seq : (m.seq != null ? Number(m.seq) : null),
    ts: m.ts ?? null,
    user,
    content: m.deleted ? '' : (m.content ?? ''),
    editedAt: m.edited_at ?? null,
    deleted: !!m.deleted,
    replyTo: m.reply_to != null ? String(m.reply_to) : null,
    clientId: m.client_msg_id ?? null,
    status: 'sent',
    el: null,
    item: null,
  };
}

// Permissions, as docs/permissions.md describes them. The server decides; these only decide
// what the UI offers.
const roomAdmin = (room) => S.globalAdmin || room?.role === 'owner' || room?.role === 'admin';
const roomOwner = (room) => S.globalAdmin || room?.role === 'owner';
const isReader = (room) => !S.globalAdmin && room?.visibility === 'restricted' && !room.role;
const canPost = (room) => !room.access && !room.mutedMe && !isReader(room);
const canPin = (room) => roomAdmin(room) || (!!room?.members_can_pin && !!room?.role);
const isMine = (msg) => !!S.me.id && msg.user.id === S.me.id;
const unreadOf = (room) => room.unreadBase + room.unreadLive;

function saveRooms() {
  const want = [...S.rooms.values()].filter((r) => r.want).map((r) => r.id);
  try {
    sessionStorage.setItem(ROOMS_KEY, JSON.stringify(want));
    sessionStorage.setItem(LEFT_KEY, JSON.stringify([...S.left]));
    if (S.current) sessionStorage.setItem(CURRENT_KEY, S.current);
    else sessionStorage.removeItem(CURRENT_KEY);
  } catch { /* storage full or disabled */ }
}
function loadList(key) {
  try { const v = JSON.parse(sessionStorage.getItem(key) || '[]'); return Array.isArray(v) ? v : []; } catch { return []; }
}

// ---------------------------------------------------------------------------
// DOM references

const el = {};
function bindElements() {
  for (const id of [
    'login-screen', 'login-form', 'login-sub', 'login-name', 'login-name-group', 'login-token', 'login-token-group',
    'login-error', 'login-button', 'login-mode-toggle', 'app', 'sidebar', 'scrim', 'sidebar-toggle', 'sidebar-close',
    'room-list', 'create-room-button', 'me', 'me-avatar', 'me-name', 'me-role', 'signout-button', 'main', 'room-name',
    'room-topic', 'conn-dot', 'conn-label', 'members-toggle', 'online-count', 'online-avatars', 'room-menu-button',
    'room-menu', 'offline-banner', 'offline-text', 'retry-now', 'notice-banner', 'notice-dismiss', 'pinned-bar',
    'pinned-toggle', 'pinned-count', 'pinned-latest', 'pinned-items', 'message-list', 'empty-state',
    'new-messages-button', 'typing-line', 'composer-form', 'composer', 'send-button', 'join-button',
    'members-panel', 'members-close', 'online-users', 'create-room-dialog', 'create-room-form', 'new-room-name',
    'new-room-id', 'new-room-visibility', 'new-room-visibility-hint', 'new-room-topic', 'new-room-max',
    'create-room-error', 'create-room-cancel', 'create-room-submit', 'settings-dialog', 'settings-form',
    'settings-name', 'settings-topic', 'settings-visibility', 'settings-visibility-hint', 'settings-max',
    'settings-pin', 'settings-error', 'settings-cancel', 'settings-submit', 'add-member-dialog', 'add-member-form',
    'add-member-user', 'add-member-role', 'add-member-error', 'add-member-cancel', 'add-member-submit',
    'bans-dialog', 'bans-list', 'bans-close', 'confirm-dialog', 'confirm-form', 'confirm-title', 'confirm-text',
    'confirm-cancel', 'confirm-ok', 'toasts',
  ]) {
    el[id.replace(/-([a-z])/g, (_, c) => c.toUpperCase())] = document.getElementById(id);
  }
}

// ---------------------------------------------------------------------------
// 3. connection

const HANDLERS = {
  hello: onHello,
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
  rooms: (f) => onRooms(f.rooms),
  notice: onNotice,
  error: (f) => console.debug('chat: refused: %s %s', f.code, f.message),
  lost: onLost,
  state: onClientState,
  unauthorized: () => signOut('Your session has expired. Please sign in again.'),
};

// A development token is renewed when it has less than this left (the server warns a minute
// ahead by default; the client library then asks currentToken() for a new one).
const RENEW_AHEAD_S = 300;

/**
 * The token for the client library: asked on every connect and when the server says the
 * connection's token is expiring. A development token about to expire is replaced by a new
 * one for the same name (the library hands it to the live connection); any other token
 * stays as it is, and an expired one ends in "sign in again".
 */
async function currentToken() {
  const exp = S.claims?.exp;
  const expiring = typeof exp === 'number' && exp - Date.now() / 1000 < RENEW_AHEAD_S;
  if (!expiring || !S.token) return S.token;
  const token = S.token;
  try {
    const res = await fetch('/api/dev/token', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
      body: JSON.stringify({ name: S.me.name, admin: S.globalAdmin }),
    });
    const fresh = res.ok ? (await res.json())?.token : null;
    const claims = fresh ? tokenClaims(fresh) : null;
    // Only the same user (a name maps to one id): a server without dev tokens answers 404.
    if (S.token === token && claims?.sub === S.me.id) {
      S.token = fresh;
      S.claims = claims;
      try { sessionStorage.setItem(TOKEN_KEY, fresh); } catch { /* ignore */ }
    }
  } catch { /* unreachable: the current token goes on until it expires */ }
  return S.token;
}

function startClient() {
  const client = new ChatClient({ token: currentToken });
  for (const [type, fn] of Object.entries(HANDLERS)) {
    client.on(type, (f, meta) => {
      if (S.client !== client) return;
      try { fn(f, meta); } catch (err) { console.warn('chat: failed to handle', type, err); }
    });
  }
  S.client = client;
  client.connect().catch(() => { /* signed out, or the token was refused: handled by state */ });
}

function onClientState({ state, attempt, delayMs }) {
  if (state === 'connected') { S.attempt = 0; setConn('connected'); return; }
  if (state === 'closed' || state === 'unauthorized') { setConn('offline'); return; }
  if (attempt != null) S.attempt = attempt;
  if (S.conn === 'connected') onDisconnected();
  // Amber while a quick retry is likely to work; red once the browser says it has no network
  // or several attempts in a row have failed (the label says when the next one is).
  if (navigator.onLine === false) setConn('offline', 'Offline · waiting for the network');
  else if (S.attempt > OFFLINE_AFTER_ATTEMPTS && delayMs != null) setConn('offline', `Offline · retrying in ${Math.max(1, Math.ceil(delayMs / 1000))} s`);
  else setConn('reconnecting', S.everConnected ? undefined : 'Connecting…');
}

/** The connection is gone: what was live (typing, presence) is not any more. */
function onDisconnected() {
  if (S.typing) { clearTimeout(S.typing.idle); S.typing = null; }
  for (const room of S.rooms.values()) {
    room.joined = false;
    if (room.want) room.joining = true; // the client re-joins it by itself
    for (const t of room.typing.values()) clearTimeout(t.timer);
    room.typing.clear();
  }
  renderTyping();
  renderMain();
}

function setConn(state, detail) {
  S.conn = state;
  document.body.dataset.conn = state;
  const labels = { connected: 'Connected', reconnecting: 'Reconnecting…', offline: 'Offline' };
  const label = detail || labels[state];
  el.connDot.dataset.state = state;
  el.connDot.setAttribute('aria-label', label);
  el.connDot.title = label;
  el.connLabel.textContent = label;
  const banner = state !== 'connected' && !!S.token && S.everConnected;
  el.offlineBanner.hidden = !banner;
  el.offlineBanner.dataset.state = state;
  el.offlineText.textContent = state === 'offline'
    ? `${label.replace(/^Offline/, 'You are offline')}. Messages you write now go out when you are back.`
    : 'Reconnecting… Messages you write now go out when you are back.';
  renderComposer();
  renderHeader();
}

function retryNow() {
  if (!S.client) return;
  S.attempt = 0;
  S.client.reconnectNow();
}

/** Runs a command; a refusal becomes a friendly toast. Resolves with the answer or null. */
async function run(action, promise, { quiet = false } = {}) {
  try {
    return await promise;
  } catch (err) {
    if (!quiet) toast(friendly(err, action), { code: err.code });
    return null;
  }
}

// ---------------------------------------------------------------------------
// 4. frames

function onHello(f) {
  S.everConnected = true;
  if (f.user) {
    const u = normUser(f.user);
    S.me = { id: u.id || S.me.id, name: u.name || S.me.name };
    rememberUser(S.me);
  }
  if (f.limits && typeof f.limits === 'object') S.limits = f.limits;
  renderMe();
  refreshRooms();
  renderRoomList();
  renderMain();
}

function refreshRooms() {
  S.client?.listRooms().then(onRooms).catch(() => { /* next time */ });
}

/** Asks to be in a room; the `joined` handler takes it from there. */
function joinRoom(room) {
  room.want = true;
  room.joining = true;
  room.access = null;
  S.left.delete(room.id);
  saveRooms();
  clearTimeout(room.bannedTimer);
  if (room.id === S.current && !room.synced) setEdge(room, 'loading');
  S.client.join(room.id).catch((err) => joinFailed(room, err));
  renderRoomList();
  if (room.id === S.current) renderMain();
}

const ACCESS_OF = { forbidden: 'denied', banned: 'banned', not_found: 'missing', room_full: 'full' };

function joinFailed(room, err) {
  room.joining = false;
  room.joined = false;
  room.access = ACCESS_OF[err.code] || 'error';
  room.accessText = friendly(err, 'join');
  // Joining is refused to non-members of private rooms only.
  if (room.access === 'denied' && !room.visibility) room.visibility = 'private';
  if (room.access !== 'error') room.want = false;
  saveRooms();
  if (room.access === 'banned') scheduleBannedRetry(room);
  if (room.id === S.current) setEdge(room, 'access');
  else if (room.access === 'error') toast(room.accessText, { code: err.code });
  renderRoomList();
  renderMain();
}

/**
 * A ban ends by an unban (the server tells the room, not the banned user) or by its expiry:
 * while the room is on screen, ask again now and then.
 */
function scheduleBannedRetry(room, step = 0) {
  clearTimeout(room.bannedTimer);
  room.bannedTimer = setTimeout(() => {
    if (room.access !== 'banned' || room.id !== S.current) return;
    if (S.conn !== 'connected' || document.visibilityState !== 'visible') { scheduleBannedRetry(room, step); return; }
    S.client.join(room.id).then(() => { room.access = null; }).catch((err) => {
      if (err.code === 'banned') scheduleBannedRetry(room, Math.min(step + 1, BANNED_RETRY_MS.length - 1));
      else joinFailed(room, err);
    });
  }, BANNED_RETRY_MS[step]);
}

function onJoined(f, meta) {
  const info = f.room && typeof f.room === 'object' ? f.room : { id: f.room };
  const room = getRoom(info.id);
  if (!room) return;
  applyRoomInfo(room, info);
  room.role = f.role ?? null;
  const first = !room.joinedOnce;
  room.joinedOnce = true;
  room.joined = true;
  room.joining = false;
  room.want = true;
  room.access = null;
  clearTimeout(room.bannedTimer);
  saveRooms();
  if (Array.isArray(f.online)) setOnline(room, f.online, f.online_count);
  if (Array.isArray(f.pins)) setPins(room, f.pins);
  if (typeof f.unread === 'number' && typeof f.seq === 'number') noteMarker(room, f.seq - f.unread);
  const joinedSeq = typeof f.seq === 'number' ? f.seq : null;
  if (room.synced && joinedSeq != null && joinedSeq < room.lastSeq) {
    // The room's sequence went backwards: the server lost its state. What we show can no
    // longer be matched up by seq, so start over from the server's history.
    resetTimeline(room, joinedSeq);
  } else if (room.synced && f.recovered === false) {
    fillGap(room, meta?.since ?? room.lastSeq, joinedSeq);
  } else if (room.synced && joinedSeq != null) {
    room.lastSeq = Math.max(room.lastSeq, joinedSeq);
  } else if (room.id === S.current) {
    loadInitialHistory(room, joinedSeq);
  } else if (first) {
    countUnread(room, joinedSeq);
  }
  if (room.id === S.current) loadRoomDetails(room);
  renderRoomList();
  if (room.id === S.current) { renderMain(); refreshAllMsgs(room); scheduleRead(); }
}

function applyRoomInfo(room, info) {
  if (!info || typeof info !== 'object') return;
  for (const k of ['name', 'topic', 'visibility', 'max_members', 'members_can_pin', 'member_count', 'online_count']) {
    if (info[k] !== undefined) room[k] = info[k];
  }
  if (!room.name) room.name = room.id;
}

function onLeft(f) {
  const room = getRoom(f.room, false);
  if (room) loseRoom(room);
}

/** The client is out of a room it kept (banned, removed, deleted, made private…). */
function onLost({ room: id, reason, frame }) {
  const room = getRoom(id, false);
  if (!room) return;
  if (reason === 'forbidden' || reason === 'banned' || reason === 'not_found' || reason === 'room_full') {
    joinFailed(room, { code: reason, message: frame?.message });
    return;
  }
  loseRoom(room);
}

/** Out of the room: no longer live, and the screen must not offer what needs membership. */
function loseRoom(room) {
  room.joined = false;
  room.joining = false;
  room.want = false;
  // Leaving a public room ends a plain membership (admins and owners keep theirs).
  if (room.role === 'member' && room.visibility !== 'private') room.role = null;
  for (const t of room.typing.values()) clearTimeout(t.timer);
  room.typing.clear();
  room.online.clear();
  room.online_count = 0;
  for (const msg of room.pending.values()) if (msg.status === 'pending') markFailed(room, msg, FRIENDLY.not_in_room);
  if (S.typing?.room === room.id) { clearTimeout(S.typing.idle); S.typing = null; }
  saveRooms();
  afterMembershipChange(room);
}

function afterMembershipChange(room) {
  renderRoomList();
  if (room.id === S.current) { renderMain(); refreshAllMsgs(room); }
}

function onMessage(f) {
  const room = getRoom(f.room, false);
  if (!room) return;
  const msg = normMsg(f, room.id);
  if (msg.seq != null) room.lastSeq = Math.max(room.lastSeq, msg.seq);
  // My own optimistic message coming back?
  if (msg.clientId && room.pending.has(msg.clientId)) {
    settleMessage(room, room.pending.get(msg.clientId), msg);
    return;
  }
  const known = msg.id && room.byId.get(msg.id);
  if (known) { Object.assign(known, { content: msg.content, editedAt: msg.editedAt, deleted: msg.deleted }); updateMsgEl(room, known); return; }
  clearTyping(room, msg.user.id);
  insertMessage(room, msg, { live: true });
  const looking = room.id === S.current && document.visibilityState === 'visible';
  if (!isMine(msg) && !looking) { room.unreadLive++; renderRoomItem(room); renderTitle(); }
}

function onMessageEdited(f) {
  const room = getRoom(f.room, false);
  const msg = room?.byId.get(String(f.id));
  if (!msg) return;
  msg.content = f.content ?? msg.content;
  msg.editedAt = f.edited_at ?? new Date().toISOString();
  updateMsgEl(room, msg);
  const pin = room.pins.find((p) => p.id === msg.id);
  if (pin) { pin.content = msg.content; renderPins(); }
}

function onMessageDeleted(f) {
  const room = getRoom(f.room, false);
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
  const room = getRoom(f.room, false);
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
  const room = getRoom(f.room, false);
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
  const room = getRoom(f.room, false);
  if (!room) return;
  const u = normUser(f.user);
  rememberUser(u);
  const wasOnline = room.online.has(u.id);
  room.online.set(u.id, u.name);
  room.online_count = Math.max(room.online_count || 0, room.online.size);
  if (!wasOnline && u.id !== S.me.id) addSystem(room, `${u.name} joined.`, null, 'presence');
  // A join can make a member without a room event (public rooms): the list is re-read.
  if (room.id === S.current && room.membersLoaded) {
    clearTimeout(room.membersTimer);
    room.membersTimer = setTimeout(() => fetchMembers(room), 1000);
  }
  renderRoomItem(room);
  if (room.id === S.current) { renderMembers(); renderHeader(); }
}
function onPresenceLeave(f) {
  const room = getRoom(f.room, false);
  if (!room) return;
  const u = normUser(f.user);
  const wasOnline = room.online.delete(u.id);
  if (wasOnline) room.online_count = Math.max(room.online.size, (room.online_count || 1) - 1);
  clearTyping(room, u.id);
  if (u.id !== S.me.id && wasOnline) addSystem(room, `${u.name} left.`, null, 'presence');
  renderRoomItem(room);
  if (room.id === S.current) { renderMembers(); renderHeader(); }
}

function onOnlineUsers(f) {
  const room = getRoom(f.room, false);
  if (!room) return;
  if (Array.isArray(f.users)) setOnline(room, f.users, f.count);
  // A big room: who came and went arrives here, folded, instead of one notice per person.
  if (typeof f.joined_count === 'number' || typeof f.left_count === 'number') notePresenceWave(room, f);
  renderRoomItem(room);
  if (room.id === S.current) { renderMembers(); renderHeader(); }
}
/** `users` may be a part of who is online (big rooms); `count` is how many are. */
function setOnline(room, users, count) {
  room.online.clear();
  for (const raw of users) {
    const u = normUser(raw);
    if (!u.id) continue;
    rememberUser(u);
    room.online.set(u.id, u.name);
  }
  room.online_count = typeof count === 'number' ? Math.max(count, room.online.size) : room.online.size;
}

/**
 * A big room's coming and going, as one line that grows while nothing else is said: "Ann,
 * Bob and 41 others joined · 3 left" rather than a line per person.
 */
function notePresenceWave(room, f) {
  const others = (list) => (Array.isArray(list) ? list.map(normUser).filter((u) => u.id && u.id !== S.me.id) : []);
  const joined = others(f.joined);
  const left = others(f.left);
  // The count may include me (my own join): take me out when I am listed.
  const mine = (list) => (Array.isArray(list) && list.some((u) => normUser(u).id === S.me.id) ? 1 : 0);
  const jn = Math.max(0, (f.joined_count || 0) - mine(f.joined));
  const ln = Math.max(0, (f.left_count || 0) - mine(f.left));
  if (!jn && !ln) return;
  const last = room.items[room.items.length - 1];
  let w = room.wave;
  if (!w || last !== w.item) {
    w = room.wave = { joined: new Map(), left: new Map(), jn: 0, ln: 0, item: null };
  }
  for (const u of joined) w.joined.set(u.id, u.name);
  for (const u of left) w.left.set(u.id, u.name);
  w.jn += jn;
  w.ln += ln;
  const text = waveText(w);
  if (w.item) {
    $('.system-text', w.item.el).textContent = text;
    return;
  }
  w.item = addSystem(room, text, null, 'presence');
}
function waveText(w) {
  const names = (map, n) => {
    const shown = [...map.values()].slice(0, 3);
    const rest = n - shown.length;
    if (!shown.length) return `${n} ${n === 1 ? 'person' : 'people'}`;
    if (rest <= 0) return shown.length === 1 ? shown[0] : `${shown.slice(0, -1).join(', ')} and ${shown.at(-1)}`;
    return `${shown.join(', ')} and ${rest} ${rest === 1 ? 'other' : 'others'}`;
  };
  const parts = [];
  if (w.jn) parts.push(`${names(w.joined, w.jn)} joined`);
  if (w.ln) parts.push(`${names(w.left, w.ln)} left`);
  return `${parts.join(' · ')}.`;
}

function onReceipt(f) {
  const room = getRoom(f.room, false);
  if (!room) return;
  const u = normUser(f.user);
  const seq = Number(f.seq);
  if (!u.id || !Number.isFinite(seq)) return;
  rememberUser(u);
  room.markers.set(u.id, Math.max(room.markers.get(u.id) || 0, seq));
  if (u.id === S.me.id) {
    room.readSent = Math.max(room.readSent, seq);
    noteMarker(room, seq);
  } else {
    refreshTicks(room);
  }
}

/** My read marker in `room` moved (it only moves forward). */
function noteMarker(room, seq) {
  if (!Number.isFinite(seq)) return;
  room.myMarker = Math.max(room.myMarker ?? 0, seq);
}

function normPin(p, room) {
  const m = p?.message && typeof p.message === 'object' ? p.message : null;
  const id = String(m?.id ?? p?.id ?? '');
  const local = room.byId.get(id);
  return {
    id,
    seq: m?.seq ?? local?.seq ?? null,
    user: normUser(m?.user ?? local?.user ?? null),
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
  const room = getRoom(f.room, false);
  if (!room) return;
  const pin = normPin(f, room);
  if (!pin.id) return;
  room.pins = [pin, ...room.pins.filter((p) => p.id !== pin.id)];
  if (room.id === S.current) renderPins();
  const msg = room.byId.get(pin.id);
  if (msg) updateMsgEl(room, msg);
  addSystem(room, `${pin.by?.name || 'Someone'} pinned a message${pin.user.name ? ` from ${pin.user.name}` : ''}.`, f.seq, 'pin');
}
function onUnpinned(f) {
  const room = getRoom(f.room, false);
  if (!room) return;
  const id = String(f.id ?? '');
  room.pins = room.pins.filter((p) => p.id !== id);
  if (room.id === S.current) renderPins();
  const msg = room.byId.get(id);
  if (msg) updateMsgEl(room, msg);
  addSystem(room, `${f.by != null ? normUser(f.by).name : 'Someone'} unpinned a message.`, f.seq, 'pin');
}

function onRoomCreated(f) {
  const info = f.room && typeof f.room === 'object' ? f.room : null;
  if (!info) return;
  const room = getRoom(info.id);
  applyRoomInfo(room, info);
  if (info.owner != null && info.owner === S.me.id) room.role = 'owner';
  renderRoomList();
  refreshRooms();
}

function onRoomUpdated(f) {
  const info = f.room && typeof f.room === 'object' ? f.room : null;
  const room = getRoom(info?.id, false);
  if (!room) return;
  const before = { name: room.name, topic: room.topic, visibility: room.visibility };
  applyRoomInfo(room, info);
  if (room.topic !== before.topic) addSystem(room, `The topic is now “${room.topic || ''}”.`, f.seq, 'room');
  else if (room.name !== before.name) addSystem(room, `The room is now called “${room.name}”.`, f.seq, 'room');
  else if (room.visibility !== before.visibility) addSystem(room, `The room is now ${room.visibility}.`, f.seq, 'room');
  else addSystem(room, 'The room settings changed.', f.seq, 'room');
  renderRoomItem(room);
  if (room.id === S.current) { renderHeader(); renderComposer(); refreshAllMsgs(room); }
}

function onRoomDeleted(f) {
  const room = getRoom(f.room, false);
  if (!room) return;
  S.rooms.delete(room.id);
  if (S.current === room.id) { S.current = null; renderTimeline(); renderMain(); }
  saveRooms();
  toast(`Room “${room.name}” was deleted.`, { kind: 'info' });
  renderRoomList();
  refreshRooms();
}

const targetOf = (f) => normUser(f.user);
const byOf = (f) => (f.by != null ? normUser(f.by).name : null);
const reasonOf = (f) => (f.reason ? ` (${f.reason})` : '');

function onMemberAdded(f) {
  const room = getRoom(f.room);
  const u = targetOf(f);
  rememberUser(u);
  room.members.set(u.id, { ...(room.members.get(u.id) || {}), id: u.id, name: u.name, role: f.role || 'member' });
  const me = u.id === S.me.id;
  if (me) {
    room.role = f.role || 'member';
    // Added to a room we could not enter (a private room opened by link): go in now.
    if (!room.joined && (room.access === 'denied' || room.id === S.current)) joinRoom(room);
    else if (!room.joined) renderRoomList();
  }
  addSystem(room, `${me ? 'You were' : `${u.name} was`} added to the room${f.role && f.role !== 'member' ? ` as ${f.role}` : ''}${byOf(f) ? ` by ${byOf(f)}` : ''}.`, f.seq, 'moderation');
  afterMembershipChange(room);
}

function onMemberRemoved(f) {
  const room = getRoom(f.room, false);
  if (!room) return;
  const u = targetOf(f);
  room.members.delete(u.id);
  const by = byOf(f);
  if (u.id === S.me.id) {
    room.role = null;
    loseRoom(room);
    addSystem(room, `You were removed from the room${by ? ` by ${by}` : ''}${reasonOf(f)}.`, f.seq, 'moderation');
    toast(`You were removed from “${room.name}”.`, { kind: 'info' });
  } else {
    room.online.delete(u.id);
    addSystem(room, `${u.name} was removed${by ? ` by ${by}` : ''}${reasonOf(f)}.`, f.seq, 'moderation');
  }
  afterMembershipChange(room);
}

function onMemberUpdated(f) {
  const room = getRoom(f.room, false);
  if (!room) return;
  const u = targetOf(f);
  const m = room.members.get(u.id) || { id: u.id, name: u.name };
  if (f.role) m.role = f.role;
  room.members.set(u.id, m);
  if (u.id === S.me.id && f.role) room.role = f.role;
  if (f.role) addSystem(room, `${u.id === S.me.id ? 'You are' : `${u.name} is`} now ${f.role === 'admin' ? 'an admin' : `a ${f.role}`}.`, f.seq, 'moderation');
  afterMembershipChange(room);
}

function onBanned(f) {
  const room = getRoom(f.room, false);
  if (!room) return;
  const u = targetOf(f);
  room.members.delete(u.id);
  const by = byOf(f);
  const tail = `${by ? ` by ${by}` : ''}${f.until ? ` until ${fmtFull(f.until)}` : ''}${reasonOf(f)}`;
  if (u.id === S.me.id) {
    room.role = null;
    loseRoom(room);
    room.access = 'banned';
    room.accessText = FRIENDLY.banned;
    addSystem(room, `You were banned from the room${tail}.`, f.seq, 'moderation');
    toast(`You were banned from “${room.name}”.`, { kind: 'info' });
    if (room.id === S.current) { setEdge(room, room.synced ? (room.nextBefore == null ? 'start' : 'more') : 'access'); scheduleBannedRetry(room); }
  } else {
    room.online.delete(u.id);
    addSystem(room, `${u.name} was banned${tail}.`, f.seq, 'moderation');
  }
  afterMembershipChange(room);
}
function onUnbanned(f) {
  const room = getRoom(f.room, false);
  if (!room) return;
  const u = targetOf(f);
  if (u.id === S.me.id && room.access === 'banned') { room.access = null; if (room.id === S.current) joinRoom(room); }
  addSystem(room, `${u.id === S.me.id ? 'You were' : `${u.name} was`} unbanned${byOf(f) ? ` by ${byOf(f)}` : ''}.`, f.seq, 'moderation');
  afterMembershipChange(room);
}

function onMuted(f) {
  const room = getRoom(f.room, false);
  if (!room) return;
  const u = targetOf(f);
  const until = f.until || null;
  const m = room.members.get(u.id) || { id: u.id, name: u.name, role: 'member' };
  m.muted_until = until || 'forever';
  room.members.set(u.id, m);
  if (u.id === S.me.id) {
    room.mutedMe = true;
    room.mutedUntil = until;
    clearTimeout(room.muteTimer);
    const ms = until ? new Date(until).getTime() - Date.now() : 0;
    if (ms > 0 && ms < 2 ** 31) room.muteTimer = setTimeout(() => { room.mutedMe = false; renderComposer(); }, ms);
  }
  addSystem(room, `${u.id === S.me.id ? 'You were' : `${u.name} was`} muted${byOf(f) ? ` by ${byOf(f)}` : ''}${until ? ` until ${fmtFull(until)}` : ''}.`, f.seq, 'moderation');
  afterMembershipChange(room);
}
function onUnmuted(f) {
  const room = getRoom(f.room, false);
  if (!room) return;
  const u = targetOf(f);
  const m = room.members.get(u.id);
  if (m) m.muted_until = null;
  if (u.id === S.me.id) { room.mutedMe = false; clearTimeout(room.muteTimer); }
  addSystem(room, `${u.id === S.me.id ? 'You were' : `${u.name} was`} unmuted${byOf(f) ? ` by ${byOf(f)}` : ''}.`, f.seq, 'moderation');
  afterMembershipChange(room);
}

/** The listing: what this user may see, and (role) which rooms are theirs. */
function onRooms(list) {
  if (!Array.isArray(list)) return;
  const seen = new Set();
  let wanted = [...S.rooms.values()].filter((r) => r.want).length;
  for (const info of list) {
    if (info?.id == null) continue;
    const room = getRoom(info.id);
    seen.add(room.id);
    applyRoomInfo(room, info);
    if (info.role !== undefined && !room.joined) room.role = info.role;
    // My rooms (the server says so) are joined by themselves, unless left in this tab.
    if (info.role && !room.want && !room.access && !S.left.has(room.id) && wanted < AUTO_JOIN_MAX && S.client?.state === 'connected') {
      wanted++;
      joinRoom(room);
    }
  }
  // The listing is authoritative for what this user may see; keep rooms we are in.
  for (const room of [...S.rooms.values()]) {
    if (!seen.has(room.id) && !room.want && !room.joined && !room.role && room.id !== S.current) S.rooms.delete(room.id);
  }
  S.roomsLoaded = true;
  renderRoomList();
  renderHeader();
}

function onNotice(f) {
  const banner = el.noticeBanner;
  $('.notice-content', banner).textContent = String(f.content ?? '');
  const t = $('.notice-time', banner);
  t.textContent = f.ts ? fmtTime(f.ts) : '';
  if (f.ts) { t.setAttribute('datetime', f.ts); t.title = fmtFull(f.ts); }
  banner.hidden = false;
}

// ---------------------------------------------------------------------------
// 5. history over HTTP

const api = (path) => S.client.api(path);
const roomPath = (room) => `/api/rooms/${encodeURIComponent(room.id)}`;
const pageMessages = (data) => (Array.isArray(data?.messages) ? data.messages : []);

async function loadInitialHistory(room, joinedSeq) {
  if (room.initialPromise) return room.initialPromise;
  room.initialPromise = (async () => {
    setEdge(room, 'loading');
    try {
      const data = await S.client.history(room.id, { limit: PAGE_SIZE });
      const msgs = pageMessages(data);
      let maxSeq = 0;
      mutateTimeline(room, () => {
        for (const m of msgs) {
          const msg = upsertFromHistory(room, m);
          if (msg?.seq != null) maxSeq = Math.max(maxSeq, msg.seq);
        }
      }, { bulk: true, toBottom: true });
      room.nextBefore = data?.next_before ?? null;
      room.synced = true;
      room.lastSeq = Math.max(room.lastSeq, maxSeq, joinedSeq ?? 0, ...[...room.byId.values()].map((m) => m.seq || 0));
      setEdge(room, room.nextBefore == null ? 'start' : 'more');
      refreshTicks(room);
      if (joinedSeq != null && joinedSeq > maxSeq) catchUp(room, maxSeq, joinedSeq);
      if (room.id === S.current) { decorate(room); revealDivider(room); fillViewport(room); scheduleRead(); }
    } catch (err) {
      if (err.status === 403 || err.status === 404) {
        room.access = room.access || ACCESS_OF[err.code] || 'denied';
        room.accessText = room.accessText || friendly(err, 'join');
        setEdge(room, 'access');
      } else {
        setEdge(room, 'error');
      }
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
      const all = pageMessages(await S.client.history(room.id, { after, limit: GAP_PAGE_SIZE }));
      const msgs = all.filter((m) => Number(m.seq) <= toSeq);
      if (msgs.length < all.length) after = toSeq; // the range is complete
      mutateTimeline(room, () => { for (const m of msgs) upsertFromHistory(room, m); }, { bulk: true });
      for (const m of msgs) after = Math.max(after, Number(m.seq) || 0);
      refreshTicks(room);
    } catch { return; }
    if (after >= toSeq) return;
  }
}

/** `joined.recovered === false`: the server's window did not reach back; page the gap. */
async function fillGap(room, since, joinedSeq) {
  let after = since;
  try {
    for (let page = 0; page < GAP_MAX_PAGES; page++) {
      const data = await S.client.history(room.id, { after, limit: GAP_PAGE_SIZE });
      const msgs = pageMessages(data);
      mutateTimeline(room, () => { for (const m of msgs) upsertFromHistory(room, m); }, { bulk: true });
      after = Math.max(after, ...msgs.map((m) => Number(m.seq) || 0));
      if (data?.next_after == null || msgs.length === 0) break;
      if (page === GAP_MAX_PAGES - 1) { resetTimeline(room); return; } // too far behind: start afresh
    }
    room.lastSeq = Math.max(room.lastSeq, after, joinedSeq ?? 0);
    refreshTicks(room);
    if (joinedSeq != null && joinedSeq > after) catchUp(room, after, joinedSeq);
  } catch (err) {
    toast(`Could not load the messages you missed. ${friendly(err)}`, { code: err.code });
  }
}

function resetTimeline(room, joinedSeq = null) {
  for (const it of room.items) it.el?.remove();
  const pending = [...room.pending.values()];
  room.items = [];
  room.byId.clear();
  room.sysSeen.clear();
  room.decor.clear();
  room.synced = false;
  room.lastSeq = 0;
  room.readSent = 0;
  room.nextBefore = undefined;
  room.edgeEl = null;
  for (const msg of pending) insertItem(room, { key: PENDING_KEY_BASE + ++S.pendingSeq, kind: 'msg', msg, el: msg.el });
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
      const data = await S.client.history(room.id, { before: room.nextBefore, limit: PAGE_SIZE });
      const msgs = pageMessages(data);
      mutateTimeline(room, () => {
        for (const m of msgs) upsertFromHistory(room, m);
        room.nextBefore = msgs.length === 0 ? null : (data?.next_before ?? null);
        setEdge(room, room.nextBefore == null ? 'start' : 'more');
      }, { bulk: true });
      refreshTicks(room);
    } catch (err) {
      setEdge(room, 'error');
      toast(`Could not load older messages. ${friendly(err)}`, { code: err.code });
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

/**
 * Unread messages of a room joined in the background: the server counts every stored event
 * after my marker (pins, edits and membership changes too), so count the messages from
 * others among them.
 */
async function countUnread(room, joinedSeq) {
  const marker = room.myMarker;
  if (marker == null || joinedSeq == null || joinedSeq <= marker) return;
  try {
    const data = await S.client.history(room.id, { after: marker, limit: GAP_PAGE_SIZE });
    const msgs = pageMessages(data).filter((m) => m.seq <= joinedSeq);
    room.unreadBase = msgs.filter((m) => !m.deleted && normUser(m.user).id !== S.me.id).length;
    room.unreadMore = data?.next_after != null && (msgs.at(-1)?.seq ?? 0) < joinedSeq;
    if (room.id === S.current) { room.unreadBase = 0; room.unreadMore = false; }
    renderRoomItem(room);
    renderTitle();
  } catch { /* no badge then */ }
}

/** Members and read markers: loaded when the room is opened. */
function loadRoomDetails(room) {
  if (!room.membersLoaded) fetchMembers(room);
  if (!room.receiptsLoaded && room.joined) fetchReceipts(room);
}

async function fetchMembers(room) {
  try {
    const data = await api(`${roomPath(room)}/members`);
    room.members.clear();
    for (const m of data?.members || []) {
      const u = normUser(m.user);
      if (!u.id) continue;
      rememberUser(u);
      room.members.set(u.id, { id: u.id, name: u.name, role: m.role || 'member', muted_until: m.muted_until ?? null });
    }
    room.membersLoaded = true;
    const mine = room.members.get(S.me.id);
    if (mine?.role) room.role = mine.role;
    if (mine?.muted_until && new Date(mine.muted_until).getTime() > Date.now()) room.mutedMe = true;
    afterMembershipChange(room);
  } catch { /* members are hidden from non-members of private rooms */ }
}
async function fetchReceipts(room) {
  try {
    const data = await api(`${roomPath(room)}/receipts`);
    for (const m of data?.markers || []) {
      const id = String(m.user ?? '');
      if (!id) continue;
      const seq = Number(m.seq) || 0;
      room.markers.set(id, Math.max(room.markers.get(id) || 0, seq));
      if (id === S.me.id) { room.readSent = Math.max(room.readSent, seq); noteMarker(room, seq); }
    }
    room.receiptsLoaded = true;
    refreshTicks(room);
  } catch { /* optional */ }
}

// ---------------------------------------------------------------------------
// 6. rendering

function renderTitle() {
  let total = 0;
  for (const r of S.rooms.values()) if (r.id !== S.current) total += unreadOf(r);
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

const isMyRoom = (room) => room.want || room.joined || !!room.role;

function sortedRooms() {
  return [...S.rooms.values()].sort((a, b) =>
    (Number(isMyRoom(b)) - Number(isMyRoom(a))) || a.name.localeCompare(b.name) || a.id.localeCompare(b.id));
}

function renderRoomList() {
  const list = el.roomList;
  list.dataset.loaded = S.roomsLoaded ? 'true' : 'false';
  const rooms = sortedRooms();
  const rows = [];
  let lastGroup = null;
  for (const room of rooms) {
    const group = isMyRoom(room) ? 'Joined' : 'Browse';
    if (group !== lastGroup && rooms.some((r) => !isMyRoom(r))) {
      rows.push(h('li', { class: 'room-group', role: 'presentation', dataset: { group } }, group));
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
  const unread = active ? 0 : unreadOf(room);
  b.className = `room-item${active ? ' active' : ''}${isMyRoom(room) ? ' is-joined' : ''}${unread ? ' has-unread' : ''}`;
  b.dataset.visibility = vis;
  if (active) b.setAttribute('aria-current', 'page'); else b.removeAttribute('aria-current');
  if (room.topic) b.title = room.topic; else b.removeAttribute('title');
  const visEl = $('.vis-icon', b);
  if (visEl.dataset.vis !== vis) {
    visEl.dataset.vis = vis;
    visEl.title = VIS_LABEL[vis];
    visEl.replaceChildren(icon(vis, 'icon'));
  }
  $('.vis-text', b).textContent = `${VIS_LABEL[vis]}: `;
  $('.room-item-name', b).textContent = room.name || room.id;
  const badge = $('.unread', b);
  badge.textContent = `${unread}${room.unreadMore ? '+' : ''}`;
  badge.hidden = !unread;
  badge.setAttribute('aria-label', `${unread} unread`);
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
  el.main.dataset.access = room?.access || '';
  el.emptyState.hidden = !!room;
  el.messageList.hidden = !room;
  renderHeader();
  renderComposer();
  renderMembers();
  renderPins();
  renderTyping();
}

/** The room menu's entries this user may use in `room`. */
function roomActions(room) {
  if (!room) return [];
  const out = [];
  if (roomAdmin(room) && !room.access) out.push('add-member', 'settings', 'bans');
  if (room.want || room.joined) out.push('leave');
  if (roomOwner(room) && !room.access) out.push('delete-room');
  return out;
}

function renderHeader() {
  const room = cur();
  el.roomName.textContent = room ? room.name || room.id : 'No room selected';
  let topic = '';
  if (room) {
    if (room.access === 'denied') topic = 'Private room · members only';
    else topic = room.topic || VIS_LABEL[room.visibility] || '';
  }
  el.roomTopic.textContent = topic;
  el.roomTopic.title = topic;
  const actions = roomActions(room);
  el.roomMenuButton.hidden = !actions.length;
  for (const item of el.roomMenu.querySelectorAll('[data-action]')) item.hidden = !actions.includes(item.dataset.action);
  if (!actions.length) closeRoomMenu();
  const online = room?.joined ? room.online : new Map();
  const count = !room ? 0 : room.joined ? Math.max(room.online.size, room.online_count || 0) : (room.online_count || 0);
  el.onlineCount.textContent = String(count);
  el.membersToggle.hidden = !room;
  el.membersToggle.setAttribute('aria-label', `${count} online: show people`);
  el.onlineAvatars.replaceChildren(...[...online].slice(0, 3).map(([id, name]) => avatar({ id, name }, 'avatar avatar-xs')));
  renderTitle();
}

function renderComposer() {
  const room = cur();
  const connected = S.conn === 'connected';
  let disabled = true;
  let placeholder = 'Select a room';
  let join = false;
  if (room) {
    const readOnlyWhy = {
      banned: 'You are banned from this room',
      denied: 'This room is private. Ask an admin to add you.',
      missing: 'This room does not exist',
      full: 'This room is full',
      error: 'Could not join this room',
    }[room.access];
    if (readOnlyWhy) { placeholder = readOnlyWhy; join = room.access === 'full' || room.access === 'error'; }
    else if (!room.want && !room.joined) { placeholder = 'Join this room to chat'; join = true; }
    else if (!room.joinedOnce) placeholder = connected ? 'Joining…' : 'Reconnecting…';
    else if (isReader(room)) placeholder = 'You can read this room. Only members can post.';
    else if (room.mutedMe) placeholder = 'You are muted in this room';
    else {
      disabled = false;
      const name = `${room.visibility === 'private' ? '' : '#'}${room.name || room.id}`;
      placeholder = connected ? `Message ${name}` : `Message ${name} (sent when you are back online)`;
    }
  }
  el.composer.disabled = disabled;
  el.sendButton.disabled = disabled;
  el.composer.placeholder = placeholder;
  const showJoin = join && connected;
  el.joinButton.hidden = !showJoin;
  el.sendButton.hidden = showJoin;
  el.composer.hidden = showJoin;
  el.composerForm.dataset.state = disabled ? 'read-only' : 'open';
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

function pinChip(room, p) {
  const label = p.content ? p.content.replace(/\s+/g, ' ').slice(0, 140) : (p.seq != null ? `Message #${p.seq}` : 'Message');
  return h('button', {
    type: 'button',
    class: 'pin-chip',
    dataset: { pinId: p.id, seq: p.seq },
    title: `${p.user.name ? `${p.user.name}: ` : ''}${p.content || ''}${p.by ? `\nPinned by ${p.by.name}` : ''}`,
    onclick: () => jumpTo(room, p.id, p.seq),
  }, p.user.name ? h('span', { class: 'pin-author' }, `${p.user.name}:`) : null, h('span', { class: 'pin-text' }, label));
}

/** Collapsed: "N pinned" and the latest pin; expanded: every pin. */
function renderPins() {
  const room = cur();
  const pins = room?.pins || [];
  el.pinnedBar.hidden = pins.length === 0;
  const open = el.pinnedBar.dataset.open === 'true' && pins.length > 1;
  el.pinnedBar.dataset.open = String(open);
  el.pinnedToggle.setAttribute('aria-expanded', String(open));
  el.pinnedToggle.disabled = pins.length < 2;
  el.pinnedCount.textContent = `${pins.length} pinned`;
  fill(el.pinnedLatest, !open && pins[0] ? pinChip(room, pins[0]) : null);
  el.pinnedItems.hidden = !open;
  fill(el.pinnedItems, open ? pins.map((p) => pinChip(room, p)) : []);
}

function renderMembers() {
  const room = cur();
  const list = el.onlineUsers;
  if (!room) { list.replaceChildren(h('li', { class: 'member-empty' }, 'Pick a room to see who is here.')); return; }
  // Presence is known only while in the room: out of it, nobody is called offline.
  const live = room.joined;
  const admin = roomAdmin(room) && !room.access;
  const rows = [];
  const seen = new Set();
  const entry = (id, name, presence) => {
    seen.add(id);
    // Joining a public room makes a member: someone here without a known role is one.
    const m = room.members.get(id) || (room.visibility === 'public' && presence === 'online' ? { id, name, role: 'member' } : null);
    const reader = room.visibility === 'restricted' && room.membersLoaded && !m;
    const role = m?.role && m.role !== 'member' ? m.role : (reader ? 'reader' : null);
    const muted = !!m?.muted_until && (m.muted_until === 'forever' || new Date(m.muted_until).getTime() > Date.now());
    const canAct = admin && id !== S.me.id && m?.role !== 'owner' && (roomOwner(room) || m?.role !== 'admin');
    const meta = [];
    if (presence !== 'unknown') meta.push(presence);
    const li = h('li', { class: `member${presence === 'online' ? ' online' : ''}`, dataset: { user: id, online: presence === 'unknown' ? 'unknown' : String(presence === 'online') } },
      h('span', { class: 'member-avatar' }, avatar({ id, name }), presence === 'unknown' ? null : h('span', { class: 'presence', 'aria-hidden': 'true' })),
      h('span', { class: 'member-main' },
        h('span', { class: 'member-name' }, name, id === S.me.id ? h('span', { class: 'you' }, ' (you)') : null),
        h('span', { class: 'member-meta' },
          meta.length ? h('span', { class: 'presence-text' }, meta.join(' ')) : null,
          role ? h('span', { class: 'badge', dataset: { role } }, role) : null,
          muted ? h('span', { class: 'badge badge-warn' }, 'muted') : null,
          h('span', { class: 'member-id', title: 'User ID' }, `@${id}`))),
      canAct ? memberActions(room, id, name, m, muted, reader) : null);
    rows.push(li);
  };
  // A big room's server lists only some of who is online (the count is exact): the rest of
  // its members cannot be called offline.
  const partial = live && (room.online_count || 0) > room.online.size;
  if (live) {
    const online = [...room.online].sort((a, b) => a[1].localeCompare(b[1]));
    const count = Math.max(online.length, room.online_count || 0);
    if (online.length) rows.push(h('li', { class: 'member-group', role: 'presentation' }, `Online — ${count}`));
    for (const [id, name] of online) entry(id, name, 'online');
    if (partial) rows.push(h('li', { class: 'member-note member-more' }, `and ${count - online.length} more online`));
  }
  const rest = [...room.members.values()].filter((m) => !seen.has(m.id)).sort((a, b) => a.name.localeCompare(b.name));
  const restLabel = live && !partial ? 'Offline' : 'Members';
  if (rest.length) rows.push(h('li', { class: 'member-group', role: 'presentation' }, `${restLabel} — ${rest.length}`));
  for (const m of rest) entry(m.id, m.name, live && !partial ? 'offline' : 'unknown');
  if (!live) rows.push(h('li', { class: 'member-note' }, room.access ? 'You are not in this room.' : 'Join the room to see who is online.'));
  else if (!rows.length) rows.push(h('li', { class: 'member-empty' }, 'Nobody here yet.'));
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

/** Moderation of one person: mute, kick, ban; and (owners) their role. */
function memberActions(room, id, name, m, muted, reader) {
  const chip = (action, label, cls = '') => h('button', {
    type: 'button', class: `chip-btn${cls}`, dataset: { action }, 'aria-label': `${label} ${name}`,
    onclick: () => moderate(room, action, id, name),
  }, label);
  let role = null;
  if (roomOwner(room)) {
    const current = m?.role || (reader || room.visibility === 'restricted' ? 'reader' : 'none');
    const options = [['admin', 'Admin'], ['member', 'Member']];
    if (room.visibility === 'restricted') options.push(['reader', 'Reader']);
    if (!options.some(([v]) => v === current)) options.unshift([current, 'Not a member']);
    role = h('select', {
      class: 'role-select', dataset: { action: 'role' }, 'aria-label': `Role of ${name}`,
      onchange: (e) => changeRole(room, id, name, current, e.target.value),
    }, options.map(([v, label]) => h('option', { value: v, selected: v === current }, label)));
  }
  return h('span', { class: 'member-actions' },
    role,
    reader ? null : chip(muted ? 'unmute' : 'mute', muted ? 'Unmute' : 'Mute'),
    chip('kick', 'Kick'),
    chip('ban', 'Ban', ' danger'));
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
      // The edge is always first, and separators come and go as pages are added: neither anchors.
      if (child.classList.contains('history-edge') || child.classList.contains('day-sep') || child.classList.contains('unread-divider')) continue;
      const r = child.getBoundingClientRect();
      if (r.bottom > top) { anchor = child; anchorTop = r.top; break; }
    }
  }
  if (bulk) list.setAttribute('aria-busy', 'true');
  S.mutating = true;
  try { fn(); decorate(room); } finally {
    S.mutating = false;
    if (bulk) list.removeAttribute('aria-busy');
  }
  if (stick) scrollToBottom();
  else if (anchor?.isConnected) list.scrollTop += anchor.getBoundingClientRect().top - anchorTop;
}

/**
 * Day separators, the "New messages" divider, and grouping of one author's consecutive
 * messages: derived from the items in one pass, then the separators are added or removed.
 */
function decorate(room) {
  if (room.dividerSeq === undefined && room.synced && room.dividerMarker) {
    const first = room.items.find((it) => it.kind === 'msg' && it.msg.seq > room.dividerMarker && !isMine(it.msg));
    room.dividerSeq = first ? first.msg.seq : null;
  }
  const want = new Map(); // key -> {kind, label}
  let prevDay = null;
  for (const it of room.items) {
    if (it.kind !== 'msg') continue;
    const day = dayKey(it.msg.ts);
    if (day && day !== prevDay) want.set(it.key - 0.75, { kind: 'day', label: fmtDay(it.msg.ts), ts: it.msg.ts });
    if (day) prevDay = day;
  }
  if (room.dividerSeq != null && room.byId.size) want.set(room.dividerSeq - 0.6, { kind: 'divider', label: 'New messages' });
  for (const [key, item] of room.decor) {
    const w = want.get(key);
    if (!w || w.kind !== item.kind || w.label !== item.label) { removeItem(room, item); room.decor.delete(key); }
  }
  for (const [key, w] of want) {
    if (room.decor.has(key)) continue;
    const node = w.kind === 'day'
      ? h('li', { class: 'day-sep', role: 'separator', dataset: { day: dayKey(w.ts) } }, h('span', { class: 'day-label', title: fmtFull(w.ts) }, w.label))
      : h('li', { class: 'unread-divider', role: 'separator', id: `unread-${room.id}` }, h('span', null, w.label));
    const item = { key, kind: w.kind, label: w.label, el: node };
    room.decor.set(key, item);
    insertItem(room, item);
  }
  let prev = null;
  for (const it of room.items) {
    if (it.kind !== 'msg') { prev = null; continue; }
    const m = it.msg;
    const grouped = !!prev && prev.user.id === m.user.id && !m.replyTo
      && Math.abs((validDate(m.ts)?.getTime() ?? 0) - (validDate(prev.ts)?.getTime() ?? 0)) < GROUP_GAP_MS;
    it.el?.classList.toggle('grouped', grouped);
    prev = m;
  }
}

/** On opening a room with unread messages: show the divider rather than the very bottom. */
function revealDivider(room) {
  if (room.dividerRevealed || room.id !== S.current || !room.synced) return;
  room.dividerRevealed = true;
  const node = room.dividerSeq != null ? room.decor.get(room.dividerSeq - 0.6)?.el : null;
  if (!node?.isConnected) return;
  const list = el.messageList;
  if (node.getBoundingClientRect().top < list.getBoundingClientRect().top) {
    node.scrollIntoView({ block: 'start' });
    room.atBottom = isNearBottom();
  }
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
    h('span', { class: 'system-text' }, text), h('time', { class: 'time', datetime: now, title: fmtFull(now) }, fmtTime(now)));
  const item = { key, kind: 'sys', el: node };
  mutateTimeline(room, () => insertItem(room, item));
  return item;
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
  else if (state === 'access') {
    const titles = { denied: 'This room is private', banned: 'You are banned from this room', missing: 'This room does not exist', full: 'This room is full', error: 'Could not join this room' };
    fill(node, h('span', { class: 'edge-title' }, titles[room.access] || titles.error),
      room.accessText && room.accessText !== `${titles[room.access]}.` ? h('span', { class: 'edge-topic' }, room.accessText) : null);
  } else node.replaceChildren();
}

function renderTimeline() {
  const room = cur();
  const list = el.messageList;
  if (!room) { list.replaceChildren(); return; }
  decorate(room);
  list.replaceChildren(...room.items.map((i) => i.el));
  if (room.scrollTop == null || room.atBottom) scrollToBottom();
  else list.scrollTop = room.scrollTop;
  el.newMessagesButton.hidden = !room.newCount;
}

function buildMsgEl(room, msg) {
  msg.el = h('li', { class: 'msg', tabindex: '-1' });
  msg.el.addEventListener('contextmenu', (e) => {
    if (e.target.closest('a, textarea, input')) return;
    e.preventDefault();
    openMsgMenu(room, msg, { sheet: true });
  });
  watchLongPress(msg.el, () => openMsgMenu(room, msg, { sheet: true }));
  updateMsgEl(room, msg);
  return msg.el;
}

function updateMsgEl(room, msg) {
  const node = msg.el;
  if (!node) return;
  const mine = isMine(msg);
  const pinned = room.pins.some((p) => p.id === msg.id);
  const grouped = node.classList.contains('grouped');
  node.className = `msg${mine ? ' own' : ''}${msg.deleted ? ' deleted' : ''}${pinned ? ' pinned' : ''}${grouped ? ' grouped' : ''} status-${msg.status}`;
  if (msg.id) node.dataset.id = msg.id; else node.dataset.id = msg.clientId || '';
  if (msg.seq != null) node.dataset.seq = String(msg.seq); else delete node.dataset.seq;
  if (msg.clientId) node.dataset.clientMsgId = msg.clientId;
  node.dataset.user = msg.user.id;
  node.dataset.status = msg.status;
  if (msg.deleted) node.dataset.deleted = 'true'; else delete node.dataset.deleted;

  const full = msg.ts ? fmtFull(msg.ts) : null;
  const meta = h('div', { class: 'meta' },
    h('span', { class: 'author' }, msg.user.name || msg.user.id),
    h('time', { class: 'time', datetime: msg.ts || null, title: full }, fmtTime(msg.ts)),
    msg.editedAt && !msg.deleted ? h('span', { class: 'edited', title: `Edited ${fmtFull(msg.editedAt)}` }, '(edited)') : null,
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
  if (mine) {
    footer.push(h('button', {
      type: 'button', class: 'ticks', 'aria-haspopup': 'dialog',
      onclick: (e) => { e.stopPropagation(); toggleReaders(room, msg); },
    }));
  }
  if (msg.status === 'pending') footer.push(h('span', { class: 'send-state' }, 'Sending…'));
  if (msg.status === 'failed') {
    footer.push(h('span', { class: 'send-state failed' }, `Not sent: ${msg.error || 'try again'} `),
      h('button', { type: 'button', class: 'btn-link', dataset: { action: 'retry' }, onclick: () => retryMessage(room, msg) }, 'Retry'),
      h('button', { type: 'button', class: 'btn-link', dataset: { action: 'discard' }, onclick: () => discardMessage(room, msg) }, 'Discard'));
  }

  // Hover tools (devices with a pointer): one-click pin/unpin and the "…" menu. On touch
  // screens they are hidden; a long press opens the same menu as a sheet.
  const actions = actionsFor(room, msg);
  const menuBtn = actions.length ? h('button', {
    type: 'button', class: 'msg-menu icon-btn', 'aria-label': 'Message actions', 'aria-haspopup': 'menu', 'aria-expanded': 'false',
    onclick: (e) => { e.stopPropagation(); openMsgMenu(room, msg); },
  }, icon('more', 'icon')) : null;
  const pinAction = actions.find((a) => a === 'pin' || a === 'unpin');
  const pinBtn = pinAction ? h('button', {
    type: 'button', class: `msg-pin icon-btn${pinAction === 'unpin' ? ' active' : ''}`, dataset: { action: pinAction },
    'aria-label': pinAction === 'pin' ? 'Pin message' : 'Unpin message', title: pinAction === 'pin' ? 'Pin' : 'Unpin',
    'aria-pressed': pinAction === 'unpin' ? 'true' : 'false',
    onclick: (e) => { e.stopPropagation(); messageAction(room, msg, pinAction); },
  }, icon('pin', 'icon')) : null;

  const focusedEditor = S.editing?.msg === msg && S.editing.node?.contains(document.activeElement) ? document.activeElement : null;
  const openReaders = S.readers?.msg === msg ? S.readers.node : null;
  fill(node,
    avatar(msg.user),
    h('time', { class: 'side-time', datetime: msg.ts || null, title: full, 'aria-hidden': 'true' }, fmtTime(msg.ts)),
    h('div', { class: 'msg-body' }, meta, reply, content, footer.length ? h('div', { class: 'msg-foot' }, footer) : null, openReaders),
    pinBtn || menuBtn ? h('div', { class: 'msg-tools' }, pinBtn, menuBtn) : null);
  focusedEditor?.focus({ preventScroll: true });
  if (S.openMenu?.msg === msg) {
    const stillAllowed = menuItems(room, msg).length > 0;
    if (stillAllowed) {
      node.append(S.openMenu.menu);
      if (menuBtn && !S.openMenu.sheet) { menuBtn.setAttribute('aria-expanded', 'true'); S.openMenu.button = menuBtn; }
    } else {
      closeMenu();
    }
  }
  if (mine) updateTicks(room, msg);
}

/** What the "…" menu offers: only what needs being in the room. */
function actionsFor(room, msg) {
  if (!msg.id || msg.seq == null || msg.status !== 'sent' || msg.deleted || !room.joined || room.access) return [];
  const out = [];
  if (canPin(room)) out.push(room.pins.some((p) => p.id === msg.id) ? 'unpin' : 'pin');
  if (isMine(msg)) out.push('edit');
  if (isMine(msg) || roomAdmin(room)) out.push('delete');
  return out;
}
/** The long-press menu adds "Read by" for one's own messages. */
function menuItems(room, msg) {
  const out = actionsFor(room, msg);
  if (isMine(msg) && msg.status === 'sent' && msg.seq != null && !msg.deleted) out.push('readers');
  return out;
}

function refreshAllMsgs(room) {
  for (const it of room.items) if (it.kind === 'msg') updateMsgEl(room, it.msg);
}

function readersOf(room, msg) {
  const readers = [];
  for (const [uid, seq] of room.markers) if (uid !== S.me.id && seq >= msg.seq) readers.push(nameOf(uid));
  return readers.sort((a, b) => a.localeCompare(b));
}

function updateTicks(room, msg) {
  const t = msg.el && $('.ticks', msg.el);
  if (!t) return;
  if (msg.status !== 'sent' || msg.seq == null) {
    t.textContent = '';
    t.hidden = true;
    t.dataset.readBy = '0';
    return;
  }
  t.hidden = false;
  const readers = readersOf(room, msg);
  if (readers.length) {
    t.textContent = '✓✓';
    t.classList.add('read');
    t.title = `Read by ${readers.length}: ${readers.join(', ')}`;
  } else {
    t.textContent = '✓';
    t.classList.remove('read');
    t.title = 'Sent; not read yet';
  }
  t.setAttribute('aria-label', `${t.title}. Show who read it`);
  t.dataset.readBy = String(readers.length);
  if (S.readers?.msg === msg) fillReaders(room, msg, S.readers.node);
}
function refreshTicks(room) {
  for (const it of room.items) if (it.kind === 'msg' && isMine(it.msg)) updateTicks(room, it.msg);
}

/** "Read by": a small list under the message, opened by a tap on the ticks or from the menu. */
function toggleReaders(room, msg) {
  if (S.readers?.msg === msg) { closeReaders(); return; }
  closeReaders();
  const node = h('div', { class: 'readers', role: 'dialog', 'aria-label': 'Read by' });
  S.readers = { msg, node };
  fillReaders(room, msg, node);
  $('.msg-body', msg.el)?.append(node);
}
function fillReaders(room, msg, node) {
  const readers = readersOf(room, msg);
  fill(node,
    h('span', { class: 'readers-title' }, readers.length ? `Read by ${readers.length}` : 'Not read by anyone yet'),
    readers.length ? h('ul', { class: 'readers-list' }, readers.map((n) => h('li', null, n))) : null);
}
function closeReaders() {
  S.readers?.node.remove();
  S.readers = null;
}

// ---------------------------------------------------------------------------
// 7. user actions

// ---- sending -----------------------------------------------------------------

/** Turn a pending message into a stored one (on its ack or on its own `message` echo). */
function settleMessage(room, msg, stored) {
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

/** Hands the message to the client, which keeps it until the server acknowledges it. */
function transmit(room, msg) {
  msg.status = 'pending';
  msg.error = null;
  updateMsgEl(room, msg);
  S.client.sendMessage(room.id, msg.content, { clientMsgId: msg.clientId, replyTo: msg.replyTo ?? undefined })
    .then((ack) => { if (msg.status !== 'sent') settleMessage(room, msg, { id: ack.id, seq: ack.seq, ts: ack.ts }); })
    .catch((err) => { if (msg.status === 'pending') markFailed(room, msg, friendly(err, 'message')); });
}

function markFailed(room, msg, why) {
  msg.status = 'failed';
  msg.error = why;
  updateMsgEl(room, msg);
}
function retryMessage(room, msg) {
  transmit(room, msg);
}
function discardMessage(room, msg) {
  room.pending.delete(msg.clientId);
  removeItem(room, msg.item);
  decorate(room);
}

function sendComposer() {
  const room = cur();
  if (!room || el.composer.disabled) return;
  const content = el.composer.value.replace(/\s+$/, '');
  if (!content.trim()) return;
  const max = Number(S.limits?.max_content_chars) || 0;
  if (max && [...content].length > max) {
    toast(`That message is too long (${[...content].length} of at most ${max} characters).`, { code: 'too_large' });
    return;
  }
  const msg = {
    room: room.id, id: null, seq: null, ts: new Date().toISOString(), user: { ...S.me },
    content, editedAt: null, deleted: false, replyTo: null, clientId: newId(), status: 'pending', el: null, item: null,
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
    S.client.typing(room.id);
    S.typing.sentAt = now;
  }
  clearTimeout(S.typing.idle);
  S.typing.idle = setTimeout(stopTyping, TYPING_IDLE_MS);
}
function stopTyping() {
  if (!S.typing) return;
  clearTimeout(S.typing.idle);
  S.client?.stopTyping(S.typing.room);
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
/** The seq read up to: the lowest-on-screen message's, or the room's last event at the bottom. */
function readUpTo(room) {
  const bounds = el.messageList.getBoundingClientRect();
  for (let i = room.items.length - 1; i >= 0; i--) {
    const it = room.items[i];
    if (it.kind !== 'msg' || it.msg.seq == null || !it.el?.isConnected) continue;
    const r = it.el.getBoundingClientRect();
    if (r.top >= bounds.bottom - 2) continue;
    if (r.bottom <= bounds.top) return 0;
    // The newest message is on screen: pins, edits and room changes after it are read too.
    const newest = !room.items.slice(i + 1).some((x) => x.kind === 'msg' && x.msg.seq != null);
    return newest ? Math.max(it.msg.seq, S.client.lastSeq(room.id) ?? 0, room.lastSeq) : it.msg.seq;
  }
  return 0;
}
function sendRead(room = cur()) {
  if (!room || room.id !== S.current || !room.joined || document.visibilityState !== 'visible' || S.conn !== 'connected') return;
  const seq = readUpTo(room);
  if (seq > room.readSent) {
    room.readSent = seq;
    noteMarker(room, seq);
    S.client.read(room.id, seq);
  }
  if (unreadOf(room)) { room.unreadBase = 0; room.unreadLive = 0; room.unreadMore = false; renderRoomItem(room); renderTitle(); }
}

// ---- navigation --------------------------------------------------------------

function selectRoom(id) {
  const prev = cur();
  if (prev) {
    // What was on screen counts as read, even when the switch comes before the read's debounce.
    clearTimeout(S.readTimer);
    if (prev.id !== id) sendRead(prev);
    prev.scrollTop = el.messageList.scrollTop;
    prev.atBottom = isNearBottom();
    prev.draft = el.composer.value;
    if (prev.id !== id) { prev.dividerSeq = null; decorate(prev); }
  }
  if (S.typing) stopTyping();
  closeMenu();
  closeReaders();
  closeRoomMenu();
  S.editing = null;
  const room = getRoom(id);
  const opening = S.current !== room.id;
  S.current = room.id;
  // The address names the open room, so it can be bookmarked or shared (#room=ID).
  const hash = `#room=${room.id}`;
  if (location.hash !== hash) history.replaceState(null, '', `${location.pathname}${location.search}${hash}`);
  if (opening) {
    // "New messages" goes after the marker as it was when the room was opened.
    room.dividerMarker = room.myMarker;
    room.dividerSeq = undefined;
    room.dividerRevealed = false;
  }
  room.unreadBase = 0;
  room.unreadLive = 0;
  room.unreadMore = false;
  room.newCount = 0;
  saveRooms();
  if (!room.joined && !room.joining && S.client) joinRoom(room);
  else if (room.joined && !room.synced) loadInitialHistory(room, S.client.lastSeq(room.id));
  if (!room.edgeEl) setEdge(room, room.access ? 'access' : room.synced ? (room.nextBefore == null ? 'start' : 'more') : 'loading');
  if (room.joined) loadRoomDetails(room);
  else if (!room.membersLoaded && !room.access) fetchMembers(room);
  // Permissions may have changed while another room was on screen (a new role, a leave).
  refreshAllMsgs(room);
  renderTimeline();
  renderRoomList();
  renderMain();
  el.composer.value = room.draft || '';
  autosize();
  closeSidebar();
  if (room.synced) { revealDivider(room); fillViewport(room); scheduleRead(); }
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

// ---- message menu (hover "…", right click, long press) -------------------------

/** Calls `fn` when the element is pressed for LONG_PRESS_MS without moving (touch screens). */
function watchLongPress(node, fn) {
  let timer = null;
  let start = null;
  const cancel = () => { clearTimeout(timer); timer = null; };
  node.addEventListener('touchstart', (e) => {
    if (e.touches.length !== 1 || e.target.closest('button, textarea, a')) return;
    start = { x: e.touches[0].clientX, y: e.touches[0].clientY };
    cancel();
    timer = setTimeout(() => { timer = null; fn(); }, LONG_PRESS_MS);
  }, { passive: true });
  node.addEventListener('touchmove', (e) => {
    const t = e.touches[0];
    if (start && t && Math.hypot(t.clientX - start.x, t.clientY - start.y) > 10) cancel();
  }, { passive: true });
  node.addEventListener('touchend', cancel);
  node.addEventListener('touchcancel', cancel);
}

function closeMenu() {
  if (!S.openMenu) return;
  const { menu, button } = S.openMenu;
  menu.remove();
  button?.setAttribute('aria-expanded', 'false');
  S.openMenu = null;
  document.body.classList.remove('sheet-open');
}

const MENU_LABELS = { pin: 'Pin message', unpin: 'Unpin message', edit: 'Edit message', delete: 'Delete message…', readers: 'Read by…' };

function openMsgMenu(room, msg, { sheet = false } = {}) {
  // The "…" button toggles; a long press and the context menu it may also fire only open.
  if (S.openMenu?.msg === msg) { if (!sheet) closeMenu(); return; }
  closeMenu();
  const items = menuItems(room, msg);
  if (!items.length || !msg.el) return;
  const button = sheet ? null : $('.msg-menu', msg.el);
  const menu = h('div', { class: `menu${sheet ? ' sheet' : ''}`, role: 'menu', 'aria-label': 'Message actions' }, items.map((a) => h('button', {
    type: 'button', role: 'menuitem', class: `menu-item${a === 'delete' ? ' danger' : ''}`, dataset: { action: a },
    onclick: (e) => { e.stopPropagation(); closeMenu(); messageAction(room, msg, a); },
  }, MENU_LABELS[a])));
  menu.addEventListener('keydown', (e) => {
    const all = [...menu.querySelectorAll('[role=menuitem]')];
    const i = all.indexOf(document.activeElement);
    if (e.key === 'Escape') { e.preventDefault(); const b = S.openMenu?.button; closeMenu(); b?.focus(); }
    else if (e.key === 'ArrowDown') { e.preventDefault(); all[(i + 1) % all.length]?.focus(); }
    else if (e.key === 'ArrowUp') { e.preventDefault(); all[(i - 1 + all.length) % all.length]?.focus(); }
  });
  msg.el.append(menu);
  button?.setAttribute('aria-expanded', 'true');
  // The finger lifting after a long press may arrive as a click: it must not close the sheet.
  S.openMenu = { menu, button, msg, sheet, swallowClick: sheet };
  if (sheet) document.body.classList.add('sheet-open');
  menu.querySelector('[role=menuitem]')?.focus({ preventScroll: true });
}

async function messageAction(room, msg, action) {
  if (action === 'pin' || action === 'unpin') {
    await run(action, S.client[action](room.id, msg.id));
  } else if (action === 'delete') {
    const ok = await confirmAction({
      title: 'Delete this message?',
      text: isMine(msg) ? 'It is deleted for everyone. This cannot be undone.' : `The message from ${msg.user.name} is deleted for everyone. This cannot be undone.`,
      ok: 'Delete',
    });
    if (ok) await run('delete', S.client.deleteMessage(room.id, msg.id));
  } else if (action === 'readers') {
    toggleReaders(room, msg);
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
    if (save && text.trim() && text !== msg.content) run('edit', S.client.edit(room.id, msg.id, text));
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

// ---- room menu -----------------------------------------------------------------

function toggleRoomMenu() {
  const open = el.roomMenu.hidden;
  el.roomMenu.hidden = !open;
  el.roomMenuButton.setAttribute('aria-expanded', String(open));
  if (open) el.roomMenu.querySelector('[role=menuitem]:not([hidden])')?.focus();
}
function closeRoomMenu() {
  el.roomMenu.hidden = true;
  el.roomMenuButton.setAttribute('aria-expanded', 'false');
}

function onRoomMenu(action) {
  const room = cur();
  closeRoomMenu();
  if (!room) return;
  if (action === 'leave') leaveRoom(room);
  else if (action === 'delete-room') deleteRoom(room);
  else if (action === 'settings') openSettings(room);
  else if (action === 'add-member') openAddMember(room);
  else if (action === 'bans') openBans(room);
}

function leaveRoom(room) {
  S.left.add(room.id);
  if (room.joined || room.joining) S.client.leave(room.id).catch(() => { /* gone anyway */ });
  loseRoom(room);
}

async function deleteRoom(room) {
  const ok = await confirmAction({ title: `Delete “${room.name}”?`, text: 'The room and all its messages are deleted for everyone. This cannot be undone.', ok: 'Delete room' });
  if (ok) await run('delete_room', S.client.deleteRoom(room.id));
}

// ---- moderation ----------------------------------------------------------------

const MOD = {
  kick: (room, id) => S.client.kick(room.id, id),
  ban: (room, id) => S.client.ban(room.id, id),
  mute: (room, id) => S.client.mute(room.id, id),
  unmute: (room, id) => S.client.unmute(room.id, id),
};
async function moderate(room, action, userId, name) {
  if (action === 'ban') {
    const ok = await confirmAction({ title: `Ban ${name}?`, text: 'They are taken out of the room and cannot come back until unbanned.', ok: 'Ban' });
    if (!ok) return;
  }
  await run(action, MOD[action](room, userId));
}

/**
 * Roles as the UI names them: admin and member are room memberships (`set_role`, or
 * `add_member` for someone who is not a member); a reader, in a restricted room, is someone
 * who is not a member: they may read but not post, so making someone a reader ends their
 * membership (`remove_member`: they are taken out and may come back to read).
 */
async function changeRole(room, userId, name, from, to) {
  if (from === to) return;
  let done;
  if (to === 'reader') done = await run('remove_member', S.client.removeMember(room.id, userId));
  else if (from === 'admin' || from === 'member') done = await run('set_role', S.client.setRole(room.id, userId, to));
  else done = await run('add_member', S.client.addMember(room.id, userId, to));
  if (done && to === 'reader') toast(`${name} is now a reader: they may read the room, not post.`, { kind: 'info' });
  renderMembers();
}

// ---- dialogs -------------------------------------------------------------------

function showDialog(d) {
  if (typeof d.showModal === 'function') d.showModal(); else d.setAttribute('open', '');
}
function closeDialog(d) {
  if (d.open) d.close();
}
function formError(node, text) {
  node.textContent = text;
  node.hidden = !text;
}

/** A confirmation that is part of the page (no blocking browser dialog). */
function confirmAction({ title, text, ok = 'Delete' }) {
  return new Promise((resolve) => {
    el.confirmTitle.textContent = title;
    el.confirmText.textContent = text;
    el.confirmOk.textContent = ok;
    const d = el.confirmDialog;
    const finish = (answer) => {
      d.removeEventListener('close', onClose);
      el.confirmOk.onclick = null;
      el.confirmCancel.onclick = null;
      closeDialog(d);
      resolve(answer);
    };
    const onClose = () => finish(false);
    el.confirmOk.onclick = (e) => { e.preventDefault(); finish(true); };
    el.confirmCancel.onclick = () => finish(false);
    d.addEventListener('close', onClose);
    showDialog(d);
    el.confirmCancel.focus();
  });
}

let idEdited = false;
function openCreateDialog() {
  el.createRoomForm.reset();
  idEdited = false;
  formError(el.createRoomError, '');
  el.createRoomSubmit.disabled = false;
  el.createRoomSubmit.textContent = 'Create room';
  el.newRoomVisibilityHint.textContent = VIS_HINT[el.newRoomVisibility.value];
  showDialog(el.createRoomDialog);
  el.newRoomName.focus();
}
function showCreateError(text) {
  formError(el.createRoomError, text);
  el.createRoomSubmit.disabled = false;
  el.createRoomSubmit.textContent = 'Create room';
}
async function submitCreateRoom(e) {
  e.preventDefault();
  const name = el.newRoomName.value.trim();
  const id = el.newRoomId.value.trim();
  const visibility = el.newRoomVisibility.value;
  const topic = el.newRoomTopic.value.trim();
  const max = el.newRoomMax.value.trim();
  if (!name) { showCreateError('Give the room a name.'); el.newRoomName.focus(); return; }
  if (!validRoomId(id)) { showCreateError('The room ID must be 1–64 characters of a–z, 0–9, “-” or “_”.'); el.newRoomId.focus(); return; }
  if (max && !(Number.isInteger(Number(max)) && Number(max) > 0)) { showCreateError('Max members must be a positive whole number.'); el.newRoomMax.focus(); return; }
  if (S.conn !== 'connected') { showCreateError('Not connected. Try again in a moment.'); return; }
  const settings = { name, visibility };
  if (topic) settings.topic = topic;
  if (max) settings.max_members = Number(max);
  formError(el.createRoomError, '');
  el.createRoomSubmit.disabled = true;
  el.createRoomSubmit.textContent = 'Creating…';
  try {
    await S.client.createRoom(id, settings);
  } catch (err) {
    showCreateError(friendly(err, 'create_room')); // shown once, in the dialog
    return;
  }
  closeDialog(el.createRoomDialog);
  const room = getRoom(id);
  applyRoomInfo(room, settings);
  room.role = 'owner';
  joinRoom(room);
  selectRoom(room.id);
}

function openSettings(room) {
  el.settingsName.value = room.name || '';
  el.settingsTopic.value = room.topic || '';
  el.settingsVisibility.value = room.visibility || 'public';
  el.settingsVisibilityHint.textContent = VIS_HINT[el.settingsVisibility.value];
  el.settingsMax.value = room.max_members ?? '';
  el.settingsPin.checked = !!room.members_can_pin;
  formError(el.settingsError, '');
  el.settingsSubmit.disabled = false;
  el.settingsForm.dataset.room = room.id;
  showDialog(el.settingsDialog);
  el.settingsName.focus();
}
async function submitSettings(e) {
  e.preventDefault();
  const room = getRoom(el.settingsForm.dataset.room, false);
  if (!room) { closeDialog(el.settingsDialog); return; }
  const name = el.settingsName.value.trim();
  const max = el.settingsMax.value.trim();
  if (!name) { formError(el.settingsError, 'Give the room a name.'); return; }
  if (max && !(Number.isInteger(Number(max)) && Number(max) > 0)) { formError(el.settingsError, 'Max members must be a positive whole number.'); return; }
  const changes = {};
  if (name !== room.name) changes.name = name;
  if (el.settingsTopic.value.trim() !== (room.topic || '')) changes.topic = el.settingsTopic.value.trim();
  if (el.settingsVisibility.value !== room.visibility) changes.visibility = el.settingsVisibility.value;
  if (max && Number(max) !== room.max_members) changes.max_members = Number(max);
  if (el.settingsPin.checked !== !!room.members_can_pin) changes.members_can_pin = el.settingsPin.checked;
  if (!Object.keys(changes).length) { closeDialog(el.settingsDialog); return; }
  el.settingsSubmit.disabled = true;
  try {
    await S.client.updateRoom(room.id, changes);
    closeDialog(el.settingsDialog);
  } catch (err) {
    formError(el.settingsError, friendly(err, 'update_room'));
  } finally {
    el.settingsSubmit.disabled = false;
  }
}

function openAddMember(room) {
  el.addMemberForm.reset();
  el.addMemberForm.dataset.room = room.id;
  // Only the owner (or a global admin) makes admins.
  el.addMemberRole.querySelector('option[value="admin"]').disabled = !roomOwner(room);
  formError(el.addMemberError, '');
  showDialog(el.addMemberDialog);
  el.addMemberUser.focus();
}
async function submitAddMember(e) {
  e.preventDefault();
  const room = getRoom(el.addMemberForm.dataset.room, false);
  const user = el.addMemberUser.value.trim().replace(/^@/, '');
  if (!room) { closeDialog(el.addMemberDialog); return; }
  if (!user) { formError(el.addMemberError, 'Enter the user ID of the person to add.'); return; }
  el.addMemberSubmit.disabled = true;
  try {
    await S.client.addMember(room.id, user, el.addMemberRole.value);
    closeDialog(el.addMemberDialog);
    toast(`Added ${nameOf(user)}.`, { kind: 'info', ttl: 2500 });
  } catch (err) {
    formError(el.addMemberError, friendly(err, 'add_member'));
  } finally {
    el.addMemberSubmit.disabled = false;
  }
}

async function openBans(room) {
  el.bansList.replaceChildren(h('li', { class: 'member-empty' }, 'Loading…'));
  showDialog(el.bansDialog);
  let bans;
  try {
    bans = (await api(`${roomPath(room)}/bans`))?.bans || [];
  } catch (err) {
    el.bansList.replaceChildren(h('li', { class: 'member-empty' }, friendly(err)));
    return;
  }
  if (!bans.length) { el.bansList.replaceChildren(h('li', { class: 'member-empty' }, 'Nobody is banned from this room.')); return; }
  el.bansList.replaceChildren(...bans.map((b) => {
    const u = normUser(b.user);
    const by = b.by ? normUser(b.by).name : null;
    const li = h('li', { class: 'ban-row', dataset: { user: u.id } },
      avatar(u),
      h('span', { class: 'member-main' },
        h('span', { class: 'member-name' }, u.name),
        h('span', { class: 'member-meta' }, [by ? `by ${by}` : null, b.until ? `until ${fmtFull(b.until)}` : 'no end', b.reason ? `“${b.reason}”` : null].filter(Boolean).join(' · '))),
      h('button', {
        type: 'button', class: 'chip-btn', dataset: { action: 'unban' }, 'aria-label': `Unban ${u.name}`,
        onclick: async () => { if (await run('unban', S.client.unban(room.id, u.id))) li.remove(); },
      }, 'Unban'));
    return li;
  }));
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
    if (!res.ok || !body?.token) throw new Error(body?.error?.code === 'invalid' ? 'Use a name of 1 to 64 characters.' : `Sign-in failed (HTTP ${res.status}).`);
    startSession(body.token);
  } catch (err) {
    showLoginError(err instanceof TypeError ? 'Cannot reach the server.' : err.message);
  } finally {
    el.loginButton.disabled = false;
    el.loginButton.textContent = 'Sign in';
  }
}

function tokenExpired(claims) {
  const exp = claims?.exp;
  return typeof exp === 'number' && exp * 1000 < Date.now();
}

function startSession(token) {
  const claims = tokenClaims(token);
  if (tokenExpired(claims)) {
    try { sessionStorage.removeItem(TOKEN_KEY); } catch { /* ignore */ }
    showLogin('That token has expired. Sign in again.');
    return;
  }
  S.token = token;
  S.claims = claims || {};
  try { sessionStorage.setItem(TOKEN_KEY, token); } catch { /* ignore */ }
  S.me = { id: String(claims?.sub ?? ''), name: String(claims?.name || claims?.sub || '') };
  rememberUser(S.me);
  S.globalAdmin = Array.isArray(claims?.roles) && claims.roles.includes('admin');
  S.left = new Set(loadList(LEFT_KEY));
  showApp();
  startClient();
  // Rooms wanted in this tab before a reload; the server's listing adds the user's own.
  for (const id of loadList(ROOMS_KEY)) if (validRoomId(id)) joinRoom(getRoom(id));
  // A link to a room (#room=ID) opens it even when it is not listed (private rooms, new rooms).
  const wanted = validRoomId(S.fragmentRoom) ? S.fragmentRoom : sessionStorage.getItem(CURRENT_KEY);
  if (validRoomId(wanted)) selectRoom(wanted);
  // The room list also comes over HTTP, so it shows even before the socket is up.
  api('/api/rooms').then((data) => { if (S.token === token && !S.roomsLoaded) onRooms(data?.rooms); }).catch(() => { /* list_rooms will do */ });
  clearInterval(S.listTimer);
  S.listTimer = setInterval(() => { if (S.conn === 'connected' && document.visibilityState === 'visible') refreshRooms(); }, LIST_REFRESH_MS);
}

function signOut(message) {
  S.token = null;
  try {
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(ROOMS_KEY);
    sessionStorage.removeItem(LEFT_KEY);
    sessionStorage.removeItem(CURRENT_KEY);
  } catch { /* ignore */ }
  const client = S.client;
  S.client = null;
  client?.close();
  clearInterval(S.listTimer);
  S.rooms.clear();
  S.current = null;
  S.roomsLoaded = false;
  S.everConnected = false;
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
// wiring

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
  el.joinButton.addEventListener('click', () => { const room = cur(); if (room) joinRoom(room); });
  el.retryNow.addEventListener('click', retryNow);

  el.roomMenuButton.addEventListener('click', (e) => { e.stopPropagation(); toggleRoomMenu(); });
  el.roomMenu.addEventListener('click', (e) => {
    const item = e.target.closest('[data-action]');
    if (item) { e.stopPropagation(); onRoomMenu(item.dataset.action); }
  });
  el.pinnedToggle.addEventListener('click', () => {
    el.pinnedBar.dataset.open = String(el.pinnedBar.dataset.open !== 'true');
    renderPins();
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
  el.createRoomCancel.addEventListener('click', () => closeDialog(el.createRoomDialog));
  el.createRoomForm.addEventListener('submit', submitCreateRoom);
  el.newRoomName.addEventListener('input', () => { if (!idEdited) el.newRoomId.value = slugify(el.newRoomName.value); });
  el.newRoomId.addEventListener('input', () => { idEdited = el.newRoomId.value !== ''; });
  el.newRoomVisibility.addEventListener('change', () => { el.newRoomVisibilityHint.textContent = VIS_HINT[el.newRoomVisibility.value]; });
  el.settingsForm.addEventListener('submit', submitSettings);
  el.settingsCancel.addEventListener('click', () => closeDialog(el.settingsDialog));
  el.settingsVisibility.addEventListener('change', () => { el.settingsVisibilityHint.textContent = VIS_HINT[el.settingsVisibility.value]; });
  el.addMemberForm.addEventListener('submit', submitAddMember);
  el.addMemberCancel.addEventListener('click', () => closeDialog(el.addMemberDialog));
  el.bansClose.addEventListener('click', () => closeDialog(el.bansDialog));

  el.sidebarToggle.addEventListener('click', openSidebar);
  el.sidebarClose.addEventListener('click', closeSidebar);
  el.membersToggle.addEventListener('click', toggleMembers);
  el.membersClose.addEventListener('click', closeOverlays);
  el.scrim.addEventListener('click', closeOverlays);

  // A click without a press of its own (the release of a long press) is not a tap.
  document.addEventListener('pointerdown', () => { if (S.openMenu) S.openMenu.swallowClick = false; }, true);
  document.addEventListener('click', (e) => {
    if (S.openMenu?.swallowClick) { S.openMenu.swallowClick = false; e.preventDefault(); e.stopPropagation(); }
  }, true);
  document.addEventListener('click', (e) => {
    if (S.openMenu && !S.openMenu.menu.contains(e.target)) closeMenu();
    if (S.readers && !S.readers.node.contains(e.target) && !e.target.closest('.ticks')) closeReaders();
    if (!el.roomMenu.hidden && !el.roomMenu.contains(e.target)) closeRoomMenu();
  });
  document.addEventListener('keydown', (e) => {
    if (e.key !== 'Escape') return;
    if (S.openMenu) { const b = S.openMenu.button; closeMenu(); b?.focus(); }
    else if (S.readers) closeReaders();
    else if (!el.roomMenu.hidden) { closeRoomMenu(); el.roomMenuButton.focus(); }
    else if (document.body.classList.contains('sidebar-open') || document.body.classList.contains('members-open')) closeOverlays();
  });
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState !== 'visible') return;
    const room = cur();
    if (room) { room.unreadLive = 0; room.unreadBase = 0; renderRoomItem(room); renderTitle(); }
    scheduleRead();
    if (S.token && S.conn !== 'connected') retryNow();
  });
  window.addEventListener('hashchange', () => {
    const id = new URLSearchParams(location.hash.slice(1)).get('room');
    if (S.token && validRoomId(id) && id !== S.current) selectRoom(id);
  });
  window.addEventListener('online', () => { if (S.token) retryNow(); });
  // The network is gone: do not wait for a heartbeat to notice.
  window.addEventListener('offline', () => {
    if (!S.token || !S.client) return;
    S.client.drop('browser offline');
    setConn('offline', 'Offline · waiting for the network');
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
