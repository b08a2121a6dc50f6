"""Producers' side: append dualcast events to the Redis Stream without ever slowing the caller.

An application (an LLM-API proxy, a worker, a script) publishes from its request
path, so a publish must never block or break that path:

* **Fail open.** Each call is bounded by a short timeout (`asyncio.timeout` plus
  redis socket timeouts, no client retries). When Redis is unreachable or slow
  the call returns ``None``; a circuit breaker then answers ``None`` at once
  while a background probe waits for Redis to come back, so during an outage the
  caller pays the timeout once, not on every call. Outages are logged once (rate
  limited) and counted in :attr:`Publisher.stats`.
* **Throttle / conflate.** ``publish(..., throttle_key=k, every=s)`` appends at
  most once per ``s`` seconds per key, with a leading and a trailing edge: the
  last value of a burst is appended when the interval ends, by a task the
  publisher owns (and flushes on close).
* **Batch.** :meth:`Publisher.publish_many` sends many entries in one pipeline
  round trip.
* **Local fallback** (opt-in): an object with ``publish_local(event, data, rooms)``
  (the in-process dualcast app) receives events while Redis is away.

The wire format is DESIGN.md's: ``XADD <stream> MAXLEN ~ <maxlen> * data <JSON
{"event","data","rooms"?}> timestamp <epoch ms>``, the same fields as
:func:`dualcast.events.entry_fields`. This module imports no server machinery, so
any application can use it without starting a server.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from datetime import date, datetime, timedelta
from datetime import time as dt_time
from decimal import Decimal
from enum import Enum
from typing import Any, Literal, Protocol
from uuid import UUID

import orjson
import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dualcast.events import EVENT_NAME_PATTERN, ROOM_NAME_PATTERN

__all__ = [
    "LocalFallback",
    "Publisher",
    "PublisherStats",
    "SyncPublisher",
    "encode_envelope",
]

log = logging.getLogger("dualcast.publisher")

#: The same limits the server's `Envelope` enforces, checked here at the call site.
MAX_ROOMS = 100
_EVENT_RE = re.compile(EVENT_NAME_PATTERN)
_ROOM_RE = re.compile(ROOM_NAME_PATTERN)
#: Largest integer a JavaScript number holds exactly; beyond it the dashboard gets a string.
MAX_SAFE_INT = 2**53 - 1
_JSON_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_STRICT_INTEGER | orjson.OPT_SERIALIZE_NUMPY

#: An item of `publish_many`: (event, data) or (event, data, rooms).
BatchItem = tuple[str, Any] | tuple[str, Any, Iterable[str] | None]


class LocalFallback(Protocol):
    """Where events go while Redis is unreachable: the in-process dualcast app's hub."""

    def publish_local(self, event: str, data: Any, rooms: list[str]) -> str: ...


@dataclass
class PublisherStats:
    """Counters of one publisher; every event offered ends in exactly one outcome counter.

    Outcomes: ``published`` (appended to Redis), ``fallback`` (handed to the local
    fallback), ``dropped`` (lost: returned None), ``conflated`` (a throttled value
    replaced by a newer one before it was due). ``failed`` counts events whose
    Redis call errored or timed out; ``short_circuited`` those refused at once
    while the breaker was open; ``overloaded`` those that waited the whole timeout
    for a free connection behind this process's own publishes (all three then
    end as fallback or dropped).
    """

    published: int = 0
    fallback: int = 0
    dropped: int = 0
    conflated: int = 0
    failed: int = 0
    short_circuited: int = 0
    overloaded: int = 0
    outages: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# --------------------------------------------------------------------------- encoding


def _safe_str(obj: Any) -> str:
    try:
        return str(obj)
    except Exception:  # a hostile __str__ still must not break the caller
        return f"<unencodable {type(obj).__name__}>"


