// Wiring: who am I (login screen), the store, the panels, the tab leader that holds the
// one connection (a Dualcast client, the same module any page imports from
// /dualcast.js), the status badge and the room picker. Sharing one connection between
// tabs is the dashboard's own feature (tabs.js), not the client's.
//
// The page states what it is doing on <body>: data-transport="websocket|sse|polling"
// and data-state="connecting|live|offline" (followers mirror what the leader reports).

import { Dashboard, h } from './panels.js';
import { SESSION_IDLE_MS, Store } from './store.js';
import { TabCoordinator } from './tabs.js';
import { Dualcast, maxId, steadyBackoff } from './dualcast.js';

const $ = (id) => document.getElementById(id);
const ROOMS_KEY = 'dualcast.rooms';
const FOLLOWER_STALE_MS = 30000;
const PAUSE_AFTER_HIDDEN_MS = 10000;
// /readyz is the one place that knows the event log is away: a live transport still
// looks green then, while no event can arrive. One small request per gap.
const READY_POLL_MS = 10000;
// what /readyz calls a log that events cannot come from (not `draining`: a restart)
const LOG_DOWN = new Set(['log_unreachable', 'log_refused', 'consumer_stalled']);

const store = new Store();
const ui = new Dashboard(document, store);

const app = {
  me: null,
  tabs: null,
  client: null, // the Dualcast client; only the leader tab has one
  ready: false,
  pending: [],
  overviewOk: false,
  leaderCursor: null,
  lastTransport: null,
  rooms: [],
  followers: new Map(), // tab id -> {visible, at}; only the leader keeps it
  hiddenSince: null,
  noticeTimer: null,
  ticks: 0,
  loggedOut: false,
  logDown: null, // null: not known yet; else since when (ms) the event log is away
};

// ---- status ------------------------------------------------------------------------

function showStatus(status) {
  document.body.dataset.transport = status.transport;
  document.body.dataset.state = status.state;
  ui.renderStatus({ ...status, logDown: app.logDown !== null });
  $('foot-cursor').textContent = status.cursor ? `cursor ${status.cursor}` : '';
}

function notice(text, { sticky = false } = {}) {
  const el = $('notice');
  el.textContent = text;
  el.hidden = false;
  clearTimeout(app.noticeTimer);
  if (!sticky) app.noticeTimer = setTimeout(() => { el.hidden = true; }, 8000);
}

/** Say at once when the event log is away: nothing can arrive, whatever the transport says. */
function showLogHealth(down) {
  const was = app.logDown !== null;
  if (down === was && document.body.dataset.log) return;
  app.logDown = down ? Date.now() : null;
  document.body.dataset.log = down ? 'unreachable' : 'reachable';
  $('log-down').hidden = !down;
  if (down) {
    const since = new Date(app.logDown).toLocaleTimeString([], { hour12: false });
    $('log-down-since').textContent = ` (since ${since}; the server keeps retrying)`;
  }
  ui.renderStatus({ logDown: down });
  // a page loaded while the log was away has no overview yet: fetch it now
  if (!down && !app.overviewOk && app.ready && !app.loggedOut) reloadOverview();
}

/** Poll /readyz on a slow timer while the page shows the dashboard. */
async function watchLog() {
  const every = tuning().readyPollMs ?? READY_POLL_MS;
  for (;;) {
    if (app.loggedOut) return;
    if (document.visibilityState === 'visible') {
      try {
        const response = await fetch('/readyz', { cache: 'no-store', credentials: 'omit' });
        const body = await response.json().catch(() => ({}));
        if (response.ok) showLogHealth(false);
        else if (LOG_DOWN.has(body.reason)) showLogHealth(true);
      } catch {
        /* the server itself is away: the transport's own state says so */
      }
    }
    await new Promise((resolve) => setTimeout(resolve, every));
  }
}

// ---- login -------------------------------------------------------------------------

const LOGIN_REASONS = {
  missing: 'This dashboard needs an access token.',
  expired: 'Your token has expired. Sign in again with a fresh one.',
  invalid: 'That token was not accepted.',
  'signed-out': 'You have signed out.',
  switch: 'This link signs you in as someone else.',
};

