// A small client for the chat gateway: one ES module, no dependencies, for browsers and
// Node (20+ with `--experimental-websocket`, 22+ as is, or any WebSocket class passed in).
//
// What it does for an application (README.md shows it in use):
//   - connects with a token (a string, or a function asked on every connect: the refresh
//     hook), and `refresh(token)` swaps it; when the server says the connection's token is
//     expiring (`token_expiring`), a token function is asked for a new one, which the live
//     connection takes (`refresh` command) so it is not closed at the old token's expiry;
//   - commands return promises: resolved by the server's answer (`ack`, or the command's own
//     frame: `joined`, `left`, `rooms`, `pong`), rejected with a ChatError by `error`,
//     matched by `ref`;
//   - events are the server's frames, by `type` (`on('message', fn)`), plus `state` and
//     `lost` (see below);
//   - reconnects by itself: exponential backoff with full jitter, the server's retry hints
//     honoured (`reconnect {after_ms}` before a drain close, `retry_after_ms=N` in a close
//     frame's reason);
//   - recovers: every room it is in is re-joined with `since` = the last seq it saw, so the
//     server replays what was missed (`joined.recovered === false`: fill from `history()`);
//   - never loses a message: unacknowledged messages are sent again with the same
//     `client_msg_id` (the server keeps one copy), and commands given while offline wait in a
//     bounded queue.
//
// Layout: helpers, ChatError, then the ChatClient class: public API, connection, frames in,
// frames out, rooms, timers.

const DEFAULTS = {
  backoffStartMs: 500,
  backoffCapMs: 15_000,
  queueLimit: 100, // messages and commands waiting while offline
  commandTimeoutMs: 15_000, // a sent command without an answer by then is rejected
  rateLimitRetries: 5, // a `rate_limited` message is sent again this often before failing
  random: Math.random, // the jitter's source (tests pass a fixed one)
};

// Commands whose answer is a frame of their own (every other command is answered by `ack`).
const ANSWER = { join: 'joined', leave: 'left', list_rooms: 'rooms', ping: 'pong' };
// Commands the server answers only when they fail: sent without `ref`, never queued offline
// (a stale typing notice or read marker is worth nothing later).
const FIRE_AND_FORGET = new Set(['typing', 'stop_typing', 'read']);
// Frames that carry a `seq` that is not a stored event's position.
const NOT_A_POSITION = new Set(['joined', 'ack', 'receipt']);

/** The room id of a frame: `room` is an id, or an object with `id` (room_created/updated). */
export function roomOf(frame) {
  const r = frame?.room;
  if (r == null) return null;
  return typeof r === 'object' ? (r.id == null ? null : String(r.id)) : String(r);
}

/** The `retry_after_ms=N` a close reason carries (ms), or null. */
export function retryHint(reason) {
  const m = /(?:^|[;\s])retry_after_ms=(\d{1,9})(?:$|[;\s])/.exec(String(reason ?? ''));
  return m ? Number(m[1]) : null;
}

/** The claims of a JWT (unverified: the signature is the server's business), or null. */
export function tokenClaims(token) {
  try {
    const part = String(token).split('.')[1];
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '=');
    const claims = JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))));
    return claims && typeof claims === 'object' ? claims : null;
  } catch {
    return null;
  }
}

function tokenExp(token) {
  const exp = tokenClaims(token)?.exp;
  return typeof exp === 'number' ? exp : null;
}

