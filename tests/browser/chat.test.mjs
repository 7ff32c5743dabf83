// End-to-end tests of the web UI served by the real gateway binary, in headless Chromium.
//
//   cd tests/browser && npm ci && GATEWAY_CMD=/work/target-ui/debug/gateway npm test
//
// The harness starts the gateway itself (never a stand-in): GATEWAY_CMD (default
// ../../target/debug/gateway, relative to this folder) runs with CHAT_LISTEN=127.0.0.1:0, a
// fresh temporary CHAT_DATA_DIR, CHAT_DRAIN_SECONDS=2 and CHAT_RECOVERY_WINDOW=50; the bound address is read from its
// first line ("listening on HOST:PORT"). The restart tests stop it and start it again on the
// same port with the same data dir. It is stopped when the tests end.
//
// Environment:
//   GATEWAY_CMD     gateway command (a path, optionally with flags).
//   ARTIFACTS_DIR   screenshots and gateway.log (default ./artifacts, gitignored).
//   CHROMIUM        browser binary (default /usr/bin/chromium). Browsers are never downloaded.
//   SCREENSHOTS_DIR where the docs' screenshots go (../../docs/screenshots to refresh them;
//                   default: ARTIFACTS_DIR).
//
// Waiting is done with Playwright's auto-waiting (locator.waitFor, waitForSelector,
// waitForFunction) or by polling a condition (`until`), never with fixed sleeps.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, createWriteStream, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ARTIFACTS = path.resolve(HERE, process.env.ARTIFACTS_DIR || 'artifacts');
const GATEWAY_CMD = process.env.GATEWAY_CMD || '../../target/debug/gateway';
const RUN = Math.random().toString(36).slice(2, 7);
const CHROME_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];
// Network noise the browser logs as console errors while a server restarts or an optional API answers 404.
const NOISE = /Failed to load resource|WebSocket connection to .* failed|ERR_CONNECTION_REFUSED|net::ERR_/;
const WS_URL = /\/ws(\?|\/|$)/;
const RECOVERY_WINDOW = 50;

let BASE_URL;
let browser;
let gateway;

// ---------------------------------------------------------------- the gateway process

class Gateway {
  constructor(cmd) {
    this.cmd = cmd;
    this.dataDir = mkdtempSync(path.join(tmpdir(), 'chat-ui-test-'));
    this.listen = '127.0.0.1:0';
    this.log = createWriteStream(path.join(ARTIFACTS, 'gateway.log'), { flags: 'w' });
  }

  /** Starts the binary and resolves with its base URL once it prints "listening on". */
  start() {
    return new Promise((resolve, reject) => {
      const env = { ...process.env, CHAT_LISTEN: this.listen, CHAT_DATA_DIR: this.dataDir,
        CHAT_DRAIN_SECONDS: process.env.CHAT_DRAIN_SECONDS || '2',
        // A small recovery window, so that a test can fall out of it (recovered: false).
        CHAT_RECOVERY_WINDOW: process.env.CHAT_RECOVERY_WINDOW || String(RECOVERY_WINDOW) };
      // `exec` so that the pid we signal is the gateway itself, not a shell.
      const proc = spawn('sh', ['-c', `exec ${this.cmd}`], { cwd: HERE, env, stdio: ['ignore', 'pipe', 'pipe'] });
      this.proc = proc;
      this.ready = false;
      this.exited = new Promise((r) => proc.once('exit', r));
      let seen = '';
      const timer = setTimeout(() => { proc.kill('SIGKILL'); reject(new Error(`gateway did not print "listening on" in 60 s:\n${seen.slice(-2000)}`)); }, 60_000);
      const onData = (chunk) => {
        this.log.write(chunk);
        if (this.ready) return;
        seen += chunk.toString().replace(/\x1b\[[0-9;]*m/g, '');
        const m = seen.match(/listening on (?:https?:\/\/)?(\S+:\d+)/);
        if (m) {
          this.ready = true;
          clearTimeout(timer);
          this.listen = m[1].replace(/^0\.0\.0\.0:/, '127.0.0.1:');
          resolve(`http://${this.listen}`);
        }
      };
      proc.stdout.on('data', onData);
      proc.stderr.on('data', onData);
      proc.once('error', (e) => { clearTimeout(timer); reject(e); });
      proc.once('exit', (code, signal) => {
        if (!this.ready) { clearTimeout(timer); reject(new Error(`gateway exited (${code ?? signal}) before listening:\n${seen.slice(-2000)}`)); }
      });
    });
  }

  /** SIGTERM (graceful drain) or SIGKILL (crash); resolves when the process is gone. */
  async stop(signal = 'SIGTERM') {
    if (!this.proc || this.proc.exitCode != null || this.proc.signalCode != null) return;
    this.proc.kill(signal);
    const killer = setTimeout(() => this.proc.kill('SIGKILL'), 30_000);
    await this.exited;
    clearTimeout(killer);
  }

  /** Starts again on the same port (it may be held for a moment after a crash). */
  async restart() {
    for (let i = 0; ; i++) {
      try { return await this.start(); } catch (err) {
        if (i >= 20 || !/address|in use/i.test(err.message)) throw err;
        await new Promise((r) => setTimeout(r, 250));
      }
    }
  }
}

// ---------------------------------------------------------------- helpers

/** Polls `fn` until it returns something truthy (expect.poll style). */
async function until(fn, { timeout = 10_000, what = 'condition' } = {}) {
  const end = Date.now() + timeout;
  let last;
  for (let delay = 25; ; delay = Math.min(delay * 2, 250)) {
    try { last = await fn(); if (last) return last; } catch (e) { last = e; }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}${last instanceof Error ? `: ${last.message}` : ` (last: ${JSON.stringify(last)})`}`);
    await new Promise((r) => setTimeout(r, delay));
  }
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`) });
}

/** A screenshot for the docs: into SCREENSHOTS_DIR when set (docs/screenshots), else artifacts. */
async function docShot(page, name) {
  const dir = process.env.SCREENSHOTS_DIR ? path.resolve(HERE, process.env.SCREENSHOTS_DIR) : ARTIFACTS;
  mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${name}.png`);
  await page.screenshot({ path: file });
  return file;
}

/** A long press (touch) on the middle of `locator`: the finger stays down until `until` resolves. */
async function longPress(page, locator, until) {
  const box = await locator.boundingBox();
  const cdp = await page.context().newCDPSession(page);
  const point = { x: Math.round(box.x + box.width / 2), y: Math.round(box.y + Math.min(box.height / 2, 20)) };
  await cdp.send('Input.dispatchTouchEvent', { type: 'touchStart', touchPoints: [point] });
  try { await until(); } finally { await cdp.send('Input.dispatchTouchEvent', { type: 'touchEnd', touchPoints: [] }); }
}

/** Which sidebar group ("Joined" or "Browse") a room is listed under. */
const groupOf = (page, roomId) => page.evaluate((id) => {
  let li = document.querySelector(`#room-list [data-room="${id}"]`)?.closest('li');
  while (li && !li.classList.contains('room-group')) li = li.previousElementSibling;
  return li ? li.dataset.group : 'Joined'; // no headings at all: every room is the user's
}, roomId);

async function openRoomMenu(user, action) {
  await user.page.click('#room-menu-button');
  await user.page.click(`#room-menu [data-action="${action}"]`);
}

/** Nothing on the page scrolls sideways. */
const noSidewaysScroll = (page) => page.evaluate(() => {
  const list = document.getElementById('message-list');
  return list.scrollWidth <= list.clientWidth + 1 && document.documentElement.scrollWidth <= window.innerWidth;
});

async function devToken(name, { admin = false } = {}) {
  const res = await fetch(`${BASE_URL}/api/dev/token`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ name, admin }),
  });
  assert.equal(res.status, 200, `dev token for ${name}`);
  return (await res.json()).token;
}

function watchErrors(page, errors) {
  page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error' && !NOISE.test(m.text())) errors.push(`console: ${m.text()}`); });
  page.on('dialog', (d) => { errors.push(`dialog: ${d.message()}`); d.dismiss().catch(() => {}); });
}

/**
 * A new browser context signed in as `name`: through the sign-in form, or (admin) with a dev
 * token in the URL fragment. `gate: true` routes its WebSockets through a switch the test can
 * flip to cut the user's network (`user.gate.down = true` refuses new connections; `cut()`
 * closes the live one).
 */
