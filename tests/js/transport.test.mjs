// Unit tests of the transport manager with fake WebSocket, fetch and clock.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import {
  SSEParser, TransportManager, backoff, compareIds,
} from '../../static/dualcast.js';
import {
  FakeClock, evt, jsonResponse, makeFakeFetch, makeFakeWebSocket, sseFrame, sseResponse,
} from './fakes.mjs';

/** A manager wired to fakes, recording what it reports. */
function setup({ routes = {}, cursor = '1000-0', clock = new FakeClock(), ...opts } = {}) {
  const WS = makeFakeWebSocket();
  const fetch = makeFakeFetch(routes);
  const seen = [];
  const statuses = [];
  const resets = [];
  const errors = [];
  const manager = new TransportManager({
    WebSocket: WS, fetch, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout,
    now: clock.now, random: () => 0.5, wsBase: 'ws://test', cursor,
    onEvents: (list) => seen.push(...list.map((e) => e.id)),
    onStatus: (s) => statuses.push(`${s.transport}/${s.state}`),
    onReset: (id) => resets.push(id),
    onError: (e) => errors.push(e),
    ...opts,
  });
  return { clock, WS, fetch, manager, seen, statuses, resets, errors };
}

/** An /api/sse route whose streams the test controls: streams[i] = {request, body}. */
/** The server is back: WebSockets open again; until the next retry round opens one. */
async function nextWebSocketOnceBack(t) {
  t.WS.refuse = false;
  const before = t.WS.instances.length;
  for (let i = 0; i < 60 && t.WS.instances.length === before; i += 1) await t.clock.tick(500);
}

function sseRoute() {
  const streams = [];
  const handler = (request) => {
    const [response, body] = sseResponse(request.signal);
    streams.push({ request, body });
    return response;
  };
  return { streams, handler };
}

/**
 * An /api/events route answering from a list of published events after `after`; with
 * nothing to send it holds the answer for `timeout` seconds of the fake clock.
 */
function pollRoute(clock, published, { reset = false, max = 30 } = {}) {
  const handler = (request) => {
    const after = request.params.get('after');
    if (Number(request.params.get('timeout') ?? 0) > max) {
      return jsonResponse(400, {
        error: 'bad_timeout', message: `timeout must be seconds between 0 and ${max}`,
      });
    }
    if (reset && after !== '5000-0') {
      return jsonResponse(200, { events: [], last_id: '5000-0', reset: true });
    }
    const events = published.filter((e) => compareIds(e.id, after) > 0)
      .map(({ id, event, data, ts }) => ({ id, event, data, ts }));
    const lastId = events.length ? events[events.length - 1].id : after;
    const answer = jsonResponse(200, { events, last_id: lastId, reset: false });
    const wait = Number(request.params.get('timeout') ?? 0);
    if (events.length || !wait) return answer;
    return new Promise((resolve) => clock.setTimeout(() => resolve(answer), wait * 1000));
  };
  return handler;
}

describe('helpers', { timeout: 5000 }, () => {
  it('orders stream ids numerically, not as strings', () => {
    assert.equal(compareIds('999-0', '1000-0'), -1);
    assert.equal(compareIds('1000-10', '1000-9'), 1);
    assert.equal(compareIds('1000-1', '1000-1'), 0);
    assert.equal(compareIds(null, '0-0'), -1);
    assert.equal(compareIds('18446744073709551615-0', '18446744073709551614-99'), 1);
  });

  it('full-jitter backoff stays below the capped exponential', () => {
    assert.equal(backoff(0, 100, 1000, () => 0.999), 99);
    assert.equal(backoff(3, 100, 1000, () => 0.5), 400);
    assert.equal(backoff(10, 100, 1000, () => 0.999), 999);
    assert.equal(backoff(5, 100, 1000, () => 0), 0);
  });

  it('parses SSE across chunk boundaries, CRLF, comments and multi-line data', () => {
    const p = new SSEParser();
    const out = [
      ...p.push('retry: 3000\r\nevent: welcome\r\ndata: {"last_id":"1-0"}\r'),
      ...p.push('\n\r\n: ping\n\nid: 2-0\nevent: x\nda'),
      ...p.push('ta: a\ndata:b\n\n'),
    ];
    assert.deepEqual(out, [
      { id: null, event: 'welcome', data: '{"last_id":"1-0"}' },
      { id: '2-0', event: 'x', data: 'a\nb' },
    ]);
  });
});

