// A real dualcast server for node tests: `python -m dualcast serve` on a free loopback
// port (memory engine), HS256 tokens minted here, publishing through POST /api/publish.
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
export const SECRET = `node-test-secret-${'y'.repeat(32)}`;
const PYTHON = process.env.DUALCAST_PYTHON ?? join(ROOT, '.venv', 'bin', 'python');

/** Why these tests cannot run here, or null. Under CI=true the caller fails instead. */
export function missing() {
  if (typeof globalThis.WebSocket !== 'function') {
    return 'no global WebSocket: Node 22+, or Node 20/21 with --experimental-websocket';
  }
  if (!existsSync(PYTHON)) return `no Python venv at ${PYTHON} (bash scripts/test makes it)`;
  return null;
}

function b64url(value) {
  return Buffer.from(typeof value === 'string' ? value : JSON.stringify(value))
    .toString('base64url');
}

/** An HS256 token as `dualcast token` makes it. */
export function token({ sub = 'node', rooms = [], admin = false, publish = false, ttl = 3600 } = {}) {
  const head = b64url({ alg: 'HS256', typ: 'JWT' });
  const body = b64url({
    sub, rooms, admin, publish, exp: Math.floor(Date.now() / 1000) + ttl,
  });
  const sig = createHmac('sha256', SECRET).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Poll `check` until it returns something truthy, or throw after `timeoutMs`. */
export async function waitFor(check, { timeoutMs = 10000, what = 'condition' } = {}) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

export class Server {
  constructor(env = {}) {
    this.env = env;
    this.output = '';
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  async start() {
    this.port = await freePort();
    const env = Object.fromEntries(Object.entries(process.env)
      .filter(([k]) => !k.startsWith('DUALCAST_') && k !== 'REDIS_URL'));
    Object.assign(env, {
      DUALCAST_SECRET: SECRET, XDG_STATE_HOME: mkdtempSync(join(tmpdir(), 'dualcast-node-')),
      PYTHONUNBUFFERED: '1', ...this.env,
    });
    this.proc = spawn(PYTHON, ['-m', 'dualcast', 'serve', '--host', '127.0.0.1',
      '--port', String(this.port)], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
    const keep = (chunk) => { this.output = (this.output + chunk).slice(-20000); };
    this.proc.stdout.on('data', keep);
    this.proc.stderr.on('data', keep);
    this.exited = new Promise((resolve) => this.proc.once('exit', resolve));
    await waitFor(async () => {
      if (this.proc.exitCode !== null) throw new Error(`dualcast exited: ${this.output}`);
      try {
        return (await fetch(`${this.url}/healthz`)).ok;
      } catch {
        return false;
      }
    }, { timeoutMs: 20000, what: `dualcast on ${this.port}` });
    return this;
  }

  async stop() {
    if (!this.proc || this.proc.exitCode !== null) return;
    this.proc.kill('SIGTERM');
    const timer = setTimeout(() => this.proc.kill('SIGKILL'), 10000);
    await this.exited;
    clearTimeout(timer);
  }

  /** POST /api/publish with a producer token; returns the stream id. */
  async publish(event, data, rooms = []) {
    const response = await fetch(`${this.url}/api/publish`, {
      method: 'POST',
      headers: {
        'Content-Type': 'application/json',
        Authorization: `Bearer ${token({ sub: 'producer', publish: true })}`,
      },
      body: JSON.stringify({ event, data, rooms }),
    });
    if (response.status !== 202) throw new Error(`publish: ${response.status} ${await response.text()}`);
    return (await response.json()).id;
  }
}
