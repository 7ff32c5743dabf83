// The client against real servers, in both modes: one embedded gateway; and redis-server +
// history-service + two gateways, with the two users of a test on different gateways.
//
//   cd clients/js && npm test          # GATEWAY_BIN=<target>/debug/gateway to pick the binary
//   CLIENT_TEST_MODES=embedded npm test
//
// Waiting is on events and promises (`until` polls a condition), never on fixed sleeps.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ChatClient, ChatError } from '../chat-client.js';
import { startServers, devToken, shortToken } from './servers.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const MODES = (process.env.CLIENT_TEST_MODES || 'embedded,scaled').split(',').map((m) => m.trim()).filter(Boolean);
const RUN = Math.random().toString(36).slice(2, 7);

async function until(fn, { timeout = 10_000, what = 'condition' } = {}) {
  const end = Date.now() + timeout;
  for (let delay = 10; ; delay = Math.min(delay * 2, 200)) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, delay));
  }
}

/**
 * A WebSocket class with a switch: `down` sends new connections to a closed port (the network
 * is gone), `swallow` loses every frame from the server; `sent` records what the client sent,
 * `opened` when it opened each connection.
 */
function gated() {
  const gate = { down: false, swallow: false, lose: () => false, sent: [], opened: [] };
  gate.WebSocket = class extends WebSocket {
    constructor(url) {
      super(gate.down ? 'ws://127.0.0.1:9/' : url);
      gate.opened.push(Date.now());
    }

    send(data) {
      gate.sent.push(JSON.parse(data));
      super.send(data);
    }

    get onmessage() { return super.onmessage; }

    set onmessage(fn) { super.onmessage = (ev) => { if (!gate.swallow && !gate.lose(JSON.parse(ev.data))) fn(ev); }; }
  };
  return gate;
}

/** Collects the events of `type` a client emits. */
function record(client, type) {
  const seen = [];
  client.on(type, (ev, meta) => seen.push({ ev, meta }));
  return seen;
}

