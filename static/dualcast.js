// dualcast.js: the dualcast client, for any page and for Node 22+. One ES module, no
// build step, no dependencies; the dashboard bundled with dualcast is built on it.
//
//   import { Dualcast } from "https://push.example.com/dualcast.js";
//   const dc = new Dualcast("https://push.example.com", { token, rooms: ["ops"] });
//   dc.on("event", (e) => console.log(e.id, e.event, e.data));
//   dc.start();
//
// WebSocket first; SSE (read with fetch(), so it can send Last-Event-ID and a Bearer
// token, and see the `welcome` event itself) when the WebSocket cannot open in time or
// keeps dying; long-polling when SSE delivers nothing in time (a buffering proxy holds
// it back). From a lower transport it probes the higher ones now and then (full-jitter
// backoff) and switches up only once a probe has said `welcome`. One cursor (the last
// stream id) is carried across every switch, so nothing is lost and nothing is
// delivered twice, and events arrive in stream order.
//
// WebSocket, fetch, timers, clock and randomness are injectable, so tests drive the
// transport manager with fakes; nothing here touches the DOM.

export const TRANSPORTS = Object.freeze(['websocket', 'sse', 'polling']);

export const STATES = Object.freeze(['connecting', 'live', 'offline']);

/**
 * Every error code the client understands, in an `error` frame or an HTTP JSON body.
 * One list, so a test can hold it against the server's own.
 */
export const ERROR_CODES = Object.freeze([
  // who the caller is
  'unauthenticated', 'invalid_token', 'token_expired', 'no_secret', 'auth_unavailable',
  'session_refused', 'forbidden', 'bad_origin', 'cross_site',
  // what the caller asked for
  'bad_room', 'forbidden_room', 'too_many_rooms', 'bad_cursor', 'bad_timeout', 'bad_json',
  'bad_frame', 'unknown_type', 'invalid', 'unencodable', 'unsupported_media_type', 'too_large',
  'body_timeout', 'not_found', 'method_not_allowed', 'transport_disabled', 'too_many_connections',
  // the server's side
  'lagging', 'draining', 'log_unavailable', 'no_dashboard',
]);

/** Codes that mean "who you are is no longer good": ask for new credentials, stop retrying. */
export const AUTH_CODES = new Set([
  'token_expired', 'unauthenticated', 'invalid_token', 'no_secret',
  // older servers' spellings
  'unauthorized', 'anonymous_not_allowed',
]);

/** Codes that mean "what you asked for is wrong": retrying on another transport won't help. */
export const REQUEST_CODES = new Set([
  'bad_room', 'forbidden_room', 'too_many_rooms', 'bad_cursor', 'bad_timeout',
]);

/** Parse a stream id `<ms>-<seq>` into a comparable pair, or null. */
export function parseId(id) {
  if (typeof id !== 'string') return null;
  const m = /^(\d+)(?:-(\d+))?$/.exec(id);
  if (!m) return null;
  return [BigInt(m[1]), BigInt(m[2] ?? '0')];
}

/** Compare two stream ids; null sorts before everything. */
export function compareIds(a, b) {
  const pa = parseId(a);
  const pb = parseId(b);
  if (!pa && !pb) return 0;
  if (!pa) return -1;
  if (!pb) return 1;
  if (pa[0] !== pb[0]) return pa[0] < pb[0] ? -1 : 1;
  if (pa[1] !== pb[1]) return pa[1] < pb[1] ? -1 : 1;
  return 0;
}

/** The larger of two ids (either may be null). */
export function maxId(a, b) {
  return compareIds(a, b) >= 0 ? a : b;
}

/** Milliseconds part of a stream id: the entry's time when a frame has no `ts`. */
export function idTime(id) {
  const p = parseId(id);
  return p ? Number(p[0]) : null;
}

/**
 * An event's time in epoch ms from whatever a producer put in `ts` (number, numeric
 * string, missing, absurd): a number a Date can hold, else the id's time, else null.
 */
export function eventTime(ts, id = null) {
  const n = typeof ts === 'string' && ts.trim() !== '' ? Number(ts) : ts;
  if (typeof n === 'number' && Number.isFinite(n) && Math.abs(n) <= 8.64e15) return n;
  const fromId = idTime(id);
  return fromId !== null && fromId <= 8.64e15 ? fromId : null;
}

/** Full-jitter backoff: a random delay in [0, min(cap, base * 2^attempt)). */
export function backoff(attempt, base, cap, random = Math.random) {
  return Math.floor(random() * Math.min(cap, base * 2 ** Math.min(attempt, 30)));
}

/**
 * Equal-jitter backoff: a delay in [span/2, span) with span = min(cap, base * 2^attempt).
 * For retries of something refused: the gaps grow and never collapse to nothing, so a
 * refused transport costs one failed request (and one console line) per gap, not a burst.
 */
export function steadyBackoff(attempt, base, cap, random = Math.random) {
  const span = Math.min(cap, base * 2 ** Math.min(attempt, 30));
  return Math.floor(span / 2 + random() * (span / 2));
}

/**
 * Incremental parser of a text/event-stream body (WHATWG rules that matter to us):
 * lines end in \n, \r\n or \r; `field: value` (one leading space dropped); a blank
 * line dispatches; `:` lines are comments; `data` lines join with \n.
 */
export class SSEParser {
  constructor() {
    this.buffer = '';
    this.reset();
  }

  reset() {
    this.id = null;
    this.event = '';
    this.data = [];
    this.hasData = false;
  }

  /** Feed decoded text; returns the messages completed by it: {id, event, data}. */
  push(text) {
    this.buffer += text;
    const out = [];
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this.buffer);
      if (!m) break;
      // a lone \r at the very end may be the first half of \r\n: wait for more
      if (m[0] === '\r' && m.index === this.buffer.length - 1) break;
      const line = this.buffer.slice(0, m.index);
      this.buffer = this.buffer.slice(m.index + m[0].length);
      this.line(line, out);
    }
    return out;
  }

  line(line, out) {
    if (line === '') {
      if (this.hasData || this.event) {
        out.push({ id: this.id, event: this.event || 'message', data: this.data.join('\n') });
      }
      this.reset();
      return;
    }
    if (line.startsWith(':')) return;
    const colon = line.indexOf(':');
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') {
      this.data.push(value);
      this.hasData = true;
    } else if (field === 'event') {
      this.event = value;
    } else if (field === 'id') {
      if (!value.includes('\0')) this.id = value;
    }
    // `retry` is ours to decide (backoff); unknown fields are ignored
  }
}

function safeJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** Turn a WS event frame / poll event into the shape every consumer sees. */
function normalizeEvent(frame) {
  if (!frame || typeof frame.id !== 'string' || typeof frame.event !== 'string') return null;
  return {
    id: frame.id,
    event: frame.event,
    data: frame.data === undefined ? null : frame.data,
    ts: eventTime(frame.ts, frame.id),
  };
}

function query(params) {
  const parts = [];
  for (const [key, value] of Object.entries(params)) {
    if (value === null || value === undefined || value === '') continue;
    parts.push(`${encodeURIComponent(key)}=${encodeURIComponent(value)}`);
  }
  return parts.length ? `?${parts.join('&')}` : '';
}

