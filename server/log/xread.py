"""The consumer's XREAD on a connection of its own, without redis-py's per-command path.

Why: at low rates every worker pays one XREAD round trip per event, so with `--workers 2`
that round trip is paid twice, and most of a worker's cost per event is the read itself.
Through redis-py each read also ran a task for `wait_for` around the send (the socket
timeout), an `async_timeout` around the reply, the single-connection lock and the retry
wrapper, packed the command from its arguments and went through an asyncio StreamReader.
Measured on this 2-core machine, one entry per read at 100 events/s, CPU from /proc: a
bare reading process spent 240-330 µs per read through `Redis.xread` and 113-120 µs
here; a `dualcast serve` worker with no subscriber (`python -m bench.readcost`, whole
server CPU per event, medians of 3) 400 µs before and 200 µs after.

How: redis-py still opens the connection (TLS, AUTH, SELECT, HELLO, and for Sentinel the
lookup of the current primary), so every topology connects exactly as before; then the
connected transport is handed to `_Replies`, a protocol that feeds hiredis and completes
one future per reply. The command is packed once and only the id changes, so a read is
one `write` and one reply. A stalled connection is noticed by a watchdog that looks
once a second, not by a timer per read. On any failure (connection lost, no reply
within the bound, an error reply, a reply of the wrong shape) the line is closed, the
caller gets LogUnavailable, and the next read opens a fresh connection (for Sentinel,
to whichever primary it names then). A Redis Cluster keeps redis-py's path, which
follows MOVED/ASK.

The consumer's batches may also be taken in the reply's own callback (`follow`): a
reply with entries is handed to the consumer there and the next XREAD goes out at
once, so the consumer's task is not woken for it; anything else (the block ran out,
an error, a reply of the wrong shape, or a batch the consumer declines) completes
the read as before. Why: at low rates each worker is woken once per event, and on
this 2-core VM a wake-up is the cost: a bare uvloop process woken 100 times a second
spent 55-70 µs of CPU per wake in a timer callback, 83-89 µs in a task woken from a
future and 96-102 µs with the consumer's `sleep(0)` after it (medians of 2). The
measured effect is in the consumer's `_follow`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from dualcast.log.base import LogUnavailable, RawEntry

_WATCH_EVERY = 1.0  # seconds between two looks of the stall watchdog

#: Takes a read's entries in the reply's callback: delivers them and returns the id to
#: read after next, or returns None having done nothing (the read then completes with
#: them, as without it). It is called only with entries, never with an empty read.
Follow = Callable[[list[RawEntry]], str | None]


def xread_prefix(stream: str, count: int, block_ms: int) -> bytes:
    """`XREAD COUNT <count> BLOCK <block_ms> STREAMS <stream>` in RESP, with the array
    header for one more argument (the id) that `xread_command` appends."""
    parts = [b"XREAD", b"COUNT", str(count).encode(), b"BLOCK", str(block_ms).encode(),
             b"STREAMS", stream.encode()]
    head = b"*%d\r\n" % (len(parts) + 1)
    return head + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def xread_command(prefix: bytes, after: str) -> bytes:
    """The whole command: the packed prefix and the id to read after."""
    raw = after.encode("ascii")
    return b"%s$%d\r\n%s\r\n" % (prefix, len(raw), raw)


def _text(value: object) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def entries_of(reply: Any) -> list[RawEntry]:
    """The entries of one XREAD reply as hiredis parsed it, or LogUnavailable.

    Nil (the block timed out) and an empty reply are no entries. RESP2 gives
    `[[stream, entries]]`, RESP3 `{stream: entries}`; each entry is `[id, [k1, v1, ...]]`
    and the fields stay bytes for `decode_entry`, which judges their content (nil fields
    are an empty map, which it counts as malformed). A reply of another shape, or an
    error reply, is LogUnavailable.
    """
    if reply is None:
        return []
    if isinstance(reply, Exception):
        raise LogUnavailable(f"redis XREAD failed: ResponseError: {reply}")
    try:
        streams = reply.items() if isinstance(reply, dict) else reply
        out: list[RawEntry] = []
        for _stream, entries in streams:
            for entry_id, flat in entries:
                fields = iter(flat or ())
                # (no `strict=False`: zip's keyword argument costs ~6 µs here cold, a
                # tenth of this function's part of a wake-up; an odd last field is dropped
                # either way)
                out.append((_text(entry_id), dict(zip(fields, fields))))  # noqa: B905
    except (TypeError, ValueError, IndexError) as exc:
        raise LogUnavailable(f"redis XREAD failed: unexpected reply: {reply!r:.200}") from exc
    return out


class _Replies(asyncio.Protocol):
    """Feeds what arrives to hiredis and completes the waiting read with each reply."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self.reader = hiredis.Reader()
        self.waiter: asyncio.Future[Any] | None = None
        self.lost: BaseException | None = None
        self.send = send
        #: Given a reply first while a read waits: the next command when it took the
        #: reply (sent at once; the read goes on waiting, for that command's reply).
        self.take: Callable[[Any], bytes | None] | None = None

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(exc)
                return
            if reply is False:
                return
            if isinstance(reply, hiredis.PushNotification):
                continue  # RESP3 out-of-band messages answer no read of ours
            waiter = self.waiter
            if waiter is None:
                self._fail(ConnectionError("a reply nobody asked for"))
                return
            take = self.take
            if take is not None and not waiter.done():
                try:
                    command = take(reply)
                except Exception as exc:  # the consumer's own error: its read raises it
                    self.waiter = None
                    waiter.set_exception(exc)
                    return
                if command is not None:
                    self.send(command)
                    continue
            self.waiter = None
            if not waiter.done():
                waiter.set_result(reply)

    def eof_received(self) -> bool | None:
        self._fail(ConnectionError("Redis closed the connection"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("connection closed"))

    def _fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(self.lost)


class _Line:
    """One connected transport running one XREAD at a time."""

    def __init__(self, writer: asyncio.StreamWriter, stall_after: float) -> None:
        self.writer = writer  # kept: on Python 3.13 a collected StreamWriter closes its transport
        transport = self.transport = writer.transport
        self.replies = _Replies(self._send)
        self.stall_after = stall_after
        self.loop = asyncio.get_running_loop()
        self.sent_at = 0.0
        transport.set_protocol(self.replies)
        self.watch = self.loop.call_later(_WATCH_EVERY, self._watch)

    def _watch(self) -> None:
        replies = self.replies
        if replies.lost is not None:
            return
        if replies.waiter is not None and self.loop.time() - self.sent_at > self.stall_after:
            replies._fail(TimeoutError(f"no XREAD reply within {self.stall_after:.1f}s"))
            self.transport.abort()
            return
        self.watch = self.loop.call_later(_WATCH_EVERY, self._watch)

    async def read(self, command: bytes,
                   follow: Callable[[Any], bytes | None] | None = None) -> Any:
        """The reply to `command`; with `follow`, the first reply it does not take (it
        takes one by returning the next command, which is sent at once)."""
        replies = self.replies
        if replies.lost is not None:
            raise replies.lost
        waiter = replies.waiter = self.loop.create_future()
        replies.take = follow
        self._send(command)
        return await waiter

    def _send(self, command: bytes) -> None:
        self.sent_at = self.loop.time()
        self.transport.write(command)

    def close(self) -> None:
        self.watch.cancel()
        self.transport.abort()  # nothing to flush: a read's command is written or moot


def _taker(prefix: bytes, follow: Follow) -> Callable[[Any], bytes | None]:
    """A reply with entries goes to `follow`; the next command if it took them."""
    def taker(reply: Any) -> bytes | None:
        if reply is None or isinstance(reply, Exception):
            return None  # the read completes with it (and fails, for an error)
        try:
            entries = entries_of(reply)
        except LogUnavailable:
            return None  # likewise
        if not entries:
            return None
        after = follow(entries)
        return None if after is None else xread_command(prefix, after)
    return taker


class XReadLine:
    """`read_blocking` for a plain or Sentinel-managed Redis: see the module docstring."""

    def __init__(self, client: aioredis.Redis, stream: str, stall_after: float) -> None:
        self.client = client
        self.stream = stream
        self.stall_after = stall_after
        self._prefixes: dict[tuple[int, int], bytes] = {}
        self._line: _Line | None = None

    async def read(self, after: str, count: int, block_ms: int,
                   follow: Follow | None = None) -> list[RawEntry]:
        """The entries after `after`; with `follow`, the first read's entries it declines
        (or none, when the block ran out), having handed it every batch before."""
        prefix = self._prefixes.get((count, block_ms))
        if prefix is None:
            prefix = self._prefixes[(count, block_ms)] = xread_prefix(self.stream, count,
                                                                      block_ms)
        line = self._line or await self._open()
        taker = None if follow is None else _taker(prefix, follow)
        try:
            return entries_of(await line.read(xread_command(prefix, after), taker))
        except LogUnavailable:
            self.close()  # a fresh connection (and primary) for the next read
            raise
        except (OSError, TimeoutError, ConnectionError, hiredis.HiredisError) as exc:
            self.close()
            raise LogUnavailable(f"redis XREAD failed: {type(exc).__name__}: {exc}") from exc
        except BaseException:  # cancelled mid-read: its reply would answer the next read
            self.close()
            raise

    async def _open(self) -> _Line:
        writer = await self.connected_writer()
        self._line = _Line(writer, self.stall_after)
        return self._line

    async def connected_writer(self) -> asyncio.StreamWriter:
        """A connection made by redis-py, handshake done, detached from redis-py."""
        try:  # TypeError: an option the connection class refuses (see log/redis.py)
            conn = self.client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            await conn.connect()
        except (RedisError, OSError, TimeoutError, TypeError) as exc:
            raise LogUnavailable(f"redis XREAD failed: {type(exc).__name__}: {exc}") from exc
        # redis-py hands out no connected transport: its StreamWriter holds it. Take it and
        # detach redis-py's Connection, so that it neither closes the line nor warns about
        # it when collected (the handshake's replies are all read: nothing is buffered).
        writer = getattr(conn, "_writer", None)
        if not isinstance(writer, asyncio.StreamWriter):
            await conn.disconnect(nowait=True)
            raise RuntimeError("redis-py's connection has no transport to take over")
        conn._reader = conn._writer = None
        return writer

    def close(self) -> None:
        line, self._line = self._line, None
        if line is not None:
            line.close()
