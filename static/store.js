// The store: folds events into the state the panels draw, dedupes by stream id and
// carries the cursor. It starts from /api/overview (the server's fold of the retained
// events) and applies live events on top; on `reset` it loads the overview again.
// No DOM code: fetch is injected so node tests can drive it.

import { compareIds, eventTime, maxId } from './dualcast.js';

export const LOG_LIMIT = 1000;
export const USAGE_LIMIT = 50;
export const RPM_MINUTES = 30;
/** Requests per minute are counted for minutes this close to now (either side). */
const RPM_KEEP_MS = 24 * 60 * 60000;
const SEEN_LIMIT = 20000;
const HISTORY_MS = 15 * 60 * 1000;
/**
 * At most this many global metrics are kept for the deltas, whatever their timestamps:
 * a producer that stamps every update with the same time (the start of its day), or one
 * update far in the future, would otherwise keep each one for as long as the page is open.
 */
const HISTORY_LIMIT = 2000;
/**
 * A session with no news (its session_created, or a usage_log_added of its own) for
 * this long leaves the live table and the card: a producer that died (a killed demo)
 * never sends its session_ended. Time comes from the events' stream ids (the overview's
 * sessions: their createdAt), so a page opened later ages the same sessions out at once.
 */
export const SESSION_IDLE_MS = 10 * 60 * 1000;
const QUIET_LIMIT = 1000;
/**
 * Per-user metrics kept, the most recently updated: an admin's page sees every user's,
 * and a page open for days would keep each user it ever saw. The stream holds 10,000
 * entries by default, so the overview of a fresh page never names more users than this.
 */
export const USERS_LIMIT = 10000;

/**
 * Text for any value a producer wrote. Never throws: String() does on an object whose own
 * `toString` key is not a function (`{"toString": 1}` is valid JSON), and so do template
 * literals, Number(), Date.parse() and property keys built from it.
 */
export function text(value) {
  if (typeof value === 'string') return value;
  if (value === null || value === undefined) return '';
  if (typeof value === 'object') {
    try {
      return JSON.stringify(value) ?? '';
    } catch {
      return '?';
    }
  }
  return String(value);
}

/** A number from a value a producer wrote (a number or a numeric string), else NaN. */
export function toNumber(value) {
  if (typeof value === 'number') return value;
  if (typeof value === 'string' && value.trim() !== '') return Number(value);
  return NaN;
}

/** The key of a session, provider or user id (as text), or null when there is none. */
export function keyOf(value) {
  return value === null || value === undefined ? null : text(value);
}

/** Normalise the many spellings of a circuit state to closed / half-open / open. */
export function circuitState(value) {
  const v = text(value).toLowerCase().replace(/[\s_]+/g, '-');
  if (v === 'half-open' || v === 'halfopen') return 'half-open';
  if (v === 'open' || v === 'closed') return v;
  return 'unknown';
}

/** Epoch ms of a time a producer wrote (ms, s or ISO 8601), or null. */
export function toMs(value) {
  const n = toNumber(value);
  if (Number.isFinite(n) && n > 0) return n < 1e12 ? n * 1000 : n;
  const parsed = typeof value === 'string' ? Date.parse(value) : NaN;
  return Number.isFinite(parsed) ? parsed : null;
}

function minuteOf(ts) {
  return Math.floor(ts / 60000) * 60000;
}

/**
 * A map keyed by ids a producer wrote, with no prototype: `__proto__` or `constructor`
 * is a key like any other (on a plain object the first would replace its prototype and
 * never be listed), as in the overview the server sends.
 */
function keyed(from = null) {
  const out = Object.create(null);
  if (from && typeof from === 'object') Object.assign(out, from);
  return out;
}

function emptyState() {
  return {
    lastId: null, // the cursor: the newest id folded into this state
    metrics: null, // latest global metrics_update data (no userId)
    metricsByUser: keyed(),
    userOrder: new Map(), // user key -> true, least recently updated first
    metricsHistory: [], // [{at, data}] of the global metrics, for deltas
    providers: keyed(),
    sessions: keyed(),
    sessionNews: new Map(), // session id -> ms of its latest news
    quiet: new Map(), // sessions aged out (no news for the idle time), id -> data
    sessionsKnown: false, // true once sessions are followed: the card then counts them
    usage: [], // newest first
    rpm: new Map(), // minute epoch ms -> count of usage_log_added
    log: [], // newest first: {id, event, data, ts}
    counts: { events: 0 },
  };
}