/** Headers plus the Bearer token, when there is one (else the cookie, same origin only). */
function withToken(env, headers) {
  const token = env.token();
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

/** Read a JSON error body ({error, message}) from a failed fetch, if there is one. */
async function errorBody(response) {
  try {
    const body = await response.json();
    if (body && typeof body === 'object') return body;
  } catch {
    /* not JSON */
  }
  return {};
}

/**
 * Decide what an HTTP refusal means: `auth` (show login), `fatal` (the request itself
 * is wrong, e.g. a forbidden room: retrying elsewhere will not help) or `transport`
 * (this transport is unavailable here: fall back).
 */
export function classifyRefusal(status, body) {
  const code = String(body.error ?? body.code ?? '');
  if (status === 401 || AUTH_CODES.has(code)) return 'auth';
  if (REQUEST_CODES.has(code)) return 'fatal';
  const text = `${code} ${body.message ?? ''}`.toLowerCase();
  if ((status === 400 || status === 403) && /room|cursor|last_event_id|after|bad_request/.test(text)) {
    return 'fatal';
  }
  return 'transport';
}

/** Codes of a refusal that names one room (`not allowed in room 'admin'`). */
const ROOM_CODES = new Set(['forbidden_room', 'bad_room']);

/** The room of `rooms` an HTTP refusal names, if it refuses one room, else null. */
function refusedRoom(info, rooms) {
  if (!ROOM_CODES.has(info.code)) return null;
  const message = String(info.message ?? '');
  return rooms.find((room) => message.includes(`'${room.slice(0, 80)}'`)) ?? null;
}

// ---------------------------------------------------------------------------
// One class per transport. Each reports to its `sink` (the manager) with itself as the
// first argument, so the manager can ignore a connection it has already replaced.
// sink: welcome(conn, info) events(conn, list) reset(conn, lastId) error(conn, info)
//       closed(conn, {welcomed, kind, code})

/** What every connection shares: its name, its sink, and ending exactly once. */
class Connection {
  constructor(name, sink) {
    this.name = name;
    this.sink = sink;
    this.welcomed = false;
    this.closed = false;
    this.watchTimer = null;
  }

  finish(info) {
    if (this.closed) return;
    this.closed = true;
    this.stopWatch();
    this.sink.closed(this, { welcomed: this.welcomed, ...info });
  }

  /**
   * A path can die without a close (a laptop that slept, a NAT or proxy that forgot the
   * flow): the socket then waits for ever and the page says "live" while nothing comes.
   * The server writes at least once per ping interval (15 s: an SSE `: ping`, a `pong`
   * to our WebSocket `ping`), so `idleMs` with nothing at all means the path is gone:
   * close it and report it dead, and the manager reconnects from the cursor.
   * `ping` (WebSocket) is sent once a third of that has passed in silence.
   */
  watch(env, idleMs, ping = null) {
    this.stopWatch();
    if (!(idleMs > 0) || this.closed) return;
    this.heardAt = env.now();
    const step = idleMs / 3;
    const check = () => {
      this.watchTimer = null;
      if (this.closed) return;
      const quiet = env.now() - this.heardAt;
      if (quiet >= idleMs) {
        this.close();
        this.stopWatch();
        this.sink.closed(this, { welcomed: this.welcomed, kind: 'transport', error: 'silent' });
        return;
      }
      if (ping && quiet >= step) ping();
      this.watchTimer = env.setTimeout(check, Math.min(step, idleMs - quiet));
    };
    this.watchEnv = env;
    this.watchTimer = env.setTimeout(check, step);
  }

  /** Something arrived: the path is alive. */
  heard() {
    if (this.watchEnv) this.heardAt = this.watchEnv.now();
  }

  stopWatch() {
    if (this.watchTimer !== null) this.watchEnv.clearTimeout(this.watchTimer);
    this.watchTimer = null;
  }
}

/** SSE and polling: a fetch() that closing aborts. */
class FetchConnection extends Connection {
  close() {
    this.closed = true;
    this.stopWatch();
    try {
      this.abort?.abort();
    } catch {
      /* nothing to abort */
    }
  }
}

class WebSocketConnection extends Connection {
  constructor(env, sink, { cursor, rooms, idleMs }) {
    super('websocket', sink);
    this.env = env;
    this.idleMs = idleMs;
    const url = `${env.wsBase}/api/ws${query({
      last_event_id: cursor,
      rooms: rooms.length ? rooms.join(',') : null,
      token: env.token(), // a browser WebSocket cannot send headers
    })}`;
    try {
      this.ws = new env.WebSocket(url);
    } catch (err) {
      this.ws = null;
      // report asynchronously: the manager has not stored us yet
      env.setTimeout(() => this.finish({ kind: 'transport', error: String(err) }), 0);
      return;
    }
    this.ws.onmessage = (msg) => this.message(msg.data);
    this.ws.onclose = (ev) => this.finish({ kind: 'transport', code: ev?.code, reason: ev?.reason });
    this.ws.onerror = () => {}; // onclose follows and carries the outcome
  }

  message(raw) {
    if (this.closed) return;
    this.heard();
    const frame = typeof raw === 'string' ? safeJson(raw) : undefined;
    if (!frame || typeof frame !== 'object') return;
    this.frame(frame);
  }

  frame(frame) {
    switch (frame.type) {
      case 'welcome':
        this.welcomed = true;
        // a quiet WebSocket is asked for a `pong`: a dead path is noticed within idleMs
        this.watch(this.env, this.idleMs, () => this.send({ type: 'ping' }));
        this.sink.welcome(this, { rooms: frame.rooms ?? [], lastId: frame.last_id ?? null });
        break;
      case 'event': {
        const ev = normalizeEvent(frame);
        if (ev) this.sink.events(this, [ev]);
        break;
      }
      case 'batch': {
        const list = [];
        for (const inner of Array.isArray(frame.events) ? frame.events : []) {
          if (inner && inner.type && inner.type !== 'event') {
            if (list.length) this.sink.events(this, list.splice(0));
            this.frame(inner);
            continue;
          }
          const ev = normalizeEvent(inner);
          if (ev) list.push(ev);
        }
        if (list.length) this.sink.events(this, list);
        break;
      }
      case 'reset':
        this.sink.reset(this, frame.last_id ?? null);
        break;
      case 'error':
        this.sink.error(this, { code: frame.code ?? 'error', message: frame.message ?? '' });
        break;
      case 'joined':
      case 'left':
        this.sink.room(this, frame.type, frame.room);
        break;
      default:
        break; // pong: nothing to do
    }
  }

  send(obj) {
    if (this.ws && this.welcomed && !this.closed) this.ws.send(JSON.stringify(obj));
  }

  close() {
    this.closed = true;
    this.stopWatch();
    if (this.ws) {
      this.ws.onmessage = null;
      this.ws.onclose = null;
      try {
        this.ws.close(1000);
      } catch {
        /* already closed */
      }
    }
  }
}

class SSEConnection extends FetchConnection {
  constructor(env, sink, { cursor, rooms, idleMs }) {
    super('sse', sink);
    this.idleMs = idleMs;
    this.abort = new env.AbortController();
    // events=message: each event's data is the whole {id, event, data, ts}, so SSE carries
    // the producer's ts as the other transports do (named events carry no ts)
    const url = `${env.httpBase}/api/sse${query({
      rooms: rooms.length ? rooms.join(',') : null, events: 'message',
    })}`;
    const headers = withToken(env, { Accept: 'text/event-stream' });
    if (cursor) headers['Last-Event-ID'] = cursor;
    this.run(env, url, headers);
  }

  async run(env, url, headers) {
    let info = { kind: 'transport' };
    try {
      const response = await env.fetch(url, {
        headers, signal: this.abort.signal, cache: 'no-store', credentials: 'same-origin',
      });
      if (this.closed) return;
      if (!response.ok) {
        const body = await errorBody(response);
        info = {
          kind: classifyRefusal(response.status, body), status: response.status,
          code: body.error ?? body.code, message: body.message,
        };
        return;
      }
      if (!response.body || typeof response.body.getReader !== 'function') {
        info = { kind: 'transport', error: 'no readable body' };
        return;
      }
      const reader = response.body.getReader();
      this.reader = reader;
      const decoder = new env.TextDecoder();
      const parser = new SSEParser();
      for (;;) {
        const { value, done } = await reader.read();
        if (this.closed) return;
        if (done) break;
        this.heard(); // an event, or the server's `: ping`
        const text = typeof value === 'string' ? value : decoder.decode(value, { stream: true });
        const batch = [];
        for (const msg of parser.push(text)) {
          if (this.closed) return;
          // the server's own messages carry no `id:`; a producer's event may have any of
          // their names (`reset` with a forged last_id would move the cursor past the head)
          if (msg.event === 'welcome' && !msg.id) {
            if (batch.length) this.sink.events(this, batch.splice(0));
            const data = safeJson(msg.data) ?? {};
            this.welcomed = true;
            this.watch(env, this.idleMs);
            this.sink.welcome(this, { rooms: data.rooms ?? [], lastId: data.last_id ?? null });
          } else if (msg.event === 'reset' && !msg.id) {
            if (batch.length) this.sink.events(this, batch.splice(0));
            const data = safeJson(msg.data) ?? {};
            this.sink.reset(this, data.last_id ?? null);
          } else if (msg.event === 'error' && !msg.id) {
            if (batch.length) this.sink.events(this, batch.splice(0));
            const data = safeJson(msg.data) ?? {};
            this.sink.error(this, { code: data.code ?? data.error ?? 'error', message: data.message ?? '' });
          } else if (msg.id) {
            const data = safeJson(msg.data);
            // an unnamed message holding the whole event; else a named one (a server
            // that does not know events=message), its time then taken from the id
            const whole = msg.event === 'message' && data !== null && typeof data === 'object'
              && data.id === msg.id && typeof data.event === 'string';
            batch.push(whole
              ? { id: msg.id, event: data.event, data: data.data, ts: eventTime(data.ts, msg.id) }
              : {
                id: msg.id, event: msg.event, data: data === undefined ? msg.data : data,
                ts: eventTime(null, msg.id),
              });
          }
        }
        if (batch.length && !this.closed) this.sink.events(this, batch);
      }
      info = { kind: 'transport', error: 'stream ended' };
    } catch (err) {
      info = { kind: 'transport', error: String(err?.message ?? err) };
    } finally {
      this.finish(info);
    }
  }

}

class PollConnection extends FetchConnection {
  constructor(env, sink, { rooms, getCursor, pollTimeout }) {
    super('polling', sink);
    this.env = env;
    this.rooms = rooms;
    this.getCursor = getCursor;
    this.pollTimeout = pollTimeout;
    this.renewing = false;
    this.run();
  }

  /**
   * A new token: the poll waiting at the server carries the old one and would be
   * answered 401 when that one runs out. Drop it and ask again, from the manager's
   * cursor (an answer dropped before it was handed on moved nothing, so nothing is
   * lost or repeated), without a new welcome.
   */
  renew() {
    if (this.closed || !this.abort) return;
    this.renewing = true;
    this.abort.abort();
  }

  async run() {
    let info = { kind: 'transport' };
    try {
      while (!this.closed) {
        // the first request answers at once (that is our "welcome"), later ones wait
        const wait = this.welcomed ? this.pollTimeout : 0;
        const sentAt = this.env.now();
        const answer = await this.ask(wait);
        if (this.closed) return;
        if (answer.renewed) continue;

        if (answer.refusal) {
          if (answer.refusal.code === 'bad_timeout' && wait >= 1) {
            // an older or stricter server's limit is below ours: ask for less
            this.pollTimeout = Math.floor(wait / 2);
            continue;
          }
          info = answer.refusal;
          return;
        }
        const body = answer.body;
        if (!body || typeof body !== 'object') {
          info = { kind: 'transport', error: 'bad poll answer' };
          return;
        }
        if (!this.welcomed) {
          const rooms = this.rooms.length ? this.rooms : await this.defaultRooms();
          if (this.closed) return;
          this.welcomed = true;
          this.sink.welcome(this, { rooms, lastId: body.last_id ?? null });
          if (this.closed) return;
        }
        if (body.reset) {
          this.sink.reset(this, body.last_id ?? null);
        } else {
          const list = (Array.isArray(body.events) ? body.events : []).map(normalizeEvent)
            .filter(Boolean);
          this.sink.events(this, list, body.last_id ?? null);
          if (wait >= 1 && !list.length && !this.closed) {
            // An empty answer to a poll that asked to wait: a server whose limit is 0, or
            // a proxy answering at once, had this loop ask hundreds of times a second. The
            // next poll goes out no sooner than a second after this one did.
            const early = 1000 - (this.env.now() - sentAt);
            if (early > 0) await new Promise((done) => this.env.setTimeout(done, early));
          }
        }
      }
    } catch (err) {
      info = { kind: 'transport', error: String(err?.message ?? err) };
    } finally {
      this.finish(info);
    }
  }

  /**
   * The rooms the server joins when none are named (a poll answer does not say, as a
   * WebSocket or SSE welcome does): from /api/me, else none known. Without them a
   * join() on polling asked for that one room and dropped user-<sub> and the rest.
   */
  async defaultRooms() {
    const env = this.env;
    try {
      const response = await env.fetch(`${env.httpBase}/api/me`, {
        signal: this.abort.signal, cache: 'no-store', credentials: 'same-origin',
        headers: withToken(env, { Accept: 'application/json' }),
      });
      const body = response.ok ? await response.json() : null;
      return Array.isArray(body?.rooms) ? body.rooms.filter((r) => typeof r === 'string') : [];
    } catch {
      return [];
    }
  }

  /**
   * One poll, waiting up to `wait` s at the server: {body}, {refusal} (what the sink is
   * told) or {renewed} (renew() dropped it). Network errors throw.
   */
  async ask(wait) {
    const env = this.env;
    this.abort = new env.AbortController();
    this.renewing = false;
    const url = `${env.httpBase}/api/events${query({
      after: this.getCursor(),
      timeout: wait,
      rooms: this.rooms.length ? this.rooms.join(',') : null,
    })}`;
    // a proxy that swallows the answer must not hang us: give up a while after timeout
    const guard = env.setTimeout(() => this.abort.abort(), (wait + 15) * 1000);
    try {
      const response = await env.fetch(url, {
        signal: this.abort.signal, cache: 'no-store', credentials: 'same-origin',
        headers: withToken(env, { Accept: 'application/json' }),
      });
      if (!response.ok) {
        const err = await errorBody(response);
        return {
          refusal: {
            kind: classifyRefusal(response.status, err), status: response.status,
            code: err.error ?? err.code, message: err.message,
          },
        };
      }
      return { body: await response.json() };
    } catch (err) {
      if (this.renewing && !this.closed) return { renewed: true };
      throw err;
    } finally {
      env.clearTimeout(guard);
    }
  }
}

const CONNECTIONS = { websocket: WebSocketConnection, sse: SSEConnection, polling: PollConnection };

/**
 * The `transports` option as an order: none or an empty list = all three. A name that
 * is not a transport is a TypeError: dropped in silence, a typo ('long-polling') left
 * a page with no fallback behind a proxy, and nothing said why.
 */
function transportOrder(asked) {
  if (asked === undefined || asked === null) return [...TRANSPORTS];
  if (!Array.isArray(asked)) {
    throw new TypeError(`Dualcast: transports must be a list of ${TRANSPORTS.join(', ')}`);
  }
  const unknown = asked.filter((t) => !TRANSPORTS.includes(t));
  if (unknown.length) {
    throw new TypeError(`Dualcast: unknown transport ${unknown.map((t) => JSON.stringify(t))
      .join(', ')} (the transports are ${TRANSPORTS.join(', ')})`);
  }
  return asked.length ? [...new Set(asked)] : [...TRANSPORTS];
}

// ---------------------------------------------------------------------------

/**
 * Options (all optional except the constructors a test wants to fake):
 *   WebSocket, fetch, AbortController, TextDecoder, setTimeout, clearTimeout, now, random
 *   httpBase ('' = same origin), wsBase ('ws://host'), token (string or a function that
 *   returns the current one; none: the cookie, same origin only)
 *   cursor (last id seen), rooms ([] = the server's default), transports (order)
 *   initial (transport to start on), welcomeTimeoutMs, pollTimeout (s)
 *   idleTimeoutMs (a live WebSocket or SSE stream silent this long is reconnected)
 *   retryBaseMs/retryCapMs (reconnect), climbBaseMs/climbCapMs (probe higher transports)
 *   deathWindowMs/maxDeaths (how many deaths of a live transport before falling back)
 * Callbacks: onEvents(list, cursor), onStatus(status), onReset(lastId), onError(info),
 *   onWelcome({transport, rooms, lastId}), onRoom('joined'|'left', room),
 *   onRoomRefused(room) (an SSE or poll connect refused one room: asked for no more)
 */
export class TransportManager {
  constructor(opts = {}) {
    const g = globalThis;
    this.env = {
      WebSocket: opts.WebSocket ?? g.WebSocket,
      fetch: opts.fetch ?? (g.fetch ? g.fetch.bind(g) : undefined),
      AbortController: opts.AbortController ?? g.AbortController,
      TextDecoder: opts.TextDecoder ?? g.TextDecoder,
      setTimeout: opts.setTimeout ?? g.setTimeout.bind(g),
      clearTimeout: opts.clearTimeout ?? g.clearTimeout.bind(g),
      now: opts.now ?? (() => Date.now()),
      httpBase: opts.httpBase ?? '',
      wsBase: opts.wsBase ?? '',
      // a string, or a function returning the current one (refreshed by Dualcast)
      token: typeof opts.token === 'function' ? opts.token : () => opts.token ?? null,
    };
    this.now = opts.now ?? (() => Date.now());
    this.random = opts.random ?? Math.random;
    this.order = transportOrder(opts.transports);
    // a runtime without WebSocket (Node 20 without --experimental-websocket) cannot open
    // one: trying it first said `websocket connecting` for nothing, and probing it from
    // SSE every climb said the same `sse live` again (a WebSocket-only order keeps it, so
    // its failure is still said)
    if (typeof this.env.WebSocket !== 'function' && this.order.length > 1) {
      this.order = this.order.filter((t) => t !== 'websocket');
    }
    this.cursor = opts.cursor ?? null;
    this.rooms = [...(opts.rooms ?? [])];
    this.welcomeTimeoutMs = opts.welcomeTimeoutMs ?? 3000;
    // nothing at all for this long on a live WebSocket or SSE stream: the path is dead
    // (the server writes once per 15 s ping interval at least)
    this.idleTimeoutMs = opts.idleTimeoutMs ?? 40000;
    this.pollTimeout = opts.pollTimeout ?? 25;
    this.retryBaseMs = opts.retryBaseMs ?? 500;
    this.retryCapMs = opts.retryCapMs ?? 15000;
    this.climbBaseMs = opts.climbBaseMs ?? 5000;
    this.climbCapMs = opts.climbCapMs ?? 30000;
    this.stableMs = opts.stableMs ?? 30000;
    this.deathWindowMs = opts.deathWindowMs ?? 60000;
    this.maxDeaths = opts.maxDeaths ?? 3;
    this.onEvents = opts.onEvents ?? (() => {});
    this.onStatus = opts.onStatus ?? (() => {});
    this.onReset = opts.onReset ?? (() => {});
    this.onError = opts.onError ?? (() => {});
    this.onWelcome = opts.onWelcome ?? (() => {});
    this.onRoom = opts.onRoom ?? (() => {});
    this.onRoomRefused = opts.onRoomRefused ?? (() => {});

    this.level = Math.max(0, this.order.indexOf(opts.initial ?? this.order[0]));
    // the level last live (at first, the one we start on): where a round of retries
    // begins after the server was away, so its return is met on what worked before
    this.home = this.level;
    this.conn = null; // the connection that feeds us
    this.probe = null; // a higher transport being tried while `conn` keeps feeding
    this.state = 'offline';
    this.running = false;
    this.paused = false;
    this.failures = 0; // consecutive rounds in which every transport failed to open
    this.deaths = []; // times the live connection died, for "dies repeatedly"
    this.climbAttempt = 0;
    this.timers = { welcome: null, retry: null, climb: null, probeWelcome: null };
    this.lastEventAt = null;
    this.liveSince = null;
    this.stoppedBy = null;
    this.sink = this.makeSink();
  }

  get transport() {
    return this.order[this.level];
  }

  status() {
    return {
      transport: this.transport, state: this.state, paused: this.paused, cursor: this.cursor,
      lastEventAt: this.lastEventAt, probing: this.probe ? this.probe.name : null,
      stoppedBy: this.stoppedBy,
    };
  }

  setState(state) {
    this.state = state;
    this.onStatus(this.status());
  }

  start() {
    if (this.running) return;
    this.running = true;
    this.paused = false;
    this.stoppedBy = null;
    this.climbAttempt = 0;
    // as after an outage: from the transport last live, with a fresh count of failures
    // (a stop() in the middle of one left the level and the count where they were)
    this.failures = 0;
    this.level = this.home;
    this.open();
  }

  /** Close everything for good (logout, auth lost). */
  stop(reason = null) {
    this.running = false;
    this.stoppedBy = reason;
    this.teardown();
    this.setState('offline');
  }

  /** Tab hidden and nobody watching: drop the connection, keep the cursor. */
  pause() {
    if (!this.running || this.paused) return;
    this.paused = true;
    this.teardown();
    this.setState('offline');
  }

  /** Visible again: reconnect on the transport that worked last, from the cursor. */
  resume() {
    if (!this.running || !this.paused) return;
    this.paused = false;
    this.failures = 0;
    this.level = this.home; // a pause in an outage may have left us on a lower level
    this.open();
  }

  /** Rooms changed (and maybe the cursor, after an overview reload): reconnect. */
  restart({ rooms, cursor } = {}, { quiet = false } = {}) {
    if (rooms) this.rooms = [...rooms];
    if (cursor !== undefined) this.cursor = cursor;
    if (!this.running || this.paused) return;
    this.teardown();
    this.failures = 0;
    this.level = this.home; // live, the two are one; in an outage, from the top again
    this.open({ quiet });
  }

  /**
   * A refreshed token: a live WebSocket takes it in an `auth` frame; a waiting poll
   * asks again with it; an SSE stream (or a WebSocket not yet welcomed) holds the old
   * one in its request, so it reconnects from the cursor before that one runs out.
   * Without a connection, the next open reads the new token anyway.
   */
  renewToken(token) {
    if (!this.running || this.paused) return;
    if (this.conn?.name === 'polling') {
      this.conn.renew();
    } else if (this.conn && !this.send({ type: 'auth', token })) {
      // drops a probe too: the next climb opens it with the new token. A planned
      // reconnect, not an outage: a live page does not flicker to 'connecting'
      this.restart({}, { quiet: this.state === 'live' });
      return;
    }
    this.reprobe();
  }

  /** A probe opened with the old token would be promoted holding it: probe afresh. */
  reprobe() {
    const probe = this.probe;
    if (!probe) return;
    probe.close();
    this.probe = null;
    this.clear('probeWelcome');
    this.probeNext(this.order.indexOf(probe.name));
  }

  /** Send a frame on the WebSocket (e.g. a refreshed token); false when not on WS. */
  send(frame) {
    if (this.conn && this.conn.name === 'websocket' && this.state === 'live') {
      this.conn.send(frame);
      return true;
    }
    return false;
  }

  teardown() {
    for (const key of Object.keys(this.timers)) this.clear(key);
    if (this.conn) this.conn.close();
    if (this.probe) this.probe.close();
    this.conn = null;
    this.probe = null;
    this.liveSince = null;
  }

  clear(key) {
    if (this.timers[key] !== null) {
      this.env.clearTimeout(this.timers[key]);
      this.timers[key] = null;
    }
  }

  schedule(key, ms, fn) {
    this.clear(key);
    this.timers[key] = this.env.setTimeout(() => {
      this.timers[key] = null;
      fn();
    }, ms);
  }

  connect(name) {
    return new CONNECTIONS[name](this.env, this.sink, {
      cursor: this.cursor, rooms: this.rooms, pollTimeout: this.pollTimeout,
      getCursor: () => this.cursor, idleMs: this.idleTimeoutMs,
    });
  }

  /** Connect on the current transport; `quiet`: keep the state until it answers. */
  open({ quiet = false } = {}) {
    if (!this.running || this.paused) return;
    this.clear('retry');
    const name = this.transport;
    this.liveSince = null;
    if (!quiet) this.setState('connecting');
    const conn = this.connect(name);
    this.conn = conn;
    if (name !== 'polling') {
      // up means `welcome`, not onopen: a blocked upgrade or a held stream can look open
      this.schedule('welcome', this.welcomeTimeoutMs, () => {
        if (this.conn === conn && !conn.welcomed) {
          conn.close();
          this.sink.closed(conn, { welcomed: false, kind: 'transport', error: 'no welcome' }, true);
        }
      });
    }
  }

  makeSink() {
    return {
      welcome: (conn, info) => this.handleWelcome(conn, info),
      events: (conn, list, lastId) => this.handleEvents(conn, list, lastId),
      reset: (conn, lastId) => this.handleReset(conn, lastId),
      error: (conn, info) => this.handleError(conn, info),
      closed: (conn, info, forced = false) => this.handleClosed(conn, info, forced),
      room: (conn, kind, room) => {
        if (conn === this.conn) this.onRoom(kind, room);
      },
    };
  }

  handleWelcome(conn, info) {
    if (conn === this.probe) {
      this.promote(conn);
    } else if (conn !== this.conn) {
      return;
    }
    this.clear('welcome');
    if (!this.cursor && info.lastId) this.cursor = info.lastId;
    this.failures = 0;
    this.home = this.level;
    this.liveSince = this.now();
    this.onWelcome({ transport: conn.name, rooms: info.rooms ?? [], lastId: info.lastId });
    if (conn !== this.conn) return; // the welcome's handler stopped it
    this.setState('live');
    if (this.level > 0) this.scheduleClimb();
    else this.clear('climb');
  }

  /** A probe said welcome: it becomes the connection, the old one is dropped. */
  promote(probe) {
    const old = this.conn;
    this.clear('probeWelcome');
    this.clear('retry'); // the old transport may have been waiting to reconnect
    this.clear('welcome');
    this.probe = null;
    this.conn = probe;
    this.level = this.order.indexOf(probe.name);
    this.deaths = [];
    if (old) old.close();
  }

  handleEvents(conn, list, lastId = null) {
    if (conn !== this.conn || !this.running) return;
    const fresh = [];
    for (const ev of list) {
      // ids are totally ordered: anything at or below the cursor was delivered already
      if (compareIds(ev.id, this.cursor) <= 0) continue;
      this.cursor = ev.id;
      fresh.push(ev);
    }
    // a poll answer's last_id is the cursor to continue from even when it brought nothing
    if (lastId && compareIds(lastId, this.cursor) > 0) this.cursor = lastId;
    if (fresh.length) {
      this.lastEventAt = this.now();
      this.onEvents(fresh, this.cursor);
      this.onStatus(this.status());
    } else if (lastId) {
      this.onEvents([], this.cursor);
    }
  }

  handleReset(conn, lastId) {
    if (conn !== this.conn || !this.running) return;
    // our cursor is gone (trimmed, or the stream was reset): continue from the head
    this.cursor = lastId;
    this.onReset(lastId);
  }

  handleError(conn, info) {
    if (conn !== this.conn && conn !== this.probe) return;
    if (AUTH_CODES.has(info.code)) {
      this.onError({ ...info, kind: 'auth', transport: conn.name });
      this.stop('auth');
      return;
    }
    if (conn === this.conn) this.onError({ ...info, kind: 'frame', transport: conn.name });
  }

  handleClosed(conn, info, forced) {
    if (conn === this.probe) {
      this.probe = null;
      this.clear('probeWelcome');
      this.probeNext(this.order.indexOf(conn.name) + 1);
      // no further probe: say so, or the last status keeps naming the one that failed
      if (!this.probe) this.onStatus(this.status());
      return;
    }
    if (conn !== this.conn || !this.running) return;
    if (!forced) this.clear('welcome');
    this.conn = null;
    if (info.kind === 'auth') {
      this.onError({ ...info, transport: conn.name });
      this.stop('auth');
      return;
    }
    const room = info.kind === 'fatal' ? refusedRoom(info, this.rooms) : null;
    if (room !== null && this.rooms.length > 1) {
      // one room refused (a join, or a room the token lost): as a WebSocket does, say
      // so once and carry on with the others; only none left is fatal
      this.rooms = this.rooms.filter((r) => r !== room);
      this.onRoomRefused(room);
      this.onError({ ...info, kind: 'frame', transport: conn.name });
      this.open();
      return;
    }
    if (info.kind === 'fatal') {
      this.onError({ ...info, transport: conn.name });
      this.stop('refused');
      return;
    }
    const now = this.now();
    if (info.welcomed) {
      const lived = this.liveSince === null ? 0 : now - this.liveSince;
      this.liveSince = null;
      if (lived >= this.stableMs) {
        this.deaths = [];
        if (this.level === 0) this.climbAttempt = 0;
      }
      this.deaths = this.deaths.filter((t) => now - t < this.deathWindowMs);
      this.deaths.push(now);
      if (this.deaths.length >= this.maxDeaths && this.level < this.order.length - 1) {
        this.fallBack();
        return;
      }
      // died after being live: reconnect where we were, quickly but jittered
      this.setState('connecting');
      this.schedule('retry', backoff(this.deaths.length - 1, this.retryBaseMs, this.retryCapMs,
        this.random), () => this.open());
      return;
    }
    // could not open (refused, timed out without welcome, stream held back)
    if (this.level < this.order.length - 1) {
      this.fallBack();
      return;
    }
    // Every transport failed to open, the last one too: the server is away (restarting,
    // or an instance behind a proxy stopped), not one transport blocked on the way. The
    // next round starts again on the transport last live (at first, the best one), so a
    // server that comes back is met on WebSocket again, not on polling with a climb to
    // wait for. A transport a proxy blocks fails again on the way down, as it did.
    // Until that round begins the status names the transport that failed last.
    this.failures += 1;
    this.setState(this.failures >= 2 ? 'offline' : 'connecting');
    if (this.failures === 2) this.tellUnreachable(conn, info);
    this.schedule('retry', steadyBackoff(this.failures, this.retryBaseMs * 2, this.retryCapMs,
      this.random) + this.retryBaseMs, () => {
      this.level = this.home;
      this.open({ quiet: this.state === 'offline' });
    });
    if (this.home > 0) this.scheduleClimb();
    else this.clear('climb');
  }

  /**
   * Every transport has failed to open, twice on the last: say so once per outage (the
   * client keeps retrying). A browser hides why behind one network error: a server
   * that is down, and an origin its DUALCAST_ALLOWED_ORIGINS does not list (a refused
   * preflight, a refused upgrade), look the same from here.
   */
  tellUnreachable(conn, info) {
    const where = this.env.httpBase || 'this page\'s server';
    this.onError({
      // an HTTP refusal's own code (a string); a WebSocket's close code (1006, a number)
      // says nothing the page can act on
      code: typeof info.code === 'string' && info.code ? info.code : 'unreachable',
      message: info.message ?? `no transport (${this.order.join(', ')}) could connect to `
        + `${where}: the server is down or unreachable, or this page's origin is not in `
        + 'its DUALCAST_ALLOWED_ORIGINS',
      kind: 'transport', transport: conn.name,
      ...(info.status === undefined ? {} : { status: info.status }),
    });
  }

  /**
   * One level down, at once. `failures` (rounds in which every transport failed) is kept:
   * within a round of retries the server is still away until some transport answers.
   * While the page says offline the round goes on quietly (no flicker to connecting).
   */
  fallBack() {
    this.level += 1;
    this.deaths = [];
    this.open({ quiet: this.state === 'offline' });
    this.scheduleClimb();
  }

  scheduleClimb() {
    if (this.level === 0 || this.timers.climb !== null || this.probe || this.paused) return;
    const delay = steadyBackoff(this.climbAttempt, this.climbBaseMs, this.climbCapMs,
      this.random);
    this.climbAttempt += 1;
    this.schedule('climb', delay, () => this.probeNext(0));
  }

  /** Try the transports above the current one, best first; a welcome promotes the probe. */
  probeNext(from) {
    if (!this.running || this.paused || this.probe) return;
    if (from >= this.level) {
      this.scheduleClimb(); // nothing better answered this round: try again later
      return;
    }
    const name = this.order[from];
    const probe = this.connect(name);
    this.probe = probe;
    this.onStatus(this.status());
    this.schedule('probeWelcome', this.welcomeTimeoutMs, () => {
      if (this.probe === probe && !probe.welcomed) {
        probe.close();
        this.sink.closed(probe, { welcomed: false, kind: 'transport', error: 'no welcome' }, true);
      }
    });
  }
}

// ---------------------------------------------------------------------------
// The public client.

const EVENT_NAMES = Object.freeze(['event', 'batch', 'state', 'reset', 'error', 'welcome']);
/** How long before a token's `exp` a token function is asked for the next one. */
const REFRESH_LEAD_MS = 60000;
/** After a refresh, an auth refusal this soon means the new token is no better: stop. */
const REFRESH_GRACE_MS = 10000;
/** A refresh ahead of `exp` that failed is tried again this soon (sooner for a short token). */
const REFRESH_RETRY_MS = 5000;
/** A token function that has not answered by then has failed (as the Python client's). */
const TOKEN_TIMEOUT_MS = 10000;
/** The longest setTimeout waits: past it (24.8 days) a timer fires at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** The `exp` claim (seconds) of a JWT, read without checking it (the server checks). */
export function tokenExpiry(token) {
  const exp = tokenClaims(token)?.exp;
  return typeof exp === 'number' && Number.isFinite(exp) ? exp : null;
}

/** A JWT's claims, read without checking them (the server checks); null if not a JWT. */
function tokenClaims(token) {
  if (typeof token !== 'string') return null;
  const part = token.split('.')[1];
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const text = typeof atob === 'function' ? atob(b64)
      : globalThis.Buffer.from(b64, 'base64').toString('binary');
    const claims = JSON.parse(text);
    return claims && typeof claims === 'object' ? claims : null;
  } catch {
    return null;
  }
}

