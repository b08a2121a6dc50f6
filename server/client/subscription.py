"""The transport manager behind `subscribe`: one feed of events over the best
transport that works, with the same rules as the browser client.

WebSocket first; SSE when the WebSocket cannot open (refused upgrade, or no
`welcome` in time: a held handshake looks open) or dies repeatedly; long-polling
when SSE says no `welcome` in time (a buffering proxy holds the stream back).
From a lower transport it probes the higher ones now and then and switches up
once a probe has said `welcome`. When every transport fails to open, the last one
too, the server is away (a restart, an instance behind nginx answering 502), and
the next round of retries starts again on the transport last live, as the browser
client's does. One cursor, the last stream id handed on, is
carried across every switch and reconnect; since ids are totally ordered, an id
at or below the cursor is a repeat and is dropped, so each id arrives once, in order.

Everything runs in one task that reads one inbox (every connection reports
there) and keeps its timers as deadlines, so no callback ever races another.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace

import httpx

from dualcast.client.connections import (
    PATHS,
    Batch,
    Connection,
    Ended,
    ErrorFrame,
    Failure,
    Signal,
    Target,
    Welcome,
    no_endpoint,
    refused_room,
    trust,
)
from dualcast.client.model import (
    AUTH_CODES,
    AuthFailed,
    ClientError,
    Event,
    Item,
    Refused,
    Reset,
    ServerError,
    State,
    Status,
    Transport,
    is_after,
)
from dualcast.client.tokens import Tokens, refresh_in

log = logging.getLogger("dualcast.client")

#: Makes a connection (tests pass fakes: the manager's rules run without a server).
Connector = Callable[
    [Transport, Target, "str | None", "asyncio.Queue[tuple[Connection, Signal]]"], Connection]


@dataclass(frozen=True)
class Timing:
    """Seconds; tests shorten them. `poll` and the retry, climb and death values are the
    browser client's defaults; `welcome` is 5 s here (3 s in the browser) and `idle` 45 s
    (40 s there, where it watches the WebSocket too: here websockets' own pings do)."""

    welcome: float = 5.0          # a connection that has not said `welcome` by then failed
    poll: float = 25.0            # how long one long-poll waits at the server
    idle: float = 45.0            # an SSE stream silent this long is dead (pings every 15 s)
    retry_base: float = 0.5       # reconnect backoff (full jitter, capped)
    retry_cap: float = 15.0
    climb_base: float = 5.0       # probing the better transports (full jitter, capped)
    climb_cap: float = 30.0
    stable: float = 30.0          # live this long: earlier deaths are forgiven
    death_window: float = 60.0    # `max_deaths` deaths of a live transport within this
    max_deaths: int = 3           # ... make it fall back
    token: float = 10.0           # a token source that has not answered by then failed


def backoff(attempt: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)), so a crowd of clients
    that lost the same server does not come back in step."""
    return rand() * min(cap, base * (1 << min(attempt, 30)))


#: Refusals of one transport that no retry changes: when every transport asked for has
#: given one since the last `welcome`, the subscription ends with it.
HOPELESS = frozenset({"transport_disabled", "tls_certificate"})


class Timer(enum.StrEnum):
    WELCOME = "welcome"
    PROBE_WELCOME = "probe_welcome"
    RETRY = "retry"
    CLIMB = "climb"
    REFRESH = "refresh"


class _Done:
    """Put on the output queue when the subscription ends; carries why."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class Subscription:
    """What `async with subscribe(...) as events` gives: iterate it for `Event` items
    and, when the cursor was gone, a `Reset` marker (see `Reset`)."""

    def __init__(
        self, http_base: str, ws_base: str, *, tokens: Tokens, rooms: tuple[str, ...],
        last_event_id: str | None, transports: tuple[Transport, ...], timing: Timing,
        on_status: Callable[[Status], None] | None, on_error: Callable[[ServerError], None] | None,
        buffer: int, rand: Callable[[], float] = random.random,
        connector: Connector = Connection, tls: ssl.SSLContext | None = None,
    ) -> None:
        #: What every transport verifies the server's certificate with (`trust`).
        self._tls = tls if tls is not None else trust()
        self._http_base = http_base
        self._ws_base = ws_base
        self._tokens = tokens
        self._asked = rooms
        self._rooms = rooms  # the rooms asked for, narrowed to those the server grants
        self._order = transports
        self._timing = timing
        self._on_status = on_status
        self._on_error = on_error
        self._rand = rand
        self._connector = connector
        self._out: asyncio.Queue[Item | _Done] = asyncio.Queue(buffer)
        self._inbox: asyncio.Queue[tuple[Connection, Signal]] = asyncio.Queue(256)
        self._cursor = last_event_id  # the last id put on the output queue
        #: Where the caller may resume from: the last id handed to it, or, before any,
        #: the server's head the subscription went live from (as the browser's lastEventId).
        self.last_event_id = last_event_id
        self._level = 0
        #: The level last live: where a round of retries starts once every transport
        #: failed to open (the server was away), and how many such rounds in a row.
        self._home = 0
        self._rounds = 0
        self._conn: Connection | None = None
        self._probe: Connection | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._deadlines: dict[Timer, float] = {}
        self._failures = 0
        self._deaths: list[float] = []
        self._climb_attempt = 0
        self._live_since: float | None = None
        self._auth_retried = False
        self._state = State.OFFLINE
        self._status: Status | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._target: Target | None = None
        #: Since the last `welcome`: transports that answered "no endpoint here", and how.
        self._missing: dict[Transport, Ended] = {}
        #: Since the last `welcome`: transports that no retry will change, and how (the
        #: server does not offer it; the client does not trust the server's certificate).
        self._hopeless: dict[Transport, Ended] = {}

    # -- the caller's side -----------------------------------------------------

    @property
    def transport(self) -> Transport:
        return self._order[self._level]

    @property
    def state(self) -> State:
        return self._state

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Item:
        if self._closed and self._out.empty():
            raise StopAsyncIteration  # iterated after its `async with` block ended
        item = await self._out.get()
        if isinstance(item, _Done):
            self._out.put_nowait(item)  # every later call ends too
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        if isinstance(item, Event):
            self.last_event_id = item.id
        elif item.last_id is not None:
            self.last_event_id = item.last_id
        return item

    async def start(self) -> None:
        self._task = asyncio.create_task(self._main(), name="dualcast-client")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            if self._task.cancelled():  # it had not ended: no end marker went out
                self._wake_readers()

    # -- the manager -----------------------------------------------------------

    async def _main(self) -> None:
        error: BaseException | None = None
        try:
            # Redirects are followed, as by a browser (http:// to https://, a moved path);
            # httpx drops the Authorization header when one leads to another origin.
            async with httpx.AsyncClient(headers={"User-Agent": "dualcast-client"},
                                         follow_redirects=True, verify=self._tls) as http:
                self._target = Target(
                    self._http_base, self._ws_base, self._rooms, lambda: self._tokens.current,
                    self._timing.poll, self._timing.idle, http, self._tls)
                try:
                    await self._loop()
                finally:
                    await self._teardown()
        except ClientError as exc:
            error = exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: end the iteration with it rather than hang
            log.exception("dualcast client failed")
            error = exc
        self._set_state(State.OFFLINE)
        await self._out.put(_Done(error))

    def _wake_readers(self) -> None:
        """The `async with` block ended while the subscription ran: a task waiting in
        `async for` elsewhere gets the end marker and stops. A full queue has no one
        waiting on it, and the reader that drains it stops at the end (`_closed`)."""
        if not self._out.full():
            self._out.put_nowait(_Done(None))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._tokens.refreshable:
            try:
                await self._tokens.refresh()
            except Exception as exc:
                raise AuthFailed(None, "token_source_failed",
                                 f"the token source failed: {exc}") from exc
        self._schedule_refresh()
        self._open()
        while True:
            now = loop.time()
            due = [timer for timer, at in self._deadlines.items() if at <= now]
            if due:
                timer = min(due, key=self._deadlines.__getitem__)
                del self._deadlines[timer]
                await self._fire(timer)
                continue
            if self._inbox.empty():
                at = min(self._deadlines.values(), default=None)
                try:
                    async with asyncio.timeout_at(at):
                        conn, signal = await self._inbox.get()
                except TimeoutError:
                    continue
            else:
                conn, signal = self._inbox.get_nowait()
            await self._handle(conn, signal)

    def _schedule(self, timer: Timer, seconds: float) -> None:
        self._deadlines[timer] = asyncio.get_running_loop().time() + max(0.0, seconds)

    def _clear(self, *timers: Timer) -> None:
        for timer in timers:
            self._deadlines.pop(timer, None)

    def _set_state(self, state: State, reason: str | None = None) -> None:
        self._state = state
        status = Status(self.transport, state, reason)
        if status != self._status:
            self._status = status
            if self._on_status is not None:
                self._on_status(status)

    def _connect(self, transport: Transport) -> Connection:
        assert self._target is not None
        return self._connector(transport, self._target, self._cursor, self._inbox)

    def _drop(self, conn: Connection | None) -> None:
        if conn is None:
            return
        conn.close()
        self._closing.add(conn.task)
        conn.task.add_done_callback(self._closing.discard)

    async def _teardown(self) -> None:
        self._drop(self._conn)
        self._drop(self._probe)
        self._conn = self._probe = None
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=5)

    def _open(self, quiet: bool = False) -> None:
        self._clear(Timer.RETRY)
        if not quiet:
            self._live_since = None
            self._set_state(State.CONNECTING)
        self._conn = self._connect(self.transport)
        if self.transport is not Transport.POLLING:
            # Up means `welcome`, not an open socket: a blocked upgrade or a held
            # stream can look open for a long time.
            self._schedule(Timer.WELCOME, self._timing.welcome)

    async def _fire(self, timer: Timer) -> None:
        if timer is Timer.WELCOME:
            conn = self._conn
            if conn is not None and not conn.welcomed:
                await self._ended(conn, Ended(Failure.TRANSPORT, "no welcome in time"))
        elif timer is Timer.PROBE_WELCOME:
            probe = self._probe
            if probe is not None and not probe.welcomed:
                await self._ended(probe, Ended(Failure.TRANSPORT, "no welcome in time"))
        elif timer is Timer.RETRY:
            self._open(quiet=self._state is State.OFFLINE and self._rounds > 0)
        elif timer is Timer.CLIMB:
            self._probe_from(0)
        elif timer is Timer.REFRESH:
            await self._refresh_token()

    async def _handle(self, conn: Connection, signal: Signal) -> None:
        if isinstance(signal, Ended):
            await self._ended(conn, signal)
        elif isinstance(signal, Welcome):
            self._welcome(conn, signal)
        elif conn is not self._conn:
            if (isinstance(signal, ErrorFrame) and conn is self._probe
                    and signal.code in AUTH_CODES):
                await self._error(conn, signal)
            return  # an old connection, or a probe not promoted yet
        elif isinstance(signal, Batch):
            await self._events(signal)
        elif isinstance(signal, Reset):
            # The cursor is gone (trimmed, or the stream was reset): from the head on.
            self._cursor = signal.last_id
            await self._out.put(signal)
        else:
            await self._error(conn, signal)

    def _welcome(self, conn: Connection, welcome: Welcome) -> None:
        if conn is self._probe:
            self._promote(conn)
        elif conn is not self._conn:
            return
        self._clear(Timer.WELCOME)
        self._missing.clear()
        self._hopeless.clear()
        if self._rooms:
            self._narrow(tuple(room for room in self._rooms if room in welcome.rooms))
        if self._cursor is None and welcome.last_id:
            self._cursor = welcome.last_id
            if self.last_event_id is None and self._out.empty():
                # Nothing handed over yet: resuming from here later misses nothing.
                self.last_event_id = welcome.last_id
        self._failures = 0
        self._rounds = 0
        self._home = self._level
        self._auth_retried = False
        self._live_since = asyncio.get_running_loop().time()
        self._set_state(State.LIVE)
        if self._level > 0:
            self._schedule_climb()
        else:
            self._clear(Timer.CLIMB)

    def _narrow(self, rooms: tuple[str, ...]) -> None:
        """Ask only for `rooms` from now on: a room the server refused (a WebSocket
        leaves it out of its `welcome`) would make every SSE or poll reconnect a 403.
        The browser client does the same. None left: nothing asked for can be joined."""
        if rooms == self._rooms:
            return
        if not rooms:
            raise Refused(403, "forbidden_room", "none of the rooms asked for may be joined "
                          f"({', '.join(self._asked)})")
        self._rooms = rooms
        assert self._target is not None
        self._target = replace(self._target, rooms=rooms)

    def _promote(self, probe: Connection) -> None:
        """A probe said welcome: it feeds us from now on, the old connection goes."""
        old = self._conn
        self._clear(Timer.PROBE_WELCOME, Timer.RETRY, Timer.WELCOME)
        self._probe = None
        self._conn = probe
        self._level = self._order.index(probe.transport)
        self._deaths = []
        self._drop(old)

    async def _events(self, batch: Batch) -> None:
        for event in batch.events:
            # Ids are totally ordered: anything at or below the cursor came already.
            if is_after(event.id, self._cursor):
                self._cursor = event.id
                await self._out.put(event)
        # A poll answer's last_id is where to continue even when it brought nothing.
        if batch.last_id is not None and is_after(batch.last_id, self._cursor):
            self._cursor = batch.last_id

    async def _error(self, conn: Connection, frame: ErrorFrame) -> None:
        if frame.code in AUTH_CODES:
            await self._auth_lost(conn, Ended(Failure.AUTH, frame.code, None, frame.code,
                                              frame.message))
            return
        self._report(ServerError(conn.transport, frame.code, frame.message))

    def _report(self, error: ServerError) -> None:
        if self._on_error is not None:
            self._on_error(error)
        else:
            log.warning("dualcast %s: %s: %s", error.transport, error.code, error.message)

    async def _auth_lost(self, conn: Connection, ended: Ended) -> None:
        """The server refused the token: ask the source for a fresh one and reconnect;
        without a source, or when a fresh token was refused as well, give up."""
        if not self._tokens.refreshable or self._auth_retried:
            raise AuthFailed(ended.status, ended.code or "unauthenticated", ended.message)
        self._auth_retried = True
        try:
            await self._tokens.refresh()
        except Exception as exc:
            raise AuthFailed(ended.status, ended.code or "unauthenticated",
                             f"the token source failed: {exc}") from exc
        self._schedule_refresh()
        if conn is self._probe:
            self._drop(conn)
            self._probe = None
            self._clear(Timer.PROBE_WELCOME)
            self._schedule_climb()
            return
        self._drop(self._conn)
        self._conn = None
        self._clear(Timer.WELCOME)
        self._open()

    async def _ended(self, conn: Connection, ended: Ended) -> None:
        if conn is self._probe:
            self._drop(conn)
            self._probe = None
            self._clear(Timer.PROBE_WELCOME)
            log.debug("probe %s failed: %s", conn.transport, ended.detail)
            self._probe_from(self._order.index(conn.transport) + 1)
            return
        if conn is not self._conn:
            return
        self._drop(conn)
        self._conn = None
        self._clear(Timer.WELCOME)
        log.debug("%s ended: %s", conn.transport, ended.detail)
        if ended.failure is Failure.AUTH:
            await self._auth_lost(conn, ended)
            return
        if ended.failure is Failure.FATAL:
            room = refused_room(ended, self._rooms)
            if room is None:
                raise Refused(ended.status, ended.code or "refused",
                              ended.message or ended.detail)
            # As a WebSocket does: say so once, and carry on with the other rooms.
            self._narrow(tuple(r for r in self._rooms if r != room))
            self._report(ServerError(conn.transport, ended.code, ended.message))
            self._open()
            return
        timing = self._timing
        now = asyncio.get_running_loop().time()
        last = self._level >= len(self._order) - 1
        if conn.welcomed:
            lived = 0.0 if self._live_since is None else now - self._live_since
            self._live_since = None
            if lived >= timing.stable:
                self._deaths = []
                if self._level == 0:
                    self._climb_attempt = 0
            self._deaths = [t for t in self._deaths if now - t < timing.death_window]
            self._deaths.append(now)
            if len(self._deaths) >= timing.max_deaths and not last:
                self._fall_back()
                return
            # Died after being live: reconnect where we were, soon but jittered.
            self._set_state(State.CONNECTING)
            self._schedule(Timer.RETRY, backoff(len(self._deaths) - 1, timing.retry_base,
                                                timing.retry_cap, self._rand))
            return
        self._check_endpoint(conn.transport, ended)
        if ended.failure is Failure.UNREACHABLE:
            # Nobody answers: every transport would fail the same way, so stay here.
            self._retry_later(ended.detail)
            return
        if not last:
            self._fall_back()
            return
        if self._home < self._level:
            # Every transport failed to open, the last one too: the server is away (a
            # restart; behind nginx, an instance stopping answers 502 on every path), not
            # a transport blocked on the way. The next round starts again from the
            # transport last live, as the browser client's does: coming back on polling
            # and climbing later cost 5-30 s on the worse transport. The rounds count as
            # one run of failures (the state goes offline; the waits grow).
            self._level = self._home
            self._clear(Timer.CLIMB)
            self._failures = self._rounds
            self._retry_later(ended.detail)
            self._rounds = self._failures
            if self._level > 0:
                self._schedule_climb()
            return
        self._retry_later(ended.detail)
        self._schedule_climb()

    def _check_endpoint(self, transport: Transport, ended: Ended) -> None:
        """A 404 falls back like any refusal (a proxy may route only some paths), but
        when every transport says there is no endpoint, no retry will find one: the
        URL (or its path prefix) is wrong. Nor when the server said it offers none of
        the transports asked for (a forced `transports=["websocket"]` where the server
        runs with DUALCAST_TRANSPORTS=sse,polling), or none trusts its certificate."""
        if ended.code in HOPELESS:
            self._hopeless[transport] = ended
            if set(self._hopeless) >= set(self._order):
                if all(e.code == "transport_disabled" for e in self._hopeless.values()):
                    raise Refused(ended.status, "transport_disabled",
                                  f"the server at {self._http_base} offers none of the "
                                  f"transports asked for ({', '.join(self._order)})")
                raise Refused(ended.status, ended.code, ended.message)
        if not no_endpoint(transport, ended):
            self._missing.clear()
            return
        self._missing[transport] = ended
        # A bare 403 on the upgrade alone may be a proxy refusing WebSockets: at least
        # one answer must say plainly that nothing is there (a 404, a web page).
        sure = [e.status for e in self._missing.values() if e.status != 403]
        if set(self._missing) >= set(self._order) and sure:
            answers = ", ".join(f"{e.detail} on {PATHS[name]}"
                                for name, e in self._missing.items())
            raise Refused(404 if 404 in sure else sure[0], "not_found",
                          f"no dualcast server at {self._http_base} ({answers}): "
                          "check the URL and its path")

    def _retry_later(self, reason: str) -> None:
        timing = self._timing
        self._failures += 1
        offline = self._failures >= 2
        self._set_state(State.OFFLINE if offline else State.CONNECTING,
                        reason if offline else None)
        self._schedule(Timer.RETRY, timing.retry_base + backoff(
            self._failures, timing.retry_base, timing.retry_cap, self._rand))

    def _fall_back(self) -> None:
        self._level += 1
        self._deaths = []
        self._failures = 0
        self._open(quiet=self._rounds > 0)  # (in a round of retries: offline stays offline)
        self._schedule_climb()

    def _schedule_climb(self) -> None:
        if self._level == 0 or Timer.CLIMB in self._deadlines or self._probe is not None:
            return
        timing = self._timing
        self._schedule(Timer.CLIMB, backoff(self._climb_attempt, timing.climb_base,
                                            timing.climb_cap, self._rand))
        self._climb_attempt += 1

    def _probe_from(self, index: int) -> None:
        """Try the transports above the current one, best first."""
        if self._probe is not None:
            return
        if index >= self._level:
            self._schedule_climb()  # nothing better answered this round: later
            return
        self._probe = self._connect(self._order[index])
        self._schedule(Timer.PROBE_WELCOME, self._timing.welcome)

    # -- tokens ----------------------------------------------------------------

    def _schedule_refresh(self) -> None:
        self._clear(Timer.REFRESH)
        if not self._tokens.refreshable:
            return
        seconds = refresh_in(self._tokens.current)
        if seconds is not None:
            self._schedule(Timer.REFRESH, seconds)

    async def _refresh_token(self) -> None:
        """Before the token expires: a fresh one goes to the WebSocket in an `auth`
        frame. SSE and polling reconnect from the cursor with it: an SSE stream keeps
        the token it connected with, and a poll waiting at the server would be
        answered 401 when its token runs out. Such a planned reconnect is not
        reported as `connecting`."""
        old = self._tokens.current
        try:
            await self._tokens.refresh()
        except Exception as exc:
            log.warning("dualcast: the token source failed (%s); trying again in 5 s", exc)
            self._schedule(Timer.REFRESH, 5.0)
            return
        self._schedule_refresh()
        conn = self._conn
        if conn is None or self._tokens.current == old:
            return
        if conn.transport is Transport.WEBSOCKET:
            if await conn.send({"type": "auth", "token": self._tokens.current}):
                return
        self._drop(conn)
        self._conn = None
        self._clear(Timer.WELCOME)
        self._open(quiet=conn.welcomed)

