"""`python -m bench <mode>`: dualcast side by side with python-socketio and broadcaster.

Modes: saturation, matrix, idle, routing, poll, workers, fleet, all (each in turn), report.
Results go to bench/results/<mode>-<UTC stamp>.jsonl (+ .md); `--docs` rewrites
docs/performance.md from the newest file of each mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from bench import modes, report
from tests.harness.procs import ROOT, Child, raise_nofile

DOCS = ROOT / "docs" / "performance.md"
INTRO = (
    "Measured with `python -m bench` (see `bench/`): every server starts fresh as one "
    "uvicorn process (log level warning) with its own redis-server; a load generator of "
    "several processes with lean raw-socket clients subscribes, then events carrying a "
    "send timestamp and a sequence number are published at a fixed rate through each "
    "server's own publish path (dualcast: raw `XADD`; python-socketio: "
    "`AsyncRedisManager(write_only=True).emit`; broadcaster: `Broadcast.publish`). "
    "Latency is publish-to-receipt on the same machine. Server, generator and Redis all "
    "share the machine's cores, so the figures are comparable only within one run; "
    "peers are measured side by side with dualcast, and the figures are medians."
)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def targets(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="load-generator processes")
    p.add_argument("--docs", action="store_true", help="rewrite docs/performance.md after")
    sub = p.add_subparsers(dest="mode", required=True)

    s = sub.add_parser("saturation", help="raise the rate at 1,000 clients until it fails")
    s.add_argument("--targets", type=targets, default=modes.DEFAULT_TARGETS)
    s.add_argument("--clients", type=int, default=1000)
    s.add_argument("--start-rate", type=float, default=10.0)
    s.add_argument("--factor", type=float, default=1.5)
    s.add_argument("--max-steps", type=int, default=12)
    s.add_argument("--duration", type=float, default=5.0)
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--refine", type=int, default=1, help="bisection steps after the ladder")

    m = sub.add_parser("matrix", help="clients x rate, a fresh server per cell")
    m.add_argument("--targets", type=targets, default=modes.DEFAULT_TARGETS)
    m.add_argument("--clients", type=ints, default=[100, 1000])
    m.add_argument("--rates", type=floats, default=[100.0, 1000.0])
    m.add_argument("--duration", type=float, default=5.0)
    m.add_argument("--repeat", type=int, default=1)

    i = sub.add_parser("idle", help="RSS per idle connection and heartbeat CPU")
    i.add_argument("--targets", type=targets, default=modes.DEFAULT_TARGETS)
    i.add_argument("--connections", type=int, default=10_000)
    i.add_argument("--window", type=float, default=32.0, help="seconds of idle CPU measured")

    r = sub.add_parser("routing", help="one room's events among many subscribers")
    r.add_argument("--subscribers", type=ints, default=[100, 10_000])
    r.add_argument("--rooms", type=ints, default=[10, 1000])
    r.add_argument("--rate", type=float, default=200.0)
    # Longer than the 15 s heartbeat, so the idle window and the measured one each hold
    # one round of pings to every subscriber (the idle one is subtracted).
    r.add_argument("--duration", type=float, default=16.0)

    q = sub.add_parser("poll", help="long-pollers at a fixed rate")
    q.add_argument("--clients", type=int, default=1000)
    q.add_argument("--rate", type=float, default=20.0)
    q.add_argument("--duration", type=float, default=10.0)
    q.add_argument("--repeat", type=int, default=1)
    q.add_argument("--server-workers", type=ints, default=[1],
                   help="dualcast worker processes, one cell per count (1,2: both)")

    k = sub.add_parser("workers", help="server CPU per delivery, --workers 1 against N")
    k.add_argument("--target", default="dualcast-ws")
    k.add_argument("--clients", type=ints, default=[1, 100, 1000])
    k.add_argument("--rate", type=float, default=100.0)
    k.add_argument("--duration", type=float, default=10.0)
    k.add_argument("--repeat", type=int, default=3)
    k.add_argument("--counts", type=ints, default=[1, 2], help="server worker counts")

    f = sub.add_parser("fleet", help="100,000 subscribers on serve --workers N; peers' ceilings")
    f.add_argument("--targets", type=targets, default=["dualcast"],
                   help="dualcast, socketio, broadcaster")
    f.add_argument("--clients", type=ints, default=[100_000],
                   help="rising counts, a fresh server each; a target stops at its first failure")
    f.add_argument("--server-workers", type=int, default=6)
    f.add_argument("--events", type=int, default=3, help="public events, one per --interval")
    f.add_argument("--interval", type=float, default=10.0)
    f.add_argument("--room-events", type=int, default=3, help="events to user-7 (dualcast)")
    f.add_argument("--room-subscribers", type=int, default=1000)
    f.add_argument("--idle-window", type=float, default=30.0, help="seconds of heartbeat CPU")
    f.add_argument("--drain", type=float, default=15.0, help="seconds to wait for stragglers")
    f.add_argument("--concurrency", type=int, default=100, help="connects in flight per process")
    f.add_argument("--transports", type=lambda v: v.split(","), default=None,
                   help="only these transports, e.g. ws or sse (default: all of the target's)")

    a = sub.add_parser("all", help="every mode with its defaults (about an hour)")
    a.add_argument("--quick", action="store_true", help="fewer repeats, smaller counts")

    sub.add_parser("report", help="print the tables of the newest results of each mode")
    return p


def runs(args: argparse.Namespace) -> list[tuple[str, Callable[[], AsyncIterator[dict[str, Any]]]]]:
    w = args.workers
    if args.mode == "saturation":
        return [("saturation", lambda: modes.saturation(
            args.targets, args.clients, args.start_rate, args.factor, args.max_steps,
            args.duration, args.repeat, args.refine, w))]
    if args.mode == "matrix":
        return [("matrix", lambda: modes.matrix(
            args.targets, args.clients, args.rates, args.duration, args.repeat, w))]
    if args.mode == "idle":
        return [("idle", lambda: modes.idle(args.targets, args.connections, args.window,
                                            max(w, 4)))]
    if args.mode == "routing":
        return [("routing", lambda: modes.routing(args.subscribers, args.rooms, args.rate,
                                                  args.duration, max(w, 4)))]
    if args.mode == "poll":
        return [("poll", lambda: modes.poll(args.clients, args.rate, args.duration,
                                            args.repeat, w, args.server_workers))]
    if args.mode == "workers":
        return [("workers", lambda: modes.workers_cost(
            args.target, args.clients, args.rate, args.duration, args.repeat, args.counts, w))]
    if args.mode == "fleet":
        from bench.fleet import fleet

        return [("fleet", lambda: fleet(
            args.targets, args.clients, args.server_workers, max(w, 6), args.events,
            args.interval, args.room_events, args.room_subscribers, args.idle_window,
            args.drain, args.concurrency, args.transports))]
    if args.mode == "all":
        rep = 1 if args.quick else 3
        idle_n = 2000 if args.quick else 10_000
        t = modes.DEFAULT_TARGETS
        return [
            ("saturation", lambda: modes.saturation(t, 1000, 10.0, 1.5, 12, 5.0, rep, 1, w)),
            ("matrix", lambda: modes.matrix(t, [100, 1000], [100.0, 1000.0], 5.0, 1, w)),
            ("idle", lambda: modes.idle(t, idle_n, 32.0, max(w, 4))),
            ("routing", lambda: modes.routing([100, 10_000], [10, 1000], 200.0, 16.0, max(w, 4))),
            ("poll", lambda: modes.poll(1000, 20.0, 10.0, 1, w)),
        ]
    raise SystemExit(f"unknown mode {args.mode}")


def brief(r: dict[str, Any]) -> str:
    keys = ["mode", "target", "clients", "rate", "deliveries_per_s", "p50_ms", "p99_ms",
            "lost", "closed", "passed", "saturation_deliveries_per_s", "rss_per_conn_kb",
            "idle_server_cpu_pct", "dispatch_us_per_event", "server_cpu_pct",
            "generator_cpu_pct", "connected", "connect_per_s", "max_per_worker", "rss_mb",
            "heartbeat_pct_per_50k", "public_p50_ms", "public_p99_ms", "public_lost",
            "room_p99_ms", "room_misrouted"]
    return " ".join(f"{k}={r[k]}" for k in keys if k in r and r[k] is not None)


async def run(args: argparse.Namespace) -> None:
    report.RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    machine = report.machine()
    for mode, make in runs(args):
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        out = report.RESULTS / f"{mode}-{modes.stamp()}.jsonl"
        records: list[dict[str, Any]] = []
        with out.open("w") as f:
            async for r in make():
                r.update(command=command, started=started, machine=machine)
                records.append(r)
                f.write(json.dumps(r) + "\n")
                f.flush()
                print(brief(r), file=sys.stderr, flush=True)
        if mode == "fleet":
            from bench.fleet import table

            md = table(records)
        else:
            md = report.markdown(records)
        out.with_suffix(".md").write_text(md + "\n")
        print(md + "\n", flush=True)


def main() -> None:
    args = parser().parse_args()
    raise_nofile()
    if args.mode == "report":
        for mode, path in report.latest_files().items():
            print(f"<!-- {mode}: {path.name} -->")
            print(report.markdown(report.load(path)) + "\n")
    else:
        # SIGTERM ends the run like Ctrl-C; either way every child we started is stopped.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            try:
                import uvloop
            except ImportError:
                asyncio.run(run(args))
            else:
                uvloop.run(run(args))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        finally:
            Child.stop_all()
    if args.docs:
        print(f"wrote {report.write_docs(DOCS, INTRO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
