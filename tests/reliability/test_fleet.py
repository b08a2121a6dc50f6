"""Several instances on one Redis: a client that moves between them with its cursor.

Behind a load balancer (or with `--workers N`) a client resumes on whichever
instance answers, with the last id another instance gave it. Instances read the
stream at their own pace, so the one it lands on may not have reached that id
yet: the client must still get every event after its cursor once, no reset, and
keep its connection.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Callable

import psutil
import pytest
import redis

from tests.harness.clients import Transport, subscribe
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.stream import xadd
from tests.harness.waits import wait_for

pytestmark = pytest.mark.timeout(120)

ENV = {"DUALCAST_BLOCK_MS": "500", "DUALCAST_REDIS_TIMEOUT": "1"}


def xadd_many(proc: RedisProcess, stream: str, count: int) -> list[str]:
    """`count` events in one pipeline: a burst that arrives between two reads."""
    client = redis.Redis.from_url(proc.url, decode_responses=True)
    try:
        pipe = client.pipeline(transaction=False)
        for n in range(count):
            pipe.xadd(stream, {"data": f'{{"event":"burst","data":{n}}}'})
        return [str(i) for i in pipe.execute()]
    finally:
        client.close()


def connected_to(proc: DualcastProcess) -> bool:
    """Whether a client's TCP connection to `proc` is established (the kernel accepts
    it for a stopped process too, where it waits to be read)."""
    return any(c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == proc.port
               for c in psutil.net_connections("tcp4"))


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_a_client_ahead_of_a_lagging_instance_is_not_cut_off(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess], transport: Transport,
) -> None:
    """B is paused while a burst goes by (as a busy instance falls behind); its client,
    moved from A with A's newest id, resumes on B as B comes back. B's consumer then
    reads the burst, which the client already has: before, each of those events was
    queued for it only to be dropped, and more of them than its queue holds cut it off
    (WS 1013, SSE ended) for events it was never owed, again at each reconnect while B
    caught up. Now it replays until B's consumer reaches its cursor, then goes live."""
    stream = f"fleet-{uuid.uuid4().hex}"
    env = {**ENV, "DUALCAST_STREAM": stream}
    a = dualcast(fresh_redis.url, env={**env, "DUALCAST_QUEUE_SIZE": "5000"})
    # A queue below the consumer's batch: one batch of stale events overflowed it.
    b = dualcast(fresh_redis.url, env={**env, "DUALCAST_QUEUE_SIZE": "100",
                                       "DUALCAST_BATCH_COUNT": "500"})
    on_a = await subscribe(transport, a.url)
    b.signal(signal.SIGSTOP)
    try:
        burst = xadd_many(fresh_redis, stream, 1500)
        await wait_for(lambda: on_a.seen.ids[-1:] == burst[-1:], 20, "A's client to read the burst")
        assert on_a.seen.ids == burst
        cursor = on_a.seen.ids[-1]
        resuming = asyncio.create_task(subscribe(transport, b.url, after=cursor))
        await wait_for(lambda: connected_to(b), 10, "the client's connection to paused B")
    finally:
        b.signal(signal.SIGCONT)
    on_b = await asyncio.wait_for(resuming, 15)
    try:
        ended = getattr(on_b, "ended", None)
        later = [xadd(fresh_redis, "after", {"n": n}, stream=stream) for n in range(20)]
        await wait_for(lambda: later[-1] in on_b.seen.ids or on_b.seen.resets
                       or on_b.seen.closed is not None or (ended is not None and ended.is_set()),
                       20, f"{transport}: the events after the cursor on B")
        assert on_b.seen.closed is None and not (ended is not None and ended.is_set())
        assert on_b.seen.resets == []
        assert on_b.seen.ids == later
        assert on_b.seen.welcome is not None and on_b.seen.welcome["last_id"] == cursor
    finally:
        await on_a.close()
        await on_b.close()
