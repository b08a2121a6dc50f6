"""broadcaster peer (redis pub/sub backend): an sse-starlette endpoint and a WebSocket one.

broadcaster 0.3.1 delivers nothing with redis-py 8 as shipped (encode/broadcaster
#133, #142), so this peer carries two small, documented workarounds and no other
change to the library's hot path:

1. `FixedRedisBackend.subscribe` marks the listener ready only *after* the
   SUBSCRIBE has been sent; upstream sets it first, so `pubsub.listen()` sees no
   subscription, returns at once, and the listener waits forever.
2. The app holds one subscription to the channel for its whole life (the
   lifespan), so client subscriptions never race on `Broadcast.subscribe`'s
   "first subscriber creates the queue set" branch, where concurrent
   subscribers overwrite each other's queues.

Each client gets a `welcome` message once its subscription is registered, so the
load generator knows when it is safe to publish (like dualcast's welcome frame).
Publishers use `Broadcast.publish` (redis PUBLISH), broadcaster's own path.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from broadcaster import Broadcast
from broadcaster._backends.redis import RedisBackend
from broadcaster._base import Subscriber, Unsubscribed
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

CHANNEL = "bench"


class FixedRedisBackend(RedisBackend):
    """Upstream's backend with the ready flag set after SUBSCRIBE (see module docstring)."""

    async def subscribe(self, channel: str) -> None:
        await self._pubsub.subscribe(channel)
        self._ready.set()


async def messages(subscriber: Subscriber) -> AsyncIterator[str]:
    """The subscriber's messages until it is unsubscribed (typed, unlike its __aiter__)."""
    try:
        while True:
            yield (await subscriber.get()).message
    except Unsubscribed:
        return


def make_broadcast(redis_url: str) -> Broadcast:
    return Broadcast(backend=FixedRedisBackend(redis_url))


def create_app(redis_url: str) -> Starlette:
    broadcast = make_broadcast(redis_url)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await broadcast.connect()
        async with broadcast.subscribe(CHANNEL) as anchor:
            drain = asyncio.create_task(_drain(anchor))
            try:
                yield
            finally:
                drain.cancel()
        await broadcast.disconnect()

    async def _drain(subscriber: Subscriber) -> None:
        async for _ in messages(subscriber):
            pass

    async def sse(_: Request) -> EventSourceResponse:
        async def stream() -> AsyncIterator[dict[str, str]]:
            async with broadcast.subscribe(CHANNEL) as subscriber:
                yield {"event": "welcome", "data": "{}"}
                async for message in messages(subscriber):
                    yield {"event": "bench", "data": message}

        return EventSourceResponse(stream())

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        async with broadcast.subscribe(CHANNEL) as subscriber:
            await websocket.send_text('{"type":"welcome"}')

            async def pump() -> None:
                async for message in messages(subscriber):
                    await websocket.send_text(message)

            task = asyncio.create_task(pump())
            try:
                while True:
                    await websocket.receive_text()
            except WebSocketDisconnect:
                pass
            finally:
                task.cancel()

    async def healthz(_: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[Route("/healthz", healthz), Route("/sse", sse), WebSocketRoute("/ws", ws)],
        lifespan=lifespan,
    )


app = create_app(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
