// The public Dualcast client over fakes: events once and in order, token functions,
// rooms, errors, and the gaps between retries of a refused transport.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import {
  AUTH_CODES, Dualcast, ERROR_CODES, REQUEST_CODES, eventTime, steadyBackoff, tokenExpiry,
} from '../../static/dualcast.js';
import {
  FakeClock, evt, jsonResponse, makeFakeFetch, makeFakeWebSocket, sseFrame, sseResponse,
} from './fakes.mjs';

function jwt(claims) {
  const part = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  return `${part({ alg: 'HS256' })}.${part(claims)}.sig`;
}

function setup({ routes = {}, clock = new FakeClock(), ...options } = {}) {
  const WS = makeFakeWebSocket();
  const fetch = makeFakeFetch(routes);
  const dc = new Dualcast('https://push.example.com/base/', {
    WebSocket: WS, fetch, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout,
    now: clock.now, random: () => 0.5, ...options,
  });
  const seen = [];
  const errors = [];
  const states = [];
  dc.on('event', (e) => seen.push(e.id));
  dc.on('error', (e) => errors.push(e));
  dc.on('state', (s) => states.push(`${s.transport}/${s.state}`));
  return { clock, WS, fetch, dc, seen, errors, states };
}

describe('Dualcast', { timeout: 10000 }, () => {
  it('connects to the URL it was given and delivers each id once, in order', async () => {
    const t = setup({ lastEventId: '1000-0', token: 'tok' });
    t.dc.start();
    await t.clock.tick(0);
    const ws = t.WS.last();
    assert.ok(ws.url.startsWith('wss://push.example.com/base/api/ws?'), ws.url);
    assert.equal(ws.params.get('token'), 'tok');
    assert.equal(ws.params.get('last_event_id'), '1000-0');
    ws.welcome('1000-0');
    assert.equal(t.dc.state, 'live');
    assert.equal(t.dc.transport, 'websocket');
    ws.serverSend({ type: 'batch', events: [evt(1), evt(2)] });
    ws.serverSend(evt(2)); // again: dropped
    ws.serverSend(evt(0)); // older than the cursor: dropped
    ws.serverSend(evt(3));
    assert.deepEqual(t.seen, ['1001-0', '1002-0', '1003-0']);
    assert.equal(t.dc.lastEventId, '1003-0');
    assert.deepEqual(t.states, ['websocket/connecting', 'websocket/live']);
    t.dc.stop();
    assert.equal(t.dc.state, 'offline');
    assert.ok(ws.closed);
  });

  it('a live WebSocket that goes silent without a close is replaced, from the cursor', async () => {
    const t = setup({ lastEventId: '1000-0' });
    t.dc.start();
    await t.clock.tick(0);
    const ws = t.WS.last();
    ws.welcome('1000-0');
    ws.serverSend(evt(1));
    // a quiet but healthy path: pings are answered, nothing is replaced
    await t.clock.tick(120_000);
    assert.ok(ws.pings >= 3, `${ws.pings} pings`);
    assert.equal(t.WS.instances.length, 1);
    assert.equal(t.dc.state, 'live');
    // the path dies without a close: nothing more arrives, not even a pong
    ws.mute = true;
    await t.clock.tick(45_000);
    assert.ok(ws.closed, 'the silent socket is closed');
    await t.clock.tick(20_000);
    const again = t.WS.last();
    assert.notEqual(again, ws);
    assert.equal(again.params.get('last_event_id'), '1001-0');
    again.welcome('1001-0');
    again.serverSend(evt(2));
    assert.deepEqual(t.seen, ['1001-0', '1002-0']);
    t.dc.stop();
  });

  it('a listener that throws loses neither the rest of the batch nor the feed', async () => {
    const t = setup({ lastEventId: '1000-0' });
    const logged = [];
    const original = console.error;
    console.error = (err) => logged.push(err);
    try {
      t.dc.on('event', (e) => {
        if (e.id === '1001-0') throw new Error('listener bug');
      });
      t.dc.start();
      await t.clock.tick(0);
      t.WS.last().welcome('1000-0');
      t.WS.last().serverSend({ type: 'batch', events: [evt(1), evt(2), evt(3)] });
    } finally {
      console.error = original;
    }
    assert.deepEqual(t.seen, ['1001-0', '1002-0', '1003-0']);
    assert.equal(logged.length, 1);
  });

  it('sends the token as Bearer on SSE and polling, never in their URL', async () => {
    const streams = [];
    const t = setup({
      transports: ['sse', 'polling'], token: 'secret-token', lastEventId: '1000-0',
      routes: {
        '/base/api/sse': (request) => {
          const [response, body] = sseResponse(request.signal);
          streams.push({ request, body });
          return response;
        },
      },
    });
    t.dc.start();
    await t.clock.tick(0);
    const { request, body } = streams[0];
    assert.equal(request.headers.Authorization, 'Bearer secret-token');
    assert.equal(request.headers['Last-Event-ID'], '1000-0');
    assert.equal(request.params.get('token'), null);
    body.push(sseFrame({ event: 'welcome', data: { rooms: [], last_id: '1000-0' } }));
    body.push(sseFrame({ id: '1001-0', event: 'x', data: { a: 1 } }));
    await t.clock.tick(0);
    assert.deepEqual(t.seen, ['1001-0']);
    t.dc.stop();
  });

  it('asks a token function first, again before exp, and hands a live WebSocket the new one',
    async () => {
      const clock = new FakeClock();
      const issued = [];
      const t = setup({
        clock,
        token: async () => {
          const tok = jwt({ sub: 'u', exp: Math.floor(clock.now() / 1000) + 600, n: issued.length });
          issued.push(tok);
          return tok;
        },
      });
      t.dc.start();
      await clock.tick(0);
      assert.equal(issued.length, 1);
      const ws = t.WS.last();
      assert.equal(ws.params.get('token'), issued[0]);
      ws.welcome('1000-0');
      await clock.tick(539_000);
      assert.equal(issued.length, 1, 'not yet: a minute before exp');
      await clock.tick(2_000);
      assert.equal(issued.length, 2);
      assert.deepEqual(ws.sent.at(-1), { type: 'auth', token: issued[1] });
      assert.equal(t.WS.instances.length, 1, 'no reconnect for a refresh on WebSocket');
      t.dc.stop();
    });

  it('an auth refusal with a token function: a fresh token and on from the cursor', async () => {
    let n = 0;
    const t = setup({ token: async () => `tok-${(n += 1)}`, lastEventId: '1000-0' });
    t.dc.start();
    await t.clock.tick(0);
    t.WS.last().welcome('1000-0');
    t.WS.last().serverSend(evt(1));
    await t.clock.tick(20_000); // well after the first fetch of a token
    t.WS.last().serverSend({ type: 'error', code: 'token_expired', message: 'expired' });
    await t.clock.tick(0);
    assert.equal(n, 2);
    const again = t.WS.last();
    assert.equal(t.WS.instances.length, 2);
    assert.equal(again.params.get('token'), 'tok-2');
    assert.equal(again.params.get('last_event_id'), '1001-0');
    assert.deepEqual(t.errors, [], 'a refresh that worked is not an error');
    t.dc.stop();
  });

  it('a refreshed token on polling: the waiting poll asks again with it, from the cursor',
    async () => {
      const clock = new FakeClock();
      const issued = [];
      const polls = []; // {request, answer(body)}: the test answers each poll by hand
      const t = setup({
        clock, transports: ['polling'], lastEventId: '1000-0',
        token: async () => {
          issued.push(jwt({ sub: 'u', exp: Math.floor(clock.now() / 1000) + 8 }));
          return issued.at(-1);
        },
        routes: {
          '/base/api/events': (request) => new Promise((resolve) => {
            polls.push({ request, answer: (body) => resolve(jsonResponse(200, body)) });
          }),
        },
      });
      const answer = (i, events) => polls[i].answer({
        events, last_id: events.at(-1)?.id ?? polls[i].request.params.get('after'), reset: false,
      });
      t.dc.start();
      await clock.tick(0);
      answer(0, [evt(1)]); // the first poll is the welcome
      await clock.tick(0);
      assert.equal(t.dc.state, 'live');
      assert.equal(polls.length, 2);
      assert.equal(polls[1].request.headers.Authorization, `Bearer ${issued[0]}`);
      await clock.tick(4000); // half the token's life: the token function is asked again
      assert.equal(issued.length, 2);
      assert.ok(polls[1].request.signal.aborted, 'the poll holding the old token is dropped');
      assert.equal(polls.length, 3);
      const again = polls[2].request;
      assert.equal(again.headers.Authorization, `Bearer ${issued[1]}`);
      assert.equal(again.params.get('after'), '1001-0', 'from the cursor');
      assert.equal(again.params.get('timeout'), '25', 'a poll, not a new welcome');
      answer(1, [evt(2)]); // the dropped poll's late answer counts for nothing
      answer(2, [evt(2), evt(3)]);
      await clock.tick(0);
      assert.deepEqual(t.seen, ['1001-0', '1002-0', '1003-0']);
      assert.equal(polls[3].request.params.get('after'), '1003-0');
      assert.deepEqual(t.states, ['polling/connecting', 'polling/live'], 'no reconnect');
      assert.deepEqual(t.errors, []);
      t.dc.stop();
    });

  it('a refreshed token while a WebSocket probe waits for welcome: probed again with it',
    async () => {
      const clock = new FakeClock();
      const issued = [];
      const t = setup({
        clock, transports: ['websocket', 'polling'], climbBaseMs: 1000, welcomeTimeoutMs: 10_000,
        token: async () => {
          issued.push(jwt({ sub: 'u', exp: Math.floor(clock.now() / 1000) + 8 }));
          return issued.at(-1);
        },
        routes: {
          '/base/api/events': (request) => (request.params.get('timeout') === '0'
            ? jsonResponse(200, { events: [], last_id: '1000-0', reset: false })
            : new Promise(() => {})),
        },
      });
      t.WS.refuse = true;
      t.dc.start();
      await clock.tick(0);
      assert.equal(t.dc.transport, 'polling');
      t.WS.refuse = false;
      await clock.tick(1000); // the climb opens a probe, with the first token
      assert.equal(t.WS.instances.length, 2);
      const stale = t.WS.last();
      assert.equal(stale.params.get('token'), issued[0]);
      await clock.tick(3000); // the refresh, while the probe has not said welcome
      assert.equal(issued.length, 2);
      assert.ok(stale.closed, 'the probe holding the old token is dropped');
      const probe = t.WS.last();
      assert.equal(probe.params.get('token'), issued[1]);
      probe.welcome('1000-0');
      assert.equal(t.dc.transport, 'websocket');
      assert.equal(t.dc.state, 'live');
      assert.deepEqual(t.errors, []);
      t.dc.stop();
    });

  it('a token function that fails: token_unavailable, nothing opened', async () => {
    const t = setup({ token: async () => { throw new Error('backend down'); } });
    t.dc.start();
    await t.clock.tick(0);
    assert.equal(t.WS.instances.length, 0);
    assert.equal(t.errors[0].code, 'token_unavailable');
    assert.match(t.errors[0].message, /backend down/);
    assert.equal(t.dc.state, 'offline');
  });

  it('a token function that never answers: token_unavailable after 10 s, not connecting for good',
    async () => {
      const t = setup({ token: () => new Promise(() => {}) });
      t.dc.start();
      await t.clock.tick(9_000);
      assert.equal(t.errors.length, 0);
      assert.equal(t.dc.state, 'connecting');
      await t.clock.tick(1_500);
      assert.equal(t.WS.instances.length, 0);
      assert.equal(t.errors[0].code, 'token_unavailable');
      assert.match(t.errors[0].message, /did not answer within 10 s/);
      assert.equal(t.dc.state, 'offline');
    });

  it('a token good for 30 days is not asked for again in a loop', async () => {
    // setTimeout fires at once for a delay past 2**31 - 1 ms (24.8 days), as browsers
    // and Node do; the fake clock is made to do the same here
    const clock = new FakeClock();
    const delays = [];
    const setT = (fn, ms = 0) => {
      delays.push(ms);
      return clock.setTimeout(fn, ms > 2 ** 31 - 1 ? 1 : ms);
    };
    let asked = 0;
    const t = setup({
      clock,
      setTimeout: setT,
      token: async () => {
        asked += 1;
        return jwt({ sub: 'u', exp: Math.floor(clock.now() / 1000) + 30 * 86400 });
      },
    });
    t.dc.start();
    await clock.tick(0);
    t.WS.last().welcome('1000-0');
    await clock.tick(1_000);
    assert.equal(asked, 1, 'asked again and again: the refresh timer fired at once');
    assert.ok(Math.max(...delays) <= 2 ** 31 - 1, `a timer of ${Math.max(...delays)} ms`);
    assert.ok(delays.includes(2 ** 31 - 1), 'the refresh waits the longest a timer can');
    t.dc.stop();
  });

  it('an auth refusal without a token function stops and says so', async () => {
    const t = setup({ token: 'old' });
    t.dc.start();
    await t.clock.tick(0);
    t.WS.last().welcome('1000-0');
    t.WS.last().serverSend({ type: 'error', code: 'token_expired', message: 'expired' });
    await t.clock.tick(60_000);
    assert.equal(t.WS.instances.length, 1, 'no retry with a token that is known bad');
    assert.equal(t.errors[0].code, 'token_expired');
    assert.equal(t.errors[0].kind, 'auth');
    assert.equal(t.dc.state, 'offline');
  });

  it('join/leave: frames on a live WebSocket, from the rooms its welcome named', async () => {
    const t = setup({});
    t.dc.start();
    await t.clock.tick(0);
    const ws = t.WS.last();
    ws.welcome('1000-0', ['user-7', 'ops']);
    t.dc.join('dev');
    t.dc.leave('ops');
    assert.deepEqual(ws.sent, [{ type: 'join', room: 'dev' }, { type: 'leave', room: 'ops' }]);
    ws.serverClose(1006); // a reconnect asks for exactly the rooms it has now
    await t.clock.tick(20_000);
    assert.equal(t.WS.last().params.get('rooms'), 'user-7,dev');
    t.dc.stop();
  });

  it('rooms a refreshed token adds to the defaults stay when another room is left', async () => {
    const t = setup({});
    t.dc.start();
    await t.clock.tick(0);
    const ws = t.WS.last();
    ws.welcome('1000-0', ['user-7']);
    ws.serverSend({ type: 'joined', room: 'ops' }); // after an `auth` with a wider token
    t.dc.leave('user-7');
    assert.deepEqual(ws.sent, [{ type: 'leave', room: 'user-7' }]);
    ws.serverClose(1006);
    await t.clock.tick(20_000);
    assert.equal(t.WS.last().params.get('rooms'), 'ops');
    t.dc.stop();
  });

  it('a join the server refuses is not asked for again on the next connect', async () => {
    const t = setup({ rooms: ['user-7'] });
    t.dc.start();
    await t.clock.tick(0);
    const ws = t.WS.last();
    ws.welcome('1000-0', ['user-7']);
    t.dc.join('ops');
    t.dc.join('admin');
    ws.serverSend({ type: 'joined', room: 'ops' });
    ws.serverSend({ type: 'error', code: 'forbidden_room', message: "may not join 'admin'" });
    assert.equal(t.errors[0].code, 'forbidden_room');
    assert.deepEqual(t.dc.rooms, ['user-7', 'ops']);
    ws.serverClose(1006);
    await t.clock.tick(20_000);
    assert.equal(t.WS.last().params.get('rooms'), 'user-7,ops');
    t.dc.stop();
  });

  it('a WebSocket welcome that grants none of the rooms asked for stops, as SSE does', async () => {
    const t = setup({ rooms: ['admin'] });
    t.dc.start();
    await t.clock.tick(0);
    const ws = t.WS.last();
    ws.serverSend({ type: 'error', code: 'forbidden_room', message: "may not join 'admin'" });
    ws.welcome('1000-0', []);
    assert.equal(t.errors.at(-1).code, 'forbidden_room');
    assert.equal(t.errors.at(-1).kind, 'fatal');
    await t.clock.tick(60_000);
    assert.equal(t.WS.instances.length, 1, 'no reconnect asking the token\'s rooms instead');
    assert.equal(t.dc.state, 'offline');
  });

  it('join on SSE reconnects with the new set, from the cursor', async () => {
    const streams = [];
    const t = setup({
      transports: ['sse'], rooms: ['a'], lastEventId: '1000-0',
      routes: {
        '/base/api/sse': (request) => {
          const [response, body] = sseResponse(request.signal);
          streams.push({ request, body });
          return response;
        },
      },
    });
    t.dc.start();
    await t.clock.tick(0);
    streams[0].body.push(sseFrame({ event: 'welcome', data: { rooms: ['a'], last_id: '1000-0' } }));
    streams[0].body.push(sseFrame({ id: '1004-0', event: 'x', data: {} }));
    await t.clock.tick(0);
    t.dc.join('b');
    await t.clock.tick(0);
    assert.equal(streams.length, 2);
    assert.equal(streams[1].request.params.get('rooms'), 'a,b');
    assert.equal(streams[1].request.headers['Last-Event-ID'], '1004-0');
    t.dc.stop();
  });

  it('a forbidden room at connect is an error that stops, not a transport fallback', async () => {
    const t = setup({
      transports: ['sse', 'polling'], rooms: ['admin'],
      routes: {
        '/base/api/sse': () => jsonResponse(403, { error: 'forbidden_room', message: 'no' }),
      },
    });
    t.dc.start();
    await t.clock.tick(0);
    assert.equal(t.errors[0].code, 'forbidden_room');
    assert.equal(t.errors[0].kind, 'fatal');
    assert.equal(t.fetch.calls.filter((c) => c.path === '/base/api/events').length, 0);
  });

  it('a refused WebSocket is probed on gaps that grow and never collapse', async () => {
    const clock = new FakeClock();
    const t = setup({ clock, random: () => 0, transports: ['websocket', 'polling'] });
    t.WS.refuse = true;
    const polls = makeFakeFetch({});
    t.dc.manager.env.fetch = (url, init) => (new URL(url).pathname.endsWith('/api/events')
      ? Promise.resolve(jsonResponse(200, { events: [], last_id: '1000-0', reset: false }))
        .then((r) => new Promise((resolve) => clock.setTimeout(() => resolve(r), 25_000)))
      : polls(url, init));
    t.dc.start();
    const times = [];
    let count = 0;
    for (let s = 0; s < 300; s += 1) {
      await clock.tick(1000);
      if (t.WS.instances.length !== count) {
        count = t.WS.instances.length;
        times.push(clock.now());
      }
    }
    const gaps = times.slice(1).map((x, i) => x - times[i]);
    assert.ok(gaps.length >= 5, `probes: ${gaps}`);
    for (let i = 1; i < gaps.length; i += 1) {
      assert.ok(gaps[i] >= gaps[i - 1] - 1000, `a gap shrank: ${gaps}`);
    }
    assert.ok(gaps.at(-1) >= 15_000, `the gap settles at half the cap or more: ${gaps}`);
    t.dc.stop();
  });

  it('steadyBackoff: half the span fixed, half random, capped', () => {
    assert.equal(steadyBackoff(0, 1000, 30000, () => 0), 500);
    assert.equal(steadyBackoff(3, 1000, 30000, () => 0), 4000);
    assert.equal(steadyBackoff(10, 1000, 30000, () => 0), 15000);
    assert.equal(steadyBackoff(10, 1000, 30000, () => 0.9999), 29998);
  });

  it('a refusal without a JSON body (a proxy\'s HTML 401) is still an error with a code', async () => {
    const t = setup({
      transports: ['polling'], token: 'tok',
      routes: {
        '/base/api/events': () => ({
          ok: false, status: 401, body: null,
          json: async () => { throw new SyntaxError('Unexpected token <'); },
        }),
      },
    });
    t.dc.start();
    await t.clock.tick(0);
    assert.equal(t.errors.length, 1);
    assert.equal(typeof t.errors[0].code, 'string');
    assert.equal(typeof t.errors[0].message, 'string');
    assert.equal(t.errors[0].kind, 'auth');
    assert.equal(t.errors[0].status, 401);
  });

  it('where there is no WebSocket (Node 20 without the flag): SSE at once, each state once',
    async () => {
      // on Node 20 it said `websocket connecting`, then `sse live` twice: a WebSocket probe
      // that could not be built, every climb, changed nothing a listener could see
      const saved = Object.getOwnPropertyDescriptor(globalThis, 'WebSocket');
      delete globalThis.WebSocket;
      try {
        const clock = new FakeClock();
        const streams = [];
        const fetch = makeFakeFetch({
          '/base/api/sse': (request) => {
            const [response, body] = sseResponse(request.signal);
            streams.push(body);
            return response;
          },
        });
        const dc = new Dualcast('https://push.example.com/base/', {
          fetch, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout,
          now: clock.now, random: () => 0.5, lastEventId: '1000-0',
          climbBaseMs: 1000, climbCapMs: 1000,
        });
        const states = [];
        const errors = [];
        dc.on('state', (s) => states.push(`${s.transport}/${s.state}/${s.probing}`));
        dc.on('error', (e) => errors.push(e));
        dc.start();
        await clock.tick(0);
        streams[0].push(sseFrame({ event: 'welcome', data: { rooms: [], last_id: '1000-0' } }));
        await clock.tick(0);
        await clock.tick(10000); // past several climbs to a better transport
        assert.deepEqual(states, ['sse/connecting/null', 'sse/live/null']);
        assert.deepEqual(errors, []);
        assert.equal(streams.length, 1);
        dc.stop();
      } finally {
        if (saved) Object.defineProperty(globalThis, 'WebSocket', saved);
      }
    });

  it('a WebSocket-only client without a WebSocket still says it cannot connect', async () => {
    const saved = Object.getOwnPropertyDescriptor(globalThis, 'WebSocket');
    delete globalThis.WebSocket;
    try {
      const clock = new FakeClock();
      const dc = new Dualcast('https://push.example.com/', {
        transports: ['websocket'], fetch: makeFakeFetch({}), setTimeout: clock.setTimeout,
        clearTimeout: clock.clearTimeout, now: clock.now, random: () => 0.5,
      });
      const errors = [];
      dc.on('error', (e) => errors.push(e));
      dc.start();
      await clock.tick(10000);
      assert.equal(dc.transport, 'websocket');
      assert.equal(errors[0]?.code, 'unreachable');
      dc.stop();
    } finally {
      if (saved) Object.defineProperty(globalThis, 'WebSocket', saved);
    }
  });

  it('a probe of a better transport that fails is said to be over', async () => {
    // the state said `probing: websocket` until something else changed: a dashboard
    // kept showing "trying WebSocket" on a quiet SSE stream
    const streams = [];
    const t = setup({
      lastEventId: '1000-0', climbBaseMs: 1000, climbCapMs: 1000,
      routes: {
        '/base/api/sse': (request) => {
          const [response, body] = sseResponse(request.signal);
          streams.push(body);
          return response;
        },
      },
    });
    const seen = [];
    t.dc.on('state', (s) => seen.push(`${s.transport}/${s.state}/${s.probing}`));
    t.WS.refuse = true;
    t.dc.start();
    await t.clock.tick(0); // the WebSocket is refused: SSE
    streams[0].push(sseFrame({ event: 'welcome', data: { rooms: [], last_id: '1000-0' } }));
    await t.clock.tick(0);
    assert.equal(t.dc.transport, 'sse');
    const probes = t.WS.instances.length;
    for (let i = 0; i < 20 && t.WS.instances.length === probes; i += 1) await t.clock.tick(250);
    assert.equal(t.WS.instances.length, probes + 1, 'a climb probed the WebSocket');
    await t.clock.tick(0); // refused again
    assert.deepEqual(seen.slice(-2), ['sse/live/websocket', 'sse/live/null']);
    t.dc.stop();
  });
});

