"""Server-Sent Events `/api/sse`: one ASGI response per subscriber, written by hand.

sse-starlette runs four tasks in an anyio task group per stream and wraps every
send in a cancel scope; at 10,000 idle streams that was 20 KB of a 44 KB
connection and, under load, 12-15 % of the server's CPU (issue 8, tracemalloc
and py-spy). An SSE stream needs less: the request's own task writes (events,
the end), uvicorn's own connection_lost tells the disconnect (a small task reading
`receive` where the server is not uvicorn's), and the loop's keepalive ring sends the
pings (the writer, after each quiet interval, where the server is not uvicorn's).
Every event's frame is encoded once and shared by every subscriber; all events
waiting for a client go out in a single write.
"""

from __future__ import annotations

import asyncio
import logging
import random

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dualcast.admission import Refusal, admit
from dualcast.direct import on_disconnect, sse_beat, sse_sink, start_chunked
from dualcast.events import Event
from dualcast.feed import Feed, FeedClosed
from dualcast.frames import (
    SSE_PING,
    Item,
    sse_chunk,
    sse_error,
    sse_retry,
    sse_welcome,
)
from dualcast.hub import CloseReason
from dualcast.keepalive import Keepalive, keepalive
from dualcast.logs import mark_unfinished_by_stall
from dualcast.loops import running_loop
from dualcast.protocol import ErrorCode, Transport
from dualcast.query import query_of
from dualcast.quotas import Lease
from dualcast.runtime import Runtime
from dualcast.stalls import Stalled, Writer

log = logging.getLogger("dualcast.sse")

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer this response
]
#: HEADERS as header lines, for the start written with the welcome (server/direct.py).
HEAD = b"".join(b"%s: %s\r\n" % pair for pair in HEADERS)
START = {"type": "http.response.start", "status": 200, "headers": HEADERS}


def _plain_chunk(items: list[Item]) -> bytes:
    """`?events=message`: events as unnamed messages (data `{id, event, data, ts}`)."""
    return b"".join([
        item.sse_plain_frame() if isinstance(item, Event) else item.sse_frame() for item in items
    ])


async def _head_only(scope: Scope, receive: Receive, send: Send) -> None:
    await send(START)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def sse_endpoint(request: Request) -> Response | EventStream | ASGIApp:
    rt: Runtime = request.app.state.dualcast
    try:
        admission = await admit(request, rt, Transport.SSE, cursor_header=True)
    except Refusal as refusal:
        return refusal.response()
    if request.method == "HEAD":
        # GET's status and headers, then the end. A HEAD answer has no body, so a
        # client takes it as complete at once; an endless stream behind it held the
        # connection (the client's next request on it never got an answer) and a
        # connection slot for as long as the client kept the socket.
        admission.lease.release()
        return _head_only
    rt.stats.opened[Transport.SSE] += 1
    feed = Feed(rt.hub, rt.log, rt.settings, Transport.SSE, admission.rooms, admission.cursor,
                expires=admission.identity.exp)
    rt.auth.follow(admission.identity, feed)  # an identity the app renews extends the feed
    plain = query_of(request).get("events") == "message"
    return EventStream(rt, feed, admission.lease, plain)


class EventStream:
    """The ASGI response of one SSE subscriber, from `welcome` to the last write."""

    def __init__(self, rt: Runtime, feed: Feed, lease: Lease, plain: bool = False) -> None:
        self.rt = rt
        self.feed = feed
        self.lease = lease
        self.encode = _plain_chunk if plain else sse_chunk
        self.frame = Event.sse_plain_frame if plain else Event.sse_frame
        self.ping_interval = rt.settings.ping_interval
        # A client that stops reading blocks our write once the socket buffers are
        # full; the runtime's stall watch then cancels it (it reconnects with
        # Last-Event-ID). Set in __call__.
        self.writer = Writer(None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The headers leave with the welcome, in `_write`; until then the sink writes
        # nothing (the response has not started), so events wait in the queue.
        # Events straight to the socket while the writer idles (server/direct.py).
        self.feed.sub.sink = sse_sink(send, self.frame)
        with self.rt.stalls.writer() as writer:
            self.writer = writer
            try:
                async with self.feed:
                    # A disconnect wakes the writer (uvicorn's sends after a disconnect
                    # return silently, so the writer would never notice): told by uvicorn
                    # itself where it can (server/direct.py), else by a task reading.
                    stop = on_disconnect(send, self._gone)
                    watcher = None if stop else asyncio.create_task(self._watch(receive))
                    # The pings: from the loop's keepalive ring where the stream can be
                    # written to directly, else from the writer's own timeout.
                    beat = sse_beat(send, SSE_PING)
                    slot = None
                    if beat is not None:
                        slot = keepalive(running_loop(), self.ping_interval).add(
                            self, beat)
                    try:
                        finished = await self._write(send, ping=slot is None)
                    finally:
                        Keepalive.forget(slot, self)
                        if watcher is not None:
                            watcher.cancel()
                        elif stop is not None:
                            stop()
                if finished:
                    await self._send(send, {"type": "http.response.body", "body": b"",
                                            "more_body": False})
            except Stalled:
                mark_unfinished_by_stall()  # uvicorn's "without completing" is ours
            finally:
                self.lease.release()

    async def _watch(self, receive: Receive) -> None:
        """The one reader, where the server is not uvicorn's httptools."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self._gone()

    def _gone(self) -> None:
        self.feed.sub.close(CloseReason.GONE)

    async def _send(self, send: Send, message: Message) -> None:
        """One ASGI send; raises Stalled when the stall watch gave up on the client
        (the stream then ends without its last write)."""
        with self.writer:
            await send(message)

    async def _chunk(self, send: Send, body: bytes) -> None:
        await self._send(send, {"type": "http.response.body", "body": body, "more_body": True})

    async def _write(self, send: Send, ping: bool = True) -> bool:
        """Until the stream ends; False when the client is gone (no last write then).
        With `ping`, the writer sends `: ping` itself after each quiet interval."""
        feed, encode = self.feed, self.encode
        welcome = sse_welcome(feed.sub.rooms, feed.start_id, self.rt.settings.sse_retry_ms)
        if not start_chunked(send, HEAD, welcome):
            await self._send(send, START)
            await self._chunk(send, welcome)
        loop = running_loop()
        quiet_since = loop.time()
        while True:
            ping_in = None
            if ping:
                ping_in = quiet_since + self.ping_interval - loop.time()
                if ping_in <= 0:
                    await self._chunk(send, SSE_PING)
                    quiet_since = loop.time()
                    continue
            try:
                items = await feed.next(timeout=ping_in)
            except FeedClosed as closed:
                return await self._closed(send, closed.reason)
            if not items:
                continue
            await self._chunk(send, encode(items))
            quiet_since = loop.time()

    async def _closed(self, send: Send, reason: CloseReason) -> bool:
        if reason is CloseReason.GONE:
            return False
        if reason is CloseReason.LAGGING:
            await self._chunk(send, sse_error(
                ErrorCode.LAGGING, "too slow: reconnect with Last-Event-ID"))
            return True
        if reason is CloseReason.EXPIRED:
            await self._chunk(send, sse_error(ErrorCode.TOKEN_EXPIRED, "the token has expired"))
            return True
        # A drain: spread the reconnects of thousands of clients over the grace period
        # (a shed already spread its closes over seconds: the usual retry).
        settings = self.rt.settings
        spread = 0.0 if reason is CloseReason.MOVED else max(settings.shutdown_grace, 1.0) * 1000
        await self._chunk(send, sse_retry(int(settings.sse_retry_ms + random.uniform(0, spread))))
        return True