describe('websocket', { timeout: 5000 }, () => {
  it('is live only after welcome, sends the cursor and rooms, unpacks batches', async () => {
    const t = setup({ rooms: ['admin', 'user-7'] });
    t.manager.start();
    const ws = t.WS.last();
    assert.equal(ws.params.get('last_event_id'), '1000-0');
    assert.equal(ws.params.get('rooms'), 'admin,user-7');
    assert.equal(t.manager.state, 'connecting');
    ws.welcome('1000-0');
    assert.equal(t.manager.state, 'live');
    assert.equal(t.manager.transport, 'websocket');
    ws.serverSend(evt(1));
    ws.serverSend({ type: 'batch', events: [evt(2), evt(3)] });
    ws.serverSend(evt(2)); // a duplicate: dropped
    assert.deepEqual(t.seen, ['1001-0', '1002-0', '1003-0']);
    assert.equal(t.manager.cursor, '1003-0');
  });

  it('falls back to SSE when no welcome arrives within the timeout', async () => {
    const sse = sseRoute();
    const t = setup({ routes: { '/api/sse': sse.handler } });
    t.manager.start();
    await t.clock.tick(2999);
    assert.equal(sse.streams.length, 0);
    await t.clock.tick(2);
    assert.ok(t.WS.last().closed, 'the silent WebSocket is closed');
    assert.equal(sse.streams.length, 1);
    assert.equal(sse.streams[0].request.headers['Last-Event-ID'], '1000-0');
    sse.streams[0].body.push(sseFrame({ event: 'welcome', data: { rooms: [], last_id: '1000-0' } }));
    sse.streams[0].body.push(sseFrame({ id: '1001-0', event: 'usage_log_added', data: { n: 1 } }));
    await t.clock.tick(0);
    assert.equal(t.manager.transport, 'sse');
    assert.equal(t.manager.state, 'live');
    assert.deepEqual(t.seen, ['1001-0']);
  });

  it('asks SSE for whole events, so ts is the producer\'s as on the other transports', async () => {
    // named SSE events carry no ts: the client took the id's time, so the same event had
    // another ts on SSE than on WebSocket or polling (a producer's `timestamp` was lost)
    const sse = sseRoute();
    const got = [];
    const t = setup({
      routes: { '/api/sse': sse.handler }, transports: ['sse'],
      onEvents: (list) => got.push(...list.map(({ id, event, data, ts }) => ({ id, event, data, ts }))),
    });
    t.manager.start();
    await t.clock.tick(0);
    const { request, body } = sse.streams[0];
    assert.equal(request.params.get('events'), 'message');
    body.push(sseFrame({ event: 'welcome', data: { rooms: [], last_id: '1000-0' } }));
    body.push(sseFrame({ id: '1001-0', data: { id: '1001-0', event: 'deploy', data: { v: 2 }, ts: 5 } }));
    // a server that ignores events=message names its events: read as before
    body.push(sseFrame({ id: '1002-0', event: 'deploy', data: { v: 3 } }));
    // a producer's own event called "message" whose data is not a whole event
    body.push(sseFrame({ id: '1003-0', event: 'message', data: { id: '1003-0', v: 4 } }));
    await t.clock.tick(0);
    assert.deepEqual(got, [
      { id: '1001-0', event: 'deploy', data: { v: 2 }, ts: 5 },
      { id: '1002-0', event: 'deploy', data: { v: 3 }, ts: 1002 },
      { id: '1003-0', event: 'message', data: { id: '1003-0', v: 4 }, ts: 1003 },
    ]);
  });

  it('reconnects a WebSocket that dies once, and falls back after repeated deaths', async () => {
    const sse = sseRoute();
    const t = setup({ routes: { '/api/sse': sse.handler } });
    t.manager.start();
    t.WS.last().welcome();
    t.WS.last().serverSend(evt(1));
    t.WS.last().serverClose(1006);
    assert.equal(t.manager.state, 'connecting');
    await t.clock.tick(1000);
    assert.equal(t.WS.instances.length, 2);
    assert.equal(t.WS.last().params.get('last_event_id'), '1001-0', 'resumes from the cursor');
    t.WS.last().welcome();
    t.WS.last().serverClose(1006);
    await t.clock.tick(2000);
    t.WS.last().welcome();
    t.WS.last().serverClose(1006);
    await t.clock.tick(0);
    assert.equal(sse.streams.length, 1, 'third death within a minute: SSE');
    assert.equal(t.manager.transport, 'sse');
  });
});

