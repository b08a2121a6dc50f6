// Fakes for the transport manager: a clock, a WebSocket and a fetch() whose servers the
// test plays by hand. Nothing here touches the network.

/** A manual clock: setTimeout/clearTimeout/now; `await clock.tick(ms)` runs what is due. */
export class FakeClock {
  constructor(start = 1_700_000_000_000) {
    this.t = start;
    this.timers = new Map();
    this.nextId = 1;
    this.setTimeout = (fn, ms = 0) => {
      const id = this.nextId++;
      this.timers.set(id, { at: this.t + Math.max(0, ms), fn });
      return id;
    };
    this.clearTimeout = (id) => {
      this.timers.delete(id);
    };
    this.now = () => this.t;
  }

  /** Advance time by `ms`, running each due timer in order and letting promises settle. */
  async tick(ms = 0) {
    const end = this.t + ms;
    await flush();
    for (;;) {
      let next = null;
      for (const [id, timer] of this.timers) {
        if (timer.at <= end && (next === null || timer.at < next[1].at)) next = [id, timer];
      }
      if (!next) break;
      this.timers.delete(next[0]);
      this.t = Math.max(this.t, next[1].at);
      next[1].fn();
      await flush();
    }
    this.t = end;
    await flush();
  }
}

/** Let pending promise callbacks (and chained awaits) run. */
export async function flush() {
  for (let i = 0; i < 20; i += 1) await new Promise((resolve) => setImmediate(resolve));
}

/** A WebSocket class whose instances the test opens, feeds and closes. */
export function makeFakeWebSocket() {
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.sent = [];
      this.closed = false;
      FakeWebSocket.instances.push(this);
      if (FakeWebSocket.refuse) {
        setImmediate(() => this.serverClose(1006));
      }
    }

    send(data) {
      const frame = JSON.parse(data);
      if (frame.type === 'ping') {
        // as the server does (unless the test cut the path: `mute`); kept out of `sent`,
        // which tests read for what the client said
        this.pings = (this.pings ?? 0) + 1;
        queueMicrotask(() => { if (!this.closed && !this.mute) this.serverSend({ type: 'pong' }); });
        return;
      }
      this.sent.push(frame);
    }

    close() {
      this.closed = true;
    }

    // test side
    serverSend(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }

    welcome(lastId = null, rooms = []) {
      this.serverSend({ type: 'welcome', rooms, last_id: lastId });
    }

    serverClose(code = 1006) {
      this.closed = true;
      this.onclose?.({ code, reason: '' });
    }

    get params() {
      return new URL(this.url, 'http://x').searchParams;
    }
  }
  FakeWebSocket.instances = [];
  FakeWebSocket.refuse = false;
  FakeWebSocket.last = () => FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
  FakeWebSocket.open = () => FakeWebSocket.instances.filter((ws) => !ws.closed);
  return FakeWebSocket;
}

/** A body whose chunks the test pushes: what fetch() streams an SSE answer through. */
export class FakeBody {
  constructor(signal) {
    this.queue = [];
    this.waiters = [];
    this.done = false;
    signal?.addEventListener('abort', () => this.fail(new DOMException('aborted', 'AbortError')));
  }

  push(text) {
    const waiter = this.waiters.shift();
    if (waiter) waiter.resolve({ value: text, done: false });
    else this.queue.push(text);
  }

  end() {
    this.done = true;
    for (const w of this.waiters.splice(0)) w.resolve({ value: undefined, done: true });
  }

  fail(err) {
    this.error = err;
    for (const w of this.waiters.splice(0)) w.reject(err);
  }

  getReader() {
    return {
      read: () => {
        if (this.queue.length) return Promise.resolve({ value: this.queue.shift(), done: false });
        if (this.error) return Promise.reject(this.error);
        if (this.done) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
      },
    };
  }
}

/**
 * fetch() routed to per-path handlers: handler(request) returns a response description
 * (or a promise of one). Every call is recorded as {url, path, params, headers, signal}.
 */
export function makeFakeFetch(routes) {
  const calls = [];
  const fetch = (url, init = {}) => {
    const parsed = new URL(url, 'http://x');
    const request = {
      url, path: parsed.pathname, params: parsed.searchParams,
      headers: init.headers ?? {}, signal: init.signal,
    };
    calls.push(request);
    const handler = routes[parsed.pathname];
    if (!handler) return Promise.resolve(jsonResponse(404, { error: 'not_found' }));
    return new Promise((resolve, reject) => {
      init.signal?.addEventListener('abort', () =>
        reject(new DOMException('aborted', 'AbortError')));
      Promise.resolve(handler(request)).then(resolve, reject);
    });
  };
  fetch.calls = calls;
  return fetch;
}

export function jsonResponse(status, body) {
  return {
    ok: status >= 200 && status < 300,
    status,
    json: async () => body,
    body: null,
  };
}

/** An SSE answer whose body the test writes to; returns [response, body]. */
export function sseResponse(signal) {
  const body = new FakeBody(signal);
  return [{ ok: true, status: 200, body, json: async () => ({}) }, body];
}

export function sseFrame({ id, event, data }) {
  let out = '';
  if (id) out += `id: ${id}\n`;
  if (event) out += `event: ${event}\n`;
  out += `data: ${JSON.stringify(data)}\n\n`;
  return out;
}

export function evt(n, event = 'usage_log_added') {
  return { type: 'event', id: `${1000 + n}-0`, event, data: { n }, ts: 1000 + n };
}
