// Types of dualcast.js, the dualcast client (served beside it at /dualcast.d.ts).

export type Transport = 'websocket' | 'sse' | 'polling';
export type ConnectionState = 'connecting' | 'live' | 'offline';

export declare const TRANSPORTS: readonly Transport[];
export declare const STATES: readonly ConnectionState[];
/** Every error code the client understands (the server's `error` codes). */
export declare const ERROR_CODES: readonly string[];
/** Codes after which the client stops and needs new credentials. */
export declare const AUTH_CODES: ReadonlySet<string>;
/** Codes that mean the request itself is wrong (a room, a cursor): no transport helps. */
export declare const REQUEST_CODES: ReadonlySet<string>;

/** One event, as every transport delivers it: each id once, in stream order. */
export interface DualcastEvent<T = unknown> {
  /** The stream entry id, `<ms>-<seq>`: the cursor to resume from. */
  id: string;
  event: string;
  data: T;
  /** The entry's time in epoch ms (from the id when the producer gave none), or null. */
  ts: number | null;
}

export interface StateChange {
  transport: Transport;
  state: ConnectionState;
  /** True while paused (a hidden page); the cursor is kept. */
  paused: boolean;
  cursor: string | null;
  lastEventAt: number | null;
  /** A better transport being tried while this one keeps delivering. */
  probing: Transport | null;
  stoppedBy: string | null;
}

export interface DualcastError {
  /** One of ERROR_CODES, 'token_unavailable' when the token function failed, or
   *  'unreachable' when no transport could connect (kind 'transport', once per outage;
   *  the client keeps retrying): the server is down, or it does not list this page's
   *  origin in DUALCAST_ALLOWED_ORIGINS (a browser shows both as one network error). */
  code: string;
  message: string;
  /** 'auth': new credentials needed; 'fatal': the request is wrong; else the server said so. */
  kind?: 'auth' | 'fatal' | 'frame' | 'transport';
  transport?: Transport;
  status?: number;
}

export interface Welcome {
  transport: Transport;
  rooms: string[];
  lastId: string | null;
}

export interface DualcastEvents {
  event: DualcastEvent;
  /** Every delivery as one list (possibly empty when only the cursor moved). */
  batch: { events: DualcastEvent[]; lastEventId: string | null };
  state: StateChange;
  reset: { lastId: string | null };
  error: DualcastError;
  welcome: Welcome;
}

/** A function must give a token string within 10 s: anything else (or nothing by then) is a
 *  `token_unavailable` error. */
export type TokenSource = string | (() => string | Promise<string>);

export interface DualcastOptions {
  /** A token, or a function called at start, again a minute before `exp` (a call that
   *  throws then is tried again while the token held is still good), and after an
   *  auth refusal. None: the dashboard's cookie (same origin only) or anonymous. A new
   *  token from the function goes to the open connection at once (an `auth` frame on a
   *  WebSocket; a waiting poll or an SSE stream asks again with it, from the cursor). */
  token?: TokenSource;
  /** Rooms to join; none: the server's default for the token. A room the token may not
   *  join is a `forbidden_room` error and is not asked for again; when none of them may
   *  be joined, that error is 'fatal' and the client stops, on every transport. A single
   *  string, or a name that is empty or holds a comma, is a TypeError from the constructor. */
  rooms?: string[];
  /** Resume after this id; `0` = from the oldest retained event; none = live from now.
   *  Anything that is not a stream id is a TypeError from the constructor. */
  lastEventId?: string | null;
  /** Order or subset of the transports to use (an empty list: all three). Any other
   *  name is a TypeError from the constructor. Where there is no WebSocket (Node 20
   *  without --experimental-websocket) 'websocket' is left out, unless it is the only one. */
  transports?: Transport[];
  /** Start on this transport (e.g. the one that worked last time). */
  initial?: Transport;
  /** A transport is up only once its welcome arrives within this long (default 3000). */
  welcomeTimeoutMs?: number;
  /** A live WebSocket or SSE stream on which nothing at all (not even the server's
   *  ping) arrives for this long is taken for dead and reconnected (default 40000). */
  idleTimeoutMs?: number;
  /** Long-poll wait in seconds (0-30; default 25). Halved after each `bad_timeout` from a
   *  server whose limit is lower; a `bad_timeout` at 0 is a 'fatal' error. */
  pollTimeout?: number;
  /** Reconnect backoff, jittered: from this (default 500)... */
  retryBaseMs?: number;
  /** ...up to this (default 15000). */
  retryCapMs?: number;
  /** After a fallback, the better transports are probed again after this (default 5000)... */
  climbBaseMs?: number;
  /** ...backing off to this (default 30000). */
  climbCapMs?: number;
  /** A live transport that lasted this long forgets its earlier deaths (default 30000). */
  stableMs?: number;
  /** Deaths of a live transport counted within this window (default 60000)... */
  deathWindowMs?: number;
  /** ...this many of them fall back to the next transport (default 3). */
  maxDeaths?: number;
  // injectable for tests
  WebSocket?: typeof WebSocket;
  fetch?: typeof fetch;
  AbortController?: typeof AbortController;
  TextDecoder?: typeof TextDecoder;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (id: unknown) => void;
  now?: () => number;
  random?: () => number;
}

export declare class Dualcast {
  /** `url`: the dualcast server (e.g. "https://push.example.com"); "" = this page's origin. */
  constructor(url?: string, options?: DualcastOptions);
  readonly transport: Transport;
  readonly state: ConnectionState;
  readonly lastEventId: string | null;
  /** The rooms a reconnect asks for (empty: the server's default for the token). */
  readonly rooms: string[];
  on<K extends keyof DualcastEvents>(name: K, fn: (value: DualcastEvents[K]) => void): () => void;
  off<K extends keyof DualcastEvents>(name: K, fn: (value: DualcastEvents[K]) => void): void;
  start(): this;
  /** Close everything; the cursor stays, so start() resumes where this left off. */
  stop(): this;
  pause(): void;
  resume(): void;
  /** Join a room (a `join` frame on a live WebSocket, else a reconnect). Without
   *  `rooms`, before the first welcome names the server's default set, the call waits
   *  for it and then adds to it. A room the token may not join: a `forbidden_room` error. */
  join(room: string): void;
  /** Leave a room; like join, it waits for the default set when that is not yet known. */
  leave(room: string): void;
  /** Replace the rooms (none: the server's default) and reconnect from the cursor;
   *  the same TypeError as the `rooms` option. */
  setRooms(rooms: string[]): void;
  status(): StateChange;
}

export declare function compareIds(a: string | null, b: string | null): -1 | 0 | 1;
export declare function maxId(a: string | null, b: string | null): string | null;
export declare function idTime(id: string | null): number | null;
export declare function eventTime(ts: unknown, id?: string | null): number | null;
export declare function tokenExpiry(token: string | null): number | null;
