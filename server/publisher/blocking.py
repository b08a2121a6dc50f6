"""The blocking front: `SyncPublisher`, for scripts and threads; same API, same fail-open rules."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any, Unpack

import redis

from dualcast.publisher.core import FAILURES, HELD, BatchItem, PublisherCore, Throttle, ids
from dualcast.publisher.encoding import Entry
from dualcast.publisher.results import PublishResult
from dualcast.redis_connect import Pooling, SyncClient, sync_client


class SyncPublisher(PublisherCore):
    """The blocking variant of :class:`~dualcast.publisher.Publisher`; thread-safe.

    Without an event loop the breaker probes inline: once its cooldown has
    passed, one call is let through to Redis (and may pay the timeout); the
    others keep returning at once. Trailing throttle edges are appended by a
    daemon thread the publisher owns and stops (after a flush) on close.
    """

    _redis: SyncClient | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> SyncPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _make_lock() -> threading.Condition:
        """A lock for the threads (an RLock inside) that also wakes the flush thread."""
        return threading.Condition()

    @property
    def _cond(self) -> threading.Condition:
        cond = self._lock
        assert isinstance(cond, threading.Condition)
        return cond

    def _client(self) -> SyncClient:
        with self._lock:
            if self._redis is None:
                assert self._target is not None
                pooling = Pooling(self.max_connections, wait=self.timeout)
                self._redis = sync_client(self._target, self.tls, pooling,
                                          **self._connection_kwargs())
            return self._redis

    def publish(self, event: str, data: Any = None, rooms: Iterable[str] | None = None,
                **throttle: Unpack[Throttle]) -> str | None:
        """See :meth:`Publisher.publish <dualcast.publisher.Publisher.publish>`."""
        return self.publish_result(event, data, rooms, **throttle).id

    def publish_result(self, event: str, data: Any = None, rooms: Iterable[str] | None = None,
                       **throttle: Unpack[Throttle]) -> PublishResult:
        """See :meth:`Publisher.publish_result <dualcast.publisher.Publisher.publish_result>`."""
        entry = self._admit(event, data, rooms, throttle)
        return HELD if entry is None else self._append([entry])[0]

    def publish_many(self, items: Iterable[BatchItem]) -> list[str | None]:
        """See :meth:`Publisher.publish_many <dualcast.publisher.Publisher.publish_many>`."""
        return ids(self.publish_many_results(items))

    def publish_many_results(self, items: Iterable[BatchItem]) -> list[PublishResult]:
        """Like :meth:`publish_many`, with each outcome (one WAIT covers the whole batch)."""
        entries = self._batch(items)
        return self._append(entries) if entries else []

    def _append(self, entries: Sequence[Entry]) -> list[PublishResult]:
        refused = self._gate(entries, may_probe=True)
        if refused is not None:
            return refused
        try:
            replies = self._send(entries)
        except FAILURES as exc:
            # every pooled connection busy with this process's other threads for the
            # whole timeout is a local overload, not a Redis outage
            waited = "No connection available" in str(exc)
            outage = not (waited and isinstance(exc, redis.ConnectionError))
            return self._failed(entries, exc, outage=outage, probing=True)
        except Exception as exc:
            return self._broken(entries, exc)
        return self._finish(entries, replies)

    def _send(self, entries: Sequence[Entry]) -> list[Any]:
        client = self._client()
        if len(entries) != 1 or not self._single:
            with client.pipeline(transaction=False) as pipe:
                return list(self._queue(pipe, entries).execute(raise_on_error=False))
        try:
            return [client.xadd(*self._xadd(entries[0]))]
        except redis.ResponseError as exc:  # Redis answered: a refusal, not an outage
            return [exc]

    # -- trailing edges of the throttle

    def _throttled(self) -> None:
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._flush_loop, name="dualcast-publisher-flush", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                entries, delay = self._take_due()
                if not entries:
                    self._cond.wait(delay)
                    continue
            self._append(entries)  # never raises: every outcome is counted

    def flush(self) -> list[str | None]:
        """Append every held trailing value now (close does this too)."""
        entries = self._take_all()
        return ids(self._append(entries)) if entries else []

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
                self._thread.join(timeout=self._call_timeout * 2 + 1)
            if self._redis is not None:
                try:
                    self._redis.close()  # it owns its pool: this closes every connection
                except Exception as exc:
                    self._log_error("closing the Redis client failed", exc)
