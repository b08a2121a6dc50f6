"""Redis Streams engine (redis.asyncio with hiredis).

Two clients: the consumer's blocking XREAD gets a connection of its own, so a
burst of replays or publishes can never starve it (and a full pool cannot make
it fail); everything else shares a blocking pool that waits instead of raising.
Every redis-py error is translated here, once, into LogUnavailable.

Replies stay bytes (no `decode_responses`): redis-py would raise UnicodeDecodeError,
which is no RedisError, on an entry a producer wrote in another encoding, and the
consumer would re-read that entry forever. Entry fields go to `decode_entry` as
bytes; ids and XINFO values, which Redis itself writes, are decoded here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterDownError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from dualcast.config import Settings
from dualcast.events import ZERO, id_before, parse_id
from dualcast.log.base import LogInfo, LogNoAnswer, LogRefused, LogUnavailable, RawEntry
from dualcast.log.xread import Follow, XReadLine
from dualcast.publisher.results import describe, unanswered
from dualcast.redis_connect import Pooling, Topology, async_client, parse_redis_url

T = TypeVar("T")

#: What a Redis call raises when the log cannot be used. TypeError too: redis-py raises
#: it on every connect when an option does not fit the connection class (one a newer
#: redis-py refuses, say), and it must read as the log being unavailable (a 503, a
#: readiness detail, one line in the consumer's log), never escape as a 500.
UNAVAILABLE = (RedisError, RedisClusterException, OSError, TimeoutError, TypeError)


#: Error replies that a failover or a resharding under way gives, which pass on their own.
TRANSIENT_REFUSALS = (ReadOnlyError, TryAgainError, ClusterDownError, AskError)


@asynccontextmanager
async def _translated(what: str) -> AsyncIterator[None]:
    try:
        yield
    except ResponseError as exc:
        if isinstance(exc, TRANSIENT_REFUSALS):
            raise LogUnavailable(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc
        raise LogRefused(f"redis {what} refused: {type(exc).__name__}: {exc}",
                         on_key=what != "PING") from exc
    except AuthenticationError as exc:
        # (a ConnectionError to redis-py: it read as "unreachable", sending the operator
        # to the network while Redis answered and refused the password or user)
        raise LogRefused(f"redis {what} refused: {type(exc).__name__}: {exc}",
                         on_key=False) from exc
    except UNAVAILABLE as exc:
        # the command went out and no reply came (a slow Redis, a primary that died
        # after it appended): it may have been carried out
        raise (LogNoAnswer if unanswered(exc) else LogUnavailable)(
            f"redis {what} failed: {describe(exc)}") from exc


def _text(value: object) -> str:
    """An id or XINFO value Redis wrote (ASCII), as text."""
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


class RedisLog:
    engine = "redis"
    #: `read_blocking` takes a `follow` (the consumer's batches in the reply's callback).
    follows = True

    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url is not None
        self.stream = settings.stream
        self.maxlen = settings.maxlen
        timeout = settings.redis_timeout
        common: dict[str, Any] = {
            "decode_responses": False,
            "socket_connect_timeout": timeout,
            "socket_keepalive": True,
            "health_check_interval": 10,
        }
        target = parse_redis_url(settings.redis_url)
        tls = settings.redis_tls
        writer: dict[str, Any] = {}
        if target.topology is Topology.CLUSTER:
            # Why: redis-py's cluster client retries a command whose connection failed up
            # to ten times, an XADD too: one whose connection was cut after it went out
            # was appended again, and the producer was told 202 for an event now in the
            # stream twice. Nothing is retried there now; `_read` and `append` retry once
            # what never left. A connection idle for a second is checked (PING) before a
            # command goes out on it: one cut while the cluster was away then fails
            # before the write, and is retried, instead of failing the XADD on it.
            writer = {"retry": Retry(NoBackoff(), 0), "health_check_interval": 1}
        self._client = async_client(target, tls, Pooling(64, wait=timeout),
                                    socket_timeout=timeout, **{**common, **writer})
        # XREAD BLOCK does not extend the read timeout (redis-py #2807): give the
        # blocking reader a socket timeout well above its block time, so a stalled
        # connection is still noticed within block + timeout.
        self._reader = async_client(target, tls, Pooling(single=True),
                                    socket_timeout=settings.block_ms / 1000 + timeout, **common)
        # Plain and Sentinel: the reads go through a raw line (log/xread.py); a Cluster
        # keeps redis-py's path, which follows MOVED/ASK.
        self._line = (None if target.topology is Topology.CLUSTER else
                      XReadLine(self._reader, self.stream,  # type: ignore[arg-type]
                                settings.block_ms / 1000 + timeout))

    async def connect(self) -> None:
        await self.ping()

    async def close(self) -> None:
        if self._line is not None:
            self._line.close()
        for client in (self._reader, self._client):
            try:
                await client.aclose()
            except (RedisError, OSError):
                pass

    async def _read(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """A read, tried once more at once when its pooled connection broke.

        Why: a connection can die between the pool's look at it and the command (a
        Redis restart or failover just then), and the read would fail with Redis up:
        a long-poll waiting through an outage answered 503 once it was over. (The
        usual case, connections cut while Redis was away, is caught as they are handed
        out: server/redis_connect.py.) The second try takes a fresh connection. Reads
        only: an XADD whose connection broke may have been appended, and its caller is
        told so.
        """
        try:
            async with _translated(what):
                return await call()
        except LogUnavailable as exc:
            if not isinstance(exc.__cause__, RedisConnectionError):
                raise
        async with _translated(what):
            return await call()

    async def ping(self) -> None:
        await self._read("PING", self._client.ping)

    async def _write(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """A write, tried once more at once only when it surely never left: its connection
        failed before the command was written (a pooled connection found dead, a node
        that refused). One that failed after is never repeated (LogNoAnswer): it may
        have been carried out."""
        try:
            async with _translated(what):
                return await call()
        except LogNoAnswer:
            raise
        except LogUnavailable as exc:
            if not isinstance(exc.__cause__, RedisConnectionError):
                raise
        async with _translated(what):
            return await call()

    async def append(self, fields: dict[str, str]) -> str:
        entry_id = await self._write("XADD", partial(
            self._client.xadd, self.stream, fields,  # type: ignore[arg-type]
            maxlen=self.maxlen, approximate=True))
        return _text(entry_id)

    async def append_many(self, entries: list[dict[str, str]]) -> list[str]:
        async def pipelined() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for fields in entries:
                    pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
                return await pipe.execute()  # type: ignore[no-any-return]

        ids = await self._write("XADD pipeline", pipelined)
        return [_text(i) for i in ids]

    async def read_after(self, after: str, count: int) -> list[RawEntry]:
        entries = await self._read("XRANGE", partial(
            self._client.xrange, self.stream, min=f"({after}", max="+", count=count))
        return [(_text(i), f or {}) for i, f in entries or ()]  # type: ignore[misc]

    async def read_blocking(self, after: str, count: int, block_ms: int,
                            follow: Follow | None = None) -> list[RawEntry]:
        """See EventLog; `follow` (log/xread.py) is used on the raw line only: through
        redis-py (a Cluster) every batch is returned."""
        if self._line is not None:
            return await self._line.read(after, count, block_ms, follow)
        async with _translated("XREAD"):
            reply = await self._reader.xread({self.stream: after}, count=count, block=block_ms)
        if not reply:
            return []
        # RESP2 gives [[stream, entries]], RESP3 a {stream: [entries]} map.
        batches = reply.values() if isinstance(reply, dict) else (e for _, e in reply)
        return [
            (_text(i), f or {})  # type: ignore[misc]
            for entries in batches for i, f in entries  # type: ignore[misc]
        ]

    async def info(self) -> LogInfo:
        try:
            raw = await self._read("XINFO STREAM", partial(self._client.xinfo_stream, self.stream))
        except LogUnavailable as exc:
            if isinstance(exc.__cause__, ResponseError) and "no such key" in str(exc.__cause__):
                return LogInfo(exists=False, length=0, first_id=None, last_id=ZERO)
            raise
        first = raw.get("first-entry")
        first_id = parse_id(_text(first[0])) if first else None
        last_id = parse_id(_text(raw["last-generated-id"]))
        length = int(raw.get("length", 0))
        max_deleted = parse_id(_text(raw.get("max-deleted-entry-id") or "0-0"))
        # MAXLEN trimming does not move max-deleted-entry-id (only XDEL does), but
        # entries-added > length says the head was trimmed: everything before the
        # first retained entry may be gone.
        added = raw.get("entries-added")
        if added is not None and int(added) > length:
            before_first = id_before(first_id) if first_id is not None else last_id
            max_deleted = max(max_deleted, before_first)
        elif added is None and first_id is not None:
            max_deleted = max(max_deleted, id_before(first_id))  # Redis < 7: assume trimmed
        return LogInfo(
            exists=True, length=length, first_id=first_id, last_id=last_id,
            max_deleted=max_deleted,
        )

