"""Crowds of long-polls: the same question asked at once is asked of Redis once.

Pollers reconnecting together (a restarted instance, a dropped proxy, a fleet of
dashboards that all start at `0`) ask for the same page of the log. Each read it for
itself: thousands of identical XRANGEs queued on the pool, and those that waited past
the Redis timeout were answered 503. The reads are shared now (server/flights.py),
and every poller still gets every event.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable

import httpx
import pytest
import redis

from dualcast.flights import Flights
from tests.harness.procs import DualcastProcess, RedisProcess

pytestmark = pytest.mark.timeout(60)


def xrange_calls(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats").get("cmdstat_xrange", {})
        return int(stats.get("calls", 0))
    finally:
        client.close()


async def test_a_crowd_behind_the_window_shares_its_reads_and_gets_every_event(
    redis_server: RedisProcess, dualcast: Callable[..., DualcastProcess],
) -> None:
    stream = f"crowd-{uuid.uuid4().hex[:8]}"
    raw = redis.Redis.from_url(redis_server.url)
    try:
        ids = [raw.xadd(stream, {"data": json.dumps({"event": "tick", "data": {"n": n}})}).decode()
               for n in range(20)]
    finally:
        raw.close()
    server = dualcast(redis_server.url, env={"DUALCAST_STREAM": stream,
                                             "DUALCAST_MAX_CONNECTIONS_PER_ADDRESS": "0"})
    crowd = 300
    before = xrange_calls(redis_server.url)
    limits = httpx.Limits(max_connections=crowd)
    async with httpx.AsyncClient(base_url=server.url, timeout=20, limits=limits) as client:
        answers = await asyncio.gather(*(
            client.get("/api/events", params={"after": "0", "timeout": "5"})
            for _ in range(crowd)))
    reads = xrange_calls(redis_server.url) - before
    assert [a.status_code for a in answers] == [200] * crowd
    for answer in answers:
        assert [e["id"] for e in answer.json()["events"]] == ids
    assert reads <= crowd // 10, f"{reads} XRANGEs for {crowd} polls at one cursor"


async def test_flights_share_one_call_and_survive_a_callers_cancellation() -> None:
    flights: Flights[str, int] = Flights()
    calls = 0
    gate = asyncio.Event()

    async def call() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return calls

    async with asyncio.timeout(5):
        first = asyncio.create_task(flights.run("k", call))
        others = [asyncio.create_task(flights.run("k", call)) for _ in range(4)]
        await asyncio.sleep(0)
        first.cancel()  # one caller leaves: the others still get the result
        await asyncio.sleep(0)
        gate.set()
        assert await asyncio.gather(*others) == [1] * 4
        assert calls == 1
        assert await flights.run("k", call) == 2  # landed: the next ask calls again


async def test_a_failed_flight_fails_every_caller_and_the_next_ask_tries_again() -> None:
    flights: Flights[str, str] = Flights()
    attempts = 0

    async def call() -> str:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0)
        if attempts == 1:
            raise ConnectionError("away")
        return "back"

    async with asyncio.timeout(5):
        results = await asyncio.gather(*(flights.run("k", call) for _ in range(3)),
                                       return_exceptions=True)
        assert [type(r) for r in results] == [ConnectionError] * 3
        assert await flights.run("k", call) == "back"