async function signIn(t, name, { viewport = { width: 1280, height: 800 }, admin = false, gate = false, phone = false } = {}) {
  // `phone`: a 390×844 touch screen, as a phone presents itself.
  const context = await browser.newContext(phone ? { viewport: { width: 390, height: 844 }, hasTouch: true, isMobile: true } : { viewport });
  t.after(() => context.close());
  const sw = {
    down: false, swallow: false, live: null, server: null, joined: [], refused: 0,
    cut() { this.server?.close(); this.live?.close({ code: 4000, reason: 'test: network cut' }); },
  };
  if (gate) {
    await context.routeWebSocket(WS_URL, (ws) => {
      if (sw.down) { sw.refused++; ws.close({ code: 4000, reason: 'test: network down' }); return; }
      const server = ws.connectToServer();
      ws.onMessage((m) => server.send(m));
      server.onMessage((m) => {
        if (typeof m === 'string' && m.includes('"joined"')) {
          try { const f = JSON.parse(m); if (f.type === 'joined') sw.joined.push(f); } catch { /* not JSON */ }
        }
        if (!sw.swallow) ws.send(m);
      });
      ws.onClose((code, reason) => server.close({ code, reason }));
      server.onClose((code, reason) => ws.close({ code, reason }));
      sw.live = ws;
      sw.server = server;
    });
  }
  const page = await context.newPage();
  const errors = [];
  watchErrors(page, errors);
  if (admin) {
    await page.goto(`${BASE_URL}/#token=${await devToken(name, { admin: true })}`);
  } else {
    await page.goto(`${BASE_URL}/`);
    await page.fill('#login-name', name);
    await page.click('#login-button');
  }
  await page.waitForSelector('#conn-dot[data-state="connected"]', { timeout: 15_000 });
  await page.waitForSelector('#room-list[data-loaded="true"]', { state: 'attached' });
  const id = await page.getAttribute('#me', 'data-user');
  assert.ok(id, 'the UI knows its own user id');
  return { context, page, name, id, errors, gate: sw };
}

const mainJoined = (roomId) => `#main[data-room="${roomId}"][data-joined="true"]`;

/** Opens (and joins) a room by link: works for rooms that are not listed yet. */
async function openRoom(user, roomId) {
  await user.page.evaluate((id) => { location.hash = `room=${id}`; }, roomId);
  await user.page.waitForSelector(mainJoined(roomId), { timeout: 15_000 });
}

/** Joins a room by clicking it in the sidebar. */
async function joinRoom(user, roomId) {
  const item = user.page.locator(`#room-list [data-room="${roomId}"]`);
  await item.waitFor({ timeout: 15_000 });
  await item.click();
  await user.page.waitForSelector(mainJoined(roomId), { timeout: 15_000 });
}

/** Creates a room through the dialog; the creator becomes its owner. */
async function createRoom(user, roomId, { visibility = 'public', name = roomId, topic = '' } = {}) {
  const { page } = user;
  if (!(await page.isVisible('#create-room-button'))) await page.click('#sidebar-toggle'); // a phone
  await page.click('#create-room-button');
  await page.fill('#new-room-name', name);
  await page.fill('#new-room-id', roomId);
  await page.selectOption('#new-room-visibility', visibility);
  if (topic) await page.fill('#new-room-topic', topic);
  await page.click('#create-room-submit');
  const outcome = await Promise.race([
    page.waitForSelector(mainJoined(roomId), { timeout: 15_000 }).then(() => null),
    page.waitForSelector('#create-room-error:not([hidden])', { timeout: 15_000 }).then((e) => e.textContent()),
  ]);
  assert.equal(outcome, null, `create_room ${roomId} failed: ${outcome}`);
}

const msgByText = (page, text) => page.locator('#message-list .msg').filter({ has: page.locator('.content', { hasText: text }) });

async function send(user, text) {
  const { page } = user;
  await page.fill('#composer', text);
  await page.press('#composer', 'Enter');
  await msgByText(page, text).and(page.locator('[data-status="sent"]')).waitFor({ timeout: 10_000 });
}

async function waitForMessage(user, text, timeout = 10_000) {
  const loc = msgByText(user.page, text);
  await loc.first().waitFor({ timeout });
  return loc;
}

/** Posts many messages over a second raw WebSocket of the same user (fast, no UI). */
async function blast(user, room, texts) {
  return user.page.evaluate(async ({ room, texts }) => {
    const token = sessionStorage.getItem('chat.token');
    const ws = new WebSocket(`${location.origin.replace(/^http/, 'ws')}/ws?token=${encodeURIComponent(token)}`);
    const waiters = new Map();
    let n = 0;
    await new Promise((resolve, reject) => {
      ws.onerror = () => reject(new Error('blast socket failed'));
      ws.onmessage = (e) => {
        const f = JSON.parse(e.data);
        if (f.type === 'hello') resolve();
        const w = f.ref != null && waiters.get(String(f.ref));
        if (w && ['ack', 'error', 'joined'].includes(f.type)) { waiters.delete(String(f.ref)); w(f); }
      };
    });
    const call = (frame) => new Promise((res) => { const ref = `blast-${++n}`; waiters.set(ref, res); ws.send(JSON.stringify({ ...frame, ref })); });
    const joined = await call({ type: 'join', room });
    if (joined.type === 'error') throw new Error(`join: ${joined.code} ${joined.message}`);
    for (const content of texts) {
      const client_msg_id = crypto.randomUUID();
      for (let attempt = 0; ; attempt++) {
        const a = await call({ type: 'message', room, content, client_msg_id });
        if (a.type === 'ack') break;
        if (a.code === 'rate_limited' && attempt < 50) { await new Promise((r) => setTimeout(r, a.retry_after_ms || 500)); continue; }
        throw new Error(`message: ${a.code} ${a.message}`);
      }
    }
    ws.close();
    return texts.length;
  }, { room, texts });
}

/** Messages in DOM order: [{text, seq, id, status}] */
function listMessages(page) {
  return page.$$eval('#message-list .msg', (els) => els.map((e) => ({
    text: e.querySelector('.content')?.textContent ?? '',
    seq: e.dataset.seq != null ? Number(e.dataset.seq) : null,
    id: e.dataset.id,
    status: e.dataset.status,
  })));
}

const scrollState = (page) => page.locator('#message-list').evaluate((l) => ({
  top: l.scrollTop, fromBottom: l.scrollHeight - l.scrollTop - l.clientHeight, overflow: l.scrollHeight > l.clientHeight + 10,
}));

async function noErrors(...users) {
  for (const u of users) {
    assert.deepEqual(u.errors, [], `${u.name}: no page errors`);
    const text = await u.page.locator('#app').innerText();
    assert.doesNotMatch(text, /\b(null|undefined|NaN)\b|\[object Object\]/, `${u.name}: no junk rendered`);
  }
}

/** Records every state the connection dot goes through, from now on. */
async function recordConnStates(page) {
  await page.evaluate(() => {
    const dot = document.getElementById('conn-dot');
    window.__connStates = [dot.dataset.state];
    new MutationObserver(() => window.__connStates.push(dot.dataset.state))
      .observe(dot, { attributes: true, attributeFilter: ['data-state'] });
  });
}

// ---------------------------------------------------------------- setup

before(async () => {
  mkdirSync(ARTIFACTS, { recursive: true });
  gateway = new Gateway(GATEWAY_CMD);
  BASE_URL = await gateway.start();
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: CHROME_ARGS });
});

after(async () => {
  await browser?.close();
  await gateway?.stop();
  if (gateway) rmSync(gateway.dataDir, { recursive: true, force: true });
});

// ---------------------------------------------------------------- tests

test('the gateway serves the UI; sign-in screen renders without errors', { timeout: 30_000 }, async (t) => {
  for (const [p, type] of [['/', 'text/html'], ['/app.js', 'javascript'], ['/style.css', 'text/css']]) {
    const res = await fetch(`${BASE_URL}${p}`);
    assert.equal(res.status, 200, `GET ${p}`);
    assert.ok((res.headers.get('content-type') || '').includes(type), `GET ${p} content-type ${res.headers.get('content-type')}`);
  }
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  t.after(() => context.close());
  const page = await context.newPage();
  const errors = [];
  watchErrors(page, errors);
  await page.goto(`${BASE_URL}/`);
  await page.locator('#login-name').waitFor();
  assert.equal(await page.isVisible('#login-button'), true);
  assert.equal(await page.isVisible('#app'), false);
  assert.deepEqual(errors, []);
});

/** A token signed with the gateway's public development key, for `name`, expiring in `ttlS`. */
function shortDevToken(name, ttlS) {
  // The id the gateway's dev sign-in derives from a name, so a renewal is the same user.
  const sub = [...name.toLowerCase()].map((c) => (/[\p{L}\p{N}]/u.test(c) ? c : '-')).join('');
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const exp = Math.floor(Date.now() / 1000) + ttlS;
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub, name, exp })}`;
  const sig = createHmac('sha256', 'chat-gateway-development-key-do-not-use-in-production').update(head).digest('base64url');
  return { token: `${head}.${sig}`, exp };
}

test('a token about to expire is renewed: the connection stays up past its expiry', { timeout: 60_000 }, async (t) => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  t.after(() => context.close());
  const page = await context.newPage();
  const errors = [];
  watchErrors(page, errors);
  // Within the server's warning time already: it says `token_expiring` at once, the client
  // library asks the UI for a token, the UI mints a fresh one and the connection takes it.
  const { token, exp } = shortDevToken(`Exp ${RUN}`, 5);
  await page.goto(`${BASE_URL}/#token=${token}`);
  await page.waitForSelector('#conn-dot[data-state="connected"]', { timeout: 15_000 });
  await page.waitForFunction((old) => sessionStorage.getItem('chat.token') !== old, token, { timeout: 15_000 });
  const renewed = await page.evaluate(() => sessionStorage.getItem('chat.token'));
  assert.ok(JSON.parse(Buffer.from(renewed.split('.')[1], 'base64url')).exp > exp + 60, 'a long-lived token now');
  // The old token's expiry passes (the subject here is time itself): still connected, never
  // signed out, and the connection still carries messages.
  await page.waitForFunction((at) => Date.now() > at, (exp + 2) * 1000, { timeout: 15_000 });
  assert.equal(await page.getAttribute('#conn-dot', 'data-state'), 'connected');
  assert.equal(await page.isVisible('#app'), true, 'not sent back to the sign-in screen');
  const room = `renewed-${RUN}`;
  await page.evaluate((id) => { location.hash = `room=${id}`; }, room);
  await page.waitForSelector(mainJoined(room), { timeout: 15_000 });
  assert.deepEqual(errors, []);
});