def _json_default(obj: Any) -> Any:
    """What orjson cannot encode natively, as a dashboard wants it; never raises."""
    if isinstance(obj, Decimal):
        if obj.is_finite():
            # the exact decimal text as a JSON number: sums on the dashboard stay numeric
            return orjson.Fragment(str(obj).replace("E", "e"))
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        try:
            return sorted(obj)
        except TypeError:
            return list(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode("utf-8", "replace")
    if isinstance(obj, timedelta):
        return obj.total_seconds()
    if isinstance(obj, Mapping):
        return dict(obj)
    for method, kwargs in (("model_dump", {"mode": "json"}), ("isoformat", {})):
        # pydantic models and other libraries' date-likes, without importing them
        func = getattr(obj, method, None)
        if callable(func):
            try:
                return func(**kwargs)
            except Exception:
                return _safe_str(obj)
    if isinstance(obj, Iterable) and not isinstance(obj, str):
        try:
            return list(obj)
        except Exception:
            return _safe_str(obj)
    return _safe_str(obj)


_LEAVES = (str, float, type(None), datetime, date, dt_time, UUID, Decimal)


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bool) or key is None:
        return orjson.dumps(key).decode()
    if isinstance(key, (datetime, date, dt_time)):
        return key.isoformat()
    return _safe_str(key)


def _native(value: Any, path: set[int], depth: int) -> Any:
    """A JSON-ready copy: big integers as strings, cycles and absurd depth cut off."""
    if isinstance(value, bool) or isinstance(value, _LEAVES):
        return value
    if isinstance(value, int):
        return value if -MAX_SAFE_INT <= value <= MAX_SAFE_INT else str(value)
    if isinstance(value, Enum):
        return _native(value.value, path, depth)
    if depth > 100:
        return "<too deep>"
    if id(value) in path:
        return "<cycle>"
    path.add(id(value))
    try:
        if isinstance(value, Mapping):
            return {_key(k): _native(v, path, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple, deque)):
            return [_native(v, path, depth + 1) for v in value]
        if is_dataclass(value) and not isinstance(value, type):
            return {f.name: _native(getattr(value, f.name, None), path, depth + 1)
                    for f in fields(value)}
        converted = _json_default(value)
        if isinstance(converted, (dict, list)):
            return _native(converted, path, depth + 1)
        return converted
    finally:
        path.discard(id(value))


def encode_envelope(event: str, data: Any, rooms: Sequence[str]) -> str:
    """The JSON of the stream entry's ``data`` field; encodes any value, never raises.

    Datetimes, dates and times become ISO 8601 strings, UUIDs strings, Decimals
    JSON numbers (non-finite ones strings), sets lists, bytes text, timedeltas
    seconds, integers beyond 2^53 strings, NaN/Infinity null, cycles
    ``"<cycle>"``; anything else ``str()``.
    """
    body: dict[str, Any] = {"event": event, "data": data}
    if rooms:
        body["rooms"] = list(rooms)
    try:  # the fast path: orjson alone (it refuses integers beyond 2^53 here)
        return orjson.dumps(body, default=_json_default, option=_JSON_OPTS).decode()
    except TypeError:  # orjson.JSONEncodeError
        pass
    try:
        body["data"] = _native(data, set(), 0)
        return orjson.dumps(body, default=_json_default, option=_JSON_OPTS).decode()
    except Exception:
        body["data"] = _safe_str(data)
        return orjson.dumps(body).decode()


def _check_event(event: str) -> None:
    if not isinstance(event, str) or not _EVENT_RE.match(event):
        raise ValueError(f"event name {str(event)[:70]!r} does not match {EVENT_NAME_PATTERN}")


def _check_rooms(rooms: Iterable[str] | None) -> list[str]:
    """Validated, de-duplicated rooms in order; a programming error raises ValueError."""
    if rooms is None:
        return []
    if isinstance(rooms, (str, bytes)):
        raise ValueError("rooms must be a list of room names, not a single string")
    out: list[str] = []
    seen: set[str] = set()
    for room in rooms:
        if not isinstance(room, str) or not _ROOM_RE.match(room):
            raise ValueError(f"room name {str(room)[:70]!r} does not match {ROOM_NAME_PATTERN}")
        if room not in seen:
            seen.add(room)
            out.append(room)
    if len(out) > MAX_ROOMS:
        raise ValueError(f"{len(out)} rooms: at most {MAX_ROOMS} per event")
    return out


@dataclass(slots=True)
class _Entry:
    """One validated, encoded event, ready to append (or to hand to the fallback)."""

    event: str
    rooms: list[str]
    body: str  # the JSON of the `data` field
    ts: int = 0  # epoch ms; stamped when the entry is appended

    def fields(self) -> dict[str, str]:
        ts = self.ts or int(time.time() * 1000)
        return {"data": self.body, "timestamp": str(ts)}

    def local_data(self) -> Any:
        """The data as the stream would carry it (so the fallback sees the same JSON)."""
        return orjson.loads(self.body).get("data")


