"""Fleet: 100,000 subscribers on `dualcast serve --workers N` (issue 20 item 2), and where
python-socketio and broadcaster stop in the same harness.

One run is one server (dualcast on the Redis engine with N workers, or a peer under
uvicorn with N workers) and its own redis-server, fresh. A fleet of `python -m
bench.loadgen` processes connects the clients: each generator speaks one transport
(dualcast and broadcaster: half WebSocket, half SSE; python-socketio: WebSocket) and
binds its own loopback source addresses (127.0.k.2, 127.0.k.3, ...): one address has
only the ~28k ephemeral ports of `ip_local_port_range` towards one server port.
Every process here, server worker and generator alike, stays under the machine's
per-process open-file limit (20,000 hard), which is why N >= 6 for 100,000.

Measured, in order: the connect rate over the whole ramp (first connect started to
last one ready, across generators), the connections each server process holds
(socket descriptors in /proc/<pid>/fd above its count before the ramp), the server's
RSS (supervisor + workers), its CPU while only heartbeats flow (% of a core, and per
50,000 connections), then public events one every `interval` seconds reaching every
client (p50/p99/max publish-to-receipt, lost), then events for one user room
(`user-7`): only its subscribers may get them (misrouted = deliveries to anyone else).
A run passes with every client connected, nothing lost or misrouted, no client cut
off, p99 <= 2 s.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import psutil

from bench.clients import client_path
from bench.modes import UNCAPPED
from bench.procs import Stack
from bench.publishers import DualcastPublisher, Publisher, make_publisher, publish_at_rate
from bench.runner import WorkerProc, machine_busy, mint, percentile
from tests.harness.waits import wait_until

P99_LIMIT_MS = 2000.0
#: Per worker: 100 under the 20,000 open files a process may hold here (what
#: `dualcast serve` reserves for Redis, the listening socket and logs), so the start-up
#: check stays quiet and a worker that the kernel hands more refuses with a clean 503.
SERVER_CAP = 19_900
ROOM = "user-7"
#: Source addresses per generator: 100,000 clients over 6 generators are ~4,200 per
#: address, where connect()'s port search stays short (bench/loadgen.py).
SOURCES_PER_GENERATOR = 4
#: Subjects of the room subscribers: subscriber k is `k % SUBJECTS` in room user-<k % SUBJECTS>.
SUBJECTS = 100
KINDS = {
    "dualcast": ["dualcast-ws", "dualcast-sse"],
    "broadcaster": ["broadcaster-ws", "broadcaster-sse"],
    "socketio": ["socketio-ws"],
}


@dataclass
class Generator:
    """One load-generator process's share: its transport, source address and paths."""

    kind: str
    #: loopback addresses to bind, taken in turn (bench/loadgen.py's bound_connect)
    sources: list[str]
    paths: list[str] = field(default_factory=list)
    #: indices into `paths` of the clients in ROOM (the room event's only receivers)
    receivers: list[int] = field(default_factory=list)


def plan(target: str, clients: int, generators: int, room_subscribers: int,
         transports: list[str] | None = None) -> list[Generator]:
    """Clients spread evenly over `generators` processes, transports alternating (only
    those named in `transports`, e.g. ["ws"], when given), each on 127.0.k.<2+i> for
    k < SOURCES_PER_GENERATOR. dualcast's room subscribers (a token for subject s,
    joining `user-<s>`) are spread over the generators too; everyone else is anonymous."""
    kinds = [k for k in KINDS[target] if not transports or k.rpartition("-")[2] in transports]
    if not kinds:
        raise ValueError(f"{target} speaks none of {transports}")
    gens = [Generator(kinds[i % len(kinds)],
                      [f"127.0.{k}.{2 + i}" for k in range(SOURCES_PER_GENERATOR)])
            for i in range(generators)]
    tokens: dict[str, str] = {}
    for j in range(clients):
        gen = gens[j % generators]
        if target == "dualcast" and j < room_subscribers:
            sub = str(j % SUBJECTS)
            token = tokens.get(sub) or tokens.setdefault(sub, mint(sub))
            if f"user-{sub}" == ROOM:
                gen.receivers.append(len(gen.paths))
            gen.paths.append(client_path(gen.kind, token, f"user-{sub}"))
        else:
            gen.paths.append(client_path(gen.kind))
    return gens