function showLogin(reason, message = '') {
  app.loggedOut = true;
  if (app.client) app.client.stop();
  if (app.tabs) app.tabs.close();
  $('dashboard').hidden = true;
  $('who').hidden = true;
  $('anon-hint').hidden = true;
  $('login').hidden = false;
  const text = LOGIN_REASONS[reason] ?? LOGIN_REASONS.invalid;
  // the server's words add something only when the reason is not already plain
  $('login-reason').textContent = message && reason === 'invalid' ? `${text} (${message})` : text;
  $('login').dataset.reason = reason;
  $('login-forget').hidden = reason === 'missing' || reason === 'signed-out';
  $('login-form').hidden = reason === 'switch';
  $('login-switch').hidden = reason !== 'switch';
  showStatus({ transport: document.body.dataset.transport || 'websocket', state: 'offline' });
  // the page says offline in its DOM, but no red pill beside "not signed in": nothing failed
  $('status').hidden = true;
  $('login-token').focus();
}

function reasonOf(body) {
  const text = `${body.error ?? ''} ${body.message ?? ''}`.toLowerCase();
  if (text.includes('expired')) return 'expired';
  if (text.includes('missing') || text.includes('anonymous') || text.includes('required')) {
    return 'missing';
  }
  return 'invalid';
}

/** GET /api/me: who the cookie (or nothing) makes us. Retries while the server is away. */
async function whoAmI() {
  for (let attempt = 0; ; attempt += 1) {
    try {
      const response = await fetch('/api/me', {
        credentials: 'same-origin', cache: 'no-store', headers: { Accept: 'application/json' },
      });
      if (response.status === 401 || response.status === 403) {
        let body = {};
        try { body = await response.json(); } catch { /* not JSON */ }
        showLogin(reasonOf(body), body.message ?? '');
        return null;
      }
      if (response.ok) return await response.json();
      notice(`The server answered ${response.status}; retrying…`);
    } catch {
      notice('The server is unreachable; retrying…');
    }
    showStatus({ transport: 'websocket', state: 'offline' });
    // gaps that grow and never collapse: one failed request (one console line) per gap
    const wait = steadyBackoff(attempt, 1000, 30000);
    await new Promise((resolve) => setTimeout(resolve, wait));
  }
}

/**
 * Ask /api/me about a pasted token before the cookie flow: a bad token gets a message
 * here instead of the server's bare JSON refusal of `/?token=…`.
 */
async function checkToken(ev) {
  ev.preventDefault();
  const value = $('login-token').value.trim();
  if (!value) return;
  try {
    const response = await fetch('/api/me', {
      headers: { Authorization: `Bearer ${value}`, Accept: 'application/json' },
      cache: 'no-store', credentials: 'omit',
    });
    if (!response.ok) {
      let body = {};
      try { body = await response.json(); } catch { /* not JSON */ }
      const reason = reasonOf(body);
      $('login-reason').textContent = `${LOGIN_REASONS[reason === 'missing' ? 'invalid' : reason]}`
        + `${body.message ? ` (${body.message})` : ''}`;
      $('login').dataset.reason = 'invalid';
      return;
    }
  } catch {
    /* unreachable: let the cookie flow say so */
  }
  location.assign(`/?token=${encodeURIComponent(value)}`);
}

async function logout() {
  try {
    await fetch('/api/logout', { method: 'POST', credentials: 'same-origin' });
  } catch {
    /* the cookie may stay; the login screen says what to do */
  }
  if (app.tabs) app.tabs.post({ type: 'logout' });
  showLogin('signed-out');
}

/**
 * A login link that could replace this browser's session lands here (#login_confirm=<token>)
 * instead of swapping it silently: a page of another site may have sent us. Sign in at
 * once when nobody is signed in or the link names the same person; else ask.
 */
async function confirmSwitch(value) {
  const ask = async (headers, credentials) => {
    try {
      const response = await fetch('/api/me', {
        headers: { Accept: 'application/json', ...headers }, credentials, cache: 'no-store',
      });
      return { status: response.status, body: await response.json().catch(() => ({})) };
    } catch {
      return { status: 0, body: {} };
    }
  };
  const arriving = await ask({ Authorization: `Bearer ${value}` }, 'omit');
  if (arriving.status !== 200) {
    showLogin(reasonOf(arriving.body), arriving.body.message ?? '');
    return;
  }
  const current = await ask({}, 'same-origin');
  const signedIn = current.status === 200 && !current.body.anonymous ? current.body.sub : null;
  // a same-origin navigation: the server sets the cookie without asking again
  const signIn = () => location.replace(`/?token=${encodeURIComponent(value)}`);
  if (signedIn === null || signedIn === arriving.body.sub) {
    signIn();
    return;
  }
  showLogin('switch');
  $('login-reason').textContent = `This link signs you in as “${arriving.body.sub}” `
    + `in place of “${signedIn}”. Switch only if you opened it yourself.`;
  $('login-switch-yes').textContent = `Switch to ${arriving.body.sub}`;
  $('login-switch-no').textContent = `Stay signed in as ${signedIn}`;
  $('login-switch-yes').onclick = signIn;
  $('login-switch-no').onclick = () => location.replace('/');
}

