"""Does a flood of `/api/overview` calls slow a live client down? (issue 15, item 4)

`python -m bench.overview_load [--rate 200] [--seconds 40] [--window 2.5] [--retained 10000]
[--root DIR]`

A fresh redis-server gets `--retained` entries of ~450 bytes (the demo's events),
then one dualcast serves it. A live WebSocket client measures the delay of public
events XADDed 20 times a second (XADD to receipt, same machine). Quiet windows and
windows with `--rate` anonymous overview calls a second (from another process)
alternate within one run, so both meet the same background load on a shared
machine. Before the overview was folded incrementally, every call decoded the whole
retained stream (0.13 s of CPU for 10,000 entries) and 200 calls a second moved the
live client's delay from 35 ms to 2.5 s. The goal: p99 in the loaded windows within
2x of the quiet ones. `--root` serves another checkout's `server/` (A/B runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
import websockets

from dualcast.demo import Simulation
from dualcast.events import Envelope, entry_fields
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.waits import wait_until

STREAM = "websocket-broadcast"
TICKS_PER_SECOND = 20
PAD = "x" * 300  # a tick of ~450 bytes, like the retained entries


def prefill(client: redis.Redis, retained: int) -> None:
    sim = Simulation(random.Random(11))
    items = list(sim.start())
    while len(items) < retained:
        items += sim.step()
    with client.pipeline(transaction=False) as pipe:
        for n, (event, data, rooms) in enumerate(items[:retained]):
            data = {**data, "pad": PAD[: max(0, 450 - len(json.dumps(data)) - 60)]}
            pipe.xadd(STREAM, entry_fields(Envelope(event=event, data=data, rooms=rooms)))  # type: ignore[arg-type]
            if n % 1000 == 999:
                pipe.execute()
        pipe.execute()


async def live_client(ws_url: str, redis_url: str, seconds: float,
                      loaded: Any) -> dict[bool, list[float]]:
    """Delays (ms) of public ticks XADDed at a fixed rate, seen by one WebSocket client,
    split by whether the overview load was on when each tick was sent."""
    delays: dict[bool, list[float]] = {False: [], True: []}
    producer = redis.asyncio.Redis.from_url(redis_url)
    async with websockets.connect(f"{ws_url}/api/ws", max_size=2**24) as conn:
        welcome = json.loads(await asyncio.wait_for(conn.recv(), 10))
        assert welcome["type"] == "welcome", welcome

        async def receive() -> None:
            async for raw in conn:
                frame = json.loads(raw)
                now = time.time()
                for item in frame["events"] if frame.get("type") == "batch" else [frame]:
                    if item.get("type") == "event" and item.get("event") == "tick":
                        data = item["data"]
                        delays[data["loaded"]].append((now - data["sent"]) * 1000)

        reader = asyncio.create_task(receive())
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        while loop.time() - start < seconds:
            n += 1
            body = {"event": "tick", "data": {"sent": time.time(), "n": n,
                                              "loaded": loaded.is_set(), "pad": PAD}}
            await producer.xadd(STREAM, {"data": json.dumps(body)})
            await asyncio.sleep(max(0.0, start + n / TICKS_PER_SECOND - loop.time()))
        await asyncio.sleep(1.0)  # the last ticks in flight
        reader.cancel()
    await producer.aclose()
    return delays


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """One keep-alive `GET /api/overview` on a raw connection; its status. (httpx costs
    ~1 ms of CPU per call: on two shared cores the caller, not the server, set the rate.)"""
    writer.write(b"GET /api/overview HTTP/1.1\r\nHost: bench\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


def overview_caller(url: str, rate: float, seconds: float, loaded: Any, out: Any) -> None:
    """Another process: while `loaded` is set, `rate` anonymous overview calls a second,
    paced, on 16 keep-alive connections; a call due while all 16 are busy is skipped and
    counted as status 0 (an error as -1): the rate served while loaded is reported."""
    host, port = url.removeprefix("http://").split(":")

    async def run() -> dict[str, Any]:
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        for _ in range(16):
            pool.put_nowait(await asyncio.open_connection(host, int(port)))
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def one() -> None:
            if pool.empty():  # all 16 busy: the server is behind; no backlog piles up
                statuses[0] = statuses.get(0, 0) + 1
                return
            conn = pool.get_nowait()
            t0 = loop.time()
            try:
                status = await asyncio.wait_for(_get(*conn), 30)
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                conn[1].close()
                statuses[-1] = statuses.get(-1, 0) + 1
                pool.put_nowait(await asyncio.open_connection(host, int(port)))
                return
            latencies.append((loop.time() - t0) * 1000)
            statuses[status] = statuses.get(status, 0) + 1
            pool.put_nowait(conn)

        tasks: list[asyncio.Task[None]] = []
        on_for = 0.0
        while loop.time() - start < seconds:
            if not loaded.is_set():
                await asyncio.sleep(0.005)
                continue
            began, n = loop.time(), 0
            while loaded.is_set() and loop.time() - start < seconds:
                n += 1
                tasks.append(asyncio.create_task(one()))
                await asyncio.sleep(max(0.0, began + n / rate - loop.time()))
            on_for += loop.time() - began
        await asyncio.gather(*tasks)
        elapsed = max(on_for, 1e-9)
        while not pool.empty():
            pool.get_nowait()[1].close()
        return {"calls": len(latencies), "per_second": len(latencies) / elapsed,
                "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99), "statuses": statuses}

    out.put(asyncio.run(run()))


def ok_answer(url: str) -> bytes | None:
    response = httpx.get(url, timeout=60)
    return response.content if response.status_code == 200 else None


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def summary(delays: list[float]) -> dict[str, float]:
    return {"events": len(delays), "p50_ms": round(pct(delays, 50), 2),
            "p95_ms": round(pct(delays, 95), 2), "p99_ms": round(pct(delays, 99), 2),
            "max_ms": round(max(delays, default=0), 2),
            "mean_ms": round(statistics.fmean(delays), 2) if delays else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="overview calls per second")
    parser.add_argument("--seconds", type=float, default=40.0,
                        help="length of the run, half of it loaded (<= 50)")
    parser.add_argument("--window", type=float, default=2.5,
                        help="seconds per quiet or loaded window (they alternate)")
    parser.add_argument("--retained", type=int, default=10_000, help="entries in the stream")
    parser.add_argument("--root", type=Path, help="serve this checkout's server/ (A/B)")
    args = parser.parse_args()
    seconds = min(args.seconds, 50.0)  # the whole run stays within a minute
    with tempfile.TemporaryDirectory(prefix="overview-load-") as tmp:
        work = Path(tmp)
        store = RedisProcess(work / "redis").start()
        server: DualcastProcess | None = None
        try:
            client = redis.Redis.from_url(store.url)
            prefill(client, args.retained)
            server = DualcastProcess(work / "dc", redis_url=store.url, root=args.root,
                                     env={"DUALCAST_SECRET": "b" * 40,
                                          "DUALCAST_LOG_LEVEL": "warning"})
            server.start()
            url = server.url
            first = wait_until(lambda: ok_answer(url + "/api/overview"), timeout=120,
                               what="the first overview answer")
            print(f"server {args.root or 'this checkout'}; {args.retained} retained entries; "
                  f"anonymous overview {len(first)} bytes; {args.rate:g} calls/s in "
                  f"alternate {args.window:g} s windows over {seconds:g} s")
            assert server.proc is not None
            cpu = psutil.Process(server.proc.pid)
            loaded = multiprocessing.Event()
            results: multiprocessing.Queue[dict[str, Any]] = multiprocessing.Queue()
            caller = multiprocessing.Process(target=overview_caller,
                                             args=(url, args.rate, seconds + 1, loaded, results))
            caller.start()

            async def run() -> dict[bool, list[float]]:
                async def toggle() -> None:
                    # quiet and loaded windows alternate, so both meet the same
                    # background (this machine is shared: its noise is not ours)
                    while True:
                        await asyncio.sleep(args.window)
                        if loaded.is_set():
                            loaded.clear()
                        else:
                            loaded.set()

                switch = asyncio.create_task(toggle())
                try:
                    return await live_client(server.ws_url, store.url, seconds, loaded)
                finally:
                    switch.cancel()
                    loaded.clear()

            before = cpu_seconds(cpu)
            delays = asyncio.run(run())
            used = cpu_seconds(cpu) - before
            calls = results.get(timeout=120)
            caller.join(30)
            quiet, busy = summary(delays[False]), summary(delays[True])
            per_call = used / max(calls["calls"], 1) * 1e6
            print("quiet windows:       ", quiet)
            print(f"{args.rate:g} overview/s windows:", busy)
            print("overview calls:      ", {k: (round(v, 2) if isinstance(v, float) else v)
                                            for k, v in calls.items()})
            print(f"server CPU {used:.2f} s in all (at most ~{per_call:.0f} us per call, "
                  f"the live traffic included)")
            ratio = busy["p99_ms"] / quiet["p99_ms"] if quiet["p99_ms"] else float("inf")
            ok = ratio <= 2.0 and calls["per_second"] >= 0.9 * args.rate
            print(f"p99 loaded / p99 quiet = {ratio:.2f} (goal <= 2.0, with >= 90% of "
                  f"the calls served): {'PASS' if ok else 'FAIL'}")
            client.close()
            return 0 if ok else 1
        finally:
            if server is not None:
                server.stop()
            store.stop()


if __name__ == "__main__":
    raise SystemExit(main())