describe('fallback chain and climbing back', { timeout: 5000 }, () => {
  it('WS refused, SSE held back by a proxy: lands on polling with the same cursor', async () => {
    const published = [evt(1), evt(2), evt(3)];
    const sse = sseRoute();
    const clock = new FakeClock();
    const t = setup({ clock, routes: { '/api/sse': sse.handler, '/api/events': pollRoute(clock, published) } });
    t.WS.refuse = true;
    t.manager.start();
    await t.clock.tick(0);
    assert.equal(sse.streams.length, 1, 'refused upgrade: straight to SSE');
    // the proxy holds the body: no welcome ever
    await t.clock.tick(3001);
    assert.equal(t.manager.transport, 'polling');
    await t.clock.tick(0);
    const polls = t.fetch.calls.filter((c) => c.path === '/api/events');
    assert.equal(polls[0].params.get('after'), '1000-0');
    assert.equal(polls[0].params.get('timeout'), '0', 'first poll answers at once');
    assert.equal(t.manager.state, 'live');
    assert.deepEqual(t.seen, ['1001-0', '1002-0', '1003-0']);
    assert.equal(polls[1].params.get('after'), '1003-0');
    assert.equal(polls[1].params.get('timeout'), '25');
    t.manager.stop();
  });

  it('climbs back from SSE to WebSocket without losing or repeating an event', async () => {
    const sse = sseRoute();
    const t = setup({ routes: { '/api/sse': sse.handler }, climbBaseMs: 1000 });
    t.WS.refuse = true;
    t.manager.start();
    await t.clock.tick(0);
    const stream = sse.streams[0].body;
    stream.push(sseFrame({ event: 'welcome', data: { rooms: [], last_id: '1000-0' } }));
    stream.push(sseFrame({ id: '1001-0', event: 'e', data: 1 }));
    await t.clock.tick(0);
    assert.equal(t.manager.transport, 'sse');
    // the block is lifted; the next climb probe (jittered, <= 1 s) opens a WebSocket
    t.WS.refuse = false;
    const before = t.WS.instances.length;
    await t.clock.tick(1000);
    assert.equal(t.WS.instances.length, before + 1);
    const probe = t.WS.last();
    assert.equal(probe.params.get('last_event_id'), '1001-0');
    // SSE keeps feeding while the probe has not said welcome
    stream.push(sseFrame({ id: '1002-0', event: 'e', data: 2 }));
    await t.clock.tick(0);
    assert.equal(t.manager.transport, 'sse');
    probe.welcome('1001-0');
    assert.equal(t.manager.transport, 'websocket');
    assert.equal(t.manager.state, 'live');
    assert.ok(sse.streams[0].request.signal.aborted, 'SSE dropped after the switch');
    // the WS replays from its own start cursor: 1002 again (dropped), then 1003
    probe.serverSend({ type: 'batch', events: [evt(2), evt(3)] });
    // a late SSE chunk from the old stream is ignored
    stream.push(sseFrame({ id: '1004-0', event: 'e', data: 4 }));
    await t.clock.tick(0);
    assert.deepEqual(t.seen, ['1001-0', '1002-0', '1003-0']);
  });

  it('a probe that wins while the old transport waits to reconnect cancels that reconnect',
    async () => {
      const sse = sseRoute();
      const t = setup({ routes: { '/api/sse': sse.handler }, climbBaseMs: 1000 });
      t.WS.refuse = true;
      t.manager.start();
      await t.clock.tick(0);
      sse.streams[0].body.push(sseFrame({ event: 'welcome', data: { rooms: [], last_id: null } }));
      await t.clock.tick(0);
      t.WS.refuse = false;
      t.manager.retryBaseMs = 5000; // the SSE reconnect will wait a while
      await t.clock.tick(1000); // the climb probe opens
      const probe = t.WS.last();
      sse.streams[0].body.end(); // SSE dies: a reconnect is scheduled
      await t.clock.tick(0);
      probe.welcome();
      assert.equal(t.manager.transport, 'websocket');
      await t.clock.tick(30000);
      assert.equal(sse.streams.length, 1, 'no SSE reconnect after the switch');
      assert.equal(t.WS.open().length, 1);
    });

  it('climbs from polling to SSE when WS stays refused, backing off between probes', async () => {
    const sse = sseRoute();
    const clock = new FakeClock();
    const t = setup({
      clock,
      routes: { '/api/sse': sse.handler, '/api/events': pollRoute(clock, []) },
      climbBaseMs: 1000, climbCapMs: 8000,
    });
    t.WS.refuse = true;
    t.manager.start();
    await t.clock.tick(3100); // SSE held: polling
    assert.equal(t.manager.transport, 'polling');
    const probes = () => sse.streams.length;
    const start = probes();
    // first round: WS refused, then an SSE probe that also stays silent
    await t.clock.tick(600);
    await t.clock.tick(3100);
    assert.equal(probes(), start + 1);
    assert.equal(t.manager.transport, 'polling');
    // second round: SSE now answers with welcome: promoted to SSE
    for (let i = 0; i < 40 && probes() === start + 1; i += 1) await t.clock.tick(500);
    assert.equal(probes(), start + 2);
    sse.streams[sse.streams.length - 1].body.push(
      sseFrame({ event: 'welcome', data: { rooms: [], last_id: '1000-0' } }));
    await t.clock.tick(0);
    assert.equal(t.manager.transport, 'sse');
    t.manager.stop();
  });
});

