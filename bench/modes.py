"""The benchmark's modes: fixed matrix, saturation search, idle connections, routing, poll.

Every mode is bounded in time and count (durations, step limits, drain timeouts),
starts each server fresh, and yields one JSON-able record per measurement.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from bench.clients import client_path
from bench.runner import Session, mint

PEERS = ["socketio-ws", "broadcaster-ws", "broadcaster-sse"]
DUALCAST = ["dualcast-ws", "dualcast-sse"]
DEFAULT_TARGETS = DUALCAST + PEERS
P99_LIMIT_MS = 250.0
#: Every bench client is anonymous and comes from 127.0.0.1, which dualcast caps at
#: 200 streams by default (`DUALCAST_MAX_CONNECTIONS_PER_ADDRESS`): off where a mode
#: opens more than that (peers ignore the variable).
UNCAPPED = {"DUALCAST_MAX_CONNECTIONS_PER_ADDRESS": "0",
            "DUALCAST_MAX_CONNECTIONS_PER_SUBJECT": "0"}


def public_paths(kind: str, n: int) -> list[str]:
    return [client_path(kind)] * n


def good(r: dict[str, Any], limit_ms: float = P99_LIMIT_MS) -> bool:
    """A step passes with zero loss, no cut-offs, p99 within the limit, the rate achieved."""
    return bool(
        r["lost"] == 0 and r["closed"] == 0 and r["deliveries"] > 0
        and r["p99_ms"] <= limit_ms and r["achieved_rate"] >= 0.95 * r["rate"]
    )


async def matrix(targets: list[str], clients: list[int], rates: list[float], duration: float,
                 repeat: int, workers: int) -> AsyncIterator[dict[str, Any]]:
    """Each cell on a fresh server; targets interleaved so they share the machine's mood."""
    for rep in range(repeat):
        for n in clients:
            for rate in rates:
                for kind in targets:
                    async with Session(kind, public_paths(kind, n), workers=workers,
                                       env=UNCAPPED) as s:
                        warm = await s.warm_up()
                        await s.quiet()
                        r = await s.step(rate, duration, drain=max(5.0, duration))
                    yield {"mode": "matrix", "repeat": rep, "warm": warm, **r}


async def _saturation_run(kind: str, n: int, rates: list[float], duration: float,
                          workers: int) -> AsyncIterator[dict[str, Any]]:
    async with Session(kind, public_paths(kind, n), workers=workers, env=UNCAPPED) as s:
        warm = await s.warm_up()
        for rate in rates:
            for attempt in (1, 2):
                other = await s.quiet()
                r = await s.step(rate, duration, drain=max(5.0, duration))
                r.update(mode="saturation-step", warm=warm, passed=good(r), attempt=attempt,
                         other_cpu_before=round(100 * other, 1))
                yield r
                # A latency-only failure is tried once more: on a shared machine one
                # step can be unlucky. Loss or cut-offs end the search at once.
                if r["passed"] or r["lost"] or r["closed"]:
                    break
                await asyncio.sleep(2.0)
            if not r["passed"]:
                return


async def saturation(targets: list[str], clients: int, start_rate: float, factor: float,
                     max_steps: int, duration: float, repeat: int, refine: int,
                     workers: int) -> AsyncIterator[dict[str, Any]]:
    """Raise the rate geometrically on one set of connections until a step fails, then
    bisect (fresh server each time) `refine` times between the last good and first bad."""
    ladder = [round(start_rate * factor**i, 1) for i in range(max_steps)]
    for rep in range(repeat):
        for kind in targets:
            best: dict[str, Any] | None = None
            bad_rate: float | None = None
            last: dict[str, Any] | None = None
            async for r in _saturation_run(kind, clients, ladder, duration, workers):
                r["repeat"] = rep
                yield r
                last = r
                if r["passed"]:
                    best = r
            # The run stops at the first rate that failed (after its retry), if any.
            bad_rate = last["rate"] if last is not None and not last["passed"] else None
            # A target that fails the first rung: step down (fresh server each time), so
            # a slow peer gets its figure instead of 0.
            down = start_rate
            while best is None and bad_rate is not None and down / factor >= 0.5:
                down = round(down / factor, 2)
                async for r in _saturation_run(kind, clients, [down], duration, workers):
                    r["repeat"] = rep
                    yield r
                    if r["passed"]:
                        best = r
                if best is None:
                    bad_rate = down
            for _ in range(refine):
                if best is None or bad_rate is None:
                    break
                mid = round(math.sqrt(best["rate"] * bad_rate), 1)
                if mid <= best["rate"] * 1.03 or mid >= bad_rate * 0.97:
                    break
                passed = False
                async for r in _saturation_run(kind, clients, [mid], duration, workers):
                    r["repeat"] = rep
                    yield r
                    if r["passed"]:
                        best, passed = r, True
                if not passed:
                    bad_rate = mid
            yield {
                "mode": "saturation", "target": kind, "repeat": rep, "clients": clients,
                "saturation_deliveries_per_s": best["deliveries_per_s"] if best else 0,
                "rate": best["rate"] if best else None,
                "p99_ms": best["p99_ms"] if best else None,
                "server_us_per_delivery": best["server_us_per_delivery"] if best else None,
                "generator_cpu_pct": best["generator_cpu_pct"] if best else None,
                "first_failing_rate": bad_rate,
                "reached_top_of_ladder": bad_rate is None,
            }


