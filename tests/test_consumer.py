"""The one consumer: delivers in order, skips bad entries, survives Redis going away."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from dualcast.config import load_settings
from dualcast.events import Event
from dualcast.feed import Feed
from dualcast.runtime import Runtime
from tests.harness.clients import WSClient
from tests.harness.procs import RedisProcess
from tests.harness.stream import xadd
from tests.harness.waits import wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["memory", "redis"])
async def runtime(request: pytest.FixtureRequest) -> AsyncIterator[Runtime]:
    stream = f"consumer-{uuid.uuid4().hex[:8]}"
    url = None
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
    rt = Runtime(load_settings(redis_url=url, stream=stream, block_ms=200), secret=None)
    await rt.start()
    await wait_for(lambda: rt.hub.started, 5, "consumer start")
    yield rt
    await asyncio.wait_for(rt.stop(), 10)


async def collect(feed: Feed, n: int, timeout: float = 5) -> list[Event]:
    got: list[Event] = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            got += [i for i in await feed.next(timeout=0.5) if isinstance(i, Event)]
    return got


async def test_entries_are_delivered_in_order_with_their_ids(runtime: Runtime) -> None:
    rt = runtime
    async with Feed(rt.hub, rt.log, rt.settings, "websocket", set(), None) as feed:
        ids = [await rt.log.append({"data": f'{{"event":"n","data":{i}}}', "timestamp": "5"})
               for i in range(50)]
        got = await collect(feed, 50)
    assert [e.id for e in got] == ids
    assert [e.data for e in got] == list(range(50))
    assert got[0].ts == 5


@pytest.mark.parametrize(
    "bad",
    [
        {"data": "not json"},
        {"data": '["a list"]'},
        {"data": '{"data": 1}'},
        {"data": '{"event": 7}'},
        {"data": '{"event": "x", "rooms": "admin"}'},
        {"other": "field"},
    ],
)
async def test_malformed_entries_are_skipped_counted_and_delivery_goes_on(
    runtime: Runtime, bad: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    rt = runtime
    async with Feed(rt.hub, rt.log, rt.settings, "sse", set(), None) as feed:
        bad_id = await rt.log.append(bad)
        good = await rt.log.append({"data": '{"event":"ok","data":null}'})
        got = await collect(feed, 1)
    assert [e.id for e in got] == [good]
    assert rt.consumer.stats.malformed == 1
    assert any(bad_id in r.getMessage() for r in caplog.records)


async def test_consumer_survives_redis_restart_and_delivers_what_came_after(
    fresh_redis: RedisProcess, dualcast: object
) -> None:
    server = dualcast(fresh_redis.url, env={"DUALCAST_BLOCK_MS": "300", "DUALCAST_BACKOFF_MAX": "0.5",
                                           "DUALCAST_REDIS_TIMEOUT": "1"})  # type: ignore[operator]
    async with WSClient(server.ws_url) as client:
        before = xadd(fresh_redis, "before", 1)
        await wait_for(lambda: client.seen.ids == [before], 10, "event before the restart")
        fresh_redis.stop()
        await wait_for(lambda: not server.ready(), 15, "readyz to say not ready")
        fresh_redis.start()
        after = [xadd(fresh_redis, "after", i) for i in range(3)]
        await wait_for(lambda: len(client.seen.ids) == 4, 20, "events after the restart")
        assert client.seen.ids == [before, *after]
        assert client.seen.closed is None  # the client was never disconnected
        await wait_for(server.ready, 10, "readyz to recover")
