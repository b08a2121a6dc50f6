// Unit tests of the panels' pure helpers (the DOM parts are covered in real Chromium).
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { age, duration, niceMax, summarize } from '../../static/panels.js';

describe('panel helpers', { timeout: 5000 }, () => {
  it('chart axes end on a round number with four whole steps', () => {
    for (const [value, top] of [[0, 4], [3, 4], [5, 8], [21, 24], [39, 40], [333, 400]]) {
      assert.equal(niceMax(value), top, `niceMax(${value})`);
      assert.ok(niceMax(value) >= value);
      assert.ok(Number.isInteger(niceMax(value) / 4));
    }
  });

  it('durations and ages read like a person would say them', () => {
    assert.equal(duration(420), '420 ms');
    assert.equal(duration(2500), '2.5 s');
    assert.equal(duration(125000), '2 min 5 s');
    assert.equal(duration(null), '—');
    assert.equal(age(59000), '59 s');
    assert.equal(age(3 * 3600000 + 120000), '3 h 2 min');
  });

  it('summarises each event type in one line, and anything else as JSON', () => {
    assert.match(summarize({ event: 'provider_status_change',
      data: { providerId: 'openai', name: 'OpenAI', status: 'down', circuitState: 'HALF_OPEN',
        failureCount: 4 } }), /OpenAI → down · circuit half-open · 4 failures/);
    assert.match(summarize({ event: 'session_created',
      data: { sessionId: 's1', userId: 'u1', providerId: 'groq', model: 'llama' } }),
    /session s1 · user u1 · groq \/ llama/);
    assert.match(summarize({ event: 'usage_log_added',
      data: { userId: 'u', model: 'm', inputTokens: 1200, outputTokens: 30, costUsd: 0.5,
        latencyMs: 900, statusCode: 200 } }), /u · m · .* tok · .* · 900 ms · 200/);
    assert.equal(summarize({ event: 'custom', data: { a: 1 } }), '{"a":1}');
    assert.equal(summarize({ event: 'custom', data: 'x'.repeat(300) }).length, 158);
  });
});