describe('a server whose poll limit is below ours', { timeout: 5000 }, () => {
  it('bad_timeout: the wait is halved until the server takes it, and polling goes on',
    async () => {
      const published = [];
      const clock = new FakeClock();
      const t = setup({
        clock, transports: ['polling'],
        routes: { '/api/events': pollRoute(clock, published, { max: 10 }) },
      });
      t.manager.start();
      await t.clock.tick(0);
      const asked = () => t.fetch.calls.filter((c) => c.path.endsWith('/api/events'))
        .map((c) => c.params.get('timeout'));
      assert.deepEqual(asked(), ['0', '25', '12', '6'], 'halved until it fits');
      assert.equal(t.manager.state, 'live');
      published.push(evt(1));
      await t.clock.tick(6000);
      published.push(evt(2));
      await t.clock.tick(6000);
      assert.deepEqual(t.seen, ['1001-0', '1002-0']);
      assert.ok(asked().slice(3).every((s) => s === '6'), `then 6 s each time: ${asked()}`);
      assert.equal(t.manager.state, 'live');
      assert.deepEqual(t.errors, []);
      t.manager.stop();
    });

  it('a server that answers every poll at once: at most one poll a second', async () => {
    const published = [];
    const clock = new FakeClock();
    const instant = (request) => {
      const after = request.params.get('after');
      const events = published.filter((e) => compareIds(e.id, after) > 0);
      return jsonResponse(200, { events, last_id: events.at(-1)?.id ?? after, reset: false });
    };
    const t = setup({ clock, transports: ['polling'], routes: { '/api/events': instant } });
    t.manager.start();
    for (let i = 0; i < 50; i += 1) await t.clock.tick(100); // 5 s
    const polls = t.fetch.calls.filter((c) => c.path.endsWith('/api/events')).length;
    assert.ok(polls <= 7, `${polls} polls in 5 s`);
    published.push(evt(1));
    for (let i = 0; i < 15; i += 1) await t.clock.tick(100);
    assert.deepEqual(t.seen, ['1001-0'], 'and the event still arrives');
    t.manager.stop();
  });

  it('bad_timeout even at timeout 0: an error that stops, not an endless retry', async () => {
    const clock = new FakeClock();
    const t = setup({
      clock, transports: ['polling'],
      routes: { '/api/events': pollRoute(clock, [], { max: -1 }) },
    });
    t.manager.start();
    await t.clock.tick(60000);
    assert.equal(t.fetch.calls.length, 1);
    assert.equal(t.errors[0].code, 'bad_timeout');
    assert.equal(t.errors[0].kind, 'fatal');
    assert.equal(t.manager.state, 'offline');
  });
});