export class Store {
  /**
   * @param {{fetch?: Function, overviewUrl?: string, now?: () => number}} opts
   */
  constructor(opts = {}) {
    this.fetch = opts.fetch ?? (globalThis.fetch ? globalThis.fetch.bind(globalThis) : null);
    this.overviewUrl = opts.overviewUrl ?? '/api/overview';
    this.now = opts.now ?? (() => Date.now());
    this.logLimit = opts.logLimit ?? LOG_LIMIT;
    this.state = emptyState();
    this.seen = new Set();
    this.seenOrder = [];
    this.listeners = new Set();
    this.loading = null;
    this.during = null;
  }

  get cursor() {
    return this.state.lastId;
  }

  /** Listen for changes: fn({type: 'overview'|'events', events?}). Returns an unsubscribe. */
  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  emit(change) {
    for (const fn of this.listeners) fn(change, this.state);
  }

  remember(id) {
    if (this.seen.has(id)) return false;
    this.seen.add(id);
    this.seenOrder.push(id);
    if (this.seenOrder.length > SEEN_LIMIT) {
      for (const old of this.seenOrder.splice(0, this.seenOrder.length - SEEN_LIMIT)) {
        this.seen.delete(old);
      }
    }
    return true;
  }

  /** Fetch /api/overview and replace the folded state with it (first load and `reset`). */
  async reload() {
    if (this.loading) return this.loading;
    // events that arrive while the overview is on its way: refolded on top of it if newer
    this.during = [];
    this.loading = (async () => {
      try {
        const response = await this.fetch(this.overviewUrl, {
          cache: 'no-store', credentials: 'same-origin', headers: { Accept: 'application/json' },
        });
        if (!response.ok) {
          const err = new Error(`overview: HTTP ${response.status}`);
          err.status = response.status;
          throw err;
        }
        const overview = await response.json();
        const during = this.during;
        this.during = null;
        this.applyOverview(overview);
        for (const ev of during) {
          if (compareIds(ev.id, this.state.lastId) > 0) {
            this.fold(ev);
            this.state.lastId = ev.id;
          }
        }
        return this.state;
      } finally {
        this.during = null;
        this.loading = null;
      }
    })();
    return this.loading;
  }

  /** Replace the folded state with an overview (shape: static/README.md). */
  applyOverview(ov) {
    const log = this.state.log;
    const next = emptyState();
    next.log = log; // the log is what this page saw: keep it across reloads
    next.counts = this.state.counts;
    next.lastId = ov.last_id ?? null;
    if (ov.metrics && typeof ov.metrics === 'object' && Object.keys(ov.metrics).length) {
      next.metrics = ov.metrics;
      next.metricsHistory.push({ at: this.metricTime(ov.metrics), data: ov.metrics });
    }
    next.metricsByUser = keyed(ov.metrics_by_user);
    for (const user of Object.keys(next.metricsByUser)) next.userOrder.set(user, true);
    next.providers = keyed(ov.providers);
    next.sessions = keyed(ov.sessions);
    // a session in the overview was created at or before the last event it folds: a
    // createdAt past that (a clock ahead, microseconds read as ms) must not keep it for ever
    const upTo = eventTime(null, next.lastId) ?? this.now();
    for (const [id, session] of Object.entries(next.sessions)) {
      next.sessionNews.set(id, Math.min(toMs(session?.createdAt) ?? upTo, upTo));
    }
    next.sessionsKnown = this.state.sessionsKnown || Object.keys(next.sessions).length > 0;
    const usage = Array.isArray(ov.usage) ? ov.usage : [];
    // the overview lists usage oldest first; we keep newest first
    next.usage = usage.slice(-USAGE_LIMIT).reverse();
    for (const [minute, count] of Array.isArray(ov.requests_per_minute)
      ? ov.requests_per_minute : []) {
      next.rpm.set(Number(minute), Number(count));
    }
    this.state = next;
    // recent usage entries give the log a start; their ids count as seen
    for (const u of usage) this.sessionNewsAt(keyOf(u?.sessionId), eventTime(null, u?.id));
    const fresh = [];
    for (const u of usage) {
      if (typeof u?.id !== 'string' || !this.remember(u.id)) continue;
      const { id, ts, ...data } = u;
      fresh.push({ id, event: 'usage_log_added', data, ts: eventTime(ts, id) });
    }
    if (fresh.length) this.addToLog(fresh);
    this.emit({ type: 'overview', events: fresh.reverse() });
  }

