// Unit tests of the store: folding, dedupe by id, the cursor, reload on reset.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { Store, circuitState } from '../../static/store.js';
import { jsonResponse, makeFakeFetch } from './fakes.mjs';

const NOW = Date.UTC(2026, 10, 25, 12, 0, 30);
const MIN = Math.floor(NOW / 60000) * 60000;

function overview(extra = {}) {
  return {
    last_id: `${MIN}-5`,
    metrics: { activeSessions: 3, totalRequests: 100, totalCost: 1.5, avgResponseMs: 420,
      timestamp: MIN },
    metrics_by_user: { u1: { userId: 'u1', activeSessions: 1, totalRequests: 10, totalCost: 0.1 } },
    providers: { openai: { providerId: 'openai', status: 'healthy', circuitState: 'closed',
      failureCount: 0 } },
    sessions: { s1: { sessionId: 's1', userId: 'u1', providerId: 'openai', model: 'gpt' } },
    usage: [
      { id: `${MIN}-1`, ts: MIN, sessionId: 's1', userId: 'u1', model: 'gpt', inputTokens: 5,
        outputTokens: 7, costUsd: 0.01, latencyMs: 300, statusCode: 200 },
    ],
    requests_per_minute: [[MIN - 60000, 4], [MIN, 2]],
    ...extra,
  };
}

const ev = (id, event, data) => ({ id, event, data, ts: Number(id.split('-')[0]) });