test('two users exchange messages', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `lobby-${RUN}`;
  await openRoom(ann, room);
  await openRoom(bob, room);

  const hello = `hello from ann ${RUN}`;
  await send(ann, hello);
  const got = await waitForMessage(bob, hello);
  assert.equal((await got.locator('.author').textContent()).trim(), ann.name);
  assert.ok((await got.locator('.time').textContent()).trim().length > 0, 'time is shown');
  assert.match(await got.getAttribute('data-seq'), /^\d+$/);

  const reply = `hi ann, bob here ${RUN}`;
  await send(bob, reply);
  await waitForMessage(ann, reply);
  assert.deepEqual((await listMessages(ann.page)).map((m) => m.text), [hello, reply]);
  assert.deepEqual((await listMessages(bob.page)).map((m) => m.text), [hello, reply]);

  // Ann's own message: acked with a tick; the same server id on both sides.
  const mine = msgByText(ann.page, hello);
  assert.match(await mine.locator('.ticks').textContent(), /^✓{1,2}$/);
  assert.equal(await mine.getAttribute('data-id'), await got.getAttribute('data-id'));

  // Both show up in each other's people list.
  await ann.page.waitForSelector(`#online-users [data-user="${bob.id}"][data-online="true"]`);
  await bob.page.waitForSelector(`#online-users [data-user="${ann.id}"][data-online="true"]`);
  await shot(ann.page, 'chat');
  await noErrors(ann, bob);
});

test('online counts update in the sidebar and the header', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const room = `online-${RUN}`;
  await openRoom(ann, room);
  const sidebarCount = () => ann.page.textContent(`#room-list [data-room="${room}"] .online-count`);
  const headerCount = () => ann.page.textContent('#online-count');
  await until(async () => (await sidebarCount()) === '1' && (await headerCount()) === '1', { what: 'count 1' });

  // Bob in his own context, so closing it is Bob going away.
  const bobCtx = { after: (fn) => { bobCtx.close = fn; } };
  const bob = await signIn(bobCtx, `Bob ${RUN}`);
  await joinRoom(bob, room);
  await until(async () => (await sidebarCount()) === '2' && (await headerCount()) === '2', { what: 'count 2 after Bob joins' });
  await ann.page.locator('#message-list .system', { hasText: `${bob.name} joined` }).waitFor();
  await bob.context.close();
  await until(async () => (await sidebarCount()) === '1' && (await headerCount()) === '1', { what: 'count back to 1 after Bob left' });
  await ann.page.waitForSelector(`#online-users [data-user="${bob.id}"][data-online="true"]`, { state: 'detached' });
  await noErrors(ann);
});

test('a big room: one line for many comings and goings, the exact count, the people list in part', { timeout: 120_000 }, async (t) => {
  // Above 100 people online (CHAT_PRESENCE_COALESCE_ABOVE) the server stops announcing each
  // one and folds them into its `online_users` updates.
  const CROWD = 130;
  const ann = await signIn(t, `Ann ${RUN}`);
  const room = `big-${RUN}`;
  await openRoom(ann, room);
  const crowd = await browser.newContext();
  t.after(() => crowd.close());
  const opener = await crowd.newPage();
  await opener.goto(`${BASE_URL}/`);
  // The crowd: plain WebSockets from one page, each its own user.
  const joined = await opener.evaluate(async ({ n, room, run }) => {
    const open = async (i) => {
      const res = await fetch('/api/dev/token', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ name: `Crowd ${i} ${run}` }) });
      const { token } = await res.json();
      const ws = new WebSocket(`${location.origin.replace(/^http/, 'ws')}/ws?token=${token}`);
      await new Promise((resolve, reject) => {
        ws.onmessage = (ev) => {
          const f = JSON.parse(ev.data);
          if (f.type === 'hello') ws.send(JSON.stringify({ type: 'join', room, ref: 'j' }));
          if (f.type === 'joined') resolve();
        };
        ws.onerror = reject;
      });
      (window.crowd ||= []).push(ws);
    };
    for (let i = 0; i < n; i += 26) await Promise.all(Array.from({ length: Math.min(26, n - i) }, (_, k) => open(i + k)));
    return window.crowd.length;
  }, { n: CROWD, room, run: RUN });
  assert.equal(joined, CROWD);
  const headerCount = () => ann.page.textContent('#online-count');
  await until(async () => (await headerCount()) === String(CROWD + 1), { what: `count ${CROWD + 1}` });
  // Past 100 the comings are one line that grows, naming a few.
  const wave = ann.page.locator('#message-list .system', { hasText: /and \d+ others? joined/ });
  await wave.first().waitFor();
  // The people list shows whom the server listed, and says how many more.
  await ann.page.locator('#online-users .member-group', { hasText: `Online — ${CROWD + 1}` }).waitFor({ state: 'attached' });
  await ann.page.locator('#online-users .member-more', { hasText: /and \d+ more online/ }).waitFor({ state: 'attached' });
  await shot(ann.page, 'big-room');
  await opener.evaluate(() => { for (const ws of window.crowd) ws.close(); });
  await until(async () => (await headerCount()) === '1', { what: 'count back to 1' });
  await ann.page.locator('#message-list .system', { hasText: /left/ }).first().waitFor();
  await noErrors(ann);
});

test('typing line appears and disappears', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `typing-${RUN}`;
  await openRoom(ann, room);
  await openRoom(bob, room);
  await bob.page.waitForSelector(`#online-users [data-user="${ann.id}"]`);

  const line = bob.page.locator('#typing-line');
  const typingShown = () => bob.page.waitForFunction((name) => document.getElementById('typing-line').textContent === `${name} is typing…`, ann.name);
  const typingGone = (timeout) => bob.page.waitForFunction(() => document.getElementById('typing-line').textContent.trim() === '', null, { timeout });

  await ann.page.locator('#composer').pressSequentially('I am typing something', { delay: 30 });
  await typingShown();
  assert.equal(await ann.page.textContent('#typing-line'), '', 'nobody sees their own typing');
  // Idle for 2 s -> stop_typing (at worst the 5 s expiry).
  await typingGone(9_000);

  // Typing again, then sending clears it at once.
  await ann.page.locator('#composer').pressSequentially(' more', { delay: 30 });
  await typingShown();
  const text = `typed and sent ${RUN}`;
  await ann.page.fill('#composer', text);
  await ann.page.press('#composer', 'Enter');
  await waitForMessage(bob, text);
  await typingGone(1_500);
  assert.equal(await line.textContent(), '');
  await noErrors(ann, bob);
});

test('user content is escaped: <img onerror> and friends render as text', { timeout: 60_000 }, async (t) => {
  const evilName = '<img src=x onerror=alert("name")>';
  const ann = await signIn(t, evilName);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `xss-${RUN}`;
  await openRoom(ann, room);
  await openRoom(bob, room);

  const payloads = ['<img src=x onerror=alert(1)>', '<script>alert(2)</script>', '"><svg onload=alert(3)>', '&lt;b&gt;not bold&lt;/b&gt;'];
  for (const p of payloads) await send(ann, `${p} ${RUN}`);
  for (const p of payloads) {
    const m = await waitForMessage(bob, `${p} ${RUN}`);
    assert.equal(await m.locator('.content').textContent(), `${p} ${RUN}`);
    assert.equal(await m.locator('.author').textContent(), evilName);
  }
  await bob.page.waitForSelector(`#online-users [data-user="${ann.id}"]`);
  for (const u of [ann, bob]) {
    assert.equal(await u.page.locator('#app img, #app script, #message-list svg:not(.icon svg), #online-users svg').count(), 0, 'no markup injected');
  }
  assert.equal(await bob.page.locator(`#online-users [data-user="${ann.id}"] .member-name`).textContent(), evilName);
  // Edited content is text too.
  const id = await msgByText(ann.page, `${payloads[0]} ${RUN}`).getAttribute('data-id');
  const mine = ann.page.locator(`#message-list .msg[data-id="${id}"]`);
  await mine.hover();
  await mine.locator('.msg-menu').click();
  await mine.locator('[data-action="edit"]').click();
  await mine.locator('.edit-box textarea').fill(`<img src=y onerror=alert(4)> edited ${RUN}`);
  await mine.locator('.edit-box textarea').press('Enter');
  await waitForMessage(bob, `<img src=y onerror=alert(4)> edited ${RUN}`);
  assert.equal(await bob.page.locator('#app img').count(), 0);
  await noErrors(ann, bob); // includes: no alert() dialog opened
});