  metricTime(data) {
    return toMs(data?.timestamp) ?? this.now();
  }

  addToLog(events) {
    // events oldest first; the log is newest first
    for (const ev of events) this.state.log.unshift(ev);
    if (this.state.log.length > this.logLimit) this.state.log.length = this.logLimit;
  }

  /**
   * Apply live events (oldest first). Returns the ones that were new to this page.
   * An id seen before is dropped; an id at or below the overview's last_id is logged
   * (this page has not shown it) but not folded again (the overview already counts it).
   */
  applyEvents(events, cursor = null) {
    const fresh = [];
    for (const ev of events) {
      if (!ev || typeof ev.id !== 'string' || !this.remember(ev.id)) continue;
      fresh.push(ev);
      if (this.during) this.during.push(ev);
      if (compareIds(ev.id, this.state.lastId) > 0) {
        this.fold(ev);
        this.state.lastId = ev.id;
      }
    }
    if (cursor && compareIds(cursor, this.state.lastId) > 0) this.state.lastId = cursor;
    if (fresh.length) {
      this.state.counts.events += fresh.length;
      this.addToLog(fresh);
      this.emit({ type: 'events', events: fresh });
    }
    return fresh;
  }

  /** Move the cursor without events (a poll answer that brought nothing). */
  advance(cursor) {
    this.state.lastId = maxId(this.state.lastId, cursor);
  }

  fold(ev) {
    const s = this.state;
    const d = ev.data && typeof ev.data === 'object' ? ev.data : {};
    switch (ev.event) {
      // each rule as the server's overview folds it, so a reload shows what live did
      case 'metrics_update':
        if (d.userId !== undefined && d.userId !== null) {
          const user = text(d.userId);
          s.metricsByUser[user] = d;
          s.userOrder.delete(user);
          s.userOrder.set(user, true);
          while (s.userOrder.size > USERS_LIMIT) {
            const oldest = s.userOrder.keys().next().value;
            s.userOrder.delete(oldest);
            delete s.metricsByUser[oldest];
          }
        } else {
          s.metrics = d;
          this.rememberMetrics(d);
        }
        break;
      case 'provider_status_change': {
        const provider = keyOf(d.providerId);
        // the latest update is the provider's state: a field it leaves out is gone
        if (provider !== null) s.providers[provider] = d;
        break;
      }
      case 'session_created': {
        const session = keyOf(d.sessionId);
        if (session !== null) {
          s.sessions[session] = d;
          s.quiet.delete(session);
          s.sessionNews.set(session, eventTime(null, ev.id) ?? this.now());
        }
        s.sessionsKnown = true;
        break;
      }
      case 'session_ended': {
        const session = keyOf(d.sessionId);
        if (session !== null) {
          delete s.sessions[session];
          s.quiet.delete(session);
          s.sessionNews.delete(session);
        }
        s.sessionsKnown = true;
        break;
      }
      case 'usage_log_added': {
        const session = keyOf(d.sessionId);
        if (s.quiet.has(session)) { // news after all: it is live again
          s.sessions[session] = s.quiet.get(session);
          s.quiet.delete(session);
        }
        this.sessionNewsAt(session, eventTime(null, ev.id) ?? this.now());
        s.usage.unshift({ ...d, id: ev.id, ts: ev.ts });
        if (s.usage.length > USAGE_LIMIT) s.usage.length = USAGE_LIMIT;
        // minutes within a day of now only: a producer's timestamps may be anywhere, and
        // one key per far-off minute would grow for as long as the page is open
        const minute = minuteOf(eventTime(ev.ts, ev.id) ?? this.now());
        const oldest = minuteOf(this.now()) - RPM_KEEP_MS;
        const newest = minuteOf(this.now()) + RPM_KEEP_MS;
        if (minute >= oldest && minute <= newest) s.rpm.set(minute, (s.rpm.get(minute) ?? 0) + 1);
        if (s.rpm.size > 2 * RPM_KEEP_MS / 60000 + 1) {
          for (const key of s.rpm.keys()) if (key < oldest || key > newest) s.rpm.delete(key);
        }
        break;
      }
      default:
        break;
    }
  }