function renderWho(me) {
  $('who').hidden = false;
  $('who-sub').textContent = me.anonymous ? 'anonymous' : me.sub;
  const flags = [];
  if (me.admin) flags.push('admin');
  if (me.publish) flags.push('publisher');
  $('who-flags').textContent = flags.length ? `(${flags.join(', ')})` : '';
  const rooms = me.anonymous ? 'public events only'
    : me.admin ? 'may watch every room'
      : `rooms: ${[...new Set([...(me.rooms ?? []), `user-${me.sub}`])].join(', ')}`;
  $('who-rooms').textContent = rooms;
  $('logout').textContent = me.anonymous ? 'Sign in' : 'Sign out';
  $('anon-hint').hidden = !me.anonymous;
  if (me.admin) setupRoomPicker(me);
}

// ---- rooms (admins) ------------------------------------------------------------------

/** The room names of a saved or another tab's list (the client refuses any other). */
function roomNames(rooms) {
  return Array.isArray(rooms)
    ? rooms.filter((r) => typeof r === 'string' && r.trim() !== '' && !r.includes(','))
    : [];
}

function savedRooms() {
  try {
    return roomNames(JSON.parse(localStorage.getItem(ROOMS_KEY) ?? '[]'));
  } catch {
    return [];
  }
}

function setupRoomPicker(me) {
  $('rooms-picker').hidden = false;
  const known = new Set(['admin', `user-${me.sub}`, ...(me.rooms ?? []), ...app.rooms]);
  const options = $('rooms-options');
  const draw = () => {
    options.replaceChildren(...[...known].sort().map((room, n) => {
      // by position: rooms such as `team.eu` and `team:eu` must not share a label's target
      const id = `room-option-${n}`;
      return h('label', { for: id, class: 'room-option' },
        h('input', {
          type: 'checkbox', id, name: 'rooms', value: room, checked: app.rooms.includes(room),
        }), ` ${room}`);
    }));
  };
  draw();
  $('rooms-add-btn').addEventListener('click', () => {
    const input = $('rooms-add');
    const room = input.value.trim();
    if (!room || !input.checkValidity()) {
      input.reportValidity();
      return;
    }
    known.add(room);
    app.rooms = [...new Set([...selectedRooms(), room])];
    draw();
    input.value = '';
  });
  $('rooms-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    setRooms(selectedRooms(), true);
    $('rooms-picker').open = false;
  });
  app.redrawRooms = draw;
}

function selectedRooms() {
  return [...document.querySelectorAll('#rooms-options input:checked')].map((el) => el.value);
}

function setRooms(rooms, announce) {
  app.rooms = rooms;
  try {
    localStorage.setItem(ROOMS_KEY, JSON.stringify(rooms));
  } catch {
    /* storage may be off: the choice lasts for this page */
  }
  if (app.redrawRooms) app.redrawRooms();
  if (announce && app.tabs) app.tabs.post({ type: 'rooms', rooms });
  if (app.client) app.client.setRooms(rooms);
}

// ---- leader and followers -----------------------------------------------------------

function startCursor() {
  let cursor = maxId(store.cursor, app.leaderCursor);
  // an empty stream at load time: take everything from its start, so nothing is missed
  if (!cursor && app.overviewOk) cursor = '0-0';
  return cursor;
}

/**
 * Optional timing overrides from localStorage `dualcast.tuning` (JSON), for tests and
 * for operators who want a faster climb: climbBaseMs, climbCapMs, welcomeTimeoutMs,
 * retryBaseMs, retryCapMs, pauseAfterHiddenMs, readyPollMs, sessionIdleMs, idleTimeoutMs.
 */