test('edit and delete own message', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `edit-${RUN}`;
  await openRoom(ann, room);
  await openRoom(bob, room);

  const text = `typo here ${RUN}`;
  await send(ann, text);
  const theirs = await waitForMessage(bob, text);
  const id = await theirs.getAttribute('data-id');
  const mine = ann.page.locator(`#message-list .msg[data-id="${id}"]`);
  // Bob may not edit or delete Ann's message: no menu for him.
  assert.equal(await theirs.locator('.msg-menu').count(), 0);

  await mine.hover();
  await mine.locator('.msg-menu').click();
  await mine.locator('[data-action="edit"]').click();
  const box = mine.locator('.edit-box textarea');
  await box.fill(`fixed it ${RUN}`);
  await box.press('Enter');
  const bobsCopy = bob.page.locator(`#message-list .msg[data-id="${id}"]`);
  await bobsCopy.locator('.content', { hasText: `fixed it ${RUN}` }).waitFor();
  await bobsCopy.locator('.edited').waitFor();
  await mine.locator('.edited').waitFor();

  // Deleting asks first; "Cancel" keeps the message.
  await mine.hover();
  await mine.locator('.msg-menu').click();
  await mine.locator('[data-action="delete"]').click();
  await ann.page.locator('#confirm-dialog[open]').waitFor();
  await ann.page.click('#confirm-cancel');
  await ann.page.locator('#confirm-dialog').waitFor({ state: 'hidden' });
  assert.equal(await mine.getAttribute('data-deleted'), null, 'cancelled: not deleted');
  await mine.hover();
  await mine.locator('.msg-menu').click();
  await mine.locator('[data-action="delete"]').click();
  await ann.page.click('#confirm-ok');
  await bob.page.waitForSelector(`#message-list .msg[data-id="${id}"][data-deleted="true"]`);
  await ann.page.waitForSelector(`#message-list .msg[data-id="${id}"][data-deleted="true"]`);
  assert.equal(await bobsCopy.locator('.content').textContent(), 'This message was deleted.');
  assert.equal(await bob.page.getByText(`fixed it ${RUN}`).count(), 0, 'the old text is gone');
  await noErrors(ann, bob);
});

test('auto-scroll sticks to the bottom unless the reader scrolled up', { timeout: 90_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `scroll-${RUN}`;
  await openRoom(ann, room);
  await openRoom(bob, room);

  // Enough to overflow the list: Bob, at the bottom, follows along.
  await blast(ann, room, Array.from({ length: 40 }, (_, i) => `wave ${i + 1} ${RUN}`));
  await waitForMessage(bob, `wave 40 ${RUN}`);
  await until(async () => { const s = await scrollState(bob.page); return s.overflow && s.fromBottom < 5; }, { what: 'Bob stuck to the bottom' });
  assert.equal(await bob.page.isVisible('#new-messages-button'), false);

  // Bob scrolls up: a new message does not move his view; a "new messages" button appears.
  await bob.page.locator('#message-list').evaluate((l) => { l.scrollTop = Math.floor(l.scrollHeight / 3); });
  const before = await scrollState(bob.page);
  await send(ann, `while you were reading ${RUN}`);
  await waitForMessage(bob, `while you were reading ${RUN}`);
  await bob.page.locator('#new-messages-button').waitFor({ state: 'visible' });
  assert.match(await bob.page.textContent('#new-messages-button'), /1 new message/);
  assert.equal((await scrollState(bob.page)).top, before.top, 'the view did not move');
  await send(ann, `and another ${RUN}`);
  await bob.page.locator('#new-messages-button', { hasText: '2 new messages' }).waitFor();
  await shot(bob.page, 'scrolled-up-new-messages');

  await bob.page.click('#new-messages-button');
  await bob.page.locator('#new-messages-button').waitFor({ state: 'hidden' });
  await until(async () => (await scrollState(bob.page)).fromBottom < 5, { what: 'back at the bottom' });

  // Scrolling back down by hand also hides the button; and one's own message always scrolls down.
  await bob.page.locator('#message-list').evaluate((l) => { l.scrollTop = 0; });
  await send(bob, `my own message ${RUN}`);
  await until(async () => (await scrollState(bob.page)).fromBottom < 5, { what: 'own message scrolls to the bottom' });
  await noErrors(ann, bob);
});

test('history pages load on scroll-up, in order, keeping the view anchored', { timeout: 120_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const room = `history-${RUN}`;
  await openRoom(ann, room);
  const N = 130;
  await blast(ann, room, Array.from({ length: N }, (_, i) => `line ${i + 1} of ${N} ${RUN}`));

  const bob = await signIn(t, `Bob ${RUN}`);
  await openRoom(bob, room);
  await waitForMessage(bob, `line ${N} of ${N} ${RUN}`);
  const initial = (await listMessages(bob.page)).length;
  assert.ok(initial < N, `only the newest page is loaded first (${initial})`);
  assert.ok((await scrollState(bob.page)).fromBottom < 5, 'opens at the bottom');

  for (let i = 0; i < 30 && !(await msgByText(bob.page, `line 1 of ${N} ${RUN}`).count()); i++) {
    const count = (await listMessages(bob.page)).length;
    await bob.page.locator('#message-list').evaluate((l) => { l.scrollTop = 0; });
    await until(async () => (await listMessages(bob.page)).length > count, { what: 'an older page' });
    assert.ok((await scrollState(bob.page)).top > 0, 'the view stays anchored after prepending');
  }
  const msgs = (await listMessages(bob.page)).filter((m) => m.text.startsWith('line '));
  assert.deepEqual(msgs.map((m) => m.text), Array.from({ length: N }, (_, i) => `line ${i + 1} of ${N} ${RUN}`));
  const seqs = msgs.map((m) => m.seq);
  assert.ok(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), 'in seq order');
  await bob.page.waitForSelector('#message-list .history-edge[data-state="start"]');
  await noErrors(ann, bob);
});

test('a dropped connection recovers the messages it missed (since)', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`, { gate: true });
  const room = `recover-${RUN}`;
  await openRoom(ann, room);
  await openRoom(bob, room);
  await send(ann, `first ${RUN}`);
  await waitForMessage(bob, `first ${RUN}`);
  await recordConnStates(bob.page);

  // Frames to Bob are lost on the way, then his connection drops.
  bob.gate.swallow = true;
  const missed = Array.from({ length: 8 }, (_, i) => `missed ${i} ${RUN}`);
  for (const text of missed) await send(ann, text);
  assert.equal(await msgByText(bob.page, `missed 0 ${RUN}`).count(), 0, 'the frames really were lost');
  bob.gate.swallow = false;
  bob.gate.cut();
  await bob.page.waitForSelector(mainJoined(room), { timeout: 20_000 });
  await bob.page.waitForSelector('#conn-dot[data-state="connected"]');
  for (const text of missed) await waitForMessage(bob, text, 15_000);
  await send(ann, `after ${RUN}`);
  await waitForMessage(bob, `after ${RUN}`);
  const msgs = (await listMessages(bob.page)).filter((m) => m.text.endsWith(RUN));
  assert.deepEqual(msgs.map((m) => m.text), [`first ${RUN}`, ...missed, `after ${RUN}`]);
  const states = await bob.page.evaluate(() => window.__connStates);
  assert.ok(states.includes('reconnecting'), `went amber: ${states}`);
  await noErrors(bob);
});

test('a long disconnection is filled from the history API (recovered: false)', { timeout: 90_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`, { gate: true });
  const room = `gap-${RUN}`;
  await openRoom(ann, room);
  await openRoom(bob, room);
  await send(ann, `start ${RUN}`);
  await waitForMessage(bob, `start ${RUN}`);

  // More than the server's recovery window goes by while Bob hears nothing.
  bob.gate.swallow = true;
  const N = RECOVERY_WINDOW + 30;
  const missed = Array.from({ length: N }, (_, i) => `gap ${i + 1} of ${N} ${RUN}`);
  await blast(ann, room, missed);
  bob.gate.swallow = false;
  bob.gate.joined.length = 0;
  bob.gate.cut();
  await until(() => bob.gate.joined.find((f) => f.room?.id === room), { what: 'Bob re-joins' });
  assert.equal(bob.gate.joined.find((f) => f.room?.id === room).recovered, false, 'the server could not replay it all');
  await waitForMessage(bob, missed.at(-1), 15_000);
  await send(ann, `end ${RUN}`);
  await waitForMessage(bob, `end ${RUN}`);
  const msgs = (await listMessages(bob.page)).filter((m) => m.text.endsWith(RUN));
  assert.deepEqual(msgs.map((m) => m.text), [`start ${RUN}`, ...missed, `end ${RUN}`]);
  await noErrors(bob);
});

