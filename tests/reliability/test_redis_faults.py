"""Scenarios 1-3: Redis restarted (AOF), network blips and stalls, Redis restarted empty.

Every scenario runs real redis-server and dualcast processes, a raw-XADD producer
and clients on every transport, and asserts what the users saw: every event the
stream holds, in order, none twice, and (unless the scenario says otherwise) no
connection ended by the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import token
from tests.harness.follow import Follower, start_followers
from tests.harness.probes import log_problems, metric, readyz
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.stream import Producer, check_exact, stream_ids
from tests.harness.tcpproxy import TCPProxy
from tests.harness.waits import wait_for
from tests.reliability.conftest import FAST


async def _clients(dc: DualcastProcess, n: int = 3) -> tuple[list[Follower], list[Follower]]:
    tok = token("rel", rooms=["ops"])
    followers = [Follower(kind, "127.0.0.1", dc.port, token=tok)
                 for kind in ("ws", "sse") for _ in range(n)]
    await start_followers(followers)
    head = followers[0].record.last_id
    assert head is not None
    # Long-pollers as a user's page runs them: follow `last_id`, back off on 503.
    pollers = [Follower("poll", "127.0.0.1", dc.port, token=tok, last_id=head, poll_wait=2).start()
               for _ in range(2)]
    return followers, pollers


async def _all_received(followers: list[Follower], pollers: list[Follower],
                        expected: list[str], within: float = 20) -> None:
    n = len(expected)
    await wait_for(lambda: all(len(f.ids) >= n for f in followers)
                   and all(len(p.ids) >= n for p in pollers), within,
                   what=f"every client to receive {n} events")
    for f in followers:
        problem = check_exact(f.ids, expected)
        assert problem is None, f"{f.kind} client: {problem}"
    for p in pollers:
        problem = check_exact(p.ids, expected)
        assert problem is None, f"poller: {problem}"


async def _stop(followers: list[Follower], pollers: list[Follower]) -> None:
    await asyncio.gather(*(f.stop() for f in [*followers, *pollers]))


async def test_redis_killed_and_restarted_with_aof_loses_nothing(
    tmp_path: Path, dualcast: Callable[..., DualcastProcess]
) -> None:
    redis = RedisProcess(tmp_path / "redis", appendonly=True).start()
    try:
        dc = dualcast(redis.url, env=FAST)
        producer = Producer(redis.url, rate=200).start(limit=20)
        await producer.wait(10)
        followers, pollers = await _clients(dc)
        start = followers[0].record.last_id
        producer = Producer(redis.url, rate=200).start()
        await wait_for(lambda: len(producer.acked) >= 200, 10, what="200 events before the kill")

        redis.kill()
        t_kill = time.monotonic()
        await wait_for_async(lambda: readyz(dc), 503, 10, "readyz 503 while Redis is away")
        t_unready = time.monotonic() - t_kill
        failures = producer.failures
        await wait_for(lambda: producer.failures >= failures + 10, 10,
                       what="the producer to notice Redis is away")
        redis.start()  # same port, AOF reloaded
        t_back = time.monotonic()
        await wait_for_async(lambda: readyz(dc), 200, 15, "readyz 200 after Redis is back")
        t_ready = time.monotonic() - t_back
        acked_before = len(producer.acked)
        await wait_for(lambda: len(producer.acked) >= acked_before + 200, 10,
                       what="200 events after the restart")
        await producer.stop()

        expected = await stream_ids(redis.url, after=start)
        assert set(producer.acked) <= set(expected), "an acknowledged XADD was lost by Redis"
        await _all_received(followers, pollers, expected)
        for f in followers:
            assert f.record.closes == [], f"{f.kind} client was disconnected: {f.record.closes}"
        assert await metric(dc, "dualcast_consumer_reconnects") >= 1
        print(f"\nredis restart: {len(expected)} events, {len(followers) + len(pollers)} clients, "
              f"unready after {t_unready:.2f}s, ready again {t_ready:.2f}s after restart")
        await _stop(followers, pollers)
        assert log_problems(dc) == []
    finally:
        redis.stop()


async def wait_for_async(probe: Callable[[], object], want: object, within: float,
                         what: str) -> None:
    """Await `probe()` until it returns `want`, with a deadline."""
    async def hit() -> bool:
        return bool(await probe() == want)  # type: ignore[misc]

    await wait_for(hit, within, what, interval=0.05)


@pytest.fixture
def proxied(fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess]):  # type: ignore[no-untyped-def]
    proxy = TCPProxy(fresh_redis.port).start()
    dc = dualcast(f"redis://127.0.0.1:{proxy.port}/0", env=FAST)
    yield fresh_redis, proxy, dc
    proxy.close()


async def test_network_drop_and_refusal_resume_from_last_id(proxied) -> None:  # type: ignore[no-untyped-def]
    redis, proxy, dc = proxied
    followers, pollers = await _clients(dc)
    start = followers[0].record.last_id
    producer = Producer(redis.url, rate=150).start()
    await wait_for(lambda: len(producer.acked) >= 100, 10, what="events before the blip")

    reconnects = await metric(dc, "dualcast_consumer_reconnects")
    accepted = proxy.accepted
    proxy.drop()  # every dualcast->Redis connection reset at once
    await wait_for(lambda: proxy.accepted > accepted, 10, what="the consumer to reconnect")
    n = len(producer.acked)
    await wait_for(lambda: len(producer.acked) >= n + 100, 10, what="events after the drop")

    proxy.refuse()  # Redis unreachable for a while: nothing listens
    await wait_for_async(lambda: readyz(dc), 503, 10, "readyz 503 while refused")
    n = len(producer.acked)
    await wait_for(lambda: len(producer.acked) >= n + 150, 10, what="events XADDed meanwhile")
    proxy.restore()
    await wait_for_async(lambda: readyz(dc), 200, 10, "readyz 200 after the refusal")
    n = len(producer.acked)
    await wait_for(lambda: len(producer.acked) >= n + 100, 10, what="events after restore")
    await producer.stop()

    expected = await stream_ids(redis.url, after=start)
    await _all_received(followers, pollers, expected)
    for f in followers:
        assert f.record.closes == [], f"{f.kind} client was disconnected: {f.record.closes}"
    assert await metric(dc, "dualcast_consumer_reconnects") >= reconnects + 2
    await _stop(followers, pollers)
    assert log_problems(dc) == []


async def test_network_stall_without_close_is_noticed_by_timeouts(proxied) -> None:  # type: ignore[no-untyped-def]
    redis, proxy, dc = proxied
    followers, pollers = await _clients(dc)
    start = followers[0].record.last_id
    producer = Producer(redis.url, rate=150).start()
    await wait_for(lambda: len(producer.acked) >= 100, 10, what="events before the stall")

    proxy.stall()  # nothing closes; replies just never come
    t0 = time.monotonic()
    await wait_for_async(lambda: readyz(dc), 503, 15, "readyz 503 during the stall")
    noticed = time.monotonic() - t0
    # Bound: block (0.3 s) + timeout (1 s) for the read to fail, or the stall bound (2 s).
    assert noticed < 0.3 + 1 + 2 + 1.5, f"stall noticed only after {noticed:.1f}s"
    n = len(producer.acked)
    await wait_for(lambda: len(producer.acked) >= n + 150, 10, what="events XADDed meanwhile")
    proxy.restore()
    t1 = time.monotonic()
    await wait_for_async(lambda: readyz(dc), 200, 15, "readyz 200 after the stall")
    recovered = time.monotonic() - t1
    n = len(producer.acked)
    await wait_for(lambda: len(producer.acked) >= n + 100, 10, what="events after restore")
    await producer.stop()

    expected = await stream_ids(redis.url, after=start)
    await _all_received(followers, pollers, expected)
    for f in followers:
        assert f.record.closes == [], f"{f.kind} client was disconnected: {f.record.closes}"
    print(f"\nstall: noticed after {noticed:.2f}s, ready {recovered:.2f}s after restore, "
          f"{len(expected)} events delivered once to {len(followers) + len(pollers)} clients")
    await _stop(followers, pollers)
    assert log_problems(dc) == []


async def test_redis_restarted_empty_tells_clients_to_reset(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess]
) -> None:
    redis = fresh_redis
    dc = dualcast(redis.url, env=FAST)
    await Producer(redis.url, rate=500).start(limit=30).wait(10)
    followers, pollers = await _clients(dc)
    producer = Producer(redis.url, rate=200).start(limit=100)
    await producer.wait(10)
    await wait_for(lambda: all(len(f.ids) >= 100 for f in followers), 10, what="pre-loss events")

    redis.kill()
    redis.start(wipe=True)  # ids go backwards: the new stream is empty
    await wait_for(lambda: all(f.record.resets for f in followers), 15,
                   what="every streaming client to be told reset")
    await wait_for(lambda: all(p.record.resets for p in pollers), 15,
                   what="every poller to reset")
    await wait_for_async(lambda: readyz(dc), 200, 10, "readyz 200 after the data loss")

    # Recovery: the new stream's events reach everyone, once, in order.
    producer = Producer(redis.url, rate=200).start(limit=100)
    await producer.wait(10)
    expected = await stream_ids(redis.url)
    for f in followers:
        await wait_for(lambda f=f: len(f.ids) >= 100 + len(expected), 10,
                       what=f"{f.kind} client to receive the new stream")
        problem = check_exact(f.ids[100:], expected)
        assert problem is None, f"{f.kind} after reset: {problem}"
        assert f.record.closes == [], f"{f.kind} client was disconnected: {f.record.closes}"
    for p in pollers:
        await wait_for(lambda p=p: expected[-1] in p.ids, 10, what="poller to get the new stream")
        assert check_exact(p.ids[-len(expected):], expected) is None
    assert await metric(dc, "dualcast_resets") >= 1
    await _stop(followers, pollers)
    assert dc.proc is not None and dc.proc.poll() is None, "dualcast died"
    assert log_problems(dc) == []


async def test_a_poller_at_the_head_keeps_polling_while_redis_is_away(
    tmp_path: Path, dualcast: Callable[..., DualcastProcess]
) -> None:
    """As a stream keeps its connection, a poll whose cursor this instance holds in
    memory is answered (empty, at its timeout) while Redis is away, not refused 503."""
    redis = RedisProcess(tmp_path / "redis").start()
    try:
        dc = dualcast(redis.url, env=FAST)
        producer = Producer(redis.url, rate=50).start(limit=3)
        await producer.wait(10)
        async with httpx.AsyncClient(base_url=dc.url, timeout=10) as client:

            async def poll(after: str, timeout: int) -> httpx.Response:
                return await client.get("/api/events", params={"after": after, "timeout": timeout})

            async def caught_up() -> bool:
                answer = (await poll("0", 0)).json()
                return len(answer["events"]) == 3

            await wait_for(caught_up, 10, what="the 3 events in the instance's window")
            head = (await poll("0", 0)).json()["last_id"]
            assert (await poll(head, 0)).status_code == 200
            redis.kill()
            await wait_for_async(lambda: readyz(dc), 503, 10, "readyz 503 while Redis is away")
            for _ in range(3):  # polls of 1 s each: past the window's 1 s cache
                answer = await poll(head, 1)
                assert answer.status_code == 200, answer.text
                assert answer.json() == {"events": [], "last_id": head, "reset": False}
            behind = await poll("0", 1)  # a cursor the log must answer: Redis is needed
            assert behind.status_code == 503
    finally:
        redis.stop()


async def test_redis_emptied_and_appended_to_while_dualcast_was_away_tells_clients_to_reset(
    proxied,  # type: ignore[no-untyped-def]
) -> None:
    """Redis lost the stream (restarted empty here; a replica promoted without the last
    writes is the same) and a producer appended before dualcast was back. The new ids
    are newer than what the clients saw, so the head alone did not look backwards: every
    client went on from events the stream no longer holds, without a word, and so did a
    long-poll waiting across the loss. Each is told `reset`, then gets the new stream."""
    redis, proxy, dc = proxied
    followers, pollers = await _clients(dc)
    await Producer(redis.url, rate=500).start(limit=30).wait(10)
    before = await stream_ids(redis.url)
    await _all_received(followers, pollers, before)

    proxy.refuse()  # dualcast cannot reach Redis until the new stream has entries
    await wait_for_async(lambda: readyz(dc), 503, 10, "readyz 503 while refused")
    redis.kill()
    redis.start(wipe=True)
    await Producer(redis.url, rate=500).start(limit=5).wait(10)
    appended = await stream_ids(redis.url)
    assert appended[0] > before[-1]  # (newer ids: the clock moved on)
    proxy.restore()

    clients = [*followers, *pollers]
    await wait_for(lambda: all(c.record.resets for c in clients), 15,
                   what="every client (pollers too) to be told reset")
    producer = Producer(redis.url, rate=200).start(limit=20)
    await producer.wait(10)
    after = [i for i in await stream_ids(redis.url) if i not in appended]
    for c in clients:
        await wait_for(lambda c=c: after[-1] in c.ids, 10, what=f"{c.kind} to get the new stream")
        problem = check_exact(c.ids[-len(after):], after)
        assert problem is None, f"{c.kind} after the reset: {problem}"
    # A client that was away at the reset (reconnecting, between two polls) and comes
    # back with a cursor the stream no longer holds is told too.
    async with httpx.AsyncClient(base_url=dc.url, timeout=10) as http:
        answer = (await http.get("/api/events", params={"after": before[-1], "timeout": 0}))
        assert answer.json()["reset"] is True, answer.text
        async with http.stream("GET", "/api/sse",
                               params={"last_event_id": before[-1]}) as stream:
            async with asyncio.timeout(10):
                async for line in stream.aiter_lines():
                    if line.startswith("event: "):
                        assert line != "event: rel", "events after a cursor the stream lost, no reset"
                        if line == "event: reset":
                            break
    assert await metric(dc, "dualcast_resets") >= 1
    await _stop(followers, pollers)
    assert log_problems(dc) == []
