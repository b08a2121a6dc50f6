// dualcast.js in Node against a REAL dualcast server process: each transport delivers
// every published id once and in order, falls back when the server refuses WebSocket,
// resumes from a cursor, refreshes a token function before expiry, joins rooms.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';

import { Dualcast } from '../../static/dualcast.js';
import { ROOT, Server, missing, token, waitFor } from './support/server.mjs';

const why = missing();
if (why && process.env.CI === 'true') throw new Error(`CI=true but ${why}`);
const skip = why ? `SKIPPED LOUDLY: ${why}` : false;

/** A started client and what it saw. */
function watch(url, options) {
  const seen = [];
  const errors = [];
  const states = [];
  const dc = new Dualcast(url, { welcomeTimeoutMs: 3000, ...options });
  dc.on('event', (e) => seen.push(e));
  dc.on('error', (e) => errors.push(e));
  dc.on('state', (s) => states.push(`${s.transport}/${s.state}`));
  dc.start();
  return { dc, seen, errors, states };
}

async function live(dc, transport) {
  await waitFor(() => dc.state === 'live' && dc.transport === transport,
    { timeoutMs: 15000, what: `live on ${transport} (now ${dc.transport}/${dc.state})` });
}

/** docs/examples/tail.mjs run with `args`: its process, what it wrote so far, its exit. */
function runTail(flags, ...args) {
  const child = spawn(process.execPath, [...flags, join(ROOT, 'docs/examples/tail.mjs'), ...args],
    { stdio: ['ignore', 'pipe', 'pipe'] });
  const tail = { process: child, out: '', err: '' };
  child.stdout.on('data', (chunk) => { tail.out += chunk; });
  child.stderr.on('data', (chunk) => { tail.err += chunk; });
  tail.exited = new Promise((resolve) => child.once('exit', (code) => resolve(code)));
  return tail;
}

async function publishMany(server, n, tag) {
  const ids = [];
  for (let i = 0; i < n; i += 1) ids.push(await server.publish('usage_log_added', { tag, i }));
  return ids;
}

async function received(seen, ids) {
  await waitFor(() => ids.every((id) => seen.some((e) => e.id === id)),
    { timeoutMs: 15000, what: `ids ${ids.join(', ')}` });
  const got = seen.map((e) => e.id);
  assert.equal(new Set(got).size, got.length, `an id came twice: ${got}`);
  assert.deepEqual(got.filter((id) => ids.includes(id)), ids, 'in stream order');
}