test('the dot turns red when the browser goes offline and green when it is back', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `offline-${RUN}`;
  await openRoom(ann, room);
  await openRoom(bob, room);
  await ann.context.setOffline(true);
  await ann.page.waitForSelector('#conn-dot[data-state="offline"]');
  assert.match(await ann.page.textContent('#conn-label'), /Offline/);
  // A banner says so, with a way to try again at once.
  await ann.page.locator('#offline-banner', { hasText: 'offline' }).waitFor();
  assert.equal(await ann.page.isVisible('#retry-now'), true);
  // What Ann writes meanwhile waits ("Sending…") and goes out when she is back.
  const queued = `written while offline ${RUN}`;
  await ann.page.fill('#composer', queued);
  await ann.page.press('#composer', 'Enter');
  await msgByText(ann.page, queued).and(ann.page.locator('[data-status="pending"]')).locator('.send-state', { hasText: 'Sending' }).waitFor();
  await send(bob, `said while ann was offline ${RUN}`);
  await ann.context.setOffline(false);
  await ann.page.waitForSelector('#conn-dot[data-state="connected"]');
  await ann.page.locator('#offline-banner').waitFor({ state: 'hidden' });
  await ann.page.waitForSelector(mainJoined(room));
  await waitForMessage(ann, `said while ann was offline ${RUN}`);
  await waitForMessage(bob, queued);
  await msgByText(ann.page, queued).and(ann.page.locator('[data-status="sent"]')).waitFor();
  await noErrors(ann, bob);
});

test('gateway killed and restarted: dot goes amber then green; messages sent meanwhile are recovered', { timeout: 180_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`, { gate: true });
  const room = `restart-${RUN}`;
  await openRoom(ann, room);
  await openRoom(bob, room);
  const before = `before the crash ${RUN}`;
  await send(ann, before);
  await waitForMessage(bob, before);
  for (const u of [ann, bob]) await recordConnStates(u.page);

  await gateway.stop('SIGKILL');
  for (const u of [ann, bob]) await u.page.waitForSelector('#conn-dot[data-state="reconnecting"]', { timeout: 10_000 });
  await ann.page.locator('#offline-banner').waitFor({ state: 'visible' });
  await shot(bob.page, 'restart-reconnecting');
  // Bob's network stays down a little longer than the gateway: Ann talks without him.
  bob.gate.down = true;
  await gateway.restart();
  await ann.page.waitForSelector('#conn-dot[data-state="connected"]', { timeout: 60_000 });
  await ann.page.waitForSelector(mainJoined(room), { timeout: 15_000 });
  const meanwhile = Array.from({ length: 5 }, (_, i) => `while bob was away ${i} ${RUN}`);
  for (const text of meanwhile) await send(ann, text);
  assert.equal(await msgByText(bob.page, meanwhile[0]).count(), 0, 'Bob really was away');

  bob.gate.down = false;
  await bob.page.waitForSelector('#conn-dot[data-state="connected"]', { timeout: 60_000 });
  await bob.page.waitForSelector(mainJoined(room), { timeout: 15_000 });
  for (const text of meanwhile) await waitForMessage(bob, text, 15_000);
  const after = `after the restart ${RUN}`;
  await send(bob, after);
  await waitForMessage(ann, after);

  const expected = [before, ...meanwhile, after];
  for (const u of [ann, bob]) {
    await waitForMessage(u, after);
    const msgs = (await listMessages(u.page)).filter((m) => m.text.endsWith(RUN));
    assert.deepEqual(msgs.map((m) => m.text), expected, `${u.name}: every message exactly once, in order`);
    const seqs = msgs.map((m) => m.seq);
    assert.ok(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), `${u.name}: seqs strictly increase: ${seqs}`);
    const states = await u.page.evaluate(() => window.__connStates);
    assert.equal(states[0], 'connected');
    assert.ok(states.includes('reconnecting'), `${u.name} went amber: ${states}`);
    assert.equal(states.at(-1), 'connected', `${u.name} ends green: ${states}`);
  }
  await noErrors(ann, bob);
});

test('graceful restart (drain): clients move and no acknowledged message is lost', { timeout: 180_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `drain-${RUN}`;
  await openRoom(ann, room);
  await openRoom(bob, room);
  for (const u of [ann, bob]) await recordConnStates(u.page);
  const before = `before the drain ${RUN}`;
  await send(ann, before);
  await waitForMessage(bob, before);

  const stopped = gateway.stop('SIGTERM');
  // While the node drains Ann keeps typing: whatever the server acknowledges must reach Bob.
  const typed = [];
  for (let i = 0; i < 100; i++) {
    if (await ann.page.getAttribute('#conn-dot', 'data-state') !== 'connected' || gateway.proc.exitCode != null) break;
    const text = `during drain ${i} ${RUN}`;
    try {
      await ann.page.fill('#composer', text, { timeout: 500 });
      await ann.page.press('#composer', 'Enter', { timeout: 500 });
      await msgByText(ann.page, text).and(ann.page.locator('[data-status="sent"]')).waitFor({ timeout: 1_000 });
      typed.push(text);
    } catch { break; }
  }
  await stopped;
  for (const u of [ann, bob]) await u.page.waitForSelector('#conn-dot:not([data-state="connected"])', { timeout: 10_000 });
  await gateway.restart();
  for (const u of [ann, bob]) {
    await u.page.waitForSelector('#conn-dot[data-state="connected"]', { timeout: 60_000 });
    await u.page.waitForSelector(mainJoined(room), { timeout: 15_000 });
  }
  const after = `after the drain ${RUN}`;
  await send(bob, after);
  const expected = [before, ...typed, after];
  for (const u of [ann, bob]) {
    await waitForMessage(u, after);
    await until(async () => (await u.page.locator('#message-list .msg:not([data-status="sent"])').count()) === 0,
      { timeout: 20_000, what: `${u.name}: every message acknowledged` });
    const msgs = (await listMessages(u.page)).filter((m) => expected.includes(m.text));
    assert.deepEqual(msgs.map((m) => m.text), expected, `${u.name}: every acknowledged message exactly once, in order`);
    const seqs = msgs.map((m) => m.seq);
    assert.ok(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), `${u.name}: seqs strictly increase: ${seqs}`);
    assert.equal((await u.page.evaluate(() => window.__connStates)).at(-1), 'connected');
  }
  await noErrors(ann, bob);
});

test('a site-wide notice shows as a banner (escaped) and can be dismissed', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  await openRoom(bob, `notice-${RUN}`);
  const content = `<b>Maintenance</b> at 22:00 UTC ${RUN}`;
  const res = await fetch(`${BASE_URL}/api/admin/notice`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${await devToken('Root', { admin: true })}` },
    body: JSON.stringify({ content }),
  });
  assert.ok(res.ok, `notice accepted: HTTP ${res.status}`);
  for (const u of [ann, bob]) {
    await u.page.locator('#notice-banner').waitFor({ state: 'visible' });
    assert.equal(await u.page.textContent('#notice-banner .notice-content'), content);
    assert.equal(await u.page.locator('#notice-banner b').count(), 0);
  }
  await ann.page.click('#notice-dismiss');
  await ann.page.locator('#notice-banner').waitFor({ state: 'hidden' });
  assert.equal(await bob.page.isVisible('#notice-banner'), true, 'dismissing is per page');
  await noErrors(ann, bob);
});

test('a global admin deletes someone else\'s message', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const mod = await signIn(t, `Mod ${RUN}`, { admin: true });
  const room = `moddel-${RUN}`;
  await openRoom(ann, room);
  await openRoom(mod, room);
  assert.equal(await mod.page.textContent('#me-role'), 'Administrator');

  const text = `spam spam spam ${RUN}`;
  await send(ann, text);
  const theirs = await waitForMessage(mod, text);
  const id = await theirs.getAttribute('data-id');
  await theirs.hover();
  await theirs.locator('.msg-menu').click();
  assert.equal(await theirs.locator('[data-action="edit"]').count(), 0, 'nobody edits someone else\'s message');
  await theirs.locator('[data-action="delete"]').click();
  await mod.page.click('#confirm-ok');
  for (const u of [ann, mod]) await u.page.waitForSelector(`#message-list .msg[data-id="${id}"][data-deleted="true"]`);
  await ann.page.locator('#message-list .system', { hasText: `${mod.name} deleted a message from ${ann.name}` }).waitFor();
  await noErrors(ann, mod);
});

test('narrow screens (360 px) collapse the sidebar behind a toggle', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`, { viewport: { width: 360, height: 740 } });
  const page = ann.page;
  const room = `narrow-${RUN}`;
  assert.equal(await page.locator('#sidebar').isVisible(), false, 'sidebar starts collapsed');
  await openRoom(ann, room);
  await page.click('#sidebar-toggle');
  await page.locator(`#room-list [data-room="${room}"]`).waitFor({ state: 'visible' });
  await page.keyboard.press('Escape');
  await page.locator('#sidebar').waitFor({ state: 'hidden' });
  await send(ann, `small screen ${RUN}`);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
  assert.equal(overflow, false, 'no horizontal overflow at 360 px');
  await shot(page, 'narrow');
  await noErrors(ann);
});

// ------------------------------------------ features whose server side is still landing

test('create a room through the dialog; its topic is shown as text', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `created-${RUN}`;
  const topic = '<img src=x onerror=alert("topic")>';
  await createRoom(ann, room, { name: `Created ${RUN}`, topic });
  assert.equal(await ann.page.textContent('#room-name'), `Created ${RUN}`);
  assert.equal(await ann.page.textContent('#room-topic'), topic);
  await joinRoom(bob, room); // public: listed for everyone
  assert.equal(await bob.page.textContent('#room-topic'), topic);
  assert.equal(await bob.page.locator('#app img').count(), 0);
  await noErrors(ann, bob);
});

