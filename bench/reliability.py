"""Reliability figures: normal clients' latency with and without stuck clients, plus
the figures every reliability scenario prints.

    .venv/bin/python -m bench.reliability                    # p99 with/without stuck clients
    .venv/bin/python -m bench.reliability --scenarios        # + run tests/reliability -s
                                                             #   and collect their figures

Latency: one redis-server and one dualcast process on loopback; --clients lean
WS/SSE followers (half each) in this process, which reports its own CPU (on two
shared cores the generator competes with the server). Phase A
publishes --events small public events at --rate/s plus 64 KB events to a
`bulk` room nobody reads; phase B does the same with --stuck clients in the bulk
room that stop reading (4 KiB receive buffer, reading paused). Latency is from
the producer's timestamp to arrival. The goal: p99 with stuck clients within
2x of p99 without. Every normal client must also get every event exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.harness.follow import Follower, Stuck, start_followers
from tests.harness.procs import ROOT, DualcastProcess, RedisProcess, raise_nofile
from tests.harness.stream import Producer, check_exact, stream_entries, visible

SECRET = "reliability-secret-0123456789abcdef"
ENV = {
    "DUALCAST_SECRET": SECRET,
    "DUALCAST_QUEUE_SIZE": "64",
    "DUALCAST_PING_INTERVAL": "2",
    "DUALCAST_BLOCK_MS": "500",
    "DUALCAST_REDIS_TIMEOUT": "1",
    "DUALCAST_LOG_LEVEL": "warning",
}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _phase(redis: RedisProcess, followers: list[Follower], events: int, rate: float,
                 bulk: int) -> dict[str, Any]:
    for f in followers:
        assert f.latencies is not None
        f.latencies.clear()
    start = {id(f): (f.record.last_id, len(f.ids)) for f in followers}
    cpu0 = time.process_time()
    public = Producer(redis.url, rate=rate).start(limit=events)
    heavy = Producer(redis.url, rate=max(bulk / (events / rate), 1), pad=64_000,
                     rooms=["bulk"]).start(limit=bulk)
    await asyncio.gather(public.wait(events / rate + 60), heavy.wait(events / rate + 60))
    deadline = time.monotonic() + 60
    while any(len(f.latencies or []) < events for f in followers):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    lat = [x for f in followers for x in (f.latencies or [])]
    problems = 0
    for f in followers:
        after, begin = start[id(f)]
        entries = await stream_entries(redis.url, after=after or "-")
        problems += check_exact(f.ids[begin:], visible(entries, {"user-rel"})) is not None
    return {
        "deliveries": len(lat), "expected": events * len(followers),
        "p50_ms": percentile(lat, 0.5) * 1000, "p99_ms": percentile(lat, 0.99) * 1000,
        "max_ms": max(lat, default=float("nan")) * 1000,
        "clients_with_loss_or_dup": problems,
        "generator_cpu_s": time.process_time() - cpu0,
    }


async def latency(clients: int, stuck: int, events: int, rate: float, bulk: int) -> str:
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="dualcast-reliability-"))
    redis = RedisProcess(workdir / "redis").start()
    dc = DualcastProcess(workdir / "dc", redis_url=redis.url, env=ENV).start()
    from dualcast.auth import mint_token

    plain = mint_token(SECRET, "rel")
    heavy = mint_token(SECRET, "bulk", rooms=["bulk"])
    lines = []
    try:
        await Producer(redis.url, rate=500).start(limit=5).wait(10)
        followers = [Follower("ws" if i % 2 else "sse", "127.0.0.1", dc.port, token=plain,
                              latencies=True) for i in range(clients)]
        await start_followers(followers, within=60)
        warm = Producer(redis.url, rate=100).start(limit=20)
        await warm.wait(10)
        deadline = time.monotonic() + 30
        while any(f.record.last_id != warm.acked[-1] for f in followers):  # warm-up delivered
            if time.monotonic() > deadline:
                raise TimeoutError("warm-up events were not delivered to every client")
            await asyncio.sleep(0.1)
        a = await _phase(redis, followers, events, rate, bulk)
        blocked = [Stuck("ws" if i % 2 else "sse", "127.0.0.1", dc.port, token=heavy)
                   for i in range(stuck)]
        await asyncio.gather(*(s.open() for s in blocked))
        b = await _phase(redis, followers, events, rate, bulk)
        endings = await asyncio.gather(*(s.resume(within=15) for s in blocked))
        cut = sum(1 for e in endings if e is not None)
        for f in followers:
            await f.stop()
        lines.append(f"latency: {clients} normal clients (WS+SSE), {events} events at "
                     f"{rate:g}/s + {bulk} x 64 KB to an unread room, per phase")
        for name, r in (("without stuck", a), (f"with {stuck} stuck", b)):
            lines.append(
                f"  {name:>15}: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max "
                f"{r['max_ms']:.1f} ms; delivered {r['deliveries']}/{r['expected']}, clients "
                f"with loss or duplicates {r['clients_with_loss_or_dup']}, generator CPU "
                f"{r['generator_cpu_s']:.1f}s")
        lines.append(f"  p99 ratio with/without stuck: {b['p99_ms'] / a['p99_ms']:.2f} "
                     f"(goal < 2); stuck clients cut off: {cut}/{stuck}")
        return "\n".join(lines)
    finally:
        dc.stop()
        redis.stop()


FIGURE = re.compile(r"^(redis restart|stall|slow clients|instance death|SIGTERM|rolling restart|"
                    r"abrupt|soak \d+s|  events published|  RSS MB|  fds|  generator CPU)")


def scenarios() -> str:
    """Run the reliability tests with output shown and keep the figure lines they print."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/reliability", "-q", "-s", "-p",
         "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    figures = [line.rstrip() for line in proc.stdout.splitlines() if FIGURE.match(line.strip())
               or FIGURE.match(line)]
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    return "\n".join([*figures, f"pytest: {tail} ({time.monotonic() - started:.0f}s wall)"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.reliability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--stuck", type=int, default=20)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--bulk", type=int, default=80)
    parser.add_argument("--scenarios", action="store_true",
                        help="also run tests/reliability and print their figures")
    args = parser.parse_args(argv)
    print(asyncio.run(latency(args.clients, args.stuck, args.events, args.rate, args.bulk)),
          flush=True)
    if args.scenarios:
        print(scenarios())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