  /** Add a global metrics update to the history the deltas read (bounded). */
  rememberMetrics(data) {
    const history = this.state.metricsHistory;
    const at = this.metricTime(data);
    const second = Math.floor(at / 1000);
    const n = history.length;
    // many updates in one second: keep its first and its last (deltas look minutes back)
    if (n >= 2 && Math.floor(history[n - 1].at / 1000) === second
      && Math.floor(history[n - 2].at / 1000) === second) {
      history[n - 1] = { at, data };
    } else {
      history.push({ at, data });
    }
    const horizon = at - HISTORY_MS;
    while (history.length > 2 && history[0].at < horizon) history.shift();
    if (history.length > HISTORY_LIMIT) history.splice(0, history.length - HISTORY_LIMIT);
  }

  sessionNewsAt(id, at) {
    const news = this.state.sessionNews;
    if (at === null || id === null || !Object.hasOwn(this.state.sessions, id)) return;
    if (!(news.get(id) >= at)) news.set(id, at);
  }

  /**
   * Move sessions with no news for `idleMs` out of the live ones (into `quiet`).
   * Returns whether any moved, so the caller redraws only then.
   */
  expireSessions(idleMs = SESSION_IDLE_MS, now = this.now()) {
    const s = this.state;
    let moved = false;
    for (const [id, session] of Object.entries(s.sessions)) {
      const news = s.sessionNews.get(id) ?? now;
      if (now - news < idleMs) continue;
      delete s.sessions[id];
      s.sessionNews.delete(id);
      s.quiet.set(id, session);
      moved = true;
    }
    while (s.quiet.size > QUIET_LIMIT) s.quiet.delete(s.quiet.keys().next().value);
    return moved;
  }

  /** The metrics the cards show: global ones, else the caller's own (a non-admin user). */
  currentMetrics(sub = null) {
    const s = this.state;
    if (s.metrics) return s.metrics;
    if (sub !== null) {
      for (const key of [sub, `user-${sub}`, String(sub).replace(/^user-/, '')]) {
        if (s.metricsByUser[key]) return s.metricsByUser[key];
      }
    }
    const users = Object.values(s.metricsByUser);
    return users.length === 1 ? users[0] : null;
  }

  /** Change of a metric over the last `windowMs` (from the history of global updates). */
  delta(field, windowMs = 5 * 60 * 1000) {
    const h = this.state.metricsHistory;
    if (h.length < 2) return null;
    const last = h[h.length - 1];
    let base = h[0];
    for (const entry of h) {
      if (entry.at >= last.at - windowMs) {
        base = entry;
        break;
      }
    }
    if (base === last) base = h[h.length - 2];
    const a = toNumber(base.data?.[field]);
    const b = toNumber(last.data?.[field]);
    if (!Number.isFinite(a) || !Number.isFinite(b)) return null;
    return { value: b - a, since: last.at - base.at };
  }

  /** Requests per minute for the last `minutes` minutes, oldest first: [[minute, count]]. */
  requestsPerMinute(minutes = RPM_MINUTES, now = this.now()) {
    const end = minuteOf(now);
    const out = [];
    for (let m = end - (minutes - 1) * 60000; m <= end; m += 60000) {
      out.push([m, this.state.rpm.get(m) ?? 0]);
    }
    return out;
  }
}