test('pin a message: pinned bar on both sides, jump to it, unpin', { timeout: 90_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `pins-${RUN}`;
  await createRoom(ann, room); // Ann owns it and may pin
  await openRoom(bob, room);

  const text = `please pin me ${RUN}`;
  await send(ann, text);
  const mine = msgByText(ann.page, text);
  const theirs = await waitForMessage(bob, text);
  assert.equal(await theirs.locator('.msg-pin').count(), 0, 'a plain member has no pin button');
  await mine.hover();
  await mine.locator('.msg-pin[data-action="pin"]').click();

  const id = await theirs.getAttribute('data-id');
  for (const u of [ann, bob]) {
    const chip = u.page.locator(`#pinned-bar [data-pin-id="${id}"]`);
    await chip.waitFor();
    assert.ok((await chip.textContent()).includes(text));
    await u.page.locator(`#message-list .msg.pinned[data-id="${id}"]`).waitFor();
  }

  // Push the pinned message out of view, then jump back to it from the bar.
  await blast(ann, room, Array.from({ length: 40 }, (_, i) => `filler ${i} ${RUN}`));
  await waitForMessage(bob, `filler 39 ${RUN}`);
  await bob.page.click(`#pinned-bar [data-pin-id="${id}"]`);
  await until(() => theirs.evaluate((el) => {
    const list = document.getElementById('message-list').getBoundingClientRect();
    const r = el.getBoundingClientRect();
    return r.top >= list.top - 1 && r.bottom <= list.bottom + 1;
  }), { what: 'pinned message scrolled into view' });

  await mine.hover();
  await mine.locator('.msg-pin[data-action="unpin"]').click();
  for (const u of [ann, bob]) await u.page.locator('#pinned-bar').waitFor({ state: 'hidden' });
  await noErrors(ann, bob);
});

test('read ticks: ✓ when sent, ✓✓ once the other user has read it', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `reads-${RUN}`;
  const elsewhere = `reads-elsewhere-${RUN}`;
  await openRoom(ann, room);
  await openRoom(bob, room);
  await openRoom(bob, elsewhere); // Bob looks at another room (still joined to the first)

  const text = `did you read this ${RUN}`;
  await send(ann, text);
  const ticks = msgByText(ann.page, text).locator('.ticks');
  // Bob has it (unread badge) but has not looked: one tick.
  const badge = bob.page.locator(`#room-list [data-room="${room}"] .unread`);
  await bob.page.locator(`#room-list [data-room="${room}"] .unread:not([hidden])`, { hasText: /^1$/ }).waitFor();
  assert.equal(await ticks.textContent(), '✓', 'sent, not read yet');

  await bob.page.click(`#room-list [data-room="${room}"]`);
  await waitForMessage(bob, text);
  await ann.page.waitForFunction((el) => el.textContent === '✓✓', await ticks.elementHandle());
  assert.equal(await badge.isVisible(), false, 'badge cleared once the room is open');
  const title = await ticks.getAttribute('title');
  assert.match(title, /Read by 1/);
  assert.ok(title.includes(bob.name), `title names the reader: ${title}`);
  await noErrors(ann, bob);
});

test('the room owner kicks a member', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `kick-${RUN}`;
  await createRoom(ann, room);
  await openRoom(bob, room);

  await bob.page.waitForSelector(`#online-users [data-user="${ann.id}"]`);
  assert.equal(await bob.page.locator('#online-users [data-action]').count(), 0, 'a plain member sees no moderation actions');
  const kick = ann.page.locator(`#online-users [data-user="${bob.id}"] [data-action="kick"]`);
  await kick.waitFor();
  assert.equal(await ann.page.locator(`#online-users [data-user="${ann.id}"] [data-action]`).count(), 0, 'no actions on oneself');
  await kick.click();

  await bob.page.waitForSelector(`#main[data-room="${room}"][data-joined="false"]`);
  await bob.page.locator('#message-list .system', { hasText: 'You were removed' }).waitFor();
  await ann.page.locator('#message-list .system', { hasText: `${bob.name} was removed` }).waitFor();
  await ann.page.waitForSelector(`#online-users [data-user="${bob.id}"][data-online="true"]`, { state: 'detached' });
  await noErrors(ann, bob);
});

test('the room owner bans a member, who cannot rejoin', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `ban-${RUN}`;
  await createRoom(ann, room);
  await openRoom(bob, room);

  await ann.page.locator(`#online-users [data-user="${bob.id}"] [data-action="ban"]`).click();
  await ann.page.click('#confirm-ok');
  await bob.page.waitForSelector(`#main[data-room="${room}"][data-joined="false"]`);
  await bob.page.locator('#message-list .system', { hasText: 'You were banned' }).waitFor();
  assert.match(await bob.page.getAttribute('#composer', 'placeholder'), /banned/i);
  assert.equal(await bob.page.isVisible('#join-button'), false, 'no join button while banned');
  await ann.page.locator('#message-list .system', { hasText: `${bob.name} was banned` }).waitFor();
  // A fresh page of Bob's trying to get in by link is refused, in words.
  await bob.page.reload();
  await bob.page.evaluate((id) => { location.hash = `room=${id}`; }, room);
  await bob.page.waitForSelector(`#main[data-room="${room}"][data-access="banned"]`);
  await bob.page.locator('#message-list .history-edge', { hasText: 'You are banned from this room' }).waitFor();
  assert.equal(await bob.page.getAttribute('#main', 'data-joined'), 'false');
  await noErrors(ann, bob);
});

test('the room owner mutes and unmutes a member', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `mute-${RUN}`;
  await createRoom(ann, room);
  await openRoom(bob, room);

  const member = ann.page.locator(`#online-users [data-user="${bob.id}"]`);
  await member.locator('[data-action="mute"]').click();
  await bob.page.waitForSelector('#composer[disabled]');
  assert.match(await bob.page.getAttribute('#composer', 'placeholder'), /muted/i);
  await ann.page.locator('#message-list .system', { hasText: `${bob.name} was muted` }).waitFor();
  await member.locator('[data-action="unmute"]').click();
  await bob.page.waitForSelector('#composer:not([disabled])');
  await send(bob, `free to talk ${RUN}`);
  await waitForMessage(ann, `free to talk ${RUN}`);
  await noErrors(ann, bob);
});

test('the room owner deletes a member\'s message and then the room', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `delroom-${RUN}`;
  await createRoom(ann, room);
  await openRoom(bob, room);
  await bob.page.click('#room-menu-button');
  assert.equal(await bob.page.isVisible('#room-menu [data-action="delete-room"]'), false, 'members cannot delete the room');
  assert.equal(await bob.page.isVisible('#room-menu [data-action="settings"]'), false, 'nor change its settings');
  await bob.page.keyboard.press('Escape');

  const text = `off topic ${RUN}`;
  await send(bob, text);
  const theirs = await waitForMessage(ann, text);
  await theirs.hover();
  await theirs.locator('.msg-menu').click();
  await theirs.locator('[data-action="delete"]').click();
  await ann.page.click('#confirm-ok');
  await bob.page.waitForSelector(`#message-list .msg[data-deleted="true"]`);

  await ann.page.click('#room-menu-button');
  await ann.page.click('#room-menu [data-action="delete-room"]');
  await ann.page.locator('#confirm-dialog[open]', { hasText: 'cannot be undone' }).waitFor();
  await ann.page.click('#confirm-ok');
  for (const u of [ann, bob]) {
    await u.page.locator(`#room-list [data-room="${room}"]`).waitFor({ state: 'detached' });
    await u.page.locator('.toast', { hasText: 'was deleted' }).waitFor();
  }
  await noErrors(ann, bob);
});

// ------------------------------------------ bugs found by trying it as new users would

test('unread badges count messages only: pins and unpins add nothing, here and in a new session', { timeout: 90_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `badges-${RUN}`;
  await createRoom(ann, room);
  await openRoom(bob, room);
  const text = `pin me ${RUN}`;
  await send(ann, text);
  await waitForMessage(bob, text);
  await openRoom(bob, `badges-elsewhere-${RUN}`); // Bob looks at another room

  const mine = msgByText(ann.page, text);
  for (let i = 0; i < 3; i++) {
    await mine.hover();
    await mine.locator('.msg-pin[data-action="pin"]').click();
    await ann.page.locator('#pinned-bar').waitFor();
    await mine.hover();
    await mine.locator('.msg-pin[data-action="unpin"]').click();
    await ann.page.locator('#pinned-bar').waitFor({ state: 'hidden' });
  }
  await send(ann, `one real message ${RUN}`);
  const badge = (u) => u.page.locator(`#room-list [data-room="${room}"] .unread`);
  await bob.page.locator(`#room-list [data-room="${room}"] .unread:not([hidden])`).waitFor();
  assert.equal(await badge(bob).textContent(), '1', 'six pin events and one message: one unread');

  // A new session of Bob's: the server counts stored events after his marker (7); the badge
  // counts messages.
  const again = await signIn(t, `Bob ${RUN}`);
  await again.page.locator(`#room-list [data-room="${room}"] .unread:not([hidden])`).waitFor({ timeout: 15_000 });
  assert.equal(await badge(again).textContent(), '1');
  await noErrors(ann, bob, again);
});

