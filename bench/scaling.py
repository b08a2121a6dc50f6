"""The figures behind docs/scaling.md that `python -m bench` does not already give.

    .venv/bin/python -m bench.scaling read    # an instance's CPU per event with no subscribers
    .venv/bin/python -m bench.scaling redis   # XADD rate and memory per retained entry

`read`: one redis-server and one dualcast process (Stack, as `python -m bench`),
no client at all; a pipelined producer appends events of about 200 bytes at each
--rates for --seconds; the server's CPU over that window, minus its idle CPU over
the same time, divided by the events appended, is what every instance pays per
event only because it reads the whole stream. Redis' CPU is reported the same way.

`redis`: redis-benchmark XADDs in the wire format (MAXLEN ~ 10000), unpipelined with
50 connections and pipelined 16 deep; then MEMORY USAGE of a stream holding
--entries entries of each payload size, per entry.

Each figure is the median of --repeat runs, printed as a Markdown table row with
every run's value. The machine is shared: short runs, noisy figures.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from bench.procs import Stack
from tests.harness.procs import RedisProcess
from tests.harness.waits import wait_until

STREAM = "websocket-broadcast"


def envelope(n: int, pad: int) -> dict[str, str]:
    body = {"event": "tick", "data": {"n": n, "t": time.time(), "pad": "x" * pad}}
    return {"data": orjson.dumps(body).decode(), "timestamp": str(int(time.time() * 1000))}


async def produce(url: str, rate: float, seconds: float, pad: int = 120) -> int:
    """`rate` events/s for `seconds`, in pipelined slices every 10 ms; returns the count."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    sent = 0
    start = time.monotonic()
    try:
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(rate * elapsed) - sent
            if due > 0:
                pipe = client.pipeline(transaction=False)
                for k in range(due):
                    pipe.xadd(STREAM, envelope(sent + k, pad),  # type: ignore[arg-type]
                              maxlen=10_000, approximate=True)
                await pipe.execute()
                sent += due
            await asyncio.sleep(0.01)  # pacing the producer
    finally:
        await client.aclose()
    return sent


def median_row(name: str, values: list[float], unit: str) -> str:
    runs = " / ".join(f"{v:,.1f}" for v in values)
    return f"| {name} | {statistics.median(values):,.1f} {unit} | {runs} |"


async def read_cost(rates: list[float], seconds: float, repeat: int) -> list[str]:
    rows = []
    for rate in rates:
        server_us: list[float] = []
        redis_us: list[float] = []
        for _ in range(repeat):
            stack = Stack("dualcast").start()
            try:
                wait_until(functools.partial(_ready, stack.port), 20, what="dualcast ready")
                s0, r0 = stack.server_cpu(), stack.redis_cpu()
                await asyncio.sleep(seconds)  # the idle baseline window
                idle_s, idle_r = stack.server_cpu() - s0, stack.redis_cpu() - r0
                s1, r1 = stack.server_cpu(), stack.redis_cpu()
                sent = await produce(stack.redis_url, rate, seconds)
                busy_s, busy_r = stack.server_cpu() - s1, stack.redis_cpu() - r1
            finally:
                stack.stop()
            server_us.append((busy_s - idle_s) / sent * 1e6)
            redis_us.append((busy_r - idle_r) / sent * 1e6)
            print(json.dumps({"rate": rate, "sent": sent, "server_cpu_s": busy_s,
                              "idle_server_cpu_s": idle_s, "redis_cpu_s": busy_r}), flush=True)
        rows.append(median_row(f"dualcast µs CPU per event read, {rate:,.0f} ev/s asked",
                               server_us, "µs"))
        rows.append(median_row(f"redis µs CPU per event (XADD + XREAD), {rate:,.0f} ev/s",
                               redis_us, "µs"))
    return rows


def burst_cost(events: int, repeat: int) -> list[str]:
    """`events` XADDs as fast as redis-benchmark sends them (pipelined): the consumer
    reads in full COUNT batches, the cheapest case, and its read rate is its ceiling."""
    bench = _redis_benchmark()
    server_us: list[float] = []
    rates: list[float] = []
    for _ in range(repeat):
        stack = Stack("dualcast").start()
        try:
            wait_until(functools.partial(_ready, stack.port), 20, what="dualcast ready")
            s0 = stack.server_cpu()
            t0 = time.monotonic()
            subprocess.run(
                [bench, "-h", "127.0.0.1", "-p", str(stack.redis_port), "-c", "4", "-n",
                 str(events), "-P", "32", "-q", "XADD", STREAM, "MAXLEN", "~", "200000", "*",
                 "data", orjson.dumps({"event": "tick", "data": {"pad": "x" * 120}}).decode(),
                 "timestamp", "1732550000000"],
                capture_output=True, text=True, timeout=120, check=True)
            wait_until(functools.partial(_consumed, stack.port, events), 120,
                       what=f"the consumer to read {events} events")
            took = time.monotonic() - t0
            server_us.append((stack.server_cpu() - s0) / events * 1e6)
            rates.append(events / took)
        finally:
            stack.stop()
        print(json.dumps({"burst": events, "server_us": server_us[-1], "read_per_s": rates[-1]}),
              flush=True)
    return [median_row(f"dualcast µs CPU per event read, burst of {events:,}", server_us, "µs"),
            median_row("events/s one instance read in that burst (XADD included)", rates,
                       "ev/s")]