async def idle(targets: list[str], connections: int, window: float,
               workers: int) -> AsyncIterator[dict[str, Any]]:
    """RSS per idle connection, and the server's CPU while only heartbeats flow."""
    for kind in targets:
        async with Session(kind, public_paths(kind, connections), workers=workers,
                           concurrency=100, env=UNCAPPED) as s:
            before = s.cpu_snapshot()
            await asyncio.sleep(window)
            after = s.cpu_snapshot()
            states = await s.status()
            wall = after["wall"] - before["wall"]
            yield {
                "mode": "idle", "target": kind, "connections": connections, **s.info,
                "window_s": round(wall, 1),
                "idle_server_cpu_pct": round(100 * (after["server"] - before["server"]) / wall, 2),
                "idle_generator_cpu_pct": round(
                    100 * (after["generator"] - before["generator"]) / wall, 2),
                "alive_at_end": sum(st["alive"] for st in states),
                "rss_end": s.stack.server_rss(),
            }


async def workers_cost(kind: str, clients: list[int], rate: float, duration: float,
                       repeat: int, counts: list[int],
                       generators: int) -> AsyncIterator[dict[str, Any]]:
    """The same load on `dualcast serve --workers 1` and `--workers N`, interleaved.

    Every worker that serves reads and decodes the whole stream, whatever its
    subscribers need; a cell with one client shows that per-event cost on its own
    (nearly all of the server's CPU there is reading the stream), the others what it
    adds per delivery. The server's CPU is summed over the supervisor and its workers;
    `clients_per_worker` says which of them held the clients (spares asleep hold none:
    BENCH_SERVER_ENV=DUALCAST_WORKERS_WAKE=start measures every worker serving).
    """
    for rep in range(repeat):
        for n in clients:
            for count in counts:
                env = {**UNCAPPED, "DUALCAST_WORKERS": str(count)}
                async with Session(kind, public_paths(kind, n), workers=generators,
                                   env=env) as s:
                    warm = await s.warm_up()
                    await s.quiet()
                    cpu0 = s.stack.cpu_by_process()
                    r = await s.step(rate, duration, drain=max(5.0, duration))
                    cpu1 = s.stack.cpu_by_process()
                    held = s.stack.clients_per_process()
                # each process's CPU per event sent (the supervisor's among them), most first
                each = sorted((1e6 * (cpu1[pid] - cpu0.get(pid, 0.0)) / max(1, r["sent"])
                               for pid in cpu1), reverse=True)
                yield {"mode": "workers", "server_workers": count, "repeat": rep,
                       "warm": warm, "clients_per_worker": held,
                       "us_per_event_by_process": [round(us) for us in each], **r}


async def routing(subscribers: list[int], rooms: list[int], rate: float, duration: float,
                  workers: int, kind: str = "dualcast-ws") -> AsyncIterator[dict[str, Any]]:
    """Events for one user room among many: the hub should touch that room only.

    Subscriber i has a token with sub `i % rooms` and joins `user-<sub>`; events go to
    `user-7`. Dispatch cost = server CPU while publishing minus an idle window of the
    same length, per event.
    """
    room = "user-7"
    for n, n_rooms in zip(subscribers, rooms, strict=True):
        subs = [str(i % n_rooms) for i in range(n)]
        tokens = {sub: mint(sub) for sub in set(subs)}
        paths = [client_path(kind, tokens[sub], f"user-{sub}") for sub in subs]
        n_workers = max(1, min(workers, n))
        receivers = [
            [j for j, gi in enumerate(range(w, n, n_workers)) if subs[gi] == "7"]
            for w in range(n_workers)
        ]
        expected_receivers = sum(len(r) for r in receivers)
        async with Session(kind, paths, workers=n_workers, concurrency=100) as s:
            warm = await s.warm_up(rooms=[room], need=expected_receivers)
            before = s.cpu_snapshot()
            await asyncio.sleep(duration)
            after = s.cpu_snapshot()
            idle_cpu = after["server"] - before["server"]
            idle_wall = after["wall"] - before["wall"]
            r = await s.step(rate, duration, drain=5.0, rooms=[room], receivers=receivers)
        busy_per_s = r["server_cpu_s"] / r["window_s"]
        idle_per_s = idle_cpu / idle_wall
        dispatch_us = 1e6 * (busy_per_s - idle_per_s) * r["window_s"] / r["sent"]
        yield {
            "mode": "routing", "rooms": n_rooms, "receivers": expected_receivers, "warm": warm,
            **r, "idle_server_cpu_pct": round(100 * idle_per_s, 2),
            "dispatch_us_per_event": round(dispatch_us, 1),
            "server_us_per_event": round(1e6 * r["server_cpu_s"] / r["sent"], 1),
        }


async def poll(clients: int, rate: float, duration: float, repeat: int, workers: int,
               server_workers: list[int] | None = None) -> AsyncIterator[dict[str, Any]]:
    """Long-pollers that must each get every event; with several `server_workers`
    counts, the cells of one repeat run back to back so they share the machine's mood."""
    for rep in range(repeat):
        for count in server_workers or [1]:
            kind = "dualcast-poll"
            env = {**UNCAPPED, "DUALCAST_WORKERS": str(count)}
            async with Session(kind, public_paths(kind, clients), workers=workers,
                               env=env) as s:
                warm = await s.warm_up()
                await s.quiet()
                r = await s.step(rate, duration, drain=10.0)
            yield {"mode": "poll", "repeat": rep, "server_workers": count, "warm": warm, **r}


def stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