describe('helpers of the public client', { timeout: 5000 }, () => {
  it('eventTime takes any ts and never gives a value a Date cannot hold', () => {
    assert.equal(eventTime(1732550000000, '1-0'), 1732550000000);
    assert.equal(eventTime('1732550000000', '1-0'), 1732550000000);
    assert.equal(eventTime(undefined, '1732550000000-3'), 1732550000000);
    assert.equal(eventTime(1e300, '1732550000000-0'), 1732550000000);
    assert.equal(eventTime(-5, '1-0'), -5);
    assert.equal(eventTime('soon', '1732550000000-0'), 1732550000000);
    assert.equal(eventTime({}, 'bogus'), null);
    assert.equal(eventTime(null, '99999999999999999999-0'), null);
    for (const ts of [1e300, -1e300, 'x', null, undefined, NaN, Infinity, '1e400', [], {}]) {
      const t = eventTime(ts, '1732550000000-0');
      assert.ok(t === null || !Number.isNaN(new Date(t).getTime()), String(ts));
    }
  });

  it('tokenExpiry reads exp without checking the signature; junk is null', () => {
    assert.equal(tokenExpiry(jwt({ exp: 1234 })), 1234);
    assert.equal(tokenExpiry('not-a-jwt'), null);
    assert.equal(tokenExpiry(`a.${Buffer.from('{').toString('base64url')}.c`), null);
    assert.equal(tokenExpiry(null), null);
  });

  it('one list of error codes; the auth and request codes are in it', () => {
    assert.equal(new Set(ERROR_CODES).size, ERROR_CODES.length);
    for (const code of [...AUTH_CODES].filter((c) => !['unauthorized', 'anonymous_not_allowed'].includes(c))) {
      assert.ok(ERROR_CODES.includes(code), code);
    }
    for (const code of REQUEST_CODES) assert.ok(ERROR_CODES.includes(code), code);
  });

  it('an unknown transport name is a TypeError, not silently dropped', () => {
    const make = (transports) => new Dualcast('https://push.example.com', { transports });
    assert.throws(() => make(['websocket', 'long-polling']), /unknown transport "long-polling"/);
    assert.throws(() => make(['websockets']), TypeError);
    assert.throws(() => make('sse'), /must be a list/);
    assert.deepEqual(make([]).manager.order, ['websocket', 'sse', 'polling']);
    assert.deepEqual(make(['polling', 'sse', 'polling']).manager.order, ['polling', 'sse']);
    assert.equal(make(['sse']).transport, 'sse');
  });

  it('rooms that are a string or hold a name that is no room name are a TypeError', () => {
    // `rooms: 'ops'` asked for o, p and s; `rooms: ['']` went out as `rooms=`, which joins
    // every room the token allows
    const make = (rooms) => new Dualcast('https://push.example.com', { rooms });
    assert.throws(() => make('ops'), /rooms must be a list of room names/);
    assert.throws(() => make(['']), /rooms: "" is no room name/);
    assert.throws(() => make(['ops', ' ']), TypeError);
    assert.throws(() => make(['a,b']), TypeError);
    assert.throws(() => make([7]), TypeError);
    assert.throws(() => make(['ops']).setRooms('dev'), TypeError);
    assert.deepEqual(make(['ops', 'dev', 'ops']).rooms, ['ops', 'dev']);
    assert.deepEqual(make(undefined).rooms, []);
    assert.deepEqual(make([]).rooms, []);
  });

  it('a lastEventId that is not a stream id is a TypeError, not an unreachable server', () => {
    const make = (lastEventId) => new Dualcast('https://push.example.com', { lastEventId });
    assert.throws(() => make('abc'), /lastEventId "abc" is not a stream id/);
    assert.throws(() => make('1732550000000-x'), TypeError);
    assert.throws(() => make(' 1-0'), TypeError);
    assert.equal(make('1732550000000-3').lastEventId, '1732550000000-3');
    assert.equal(make('1732550000000').lastEventId, '1732550000000');
    assert.equal(make(0).lastEventId, '0');
    assert.equal(make('0-0').lastEventId, '0-0');
    assert.equal(make(null).lastEventId, null);
    assert.equal(make('').lastEventId, null);
    assert.equal(make(undefined).lastEventId, null);
  });

  it('a ws:// or wss:// server URL keeps its security; any other scheme is a TypeError', async () => {
    const clock = new FakeClock();
    for (const [url, ws, http] of [
      ['wss://push.example.com/base/', 'wss://push.example.com/base/api/ws', 'https://push.example.com/base'],
      ['ws://127.0.0.1:8000', 'ws://127.0.0.1:8000/api/ws', 'http://127.0.0.1:8000'],
    ]) {
      const WS = makeFakeWebSocket();
      const dc = new Dualcast(url, {
        WebSocket: WS, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout,
        now: clock.now,
      });
      dc.start();
      await clock.tick(0);
      assert.ok(WS.last().url.startsWith(`${ws}?`) || WS.last().url === ws, WS.last().url);
      assert.equal(dc.manager.env.httpBase, http);
      dc.stop();
    }
    assert.throws(() => new Dualcast('push.example.com:8000'), /must be http/);
    assert.throws(() => new Dualcast('ftp://push.example.com'), TypeError);
  });

  it('outside a page a URL is required', () => {
    assert.throws(() => new Dualcast(''), /URL is required/);
  });
});

describe('the types file', () => {
  it('names the default of every numeric option', async () => {
    // the d.ts listed welcomeTimeoutMs, retryBaseMs, ... maxDeaths with no word of what
    // they tune or their defaults: a reader had to find them in the source
    const { readFile } = await import('node:fs/promises');
    const source = await readFile(new URL('../../static/dualcast.js', import.meta.url), 'utf8');
    const types = await readFile(new URL('../../static/dualcast.d.ts', import.meta.url), 'utf8');
    const documented = new Map();
    for (const m of types.matchAll(/\/\*\*((?:(?!\*\/)[\s\S])*)\*\/\s*(\w+)\?: number;/g)) {
      documented.set(m[2], m[1]);
    }
    const defaults = [...source.matchAll(/this\.(\w+) = opts\.\1 \?\? (\d+);/g)];
    assert.ok(defaults.length >= 10, 'the defaults were not found in dualcast.js');
    for (const [, name, value] of defaults) {
      const doc = documented.get(name);
      assert.ok(doc, `${name} has no doc comment in dualcast.d.ts`);
      assert.match(doc, new RegExp(`default ${value}\\b`), `${name}: default ${value}`);
    }
  });
});