/**
 * `https://host/x/` (or `wss://host/x/`) -> {httpBase: 'https://host/x', wsBase:
 * 'wss://host/x'}; '' = this page.
 */
function bases(url) {
  const here = globalThis.location?.href;
  if (!url && !here) throw new TypeError('Dualcast: a server URL is required outside a page');
  const full = new URL(url || '/', here);
  // a WebSocket URL names the same server: SSE and polling go to its http(s) twin, and
  // wss:// must stay wss:// (it was read as plain ws://, and fetch() refused ws: URLs)
  if (full.protocol === 'ws:' || full.protocol === 'wss:') {
    full.protocol = full.protocol === 'wss:' ? 'https:' : 'http:';
  }
  if (full.protocol !== 'http:' && full.protocol !== 'https:') {
    throw new TypeError(`Dualcast: the server URL must be http(s):// or ws(s)://, not ${url}`);
  }
  const path = full.pathname.replace(/\/+$/, '');
  const httpBase = url ? `${full.origin}${path}` : path;
  const wsBase = `${full.protocol === 'https:' ? 'wss:' : 'ws:'}//${full.host}${path}`;
  return { httpBase, wsBase };
}

/**
 * The `lastEventId` option as a cursor: none (or '') = live from now; a stream id, or `0`
 * for the oldest retained event. Anything else is a TypeError: the server refuses it
 * (`bad_cursor`), and on a WebSocket a browser shows that refusal as a bare network
 * error, so a client on WebSocket alone retried for ever and said 'unreachable'.
 */
