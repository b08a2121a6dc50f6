// The panels: metric cards, providers, live sessions, the requests-per-minute chart and
// the event log. They read the store's state and write the DOM; nothing else.
// Every event-log row carries data-event-id="<stream id>" (tests rely on it).

import { eventTime } from './dualcast.js';
import { circuitState, text, toMs, toNumber } from './store.js';

const SVG = 'http://www.w3.org/2000/svg';
const nf = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const nf1 = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
const usd = new Intl.NumberFormat(undefined, {
  style: 'currency', currency: 'USD', minimumFractionDigits: 2, maximumFractionDigits: 2,
});
const usdSmall = new Intl.NumberFormat(undefined, {
  style: 'currency', currency: 'USD', minimumFractionDigits: 4, maximumFractionDigits: 4,
});
const timeFmt = new Intl.DateTimeFormat(undefined, {
  hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false,
});
const hmFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', hour12: false });

export const EVENT_TYPES = [
  'session_created', 'session_ended', 'metrics_update', 'provider_status_change',
  'usage_log_added',
];

/**
 * Create an element: h('td', {class: 'x'}, 'text', child). Text is never parsed as HTML,
 * and any value a producer wrote becomes text without throwing (see store.js text()).
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'text') el.textContent = value;
    else el.setAttribute(key, value === true ? '' : text(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : text(child));
  }
  return el;
}

function num(value) {
  const n = toNumber(value);
  return Number.isFinite(n) ? n : null;
}

/** A count as the page shows it ('—' for anything that is not a number). */
function count(value) {
  const n = num(value);
  return n === null ? '—' : nf.format(n);
}

export function money(value) {
  const n = num(value);
  if (n === null) return '—';
  return Math.abs(n) < 1 && n !== 0 ? usdSmall.format(n) : usd.format(n);
}

