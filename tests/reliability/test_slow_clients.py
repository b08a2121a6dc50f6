"""Scenario 4: 500 normal clients plus 20 that stop reading.

The stuck ones (a 4 KiB receive buffer, reading paused after `welcome`) must be
cut off without slowing anyone; the normal ones get every event, once, in
order; the server's memory stays bounded; a cut-off client that comes back with
its last id loses nothing. Lean raw-socket clients keep the generator cheap on
two cores. Timing (p99 with and without stuck clients) is
measured by bench/reliability.py, not asserted here.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from tests.conftest import token
from tests.harness.follow import Follower, Stuck, start_followers
from tests.harness.probes import log_problems, metric, rss_mb
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.stream import Producer, check_exact, stream_entries, visible
from tests.harness.waits import wait_for

NORMAL = int(os.environ.get("RELIABILITY_NORMAL_CLIENTS", "500"))
BULK_READERS = 20  # normal clients that also read the heavy room
STUCK = 20
EVENTS = 600  # small public events, to everyone
BULK = 80  # 64 KB events to the "bulk" room: more than a loopback socket buffers (~4 MB)
SLOW_ENV = {
    "DUALCAST_QUEUE_SIZE": "64",
    # hundreds of connections on two tokens: no per-subject cap here
    "DUALCAST_MAX_CONNECTIONS_PER_SUBJECT": "0",
    # The WebSocket heartbeat is what ends a client that reads nothing at all
    # (its socket never drains, so no close frame can reach it): make it seconds.
    "DUALCAST_PING_INTERVAL": "2",
    "DUALCAST_BLOCK_MS": "500",
    "DUALCAST_REDIS_TIMEOUT": "1",
}


async def test_stuck_clients_are_cut_off_and_resume_without_loss(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess]
) -> None:
    redis = fresh_redis
    dc = dualcast(redis.url, env=SLOW_ENV)
    assert dc.proc is not None
    await Producer(redis.url, rate=500).start(limit=5).wait(10)
    plain, heavy = token("rel"), token("bulk", rooms=["bulk"])
    normal = [Follower("ws" if i % 2 else "sse", "127.0.0.1", dc.port,
                       token=heavy if i < BULK_READERS else plain) for i in range(NORMAL)]
    await start_followers(normal, within=60)
    start = normal[0].record.last_id
    assert start is not None
    rss_before = rss_mb(dc.proc.pid)

    stuck = [Stuck("ws" if i % 2 else "sse", "127.0.0.1", dc.port, token=heavy)
             for i in range(STUCK)]
    await asyncio.gather(*(s.open() for s in stuck))

    public = Producer(redis.url, rate=100).start(limit=EVENTS)
    bulk = Producer(redis.url, rate=16, pad=64_000, rooms=["bulk"]).start(limit=BULK)
    await asyncio.gather(public.wait(30), bulk.wait(30))
    entries = await stream_entries(redis.url, after=start)
    everything = visible(entries, {"bulk", "user-bulk"})
    public_only = visible(entries, {"user-rel"})
    assert len(everything) == EVENTS + BULK and len(public_only) == EVENTS

    def expected(f: Follower) -> list[str]:
        return everything if f.token == heavy else public_only

    await wait_for(lambda: all(len(f.ids) >= len(expected(f)) for f in normal), 30,
                   what="every normal client to receive every event")
    for f in normal:
        problem = check_exact(f.ids, expected(f))
        assert problem is None, f"normal {f.kind} client: {problem}"
        assert f.record.closes == [], f"normal {f.kind} client cut off: {f.record.closes}"

    # What a stuck client sees when it reads again: the end of its connection
    # (the heartbeat or the send timeout ended it: its socket never drained, so
    # no close frame could reach it), and fewer events than were published.
    endings = await asyncio.gather(*(s.resume(within=15) for s in stuck))
    assert all(e is not None for e in endings), f"stuck connections still open: {endings}"
    for s in stuck:
        assert len(s.follower.ids) < len(everything), "a stuck client was not cut off"
    rss_after = rss_mb(dc.proc.pid)
    assert rss_after - rss_before < 60, f"server RSS grew {rss_before:.0f} -> {rss_after:.0f} MB"
    assert await metric(dc, "dualcast_connections") == NORMAL

    # They come back with their last id and lose nothing.
    back = [Follower(s.follower.kind, "127.0.0.1", dc.port, token=heavy,
                     last_id=s.follower.record.last_id, reconnect=False) for s in stuck]
    await start_followers(back)
    for s, b in zip(stuck, back, strict=True):
        await wait_for(lambda s=s, b=b: len(s.follower.ids) + len(b.ids) >= len(everything), 15,
                       what="a cut-off client to catch up")
        problem = check_exact(s.follower.ids + b.ids, everything)
        assert problem is None, f"cut-off {s.follower.kind} client after resuming: {problem}"
        assert b.record.resets == []
    print(f"\nslow clients: {NORMAL} normal got every event; {STUCK} stuck cut off "
          f"({sorted(set(endings))}, {await metric(dc, 'dualcast_drops'):.0f} counted as lagging);"
          f" RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    await asyncio.gather(*(f.stop() for f in normal + back))
    assert log_problems(dc) == []


async def test_slow_reader_is_told_1013_and_resumes_without_loss(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess]
) -> None:
    """A client that falls behind but still reads sees the cut-off itself: WS close 1013,
    SSE a `lagging` error then the end of the stream (heartbeat too slow to interfere)."""
    redis = fresh_redis
    dc = dualcast(redis.url, env={**SLOW_ENV, "DUALCAST_QUEUE_SIZE": "16",
                                  "DUALCAST_PING_INTERVAL": "60"})
    await Producer(redis.url, rate=500).start(limit=5).wait(10)
    heavy = token("bulk", rooms=["bulk"])
    slow = [Stuck(kind, "127.0.0.1", dc.port, token=heavy) for kind in ("ws", "sse")]
    await asyncio.gather(*(s.open() for s in slow))
    start = {id(s): s.follower.record.last_id for s in slow}
    # ~8 MB: more than the socket buffers hold, so each queue overflows.
    await Producer(redis.url, rate=200, pad=64_000, rooms=["bulk"]).start(limit=120).wait(30)
    endings = await asyncio.gather(*(s.resume(within=15) for s in slow))
    assert endings == ["ws 1013", "sse end"], endings
    assert [e.get("code") for e in slow[1].follower.record.errors] == ["lagging"]
    for s in slow:
        expected = [i for i, _ in await stream_entries(redis.url, after=start[id(s)] or "-")]
        back = Follower(s.follower.kind, "127.0.0.1", dc.port, token=heavy,
                        last_id=s.follower.record.last_id, reconnect=False)
        await start_followers([back])
        n = len(expected)
        await wait_for(lambda s=s, b=back, n=n: len(s.follower.ids) + len(b.ids) >= n,
                       15, what="the slow client to catch up")
        assert check_exact(s.follower.ids + back.ids, expected) is None
        await back.stop()
    assert await metric(dc, "dualcast_drops") == 2
    assert log_problems(dc) == []
