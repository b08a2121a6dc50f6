"""Publishers: each server's own publish path, driven at a fixed rate.

dualcast: a raw `XADD websocket-broadcast MAXLEN ~ 10000 * data <envelope> timestamp <ms>`
(the wire format existing producers use); python-socketio:
`AsyncRedisManager(write_only=True).emit`; broadcaster: `Broadcast.publish`.
Every event's data is `{"seq": n, "t": <time.time() at send>}`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from bench.clients import base_kind


class Publisher:
    async def start(self) -> None:
        pass

    async def publish(self, seq: int) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class DualcastPublisher(Publisher):
    def __init__(self, redis_url: str, rooms: list[str] | None = None,
                 stream: str = "websocket-broadcast") -> None:
        from redis import asyncio as aioredis

        self.redis = aioredis.Redis.from_url(redis_url)
        self.rooms = rooms
        self.stream = stream

    async def publish(self, seq: int) -> None:
        now = time.time()
        envelope: dict[str, Any] = {"event": "bench", "data": {"seq": seq, "t": now}}
        if self.rooms:
            envelope["rooms"] = self.rooms
        await self.redis.xadd(
            self.stream, {"data": orjson.dumps(envelope), "timestamp": int(now * 1000)},
            maxlen=10_000, approximate=True,
        )

    async def close(self) -> None:
        await self.redis.aclose()


class SocketIOPublisher(Publisher):
    def __init__(self, redis_url: str) -> None:
        import socketio

        self.manager = socketio.AsyncRedisManager(redis_url, write_only=True)

    async def publish(self, seq: int) -> None:
        await self.manager.emit("bench", {"seq": seq, "t": time.time()}, namespace="/")


class BroadcasterPublisher(Publisher):
    def __init__(self, redis_url: str) -> None:
        from bench.peers.broadcaster_app import CHANNEL, make_broadcast

        self.channel = CHANNEL
        self.broadcast = make_broadcast(redis_url)

    async def start(self) -> None:
        await self.broadcast.connect()

    async def publish(self, seq: int) -> None:
        message = orjson.dumps({"seq": seq, "t": time.time()}).decode()
        await self.broadcast.publish(self.channel, message)

    async def close(self) -> None:
        await self.broadcast.disconnect()


def make_publisher(kind: str, redis_url: str, rooms: list[str] | None = None) -> Publisher:
    server = base_kind(kind).split("-")[0]
    if server == "dualcast":
        return DualcastPublisher(redis_url, rooms)
    if server == "socketio":
        return SocketIOPublisher(redis_url)
    if server == "broadcaster":
        return BroadcasterPublisher(redis_url)
    raise ValueError(f"unknown target {kind}")


async def publish_at_rate(pub: Publisher, rate: float, duration: float) -> dict[str, Any]:
    """Publish seq 0..rate*duration-1 on a fixed schedule; say how close we kept to it.

    Events due in the same tick go out back to back, each stamped when it is sent,
    so a publisher that lags shows up as a lower achieved rate, not as latency.
    """
    total = max(1, int(rate * duration))
    start = time.monotonic()
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        while sent < due:
            await pub.publish(sent)
            sent += 1
        pause = start + sent / rate - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
    elapsed = time.monotonic() - start
    return {"sent": sent, "publish_seconds": elapsed, "achieved_rate": sent / elapsed}