function tuning() {
  const allowed = [
    'climbBaseMs', 'climbCapMs', 'welcomeTimeoutMs', 'retryBaseMs', 'retryCapMs',
    'pauseAfterHiddenMs', 'readyPollMs', 'sessionIdleMs', 'idleTimeoutMs',
  ];
  try {
    const raw = JSON.parse(localStorage.getItem('dualcast.tuning') ?? '{}');
    return Object.fromEntries(Object.entries(raw)
      .filter(([k, v]) => allowed.includes(k) && Number.isFinite(v) && v > 0));
  } catch {
    return {};
  }
}

function becomeLeader() {
  if (app.loggedOut) return;
  app.followers.clear();
  // no token: the HttpOnly cookie authenticates (same origin)
  app.client = new Dualcast('', {
    ...tuning(),
    lastEventId: startCursor(),
    rooms: app.rooms,
    initial: app.lastTransport ?? undefined,
  });
  app.client.on('batch', ({ events, lastEventId }) => {
    store.applyEvents(events, lastEventId);
    app.tabs.post({ type: 'events', events, cursor: lastEventId });
    if (events.length) showStatus({ ...app.client.status(), role: 'leader' }); // "last event" age
  });
  app.client.on('state', (status) => {
    // what a new leader starts on: the transport last live, not the last one an outage
    // left the status on (polling/offline would have it start on polling)
    if (status.state === 'live') app.lastTransport = status.transport;
    showStatus({ ...status, role: 'leader' });
    app.tabs.post({ type: 'status', status });
  });
  app.client.on('reset', ({ lastId }) => {
    reloadOverview();
    app.tabs.post({ type: 'reset', lastId });
  });
  app.client.on('error', (error) => {
    handleError(error);
    app.tabs.post({ type: 'error', error });
  });
  app.client.start();
  evaluateVisibility();
}

function onMessage(msg) {
  const leader = app.tabs?.isLeader;
  switch (msg.type) {
    case 'events':
      app.leaderCursor = maxId(app.leaderCursor, msg.cursor ?? null);
      if (leader) break;
      if (!app.ready) app.pending.push(msg);
      else store.applyEvents(msg.events ?? [], msg.cursor ?? null);
      break;
    case 'status':
      if (leader) break;
      if (msg.status.state === 'live') app.lastTransport = msg.status.transport;
      app.leaderCursor = maxId(app.leaderCursor, msg.status.cursor ?? null);
      showStatus({ ...msg.status, role: 'follower' });
      break;
    case 'reset':
      if (!leader) reloadOverview();
      break;
    case 'error':
      if (!leader) handleError(msg.error);
      break;
    case 'hello':
      if (leader && app.client) app.tabs.post({ type: 'status', status: app.client.status() });
      if (leader) noteFollower(msg.from, msg.visible);
      break;
    case 'visibility':
      if (leader) noteFollower(msg.from, msg.visible);
      break;
    case 'bye':
      app.followers.delete(msg.from);
      if (leader) evaluateVisibility();
      break;
    case 'rooms':
      setRooms(roomNames(msg.rooms), false);
      break;
    case 'logout':
      showLogin('signed-out');
      break;
    default:
      break;
  }
}

function noteFollower(id, visible) {
  app.followers.set(id, { visible: Boolean(visible), at: Date.now() });
  evaluateVisibility();
}

/** The leader pauses only when no tab of ours is visible, and only after a grace period. */
function evaluateVisibility() {
  if (!app.tabs?.isLeader || !app.client) return;
  const now = Date.now();
  let anyVisible = document.visibilityState === 'visible';
  for (const [id, f] of app.followers) {
    if (now - f.at > FOLLOWER_STALE_MS) app.followers.delete(id);
    else if (f.visible) anyVisible = true;
  }
  if (anyVisible) {
    app.hiddenSince = null;
    app.client.resume();
  } else {
    app.hiddenSince ??= now;
    const grace = tuning().pauseAfterHiddenMs ?? PAUSE_AFTER_HIDDEN_MS;
    if (now - app.hiddenSince >= grace) app.client.pause();
  }
}

function handleError(error) {
  if (error.kind === 'auth') {
    showLogin(reasonOf({ error: error.code, message: error.message }), error.message ?? '');
    return;
  }
  const what = error.message || error.code || 'error';
  if (error.kind === 'fatal' && app.rooms.length && app.tabs?.isLeader) {
    notice(`The server refused these rooms (${what}); back to the default rooms.`);
    setRooms([], true);
    app.client.start();
    return;
  }
  notice(`Server says: ${what}`);
}

