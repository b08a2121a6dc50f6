"""Soak: steady load with connection churn; memory, fds and asyncio tasks must stay flat.

    .venv/bin/python -m bench.soak                 # 10 minutes (the documented run)
    .venv/bin/python -m bench.soak --seconds 60    # the CI variant (tests/reliability)

One redis-server and one dualcast process of its own on loopback. A raw-XADD
producer publishes at --rate events/s; --clients lean WS/SSE followers (half
each) subscribe; every second --churn connections are
dropped abruptly (the clients come back with their last id), and every 10 s a
tenth of the clients leave for good and as many new ones arrive. The server is
sampled every 5 s: RSS, open fds, open subscriber connections and asyncio tasks.

Tasks are counted without exposing anything new in the server: the dualcast
child is a `tests.harness.sampled.SampledDualcast`, whose app runs a sampler
task writing `len(asyncio.all_tasks())` to a file. At the end every client
leaves and the fds and tasks must return to their baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.follow import Follower, start_followers
from tests.harness.probes import log_problems
from tests.harness.procs import RedisProcess, raise_nofile
from tests.harness.sampled import SampledDualcast
from tests.harness.stream import Producer, check_exact, id_key, stream_ids
from tests.harness.waits import WaitTimeout, wait_for

SECRET = "soak-secret-0123456789abcdef-0123456789"


# ---------------------------------------------------------------- sampling
def proc_stats(pid: int, redis_port: int) -> tuple[float, int, int]:
    """RSS (MB), open fds, and how many of those are pooled connections to Redis."""
    import psutil

    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    pooled = sum(1 for c in psutil.Process(pid).net_connections("tcp")
                 if c.raddr and c.raddr.port == redis_port)
    return rss, len(os.listdir(f"/proc/{pid}/fd")), pooled


@dataclass
class Sample:
    t: float
    rss_mb: float
    fds: int
    redis_fds: int
    tasks: int
    clients: int


@dataclass
class SoakResult:
    seconds: float
    rate: float
    clients: int
    published: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    drops: int = 0
    reconnects: int = 0
    departures: int = 0
    arrivals: int = 0
    baseline: dict[str, float] = field(default_factory=dict)
    after_warmup: dict[str, float] = field(default_factory=dict)
    end_loaded: dict[str, float] = field(default_factory=dict)
    after_clients_left: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, float]] = field(default_factory=list)
    generator_cpu_s: float = 0.0
    task_kinds_after: list[Any] = field(default_factory=list)
    task_chains_after: list[Any] = field(default_factory=list)
    settle_seconds: float = 0.0
    log_problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        b, w, e, a = self.baseline, self.after_warmup, self.end_loaded, self.after_clients_left
        return "\n".join([
            f"soak {self.seconds:.0f}s: {self.clients} clients, {self.rate:g} events/s, "
            f"{self.drops} abrupt drops, {self.departures} departures / {self.arrivals} "
            f"arrivals, {self.reconnects} reconnects",
            f"  events published {self.published}, delivered {self.delivered}, lost "
            f"{self.lost}, duplicated {self.duplicated}, out of order {self.out_of_order}",
            f"  RSS MB: baseline {b['rss_mb']:.1f}, after warm-up {w['rss_mb']:.1f}, end "
            f"{e['rss_mb']:.1f}, clients gone {a['rss_mb']:.1f}",
            f"  fds: baseline {b['fds']:.0f} ({b['redis_fds']:.0f} to Redis), loaded "
            f"{e['fds']:.0f}, clients gone {a['fds']:.0f} ({a['redis_fds']:.0f} to Redis); "
            f"tasks: baseline {b['tasks']:.0f}, after warm-up "
            f"{w['tasks']:.0f}, end {e['tasks']:.0f}, clients gone {a['tasks']:.0f} "
            f"(settled in {self.settle_seconds:.1f}s)",
            f"  generator CPU {self.generator_cpu_s:.1f}s; log problems: "
            f"{len(self.log_problems)}",
        ])


async def _settle(check: Any, within: float) -> bool:
    """Whether `check()` came true within `within` seconds (a figure, not a failure)."""
    try:
        await wait_for(check, within, interval=0.25)
    except WaitTimeout:
        return False
    return True


async def soak(seconds: float = 600, clients: int = 200, rate: float = 50, churn: int = 5,
               workdir: Path | None = None, verbose: bool = True) -> SoakResult:
    raise_nofile()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="dualcast-soak-"))
    redis = RedisProcess(workdir / "redis").start()
    dc = SampledDualcast(workdir / "dc", redis.url, env={
        "DUALCAST_SECRET": SECRET, "DUALCAST_BLOCK_MS": "1000", "DUALCAST_REDIS_TIMEOUT": "2",
    }).start()
    assert dc.proc is not None
    pid = dc.proc.pid
    result = SoakResult(seconds=seconds, rate=rate, clients=clients)
    cpu0 = time.process_time()
    from dualcast.auth import mint_token

    tok = mint_token(SECRET, "soak", ttl=seconds + 3600)

    def snapshot(active: int) -> Sample:
        rss, fds, pooled = proc_stats(pid, redis.port)
        return Sample(time.monotonic() - t0, rss, fds, pooled, dc.tasks(), active)

    try:
        t0 = time.monotonic()
        await _settle(lambda: dc.tasks() > 0, 10)
        result.baseline = asdict(snapshot(0))
        await Producer(redis.url, rate=1000).start(limit=10).wait(10)

        def new(i: int) -> Follower:
            return Follower("ws" if i % 2 else "sse", "127.0.0.1", dc.port, token=tok)

        serial = 0
        active: list[Follower] = []
        for _ in range(clients):
            active.append(new(serial))
            serial += 1
        await start_followers(active, within=60)
        retired: list[Follower] = []
        producer = Producer(redis.url, rate=rate).start()
        warmup = min(30.0, seconds / 4)
        end_at = time.monotonic() + seconds
        next_sample = time.monotonic() + 5
        next_turnover = time.monotonic() + 10
        warmed = False
        while time.monotonic() < end_at:
            await asyncio.sleep(1)
            for f in random.sample(active, min(churn, len(active))):
                if f.conn is not None and f.conn.transport is not None:
                    f.conn.transport.abort()  # an abrupt loss: it comes back with its last id
                    result.drops += 1
            if time.monotonic() >= next_turnover:
                next_turnover += 10
                leaving = random.sample(active, max(1, len(active) // 10))
                for f in leaving:
                    active.remove(f)
                    await f.stop()
                    retired.append(f)
                result.departures += len(leaving)
                arriving = [new(serial + i) for i in range(len(leaving))]
                serial += len(leaving)
                await start_followers(arriving, within=30)
                active.extend(arriving)
                result.arrivals += len(arriving)
            if time.monotonic() >= next_sample:
                next_sample += 5
                s = snapshot(len(active))
                result.samples.append(asdict(s))
                if not warmed and s.t >= warmup:
                    warmed = True
                    result.after_warmup = asdict(s)
                if verbose:
                    print(f"  t={s.t:5.0f}s rss={s.rss_mb:6.1f}MB fds={s.fds:4d} "
                          f"tasks={s.tasks:4d} clients={s.clients}", flush=True)
        await producer.stop()
        result.end_loaded = asdict(snapshot(len(active)))
        if not result.after_warmup:
            result.after_warmup = result.end_loaded

        # Accounting: every follower, for the time it followed, saw exactly the stream.
        all_ids = await stream_ids(redis.url)
        position = {entry_id: i for i, entry_id in enumerate(all_ids)}
        result.published = len(all_ids)
        await _settle(lambda: all(f.record.last_id == all_ids[-1] for f in active), 30)
        for f in active + retired:
            start = f.record.first_welcome
            begin = 0 if start in (None, "0-0") else position.get(start, -1) + 1
            if f in retired:
                last = f.record.last_id
                end = position[last] + 1 if last in position else begin
            else:
                end = len(all_ids)
            expected = all_ids[begin:end]
            seen = f.ids
            result.delivered += len(seen)
            result.duplicated += len(seen) - len(set(seen))
            result.lost += len(set(expected) - set(seen))
            result.out_of_order += sum(
                1 for a, b in itertools.pairwise(seen) if id_key(b) <= id_key(a))
            result.reconnects += max(0, len(f.record.connected_at) - 1)
            problem = check_exact(seen, expected)
            if problem is not None and verbose:
                missing = [i for i in expected if i not in set(seen)][:3]
                print(f"  {f.kind} follower: {problem}; missing {missing}, closes "
                      f"{[(round(c.at - t0, 2), c.how) for c in f.record.closes]}, connects "
                      f"{[round(t - t0, 2) for t in f.record.connected_at]}")
        for f in active:
            await f.stop()
        base = result.baseline
        # Client-facing fds and tasks return to baseline; the Redis pool may keep
        # a few more connections than at start (it grew for concurrent replays).
        def settled() -> bool:
            _, fds, pooled = proc_stats(pid, redis.port)
            return (fds - pooled <= base["fds"] - base["redis_fds"]
                    and dc.tasks() <= base["tasks"] + 1)

        t_left = time.monotonic()
        await _settle(settled, 45)
        result.settle_seconds = time.monotonic() - t_left
        result.after_clients_left = asdict(snapshot(0))
        result.task_kinds_after = dc.task_kinds()
        result.task_chains_after = dc.task_chains()
        result.generator_cpu_s = time.process_time() - cpu0
        result.log_problems = log_problems(dc)
        return result
    finally:
        dc.stop()
        redis.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--churn", type=int, default=5, help="abrupt drops per second")
    parser.add_argument("--json", help="write the full result here")
    parser.add_argument("--workdir", type=Path, help="logs and data here (default: a temp dir)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    print(f"soak: {args.seconds:.0f}s, {args.clients} clients, {args.rate:g} events/s, "
          f"churn {args.churn}/s (nofile {soft})", flush=True)
    result = asyncio.run(soak(args.seconds, args.clients, args.rate, args.churn,
                              workdir=args.workdir, verbose=not args.quiet))
    print(result.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=1))
    ok = (result.lost == 0 and result.duplicated == 0 and result.out_of_order == 0
          and not result.log_problems)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