function startCursor(lastEventId) {
  if (lastEventId === undefined || lastEventId === null || lastEventId === '') return null;
  const cursor = String(lastEventId);
  if (!parseId(cursor)) {
    throw new TypeError(`Dualcast: lastEventId ${JSON.stringify(cursor).slice(0, 80)} is not a `
      + 'stream id (like 1732550000000-0, or 0 for the oldest retained event)');
  }
  return cursor;
}

/**
 * The `rooms` option (and setRooms' list) as room names, in order, each once. A string is
 * a TypeError, as is a name that is empty or holds a comma: `rooms: 'ops'` asked for o, p
 * and s, and `rooms: ['']` went out as `rooms=`, no room named, which joins every room the
 * token allows instead of the one meant.
 */
function roomList(rooms) {
  if (rooms === undefined || rooms === null) return [];
  if (typeof rooms === 'string' || typeof rooms[Symbol.iterator] !== 'function') {
    throw new TypeError('Dualcast: rooms must be a list of room names, not a single string');
  }
  const names = [...new Set(rooms)];
  for (const name of names) {
    if (typeof name !== 'string' || !name.trim() || name.includes(',')) {
      throw new TypeError(`Dualcast: rooms: ${String(JSON.stringify(name)).slice(0, 80)} is no room name`);
    }
  }
  return names;
}