describe('dualcast.js against a real server', { skip, timeout: 120000 }, () => {
  let server;
  before(async () => {
    server = await new Server().start();
  });
  after(async () => {
    await server?.stop();
  });

  for (const transport of ['websocket', 'sse', 'polling']) {
    it(`delivers each published id once, in order, on ${transport}`, { timeout: 30000 }, async () => {
      const c = watch(server.url, { token: token({ admin: true }), transports: [transport] });
      try {
        await live(c.dc, transport);
        const ids = await publishMany(server, 8, transport);
        await received(c.seen, ids);
        const ev = c.seen.find((e) => e.id === ids[0]);
        assert.equal(ev.event, 'usage_log_added');
        assert.deepEqual(ev.data, { tag: transport, i: 0 });
        assert.equal(typeof ev.ts, 'number');
        assert.equal(c.dc.lastEventId, ids[ids.length - 1]);
        assert.deepEqual(c.errors, []);
      } finally {
        c.dc.stop();
      }
    });
  }

  it('resumes from lastEventId: what was missed, nothing before it', { timeout: 30000 }, async () => {
    const first = watch(server.url, { token: token({ admin: true }) });
    await live(first.dc, 'websocket');
    const before = await publishMany(server, 2, 'before');
    await received(first.seen, before);
    const cursor = first.dc.lastEventId;
    first.dc.stop();
    const missed = await publishMany(server, 3, 'missed');
    for (const transport of ['websocket', 'sse', 'polling']) {
      const c = watch(server.url, { token: token({ admin: true }), lastEventId: cursor,
        transports: [transport] });
      try {
        await received(c.seen, missed);
        assert.ok(c.seen.every((e) => !before.includes(e.id)), `${transport} replayed too much`);
      } finally {
        c.dc.stop();
      }
    }
  });

  it('asks a token function again before the token expires, and keeps delivering',
    { timeout: 60000 }, async () => {
      for (const transport of ['websocket', 'sse', 'polling']) {
        let calls = 0;
        const c = watch(server.url, {
          token: async () => {
            calls += 1;
            return token({ admin: true, ttl: 4 });
          },
          transports: [transport],
        });
        try {
          await live(c.dc, transport);
          // past the first token's exp: delivery goes on with the refreshed ones
          await waitFor(() => calls >= 3, { timeoutMs: 15000, what: `3 token calls on ${transport}` });
          const ids = await publishMany(server, 3, `refresh-${transport}`);
          await received(c.seen, ids);
          assert.deepEqual(c.errors, [], `${transport}: ${JSON.stringify(c.errors)}`);
        } finally {
          c.dc.stop();
        }
      }
    });

  it('joins and leaves rooms the token allows; a forbidden one is an error', { timeout: 30000 },
    async () => {
      const c = watch(server.url, { token: token({ sub: 'u1', rooms: ['ops', 'dev'] }),
        rooms: ['user-u1'] });
      try {
        await live(c.dc, 'websocket');
        c.dc.join('ops');
        await waitFor(async () => {
          const probe = await server.publish('probe', { room: 'ops' }, ['ops']);
          await new Promise((resolve) => setTimeout(resolve, 100));
          return c.seen.some((e) => e.id === probe);
        }, { what: 'an ops event after join' });
        c.dc.leave('ops');
        c.dc.join('admin');
        await waitFor(() => c.errors.some((e) => e.code === 'forbidden_room'),
          { what: 'forbidden_room error' });
        assert.deepEqual(c.dc.rooms, ['user-u1'], 'the refused room is not asked for again');
        // after leave, ops events stop; the user room still arrives (in order, so the
        // user event's arrival proves the earlier ops one was not sent)
        await waitFor(async () => {
          const ops = await server.publish('probe', { after: 'leave' }, ['ops']);
          const mine = await server.publish('probe', { mine: true }, ['user-u1']);
          await waitFor(() => c.seen.some((e) => e.id === mine), { what: 'user room event' });
          return !c.seen.some((e) => e.id === ops);
        }, { what: 'ops events stop after leave' });
      } finally {
        c.dc.stop();
      }
    });

  it('docs/examples/tail.mjs prints each event once as a JSON line; Ctrl-C exits 0',
    { timeout: 30000 }, async () => {
      const flags = process.execArgv.filter((a) => a.startsWith('--experimental-websocket'));
      // every --rooms counts (the last one alone did): both rooms' events come
      const tail = runTail(flags, server.url, '--token', token({ sub: 'u2', rooms: ['ops', 'dev'] }),
        '--rooms', 'ops', '--rooms', 'dev');
      try {
        await waitFor(() => tail.err.includes('websocket live'), { what: `tail live (${tail.err})` });
        const ids = await publishMany(server, 4, 'tail');
        ids.push(await server.publish('tail', { room: 'ops' }, ['ops']));
        ids.push(await server.publish('tail', { room: 'dev' }, ['dev']));
        await waitFor(() => ids.every((id) => tail.out.includes(id)), { what: 'ids on stdout' });
        const lines = tail.out.trim().split('\n').map((line) => JSON.parse(line));
        assert.deepEqual(lines.map((e) => e.id).filter((id) => ids.includes(id)), ids);
        assert.deepEqual(lines.find((e) => e.id === ids[0]).data, { tag: 'tail', i: 0 });
      } finally {
        tail.process.kill('SIGINT');
      }
      assert.equal(await tail.exited, 0);
      assert.match(tail.err, /resume with --from \d+-\d+/);
    });

  it('docs/examples/tail.mjs without a WebSocket in Node: says so once, then SSE, each state once',
    { timeout: 30000 }, async () => {
      // Node 20 without --experimental-websocket printed `websocket connecting`, went to
      // SSE without a word of why, and printed `sse live` twice
      const major = Number(process.versions.node.split('.')[0]);
      const flags = major >= 22 ? ['--no-experimental-websocket'] : [];
      const tail = runTail(flags, server.url, '--token', token({ sub: 'u3' }));
      try {
        await waitFor(() => tail.err.includes('sse live'), { what: `tail live on SSE (${tail.err})` });
        const [id] = await publishMany(server, 1, 'tail-sse');
        await waitFor(() => tail.out.includes(id), { what: 'the id on stdout' });
      } finally {
        tail.process.kill('SIGINT');
      }
      assert.equal(await tail.exited, 0);
      const lines = tail.err.trim().split('\n');
      assert.match(lines[0],
        /^websocket: not available in Node v[\d.]+: run node with --experimental-websocket/);
      assert.deepEqual(lines.slice(1, 3), ['sse connecting', 'sse live']);
      assert.equal(lines.filter((line) => line.includes('not available')).length, 1);
      assert.match(lines[lines.length - 1], /resume with --from \d+-\d+/);
    });

  it('an origin the server does not list is refused on every transport', { timeout: 20000 },
    async () => {
      for (const path of ['/api/sse', '/api/events', '/api/me', '/api/overview']) {
        const response = await fetch(`${server.url}${path}`, {
          headers: { Origin: 'https://not-listed.example', Authorization: `Bearer ${token()}` },
        });
        assert.equal(response.status, 403, path);
        assert.equal((await response.json()).error, 'bad_origin', path);
      }
    });
});

describe('fallback against a real server that refuses WebSocket', { skip, timeout: 60000 }, () => {
  let server;
  before(async () => {
    server = await new Server({ DUALCAST_TRANSPORTS: 'sse,polling' }).start();
  });
  after(async () => {
    await server?.stop();
  });

  it('lands on SSE and delivers each id once', { timeout: 30000 }, async () => {
    const c = watch(server.url, { token: token({ admin: true }) });
    try {
      await live(c.dc, 'sse');
      const ids = await publishMany(server, 5, 'fallback');
      await received(c.seen, ids);
      assert.ok(c.states.includes('websocket/connecting'), 'WebSocket was tried first');
    } finally {
      c.dc.stop();
    }
  });
});

describe('polling a server whose DUALCAST_POLL_TIMEOUT_MAX is below 25', { skip, timeout: 60000 },
  () => {
    let server;
    before(async () => {
      server = await new Server({ DUALCAST_POLL_TIMEOUT_MAX: '10' }).start();
    });
    after(async () => {
      await server?.stop();
    });

    it('keeps polling with a shorter wait and delivers each id once', { timeout: 30000 },
      async () => {
        const c = watch(server.url, { token: token({ admin: true }), transports: ['polling'] });
        try {
          await live(c.dc, 'polling');
          const ids = await publishMany(server, 3, 'short-max');
          await received(c.seen, ids);
          assert.deepEqual(c.errors, []);
          assert.equal(c.dc.state, 'live');
        } finally {
          c.dc.stop();
        }
      });
  });
