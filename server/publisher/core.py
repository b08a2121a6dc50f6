"""What the async and the sync publisher share: everything but the waiting.

Settings, validation, the throttle, the breaker's bookkeeping, the XADD (and
WAIT) commands, the outcome of every event and its counters live here once.
A front (:mod:`.aio`, :mod:`.blocking`) adds only how it talks to Redis
(awaiting or blocking), how it waits for a trailing edge (a task or a thread)
and how it probes Redis while the breaker is open (a task, or one caller).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypedDict, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dualcast.names import EVENT_NAME_PATTERN, ROOM_NAME_PATTERN, name_rule
from dualcast.publisher.breaker import Breaker
from dualcast.publisher.encoding import Entry, prepare
from dualcast.publisher.results import (
    Outcome,
    PublisherStats,
    PublishResult,
    describe,
    unanswered,
)
from dualcast.publisher.throttle import Conflator
from dualcast.redis_connect import RedisTarget, TlsFiles, Topology, parse_redis_url, redact

log = logging.getLogger(__name__)

#: An item of `publish_many`: (event, data) or (event, data, rooms).
BatchItem = tuple[str, Any] | tuple[str, Any, Iterable[str] | None]
#: Ends the `error` of a result whose XADD got no reply in time: it may be in the stream.
MAYBE_APPENDED = "(Redis may still have appended it)"
#: The part of `timeout` a new connection (TCP, TLS, AUTH) may take.
CONNECT_SHARE = 0.8
#: Why Redis did not take an event.
Miss = Literal["failed", "short_circuited", "overloaded", "local"]
#: What a Redis call raises when Redis is away or slow (an outage, as opposed to a refusal).
FAILURES: tuple[type[BaseException], ...] = (redis.RedisError, OSError, TimeoutError)

P = TypeVar("P")


class Throttle(TypedDict, total=False):
    """The throttle arguments of `publish`: at most one append per `every` s per key."""

    throttle_key: str | None
    every: float | None


class LocalFallback(Protocol):
    """Where events go while Redis is unreachable: the in-process dualcast app's hub."""

    def publish_local(self, event: str, data: Any, rooms: list[str]) -> str: ...


class Pipeline(Protocol):
    """The command-queueing half of redis-py's sync and async pipelines (they share it)."""

    def xadd(self, name: Any, fields: Any, id: Any = ..., maxlen: Any = ...,
             approximate: bool = ...) -> Any: ...

    def wait(self, num_replicas: int, timeout: int) -> Any: ...


@dataclass(frozen=True, slots=True)
class WaitFor:
    """`WAIT <replicas> <timeout_ms>` after every write; ``replicas=0``: no WAIT."""

    replicas: int = 0
    timeout_ms: int = 100

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise ValueError("wait_replicas must be >= 0")
        if self.replicas and self.timeout_ms < 1:
            # WAIT n 0 blocks until n replicas answer, forever if they never do
            raise ValueError("wait_timeout_ms must be >= 1: a publish never waits without bound")

    @property
    def seconds(self) -> float:
        """How much longer a call may take for its WAIT."""
        return self.timeout_ms / 1000 if self.replicas else 0.0


#: What a throttled call answers at once, and what a lost event ends in (results are frozen).
HELD = PublishResult(None, Outcome.HELD)
DROPPED = PublishResult(None, Outcome.DROPPED)


