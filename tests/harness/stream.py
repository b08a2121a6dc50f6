"""The Redis side: raw producers writing the wire format, and the stream as ground truth.

Producers write with plain XADD, as any producer in any language would, so what
the clients receive can be compared with what the stream holds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

__all__ = ["STREAM", "Commands", "Producer", "check_exact", "id_key", "stream_entries",
           "stream_ids", "visible", "xadd"]

STREAM = "websocket-broadcast"


class Commands(Protocol):
    """Anything that sends one raw RESP command (`RedisProcess.command`)."""

    def command(self, *args: str) -> bytes: ...


def xadd(redis: Commands, event: str, data: Any, rooms: list[str] | None = None,
         stream: str = STREAM) -> str:
    """A raw XADD in the wire format, as any producer would write it; returns the entry id."""
    body: dict[str, Any] = {"event": event, "data": data}
    if rooms:
        body["rooms"] = rooms
    reply = redis.command("XADD", stream, "*", "data", json.dumps(body),
                          "timestamp", str(int(time.time() * 1000)))
    return reply.decode().split("\r\n")[1]


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Producer:
    """Raw XADDs at a steady rate, straight to Redis, retrying while Redis is away.

    `acked` holds the ids Redis acknowledged; an XADD whose reply was lost in a
    crash may still have been persisted, so the truth is the stream itself.
    """

    def __init__(self, redis_url: str, rate: float, pad: int = 0, stream: str = STREAM,
                 rooms: list[str] | None = None) -> None:
        self.url = redis_url
        self.rate = rate
        self.pad = "x" * pad
        self.stream = stream
        self.rooms = rooms
        self.acked: list[str] = []
        self.failures = 0
        self.seq = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def _fields(self) -> dict[str, str]:
        body: dict[str, Any] = {"event": "rel", "data": {"seq": self.seq, "t": time.time(),
                                                          "pad": self.pad}}
        if self.rooms:
            body["rooms"] = self.rooms
        return {"data": orjson.dumps(body).decode(), "timestamp": str(int(time.time() * 1000))}

    async def _run(self, limit: int | None) -> None:
        client = aioredis.Redis.from_url(self.url, decode_responses=True, socket_timeout=1,
                                         socket_connect_timeout=1)
        interval = 1 / self.rate
        next_at = time.monotonic()
        try:
            while not self._stop.is_set() and (limit is None or self.seq < limit):
                try:
                    entry_id = await client.xadd(self.stream, self._fields())  # type: ignore[arg-type]
                    self.acked.append(str(entry_id))
                    self.seq += 1
                except (RedisError, OSError):
                    self.failures += 1
                    await asyncio.sleep(0.05)  # Redis is away: retry the same event
                    continue
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    try:
                        await asyncio.wait_for(self._stop.wait(), delay)
                    except TimeoutError:
                        pass
                else:
                    next_at = time.monotonic()
        finally:
            await client.aclose()

    def start(self, limit: int | None = None) -> Producer:
        self._task = asyncio.create_task(self._run(limit))
        return self

    async def wait(self, within: float) -> None:
        assert self._task is not None
        await asyncio.wait_for(asyncio.shield(self._task), within)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)


async def stream_ids(redis_url: str, after: str = "-", stream: str = STREAM) -> list[str]:
    """Every id in the stream after `after` (exclusive unless '-'): the ground truth."""
    return [entry_id for entry_id, _ in await stream_entries(redis_url, after, stream)]


async def stream_entries(redis_url: str, after: str = "-",
                         stream: str = STREAM) -> list[tuple[str, list[str]]]:
    """Every (id, rooms) in the stream after `after`: who may see what."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        start = after if after == "-" else f"({after}"
        out: list[tuple[str, list[str]]] = []
        while True:
            page = await client.xrange(stream, min=start, max="+", count=5000)
            if not page:
                return out
            for entry_id, fields in page:
                try:
                    rooms = orjson.loads((fields or {}).get("data", "{}")).get("rooms") or []
                except (orjson.JSONDecodeError, AttributeError):
                    rooms = []
                out.append((str(entry_id), list(rooms)))
            start = f"({page[-1][0]!s}"
    finally:
        await client.aclose()


def visible(entries: list[tuple[str, list[str]]], rooms: set[str]) -> list[str]:
    """The ids a subscriber in `rooms` should see (public events plus its rooms)."""
    return [i for i, r in entries if not r or rooms.intersection(r)]


def check_exact(seen: list[str], expected: list[str]) -> str | None:
    """None when `seen` is exactly `expected` (in order, none twice), else what is wrong."""
    if seen == expected:
        return None
    seen_set = set(seen)
    dups = len(seen) - len(seen_set)
    missing = [i for i in expected if i not in seen_set]
    extra = sorted(seen_set - set(expected), key=id_key)
    disorder = sum(1 for a, b in itertools.pairwise(seen) if id_key(b) <= id_key(a))
    return (f"{len(seen)} seen vs {len(expected)} expected: {len(missing)} missing "
            f"(first {missing[:3]}), {dups} duplicates, {len(extra)} unexpected "
            f"(first {extra[:3]}), {disorder} out of order")
