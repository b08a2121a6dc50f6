"""Server-Sent Events `/api/sse` through sse-starlette.

The generator yields pre-encoded bytes: every subscriber shares each event's
one encoding, and all events waiting for a client go out in a single write.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response

from server.auth import Identity
from server.events import Event, dumps
from server.feed import Feed, FeedClosed
from server.hub import CloseReason
from server.runtime import Runtime
from server.transports.common import Refusal, caller, error_response, parse_cursor, strict_rooms

log = logging.getLogger("dualcast.sse")

HEADERS = {
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx: do not buffer this response
}


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping")


def _message(event: str, payload: object) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event.encode(), dumps(payload))


async def sse_endpoint(request: Request) -> Response:
    rt: Runtime = request.app.state.dualcast
    settings = rt.settings
    if "sse" not in settings.transports:
        return error_response(404, "sse_disabled", "SSE is not offered here")
    try:
        identity = caller(request, settings, rt.secret)
        rooms = strict_rooms(request.query_params.get("rooms"), identity, settings)
        raw_cursor = request.headers.get("last-event-id") or request.query_params.get(
            "last_event_id"
        )
        cursor = parse_cursor(raw_cursor)
    except Refusal as refusal:
        rt.stats.refused += 1
        return refusal.response()
    if rt.draining:
        return error_response(503, "draining", "server is restarting; retry elsewhere")
    rt.stats.opened["sse"] += 1
    shutdown = anyio.Event()
    feed = Feed(rt.hub, rt.log, settings, "sse", rooms, cursor)
    return EventSourceResponse(
        _stream(rt, feed, identity, shutdown),
        headers=HEADERS,
        ping=settings.ping_interval,
        ping_message_factory=_ping,
        send_timeout=max(settings.ping_interval, 10.0),
        shutdown_event=shutdown,
        shutdown_grace_period=1.0,
    )


async def _stream(
    rt: Runtime, feed: Feed, identity: Identity, shutdown: anyio.Event
) -> AsyncIterator[bytes]:
    settings = rt.settings
    async with feed:
        yield b"retry: %d\n" % settings.sse_retry_ms + _message(
            "welcome", {"rooms": sorted(feed.sub.rooms), "last_id": feed.start_id}
        )
        while True:
            if shutdown.is_set():
                feed.sub.close(CloseReason.SHUTDOWN)
            left = identity.seconds_left()
            if left is not None and left <= 0:
                yield _message(
                    "error", {"code": "token_expired", "message": "the token has expired"}
                )
                return
            try:
                # A drain (SIGTERM) closes the subscriber, which wakes this wait.
                items = await feed.next(timeout=left)
            except FeedClosed as closed:
                if closed.reason is CloseReason.LAGGING:
                    yield _message("error", {"code": "lagging",
                                             "message": "too slow: reconnect with Last-Event-ID"})
                else:
                    # Spread the reconnects of thousands of clients over the grace period.
                    spread = max(settings.shutdown_grace, 1.0) * 1000
                    yield b"retry: %d\n\n" % int(settings.sse_retry_ms + random.uniform(0, spread))
                return
            if not items:
                continue
            chunks = [
                item.sse_frame() if isinstance(item, Event)
                else _message("reset", {"last_id": item.last_id})
                for item in items
            ]
            yield b"".join(chunks)