test('a new browser session lists the user\'s rooms as joined (the server says which)', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const room = `mine-${RUN}`;
  await openRoom(ann, room);
  const other = `not-mine-${RUN}`;
  const bob = await signIn(t, `Bob ${RUN}`);
  await createRoom(bob, other); // listed for Ann, but not hers

  const fresh = await signIn(t, `Ann ${RUN}`); // a new context: nothing in its session storage
  await fresh.page.locator(`#room-list [data-room="${room}"]`).waitFor();
  await fresh.page.locator(`#room-list [data-room="${other}"]`).waitFor();
  assert.equal(await groupOf(fresh.page, room), 'Joined');
  assert.equal(await groupOf(fresh.page, other), 'Browse');
  // It is really joined: messages arrive without opening it.
  await openRoom(bob, room);
  await send(bob, `hello ann ${RUN}`);
  await fresh.page.locator(`#room-list [data-room="${room}"] .unread:not([hidden])`, { hasText: /^1$/ }).waitFor();
  await noErrors(ann, bob, fresh);
});

test('restricted room: a reader gets a read-only composer, no raw error; made a member, they post', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `readers-${RUN}`;
  await createRoom(ann, room, { visibility: 'restricted' });
  await send(ann, `only members post here ${RUN}`);
  await openRoom(bob, room);
  await waitForMessage(bob, `only members post here ${RUN}`);
  assert.equal(await bob.page.isDisabled('#composer'), true, 'a reader cannot type');
  assert.match(await bob.page.getAttribute('#composer', 'placeholder'), /Only members can post/);
  assert.equal(await bob.page.locator('.toast').count(), 0, 'no error toast');

  // The owner makes Bob a member from the people list (Reader -> Member).
  const row = ann.page.locator(`#online-users [data-user="${bob.id}"]`);
  await row.locator('.badge[data-role="reader"]').waitFor();
  await row.locator('select[data-action="role"]').selectOption('member');
  await bob.page.waitForSelector('#composer:not([disabled])');
  await send(bob, `now I can post ${RUN}`);
  await waitForMessage(ann, `now I can post ${RUN}`);
  const text = await bob.page.locator('#app').innerText();
  assert.doesNotMatch(text, /forbidden|only members may post/, 'no server wording');
  await noErrors(ann, bob);
});

test('a private room opened by link: a clear header, no spinner, no raw toast; once added, it opens', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `secret-${RUN}`;
  await createRoom(ann, room, { visibility: 'private' });
  await send(ann, `the secret ${RUN}`);

  await bob.page.evaluate((id) => { location.hash = `room=${id}`; }, room);
  await bob.page.waitForSelector(`#main[data-room="${room}"][data-access="denied"]`);
  assert.equal(await bob.page.textContent('#room-topic'), 'Private room · members only');
  await bob.page.locator('#message-list .history-edge[data-state="access"]', { hasText: 'This room is private' }).waitFor();
  assert.equal(await bob.page.locator('#message-list .spinner').count(), 0, 'no endless spinner');
  assert.equal(await bob.page.locator('.toast').count(), 0, 'no toast');
  assert.match(await bob.page.getAttribute('#composer', 'placeholder'), /Ask an admin to add you/);

  // Ann adds Bob from the room menu; Bob's page goes in by itself.
  await openRoomMenu(ann, 'add-member');
  await ann.page.fill('#add-member-user', bob.id);
  await ann.page.click('#add-member-submit');
  await ann.page.locator('#add-member-dialog').waitFor({ state: 'hidden' });
  await bob.page.waitForSelector(mainJoined(room));
  await waitForMessage(bob, `the secret ${RUN}`);
  assert.equal(await bob.page.locator('#message-list .spinner').count(), 0, 'the spinner is gone');
  assert.equal(await bob.page.textContent('#room-topic'), 'Private room');
  await noErrors(ann, bob);
});

test('no stale screens: a new role, an unban and a leave show at once', { timeout: 120_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `stale-${RUN}`;
  const elsewhere = `stale-elsewhere-${RUN}`;
  await createRoom(ann, room);
  await openRoom(bob, room);
  await send(ann, `pin this later ${RUN}`);
  await send(bob, `bob was here ${RUN}`);
  await waitForMessage(bob, `pin this later ${RUN}`);
  assert.equal(await bob.page.locator('#message-list .msg-pin').count(), 0, 'a member may not pin');

  // Promoted to admin while looking at another room: the pin buttons are there on return.
  await openRoom(bob, elsewhere);
  await ann.page.locator(`#online-users [data-user="${bob.id}"] select[data-action="role"]`).selectOption('admin');
  await ann.page.locator('#message-list .system', { hasText: `${bob.name} is now an admin` }).waitFor();
  await bob.page.click(`#room-list [data-room="${room}"]`);
  await bob.page.waitForSelector(mainJoined(room));
  await msgByText(bob.page, `pin this later ${RUN}`).locator('.msg-pin[data-action="pin"]').waitFor({ state: 'attached' });

  // Banned, then unbanned from the "Banned users" list: Bob's page lets him back in by itself.
  await ann.page.locator(`#online-users [data-user="${bob.id}"] [data-action="ban"]`).click();
  await ann.page.click('#confirm-ok');
  await bob.page.waitForSelector(`#main[data-room="${room}"][data-access="banned"]`);
  await openRoomMenu(ann, 'bans');
  const row = ann.page.locator(`#bans-list [data-user="${bob.id}"]`);
  await row.waitFor();
  await row.locator('[data-action="unban"]').click();
  await row.waitFor({ state: 'detached' });
  await ann.page.click('#bans-close');
  await bob.page.waitForSelector(mainJoined(room), { timeout: 20_000 });
  await bob.page.waitForSelector('#composer:not([disabled])');

  // Leave: Bob's own message no longer offers edit/delete.
  const own = msgByText(bob.page, `bob was here ${RUN}`);
  await own.locator('.msg-menu').waitFor({ state: 'attached' });
  await openRoomMenu(bob, 'leave');
  await bob.page.waitForSelector(`#main[data-room="${room}"][data-joined="false"]`);
  assert.equal(await own.locator('.msg-menu').count(), 0, 'no menu after leaving');
  assert.equal(await bob.page.isVisible('#join-button'), true);
  await noErrors(ann, bob);
});

test('the people list never calls connected people offline (reader, after leave, after ban)', { timeout: 90_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `people-${RUN}`;
  await createRoom(ann, room, { visibility: 'restricted' });
  await openRoom(bob, room); // a reader
  const annRow = bob.page.locator(`#online-users [data-user="${ann.id}"]`);
  await bob.page.waitForSelector(`#online-users [data-user="${ann.id}"][data-online="true"]`);
  await bob.page.waitForSelector(`#online-users [data-user="${bob.id}"][data-online="true"]`);
  await ann.page.waitForSelector(`#online-users [data-user="${bob.id}"][data-online="true"]`);

  const noOffline = async (why) => {
    await annRow.waitFor();
    assert.notEqual(await annRow.getAttribute('data-online'), 'false', `${why}: Ann is not called offline`);
    assert.doesNotMatch(await bob.page.locator('#online-users').innerText(), /\boffline\b/i, why);
  };
  await openRoomMenu(bob, 'leave');
  await bob.page.waitForSelector(`#main[data-room="${room}"][data-joined="false"]`);
  await noOffline('after leaving');
  await bob.page.click('#join-button');
  await bob.page.waitForSelector(mainJoined(room));
  await ann.page.locator(`#online-users [data-user="${bob.id}"] [data-action="ban"]`).click();
  await ann.page.click('#confirm-ok');
  await bob.page.waitForSelector(`#main[data-room="${room}"][data-access="banned"]`);
  await noOffline('after a ban');
  await noErrors(ann, bob);
});

