"""An instance that starts while Redis is away loses nothing once Redis returns.

Its consumer has no position until it first reaches Redis, and then starts at the
head. A client that resumed there meanwhile must not go live before that: it keeps
replaying from the log until the consumer holds a position at or before its
cursor (before, a client that replayed up to the head and went live lost everything
appended until the consumer's late start, with no `reset`). A client with no cursor
is never welcomed with a cursor the instance does not know (`0-0` made its next
reconnect replay the whole stream).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.clients import TRANSPORTS, Transport, WSClient, subscribe
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.stream import xadd
from tests.harness.waits import wait_for

pytestmark = pytest.mark.timeout(120)

#: The consumer retries Redis with a capped backoff; a long cap leaves a wide window
#: between Redis returning and the consumer's start, where the loss happened.
ENV = {"DUALCAST_BACKOFF_MAX": "4", "DUALCAST_REDIS_TIMEOUT": "1"}


async def produce(redis: RedisProcess, stream: str, count: int, within: float) -> list[str]:
    """`count` events spread over `within` seconds (bounded in count and time)."""
    ids: list[str] = []
    deadline = time.monotonic() + within * 3
    for n in range(count):
        ids.append(xadd(redis, "tick", {"n": n}, stream=stream))
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(within / count)  # pacing the producer, not waiting for anyone
    return ids


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server that keeps its stream across a stop and a start (append-only file)."""
    proc = RedisProcess(tmp_path / "redis", appendonly=True).start()
    yield proc
    proc.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_client_resuming_on_an_instance_started_without_redis_loses_nothing(
    durable_redis: RedisProcess, dualcast: Callable[..., DualcastProcess], transport: Transport,
) -> None:
    """Redis is down (connections refused, so the consumer backs off) while the instance
    starts and the client resumes there; Redis returns and events flow at once."""
    stream = f"away-{uuid.uuid4().hex}"
    cursor = xadd(durable_redis, "before", {}, stream=stream)
    durable_redis.stop()
    server = dualcast(durable_redis.url, env={**ENV, "DUALCAST_STREAM": stream})
    client = await subscribe(transport, server.url, after=cursor)
    try:
        # By its 8th failed try the consumer sleeps 2-4 s between tries, while a
        # resuming client's replay retries every second: the window the loss was in.
        await wait_for(lambda: "(8 tries" in server.log(), 60, "the consumer's 8th try")
        durable_redis.start()
        ids = await produce(durable_redis, stream, 200, 4.0)
        await wait_for(lambda: len(client.seen.ids) >= len(ids) or bool(client.seen.resets),
                       30, f"{transport}: every event after the cursor")
        assert client.seen.resets == []
        assert client.seen.ids == ids  # each once, in order, none lost
    finally:
        await client.close()


async def test_a_client_without_cursor_is_never_welcomed_with_one_the_instance_lacks(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess],
) -> None:
    stream = f"away-{uuid.uuid4().hex}"
    for n in range(5):
        head = xadd(fresh_redis, "before", {"n": n}, stream=stream)
    fresh_redis.signal(signal.SIGSTOP)
    try:
        server = dualcast(fresh_redis.url, env={**ENV, "DUALCAST_STREAM": stream})
        ws = WSClient(server.ws_url)
        await ws.connect()  # welcomed while Redis is away
    finally:
        fresh_redis.signal(signal.SIGCONT)
    try:
        assert ws.seen.welcome is not None
        welcomed = ws.seen.welcome["last_id"]
        assert welcomed in (None, head), welcomed  # never "0-0"
        later = await produce(fresh_redis, stream, 20, 1.0)
        await wait_for(lambda: later[-1] in ws.seen.ids, 30, "the events after the head")
        # "Live from now" starts where the instance first learns the head (Redis may
        # have taken some events before that): a gapless tail, nothing from before.
        assert ws.seen.ids and ws.seen.ids == later[-len(ws.seen.ids):]
    finally:
        await ws.close()
    answer = json.loads(await asyncio.to_thread(_poll_head, server.url))
    assert answer["events"] == [] and answer["last_id"] == later[-1]


def _poll_head(base: str) -> str:
    import urllib.request

    with urllib.request.urlopen(base + "/api/events?timeout=0", timeout=10) as response:
        return response.read().decode()