/** A random id (a UUID where the platform has them): the default `client_msg_id`. */
export function newId() {
  if (globalThis.crypto?.randomUUID) {
    try { return crypto.randomUUID(); } catch { /* insecure context: fall through */ }
  }
  const b = crypto.getRandomValues(new Uint8Array(16));
  return [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
}

/** A refusal: the server's `error` frame (`code` as in the protocol), or the client's own. */
export class ChatError extends Error {
  /**
   * Client-side codes: `disconnected` (the connection dropped before the answer),
   * `timeout`, `queue_full`, `not_in_room` (the room was left or lost before a queued
   * message went out), `closed` (close() was called), `http` (an HTTP failure without a
   * protocol body).
   */
  constructor(code, message, extra = {}) {
    super(message || code);
    this.name = 'ChatError';
    this.code = code;
    if (extra.retryAfterMs != null) this.retryAfterMs = extra.retryAfterMs;
    if (extra.status != null) this.status = extra.status;
    if (extra.frame) this.frame = extra.frame;
  }
}

export class ChatClient {
  /**
   * @param {object} options
   * @param {string} [options.url] the gateway's base URL (http(s)://host:port); in a page,
   *   defaults to the page's origin.
   * @param {string|(() => string|Promise<string>)} options.token
   * @param {typeof WebSocket} [options.WebSocket] defaults to the global one.
   */
  constructor(options = {}) {
    this.opts = { ...DEFAULTS, ...options };
    const base = options.url ?? globalThis.location?.origin;
    if (!base) throw new TypeError('ChatClient: `url` is required outside a browser page');
    this.baseUrl = String(base).replace(/\/+$/, '');
    this.WS = options.WebSocket ?? globalThis.WebSocket;
    if (!this.WS) throw new TypeError('ChatClient: no WebSocket class (Node 20: run with --experimental-websocket, or pass one)');
    this.tokenSource = options.token;
    this.token = typeof options.token === 'string' ? options.token : null;

    this.state = 'idle'; // idle | connecting | connected | reconnecting | unauthorized | closed
    this.user = null; // from hello
    this.hello = null;
    this.ws = null;
    this.listeners = new Map();
    this.attempt = 0; // failed attempts since the last hello
    this.failedHandshakes = 0;
    this.moveAt = 0; // the server asked us to reconnect at this time (ms epoch)
    this.timers = { reconnect: null, move: null, heartbeat: null };
    this.lastFrameAt = 0;
    this.refSeq = 0;
    this.inflight = new Map(); // ref -> {frame, resolve, reject, timer, entry?}
    this.queue = []; // commands given while offline: {frame, resolve, reject}
    this.outbox = new Map(); // client_msg_id -> message entry, until acknowledged
    this.rooms = new Map(); // room -> {lastSeq, epoch, joined, waiters: [{resolve,reject}]}
    this.connectWaiters = [];
  }

  // ------------------------------------------------------------------ public API

  /** Subscribes to an event; returns the function that unsubscribes. */
  on(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    this.listeners.get(type)?.delete(fn);
  }

  /** Resolves with the next event of `type` (optionally one that `pred` accepts). */
  once(type, pred = () => true) {
    return new Promise((resolve) => {
      const off = this.on(type, (ev, meta) => { if (pred(ev, meta)) { off(); resolve(ev); } });
    });
  }

  /** Opens the connection; resolves with the first `hello`. Reconnects by itself afterwards. */
  connect() {
    if (this.state === 'closed') return Promise.reject(new ChatError('closed', 'the client was closed'));
    const p = this.state === 'connected' ? Promise.resolve(this.hello)
      : new Promise((resolve, reject) => this.connectWaiters.push({ resolve, reject }));
    if (this.state === 'idle') this.open();
    return p;
  }

  /** Closes for good: no reconnect; everything pending is rejected with `closed`. */
  close() {
    if (this.state === 'closed') return;
    this.setState('closed');
    this.clearTimers();
    const ws = this.ws;
    this.ws = null;
    try { ws?.close(1000, 'client closed'); } catch { /* already closed */ }
    const err = () => new ChatError('closed', 'the client was closed');
    for (const w of this.connectWaiters.splice(0)) w.reject(err());
    for (const f of this.inflight.values()) { clearTimeout(f.timer); if (!f.entry) f.reject(err()); }
    this.inflight.clear();
    for (const q of this.queue.splice(0)) q.reject(err());
    for (const m of this.outbox.values()) m.reject(err());
    this.outbox.clear();
    for (const r of this.rooms.values()) for (const w of r.waiters.splice(0)) w.reject(err());
  }

  /**
   * A new token (or token function) for this and every later connection: the live connection
   * takes it at once (it is then not closed when the old token expires). Resolves with the
   * server's `ack`, or null when there is no live connection to give it to or the server
   * refused it (the `refresh_failed` event has the ChatError); never rejects.
   */
  refresh(token) {
    this.tokenSource = token;
    this.token = typeof token === 'string' ? token : null;
    if (this.state === 'unauthorized') { this.attempt = 0; this.open(); }
    return this.renewToken();
  }

  /** Reconnects now instead of waiting for the next scheduled attempt (a "Retry now"). */
  reconnectNow() {
    if (this.state === 'closed' || this.state === 'connected' || this.ws) return;
    this.attempt = 0;
    this.open();
  }

  /** Drops the current connection as if the network failed (it reconnects by itself). */
  drop(reason = 'dropped by the client') {
    const ws = this.ws;
    if (!ws) return;
    this.ws = null;
    try { ws.close(4000, reason); } catch { /* already closed */ }
    this.socketGone(ws, 4000);
  }

  /**
   * Sends any command frame (`{type, ...}`); resolves with its answer. Given while offline,
   * it waits in the queue (commands for a room the client is in wait until that room is
   * joined again). `typing`, `stop_typing` and `read` are sent without `ref` and resolve at
   * once; while offline they are dropped.
   */
  command(frame) {
    if (this.state === 'closed') return Promise.reject(new ChatError('closed', 'the client was closed'));
    if (FIRE_AND_FORGET.has(frame.type)) {
      if (this.canSend(frame)) this.rawSend(frame);
      return Promise.resolve(undefined);
    }
    return new Promise((resolve, reject) => {
      const item = { frame: { ...frame }, resolve, reject };
      if (this.canSend(item.frame)) this.transmit(item);
      else this.enqueue(item);
    });
  }

  /** Joins a room (and keeps it joined across reconnects); resolves with `joined`. */
  join(room, { since } = {}) {
    room = String(room);
    let r = this.rooms.get(room);
    if (!r) {
      r = { lastSeq: since ?? null, epoch: null, joined: false, joining: false, waiters: [] };
      this.rooms.set(room, r);
    } else if (r.joined) {
      return Promise.resolve(r.joinedFrame);
    }
    const p = new Promise((resolve, reject) => r.waiters.push({ resolve, reject }));
    if (this.state === 'connected' && !r.joining) this.sendJoin(room);
    return p;
  }

  /** Leaves a room: it is no longer re-joined; messages still waiting for it are rejected. */
  leave(room) {
    room = String(room);
    const r = this.rooms.get(room);
    if (!r) return Promise.resolve({ type: 'left', room });
    this.forgetRoom(room, new ChatError('not_in_room', `left ${room}`));
    if (this.state !== 'connected') return Promise.resolve({ type: 'left', room });
    return this.command({ type: 'leave', room });
  }

  /** The rooms this client keeps joined. */
  joinedRooms() {
    return [...this.rooms.keys()];
  }

  /** The position the client will recover a room from: its last stored seq seen. */
  lastSeq(room) {
    return this.rooms.get(String(room))?.lastSeq ?? null;
  }

  /**
   * Sends a message; resolves with its `ack {id, seq, ts}`. Until then it is kept: sent again
   * with the same `client_msg_id` after a reconnect (the server stores it once), retried
   * after `retry_after_ms` when rate limited. Pass `clientMsgId` to retry one yourself.
   */
  sendMessage(room, content, { replyTo, clientMsgId } = {}) {
    if (this.state === 'closed') return Promise.reject(new ChatError('closed', 'the client was closed'));
    room = String(room);
    const id = clientMsgId || newId();
    const known = this.outbox.get(id);
    if (known) return known.promise;
    if (this.outbox.size + this.queue.length >= this.opts.queueLimit) {
      return Promise.reject(new ChatError('queue_full', `more than ${this.opts.queueLimit} messages are waiting to be sent`));
    }
    const frame = { type: 'message', room, content, client_msg_id: id };
    if (replyTo != null) frame.reply_to = String(replyTo);
    const entry = { frame, sent: false, retries: 0 };
    entry.promise = new Promise((resolve, reject) => {
      entry.resolve = (v) => { this.outbox.delete(id); resolve(v); };
      entry.reject = (e) => { this.outbox.delete(id); reject(e); };
    });
    this.outbox.set(id, entry);
    if (this.roomReady(room)) this.transmitMessage(entry);
    return entry.promise;
  }

  /** Messages not yet acknowledged, oldest first: `[{room, content, client_msg_id}]`. */
  pendingMessages() {
    return [...this.outbox.values()].map((e) => ({ room: e.frame.room, content: e.frame.content, client_msg_id: e.frame.client_msg_id }));
  }

  edit(room, id, content) { return this.command({ type: 'edit', room, id: String(id), content }); }
  deleteMessage(room, id) { return this.command({ type: 'delete', room, id: String(id) }); }
  pin(room, id) { return this.command({ type: 'pin', room, id: String(id) }); }
  unpin(room, id) { return this.command({ type: 'unpin', room, id: String(id) }); }
  typing(room) { return this.command({ type: 'typing', room }); }
  stopTyping(room) { return this.command({ type: 'stop_typing', room }); }
  read(room, seq) { return this.command({ type: 'read', room, seq }); }
  listRooms() { return this.command({ type: 'list_rooms' }).then((f) => f.rooms); }
  ping() { return this.command({ type: 'ping' }); }
  createRoom(room, settings) { return this.command({ type: 'create_room', room, ...settings }); }
  updateRoom(room, changes) { return this.command({ type: 'update_room', room, ...changes }); }
  deleteRoom(room) { return this.command({ type: 'delete_room', room }); }
  addMember(room, user, role) { return this.command({ type: 'add_member', room, user, ...(role ? { role } : {}) }); }
  removeMember(room, user, reason) { return this.command({ type: 'remove_member', room, user, ...(reason ? { reason } : {}) }); }
  kick(room, user, reason) { return this.command({ type: 'kick', room, user, ...(reason ? { reason } : {}) }); }
  ban(room, user, { reason, durationS } = {}) { return this.command({ type: 'ban', room, user, ...(reason ? { reason } : {}), ...(durationS ? { duration_s: durationS } : {}) }); }
  unban(room, user) { return this.command({ type: 'unban', room, user }); }
  mute(room, user, { durationS } = {}) { return this.command({ type: 'mute', room, user, ...(durationS ? { duration_s: durationS } : {}) }); }
  unmute(room, user) { return this.command({ type: 'unmute', room, user }); }
  setRole(room, user, role) { return this.command({ type: 'set_role', room, user, role }); }

  /** GET an HTTP API path with the token; resolves with the JSON body, rejects with ChatError. */
  async api(path) {
    const token = await this.currentToken();
    let res;
    try {
      res = await fetch(this.baseUrl + path, { headers: { Authorization: `Bearer ${token}`, Accept: 'application/json' } });
    } catch (e) {
      throw new ChatError('unavailable', `cannot reach the server: ${e.message}`);
    }
    let body = null;
    try { body = await res.json(); } catch { /* not JSON */ }
    if (!res.ok) {
      const e = body?.error;
      throw new ChatError(e?.code || 'http', e?.message || `HTTP ${res.status}`, { status: res.status });
    }
    return body;
  }

  /** A page of a room's history: `{before}` newest first, `{after}` oldest first. */
  history(room, { before, after, limit } = {}) {
    const q = new URLSearchParams();
    if (before != null) q.set('before', String(before));
    if (after != null) q.set('after', String(after));
    if (limit != null) q.set('limit', String(limit));
    const qs = q.toString();
    return this.api(`/api/rooms/${encodeURIComponent(room)}/messages${qs ? `?${qs}` : ''}`);
  }

  // ------------------------------------------------------------------ connection

  async currentToken() {
    if (typeof this.tokenSource === 'function') this.token = await this.tokenSource();
    return this.token;
  }

  async open() {
    clearTimeout(this.timers.reconnect);
    this.timers.reconnect = null;
    if (this.state === 'closed' || this.ws || this.opening) return;
    this.setState(this.hello || this.attempt ? 'reconnecting' : 'connecting');
    let token;
    this.opening = true;
    try { token = await this.currentToken(); } catch { token = null; } finally { this.opening = false; }
    if (this.state === 'closed' || this.ws) return;
    const exp = token ? tokenExp(token) : null;
    if (!token || (exp != null && exp * 1000 <= Date.now())) { this.unauthorized('the token is missing or expired'); return; }
    const url = `${this.baseUrl.replace(/^http/, 'ws')}/ws?token=${encodeURIComponent(token)}`;
    let ws;
    try { ws = new this.WS(url); } catch { this.scheduleReconnect(); return; }
    this.ws = ws;
    ws.gotHello = false;
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.lastFrameAt = Date.now();
      let frame;
      try { frame = JSON.parse(ev.data); } catch { return; }
      if (frame && typeof frame === 'object') this.onFrame(ws, frame);
    };
    const gone = (code, reason = '') => { if (this.ws === ws) { this.ws = null; this.socketGone(ws, code, reason); } };
    ws.onopen = () => { ws.opened = true; };
    ws.onclose = (ev) => gone(ev.code, ev.reason);
    // Browsers follow an error with a close; Node 20's WebSocket does not when the connection
    // is refused (and calling close() there fires the error again), so an error before the
    // socket opened ends the attempt here.
    ws.onerror = () => { if (!ws.opened) gone(1006); };
  }

  socketGone(ws, code, reason = '') {
    this.stopHeartbeat();
    // The close says when to come back (`...; retry_after_ms=N`): a draining node spreads its
    // clients' returns this way, and so does a node closing a whole room at once. A
    // `reconnect` frame's later time stands.
    const hint = retryHint(reason);
    if (hint != null) this.moveAt = Math.max(this.moveAt, Date.now() + hint);
    clearTimeout(this.timers.move);
    for (const r of this.rooms.values()) { r.joined = false; r.joining = false; }
    // Answers to what was in flight will not come. Messages stay in the outbox (sent again
    // after the re-join); joins are redone; everything else is rejected: its outcome is unknown.
    for (const [ref, f] of this.inflight) {
      clearTimeout(f.timer);
      if (f.entry) f.entry.sent = false;
      else if (f.frame.type !== 'join') f.reject(new ChatError('disconnected', 'the connection dropped before the answer'));
      this.inflight.delete(ref);
    }
    if (this.state === 'closed') return;
    if (!ws.gotHello) this.failedHandshakes++;
    this.emit('disconnected', { code, reason, retryAfterMs: hint });
    // Refused handshakes (a WebSocket cannot see the 401) or a policy close (the token
    // expired, the application disconnected the user): ask over HTTP whether the token — a
    // new one, from a token function — is still good, now and then.
    if (code === 1008 || (!ws.gotHello && this.failedHandshakes % 3 === 1)) {
      this.checkToken().then((ok) => { if (ok) this.scheduleReconnect(); });
      this.setState('reconnecting');
      return;
    }
    this.scheduleReconnect();
  }

  /**
   * Gives the live connection the current token (a token function is asked for it): the
   * server keeps the connection until that token's expiry. Resolves with the `ack`, or null.
   */
  async renewToken() {
    const ws = this.ws;
    if (!ws || this.state !== 'connected') return null;
    try {
      const token = await this.currentToken();
      if (!token || this.ws !== ws) return null;
      return await this.command({ type: 'refresh', token });
    } catch (err) {
      this.emit('refresh_failed', err instanceof ChatError ? err : new ChatError('refresh_failed', String(err?.message ?? err)));
      return null;
    }
  }

  async checkToken() {
    try {
      const token = await this.currentToken();
      const res = await fetch(`${this.baseUrl}/api/rooms`, { headers: { Authorization: `Bearer ${token}` } });
      if (res.status === 401) { this.unauthorized('the server refused the token'); return false; }
    } catch { /* unreachable: keep trying */ }
    return this.state !== 'closed';
  }

  unauthorized(reason) {
    this.clearTimers();
    this.setState('unauthorized', { reason });
    this.emit('unauthorized', { reason });
  }

  /** The next attempt: at the server's hint if it gave one, else backoff with full jitter. */
  scheduleReconnect() {
    if (this.state === 'closed' || this.state === 'unauthorized' || this.timers.reconnect || this.ws) return;
    let delay;
    if (this.moveAt) {
      delay = Math.max(0, this.moveAt - Date.now());
      this.moveAt = 0;
    } else {
      const ceiling = Math.min(this.opts.backoffCapMs, this.opts.backoffStartMs * 2 ** this.attempt);
      delay = Math.floor(this.opts.random() * ceiling);
      this.attempt++;
    }
    this.setState('reconnecting', { attempt: this.attempt, delayMs: delay });
    this.timers.reconnect = setTimeout(() => { this.timers.reconnect = null; this.open(); }, delay);
  }

  setState(state, detail = {}) {
    const changed = state !== this.state;
    this.state = state;
    if (changed || detail.delayMs != null) this.emit('state', { state, ...detail });
  }

  // ------------------------------------------------------------------ frames in

  onFrame(ws, f) {
    const room = roomOf(f);
    if (typeof f.seq === 'number' && f.seq > 0 && !NOT_A_POSITION.has(f.type) && room != null) {
      const r = this.rooms.get(room);
      if (r) r.lastSeq = Math.max(r.lastSeq ?? 0, f.seq);
    }
    // The echo of one of our messages says it is stored even if its ack is lost with the
    // connection: it must not be sent again (a restarted server may not remember the id).
    if (f.type === 'message' && f.client_msg_id != null && f.user?.id === this.user?.id) {
      this.outbox.get(f.client_msg_id)?.resolve({ type: 'ack', id: f.id, seq: f.seq, ts: f.ts });
    }
    let meta;
    switch (f.type) {
      case 'hello': this.onHello(ws, f); break;
      case 'joined': meta = this.onJoined(f); break;
      case 'reconnect': this.onReconnectHint(ws, f); break;
      // Only a token function can give a new token; with a fixed one the app may listen for
      // the event and call refresh() itself.
      case 'token_expiring': if (typeof this.tokenSource === 'function') this.renewToken(); break;
      default: break;
    }
    if (f.ref != null && this.answer(f)) return; // answered a command: the promise has it
    if (f.type === 'left') this.forgetRoom(room, new ChatError('not_in_room', `no longer in ${room}`), f);
    if (this.user && f.user?.id === this.user.id && ['banned', 'member_removed'].includes(f.type)) {
      this.forgetRoom(room, new ChatError('not_in_room', `no longer in ${room}`), f);
    }
    if (f.type === 'room_deleted') this.forgetRoom(room, new ChatError('not_in_room', `${room} was deleted`), f);
    this.emit(f.type, f, meta);
  }

  onHello(ws, f) {
    ws.gotHello = true;
    this.hello = f;
    this.user = f.user;
    this.attempt = 0;
    this.failedHandshakes = 0;
    this.moveAt = 0;
    this.startHeartbeat((Number(f.heartbeat_s) || 25) * 1000);
    this.setState('connected');
    for (const w of this.connectWaiters.splice(0)) w.resolve(f);
    for (const room of this.rooms.keys()) this.sendJoin(room);
    for (const entry of this.outbox.values()) if (!entry.sent && this.roomReady(entry.frame.room)) this.transmitMessage(entry);
    // Queued commands go now, except those for a room being re-joined: they wait for it.
    for (const item of this.queue.splice(0)) {
      if (this.canSend(item.frame)) this.transmit(item);
      else this.queue.push(item);
    }
  }

  onJoined(f) {
    const room = roomOf(f);
    const r = this.rooms.get(room);
    if (!r) return undefined;
    const meta = { since: r.sentSince ?? null, rejoin: r.everJoined === true };
    // joined.seq is the room's last stored seq. Lower than what we saw: the server lost its
    // state (an embedded restart), and the room starts over from its seq.
    r.lastSeq = r.lastSeq == null || f.seq < r.lastSeq ? f.seq : Math.max(r.lastSeq, f.seq);
    if (f.epoch != null) r.epoch = f.epoch;
    r.joined = true;
    r.joining = false;
    r.everJoined = true;
    r.joinedFrame = f;
    if (f.ref == null || !this.inflight.has(String(f.ref))) {
      for (const w of r.waiters.splice(0)) w.resolve(f);
    }
    // Unacknowledged messages first (in order), then the commands that waited for the room.
    for (const entry of this.outbox.values()) if (entry.frame.room === room && !entry.sent) this.transmitMessage(entry);
    for (const item of this.queue.splice(0)) {
      if (this.canSend(item.frame)) this.transmit(item);
      else this.queue.push(item);
    }
    return meta;
  }

  onReconnectHint(ws, f) {
    // The node is draining: keep receiving until our turn, then move. If the server closes
    // first (1012), the reconnect still waits until then.
    const ms = Math.max(0, Number(f.after_ms) || 0);
    this.moveAt = Date.now() + ms;
    clearTimeout(this.timers.move);
    this.timers.move = setTimeout(() => {
      if (this.ws !== ws) return;
      this.ws = null;
      try { ws.close(1000, 'moving'); } catch { /* already closed */ }
      this.socketGone(ws, 1000);
    }, ms);
  }

  /** Settles the command that `f.ref` answers; false when it answers none of ours. */
  answer(f) {
    const ref = String(f.ref);
    const pending = this.inflight.get(ref);
    if (!pending) return false;
    const expected = ANSWER[pending.frame.type] || 'ack';
    if (f.type !== expected && f.type !== 'error') return false; // e.g. room_created echoing a ref
    this.inflight.delete(ref);
    clearTimeout(pending.timer);
    if (pending.entry) {
      this.settleMessage(pending.entry, f);
    } else if (f.type === 'error') {
      const err = new ChatError(f.code, f.message, { retryAfterMs: f.retry_after_ms, frame: f });
      if (pending.frame.type === 'join') this.joinRefused(pending.frame.room, err, f);
      pending.reject(err);
    } else {
      if (pending.frame.type === 'join') {
        const r = this.rooms.get(String(pending.frame.room));
        for (const w of r?.waiters.splice(0) ?? []) w.resolve(f);
      }
      pending.resolve(f);
    }
    // Answers still reach listeners (a `joined` the app renders); a refusal only rejects the
    // command's promise, so that it is handled once.
    if (f.type !== 'error') this.emit(f.type, f, f.type === 'joined' ? pending.meta : { command: pending.frame });
    return true;
  }

  settleMessage(entry, f) {
    if (f.type === 'ack') { entry.resolve(f); return; }
    if (f.code === 'rate_limited' && entry.retries < this.opts.rateLimitRetries) {
      entry.retries++;
      entry.sent = false;
      setTimeout(() => { if (this.outbox.get(entry.frame.client_msg_id) === entry && !entry.sent && this.roomReady(entry.frame.room)) this.transmitMessage(entry); },
        Math.max(50, Number(f.retry_after_ms) || 1000));
      return;
    }
    entry.reject(new ChatError(f.code, f.message, { retryAfterMs: f.retry_after_ms, frame: f }));
  }

  joinRefused(room, err, f) {
    const r = this.rooms.get(String(room));
    if (!r) return;
    for (const w of r.waiters.splice(0)) w.reject(err);
    // A refused re-join (banned, deleted, made private meanwhile) loses the room; a refused
    // first join is only the promise's rejection.
    this.forgetRoom(String(room), new ChatError('not_in_room', `cannot join ${room}: ${err.message}`), r.everJoined ? f : null);
  }

  /** The client is out of `room`: it is not re-joined, and its waiting messages fail. */
  forgetRoom(room, err, frame) {
    const r = this.rooms.get(room);
    if (!r) return;
    this.rooms.delete(room);
    for (const w of r.waiters.splice(0)) w.reject(err);
    for (const entry of [...this.outbox.values()]) if (entry.frame.room === room) entry.reject(err);
    this.queue = this.queue.filter((item) => {
      if (item.frame.room !== room) return true;
      item.reject(err);
      return false;
    });
    if (frame) this.emit('lost', { room, reason: frame.type === 'error' ? frame.code : frame.type, frame });
  }

  // ------------------------------------------------------------------ frames out

  rawSend(frame) {
    if (!this.ws || this.state !== 'connected') return false;
    try { this.ws.send(JSON.stringify(frame)); return true; } catch { return false; }
  }

  /** May `frame` go now: connected, and its room (if the client keeps one) is joined. */
  canSend(frame) {
    if (this.state !== 'connected') return false;
    if (frame.type === 'join' || frame.room == null) return true;
    const r = this.rooms.get(String(frame.room));
    return !r || r.joined;
  }

  /** May a message for `room` go now (a room the client does not keep: the server decides). */
  roomReady(room) {
    if (this.state !== 'connected') return false;
    const r = this.rooms.get(room);
    return !r || r.joined;
  }

  enqueue(item) {
    if (this.outbox.size + this.queue.length >= this.opts.queueLimit) {
      item.reject(new ChatError('queue_full', `more than ${this.opts.queueLimit} commands are waiting to be sent`));
      return;
    }
    this.queue.push(item);
  }

  transmit(item) {
    const ref = `c${++this.refSeq}`;
    const frame = { ...item.frame, ref };
    const pending = { ...item, frame };
    pending.timer = setTimeout(() => {
      if (this.inflight.get(ref) !== pending) return;
      this.inflight.delete(ref);
      pending.reject(new ChatError('timeout', `no answer to ${frame.type} in ${this.opts.commandTimeoutMs} ms`));
    }, this.opts.commandTimeoutMs);
    this.inflight.set(ref, pending);
    if (!this.rawSend(frame)) { clearTimeout(pending.timer); this.inflight.delete(ref); this.enqueue(item); }
  }

  transmitMessage(entry) {
    const ref = `m${++this.refSeq}`;
    entry.sent = true;
    this.inflight.set(ref, { frame: entry.frame, entry });
    if (!this.rawSend({ ...entry.frame, ref })) { entry.sent = false; this.inflight.delete(ref); }
  }

  sendJoin(room) {
    const r = this.rooms.get(room);
    if (!r) return;
    const frame = { type: 'join', room };
    if (r.lastSeq != null) frame.since = r.lastSeq;
    if (r.epoch != null) frame.epoch = r.epoch;
    r.sentSince = frame.since ?? null;
    r.joining = true;
    const ref = `j${++this.refSeq}`;
    const pending = {
      frame, meta: { since: r.sentSince, rejoin: r.everJoined === true },
      resolve: () => {}, reject: () => {},
    };
    this.inflight.set(ref, pending);
    this.rawSend({ ...frame, ref });
  }

  // ------------------------------------------------------------------ timers and events

  startHeartbeat(periodMs) {
    this.stopHeartbeat();
    const period = Math.max(1000, periodMs);
    this.timers.heartbeat = setInterval(() => {
      if (!this.ws || this.state !== 'connected') return;
      // Nothing heard for two periods: the connection is dead even if no close came.
      if (Date.now() - this.lastFrameAt > 2 * period + 5000) { this.drop('heartbeat timeout'); return; }
      this.rawSend({ type: 'ping' });
    }, period);
  }

  stopHeartbeat() {
    clearInterval(this.timers.heartbeat);
    this.timers.heartbeat = null;
  }

  clearTimers() {
    clearTimeout(this.timers.reconnect);
    clearTimeout(this.timers.move);
    this.stopHeartbeat();
    this.timers.reconnect = null;
    this.timers.move = null;
  }

  emit(type, ev, meta) {
    for (const fn of [...(this.listeners.get(type) ?? [])]) {
      try { fn(ev, meta); } catch (e) { console.error(`chat-client: a '${type}' listener threw`, e); }
    }
  }
}