/**
 * A live feed of a dualcast server's events: `new Dualcast(url, options)`, then
 * `on('event', fn)` and `start()`. Each event is delivered once, in stream order, on
 * whichever transport works (see the top of this file). Options:
 *   token        a string, or an async function returning one; a function is called
 *                again a minute before the token's `exp` and after an auth refusal
 *   rooms        rooms to join (none: the server's default for the token)
 *   lastEventId  the cursor to resume from (`0` = from the oldest retained event)
 *   transports   order or subset of 'websocket', 'sse', 'polling' ('websocket' is left
 *                out where the runtime has no WebSocket, unless it is the only one)
 * and, for tests and tuning, anything TransportManager takes (WebSocket, fetch,
 * setTimeout, clearTimeout, now, random, welcomeTimeoutMs, climbBaseMs, ...).
 */
export class Dualcast {
  constructor(url = '', options = {}) {
    const { token, rooms, lastEventId, transports, ...rest } = options;
    this.listeners = new Map(EVENT_NAMES.map((name) => [name, new Set()]));
    this.tokenSource = typeof token === 'function' ? token : null;
    this.token = typeof token === 'string' && token ? token : null;
    this.rooms = roomList(rooms);
    this.joined = null; // the rooms the last welcome named
    this.pending = new Set(); // joins sent on the WebSocket and not yet confirmed
    // join/leave calls made while the rooms are the server's default and not yet known
    // (before the first welcome): applied to the rooms that welcome names
    this.deferred = [];
    this.refreshTimer = null;
    this.refreshedAt = null;
    this.lastStateKey = null;
    this.running = false;
    this.generation = 0; // bumps on stop: a token fetched for an older start is dropped
    const setT = rest.setTimeout ?? globalThis.setTimeout.bind(globalThis);
    const clearT = rest.clearTimeout ?? globalThis.clearTimeout.bind(globalThis);
    this.timer = { set: setT, clear: clearT };
    this.now = rest.now ?? (() => Date.now());
    this.manager = new TransportManager({
      ...bases(url),
      ...rest,
      token: () => this.token,
      cursor: startCursor(lastEventId),
      rooms: this.rooms,
      transports,
      onEvents: (list, cursor) => this.deliver(list, cursor),
      onStatus: (status) => {
        this.stateChanged(status);
        if (status.state === 'live' && this.deferred.length && this.joined !== null) {
          for (const [kind, room] of this.deferred.splice(0)) this[kind](room);
        }
      },
      onReset: (lastId) => this.emit('reset', { lastId }),
      onError: (info) => this.failed(info),
      onWelcome: (info) => {
        if (this.rooms.length && !info.rooms.length && info.transport !== 'polling') {
          // Every room asked for was refused: stop, as SSE and polling do on their 403,
          // rather than stay on public events and widen to the token's rooms next connect.
          const asked = this.rooms.join(', ');
          this.stop();
          this.emit('error', {
            code: 'forbidden_room', kind: 'fatal', transport: info.transport,
            message: `none of the rooms asked for may be joined (${asked})`,
          });
          return;
        }
        this.joined = [...info.rooms];
        this.pending.clear();
        // what the server granted is what a reconnect asks for (a refused room would
        // turn an SSE or poll connect into a 403)
        if (this.rooms.length && info.transport !== 'polling') this.setRoomsQuietly(info.rooms);
        this.emit('welcome', info);
      },
      onRoom: (kind, room) => {
        if (kind === 'joined') this.pending.delete(room);
        // on the server's default rooms, a refreshed token may add some (`joined` unasked):
        // a later join or leave starts from them too, not from the welcome's list alone
        if (kind === 'joined' && !this.rooms.length && this.joined && !this.joined.includes(room)) {
          this.joined = [...this.joined, room];
        }
        // `left` answers our leave, or says a refreshed token may no longer read the
        // room: not asked for again (an SSE or poll reconnect would be refused for it)
        if (kind === 'left') {
          if (this.joined) this.joined = this.joined.filter((r) => r !== room);
          if (this.rooms.includes(room)) this.setRoomsQuietly(this.rooms.filter((r) => r !== room));
        }
      },
      onRoomRefused: (room) => this.setRoomsQuietly(this.rooms.filter((r) => r !== room)),
    });
  }