describe('reset, errors, pause', { timeout: 5000 }, () => {
  it('WS reset frame: cursor jumps to the head and onReset fires', async () => {
    const t = setup();
    t.manager.start();
    t.WS.last().welcome();
    t.WS.last().serverSend({ type: 'reset', last_id: '9000-0' });
    assert.deepEqual(t.resets, ['9000-0']);
    assert.equal(t.manager.cursor, '9000-0');
    t.WS.last().serverSend(evt(1)); // older than the new head: not delivered
    t.WS.last().serverSend({ type: 'event', id: '9001-0', event: 'e', data: null, ts: 9001 });
    assert.deepEqual(t.seen, ['9001-0']);
  });

  it('SSE reset event and poll reset answer both reach onReset', async () => {
    const sse = sseRoute();
    const clock = new FakeClock();
    const t = setup({
      clock,
      routes: { '/api/sse': sse.handler, '/api/events': pollRoute(clock, [], { reset: true }) },
    });
    t.WS.refuse = true;
    t.manager.start();
    await t.clock.tick(0);
    sse.streams[0].body.push(sseFrame({ event: 'welcome', data: { rooms: [], last_id: null } }));
    sse.streams[0].body.push(sseFrame({ event: 'reset', data: { last_id: '4000-0' } }));
    await t.clock.tick(0);
    assert.deepEqual(t.resets, ['4000-0']);
    assert.equal(t.manager.cursor, '4000-0');
    // now the stream dies three times fast: polling, whose answer is a reset too
    for (let i = 0; i < 3; i += 1) {
      const s = sse.streams[sse.streams.length - 1];
      if (i > 0) s.body.push(sseFrame({ event: 'welcome', data: { rooms: [], last_id: null } }));
      await t.clock.tick(0);
      s.body.end();
      await t.clock.tick(2000);
    }
    assert.equal(t.manager.transport, 'polling');
    await t.clock.tick(0);
    assert.equal(t.resets[1], '5000-0');
    t.manager.stop();
  });

  it('token_expired error frame stops everything and reports an auth error', async () => {
    const t = setup();
    t.manager.start();
    t.WS.last().welcome();
    t.WS.last().serverSend({ type: 'error', code: 'token_expired', message: 'expired' });
    assert.equal(t.errors[0].kind, 'auth');
    assert.equal(t.manager.state, 'offline');
    await t.clock.tick(120000);
    assert.equal(t.WS.instances.length, 1, 'no reconnect after the token expired');
  });

  it('a 401 on SSE is an auth error, not a reason to poll', async () => {
    const t = setup({
      routes: { '/api/sse': () => jsonResponse(401, { error: 'token_expired', message: 'x' }) },
    });
    t.WS.refuse = true;
    t.manager.start();
    await t.clock.tick(0);
    assert.equal(t.errors[0].kind, 'auth');
    assert.equal(t.fetch.calls.filter((c) => c.path === '/api/events').length, 0);
  });

  it('a non-auth room error frame is reported and the connection kept', async () => {
    const t = setup();
    t.manager.start();
    t.WS.last().welcome();
    t.WS.last().serverSend({ type: 'error', code: 'forbidden_room', message: 'room x' });
    assert.equal(t.errors[0].kind, 'frame');
    assert.equal(t.manager.state, 'live');
  });

  it('pause drops the connection; resume reconnects from the cursor on the same transport',
    async () => {
      const sse = sseRoute();
      const t = setup({ routes: { '/api/sse': sse.handler } });
      t.WS.refuse = true;
      t.manager.start();
      await t.clock.tick(0);
      sse.streams[0].body.push(sseFrame({ event: 'welcome', data: { rooms: [], last_id: null } }));
      sse.streams[0].body.push(sseFrame({ id: '1005-0', event: 'e', data: 5 }));
      await t.clock.tick(0);
      t.manager.pause();
      assert.equal(t.manager.state, 'offline');
      assert.ok(sse.streams[0].request.signal.aborted);
      await t.clock.tick(600000);
      assert.equal(sse.streams.length, 1, 'nothing while paused');
      t.manager.resume();
      await t.clock.tick(0);
      assert.equal(sse.streams.length, 2);
      assert.equal(sse.streams[1].request.headers['Last-Event-ID'], '1005-0');
      t.manager.stop();
    });

  it('server down: polling retries with backoff and says offline, then recovers', async () => {
    let up = false;
    const published = [evt(1)];
    const clock = new FakeClock();
    const t = setup({
      clock,
      routes: {
        '/api/sse': () => Promise.reject(new TypeError('network')),
        '/api/events': (r) => (up ? pollRoute(clock, published)(r)
          : Promise.reject(new TypeError('network'))),
      },
    });
    t.WS.refuse = true;
    t.manager.start();
    await t.clock.tick(1000);
    assert.equal(t.WS.instances.length, 1);
    assert.deepEqual(t.fetch.calls.map((c) => c.path), ['/api/sse', '/api/events'],
      'every transport tried once');
    await t.clock.tick(5000);
    assert.equal(t.manager.state, 'offline');
    const tries = t.fetch.calls.filter((c) => c.path === '/api/events').length;
    assert.ok(tries >= 2 && tries < 10, `bounded retries, got ${tries}`);
    assert.equal(t.WS.instances.length, tries, 'each round of retries starts on WebSocket');
    assert.equal(t.errors.length, 1, 'unreachable: said once');
    up = true;
    for (let i = 0; i < 60 && t.manager.state !== 'live'; i += 1) await t.clock.tick(1000);
    assert.equal(t.manager.state, 'live');
    assert.deepEqual(t.seen, ['1001-0']);
    t.manager.stop();
  });

  it('a server that was away is met on WebSocket again when it returns, not on polling',
    async () => {
      let up = true;
      const published = [evt(1)];
      const clock = new FakeClock();
      const sse = sseRoute();
      const t = setup({
        clock,
        routes: {
          '/api/sse': (r) => (up ? sse.handler(r) : Promise.reject(new TypeError('network'))),
          '/api/events': (r) => (up ? pollRoute(clock, published)(r)
            : Promise.reject(new TypeError('network'))),
        },
      });
      t.manager.start();
      t.WS.last().welcome('1000-0');
      t.WS.last().serverSend(evt(1));
      assert.equal(t.manager.state, 'live');
      // the server restarts: the socket closes, and nothing answers for a while
      up = false;
      t.WS.refuse = true;
      t.WS.last().serverClose(1006);
      await t.clock.tick(20000);
      assert.equal(t.manager.state, 'offline');
      const statuses = t.statuses.length;
      const tries = t.WS.instances.length;
      await t.clock.tick(20000);
      assert.ok(t.WS.instances.length > tries, 'each round of retries starts on WebSocket');
      assert.deepEqual(new Set(t.statuses.slice(statuses)), new Set(['polling/offline']),
        'retries while offline: no flicker through connecting and the other transports');
      // back: the next round's WebSocket says welcome; SSE and polling are never live
      up = true;
      await nextWebSocketOnceBack(t);
      t.WS.last().welcome('1001-0');
      assert.equal(t.manager.transport, 'websocket');
      assert.equal(t.manager.state, 'live');
      assert.equal(t.WS.last().params.get('last_event_id'), '1001-0', 'from the cursor');
      assert.ok(!t.statuses.includes('polling/live') && !t.statuses.includes('sse/live'),
        t.statuses.join(' '));
      assert.equal(sse.streams.length, 0);
      assert.deepEqual(t.seen, ['1001-0']);
      t.manager.stop();
    });

  it('behind a proxy that blocks WebSocket and SSE, a server that was away is met on polling',
    async () => {
      let up = true;
      const clock = new FakeClock();
      const sse = sseRoute();
      const t = setup({
        clock,
        routes: {
          '/api/sse': (r) => (up ? sse.handler(r) : Promise.reject(new TypeError('network'))),
          '/api/events': (r) => (up ? pollRoute(clock, [])(r)
            : Promise.reject(new TypeError('network'))),
        },
        climbBaseMs: 600000, climbCapMs: 600000, // no climb in this test's time
      });
      t.WS.refuse = true;
      t.manager.start();
      await t.clock.tick(3100); // WS refused, SSE held back (no welcome): polling
      assert.equal(t.manager.transport, 'polling');
      assert.equal(t.manager.state, 'live');
      const ws = t.WS.instances.length;
      const streams = sse.streams.length;
      up = false;
      // the waiting poll fails; the retries go on polling, what worked here
      await t.clock.tick(30000);
      assert.equal(t.manager.state, 'offline');
      up = true;
      for (let i = 0; i < 60 && t.manager.state !== 'live'; i += 1) await t.clock.tick(500);
      assert.equal(t.manager.transport, 'polling');
      assert.equal(t.WS.instances.length, ws, 'the blocked WebSocket was not tried again');
      assert.equal(sse.streams.length, streams, 'nor the held SSE');
      t.manager.stop();
    });

  it('WebSocket alone and nothing answers: the error says unreachable, not a close code',
    async () => {
      const t = setup({ transports: ['websocket'] });
      t.WS.refuse = true;
      t.manager.start();
      for (let i = 0; i < 20 && !t.errors.length; i += 1) await t.clock.tick(1000);
      assert.equal(t.errors.length, 1);
      assert.equal(t.errors[0].code, 'unreachable');
      assert.equal(t.errors[0].kind, 'transport');
      assert.match(t.errors[0].message, /no transport \(websocket\) could connect/);
      t.manager.stop();
    });

  it('stopped in an outage and started again: from WebSocket, and the outage is said anew',
    async () => {
      let up = true;
      const clock = new FakeClock();
      const t = setup({
        clock,
        routes: {
          '/api/sse': () => Promise.reject(new TypeError('network')),
          '/api/events': (r) => (up ? pollRoute(clock, [])(r)
            : Promise.reject(new TypeError('network'))),
        },
      });
      t.manager.start();
      t.WS.last().welcome('1000-0');
      up = false;
      t.WS.refuse = true;
      t.WS.last().serverClose(1006);
      // the reconnect: WS, SSE and polling fail, twice: the outage is said
      for (let i = 0; i < 60 && !t.errors.length; i += 1) await t.clock.tick(100);
      assert.equal(t.errors.length, 1);
      assert.equal(t.manager.transport, 'polling');
      t.manager.stop();
      await t.clock.tick(0);
      const tried = t.WS.instances.length;
      t.manager.start();
      await t.clock.tick(0);
      assert.equal(t.WS.instances.length, tried + 1, 'the first try is a WebSocket');
      for (let i = 0; i < 20 && t.errors.length < 2; i += 1) await t.clock.tick(1000);
      assert.equal(t.errors.length, 2, 'unreachable said again after the restart');
      up = true;
      await nextWebSocketOnceBack(t);
      t.WS.last().welcome('1000-0');
      assert.equal(t.manager.transport, 'websocket');
      assert.equal(t.manager.state, 'live');
      t.manager.stop();
    });
});