def _prepare(event: str, data: Any, rooms: Iterable[str] | None) -> _Entry:
    _check_event(event)
    room_list = _check_rooms(rooms)
    return _Entry(event, room_list, encode_envelope(event, data, room_list))


# --------------------------------------------------------------------------- throttle


class _Slot:
    __slots__ = ("every", "last_sent", "pending")

    def __init__(self, every: float, last_sent: float) -> None:
        self.every = every
        self.last_sent = last_sent
        self.pending: _Entry | None = None


class _Conflator:
    """Leading + trailing throttle per key, driven by a clock the owner passes in.

    A key's first value goes out at once (leading edge); values offered within
    the interval replace one another and the last one goes out when the interval
    ends (trailing edge), which starts a new interval. A heap of due times keeps
    the work per wake-up O(log n), whatever the number of keys.
    """

    def __init__(self) -> None:
        self.slots: dict[str, _Slot] = {}
        self._due: list[tuple[float, int, str]] = []
        self._seq = 0

    def _schedule(self, key: str, at: float) -> None:
        self._seq += 1
        heapq.heappush(self._due, (at, self._seq, key))

    def offer(self, key: str, every: float, entry: _Entry, now: float) -> tuple[bool, bool]:
        """Return (send_now, replaced): send at once, or hold; `replaced` if a held value died."""
        slot = self.slots.get(key)
        if slot is None:
            self.slots[key] = _Slot(every, now)
            self._schedule(key, now + every)
            return True, False
        slot.every = every
        if slot.pending is None and now >= slot.last_sent + every:
            slot.last_sent = now  # the timer is late; this is a new leading edge
            return True, False
        replaced = slot.pending is not None
        slot.pending = entry
        return False, replaced

    def next_due(self) -> float | None:
        return self._due[0][0] if self._due else None

    def pop_due(self, now: float) -> list[_Entry]:
        """The trailing values whose interval has ended; idle keys are forgotten."""
        out: list[_Entry] = []
        while self._due and self._due[0][0] <= now:
            _, _, key = heapq.heappop(self._due)
            slot = self.slots.get(key)
            if slot is None:
                continue
            if now < slot.last_sent + slot.every:  # `every` changed or a late leading edge
                self._schedule(key, slot.last_sent + slot.every)
                continue
            if slot.pending is None:
                del self.slots[key]
                continue
            out.append(slot.pending)
            slot.pending = None
            slot.last_sent = now
            self._schedule(key, now + slot.every)
        return out

    def drain(self) -> list[_Entry]:
        """Every held value, at once (on close: the last value is never lost)."""
        out = [slot.pending for slot in self.slots.values() if slot.pending is not None]
        self.slots.clear()
        self._due.clear()
        return out


# --------------------------------------------------------------------------- breaker


class _Breaker:
    """Open after a failure; closed again once a probe succeeds. Also rate-limits the log."""

    def __init__(self, cooldown: float, cooldown_max: float, log_every: float) -> None:
        self.cooldown_min = cooldown
        self.cooldown_max = cooldown_max
        self.cooldown = cooldown
        self.log_every = log_every
        self.open = False
        self.opened_at = 0.0
        self.retry_at = 0.0
        self._last_log = -math.inf

    def failure(
        self, exc: BaseException, stats: PublisherStats, where: str, outcome: str,
        probe: bool = False,
    ) -> None:
        now = time.monotonic()
        if self.open:
            if probe:  # a failed probe backs off; calls that were in flight do not
                self.cooldown = min(self.cooldown * 2, self.cooldown_max)
                self.retry_at = now + self.cooldown
            return
        self.open = True
        self.opened_at = now
        self.cooldown = self.cooldown_min
        self.retry_at = now + self.cooldown
        stats.outages += 1
        if now - self._last_log >= self.log_every:
            self._last_log = now
            log.warning(
                "publisher: Redis at %s unavailable (%s: %s); events are %s until it is back",
                where, type(exc).__name__, exc or "timeout", outcome,
            )

    def success(self, stats: PublisherStats) -> None:
        if not self.open:
            return
        self.open = False
        self.cooldown = self.cooldown_min
        log.info(
            "publisher: Redis is back after %.1f s (so far: %d failed, %d short-circuited, "
            "%d sent to the local fallback, %d dropped)",
            time.monotonic() - self.opened_at, stats.failed, stats.short_circuited,
            stats.fallback, stats.dropped,
        )

    def probe_due(self) -> bool:
        """For the sync publisher: let one call through as a probe once the cooldown passed."""
        now = time.monotonic()
        if now < self.retry_at:
            return False
        self.retry_at = now + self.cooldown  # other threads keep short-circuiting meanwhile
        return True


