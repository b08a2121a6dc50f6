"""The asyncio front: `Publisher`, for applications that publish from an event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any, Unpack

import redis

from dualcast.publisher.core import FAILURES, HELD, BatchItem, PublisherCore, Throttle, ids
from dualcast.publisher.encoding import Entry
from dualcast.publisher.results import PublishResult, describe, unanswered
from dualcast.redis_connect import AsyncClient, Pooling, async_client


class Publisher(PublisherCore):
    """Async publisher; use as ``async with Publisher(url) as pub: await pub.publish(...)``.

    While the breaker is open, a background task probes Redis (PING) and every
    call is answered at once; trailing throttle edges are appended by a task the
    publisher owns. Both end with :meth:`aclose`. See :class:`PublisherCore` for
    the options.
    """

    _redis: AsyncClient | None = None
    _slots_: asyncio.Semaphore | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _flusher: asyncio.Task[None] | None = None
    _prober: asyncio.Task[None] | None = None
    _wake: asyncio.Event | None = None

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def _slots(self) -> asyncio.Semaphore:
        """Callers allowed to talk to Redis at once; the others wait, within their timeout."""
        if self._slots_ is None:
            self._slots_ = asyncio.Semaphore(self.max_connections)
        return self._slots_

    def _client(self) -> AsyncClient:
        if self._redis is None:
            assert self._target is not None
            # the semaphore in _append bounds the connections: cheaper than redis-py's
            # BlockingConnectionPool on every call, and a plain pool never raises "Too many
            # connections" because no more than `max_connections` callers reach it at once
            self._redis = async_client(self._target, self.tls, Pooling(self.max_connections),
                                       **self._connection_kwargs())
        return self._redis

    async def publish(self, event: str, data: Any = None, rooms: Iterable[str] | None = None,
                      **throttle: Unpack[Throttle]) -> str | None:
        """Append one event; its stream id, or None (not appended now, or Redis away).

        With ``throttle_key``, at most one append per ``every`` seconds (default 1)
        for that key: a call inside the interval returns None at once and its value
        is appended at the end of the interval unless a newer one replaces it.
        Raises ValueError only for a bad event name, room, data a server could not
        deliver (:class:`~dualcast.publisher.encoding.UnpublishableValue`), or a bad
        throttle argument.
        """
        entry = self._admit(event, data, rooms, throttle)  # not via publish_result: one
        return None if entry is None else (await self._append([entry]))[0].id  # coroutine less

    async def publish_result(self, event: str, data: Any = None,
                             rooms: Iterable[str] | None = None,
                             **throttle: Unpack[Throttle]) -> PublishResult:
        """Like :meth:`publish`, with the outcome and the replicas that acknowledged it."""
        entry = self._admit(event, data, rooms, throttle)
        return HELD if entry is None else (await self._append([entry]))[0]

    async def publish_many(self, items: Iterable[BatchItem]) -> list[str | None]:
        """Append several events in one pipeline round trip; ids (or None) in order.

        Every item is validated before anything is sent, so a bad one appends nothing.
        """
        return ids(await self.publish_many_results(items))

    async def publish_many_results(self, items: Iterable[BatchItem]) -> list[PublishResult]:
        """Like :meth:`publish_many`, with each outcome (one WAIT covers the whole batch)."""
        entries = self._batch(items)
        return await self._append(entries) if entries else []

    def _on_this_loop(self) -> None:
        """Connections and the semaphore belong to the loop that made them. A publisher
        kept across loops (a module-level one, `asyncio.run()` per task or per test) once
        failed every other call with "Event loop is closed" (dropped: the pooled
        connection of the dead loop), so a new loop gets a client of its own; the old
        one's connections went with their loop."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._redis = self._slots_ = None
            # (tasks of a loop that was closed without cancelling them never end)
            self._prober = self._flusher = None
            self._wake = None

    async def _append(self, entries: Sequence[Entry]) -> list[PublishResult]:
        refused = self._gate(entries, may_probe=False)
        if refused is not None:
            return refused
        self._on_this_loop()
        sending = False
        try:
            async with asyncio.timeout(self._call_timeout):
                async with self._slots:  # callers beyond the pool size wait, within the timeout
                    if self._breaker.open:  # it may have opened while this call waited
                        return self._short_circuited(entries)
                    sending = True
                    replies = await self._send(entries)
        except FAILURES as exc:
            results = self._failed(entries, exc, outage=sending, probing=False)
            self._ensure_prober()
            return results
        except asyncio.CancelledError:
            raise  # the caller's own cancellation
        except Exception as exc:
            return self._broken(entries, exc)
        return self._finish(entries, replies)

    async def _send(self, entries: Sequence[Entry]) -> list[Any]:
        """The replies to `entries`, sent once more at once when the first try surely never
        left: its connection failed before anything was written (a pooled connection found
        dead). One cut after the write is never repeated: it may have been appended."""
        try:
            return await self._send_once(entries)
        except redis.ConnectionError as exc:
            if unanswered(exc):
                raise
        return await self._send_once(entries)

    async def _send_once(self, entries: Sequence[Entry]) -> list[Any]:
        client = self._client()
        if len(entries) == 1 and self._single:
            try:
                return [await client.xadd(*self._xadd(entries[0]))]
            except redis.ResponseError as exc:  # Redis answered: a refusal, not an outage
                return [exc]
        async with client.pipeline(transaction=False) as pipe:
            return list(await self._queue(pipe, entries).execute(raise_on_error=False))

    async def ping(self, timeout: float | None = None) -> str | None:
        """PING Redis once, within ``timeout`` (default: the publisher's), and check that
        the stream key is a stream or free: None when it can be published to, else why
        not, in one line (as :attr:`PublishResult.error` says it). For a start-up check
        (``dualcast demo``); publishing needs none. Raises nothing; the breaker is left
        alone."""
        if self._target is None:
            return "no Redis URL (this publisher sends to its fallback only)"
        self._on_this_loop()
        try:
            async with asyncio.timeout(self.timeout if timeout is None else timeout):
                client = self._client()
                await client.ping()
                raw = await client.type(self.stream)
                kind = raw.decode() if isinstance(raw, bytes) else str(raw)
        except FAILURES as exc:
            return describe(exc)
        if kind not in ("none", "stream"):  # every XADD would be refused (WRONGTYPE)
            return (f"the key {self.stream!r} holds a {kind}, not a stream: every event "
                    "would be refused (choose another stream key, DUALCAST_STREAM)")
        return None

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
            except FAILURES as exc:
                self._breaker.failure(exc, self.stats, self._where, self._outcome, probe=True)
            except Exception as exc:
                self._log_error("unexpected probe error", exc)
                self._breaker.failure(exc, self.stats, self._where, self._outcome, probe=True)
            else:
                self._breaker.success(self.stats)

    # -- trailing edges of the throttle

    def _throttled(self) -> None:
        self._on_this_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if (self._flusher is None or self._flusher.done()) and not self._closed:
            self._flusher = asyncio.create_task(self._flush_loop(), name="dualcast-publisher-flush")

    async def _flush_loop(self) -> None:
        assert self._wake is not None
        while not self._closed:
            entries, delay = self._take_due()
            if entries:
                await self._append(entries)  # never raises: every outcome is counted
                continue
            self._wake.clear()  # no await since _take_due: a value offered meanwhile is seen
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def flush(self) -> list[str | None]:
        """Append every held trailing value now (close does this too)."""
        entries = self._take_all()
        return ids(await self._append(entries)) if entries else []

    async def aclose(self) -> None:
        """Flush held throttled values, stop the background tasks, close the connections."""
        if self._closed:
            return
        self._on_this_loop()
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
                    await self._redis.aclose()  # it owns its pool: this closes every connection
                except Exception as exc:
                    self._log_error("closing the Redis client failed", exc)