  /** 'websocket' | 'sse' | 'polling': the transport in use (or being tried). */
  get transport() {
    return this.manager.transport;
  }

  /** 'connecting' | 'live' | 'offline'. */
  get state() {
    return this.manager.state;
  }

  /** The cursor: the id of the last event delivered (or the server's head when live). */
  get lastEventId() {
    return this.manager.cursor;
  }

  /** Listen: 'event' | 'batch' | 'state' | 'reset' | 'error' | 'welcome'. Returns an off(). */
  on(name, fn) {
    const set = this.listeners.get(name);
    if (!set) throw new TypeError(`Dualcast: no such event '${name}' (${EVENT_NAMES.join(', ')})`);
    set.add(fn);
    return () => set.delete(fn);
  }

  off(name, fn) {
    this.listeners.get(name)?.delete(fn);
  }

  emit(name, value) {
    for (const fn of [...this.listeners.get(name)]) {
      try {
        fn(value);
      } catch (err) {
        // a listener's bug must not lose the rest of the batch or stop the feed
        if (typeof globalThis.reportError === 'function') globalThis.reportError(err);
        else globalThis.console?.error(err);
      }
    }
  }

  /** 'state' fires when the transport, the state, a pause or a probe changes. */
  stateChanged(status) {
    const key = `${status.transport} ${status.state} ${status.paused} ${status.probing}`;
    if (key === this.lastStateKey) return;
    this.lastStateKey = key;
    this.emit('state', status);
  }

