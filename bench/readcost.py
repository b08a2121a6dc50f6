"""What one worker pays to read the stream alone: no subscriber, events published at a
fixed rate, the server's CPU from /proc.

`python -m bench.readcost [--targets dualcast,before] [--workers 1] [--rate 100]
[--duration 15] [--repeat 3]`: a fresh server (and redis-server) per run, the targets
interleaved; a target other than `dualcast` is a BENCH_TREES label (another checkout,
for a before/after). With nobody subscribed, nearly all of the server's CPU is the
consumer's: one XREAD round trip per event at low rates, the decode and the overview.
Prints one JSON line per run and the medians of µs of server CPU per event per worker.
"""

from __future__ import annotations

import argparse
import time

import orjson
import redis

from bench.procs import Stack
from bench.report import interleaved


def publish(url: str, rate: float, duration: float) -> int:
    """XADD `rate` events a second for `duration` seconds, paced on the clock."""
    client = redis.Redis.from_url(url)
    sent = 0
    start = time.monotonic()
    try:
        while (due := start + sent / rate) < start + duration:
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            now = time.time()
            envelope = {"event": "bench", "data": {"seq": sent, "t": now}}
            client.xadd("websocket-broadcast",
                        {"data": orjson.dumps(envelope), "timestamp": int(now * 1000)},
                        maxlen=10_000, approximate=True)
            sent += 1
    finally:
        client.close()
    return sent


def one_run(target: str, workers: int, rate: float, duration: float) -> dict[str, object]:
    stack = Stack(target, env={"DUALCAST_WORKERS": str(workers)}).start()
    try:
        time.sleep(2.0)  # past start-up (imports, the first fold)
        before = stack.server_cpu()
        sent = publish(stack.redis_url, rate, duration)
        time.sleep(0.5)  # the last reads
        cpu = stack.server_cpu() - before
        version = stack.version()
    finally:
        stack.stop()
    return {"target": target, "version": version, "workers": workers, "rate": rate,
            "sent": sent, "server_cpu_s": round(cpu, 3),
            "us_per_event_per_worker": round(1e6 * cpu / sent / workers, 1)}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.readcost", description=__doc__)
    p.add_argument("--targets", default="dualcast")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    interleaved(targets, args.repeat,
                lambda target: one_run(target, args.workers, args.rate, args.duration),
                "us_per_event_per_worker", "us/event/worker")

if __name__ == "__main__":
    main()