def socket_fds(pid: int) -> int:
    """Open socket descriptors of one process (connections, listeners, Redis)."""
    count = 0
    folder = f"/proc/{pid}/fd"
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        try:
            if os.readlink(f"{folder}/{name}").startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


def server_pids(stack: Stack) -> tuple[int, list[int]]:
    """The supervisor and its worker processes (not multiprocessing's resource tracker);
    one process serving by itself (`--workers 1`) is its own worker."""
    assert stack.server is not None
    main = psutil.Process(stack.server.pid)
    workers = [c.pid for c in main.children()
               if "resource_tracker" not in " ".join(c.cmdline())]
    return main.pid, workers or [main.pid]


class Fleet:
    """One server, its Redis and the generator fleet; measured in `run`."""

    def __init__(self, target: str, clients: int, server_workers: int, generators: int,
                 room_subscribers: int, concurrency: int, retries: int = 5,
                 transports: list[str] | None = None) -> None:
        self.target = target
        #: a refused connect (503 past a worker's cap) is tried again, as clients do
        self.retries = retries
        self.clients = clients
        self.server_workers = server_workers
        self.gens = plan(target, clients, generators, room_subscribers, transports)
        self.concurrency = concurrency
        env: dict[str, str] = {}
        if target == "dualcast":
            env = {**UNCAPPED, "DUALCAST_WORKERS": str(server_workers),
                   "DUALCAST_MAX_CONNECTIONS": str(SERVER_CAP)}
        self.stack = Stack(target, env=env, peer_workers=server_workers)
        self.procs: list[WorkerProc] = []
        self.publishers: list[Publisher] = []
        self.record: dict[str, Any] = {"mode": "fleet", "target": target, "clients": clients,
                                       "transports": transports or "all",
                                       "server_workers": server_workers,
                                       "generators": generators}

    async def __aenter__(self) -> Fleet:
        await asyncio.to_thread(self.stack.start)
        self.record["served"] = self.stack.version()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for pub in self.publishers:
            try:
                await asyncio.wait_for(pub.close(), 5)
            except Exception:  # a broken publisher must not keep the server alive
                pass
        await asyncio.gather(*(w.stop() for w in self.procs), return_exceptions=True)
        await asyncio.to_thread(self.stack.stop)

    def wait_workers(self) -> list[int]:
        """Every worker started, and for dualcast the first connected to Redis (the
        spares sleep, reading nothing, until it is busy: the ramp wakes them)."""
        def ready() -> list[int]:
            _, workers = server_pids(self.stack)
            if len(workers) < self.server_workers:
                return []
            if self.target == "dualcast":
                port = self.stack.redis_port
                if not any(c.raddr and c.raddr.port == port
                           for pid in workers
                           for c in psutil.Process(pid).net_connections("tcp")):
                    return []
            return workers

        pids: list[int] = wait_until(ready, timeout=60, interval=0.2,
                                     what=f"{self.server_workers} {self.target} workers")
        return pids

    def cpu(self) -> dict[str, float]:
        gens = 0.0
        for w in self.procs:
            try:
                t = psutil.Process(w.pid).cpu_times()
                gens += t.user + t.system
            except psutil.Error:
                pass
        return {"server": self.stack.server_cpu(), "redis": self.stack.redis_cpu(),
                "generator": gens, "machine": machine_busy(), "wall": time.monotonic()}

    async def connect(self) -> None:
        await asyncio.to_thread(self.wait_workers)
        main_pid, workers = server_pids(self.stack)
        base = {pid: socket_fds(pid) for pid in {main_pid, *workers}}
        rss_before = self.stack.server_rss()
        port = self.stack.port
        cpu0 = self.cpu()
        for gen in self.gens:
            self.procs.append(await WorkerProc.start({
                "kind": gen.kind, "host": "127.0.0.1", "port": port, "paths": gen.paths,
                "source": gen.sources, "concurrency": self.concurrency,
                "connect_timeout": 60, "retries": self.retries,
            }))
        per_gen = max(len(g.paths) for g in self.gens)
        answers = await asyncio.gather(*(w.recv(120 + per_gen / 100) for w in self.procs))
        cpu1 = self.cpu()
        ramp = max(a["ended"] for a in answers) - min(a["started"] for a in answers)
        ok = sum(a["ok"] for a in answers)
        await asyncio.sleep(2.0)  # let the server settle before reading its RSS
        held = {pid: socket_fds(pid) - base.get(pid, 0) for pid in workers}
        rss = self.stack.server_rss()
        self.record.update({
            "connected": ok, "failed_connect": sum(a["failed"] for a in answers),
            "connect_attempts": sum(a["attempts"] for a in answers),
            "connect_errors": [e for a in answers for e in a["errors"]][:5],
            "connect_seconds": round(ramp, 2),
            "connect_per_s": round(ok / ramp) if ramp > 0 else None,
            "connect_server_cpu_s": round(cpu1["server"] - cpu0["server"], 1),
            "connect_generator_cpu_s": round(cpu1["generator"] - cpu0["generator"], 1),
            "connect_generator_user_s": round(sum(a.get("cpu_user", 0) for a in answers), 1),
            "connect_generator_system_s": round(sum(a.get("cpu_system", 0) for a in answers), 1),
            "per_worker": sorted(held.values(), reverse=True),
            "max_per_worker": max(held.values(), default=0),
            "rss_before_mb": round(rss_before / 2**20), "rss_mb": round(rss / 2**20),
            "rss_per_conn_kb": round((rss - rss_before) / ok / 1024, 1) if ok else None,
        })

    async def status(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(w.ask({"op": "status"}, 60) for w in self.procs)))

    async def warm_up(self, pub: Publisher, wait_s: float = 30) -> bool:
        """Warm-up events (seq < 0), one every 2 s, until every live client has one: each
        server's Redis subscription is in place before anything is measured."""
        deadline = time.monotonic() + wait_s
        seq = -1
        while time.monotonic() < deadline:
            await pub.publish(seq)
            seq -= 1
            for _ in range(4):
                await asyncio.sleep(0.5)
                states = await self.status()
                if sum(s["warm"] for s in states) >= sum(s["alive"] for s in states) > 0:
                    return True
        return False

    async def idle(self, window: float) -> None:
        """Server CPU while only heartbeats flow (pings every 15 s: a window of 30 s
        holds two rounds to every connection)."""
        before = self.cpu()
        await asyncio.sleep(window)
        after = self.cpu()
        wall = after["wall"] - before["wall"]
        pct = 100 * (after["server"] - before["server"]) / wall
        ours = sum(after[k] - before[k] for k in ("server", "redis", "generator"))
        n = self.record.get("connected") or 1
        self.record.update({
            "idle_window_s": round(wall, 1),
            "idle_server_cpu_pct": round(pct, 1),
            "heartbeat_pct_per_50k": round(pct * 50_000 / n, 1),
            "idle_generator_cpu_pct": round(
                100 * (after["generator"] - before["generator"]) / wall, 1),
            "idle_other_cpu_pct": round(100 * ((after["machine"] - before["machine"]) - ours)
                                        / wall, 1),
        })

    async def events(self, label: str, pub: Publisher, count: int, interval: float,
                     drain: float, receivers: bool = False) -> None:
        """`count` events one every `interval` s; what every generator's clients saw."""
        before = self.cpu()
        sent = await publish_at_rate(pub, 1 / interval, count * interval)
        answers = await asyncio.gather(*(
            w.ask({"op": "collect", "expect": sent["sent"], "timeout": drain,
                   "receivers": g.receivers if receivers else None}, drain + 60)
            for w, g in zip(self.procs, self.gens, strict=True)
        ))
        after = self.cpu()
        hist: dict[int, int] = {}
        for a in answers:
            for bucket, n in a["hist"].items():
                hist[int(bucket)] = hist.get(int(bucket), 0) + n
        deliveries = sum(a["deliveries"] for a in answers)
        self.record.update({
            f"{label}_sent": sent["sent"], f"{label}_deliveries": deliveries,
            f"{label}_p50_ms": percentile(hist, deliveries, 0.50),
            f"{label}_p99_ms": percentile(hist, deliveries, 0.99),
            f"{label}_max_ms": round(max((a["max_latency"] for a in answers), default=0)
                                     * 1000, 1),
            f"{label}_lost": sum(a["lost"] for a in answers),
            f"{label}_duplicated": sum(a["duplicated"] for a in answers),
            f"{label}_misrouted": sum(a["misrouted"] for a in answers),
            f"{label}_closed": sum(a["closed"] for a in answers),
            f"{label}_close_reasons": [r for a in answers for r in a["close_reasons"]][:3],
            f"{label}_server_cpu_pct": round(100 * (after["server"] - before["server"])
                                             / (after["wall"] - before["wall"]), 1),
        })
        if receivers:
            self.record[f"{label}_receivers"] = sum(len(g.receivers) for g in self.gens)

    async def run(self, events: int, interval: float, room_events: int, idle_window: float,
                  drain: float) -> dict[str, Any]:
        await self.connect()
        pub = make_publisher(KINDS[self.target][0], self.stack.redis_url)
        self.publishers.append(pub)
        await pub.start()
        self.record["warm"] = await self.warm_up(pub)
        await asyncio.sleep(1.0)  # the last warm-up event's stragglers
        await self.status()
        if idle_window > 0:
            await self.idle(idle_window)
        await self.events("public", pub, events, interval, drain)
        if self.target == "dualcast" and room_events and any(g.receivers for g in self.gens):
            room = DualcastPublisher(self.stack.redis_url, [ROOM])
            self.publishers.append(room)
            await self.events("room", room, room_events, 2.0, drain, receivers=True)
        self.record["rss_end_mb"] = round(self.stack.server_rss() / 2**20)
        self.record["passed"] = passed(self.record)
        return self.record