_FAILURES: tuple[type[BaseException], ...] = (redis.RedisError, OSError, TimeoutError)


def _redact(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


class _Core:
    """What the async and sync publishers share: settings, stats, fallback, outcome accounting."""

    def __init__(
        self, redis_url: str | None, stream: str, maxlen: int | None, timeout: float,
        fallback: LocalFallback | None, cooldown: float, cooldown_max: float,
        log_every: float,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if maxlen is not None and maxlen < 1:
            raise ValueError("maxlen must be >= 1 (or None for no trim)")
        self.redis_url = redis_url
        self.stream = stream
        self.maxlen = maxlen
        self.timeout = timeout
        self.fallback = fallback
        self.stats = PublisherStats()
        self._breaker = _Breaker(cooldown, cooldown_max, log_every)
        self._conflator = _Conflator()
        self._where = _redact(redis_url) if redis_url else "(none)"
        self._last_error_log = -math.inf
        self._log_every = log_every

    @property
    def _outcome(self) -> str:
        return "sent to the local fallback" if self.fallback is not None else "dropped (fail open)"

    @property
    def available(self) -> bool:
        """False while the breaker is open (Redis considered unreachable)."""
        return self.redis_url is not None and not self._breaker.open

    def _connection_kwargs(self) -> dict[str, Any]:
        return {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "retry": Retry(NoBackoff(), 0),  # the breaker, not the client, decides on retries
            "decode_responses": True,
        }

    def _validate_throttle(self, throttle_key: str | None, every: float | None) -> float | None:
        if throttle_key is None:
            if every is not None:
                raise ValueError("every= needs a throttle_key=")
            return None
        if not isinstance(throttle_key, str) or not throttle_key:
            raise ValueError("throttle_key must be a non-empty string")
        interval = 1.0 if every is None else float(every)
        if not interval > 0 or math.isinf(interval):
            raise ValueError("every must be a positive number of seconds")
        return interval

    def _fail(
        self, entries: Sequence[_Entry],
        reason: Literal["failed", "short_circuited", "overloaded", "local"],
    ) -> list[str | None]:
        """Redis did not take `entries`: hand them to the fallback or drop them."""
        if reason == "failed":
            self.stats.failed += len(entries)
        elif reason == "short_circuited":
            self.stats.short_circuited += len(entries)
        elif reason == "overloaded":
            self.stats.overloaded += len(entries)
        if self.fallback is None:
            self.stats.dropped += len(entries)
            return [None] * len(entries)
        out: list[str | None] = []
        for entry in entries:
            try:
                out.append(self.fallback.publish_local(entry.event, entry.local_data(),
                                                       list(entry.rooms)))
                self.stats.fallback += 1
            except Exception as exc:  # the fallback must not break the caller either
                self.stats.dropped += 1
                out.append(None)
                self._log_error("local fallback failed", exc)
        return out

    def _log_error(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= self._log_every:
            self._last_error_log = now
            log.warning("publisher: %s (%s: %s)", what, type(exc).__name__, exc)

    def _results(self, entries: Sequence[_Entry], replies: Sequence[Any]) -> list[str | None]:
        """Per-entry outcome of a pipeline; an entry Redis refused goes to the fallback path."""
        out: list[str | None] = []
        for entry, reply in zip(entries, replies, strict=True):
            if isinstance(reply, BaseException):
                self._log_error(f"Redis refused XADD to {self.stream!r}", reply)
                out.extend(self._fail([entry], "failed"))
            else:
                self.stats.published += 1
                out.append(str(reply))
        return out

    def _xadd_args(self) -> dict[str, Any]:
        if self.maxlen is None:
            return {}
        return {"maxlen": self.maxlen, "approximate": True}


# --------------------------------------------------------------------------- async


class Publisher(_Core):
    """Async publisher; use as ``async with Publisher(url) as pub: await pub.publish(...)``.

    ``redis_url=None`` publishes to the fallback only (a single-process app
    without Redis). ``cooldown`` is the first pause of the breaker before it
    probes Redis again (doubling up to ``cooldown_max``); ``max_connections``
    bounds the pool (callers beyond it wait, within the timeout).
    """

    def __init__(
        self,
        redis_url: str | None,
        stream: str = "websocket-broadcast",
        maxlen: int | None = 10_000,
        timeout: float = 0.5,
        fallback: LocalFallback | None = None,
        *,
        cooldown: float = 0.5,
        cooldown_max: float = 5.0,
        log_every: float = 30.0,
        max_connections: int = 16,
    ) -> None:
        super().__init__(redis_url, stream, maxlen, timeout, fallback, cooldown, cooldown_max,
                         log_every)
        self._slots = asyncio.Semaphore(max_connections)
        self._redis: aioredis.Redis | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            assert self.redis_url is not None
            # the semaphore in _append bounds the connections: cheaper than redis-py's
            # BlockingConnectionPool on every call, and a plain pool never raises "Too many
            # connections" because no more than `max_connections` callers reach it at once
            pool = aioredis.ConnectionPool.from_url(self.redis_url, **self._connection_kwargs())
            self._redis = aioredis.Redis(connection_pool=pool)
        return self._redis

    async def publish(
        self,
        event: str,
        data: Any = None,
        rooms: Iterable[str] | None = None,
        *,
        throttle_key: str | None = None,
        every: float | None = None,
    ) -> str | None:
        """Append one event; its stream id, or None (not appended now, or Redis away).

        With ``throttle_key``, at most one append per ``every`` seconds (default 1)
        for that key: a call inside the interval returns None at once and its value
        is appended at the end of the interval unless a newer one replaces it.
        Raises ValueError only for a bad event name, room, or throttle argument.
        """
        entry = _prepare(event, data, rooms)
        interval = self._validate_throttle(throttle_key, every)
        if interval is not None:
            assert throttle_key is not None
            send_now, replaced = self._conflator.offer(
                throttle_key, interval, entry, time.monotonic()
            )
            if replaced:
                self.stats.conflated += 1
            self._ensure_flusher()
            if not send_now:
                return None
        return (await self._append([entry]))[0]

    async def publish_many(self, items: Iterable[BatchItem]) -> list[str | None]:
        """Append several events in one pipeline round trip; ids (or None) in order.

        Every item is validated before anything is sent, so a bad name appends nothing.
        """
        entries = []
        for item in items:
            if not isinstance(item, tuple) or len(item) not in (2, 3):
                raise ValueError("publish_many items are (event, data) or (event, data, rooms)")
            entries.append(_prepare(item[0], item[1], item[2] if len(item) == 3 else None))
        if not entries:
            return []
        return await self._append(entries)

    async def _append(self, entries: list[_Entry]) -> list[str | None]:
        if self._closed:  # a bug in the caller, but still not one to raise into its path
            self._log_error("publish after close", RuntimeError("publisher is closed"))
            self.stats.dropped += len(entries)
            return [None] * len(entries)
        if self.redis_url is None:
            return self._fail(entries, "local")
        if self._breaker.open:
            return self._fail(entries, "short_circuited")
        sending = False
        replies: list[Any] | None = None
        try:
            async with asyncio.timeout(self.timeout):
                async with self._slots:  # callers beyond the pool size wait, within the timeout
                    if not self._breaker.open:  # it may have opened while this call waited
                        sending = True
                        replies = await self._send(entries)
        except _FAILURES as exc:
            if not sending:
                # queued behind this process's own publishes for the whole timeout: a local
                # overload, not a Redis outage, so the breaker stays closed
                self._log_error("publisher overloaded: no connection free within the timeout",
                                exc)
                return self._fail(entries, "overloaded")
            self._breaker.failure(exc, self.stats, self._where, self._outcome)
            self._ensure_prober()
            return self._fail(entries, "failed")
        except asyncio.CancelledError:
            raise  # the caller's own cancellation
        except Exception as exc:  # never into the caller: count it and go on
            self._log_error("unexpected publish error", exc)
            return self._fail(entries, "failed")
        if replies is None:
            return self._fail(entries, "short_circuited")
        return self._results(entries, replies)

    async def _send(self, entries: list[_Entry]) -> list[Any]:
        client = self._client()
        args = self._xadd_args()
        if len(entries) == 1:
            try:
                return [await client.xadd(self.stream, entries[0].fields(), **args)]  # type: ignore[arg-type]
            except redis.ResponseError as exc:  # Redis answered: a refusal, not an outage
                return [exc]
        async with client.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.xadd(self.stream, entry.fields(), **args)  # type: ignore[arg-type]
            return list(await pipe.execute(raise_on_error=False))

    # -- breaker probe: the caller never waits for Redis while it is known to be away

    def _ensure_prober(self) -> None:
        idle = self._prober is None or self._prober.done()
        if self._breaker.open and idle and not self._closed:
            self._prober = asyncio.create_task(self._probe(), name="dualcast-publisher-probe")

    async def _probe(self) -> None:
        while self._breaker.open and not self._closed:
            await asyncio.sleep(max(0.0, self._breaker.retry_at - time.monotonic()))
            try:
                async with asyncio.timeout(self.timeout):
                    await self._client().ping()
            except _FAILURES as exc:
                self._breaker.failure(exc, self.stats, self._where, self._outcome, probe=True)
            except Exception as exc:
                self._log_error("unexpected probe error", exc)
                self._breaker.failure(exc, self.stats, self._where, self._outcome, probe=True)
            else:
                self._breaker.success(self.stats)

    # -- trailing edges of the throttle

    def _ensure_flusher(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if (self._flusher is None or self._flusher.done()) and not self._closed:
            self._flusher = asyncio.create_task(self._flush_loop(), name="dualcast-publisher-flush")

    async def _flush_loop(self) -> None:
        assert self._wake is not None
        while not self._closed:
            self._wake.clear()
            due_at = self._conflator.next_due()
            if due_at is None:
                await self._wake.wait()
                continue
            delay = due_at - time.monotonic()
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                    continue  # a new key may be due earlier: recompute
                except TimeoutError:
                    pass
            entries = self._conflator.pop_due(time.monotonic())
            if entries:
                try:
                    await self._append(entries)
                except Exception as exc:  # keep the loop alive whatever happens
                    self._log_error("trailing publish failed", exc)

    async def flush(self) -> list[str | None]:
        """Append every held trailing value now (close does this too)."""
        entries = self._conflator.drain()
        return await self._append(entries) if entries else []

    async def aclose(self) -> None:
        """Flush held throttled values, stop the background tasks, close the connections."""
        if self._closed:
            return
        try:
            await self.flush()
        finally:
            self._closed = True
            for task in (self._flusher, self._prober):
                if task is not None and not task.done():
                    task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        pass
            if self._redis is not None:
                try:
                    await self._redis.aclose()
                    await self._redis.connection_pool.disconnect()
                except Exception as exc:
                    self._log_error("closing the Redis client failed", exc)


# --------------------------------------------------------------------------- sync


class SyncPublisher(_Core):
    """The blocking variant for scripts and threads: same API, same fail-open behaviour.

    Without an event loop the breaker probes inline: once its cooldown has
    passed, one call is let through to Redis (and may pay the timeout); the
    others keep returning at once. Trailing throttle edges are appended by a
    daemon thread the publisher owns and stops (after a flush) on close.
    """

    def __init__(
        self,
        redis_url: str | None,
        stream: str = "websocket-broadcast",
        maxlen: int | None = 10_000,
        timeout: float = 0.5,
        fallback: LocalFallback | None = None,
        *,
        cooldown: float = 0.5,
        cooldown_max: float = 5.0,
        log_every: float = 30.0,
        max_connections: int = 16,
    ) -> None:
        super().__init__(redis_url, stream, maxlen, timeout, fallback, cooldown, cooldown_max,
                         log_every)
        self._redis: redis.Redis | None = None
        self._max_connections = max_connections
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False

    def __enter__(self) -> SyncPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _client(self) -> redis.Redis:
        with self._lock:
            if self._redis is None:
                assert self.redis_url is not None
                pool = redis.BlockingConnectionPool.from_url(
                    self.redis_url, max_connections=self._max_connections, timeout=self.timeout,
                    **self._connection_kwargs(),
                )
                self._redis = redis.Redis(connection_pool=pool)
            return self._redis

    def publish(
        self,
        event: str,
        data: Any = None,
        rooms: Iterable[str] | None = None,
        *,
        throttle_key: str | None = None,
        every: float | None = None,
    ) -> str | None:
        """See :meth:`Publisher.publish`."""
        entry = _prepare(event, data, rooms)
        interval = self._validate_throttle(throttle_key, every)
        if interval is not None:
            assert throttle_key is not None
            with self._cond:
                send_now, replaced = self._conflator.offer(
                    throttle_key, interval, entry, time.monotonic()
                )
                if replaced:
                    self.stats.conflated += 1
                self._ensure_thread()
                self._cond.notify()
            if not send_now:
                return None
        return self._append([entry])[0]

    def publish_many(self, items: Iterable[BatchItem]) -> list[str | None]:
        """See :meth:`Publisher.publish_many`."""
        entries = []
        for item in items:
            if not isinstance(item, tuple) or len(item) not in (2, 3):
                raise ValueError("publish_many items are (event, data) or (event, data, rooms)")
            entries.append(_prepare(item[0], item[1], item[2] if len(item) == 3 else None))
        return self._append(entries) if entries else []

    def _append(self, entries: list[_Entry]) -> list[str | None]:
        if self._closed:  # a bug in the caller, but still not one to raise into its path
            self._log_error("publish after close", RuntimeError("publisher is closed"))
            self.stats.dropped += len(entries)
            return [None] * len(entries)
        if self.redis_url is None:
            return self._fail(entries, "local")
        with self._lock:
            if self._breaker.open and not self._breaker.probe_due():
                return self._fail(entries, "short_circuited")
        try:
            client = self._client()
            args = self._xadd_args()
            replies: list[Any]
            if len(entries) == 1:
                try:
                    replies = [client.xadd(self.stream, entries[0].fields(), **args)]  # type: ignore[arg-type]
                except redis.ResponseError as exc:  # Redis answered: a refusal, not an outage
                    replies = [exc]
            else:
                with client.pipeline(transaction=False) as pipe:
                    for entry in entries:
                        pipe.xadd(self.stream, entry.fields(), **args)  # type: ignore[arg-type]
                    replies = list(pipe.execute(raise_on_error=False))
        except _FAILURES as exc:
            if isinstance(exc, redis.ConnectionError) and "No connection available" in str(exc):
                # every pooled connection busy with this process's other threads for the
                # whole timeout: a local overload, not a Redis outage
                self._log_error("publisher overloaded: no connection free within the timeout",
                                exc)
                return self._fail(entries, "overloaded")
            with self._lock:
                self._breaker.failure(exc, self.stats, self._where, self._outcome,
                                      probe=self._breaker.open)
            return self._fail(entries, "failed")
        except Exception as exc:
            self._log_error("unexpected publish error", exc)
            return self._fail(entries, "failed")
        with self._lock:
            self._breaker.success(self.stats)
        return self._results(entries, replies)

    def _ensure_thread(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(
                target=self._flush_loop, name="dualcast-publisher-flush", daemon=True
            )
            self._thread.start()

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    due_at = self._conflator.next_due()
                    now = time.monotonic()
                    if due_at is not None and due_at <= now:
                        break
                    self._cond.wait(None if due_at is None else due_at - now)
                if self._closed:
                    return
                entries = self._conflator.pop_due(time.monotonic())
            if entries:
                try:
                    self._append(entries)
                except Exception as exc:
                    self._log_error("trailing publish failed", exc)

    def flush(self) -> list[str | None]:
        """Append every held trailing value now (close does this too)."""
        with self._cond:
            entries = self._conflator.drain()
            self._cond.notify()
        return self._append(entries) if entries else []

    def close(self) -> None:
        """Flush held throttled values, stop the flush thread, close the connections."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            if self._thread is not None:
                self._thread.join(timeout=self.timeout * 2 + 1)
            if self._redis is not None:
                try:
                    self._redis.close()
                    self._redis.connection_pool.disconnect()
                except Exception as exc:
                    self._log_error("closing the Redis client failed", exc)