describe('store', { timeout: 5000 }, () => {
  it('starts from the overview: state, cursor and the log of recent usage', () => {
    const store = new Store({ now: () => NOW });
    store.applyOverview(overview());
    assert.equal(store.cursor, `${MIN}-5`);
    assert.equal(store.state.metrics.totalRequests, 100);
    assert.deepEqual(Object.keys(store.state.sessions), ['s1']);
    assert.deepEqual(store.state.log.map((e) => e.id), [`${MIN}-1`]);
    assert.equal(store.state.log[0].event, 'usage_log_added');
    assert.deepEqual(store.requestsPerMinute(3), [[MIN - 120000, 0], [MIN - 60000, 4], [MIN, 2]]);
  });

  it('folds every event type and moves the cursor', () => {
    const store = new Store({ now: () => NOW });
    store.applyOverview(overview());
    const fresh = store.applyEvents([
      ev(`${MIN}-6`, 'session_created', { sessionId: 's2', userId: 'u2', providerId: 'p' }),
      ev(`${MIN}-7`, 'session_ended', { sessionId: 's1', costUsd: 0.2 }),
      ev(`${MIN}-8`, 'provider_status_change',
        { providerId: 'openai', status: 'degraded', circuitState: 'half_open', failureCount: 3 }),
      ev(`${MIN}-9`, 'usage_log_added', { sessionId: 's2', userId: 'u2', costUsd: 0.3 }),
      ev(`${MIN}-10`, 'metrics_update', { activeSessions: 4, totalRequests: 130, totalCost: 2,
        timestamp: MIN + 20000 }),
      ev(`${MIN}-11`, 'metrics_update', { userId: 'u2', activeSessions: 1 }),
      ev(`${MIN}-12`, 'something_else', { any: 1 }),
    ]);
    assert.equal(fresh.length, 7);
    assert.equal(store.cursor, `${MIN}-12`);
    assert.deepEqual(Object.keys(store.state.sessions), ['s2']);
    assert.equal(circuitState(store.state.providers.openai.circuitState), 'half-open');
    assert.equal(store.state.usage[0].id, `${MIN}-9`);
    assert.equal(store.state.rpm.get(MIN), 3);
    assert.equal(store.state.metrics.totalRequests, 130);
    assert.equal(store.state.metricsByUser.u2.activeSessions, 1);
    assert.deepEqual(store.delta('totalRequests'), { value: 30, since: 20000 });
    assert.equal(store.state.log[0].id, `${MIN}-12`, 'the log is newest first');
  });

  it('drops an id it has seen; logs but does not refold an id the overview already counts', () => {
    const store = new Store({ now: () => NOW });
    store.applyOverview(overview());
    const a = ev(`${MIN}-6`, 'usage_log_added', { costUsd: 1 });
    assert.equal(store.applyEvents([a]).length, 1);
    assert.equal(store.applyEvents([a]).length, 0, 'same id twice');
    assert.equal(store.applyEvents([ev(`${MIN}-1`, 'usage_log_added', {})]).length, 0,
      'the overview usage id counts as seen');
    const old = ev(`${MIN}-3`, 'usage_log_added', {});
    assert.equal(store.applyEvents([old]).length, 1, 'not seen by this page: logged');
    assert.equal(store.state.rpm.get(MIN), 3, 'but not counted twice (2 + the -6 event)');
    const ids = store.state.log.map((e) => e.id);
    assert.equal(new Set(ids).size, ids.length);
  });

  it('a poll cursor without events still advances', () => {
    const store = new Store({ now: () => NOW });
    store.applyOverview(overview());
    store.applyEvents([], `${MIN + 5000}-0`);
    assert.equal(store.cursor, `${MIN + 5000}-0`);
  });

  it('reload() fetches the overview again, keeps the log and replaces the folded state',
    async () => {
      let version = 1;
      const fetch = makeFakeFetch({
        '/api/overview': () => jsonResponse(200, version === 1 ? overview()
          : overview({ last_id: `${MIN}-50`, sessions: {}, metrics: { totalRequests: 999 } })),
      });
      const store = new Store({ fetch, now: () => NOW });
      const changes = [];
      store.subscribe((c) => changes.push(c.type));
      await store.reload();
      store.applyEvents([ev(`${MIN}-6`, 'session_created', { sessionId: 's9' })]);
      version = 2;
      await store.reload();
      assert.equal(store.cursor, `${MIN}-50`);
      assert.equal(store.state.metrics.totalRequests, 999);
      assert.deepEqual(Object.keys(store.state.sessions), []);
      assert.ok(store.state.log.some((e) => e.id === `${MIN}-6`));
      assert.deepEqual(changes, ['overview', 'events', 'overview']);
      assert.equal(fetch.calls.length, 2);
    });

  it('a failed overview rejects with the status (the app shows the login screen on 401)',
    async () => {
      const fetch = makeFakeFetch({
        '/api/overview': () => jsonResponse(401, { error: 'token_expired' }),
      });
      const store = new Store({ fetch });
      await assert.rejects(store.reload(), (err) => err.status === 401);
    });

  it('cards fall back to the caller\'s own metrics when there are no global ones', () => {
    const store = new Store({ now: () => NOW });
    store.applyOverview(overview({ metrics: {} }));
    assert.equal(store.currentMetrics('u1').totalRequests, 10);
  });

  it('keeps the log bounded', () => {
    const store = new Store({ now: () => NOW, logLimit: 10 });
    store.applyOverview(overview({ usage: [] }));
    store.applyEvents(Array.from({ length: 25 }, (_, i) => ev(`${MIN}-${100 + i}`, 'x', {})));
    assert.equal(store.state.log.length, 10);
    assert.equal(store.state.log[0].id, `${MIN}-124`);
  });

  it('events that arrive while the overview loads are refolded on top of it', async () => {
    let release;
    const fetch = makeFakeFetch({
      '/api/overview': () => new Promise((resolve) => {
        release = () => resolve(jsonResponse(200, overview()));
      }),
    });
    const store = new Store({ fetch, now: () => NOW });
    const loading = store.reload();
    await new Promise((r) => setImmediate(r));
    // one event the overview already counts, one newer than its snapshot
    store.applyEvents([
      ev(`${MIN}-4`, 'session_created', { sessionId: 'old' }),
      ev(`${MIN}-9`, 'session_created', { sessionId: 'new' }),
    ]);
    release();
    await loading;
    assert.deepEqual(Object.keys(store.state.sessions).sort(), ['new', 's1']);
    assert.equal(store.cursor, `${MIN}-9`);
  });
  it('keeps a bounded history of metrics whatever timestamps a producer writes', () => {
    // a fixed timestamp (the start of the producer's day), one in the future, none at all
    const stamps = [() => '2026-11-25T00:00:00Z', (n) => (n === 0 ? MIN + 86400000 : MIN), () => null];
    for (const stamp of stamps) {
      const store = new Store({ now: () => NOW });
      const events = [];
      for (let n = 1; n <= 20000; n += 1) {
        events.push(ev(`${MIN}-${n}`, 'metrics_update',
          { activeSessions: 1, totalRequests: n, totalCost: n, timestamp: stamp(n - 1) }));
      }
      store.applyEvents(events);
      assert.equal(store.state.metrics.totalRequests, 20000);
      assert.ok(store.state.metricsHistory.length <= 2000,
        `${store.state.metricsHistory.length} metrics kept`);
    }
  });

  it('deltas still span minutes when metrics come many times a second', () => {
    const store = new Store({ now: () => NOW });
    const events = [];
    // ten updates a second for ten minutes
    for (let n = 0; n < 6000; n += 1) {
      events.push(ev(`${MIN}-${n + 1}`, 'metrics_update',
        { activeSessions: 1, totalRequests: n, totalCost: 0, timestamp: MIN + n * 100 }));
    }
    store.applyEvents(events);
    assert.ok(store.state.metricsHistory.length <= 2000);
    const d = store.delta('totalRequests');
    assert.ok(d.since >= 299000 && d.since <= 300000, `since ${d.since}`);
    assert.ok(d.value >= 2990 && d.value <= 3000, `value ${d.value}`);
  });
  it('keeps the metrics of the users updated last, not of every user ever seen', () => {
    const USERS_LIMIT = 10000; // what the stream holds by default: no fresh page sees more
    const store = new Store({ now: () => NOW });
    store.applyOverview(overview());
    const events = [];
    for (let n = 1; n <= USERS_LIMIT * 2; n += 1) {
      events.push(ev(`${MIN}-${n + 5}`, 'metrics_update',
        { userId: `user${n}`, activeSessions: 1, totalRequests: n, totalCost: 0 }));
    }
    // an early user again: updated last, so kept
    events.push(ev(`${MIN}-${USERS_LIMIT * 2 + 6}`, 'metrics_update',
      { userId: 'user1', activeSessions: 1, totalRequests: 7, totalCost: 0 }));
    store.applyEvents(events);
    const users = Object.keys(store.state.metricsByUser);
    assert.equal(users.length, USERS_LIMIT);
    assert.equal(store.state.metricsByUser.user1.totalRequests, 7);
    assert.equal(store.state.metricsByUser[`user${USERS_LIMIT * 2}`].totalRequests, USERS_LIMIT * 2);
    assert.equal(store.state.metricsByUser.user2, undefined);
    assert.equal(store.state.metricsByUser.u1, undefined); // the overview's, updated first
  });
  it('counts requests per minute near now only, whatever timestamps a producer writes', () => {
    const store = new Store({ now: () => NOW });
    const events = [];
    for (let n = 1; n <= 20000; n += 1) {
      // one far-off minute each (days ahead, and years back), and some of this minute
      const far = n % 2 ? MIN + (2 * 1440 + n) * 60000 : MIN - (400 * 1440 + n) * 60000;
      events.push({ id: `${MIN}-${n}`, event: 'usage_log_added', data: { n },
        ts: n % 10 === 0 ? NOW : far });
    }
    store.applyEvents(events);
    assert.ok(store.state.rpm.size <= 2 * 1440 + 1, `${store.state.rpm.size} minutes kept`);
    assert.deepEqual(store.requestsPerMinute(1), [[MIN, 2000]]);
  });
});