def passed(r: dict[str, Any]) -> bool:
    """Every client connected; nothing lost, misrouted or cut off; p99 within 2 s."""
    ok = (r.get("failed_connect", 1) == 0 and r.get("public_deliveries", 0) > 0
          and r["public_lost"] == 0 and r["public_closed"] == 0
          and r["public_p99_ms"] <= P99_LIMIT_MS)
    if "room_sent" in r:
        ok = ok and (r["room_lost"] == 0 and r["room_misrouted"] == 0
                     and r["room_p99_ms"] <= P99_LIMIT_MS)
    return bool(ok)


async def fleet(targets: list[str], counts: list[int], server_workers: int, generators: int,
                events: int, interval: float, room_events: int, room_subscribers: int,
                idle_window: float, drain: float, concurrency: int,
                transports: list[str] | None = None) -> AsyncIterator[dict[str, Any]]:
    """Each target at rising client counts (a fresh server each), until one fails."""
    for target in targets:
        if target not in KINDS:
            raise ValueError(f"unknown fleet target {target}; known: {', '.join(KINDS)}")
        for n in counts:
            async with Fleet(target, n, server_workers, generators, room_subscribers,
                             concurrency, transports=transports) as f:
                r = await f.run(events, interval, room_events, idle_window, drain)
            yield r
            if not r["passed"]:
                break


COLUMNS = [
    ("target", "target"), ("clients", "clients"), ("connected", "connected"),
    ("failed_connect", "failed"), ("connect_per_s", "connect/s"),
    ("max_per_worker", "most on 1 worker"), ("rss_mb", "server RSS MB"),
    ("rss_per_conn_kb", "KB/conn"), ("heartbeat_pct_per_50k", "heartbeat %/50k"),
    ("public_p50_ms", "p50 ms"), ("public_p99_ms", "p99 ms"), ("public_max_ms", "max ms"),
    ("public_lost", "lost"), ("room_p99_ms", "room p99 ms"), ("room_misrouted", "misrouted"),
    ("passed", "passed"),
]


def table(records: list[dict[str, Any]]) -> str:
    rows = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
            "|" + "---|" * len(COLUMNS)]
    for r in records:
        if r.get("mode") == "fleet":
            rows.append("| " + " | ".join(str(r.get(k, "")) for k, _ in COLUMNS) + " |")
    return "\n".join(rows)