for (const mode of MODES) {
  describe(`${mode} mode`, () => {
    let servers;
    const clients = [];
    // Users of a test connect to different gateways when there are several.
    const urlFor = (i) => servers.urls[i % servers.urls.length];
    async function client(name, i, options = {}) {
      const url = options.url ?? urlFor(i);
      const c = new ChatClient({ url, token: await devToken(url, `${name} ${RUN}`), ...options });
      clients.push(c);
      await c.connect();
      return c;
    }

    before(async () => { servers = await startServers(mode); });
    after(async () => {
      for (const c of clients) c.close();
      await servers?.stop();
    });

    test('commands resolve with their answer, refusals reject with the code, events are typed', async () => {
      const room = `basics-${mode}-${RUN}`;
      const ann = await client('Ann', 0);
      const bob = await client('Bob', 1);
      assert.equal(ann.hello.type, 'hello');
      assert.equal(ann.user.name, `Ann ${RUN}`);

      const joined = await ann.join(room);
      assert.equal(joined.type, 'joined');
      assert.equal(joined.room.id, room);
      assert.equal(joined.role, 'owner', 'the first join creates the room');
      await bob.join(room);
      const got = bob.once('message', (m) => m.room === room);
      const ack = await ann.sendMessage(room, 'hello bob');
      assert.equal(ack.type, 'ack');
      assert.match(ack.id, /^\d+$/);
      assert.ok(ack.seq > joined.seq);
      const msg = await got;
      assert.deepEqual([msg.id, msg.seq, msg.content, msg.user.id], [ack.id, ack.seq, 'hello bob', ann.user.id]);

      await assert.rejects(bob.pin(room, ack.id), (e) => e instanceof ChatError && e.code === 'forbidden');
      await assert.rejects(ann.join('Not A Room!'), (e) => e.code === 'invalid');
      const pinned = await ann.pin(room, ack.id);
      assert.equal(pinned.type, 'ack');

      // The listing says which rooms are the caller's, with the role.
      const row = (rooms) => rooms.find((r) => r.id === room);
      assert.equal(row(await ann.listRooms()).role, 'owner');
      assert.equal(row(await bob.listRooms()).role, 'member');
      const page = await bob.history(room, { limit: 10 });
      assert.deepEqual(page.messages.map((m) => m.content), ['hello bob']);
    });

    test('a dropped connection re-joins with `since` and gets what it missed, once each', async () => {
      const room = `recover-${mode}-${RUN}`;
      const gate = gated();
      const ann = await client('Ann', 0, { WebSocket: gate.WebSocket, backoffStartMs: 50, backoffCapMs: 200 });
      const bob = await client('Bob', 1);
      await ann.join(room);
      await bob.join(room);
      const messages = record(ann, 'message');
      const first = await bob.sendMessage(room, 'before');
      await until(() => messages.some((m) => m.ev.id === first.id), { what: 'the first message' });

      gate.down = true;
      ann.drop();
      const missed = [];
      for (const text of ['missed 1', 'missed 2', 'missed 3']) missed.push(await bob.sendMessage(room, text));
      const rejoined = ann.once('joined', (f, meta) => f.room.id === room && meta?.rejoin);
      gate.down = false;
      const f = await rejoined;
      assert.equal(f.recovered, true);
      const join = gate.sent.filter((s) => s.type === 'join' && s.room === room).at(-1);
      assert.ok(join.since >= first.seq && join.since < missed[0].seq, `since ${join.since} is the last seq seen`);
      await until(() => messages.some((m) => m.ev.id === missed[2].id), { what: 'the missed messages' });
      assert.deepEqual(messages.map((m) => m.ev.content), ['before', 'missed 1', 'missed 2', 'missed 3']);
      assert.equal(ann.lastSeq(room), missed[2].seq);
    });

    test('an unacknowledged message is sent again with the same client_msg_id and stored once', async () => {
      const room = `resend-${mode}-${RUN}`;
      const gate = gated();
      const ann = await client('Ann', 0, { WebSocket: gate.WebSocket, backoffStartMs: 50, backoffCapMs: 200 });
      const bob = await client('Bob', 1);
      await ann.join(room);
      await bob.join(room);
      const bobs = record(bob, 'message');

      // Ann hears neither the ack nor the message (not even its replay after the re-join):
      // only sending it again can settle it.
      gate.lose = (f) => f.type === 'ack' || f.type === 'message';
      const sent = ann.sendMessage(room, 'exactly once');
      await until(() => bobs.some((m) => m.ev.content === 'exactly once'), { what: 'the server stored it' });
      gate.lose = (f) => f.type === 'message';
      ann.drop();
      const ack = await sent;
      gate.lose = () => false;
      const copies = gate.sent.filter((s) => s.type === 'message' && s.content === 'exactly once');
      assert.equal(copies.length, 2, 'sent twice');
      assert.equal(copies[0].client_msg_id, copies[1].client_msg_id);
      // Something after it, so that a second copy would have arrived by now.
      const next = await ann.sendMessage(room, 'next');
      await until(() => bobs.some((m) => m.ev.id === next.id), { what: 'the next message' });
      const once = bobs.filter((m) => m.ev.content === 'exactly once');
      assert.equal(once.length, 1);
      assert.equal(once[0].ev.id, ack.id, 'the ack of the resend names the stored message');
      // Scaled out, the history service stores a moment after the acks: wait for the newest.
      const page = await until(async () => {
        const p = await bob.history(room);
        return p.messages[0]?.id === next.id && p;
      }, { what: 'the history service to store the next message' });
      assert.deepEqual(page.messages.map((m) => m.content).reverse(), ['exactly once', 'next']);
    });

    test('the echo of a sent message settles it: lost acks do not make a second copy', async () => {
      const room = `echo-${mode}-${RUN}`;
      const gate = gated();
      const ann = await client('Ann', 0, { WebSocket: gate.WebSocket, backoffStartMs: 50, backoffCapMs: 200 });
      await ann.join(room);
      gate.lose = (f) => f.type === 'ack'; // every ack is lost; the room's `message` still comes
      const ack = await ann.sendMessage(room, 'echoed');
      assert.match(ack.id, /^\d+$/);
      gate.lose = () => false;
      const rejoined = ann.once('joined', (f, meta) => f.room.id === room && meta?.rejoin);
      ann.drop();
      await rejoined;
      await ann.ping(); // anything sent again after the re-join would be on its way by now
      assert.equal(gate.sent.filter((s) => s.type === 'message').length, 1, 'sent once');
      assert.deepEqual(ann.pendingMessages(), []);
    });

    test('commands given offline wait in a bounded queue and go out after the re-join', async () => {
      const room = `queue-${mode}-${RUN}`;
      const gate = gated();
      const ann = await client('Ann', 0, { WebSocket: gate.WebSocket, backoffStartMs: 50, backoffCapMs: 200, queueLimit: 3 });
      const bob = await client('Bob', 1);
      await ann.join(room);
      await bob.join(room);
      const bobs = record(bob, 'message');
      gate.down = true;
      ann.drop();
      assert.equal(ann.state, 'reconnecting');
      const queued = ['q1', 'q2', 'q3'].map((t) => ann.sendMessage(room, t));
      await assert.rejects(ann.sendMessage(room, 'q4'), (e) => e.code === 'queue_full');
      assert.deepEqual(ann.pendingMessages().map((m) => m.content), ['q1', 'q2', 'q3']);
      gate.down = false;
      const acks = await Promise.all(queued);
      assert.ok(acks[0].seq < acks[1].seq && acks[1].seq < acks[2].seq, 'in order');
      await until(() => bobs.length >= 3, { what: 'Bob gets the queued messages' });
      assert.deepEqual(bobs.map((m) => m.ev.content), ['q1', 'q2', 'q3']);
      assert.deepEqual(ann.pendingMessages(), []);
    });

    test('reconnect delays grow exponentially with full jitter, up to the cap', async () => {
      const gate = gated();
      const ann = await client('Ann', 0, { WebSocket: gate.WebSocket, backoffStartMs: 100, backoffCapMs: 800, random: () => 0.5 });
      const delays = [];
      ann.on('state', (s) => { if (s.delayMs != null) delays.push(s.delayMs); });
      gate.down = true;
      ann.drop();
      await until(() => delays.length >= 6, { what: 'six attempts' });
      // Full jitter: random() × min(cap, start × 2^attempt); random() is 0.5 here.
      assert.deepEqual(delays.slice(0, 6), [50, 100, 200, 400, 400, 400]);
      gate.down = false;
      await ann.once('state', (s) => s.state === 'connected');
      assert.equal(ann.attempt, 0, 'a hello resets the backoff');
    });

    test('a draining gateway\'s `reconnect {after_ms}` is honoured', { timeout: 60_000 }, async () => {
      const gw = await servers.newGateway();
      const room = `drain-${mode}-${RUN}`;
      const gate = gated();
      const ann = await client('Ann', 0, { url: gw.url, WebSocket: gate.WebSocket, backoffStartMs: 50, backoffCapMs: 500 });
      const joined = await ann.join(room);
      let hintAt = 0;
      const hint = ann.once('reconnect').then((f) => { hintAt = Date.now(); return f; });
      const stopped = gw.stop('SIGTERM');
      const f = await hint;
      assert.ok(Number.isInteger(f.after_ms));
      const moveAt = hintAt + f.after_ms;
      const openedBefore = gate.opened.length;
      await stopped;
      await gw.restart();
      await ann.once('joined', (j) => j.room.id === room);
      const join = gate.sent.filter((f) => f.type === 'join' && f.room === room).at(-1);
      assert.equal(join.since, joined.seq, 're-joined from where it was');
      const next = gate.opened.slice(openedBefore);
      assert.ok(next.length >= 1, 'it reconnected');
      assert.ok(next[0] >= moveAt - 5, `no attempt before the hint (${next[0] - moveAt} ms)`);
    });

    test('a drain close\'s retry hint is honoured by a client that never saw `reconnect`', { timeout: 60_000 }, async () => {
      const gw = await servers.newGateway();
      const room = `hint-${mode}-${RUN}`;
      const gate = gated();
      // Without the hint the next attempt would wait random() × 60 s = 59.4 s.
      const ann = await client('Ann', 0, { url: gw.url, WebSocket: gate.WebSocket, backoffStartMs: 60_000, backoffCapMs: 60_000, random: () => 0.99 });
      await ann.join(room);
      gate.lose = (f) => f.type === 'reconnect';
      const gone = ann.once('disconnected');
      const scheduled = ann.once('state', (s) => s.state === 'reconnecting' && s.delayMs != null);
      const stopped = gw.stop('SIGTERM');
      const d = await gone;
      assert.equal(d.code, 1012);
      assert.match(d.reason, /retry_after_ms=0\b/);
      assert.equal(d.retryAfterMs, 0);
      assert.equal((await scheduled).delayMs, 0, 'back at once, as the close said');
      ann.close();
      await stopped;
      await gw.restart();
    });

    test('a refused token stops the reconnecting until refresh() gives a new one', async () => {
      const url = urlFor(0);
      const good = await devToken(url, `Ann ${RUN}`);
      const [h, p] = good.split('.');
      let current = `${h}.${p}.not-the-signature`;
      let asked = 0;
      const ann = new ChatClient({ url, token: () => { asked++; return current; }, backoffStartMs: 50, backoffCapMs: 200 });
      clients.push(ann);
      const refused = ann.once('unauthorized');
      ann.connect().catch(() => {});
      await refused;
      assert.equal(ann.state, 'unauthorized');
      const attempts = asked;
      current = good;
      ann.refresh(() => { asked++; return current; });
      const hello = await ann.connect();
      assert.equal(hello.user.name, `Ann ${RUN}`);
      assert.ok(asked > attempts, 'the token function is asked on each connect');
    });

    test('an expiring token is renewed through the token function; without a new one the server closes at expiry', async () => {
      const sub = `expiring-${mode}-${RUN}`;
      let renew = true;
      let current = null;
      // Each token lives 4 s; the server warns 2 s ahead, so each renewal outlives the last token.
      const token = () => { if (renew || !current) current = shortToken(sub, 'Exp', 4); return current; };
      const c = new ChatClient({ url: urlFor(1), token, backoffStartMs: 50, backoffCapMs: 200 });
      clients.push(c);
      const disconnected = record(c, 'disconnected');
      const first = c.once('token_expiring');
      await c.connect();
      const firstExp = Date.parse((await first).expires_at);
      // The next warning is about the renewed token, and comes once the first one has expired.
      const second = await c.once('token_expiring', (ev) => Date.parse(ev.expires_at) > firstExp);
      assert.ok(Date.now() >= firstExp, 'the connection outlived its first token');
      assert.deepEqual(disconnected, [], 'never closed');
      assert.equal((await c.ping()).type, 'pong');

      // No new token from now on: the server closes the connection at the last one's expiry,
      // and the client, asking over HTTP, learns the token is no longer good.
      renew = false;
      const unauthorized = c.once('unauthorized');
      const closed = await c.once('disconnected');
      assert.deepEqual(closed, { code: 1008, reason: 'token expired', retryAfterMs: null });
      assert.ok(Date.now() >= Date.parse(second.expires_at), 'not before the expiry');
      await unauthorized;
      assert.equal(c.state, 'unauthorized');
      c.refresh(() => shortToken(sub, 'Exp', 60));
      await until(() => c.state === 'connected', { what: 'a connection with the new token' });
    });

    test('refresh() hands the live connection a new token; a refused one is reported', async () => {
      const url = urlFor(0);
      const sub = `refresh-${mode}-${RUN}`;
      const c = new ChatClient({ url, token: shortToken(sub, 'Ref', 60) });
      clients.push(c);
      await c.connect();
      const ack = await c.refresh(shortToken(sub, 'Ref', 120));
      assert.equal(ack?.type, 'ack');
      const failed = c.once('refresh_failed');
      assert.equal(await c.refresh(shortToken(`someone-else-${RUN}`, 'Else', 120)), null);
      assert.equal((await failed).code, 'forbidden');
      assert.equal(c.state, 'connected', 'a refused refresh keeps the connection');
    });

    test('the README example runs as written', async () => {
      const readme = readFileSync(path.join(HERE, '..', 'README.md'), 'utf8');
      const code = readme.match(/```js\n([\s\S]*?)```/)[1];
      const out = await new Promise((resolve, reject) => {
        execFile(process.execPath, ['--experimental-websocket', '--no-warnings', '--input-type=module', '-e', code],
          { cwd: path.join(HERE, '..'), env: { ...process.env, CHAT_URL: urlFor(0) }, timeout: 30_000 },
          (err, stdout, stderr) => (err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout)));
      });
      assert.match(out, /^ann: hello from node \(stored as seq \d+\)$/m);
    });
  });
}