  deliver(list, cursor) {
    this.emit('batch', { events: list, lastEventId: cursor });
    for (const ev of list) this.emit('event', ev);
  }

  /** Connect (asking the token function first, if there is one). Returns this. */
  start() {
    if (this.running) return this;
    this.running = true;
    const generation = this.generation;
    if (this.tokenSource && !this.usableToken()) {
      this.startWithFreshToken(generation);
    } else {
      this.scheduleRefresh();
      this.manager.start();
    }
    return this;
  }

  /**
   * Ask the token function, then connect. The state says `connecting` meanwhile: a slow
   * token endpoint is part of connecting, not an outage (it said `offline`, with no
   * `state` event at all, for as long as the function took).
   */
  startWithFreshToken(generation) {
    this.manager.setState('connecting');
    this.refresh(generation).then((ok) => {
      if (ok && this.running && generation === this.generation) this.manager.start();
    });
  }

  /** Close everything; the cursor stays, so start() resumes where this left off. */
  stop() {
    this.running = false;
    this.generation += 1;
    this.cancelRefresh();
    this.manager.stop(null);
    return this;
  }

  /** Drop the connection but keep the cursor (e.g. a hidden page); resume() reconnects. */
  pause() {
    this.manager.pause();
  }

  resume() {
    this.manager.resume();
  }