async function reloadOverview() {
  try {
    await store.reload();
    app.overviewOk = true;
  } catch (err) {
    if (err.status === 401) showLogin('expired');
    else notice('Could not reload the overview; live events continue.');
  }
}

// ---- start ---------------------------------------------------------------------------

/** The cookie cannot be refreshed from the page: say in time that the token runs out. */
function renderExpiry() {
  const exp = Number(app.me?.exp);
  const el = $('who-exp');
  if (!exp || app.loggedOut) {
    el.hidden = true;
    return;
  }
  const left = exp * 1000 - Date.now();
  el.hidden = left > 15 * 60000;
  if (!el.hidden) {
    const min = Math.max(0, Math.ceil(left / 60000));
    el.textContent = `token expires in ${min} min`;
  }
}

function tick() {
  app.ticks += 1;
  if (app.ready && store.expireSessions(app.sessionIdleMs)) ui.renderPanels();
  ui.tick();
  renderExpiry();
  if (!app.tabs || app.loggedOut) return;
  if (app.tabs.isLeader) {
    evaluateVisibility();
    if (app.client && app.ticks % 5 === 0) {
      app.tabs.post({ type: 'status', status: app.client.status() });
    }
  } else if (app.ticks % 10 === 0) {
    app.tabs.post({ type: 'visibility', visible: document.visibilityState === 'visible' });
  }
}

async function boot() {
  showStatus({ transport: 'websocket', state: 'connecting' });
  $('logout').addEventListener('click', () => {
    if (app.me?.anonymous) showLogin('missing');
    else logout();
  });
  $('anon-login').addEventListener('click', () => showLogin('missing'));
  $('login-form').addEventListener('submit', checkToken);
  $('login-clear').addEventListener('click', async () => {
    try {
      await fetch('/api/logout', { method: 'POST', credentials: 'same-origin' });
    } finally {
      location.assign('/');
    }
  });

  // a login link that could swap the session asks first (see confirmSwitch)
  const arriving = /(?:^#|&)login_confirm=([^&]+)/.exec(location.hash);
  if (arriving) {
    history.replaceState(null, '', location.pathname + location.search);
    await confirmSwitch(decodeURIComponent(arriving[1]));
    return;
  }

  // a login link the server refused may send us here as /#login_error=<code>
  const refused = /(?:^#|&)login_error=([\w.-]+)/.exec(location.hash);
  if (refused) {
    history.replaceState(null, '', location.pathname + location.search);
    showLogin(reasonOf({ error: refused[1] }), refused[1].replace(/_/g, ' '));
    return;
  }

  const me = await whoAmI();
  if (!me) return;
  app.me = me;
  ui.sub = me.sub ?? null;
  app.sessionIdleMs = tuning().sessionIdleMs ?? SESSION_IDLE_MS;
  ui.sessionIdleMs = app.sessionIdleMs;
  app.rooms = me.admin ? savedRooms() : [];
  renderWho(me);
  $('status').hidden = false;
  $('dashboard').hidden = false;

  store.subscribe((change) => {
    if (change.type === 'overview') ui.renderAll();
    else ui.addEvents(change.events);
  });

  app.tabs = new TabCoordinator({ onLeader: becomeLeader, onMessage });
  app.tabs.listen(); // before the overview: nothing the leader sends meanwhile is missed
  app.tabs.post({ type: 'hello', visible: document.visibilityState === 'visible' });

  try {
    await store.reload();
    app.overviewOk = true;
  } catch (err) {
    if (err.status === 401) {
      showLogin('expired');
      return;
    }
    notice('Could not load the overview; showing live events only.');
    ui.renderAll();
  }
  app.ready = true;
  for (const msg of app.pending.splice(0)) store.applyEvents(msg.events ?? [], msg.cursor ?? null);

  document.addEventListener('visibilitychange', () => {
    if (!app.tabs || app.loggedOut) return;
    if (app.tabs.isLeader) evaluateVisibility();
    else app.tabs.post({ type: 'visibility', visible: document.visibilityState === 'visible' });
  });
  window.addEventListener('pagehide', () => app.tabs?.post({ type: 'bye' }));
  setInterval(tick, 1000);
  app.tabs.elect();
  watchLog(); // after the connection has started: it must not hold the first events up
}

boot();