class PublisherCore:
    """Settings, stats and outcome accounting; subclassed by the two fronts.

    ``redis_url=None`` publishes to the fallback only (a single-process app
    without Redis); without a fallback as well it raises ValueError. ``cooldown``
    is the first pause of the breaker before it probes Redis again (doubling up
    to ``cooldown_max``); ``max_connections`` bounds the connections (callers
    beyond it wait, within the timeout).
    ``wait_replicas=n`` follows every append with ``WAIT n wait_timeout_ms`` on
    the same connection; :meth:`publish_result` then says how many replicas
    acknowledged the write, and a call may take ``wait_timeout_ms`` longer.
    ``redis_url`` may name a Sentinel service or a Cluster (see
    :mod:`dualcast.redis_connect`); ``tls`` gives the CA and client files for a
    ``rediss`` URL. A URL that cannot be used raises ValueError here, not later.
    ``event_pattern`` and ``room_pattern`` are the deployment's name patterns
    (``DUALCAST_EVENT_PATTERN``, ``DUALCAST_ROOM_PATTERN``) when it sets its own: a
    server skips an entry whose names its patterns refuse, so names are checked here
    against the same ones (and the defaults would refuse names such a server accepts).
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
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
        tls: TlsFiles | None = None,
        event_pattern: str = EVENT_NAME_PATTERN,
        room_pattern: str = ROOM_NAME_PATTERN,
    ) -> None:
        # a pattern that is no regex, or admits names that break the protocol: ValueError now
        for kind, pattern in (("event", event_pattern), ("room", room_pattern)):
            try:
                name_rule(kind, pattern)  # type: ignore[arg-type]
            except ValueError as exc:
                raise ValueError(f"{kind}_pattern {pattern!r}: {exc}") from None
        self.event_pattern = event_pattern
        self.room_pattern = room_pattern
        # Numbers that would be accepted here and then fail every call (fail open hides
        # it): max_connections=1.5 or maxlen=True dropped every event, timeout=nan or inf
        # left calls unbounded, a negative or nan cooldown probed in a loop.
        for name, value in (("timeout", timeout), ("cooldown", cooldown),
                            ("cooldown_max", cooldown_max)):
            if not _seconds(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number of seconds > 0, "
                                 f"not {value!r}")
        if not _seconds(log_every) or log_every < 0:
            raise ValueError(f"log_every must be a finite number of seconds >= 0, "
                             f"not {log_every!r}")
        if maxlen is not None and (not _whole(maxlen) or maxlen < 1):
            raise ValueError("maxlen must be >= 1 (or None for no trim)")
        if not _whole(max_connections) or max_connections < 1:
            raise ValueError("max_connections must be a whole number >= 1")
        for name, value in (("wait_replicas", wait_replicas),
                            ("wait_timeout_ms", wait_timeout_ms)):
            if not _whole(value):
                raise ValueError(f"{name} must be a whole number, not {value!r}")
        if redis_url is not None and not redis_url.strip():
            # `os.environ.get("REDIS_URL", "")`: every call failed on an AssertionError
            raise ValueError("redis_url is empty: pass a Redis URL (redis://host:6379/0), "
                             "or None with fallback= to publish to that process only")
        if redis_url is None and fallback is None:
            # Every event would be dropped without a word (fail open hides it): a missing
            # setting (`Publisher(os.environ.get(...))`) is a bug to say at start-up.
            raise ValueError("no Redis URL and no fallback: every event would be dropped; "
                             "pass a Redis URL (redis://host:6379/0), or fallback= (the "
                             "in-process dualcast app) to publish to that process only")
        self.redis_url = redis_url
        self.tls = tls
        self._target: RedisTarget | None = parse_redis_url(redis_url) if redis_url else None
        if wait_replicas and self._target and self._target.topology is Topology.CLUSTER:
            # redis-py sends a keyless WAIT to every primary on other connections than the
            # XADD's, where it counts nothing: the result would claim replicas it never saw
            raise ValueError("wait_replicas is not available on a Redis Cluster (redis+cluster://)")
        self.stream = stream
        self.maxlen = maxlen
        self.timeout = timeout
        self.wait_for = WaitFor(wait_replicas, wait_timeout_ms)
        self.fallback = fallback
        self.max_connections = max_connections
        self.stats = PublisherStats()
        self._breaker = Breaker(cooldown, cooldown_max, log_every)
        self._conflator: Conflator[Entry] = Conflator()
        self._lock = self._make_lock()
        self._closed = False
        self._where = redact(redis_url) if redis_url else "(none)"
        self._last_error_log = -math.inf
        self._log_every = log_every

    @staticmethod
    def _make_lock() -> AbstractContextManager[Any]:
        """What guards the throttle and the breaker: nothing on one event loop."""
        return nullcontext()

    @property
    def available(self) -> bool:
        """False while the breaker is open (Redis considered unreachable)."""
        return self.redis_url is not None and not self._breaker.open

    @property
    def where(self) -> str:
        """The Redis URL with its password hidden: fit for a log line or an error message."""
        return self._where

    @property
    def _call_timeout(self) -> float:
        """The bound of one Redis call: the timeout, plus WAIT's own when replicas are awaited."""
        return self.timeout + self.wait_for.seconds

    @property
    def _outcome(self) -> str:
        return "sent to the local fallback" if self.fallback is not None else "dropped (fail open)"

    def _connection_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "socket_timeout": self._call_timeout,
            # Shorter than the call's bound, so a connection that is not made in time
            # (a TLS handshake a plain-text port never answers) ends in redis-py's own
            # "Timeout connecting": nothing was sent. Cut by the call's bound instead,
            # it read as "no reply in time", which may have appended the event.
            "socket_connect_timeout": self.timeout * CONNECT_SHARE,
            "retry": Retry(NoBackoff(), 0),  # the breaker, not the client, decides on retries
            "decode_responses": True,
        }
        if self._target is not None and self._target.topology is Topology.CLUSTER:
            # A cluster node's pool hands out a connection unchecked: one cut while the
            # cluster was away failed the first publish after it came back. Checked (PING)
            # when idle for a second, it fails before the XADD is written, and is sent again.
            kwargs["health_check_interval"] = 1
        return kwargs

    # -- before sending

    def _throttled(self) -> None:
        """A value is held for a trailing edge: the front makes sure something will send it."""
        raise NotImplementedError

    def _admit(self, event: str, data: Any, rooms: Iterable[str] | None,
               throttle: Throttle) -> Entry | None:
        """The validated entry to send now, or None when the throttle holds it for later."""
        entry = prepare(event, data, rooms, self.event_pattern, self.room_pattern)
        if not throttle:
            return entry
        unknown = set(throttle) - {"throttle_key", "every"}
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        key, interval = self._throttle_interval(throttle.get("throttle_key"),
                                                throttle.get("every"))
        if key is None:
            return entry
        with self._lock:
            send_now, replaced = self._conflator.offer(key, interval, entry, time.monotonic())
            if replaced:
                self.stats.conflated += 1
        self._throttled()
        return entry if send_now else None

    @staticmethod
    def _throttle_interval(key: str | None, every: float | None) -> tuple[str | None, float]:
        if key is None:
            if every is not None:
                raise ValueError("every= needs a throttle_key=")
            return None, 0.0
        if not isinstance(key, str) or not key:
            raise ValueError("throttle_key must be a non-empty string")
        interval = 1.0 if every is None else float(every)
        if not interval > 0 or math.isinf(interval):
            raise ValueError("every must be a positive number of seconds")
        return key, interval

    def _batch(self, items: Iterable[BatchItem]) -> list[Entry]:
        """Every item validated before any is sent, so a bad one appends nothing."""
        entries = []
        for item in items:
            if not isinstance(item, tuple) or len(item) not in (2, 3):
                raise ValueError("publish_many items are (event, data) or (event, data, rooms)")
            entries.append(prepare(item[0], item[1], item[2] if len(item) == 3 else None,
                                   self.event_pattern, self.room_pattern))
        return entries

    def _gate(self, entries: Sequence[Entry], may_probe: bool) -> list[PublishResult] | None:
        """The results of entries that must not reach Redis now, or None to send them."""
        if self._closed:  # a bug in the caller, but still not one to raise into its path
            self._log_error("publish after close", RuntimeError("publisher is closed"))
            self.stats.dropped += len(entries)
            return [DROPPED] * len(entries)
        if self.redis_url is None:
            return self._fail(entries, "local")
        if not self._breaker.open:  # read without the lock: a stale answer costs one call
            return None
        with self._lock:
            shut = self._breaker.open and not (may_probe and self._breaker.probe_due())
        return self._short_circuited(entries) if shut else None

    def _short_circuited(self, entries: Sequence[Entry]) -> list[PublishResult]:
        """Not sent: the breaker is open; the results say what opened it."""
        return self._fail(entries, "short_circuited",
                          f"not sent while Redis is unavailable ({self._breaker.reason})")

    def _xadd(self, entry: Entry) -> tuple[Any, ...]:
        """Positional arguments of redis-py's `xadd` for one entry (MAXLEN ~ when trimming)."""
        return (self.stream, entry.fields(), "*", self.maxlen, True)

    def _queue(self, pipe: P, entries: Sequence[Entry]) -> P:
        """Queue every XADD, then WAIT when replicas are awaited: one round trip, one connection.

        WAIT counts the acknowledgements of the writes made on its own connection,
        so it must follow the XADDs in the same pipeline.
        """
        queue: Pipeline = pipe  # type: ignore[assignment]
        for entry in entries:
            queue.xadd(*self._xadd(entry))
        if self.wait_for.replicas:
            queue.wait(self.wait_for.replicas, self.wait_for.timeout_ms)
        return pipe

    @property
    def _single(self) -> bool:
        """Whether one entry may go as a plain XADD (no pipeline overhead, nothing to WAIT for)."""
        return not self.wait_for.replicas

    # -- after sending

    def _finish(self, entries: Sequence[Entry], replies: Sequence[Any]) -> list[PublishResult]:
        """Per-entry outcome of the replies; an entry Redis refused goes to the fallback path."""
        if self._breaker.open:  # a call in flight when it opened: Redis answered after all
            with self._lock:
                self._breaker.success(self.stats)
        acked: int | None = None
        if self.wait_for.replicas:
            *replies, wait_reply = replies
            if isinstance(wait_reply, BaseException):
                self._log_error("Redis refused WAIT", wait_reply)
            else:
                acked = int(wait_reply)
        out: list[PublishResult] = []
        for entry, reply in zip(entries, replies, strict=True):
            if isinstance(reply, BaseException):
                self._log_error(f"Redis refused XADD to {self.stream!r}", reply)
                out.extend(self._fail([entry], "failed", describe(reply)))
                continue
            self.stats.published += 1
            out.append(PublishResult(str(reply), Outcome.PUBLISHED, acked, self.wait_for.replicas))
        if (acked or 0) < self.wait_for.replicas:
            published = sum(r.outcome is Outcome.PUBLISHED for r in out)
            self.stats.under_replicated += published
            if published:
                self._log_error(f"{acked or 0} of {self.wait_for.replicas} replicas acknowledged "
                                f"within {self.wait_for.timeout_ms} ms")
        return out

    def _failed(self, entries: Sequence[Entry], exc: BaseException, *, outage: bool,
                probing: bool) -> list[PublishResult]:
        """A Redis call raised. `outage=False`: it never got a connection (a local overload).

        `probing`: a failure while the breaker is open was the probe, which backs off.
        """
        if not outage:
            # queued behind this process's own publishes for the whole timeout: a local
            # overload, not a Redis outage, so the breaker stays closed
            self._log_error("publisher overloaded: no connection free within the timeout", exc)
            return self._fail(entries, "overloaded",
                              "no connection free within the timeout (this process's own "
                              f"publishes hold them all): {describe(exc)}")
        with self._lock:
            self._breaker.failure(exc, self.stats, self._where, self._outcome,
                                  probe=probing and self._breaker.open)
        if unanswered(exc):
            # No reply in time is not "Redis did not take it": a slow reply, not a lost
            # write, leaves the event in the stream, and a caller that retries on the
            # result appends it twice. The result says so (the fallback still gets it:
            # fail open is documented to risk that one twice, under two ids).
            return self._fail(entries, "failed", f"{describe(exc)} {MAYBE_APPENDED}")
        return self._fail(entries, "failed", describe(exc))

    def _broken(self, entries: Sequence[Entry], exc: BaseException) -> list[PublishResult]:
        """Something unexpected raised: never into the caller; count it and go on."""
        self._log_error("unexpected publish error", exc)
        return self._fail(entries, "failed", describe(exc))

    def _fail(self, entries: Sequence[Entry], reason: Miss,
              error: str | None = None) -> list[PublishResult]:
        """Redis did not take `entries` (`error` says why): hand them to the fallback or
        drop them."""
        if reason != "local":
            setattr(self.stats, reason, getattr(self.stats, reason) + len(entries))
        if self.fallback is None:
            self.stats.dropped += len(entries)
            dropped = DROPPED if error is None else PublishResult(None, Outcome.DROPPED,
                                                                  error=error)
            return [dropped] * len(entries)
        out: list[PublishResult] = []
        for entry in entries:
            try:
                local_id = self.fallback.publish_local(entry.event, entry.local_data(),
                                                       list(entry.rooms))
            except Exception as exc:  # the fallback must not break the caller either
                self.stats.dropped += 1
                out.append(DROPPED)
                self._log_error("local fallback failed", exc)
            else:
                self.stats.fallback += 1
                out.append(PublishResult(local_id, Outcome.FALLBACK, error=error))
        return out

    def _log_error(self, what: str, exc: BaseException | None = None) -> None:
        """One warning per `log_every` seconds at most: an outage must not flood the log."""
        now = time.monotonic()
        if now - self._last_error_log < self._log_every:
            return
        self._last_error_log = now
        if exc is None:
            log.warning("publisher: %s", what)
        else:
            log.warning("publisher: %s (%s: %s)", what, type(exc).__name__, exc)

    # -- trailing edges

    def _take_due(self) -> tuple[list[Entry], float | None]:
        """Trailing values due now, and seconds until the next one is (None: nothing held)."""
        with self._lock:
            now = time.monotonic()
            entries = self._conflator.pop_due(now)
            due_at = self._conflator.next_due()
        return entries, None if due_at is None else max(0.0, due_at - now)

    def _take_all(self) -> list[Entry]:
        with self._lock:
            return self._conflator.drain()




def _whole(value: object) -> bool:
    """An int that is no bool (True is 1 to Python, and no count to a caller)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _seconds(value: object) -> bool:
    """A finite real number that is no bool."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def ids(results: Iterable[PublishResult]) -> list[str | None]:
    return [result.id for result in results]