export function duration(ms) {
  const n = num(ms);
  if (n === null) return '—';
  if (n < 1000) return `${nf.format(n)} ms`;
  if (n < 60000) return `${nf1.format(n / 1000)} s`;
  const m = Math.floor(n / 60000);
  if (m < 60) return `${m} min ${Math.floor((n % 60000) / 1000)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function age(ms) {
  if (ms === null || ms === undefined) return '—';
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function failures(value) {
  const n = num(value) ?? 0;
  return `${nf.format(n)} ${n === 1 ? 'failure' : 'failures'}`;
}

/** One line that says what an event is about, for the log. */
export function summarize(ev) {
  const d = ev.data && typeof ev.data === 'object' ? ev.data : {};
  const has = (k) => d[k] !== undefined && d[k] !== null;
  // every field as text, whatever its type: a template literal throws on some objects
  const t = (k, or = '?') => (has(k) ? text(d[k]) : or);
  switch (ev.event) {
    case 'session_created':
      return `session ${t('sessionId')} · user ${t('userId')} · ${t('providerId')}`
        + `${has('model') ? ` / ${t('model')}` : ''}`;
    case 'session_ended':
      return `session ${t('sessionId')} ended${has('status') ? ` · ${t('status')}` : ''}`
        + `${has('durationMs') ? ` · ${duration(d.durationMs)}` : ''}`
        + `${has('costUsd') ? ` · ${money(d.costUsd)}` : ''}`;
    case 'metrics_update':
      return `${has('userId') ? `user ${t('userId')} · ` : ''}active ${t('activeSessions', '—')}`
        + ` · requests ${count(d.totalRequests)}`
        + ` · ${money(d.totalCost)}`
        + `${has('avgResponseMs') ? ` · avg ${duration(d.avgResponseMs)}` : ''}`;
    case 'provider_status_change':
      return `${has('name') ? t('name') : t('providerId')} → ${t('status')}`
        + ` · circuit ${circuitState(d.circuitState)}`
        + `${has('failureCount') ? ` · ${failures(d.failureCount)}` : ''}`;
    case 'usage_log_added':
      return `${t('userId')} · ${t('model')}`
        + ` · ${count(d.inputTokens ?? 0)} → ${count(d.outputTokens ?? 0)} tok`
        + ` · ${money(d.costUsd)} · ${duration(d.latencyMs)}`
        + `${has('statusCode') ? ` · ${t('statusCode')}` : ''}`;
    default: {
      const text = JSON.stringify(ev.data);
      return text === undefined ? '' : text.length > 160 ? `${text.slice(0, 157)}…` : text;
    }
  }
}

const TRANSPORT_LABEL = { websocket: 'WebSocket', sse: 'SSE', polling: 'Polling' };
/**
 * Rows the provider list draws: a producer may name any number of providers, and
 * thousands of rows redrawn a few times a second would take the whole page down.
 */
export const PROVIDERS_SHOWN = 100;
/** Which providers stay in view when some must go: broken circuits first. */
const CIRCUIT_RANK = { open: 0, 'half-open': 1, unknown: 2, closed: 3 };

export class Dashboard {
  /**
   * @param {Document} doc
   * @param {import('./store.js').Store} store
   */
  constructor(doc, store) {
    this.doc = doc;
    this.store = store;
    this.$ = (id) => doc.getElementById(id);
    this.sub = null;
    this.sessionIdleMs = null; // the age-out the store applies, for the note under the table
    this.rowText = new WeakMap();
    this.filter = { text: '', type: '' };
    this.renderTimer = null;
    this.lastRender = 0;
    this.status = { transport: 'websocket', state: 'connecting', lastEventAt: null };
    this.setupFilter();
    this.setupResize();
  }

  /** Redraw the chart when its box changes size (window resize, layout change). */
  setupResize() {
    let timer = null;
    const redraw = () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        const svg = this.$('rpm-chart');
        if (svg && Math.round(svg.clientWidth) !== svg.viewBox.baseVal?.width) this.renderChart();
      }, 100);
    };
    if (typeof ResizeObserver === 'function' && this.$('rpm-chart')) {
      new ResizeObserver(redraw).observe(this.$('rpm-chart'));
    } else {
      window.addEventListener('resize', redraw);
    }
  }

  setupFilter() {
    const text = this.$('log-filter');
    const type = this.$('log-type');
    if (!text || !type) return;
    for (const name of EVENT_TYPES) type.append(h('option', { value: name }, name));
    const apply = () => {
      this.filter = { text: text.value.trim().toLowerCase(), type: type.value };
      for (const row of this.$('log').children) this.applyFilter(row);
      this.updateLogCount();
    };
    text.addEventListener('input', apply);
    type.addEventListener('change', apply);
  }

  applyFilter(row) {
    const { text, type } = this.filter;
    const ok = (!type || row.dataset.event === type)
      && (!text || (this.rowText.get(row) ?? '').includes(text));
    row.hidden = !ok;
  }

  // ---- store changes -------------------------------------------------------

  /** Whole redraw (first load, overview reload). */
  renderAll() {
    const list = this.$('log');
    list.replaceChildren(...this.store.state.log.map((ev) => this.safeRow(ev)));
    this.updateLogCount();
    this.renderPanels();
  }

  /** New events: rows go in at once; the other panels redraw at most a few times a second. */
  addEvents(events) {
    const list = this.$('log');
    const frag = this.doc.createDocumentFragment();
    for (let i = events.length - 1; i >= 0; i -= 1) frag.append(this.safeRow(events[i]));
    list.prepend(frag);
    const limit = this.store.logLimit;
    while (list.children.length > limit) list.lastElementChild.remove();
    this.updateLogCount();
    this.scheduleRender();
  }

  scheduleRender() {
    if (this.renderTimer !== null) return;
    const wait = Math.max(0, 250 - (Date.now() - this.lastRender));
    this.renderTimer = setTimeout(() => {
      this.renderTimer = null;
      this.renderPanels();
    }, wait);
  }

  renderPanels() {
    this.lastRender = Date.now();
    this.renderCards();
    this.renderProviders();
    this.renderSessions();
    this.renderChart();
  }

  /** A row for any event: whatever a producer wrote must not cost the rest of a batch. */
  safeRow(ev) {
    try {
      return this.logRow(ev);
    } catch {
      const row = h('li', { class: 'ev', 'data-event-id': ev?.id, 'data-event': ev?.event },
        h('time', {}, ''), h('span', { class: 'ev-name' }, String(ev?.event)),
        h('span', { class: 'ev-summary' }, '(cannot be shown)'),
        h('code', { class: 'ev-id', title: 'stream id' }, String(ev?.id)));
      this.rowText.set(row, `${ev?.event} ${ev?.id}`.toLowerCase());
      this.applyFilter(row);
      return row;
    }
  }

  logRow(ev) {
    const ts = eventTime(ev.ts, ev.id);
    const when = ts === null ? null : new Date(ts);
    const row = h('li', {
      class: `ev ev-${String(ev.event).replace(/[^A-Za-z0-9_-]/g, '_')}`,
      'data-event-id': ev.id, 'data-event': ev.event,
    },
    h('time', { datetime: when ? when.toISOString() : null }, when ? timeFmt.format(when) : ''),
    h('span', { class: 'ev-name' }, ev.event),
    h('span', { class: 'ev-summary' }, summarize(ev)),
    h('code', { class: 'ev-id', title: 'stream id' }, ev.id));
    this.rowText.set(row, `${ev.event} ${ev.id} ${JSON.stringify(ev.data)}`.toLowerCase());
    this.applyFilter(row);
    return row;
  }

  updateLogCount() {
    const list = this.$('log');
    const total = list.children.length;
    let shown = 0;
    for (const row of list.children) if (!row.hidden) shown += 1;
    this.$('log-count').textContent = shown === total ? `${total}` : `${shown} of ${total}`;
    this.$('log-empty').hidden = total > 0;
  }

  // ---- cards -----------------------------------------------------------------

  renderCards() {
    const m = this.store.currentMetrics(this.sub) ?? {};
    // once sessions are followed, the card counts the table's rows: the two never disagree
    const sessions = this.store.state.sessionsKnown
      ? Object.keys(this.store.state.sessions).length : m.activeSessions;
    const cards = [
      ['sessions', sessions, (v) => nf.format(v), 'activeSessions', false],
      ['requests', m.totalRequests, (v) => nf.format(v), 'totalRequests', false],
      ['cost', m.totalCost, money, 'totalCost', false],
      ['latency', m.avgResponseMs, duration, 'avgResponseMs', true],
    ];
    // nothing to show yet: one compact row, not four tall boxes of dashes
    this.$('cards').toggleAttribute('data-empty', cards.every(([, value]) => num(value) === null));
    for (const [key, value, fmt, field, lowerIsBetter] of cards) {
      const n = num(value);
      const shownValue = n === null ? '—' : fmt(n);
      const valueEl = this.$(`card-${key}`);
      valueEl.textContent = shownValue;
      valueEl.title = shownValue; // all of it, when a huge figure is cut to the card
      const deltaEl = this.$(`delta-${key}`);
      const d = this.store.state.metrics ? this.store.delta(field) : null;
      if (!d || d.value === 0 || !Number.isFinite(d.value)) {
        deltaEl.textContent = d ? `no change · ${age(d.since)}` : '';
        deltaEl.className = 'delta';
        continue;
      }
      const up = d.value > 0;
      const abs = Math.abs(d.value);
      const shown = key === 'cost' ? money(abs) : key === 'latency' ? duration(abs) : nf1.format(abs);
      deltaEl.textContent = `${up ? '▲' : '▼'} ${shown} · ${age(d.since)}`;
      const good = lowerIsBetter ? !up : up;
      deltaEl.className = `delta ${key === 'cost' || key === 'requests' || key === 'sessions'
        ? 'neutral' : good ? 'good' : 'bad'}`;
      deltaEl.setAttribute('aria-label', `${up ? 'up' : 'down'} ${shown} in the last ${age(d.since)}`);
    }
  }

  // ---- providers ---------------------------------------------------------------

  renderProviders() {
    const list = this.$('providers');
    const all = Object.values(this.store.state.providers)
      .sort((a, b) => text(a.name ?? a.providerId).localeCompare(text(b.name ?? b.providerId)));
    this.$('providers-empty').hidden = all.length > 0;
    let providers = all;
    if (all.length > PROVIDERS_SHOWN) {
      const rank = (p) => CIRCUIT_RANK[circuitState(p.circuitState)];
      const keep = new Set([...all].sort((a, b) => rank(a) - rank(b)).slice(0, PROVIDERS_SHOWN));
      providers = all.filter((p) => keep.has(p));
    }
    const more = this.$('providers-more');
    const hiddenCount = all.length - providers.length;
    more.hidden = hiddenCount === 0;
    more.textContent = hiddenCount === 0 ? ''
      : `${nf.format(hiddenCount)} more not shown (broken circuits are shown first)`;
    list.replaceChildren(...providers.map((p) => {
      const circuit = circuitState(p.circuitState);
      const status = text(p.status ?? 'unknown').toLowerCase();
      const at = toMs(p.timestamp);
      return h('li', { class: `provider circuit-${circuit}`, 'data-provider-id': p.providerId },
        h('div', { class: 'provider-name', title: text(p.name ?? p.providerId) },
          p.name ?? p.providerId,
          p.name && p.name !== p.providerId ? h('span', { class: 'muted' }, ` ${text(p.providerId)}`) : null),
        h('span', { class: `pill status-${status.replace(/[^a-z0-9-]/g, '')}`, title: status },
          status),
        h('span', {
          class: `pill circuit circuit-${circuit}`, title: 'circuit breaker state',
          'aria-label': `circuit ${circuit}`,
        }, circuit),
        h('span', { class: 'muted small' },
          `${failures(p.failureCount)}${at ? ` · ${hmFmt.format(new Date(at))}` : ''}`));
    }));
  }

  // ---- sessions -----------------------------------------------------------------

  renderSessions() {
    const now = Date.now();
    const sessions = Object.values(this.store.state.sessions)
      .map((s) => ({ ...s, started: toMs(s.createdAt) }))
      .sort((a, b) => (b.started ?? 0) - (a.started ?? 0));
    this.$('sessions-count').textContent = nf.format(sessions.length);
    this.$('sessions-empty').hidden = sessions.length > 0;
    const quiet = this.store.state.quiet.size;
    const note = this.$('sessions-quiet');
    note.hidden = quiet === 0;
    note.textContent = quiet === 0 ? '' : `${nf.format(quiet)} ${quiet === 1 ? 'session' : 'sessions'}`
      + ` with no news for ${age(this.sessionIdleMs ?? 0)} not shown (ended without a word?)`;
    const shown = sessions.slice(0, 100);
    // a long id or name is cut to its column; the cell's title holds all of it
    const cell = (value, attrs = {}) => {
      const shownText = value === null || value === undefined ? '—' : text(value);
      return h('td', { ...attrs, title: shownText }, shownText);
    };
    this.$('sessions').replaceChildren(...shown.map((s) => h('tr', { 'data-session-id': s.sessionId },
      cell(s.sessionId, { class: 'mono' }),
      cell(s.userId),
      cell(s.providerId),
      cell(s.model),
      h('td', { class: 'num', 'data-started': s.started ?? '' },
        s.started ? age(now - s.started) : '—'))));
  }

  /** Once a second: ages in the sessions table and the badge. */
  tick(now = Date.now()) {
    for (const cell of this.$('sessions').querySelectorAll('td[data-started]')) {
      const started = Number(cell.dataset.started);
      if (started) cell.textContent = age(now - started);
    }
    this.renderAge(now);
    const minute = Math.floor(now / 60000);
    if (minute !== this.chartMinute) this.renderChart();
  }

  // ---- chart -----------------------------------------------------------------

  renderChart() {
    const now = Date.now();
    this.chartMinute = Math.floor(now / 60000);
    const data = this.store.requestsPerMinute(30, now);
    const svg = this.$('rpm-chart');
    // draw in CSS pixels, so text keeps its shape at any width
    const W = Math.max(280, Math.round(svg.clientWidth || 600));
    const H = Math.max(120, Math.round(svg.clientHeight || 180));
    svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
    const pad = { l: 36, r: 8, t: 10, b: 22 };
    const peak = Math.max(0, ...data.map(([, c]) => c));
    const top = niceMax(peak);
    const iw = W - pad.l - pad.r;
    const ih = H - pad.t - pad.b;
    const bw = iw / data.length;
    const s = (tag, attrs = {}, text = null) => {
      const el = this.doc.createElementNS(SVG, tag);
      for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
      if (text !== null) el.textContent = text;
      return el;
    };
    const nodes = [];
    for (let i = 0; i <= 4; i += 1) {
      const v = (top / 4) * i;
      const y = pad.t + ih - (v / top) * ih;
      nodes.push(s('line', { x1: pad.l, x2: W - pad.r, y1: y, y2: y, class: 'grid' }));
      nodes.push(s('text', { x: pad.l - 6, y: y + 4, class: 'axis', 'text-anchor': 'end' },
        nf1.format(v)));
    }
    data.forEach(([minute, count], i) => {
      const bh = top ? (count / top) * ih : 0;
      const x = pad.l + i * bw + 1;
      const bar = s('rect', {
        x, y: pad.t + ih - bh, width: Math.max(1, bw - 2), height: bh, rx: 2,
        class: i === data.length - 1 ? 'bar current' : 'bar',
      });
      bar.append(s('title', {}, `${hmFmt.format(new Date(minute))}: ${count} requests`));
      nodes.push(bar);
      const every = W < 420 ? 10 : 5;
      if (i % every === every - 1 || i === 0) {
        const last = i === data.length - 1;
        nodes.push(s('text', {
          x: last ? W - pad.r : x + bw / 2, y: H - 6, class: 'axis',
          'text-anchor': last ? 'end' : 'middle',
        }, hmFmt.format(new Date(minute))));
      }
    });
    svg.replaceChildren(...nodes);
    const latest = data.length ? data[data.length - 1][1] : 0;
    svg.setAttribute('aria-label',
      `Requests per minute over the last 30 minutes: ${latest} this minute, peak ${peak}`);
    this.$('rpm-latest').textContent = `${nf.format(latest)}/min now · peak ${nf.format(peak)}`;
  }

  // ---- status badge --------------------------------------------------------------

  renderStatus(status) {
    this.status = { ...this.status, ...status };
    const st = this.status;
    this.$('status-transport').textContent = TRANSPORT_LABEL[st.transport] ?? st.transport;
    // a live connection to a server whose event log is away is not "live": nothing arrives
    const stateText = st.paused ? 'paused (tab hidden)'
      : st.logDown && st.state === 'live' ? 'event log unreachable' : st.state;
    this.$('status-state').textContent = stateText;
    const badge = this.$('status');
    badge.dataset.state = st.state;
    badge.toggleAttribute('data-log-down', Boolean(st.logDown));
    badge.title = [
      `transport: ${TRANSPORT_LABEL[st.transport] ?? st.transport}`,
      `state: ${stateText}`,
      st.role ? `this tab: ${st.role}` : null,
      st.probing ? `trying ${TRANSPORT_LABEL[st.probing]}` : null,
      st.cursor ? `cursor: ${st.cursor}` : null,
    ].filter(Boolean).join('\n');
    this.$('status-role').textContent = st.role === 'follower' ? 'shared' : '';
    // screen readers hear transport and state changes, not the ticking age
    const spoken = `${TRANSPORT_LABEL[st.transport] ?? st.transport} ${stateText}`;
    if (this.$('status-live').textContent !== spoken) this.$('status-live').textContent = spoken;
    this.renderAge();
  }

  renderAge(now = Date.now()) {
    const at = this.status.lastEventAt;
    this.$('status-age').textContent = at ? `last event ${age(now - at)} ago` : 'no events yet';
  }
}

/** A round upper bound for an axis with four equal, readable steps (4, 8, 24, 40, 600…). */
export function niceMax(value) {
  const step = Math.max(1, value / 4);
  const exp = 10 ** Math.floor(Math.log10(step));
  for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) {
    if (m * exp >= step && Number.isInteger(m * exp)) return 4 * m * exp;
  }
  return 40 * exp;
}
