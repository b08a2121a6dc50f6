"""What an idle connection holds, by traceback: tracemalloc on a real server.

    python -m bench.memtrace --kind dualcast-ws --connections 2000 [--top 40]

Starts a redis-server and `dualcast serve` (one process, per-address cap off) with
this module as its entry point, which runs the server unchanged but answers SIGUSR1:
the first one starts tracemalloc (after start-up, whose imports would take minutes
under tracing), the second dumps a snapshot. In between, the bench's load-generator
processes open the idle connections. The report groups the traced blocks by the
innermost frame in dualcast, uvicorn, websockets or starlette (the frame that asked
for the memory, not the asyncio internals below it) and prints bytes per connection,
with the innermost frames that did the allocating. Traced bytes are not RSS (the
allocator's slack and C libraries' own memory are missing): `python -m bench idle`
gives the RSS figure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import FrameType

from bench.clients import client_path
from bench.procs import SECRET
from bench.runner import WorkerProc
from tests.harness.procs import DualcastProcess, RedisProcess, raise_nofile

OWN = ("server/", "dualcast/", "uvicorn/", "websockets/", "starlette/")


def serve_traced() -> None:
    """The server side: `dualcast serve`, with SIGUSR1 to start tracing and to dump."""
    out = os.environ["MEMTRACE_OUT"]
    dumps = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal dumps
        gc.collect()
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(f"{out}.snapshot")
        else:
            tracemalloc.start(40)
        dumps += 1
        Path(f"{out}.{dumps}").touch()

    signal.signal(signal.SIGUSR1, on_signal)
    from dualcast.cli import main

    raise SystemExit(main())


def short(filename: str) -> str:
    for marker in ("site-packages/", "python3.11/", "/work/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def report(snapshot: tracemalloc.Snapshot, n: int, top: int) -> str:
    size: collections.Counter[str] = collections.Counter()
    blocks: collections.Counter[str] = collections.Counter()
    inner: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for stat in snapshot.statistics("traceback"):
        frames = list(stat.traceback)
        own = next((f"{short(f.filename)}:{f.lineno}" for f in reversed(frames)
                    if short(f.filename).startswith(OWN)), None)
        innermost = f"{short(frames[-1].filename)}:{frames[-1].lineno}"
        key = own or innermost
        size[key] += stat.size
        blocks[key] += stat.count
        inner[key][innermost] += stat.size
    lines = [f"traced {sum(size.values()) / n:,.0f} bytes per connection ({n:,} connections)",
             f"{'bytes':>8} {'blocks':>6}  asked for by  [allocated in]"]
    for key, total in size.most_common(top):
        detail = ", ".join(f"{k} {v / n:.0f}" for k, v in inner[key].most_common(3))
        lines.append(f"{total / n:8.0f} {blocks[key] / n:6.2f}  {key}  [{detail}]")
    return "\n".join(lines)


async def measure(kind: str, n: int, generators: int, top: int) -> None:
    raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="memtrace-"))
    out = work / "trace"
    redis = RedisProcess(work / "redis", args=["--maxclients", "20000"]).start()
    env = {"DUALCAST_LOG_LEVEL": "warning", "DUALCAST_SECRET": SECRET, "MEMTRACE_OUT": str(out),
           "DUALCAST_MAX_CONNECTIONS_PER_ADDRESS": "0"}
    server = DualcastProcess(work / "dualcast", redis.url, env=env, entry=["-m", "bench.memtrace"])
    workers: list[WorkerProc] = []
    try:
        server.start()

        def signal_and_wait(count: int) -> None:
            os.kill(server.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 600
            while not Path(f"{out}.{count}").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("the traced server did not answer SIGUSR1")
                time.sleep(0.2)

        signal_and_wait(1)
        paths = [client_path(kind)] * n
        workers = [await WorkerProc.start({
            "kind": kind, "host": "127.0.0.1", "port": server.port, "paths": paths[i::generators],
            "concurrency": 100, "connect_timeout": 60, "wait": 20,
        }) for i in range(generators)]
        answers = await asyncio.gather(*(w.recv(60 + n / 10) for w in workers))
        connected = sum(a["ok"] for a in answers)
        await asyncio.sleep(1.0)
        signal_and_wait(2)
        print(f"{kind}: {connected:,} connected")
        print(report(tracemalloc.Snapshot.load(f"{out}.snapshot"), connected, top))
    finally:
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        server.stop(10)
        redis.stop()


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        serve_traced()
        return
    p = argparse.ArgumentParser(prog="python -m bench.memtrace", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="dualcast-ws", choices=["dualcast-ws", "dualcast-sse"])
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--generators", type=int, default=4, help="load-generator processes")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    asyncio.run(measure(args.kind, args.connections, args.generators, args.top))


if __name__ == "__main__":
    main()
