// Real servers for the client's tests, on free ports: one embedded gateway, or the scaled
// product (redis-server + history-service + two gateways). Every process is killed by stop().
//
//   GATEWAY_BIN  gateway binary  (default ../../target/debug/gateway, from clients/js)
//   HISTORY_BIN  history-service (default: next to GATEWAY_BIN)

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const GATEWAY_BIN = path.resolve(HERE, '..', process.env.GATEWAY_BIN || '../../target/debug/gateway');
export const HISTORY_BIN = path.resolve(HERE, '..', process.env.HISTORY_BIN || path.join(path.dirname(GATEWAY_BIN), 'history-service'));
const INTERNAL_TOKEN = 'client-test-internal-token';
/** How long before a token's expiry the tests' gateways send `token_expiring`. */
export const TOKEN_EXPIRING_SECONDS = 2;
/** The gateway's built-in development key (public on purpose; see proto/src/auth.rs). */
const DEV_KEY = 'chat-gateway-development-key-do-not-use-in-production';

/** A port that was free a moment ago. */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => { const { port } = srv.address(); srv.close(() => resolve(port)); });
  });
}

async function waitForPort(port, ms = 10_000) {
  const end = Date.now() + ms;
  for (;;) {
    const ok = await new Promise((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => { s.end(); resolve(true); });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > end) throw new Error(`port ${port} never opened`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A process of ours; `started` resolves with its `listening on` address when it prints one. */
class Proc {
  constructor(name, cmd, args, env, { waitForListening = true } = {}) {
    this.name = name;
    this.output = '';
    this.child = spawn(cmd, args, { env: { PATH: process.env.PATH, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    this.exited = new Promise((r) => this.child.once('exit', r));
    this.started = new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${name} did not start in 30 s:\n${this.output.slice(-2000)}`)), 30_000);
      const onData = (chunk) => {
        this.output = (this.output + chunk.toString().replace(/\x1b\[[0-9;]*m/g, '')).slice(-20_000);
        const m = this.output.match(/listening on (?:https?:\/\/)?(\S+:\d+)/);
        if (m && waitForListening) { clearTimeout(timer); resolve(m[1]); }
      };
      this.child.stdout.on('data', onData);
      this.child.stderr.on('data', onData);
      this.child.once('error', (e) => { clearTimeout(timer); reject(e); });
      this.child.once('exit', (code, signal) => { clearTimeout(timer); reject(new Error(`${name} exited (${code ?? signal}):\n${this.output.slice(-2000)}`)); });
      if (!waitForListening) { clearTimeout(timer); resolve(null); }
    });
  }

  /** SIGTERM (a gateway drains) or SIGKILL; resolves when it is gone. */
  async stop(signal = 'SIGTERM') {
    if (this.child.exitCode != null || this.child.signalCode != null) return;
    this.child.kill(signal);
    const killer = setTimeout(() => this.child.kill('SIGKILL'), 20_000);
    await this.exited;
    clearTimeout(killer);
  }
}

/** A gateway process; `restart()` starts it again on the same port and data directory. */
export class Gateway {
  constructor(env) {
    this.env = env;
    this.dataDir = mkdtempSync(path.join(tmpdir(), 'chat-client-test-gw-'));
  }

  async start(listen = '127.0.0.1:0') {
    const env = {
      CHAT_LISTEN: listen, CHAT_DATA_DIR: this.dataDir, CHAT_DRAIN_SECONDS: '2', CHAT_LOG: 'info',
      CHAT_TOKEN_EXPIRING_SECONDS: String(TOKEN_EXPIRING_SECONDS), ...this.env,
    };
    for (let i = 0; ; i++) {
      this.proc = new Proc('gateway', GATEWAY_BIN, [], env);
      try {
        const addr = await this.proc.started;
        this.addr = addr;
        this.url = `http://${addr}`;
        return this.url;
      } catch (e) {
        // The port can be held for a moment after the previous process on it.
        if (i >= 20 || !/address|in use/i.test(e.message)) throw e;
        await new Promise((r) => setTimeout(r, 250));
      }
    }
  }

  restart() { return this.start(this.addr); }

  stop(signal) { return this.proc?.stop(signal); }

  async remove() {
    await this.stop('SIGKILL');
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}

/**
 * The servers of one mode. `urls` are the gateways (one embedded, two scaled);
 * `newGateway()` adds one more (for tests that stop theirs).
 */
export async function startServers(mode) {
  const cleanup = [];
  const stop = async () => { for (const fn of cleanup.reverse()) await fn().catch(() => {}); };
  try {
    let gatewayEnv = {};
    if (mode === 'scaled') {
      const redisDir = mkdtempSync(path.join(tmpdir(), 'chat-client-test-redis-'));
      const redisPort = await freePort();
      const redis = new Proc('redis', 'redis-server', ['--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', redisDir], {}, { waitForListening: false });
      cleanup.push(async () => { await redis.stop('SIGKILL'); rmSync(redisDir, { recursive: true, force: true }); });
      await waitForPort(redisPort);
      const redisUrl = `redis://127.0.0.1:${redisPort}`;
      const historyDir = mkdtempSync(path.join(tmpdir(), 'chat-client-test-history-'));
      const history = new Proc('history-service', HISTORY_BIN, [], {
        CHAT_LISTEN: '127.0.0.1:0', CHAT_REDIS_URL: redisUrl, CHAT_STORE: `sqlite://${historyDir}/history.db`,
        CHAT_INTERNAL_TOKEN: INTERNAL_TOKEN, CHAT_NODE_ID: 'history-1', CHAT_LOG: 'info',
      });
      cleanup.push(async () => { await history.stop('SIGKILL'); rmSync(historyDir, { recursive: true, force: true }); });
      const historyAddr = await history.started;
      gatewayEnv = {
        CHAT_REDIS_URL: redisUrl, CHAT_HISTORY_URL: `http://${historyAddr}`, CHAT_INTERNAL_TOKEN: INTERNAL_TOKEN,
        CHAT_PRESENCE_TTL_SECONDS: '3',
      };
    }
    let n = 0;
    const newGateway = async () => {
      const gw = new Gateway({ ...gatewayEnv, CHAT_NODE_ID: `${mode}-gw-${++n}` });
      cleanup.push(() => gw.remove());
      await gw.start();
      return gw;
    };
    const count = mode === 'scaled' ? 2 : 1;
    const gateways = [];
    for (let i = 0; i < count; i++) gateways.push(await newGateway());
    return { mode, urls: gateways.map((g) => g.url), gateways, newGateway, stop };
  } catch (e) {
    await stop();
    throw e;
  }
}

/** A development token for `name` (the gateways run with the built-in development key). */
export async function devToken(url, name, { admin = false } = {}) {
  const res = await fetch(`${url}/api/dev/token`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ name, admin }),
  });
  if (!res.ok) throw new Error(`dev token for ${name}: HTTP ${res.status}`);
  return (await res.json()).token;
}

/** A development-key token for user `sub` that expires `ttlS` seconds from now. */
export function shortToken(sub, name, ttlS) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64({ sub, name, exp: Math.floor(Date.now() / 1000) + ttlS });
  const sig = createHmac('sha256', DEV_KEY).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}