test('room settings: name, a long topic without spaces (no sideways scrolling), members may pin', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`, { viewport: { width: 390, height: 844 } });
  const room = `settings-${RUN}`;
  await createRoom(ann, room);
  await openRoom(bob, room);
  await send(ann, `hello ${RUN}`);
  await waitForMessage(bob, `hello ${RUN}`);
  assert.equal(await bob.page.locator('#message-list .msg-pin').count(), 0);

  const topic = 'x'.repeat(480);
  await openRoomMenu(ann, 'settings');
  await ann.page.fill('#settings-name', `Renamed ${RUN}`);
  await ann.page.fill('#settings-topic', topic);
  await ann.page.check('#settings-pin');
  await ann.page.click('#settings-submit');
  await ann.page.locator('#settings-dialog').waitFor({ state: 'hidden' });
  await bob.page.locator('#room-name', { hasText: `Renamed ${RUN}` }).waitFor();
  await bob.page.locator('#room-topic', { hasText: topic }).waitFor();
  // Members may pin now.
  await msgByText(bob.page, `hello ${RUN}`).locator('.msg-pin').waitFor({ state: 'attached' });
  // The topic, in the header, the history's start and a system line, never widens the page.
  const fresh = await signIn(t, `Carol ${RUN}`, { viewport: { width: 390, height: 844 } });
  await openRoom(fresh, room);
  await fresh.page.locator('#message-list .edge-topic').waitFor();
  for (const u of [ann, bob, fresh]) assert.equal(await noSidewaysScroll(u.page), true, `${u.name}: no sideways scrolling`);
  await noErrors(ann, bob, fresh);
});

test('refusals read as words people understand, shown once', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `taken-${RUN}`;
  await createRoom(ann, room);
  const { page } = bob;
  await page.click('#create-room-button');
  await page.fill('#new-room-name', 'Mine too');
  await page.fill('#new-room-id', room);
  await page.click('#create-room-submit');
  await page.locator('#create-room-error', { hasText: 'That room ID is already taken' }).waitFor();
  assert.equal(await page.locator('.toast').count(), 0, 'said once, in the dialog');
  const text = await page.locator('body').innerText();
  assert.doesNotMatch(text, /conflict|is taken \(|\(conflict\)/, 'no server wording');
  await page.click('#create-room-cancel');
  await noErrors(ann, bob);
});

// ------------------------------------------ look and feel

test('grouped messages, times without seconds, a day separator and a "New messages" divider', { timeout: 60_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`);
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `looks-${RUN}`;
  await openRoom(ann, room);
  await openRoom(bob, room);
  for (const text of ['one', 'two', 'three']) await send(ann, `${text} ${RUN}`);
  await send(bob, `four ${RUN}`);
  await waitForMessage(ann, `four ${RUN}`);
  const cls = async (text) => (await msgByText(ann.page, `${text} ${RUN}`).getAttribute('class')).split(' ');
  assert.equal((await cls('one')).includes('grouped'), false, 'the first of a run shows its author');
  assert.equal((await cls('two')).includes('grouped'), true);
  assert.equal((await cls('three')).includes('grouped'), true);
  assert.equal((await cls('four')).includes('grouped'), false, 'another author starts a new group');
  const time = msgByText(ann.page, `one ${RUN}`).locator('.meta .time');
  assert.match((await time.textContent()).trim(), /^\d{1,2}:\d{2}(\s?[AP]M)?$/, 'hours and minutes');
  assert.match(await time.getAttribute('title'), /\d{4}/, 'the full date on hover');
  const before = await ann.page.locator('#message-list .msg').first().evaluate((m) => {
    const sep = document.querySelector('#message-list .day-sep');
    return !!sep && !!(sep.compareDocumentPosition(m) & Node.DOCUMENT_POSITION_FOLLOWING);
  });
  assert.equal(before, true, 'a day separator before the first message');
  assert.equal(await ann.page.locator('#message-list .day-sep').first().innerText(), 'Today');

  // Bob looks elsewhere while Ann writes; back in the room, a divider marks where he stopped.
  await openRoom(bob, `looks-elsewhere-${RUN}`);
  await send(ann, `five ${RUN}`);
  await send(ann, `six ${RUN}`);
  await bob.page.locator(`#room-list [data-room="${room}"] .unread`, { hasText: /^2$/ }).waitFor();
  await bob.page.click(`#room-list [data-room="${room}"]`);
  await waitForMessage(bob, `six ${RUN}`);
  const divider = bob.page.locator('#message-list .unread-divider');
  await divider.waitFor();
  const next = await divider.evaluate((d) => d.nextElementSibling?.querySelector('.content')?.textContent);
  assert.equal(next, `five ${RUN}`, 'the divider sits before the first unread message');
  await shot(bob.page, 'new-messages-divider');
  await noErrors(ann, bob);
});

test('a phone: one-row header, actions by long press, "Read by" on tap, a collapsible pins bar', { timeout: 90_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`, { phone: true });
  const bob = await signIn(t, `Bob ${RUN}`);
  const room = `phone-${RUN}`;
  await createRoom(ann, room);
  await openRoom(bob, room);
  const { page } = ann;

  // One row: every header control shares the line of the room name.
  const header = await page.locator('.room-header').boundingBox();
  assert.ok(header.height <= 60, `header height ${header.height}`);
  const mid = (b) => b.y + b.height / 2;
  for (const sel of ['#sidebar-toggle', '#room-name', '#conn-dot', '#members-toggle', '#room-menu-button']) {
    const b = await page.locator(sel).boundingBox();
    assert.ok(Math.abs(mid(b) - mid(header)) < 14, `${sel} is on the header's row`);
  }

  const texts = ['first pin', 'second pin', 'third pin'].map((x) => `${x} ${RUN}`);
  for (const text of texts) await send(ann, text);
  const msg = msgByText(page, texts[0]);
  assert.equal(await msg.locator('.msg-menu').isVisible(), false, 'no row of buttons on a phone');
  assert.equal(await msg.locator('.msg-pin').isVisible(), false);
  // A long press opens the actions as a sheet.
  for (const text of texts) {
    const m = msgByText(page, text);
    let items = null;
    await longPress(page, m.locator('.content'), async () => {
      await page.locator('.menu.sheet').waitFor();
      items = await page.locator('.menu.sheet [data-action]').evaluateAll((els) => els.map((e) => e.dataset.action));
    });
    await page.locator('.menu.sheet').waitFor(); // still open once the finger is lifted
    assert.deepEqual(items, ['pin', 'edit', 'delete', 'readers']);
    await page.click('.menu.sheet [data-action="pin"]');
    await page.locator(`#message-list .msg.pinned`, { hasText: text }).waitFor();
  }
  // Three pins: one line, "3 pinned" and the latest; a tap shows them all.
  await page.locator('#pinned-count', { hasText: '3 pinned' }).waitFor();
  assert.equal(await page.locator('#pinned-bar .pin-chip').count(), 1);
  assert.equal(await page.isVisible('#pinned-items'), false);
  await page.click('#pinned-toggle');
  await page.locator('#pinned-items .pin-chip').nth(2).waitFor();
  assert.equal(await page.locator('#pinned-items .pin-chip').count(), 3);
  await page.click('#pinned-toggle');

  // Bob reads; Ann taps the ticks and sees who.
  await waitForMessage(bob, texts[2]);
  const ticks = msgByText(page, texts[2]).locator('.ticks');
  await ann.page.waitForFunction((e) => e.textContent === '✓✓', await ticks.elementHandle());
  await ticks.tap();
  const readers = msgByText(page, texts[2]).locator('.readers');
  await readers.waitFor();
  assert.match(await readers.innerText(), new RegExp(`Read by 1\\s+${bob.name}`));
  assert.equal(await noSidewaysScroll(page), true);
  await noErrors(ann, bob);
});

test('"Retry now" reconnects at once instead of waiting for the next attempt', { timeout: 90_000 }, async (t) => {
  const ann = await signIn(t, `Ann ${RUN}`, { gate: true });
  await openRoom(ann, `retry-${RUN}`);
  ann.gate.down = true;
  ann.gate.cut();
  await ann.page.locator('#offline-banner').waitFor();
  // Several refused attempts: the next one is seconds away (backoff), so a quick connection
  // after the click is the click's doing.
  await until(() => ann.gate.refused >= 5, { timeout: 40_000, what: 'five refused attempts' });
  ann.gate.down = false;
  const clicked = Date.now();
  await ann.page.locator('#retry-now').click({ timeout: 2_000 }).catch(() => { /* it already reconnected */ });
  await ann.page.waitForSelector('#conn-dot[data-state="connected"]', { timeout: 3_000 });
  assert.ok(Date.now() - clicked < 3_000);
  await ann.page.locator('#offline-banner').waitFor({ state: 'hidden' });
  await ann.page.waitForSelector(mainJoined(`retry-${RUN}`));
  await noErrors(ann);
});

test('screenshots of the main screens, desktop and phone (docs/screenshots)', { timeout: 90_000 }, async (t) => {
  // Plain names (unique in this server's fresh data directory) read better in the docs.
  const ann = await signIn(t, 'Ann');
  const bob = await signIn(t, 'Bob', { phone: true });
  const carol = await signIn(t, 'Carol');
  for (const r of ['general', 'random']) await openRoom(carol, r);
  await createRoom(ann, 'design', { name: 'Design reviews', topic: 'Weekly critique: bring a screenshot and one question' });
  await openRoom(bob, 'design');
  await openRoom(carol, 'design');
  await send(ann, 'Morning! The new onboarding flow is up on staging.');
  await send(ann, 'Three screens instead of five; the sign-in step is gone.');
  await send(carol, 'Looks much calmer. Is the progress bar still needed with three steps?');
  await send(bob, 'I would keep it: people like to know how far they are.');
  await send(ann, 'Fair. Pinning the staging link so nobody has to ask again.');
  const pinned = msgByText(ann.page, 'The new onboarding flow is up on staging.');
  await pinned.hover();
  await pinned.locator('.msg-pin').click();
  await ann.page.locator('#pinned-bar').waitFor();
  await waitForMessage(bob, 'Fair. Pinning');
  await carol.page.locator('#composer').pressSequentially('Let me check on my phone', { delay: 20 });
  await ann.page.locator('#typing-line', { hasText: 'Carol is typing' }).waitFor();
  await ann.page.mouse.move(0, 0);
  const files = [await docShot(ann.page, 'desktop-chat')];
  await bob.page.locator('#typing-line', { hasText: 'Carol is typing' }).waitFor();
  files.push(await docShot(bob.page, 'phone-chat'));
  await openRoomMenu(ann, 'settings');
  files.push(await docShot(ann.page, 'desktop-room-settings'));
  await ann.page.click('#settings-cancel');
  for (const f of files) assert.ok(statSync(f).size > 10_000, `${f} has a picture in it`);
  await noErrors(ann, bob, carol);
});