def _consumed(port: int, events: int) -> bool:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("dualcast_events_consumed"):
            return float(line.rsplit(" ", 1)[1]) >= events
    return False


def _redis_benchmark() -> str:
    bench = shutil.which("redis-benchmark")
    if bench is None:
        raise SystemExit("redis-benchmark is not installed (Debian: redis-tools)")
    return bench


def _ready(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def redis_figures(entries: int, repeat: int, workdir: str) -> list[str]:
    bench = _redis_benchmark()
    rows = []
    redis = RedisProcess(Path(workdir) / "redis").start()
    try:
        payload = orjson.dumps({"event": "tick", "data": {"n": 1, "pad": "x" * 120}}).decode()
        for pipeline in (1, 16):
            rps: list[float] = []
            for _ in range(repeat):
                redis.command("DEL", STREAM)
                out = subprocess.run(
                    [bench, "-h", "127.0.0.1", "-p", str(redis.port), "-c", "50", "-n", "100000",
                     "-P", str(pipeline), "-q", "XADD", STREAM, "MAXLEN", "~", "10000", "*",
                     "data", payload, "timestamp", "1732550000000"],
                    capture_output=True, text=True, timeout=120, check=True).stdout
                found = re.findall(r"([\d.]+) requests per second", out)
                rps.append(float(found[-1]))
            rows.append(median_row(f"XADD/s, 50 connections, pipeline {pipeline}", rps, "/s"))
        # What readers cost Redis: every instance's consumer reads every entry. XRANGE
        # pages of 100 from a full stream stand in for the consumers' XREAD COUNT batches.
        redis.command("DEL", STREAM)
        _fill(redis.url, 10_000, 120)
        served: list[float] = []
        for _ in range(repeat):
            out = subprocess.run(
                [bench, "-h", "127.0.0.1", "-p", str(redis.port), "-c", "20", "-n", "20000",
                 "-q", "XRANGE", STREAM, "-", "+", "COUNT", "100"],
                capture_output=True, text=True, timeout=120, check=True).stdout
            served.append(100 * float(re.findall(r"([\d.]+) requests per second", out)[-1]))
        rows.append(median_row("entries/s read back (XRANGE COUNT 100, 20 connections)",
                               served, "/s"))
        for pad in (120, 1000):
            per_entry: list[float] = []
            for _ in range(repeat):
                redis.command("DEL", STREAM)
                _fill(redis.url, entries, pad)
                usage = int(redis.command("MEMORY", "USAGE", STREAM, "SAMPLES", "0")
                            .decode().strip().lstrip(":"))
                per_entry.append(usage / entries)
            size = len(envelope(0, pad)["data"])
            rows.append(median_row(f"bytes per retained entry, ~{size} B envelope, {entries:,} "
                                   "entries", per_entry, "B"))
    finally:
        redis.stop()
    return rows


def _fill(url: str, entries: int, pad: int) -> None:
    async def fill() -> None:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            for start in range(0, entries, 1000):
                pipe = client.pipeline(transaction=False)
                for n in range(start, min(entries, start + 1000)):
                    pipe.xadd(STREAM, envelope(n, pad))  # type: ignore[arg-type]
                await pipe.execute()
        finally:
            await client.aclose()

    asyncio.run(fill())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("read")
    r.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                   default=[1000.0, 5000.0])
    r.add_argument("--seconds", type=float, default=8.0)
    r.add_argument("--repeat", type=int, default=3)
    r.add_argument("--burst", type=int, default=100_000, help="0: no burst run")
    q = sub.add_parser("redis")
    q.add_argument("--entries", type=int, default=100_000)
    q.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows: list[Any]
    if args.mode == "read":
        rows = asyncio.run(read_cost(args.rates, args.seconds, args.repeat))
        if args.burst:
            rows += burst_cost(args.burst, args.repeat)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
            rows = redis_figures(args.entries, args.repeat, tmp)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"`python -m bench.scaling {args.mode}` (median of {args.repeat}; every run)")
    print("| figure | median | runs |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