  /** Join a room: a `join` frame on a live WebSocket, else a reconnect with the new set. */
  join(room) {
    if (this.defer('join', room)) return;
    const current = this.roomSet();
    if (current.includes(room)) return;
    this.rooms = [...current, room];
    if (this.manager.send({ type: 'join', room })) {
      this.pending.add(room);
      this.manager.rooms = [...this.rooms];
    } else {
      this.manager.restart({ rooms: this.rooms });
    }
  }

  setRoomsQuietly(rooms) {
    this.rooms = [...rooms];
    this.manager.rooms = [...rooms];
  }

  leave(room) {
    if (this.defer('leave', room)) return;
    const current = this.roomSet();
    if (!current.includes(room)) return;
    this.rooms = current.filter((r) => r !== room);
    if (!this.manager.send({ type: 'leave', room })) this.manager.restart({ rooms: this.rooms });
    else this.manager.rooms = [...this.rooms];
  }

  /** Replace the rooms (none: the server's default) and reconnect from the cursor. */
  /**
   * No rooms asked for and none named by a welcome yet: the server's default set is
   * unknown, so a join would replace it (`rooms=<that one>`: user-<sub> and the token's
   * rooms dropped) and a leave had nothing to leave. Keep the call for the welcome.
   */
  defer(kind, room) {
    if (this.rooms.length || this.joined !== null) return false;
    this.deferred.push([kind, room]);
    return true;
  }

  setRooms(rooms) {
    const names = roomList(rooms);
    this.deferred = [];
    this.rooms = names;
    this.joined = null;
    this.manager.restart({ rooms: this.rooms });
  }

  /** What the manager reports (transport, state, cursor, probing, lastEventAt, ...). */
  status() {
    return this.manager.status();
  }

  /** The rooms a join/leave starts from: the ones asked for, else what welcome named. */
  roomSet() {
    if (this.rooms.length) return [...this.rooms];
    return [...(this.joined ?? [])];
  }

  failed(info) {
    // defaults after the spread: a refusal without a JSON body carries code: undefined
    const error = {
      ...info, code: info.code ?? 'error',
      message: info.message ?? (info.status ? `HTTP ${info.status}` : ''),
    };
    if (info.kind === 'frame' && REQUEST_CODES.has(info.code) && this.pending.size) {
      // a join the server refused: the room named in the message, else the oldest
      const refused = [...this.pending].find((r) => String(info.message).includes(r))
        ?? [...this.pending][0];
      this.pending.delete(refused);
      this.setRoomsQuietly(this.rooms.filter((r) => r !== refused));
    }
    const recent = this.refreshedAt !== null && this.now() - this.refreshedAt < REFRESH_GRACE_MS;
    if (info.kind === 'auth' && this.tokenSource && this.running && !recent) {
      // the manager has stopped itself: ask for a fresh token and carry on from the cursor
      this.startWithFreshToken(this.generation);
      return;
    }
    if (info.kind === 'auth' || info.kind === 'fatal') this.running = false;
    // a refused token is not offered again: the next start() asks the function anew
    if (info.kind === 'auth' && this.tokenSource) this.token = null;
    this.emit('error', error);
  }

  /** A token to connect with: one is held and its `exp` (if it has one) is ahead. */
  usableToken() {
    if (!this.token) return false;
    const exp = tokenExpiry(this.token);
    return exp === null || exp * 1000 > this.now();
  }

  /**
   * Ask the token function for a token; false (and an `error`) if it failed. A refresh
   * ahead of `exp` that fails (`ahead`: the app's token endpoint had a blip) is tried
   * again while the token held is still good; only a token that is gone stops the feed.
   */
  async refresh(generation, ahead = false) {
    let token;
    let bound = null;
    try {
      // A function that never answered (a fetch hung on a dead connection) held the
      // client in `connecting` for good, or let the token run out without a word.
      const late = new Promise((_, fail) => {
        bound = this.timer.set(() => fail(new Error(
          `the token function did not answer within ${TOKEN_TIMEOUT_MS / 1000} s`)),
        TOKEN_TIMEOUT_MS);
      });
      token = await Promise.race([this.tokenSource(), late]);
      // anything but a token (an {access_token} object, undefined from a forgotten
      // return) was taken for "no token": the page went on anonymously, public events
      // only, and nothing said why
      if (typeof token !== 'string' || !token) {
        const what = token === null ? 'null' : typeof token === 'string' ? 'an empty string'
          : typeof token;
        throw new TypeError(`the token function returned ${what}, not a token string`);
      }
    } catch (err) {
      if (generation !== this.generation) return false;
      if (ahead && this.running && this.usableToken()) {
        const left = tokenExpiry(this.token) * 1000 - this.now();
        this.scheduleRefresh(Math.max(1000, Math.min(REFRESH_RETRY_MS, left / 2)));
        return false;
      }
      this.running = false;
      // a code of the client's own: the server never sends it
      this.emit('error', {
        code: 'token_unavailable', message: String(err?.message ?? err), kind: 'auth',
      });
      this.manager.stop('auth');
      return false;
    } finally {
      if (bound !== null) this.timer.clear(bound);
    }
    if (generation !== this.generation) return false;
    const previous = this.token;
    this.token = token;
    this.refreshedAt = this.now();
    this.scheduleRefresh();
    if (previous && this.token !== previous) {
      // a WebSocket refuses an `auth` frame for another subject (invalid_token, and the
      // client stopped): a token for someone else (the app switched users) reconnects
      if (tokenClaims(previous)?.sub !== tokenClaims(this.token)?.sub) this.manager.restart({});
      else this.manager.renewToken(this.token);
    }
    return true;
  }

  /** Ask the token function again a while before the token's `exp` (or after `wait`). */
  scheduleRefresh(wait = null) {
    this.cancelRefresh();
    if (!this.tokenSource || !this.running) return;
    const exp = tokenExpiry(this.token);
    if (exp === null) return;
    const left = exp * 1000 - this.now();
    const delay = wait ?? Math.max(1000, left - Math.min(REFRESH_LEAD_MS, left / 2));
    const generation = this.generation;
    // a token good for more than 24.8 days (`--ttl 30d`): a timer that long fired at once,
    // and the token function was asked again and again in a tight loop; such a wait is
    // taken in steps of the longest timer
    const step = delay > MAX_TIMER_MS;
    this.refreshTimer = this.timer.set(() => {
      this.refreshTimer = null;
      if (!this.running || generation !== this.generation) return;
      if (step) this.scheduleRefresh();
      else this.refresh(generation, true);
    }, Math.min(delay, MAX_TIMER_MS));
  }

  cancelRefresh() {
    if (this.refreshTimer !== null) this.timer.clear(this.refreshTimer);
    this.refreshTimer = null;
  }
}
