// A seeded simulation: a fake server whose transports come and go at random while events
// are published. Whatever happens, the manager must deliver every event exactly once,
// in order, and end up back on WebSocket once everything works again.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { TransportManager, compareIds } from '../../static/dualcast.js';
import { FakeBody, FakeClock, jsonResponse, sseFrame } from './fakes.mjs';

function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

class FakeServer {
  constructor(clock, rand) {
    this.clock = clock;
    this.rand = rand;
    this.log = [];
    this.ws = true; // false: upgrades refused
    this.sse = true; // false: a proxy holds SSE back (no welcome ever)
    this.subs = new Set(); // live WS/SSE subscribers: {push(ev), kill()}
    this.pollers = new Set();
    const server = this;

    this.WebSocket = class {
      constructor(url) {
        this.url = url;
        this.closed = false;
        const params = new URL(url).searchParams;
        if (!server.ws || server.down) {
          setImmediate(() => this.onclose?.({ code: 1006 }));
          return;
        }
        const sub = {
          push: (ev) => {
            if (!this.closed) this.onmessage?.({ data: JSON.stringify({ type: 'event', ...ev }) });
          },
          kill: () => {
            server.subs.delete(sub);
            if (!this.closed) {
              this.closed = true;
              this.onclose?.({ code: 1006 });
            }
          },
        };
        server.clock.setTimeout(() => {
          if (this.closed) return;
          const cursor = params.get('last_event_id');
          this.onmessage?.({ data: JSON.stringify({ type: 'welcome', rooms: [], last_id: cursor }) });
          const backlog = server.after(cursor);
          if (backlog.length) {
            const frames = backlog.map((ev) => ({ type: 'event', ...ev }));
            // sometimes coalesced, sometimes one frame each
            if (server.rand() < 0.5) {
              this.onmessage?.({ data: JSON.stringify({ type: 'batch', events: frames }) });
            } else {
              for (const f of frames) this.onmessage?.({ data: JSON.stringify(f) });
            }
          }
          server.subs.add(sub);
        }, 5);
      }

      send() {}

      close() {
        this.closed = true;
      }
    };

    this.fetch = (url, init = {}) => {
      const u = new URL(url, 'http://x');
      if (server.down) return Promise.reject(new TypeError('connection refused'));
      if (u.pathname === '/api/sse') return server.sseAnswer(init);
      if (u.pathname === '/api/events') return server.pollAnswer(u.searchParams, init);
      return Promise.resolve(jsonResponse(404, {}));
    };
  }

  after(cursor) {
    return this.log.filter((e) => compareIds(e.id, cursor) > 0);
  }

  publish() {
    const n = this.log.length;
    const ev = { id: `${5000 + n}-0`, event: 'e', data: { n }, ts: 5000 + n };
    this.log.push(ev);
    for (const sub of [...this.subs]) sub.push(ev);
    for (const wake of [...this.pollers]) wake();
  }

  killAll() {
    for (const sub of [...this.subs]) sub.kill();
  }

  /** The whole server goes away (restart): every connection drops, nothing answers. */
  setDown(down) {
    this.down = down;
    if (down) {
      this.killAll();
      for (const wake of [...this.pollers]) wake(); // waiting polls end (as errors below)
    }
  }

  sseAnswer(init) {
    const body = new FakeBody(init.signal);
    const cursor = init.headers?.['Last-Event-ID'] ?? null;
    if (this.sse) {
      const sub = {
        push: (ev) => body.push(sseFrame({ id: ev.id, event: ev.event, data: ev.data })),
        kill: () => {
          this.subs.delete(sub);
          body.end();
        },
      };
      init.signal?.addEventListener('abort', () => this.subs.delete(sub));
      body.push(sseFrame({ event: 'welcome', data: { rooms: [], last_id: cursor } }));
      for (const ev of this.after(cursor)) sub.push(ev);
      this.subs.add(sub);
    }
    return Promise.resolve({ ok: true, status: 200, body, json: async () => ({}) });
  }

  pollAnswer(params, init) {
    const after = params.get('after');
    const wait = Number(params.get('timeout') ?? 0);
    const answer = () => {
      if (this.down) throw new TypeError('connection reset');
      const events = this.after(after);
      const lastId = events.length ? events[events.length - 1].id
        : (after ?? (this.log.length ? this.log[this.log.length - 1].id : '0-0'));
      return jsonResponse(200, { events, last_id: lastId, reset: false });
    };
    if (this.after(after).length || !wait) return Promise.resolve(answer());
    return new Promise((resolve, reject) => {
      const done = () => {
        this.pollers.delete(done);
        this.clock.clearTimeout(timer);
        try {
          resolve(answer());
        } catch (err) {
          reject(err);
        }
      };
      const timer = this.clock.setTimeout(done, wait * 1000);
      this.pollers.add(done);
      init.signal?.addEventListener('abort', () => {
        this.pollers.delete(done);
        this.clock.clearTimeout(timer);
        reject(new DOMException('aborted', 'AbortError'));
      });
    });
  }
}

async function simulate(seed) {
  const rand = mulberry32(seed);
  const clock = new FakeClock();
  const server = new FakeServer(clock, rand);
  const seen = [];
  const manager = new TransportManager({
    WebSocket: server.WebSocket, fetch: server.fetch, setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout, now: clock.now, random: rand, wsBase: 'ws://sim',
    cursor: '0-0', climbBaseMs: 2000, climbCapMs: 20000,
    onEvents: (list) => seen.push(...list.map((e) => e.id)),
  });
  const transports = new Set();
  manager.onStatus = (s) => transports.add(s.transport);
  manager.start();
  for (let step = 0; step < 250; step += 1) {
    const r = rand();
    if (r < 0.45) server.publish();
    else if (r < 0.73) await clock.tick(Math.floor(rand() * 4000));
    else if (r < 0.83) server.killAll();
    else if (r < 0.89) server.ws = !server.ws;
    else if (r < 0.95) server.sse = !server.sse;
    else server.setDown(!server.down);
    await clock.tick(0);
  }
  server.ws = true;
  server.sse = true;
  server.setDown(false);
  server.publish();
  for (let i = 0; i < 120 && !(manager.transport === 'websocket' && manager.state === 'live'
    && seen.length === server.log.length); i += 1) {
    await clock.tick(1000);
  }
  manager.stop();
  return { seen, log: server.log.map((e) => e.id), manager, transports };
}

describe('simulation: random outages and restarts, every event once', { timeout: 60000 }, () => {
  const visited = new Set();
  for (const seed of [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]) {
    it(`seed ${seed}`, async () => {
      const { seen, log, manager, transports } = await simulate(seed);
      for (const t of transports) visited.add(t);
      assert.deepEqual(seen, log, 'every published id, once, in order');
      assert.equal(manager.transport, 'websocket', 'back on WebSocket at the end');
      assert.ok(log.length > 50);
      assert.ok(transports.size >= 2, `only ever on ${[...transports]}`);
    });
  }
  it('the seeds between them went through all three transports', () => {
    assert.deepEqual([...visited].sort(), ['polling', 'sse', 'websocket']);
  });
});
