"""Scenarios 5 and 6: an instance killed behind nginx, graceful shutdown, rolling restart.

Clients behave as the dashboard does: on a loss they come back through nginx
with their last id (SSE honouring the server's `retry:`), so whichever instance
answers, they must end with every event of the stream, in order, once.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import token
from tests.harness.follow import Follower, start_followers
from tests.harness.nginx import NginxProcess, require_nginx
from tests.harness.probes import log_problems
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.stream import Producer, check_exact, stream_ids
from tests.harness.waits import wait_for

GRACE = 4.0
INSTANCE_ENV = {
    "DUALCAST_BLOCK_MS": "500",
    "DUALCAST_REDIS_TIMEOUT": "1",
    "DUALCAST_SHUTDOWN_GRACE": str(GRACE),
    "DUALCAST_SSE_RETRY_MS": "300",
}
CLIENTS = 40  # per transport


def peak_per_second(times: list[float]) -> int:
    buckets = Counter(int(t * 2) for t in times)  # half-second buckets, scaled to per second
    return max(buckets.values(), default=0) * 2


async def routed_to(nginx: NginxProcess, port: int, within: float = 15) -> None:
    """Until nginx sends a request to the instance on `port` (X-Dualcast-Upstream)."""
    want = f"127.0.0.1:{port}"
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            try:
                r = await client.get(nginx.url + "/readyz")
                if r.status_code == 200 and r.headers.get("x-dualcast-upstream") == want:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"nginx did not route to {want} within {within}s")


async def _everyone_has(followers: list[Follower], expected: list[str], within: float) -> None:
    n = len(expected)
    try:
        await wait_for(lambda: all(len(f.ids) >= n for f in followers), within,
                       what=f"every client to hold {n} events")
    except AssertionError as exc:
        behind = [(f.kind, len(f.ids), f.record.last_id, [c.how for c in f.record.closes],
                   f.live.is_set()) for f in followers if len(f.ids) < n]
        raise AssertionError(f"{exc}; behind: {behind[:5]} ({len(behind)} clients)") from None
    for f in followers:
        problem = check_exact(f.ids, expected)
        assert problem is None, f"{f.kind} client: {problem} (closes {f.record.closes})"


async def test_instance_killed_behind_nginx_clients_move_and_lose_nothing(
    tmp_path: Path, fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess]
) -> None:
    require_nginx()
    redis = fresh_redis
    a = dualcast(redis.url, env=INSTANCE_ENV)
    b = dualcast(redis.url, env=INSTANCE_ENV)
    with NginxProcess(tmp_path / "nginx", upstreams=[a.port, b.port]) as nginx:
        await Producer(redis.url, rate=500).start(limit=5).wait(10)
        tok = token("rel")
        followers = [Follower(kind, "127.0.0.1", nginx.port, token=tok)
                     for kind in ("ws", "sse") for _ in range(CLIENTS)]
        await start_followers(followers)
        start = followers[0].record.last_id
        producer = Producer(redis.url, rate=100).start()
        await wait_for(lambda: len(producer.acked) >= 100, 10, what="events before the kill")

        a.kill()  # SIGKILL: no drain, no close frames
        t_kill = time.monotonic()
        await wait_for(lambda: sum(1 for f in followers if f.record.closes) > 0, 10,
                       what="the dead instance's clients to notice")
        moved = [f for f in followers if f.record.closes]
        await wait_for(lambda: all(len(f.record.connected_at) >= 2 for f in moved), 15,
                       what="every client of the dead instance to reconnect")
        n = len(producer.acked)
        await wait_for(lambda: len(producer.acked) >= n + 100, 10, what="events after the kill")
        await producer.stop()

        expected = await stream_ids(redis.url, after=start)
        await _everyone_has(followers, expected, 20)
        delays = sorted(f.record.connected_at[1] - t_kill for f in moved)
        print(f"\ninstance death: {len(moved)}/{len(followers)} clients moved to the survivor, "
              f"reconnected within {delays[0]:.2f}-{delays[-1]:.2f}s, "
              f"{len(expected)} events, none lost or twice")
        assert 0 < len(moved) < len(followers)
        assert all(f.record.resets == [] for f in followers)
        await asyncio.gather(*(f.stop() for f in followers))
    assert log_problems(b) == []


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_drains_with_1001_and_jittered_retry_within_grace(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess], workers: int
) -> None:
    """One process (our DrainingServer) and `--workers 2` (uvicorn's supervisor sends
    each worker SIGTERM; the drain sits in front of uvicorn's handler) alike."""
    # (with two, both serve from the start: each drains its own share)
    dc = dualcast(fresh_redis.url, env={**INSTANCE_ENV, "DUALCAST_WORKERS": str(workers),
                                        "DUALCAST_WORKERS_WAKE": "start"})
    assert dc.proc is not None
    tok = token("rel")
    followers = [Follower(kind, "127.0.0.1", dc.port, token=tok, reconnect=False)
                 for kind in ("ws", "sse") for _ in range(20)]
    await start_followers(followers)
    producer = Producer(fresh_redis.url, rate=100).start()
    await wait_for(lambda: all(f.ids for f in followers), 10, what="events flowing")

    t0 = time.monotonic()
    dc.signal(signal.SIGTERM)
    await wait_for(lambda: all(f.record.closes for f in followers), GRACE + 2,
                   what="every client to be sent away")
    exit_code = await asyncio.to_thread(dc.proc.wait, GRACE + 5)
    took = time.monotonic() - t0
    await producer.stop()

    ws = [f for f in followers if f.kind == "ws"]
    sse = [f for f in followers if f.kind == "sse"]
    assert {f.record.closes[0].how for f in ws} == {"ws 1001"}
    assert {f.record.closes[0].how for f in sse} == {"sse end"}
    finals = [f.record.retries[-1] for f in sse]
    assert all(len(f.record.retries) >= 2 for f in sse), "SSE ended without a final retry:"
    assert len(set(finals)) > len(sse) // 2, f"retry values not jittered: {finals}"
    closed_at = sorted(f.record.closes[0].at - t0 for f in followers)
    assert closed_at[-1] - closed_at[0] > GRACE / 8, f"closes not spread: {closed_at}"
    # uvicorn re-raises the signal it handled once shut down: death by SIGTERM, after a drain.
    assert exit_code in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in dc.log()
    assert took < GRACE + 2, f"exit took {took:.1f}s with a {GRACE}s grace period"
    print(f"\nSIGTERM ({workers} worker(s)): {len(followers)} clients closed over {closed_at[0]:.2f}-"
          f"{closed_at[-1]:.2f}s, SSE retry {min(finals)}-{max(finals)} ms, exit after {took:.2f}s")
    assert log_problems(dc) == []


async def test_rolling_restart_behind_nginx_loses_nothing(
    tmp_path: Path, fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess]
) -> None:
    require_nginx()
    redis = fresh_redis
    a = dualcast(redis.url, env=INSTANCE_ENV)
    b = dualcast(redis.url, env=INSTANCE_ENV)
    with NginxProcess(tmp_path / "nginx", upstreams=[a.port, b.port]) as nginx:
        await Producer(redis.url, rate=500).start(limit=5).wait(10)
        tok = token("rel")
        followers = [Follower(kind, "127.0.0.1", nginx.port, token=tok)
                     for kind in ("ws", "sse") for _ in range(CLIENTS)]
        await start_followers(followers)
        start = followers[0].record.last_id
        producer = Producer(redis.url, rate=100).start()
        await wait_for(lambda: len(producer.acked) >= 50, 10, what="events before the deploy")

        t0 = time.monotonic()
        replaced: list[DualcastProcess] = []
        for old in (a, b):
            assert old.proc is not None
            old.signal(signal.SIGTERM)
            code = await asyncio.to_thread(old.proc.wait, GRACE + 5)
            assert code in (0, -signal.SIGTERM)
            assert log_problems(old) == []
            new = await asyncio.to_thread(dualcast, redis.url, env=INSTANCE_ENV, port=old.port)
            replaced.append(new)
            # As a deploy script must: drain the next instance only once the proxy
            # sends traffic to the new one (nginx skips a refused instance for
            # fail_timeout; with both skipped it answers 502 to everyone).
            await routed_to(nginx, new.port)
        took = time.monotonic() - t0
        n = len(producer.acked)
        await wait_for(lambda: len(producer.acked) >= n + 100, 10, what="events after deploy")
        await producer.stop()

        expected = await stream_ids(redis.url, after=start)
        await _everyone_has(followers, expected, 20)
        reconnects = [t for f in followers for t in f.record.connected_at[1:]]
        assert all(f.record.resets == [] for f in followers)
        peak = peak_per_second(reconnects)
        print(f"\nrolling restart: {len(followers)} clients, {len(reconnects)} reconnects over "
              f"{took:.1f}s, peak {peak}/s, {len(expected)} events, none lost or twice")
        # Spread by the drain: never everyone in the same half second.
        assert peak < len(followers) * 2
        await asyncio.gather(*(f.stop() for f in followers))
    for proc in replaced:
        assert log_problems(proc) == []
