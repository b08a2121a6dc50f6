"""Orchestration: fresh server + redis, worker processes, publisher, measurements.

One `Session` is one server under test with its clients connected; `step` publishes
at one rate and gathers what every client saw. The modes in `bench.modes` compose
sessions and steps.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import psutil

from bench.clients import KINDS, base_kind, bucket_upper
from bench.procs import ROOT, SECRET, Stack, process_cpu, self_cpu
from bench.publishers import Publisher, make_publisher, publish_at_rate


def mint(sub: str, rooms: list[str] | None = None, admin: bool = False, ttl: int = 3600) -> str:
    """An HS256 token for dualcast (claims sub, rooms, admin, exp)."""
    claims = {"sub": sub, "rooms": rooms or [], "admin": admin, "exp": int(time.time()) + ttl}
    return jwt.encode(claims, SECRET, algorithm="HS256")


class WorkerProc:
    """A `python -m bench.loadgen` child and its JSON-lines pipe."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, spec: dict[str, Any]) -> WorkerProc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.loadgen", cwd=ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=1 << 26,
        )
        self = cls(proc)
        await self.send(spec)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        await self.proc.stdin.drain()

    async def recv(self, wait_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), wait_s)
        if not line:
            raise RuntimeError(f"load worker {self.pid} exited ({self.proc.returncode})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ask(self, obj: dict[str, Any], wait_s: float) -> dict[str, Any]:
        await self.send(obj)
        return await self.recv(wait_s)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            try:
                await self.send({"op": "exit"})
                await asyncio.wait_for(self.proc.wait(), 10)
            except (TimeoutError, ConnectionError, BrokenPipeError):
                self.proc.kill()
                await self.proc.wait()


def percentile(hist: dict[int, int], total: int, q: float) -> float:
    """Upper bound (ms) of the bucket holding the q-quantile of the merged histogram."""
    if total == 0:
        return float("nan")
    rank = q * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return round(bucket_upper(bucket) * 1000, 2)
    return round(bucket_upper(max(hist)) * 1000, 2)


class Session:
    """One fresh server (and its redis-server) with `paths` clients connected."""

    def __init__(self, kind: str, paths: list[str], workers: int = 2,
                 concurrency: int = 50, env: dict[str, str] | None = None,
                 poll_wait: int = 20) -> None:
        if base_kind(kind) not in KINDS:
            raise ValueError(f"unknown target {kind}; known: {', '.join(KINDS)}")
        self.kind = kind
        self.paths = paths
        self.n_workers = max(1, min(workers, len(paths)))
        self.concurrency = concurrency
        self.stack = Stack(kind.rpartition("-")[0], env=env)
        self.poll_wait = poll_wait
        self.workers: list[WorkerProc] = []
        self.publisher: Publisher | None = None
        self.info: dict[str, Any] = {}

    async def __aenter__(self) -> Session:
        await asyncio.to_thread(self.stack.start)
        try:
            await self._connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.publisher is not None:
            try:
                await asyncio.wait_for(self.publisher.close(), 5)
            except Exception:  # a broken publisher must not keep the server alive
                pass
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        await asyncio.to_thread(self.stack.stop)

    async def _connect(self) -> None:
        await asyncio.sleep(0.5)
        rss_before = self.stack.server_rss()
        cpu0 = self.stack.server_cpu()
        t0 = time.monotonic()
        shares = [self.paths[i :: self.n_workers] for i in range(self.n_workers)]
        port = self.stack.port
        self.workers = [
            await WorkerProc.start({
                "kind": self.kind, "host": "127.0.0.1", "port": port, "paths": share,
                "concurrency": self.concurrency, "connect_timeout": 60,
                "wait": self.poll_wait,
            })
            for share in shares
        ]
        timeout = 60 + len(self.paths) / 50
        answers = await asyncio.gather(*(w.recv(timeout) for w in self.workers))
        connect_seconds = time.monotonic() - t0
        connect_cpu = self.stack.server_cpu() - cpu0
        await asyncio.sleep(1.0)  # let the server settle before reading its RSS
        rss_after = self.stack.server_rss()
        ok = sum(a["ok"] for a in answers)
        errors: list[Any] = [e for a in answers for e in a["errors"]]
        self.info = {
            "served": self.stack.version(),
            "connected": ok, "failed_connect": sum(a["failed"] for a in answers),
            "connect_errors": errors[:5], "connect_seconds": round(connect_seconds, 2),
            "connect_server_cpu_s": round(connect_cpu, 3),
            "rss_before": rss_before, "rss_after": rss_after,
            "rss_per_conn_kb": round((rss_after - rss_before) / ok / 1024, 1) if ok else None,
        }

    async def status(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(w.ask({"op": "status"}, 30) for w in self.workers)))

    async def publisher_for(self, rooms: list[str] | None = None) -> Publisher:
        if self.publisher is None:
            self.publisher = make_publisher(self.kind, self.stack.redis_url, rooms)
            await self.publisher.start()
        return self.publisher

    async def warm_up(self, rooms: list[str] | None = None, wait_s: float = 20,
                      need: int | None = None) -> bool:
        """Publish warm-up events (seq < 0) until every live client has seen one.

        This proves each server's Redis subscription is in place before measuring
        (python-socketio subscribes on its first connection, broadcaster in its
        lifespan) without a sleep.
        """
        pub = await self.publisher_for(rooms)
        deadline = time.monotonic() + wait_s
        seq = -1
        while time.monotonic() < deadline:
            await pub.publish(seq)
            seq -= 1
            await asyncio.sleep(0.1)
            states = await self.status()
            warm = sum(s["warm"] for s in states)
            alive = sum(s["alive"] for s in states)
            if warm >= (need if need is not None else alive) and alive:
                await asyncio.sleep(0.3)
                return True
        return False

    async def _profile(self, rate: float, duration: float) -> asyncio.subprocess.Process | None:
        """With BENCH_PROFILE=<dir>, sample the server with py-spy while publishing
        (BENCH_PROFILE_NATIVE=1: with C frames too)."""
        folder = os.environ.get("BENCH_PROFILE")
        if not folder:
            return None
        assert self.stack.server is not None
        os.makedirs(folder, exist_ok=True)
        out = Path(folder) / f"{self.kind}-{len(self.paths)}c-{rate:g}r.txt"
        return await asyncio.create_subprocess_exec(
            shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy",
            "record", "-p", str(self.stack.server.pid), "-d", str(int(duration)),
            "-r", "200", "-f", "raw", "-o", str(out),
            *(["--native"] if os.environ.get("BENCH_PROFILE_NATIVE") else ["--nonblocking"]),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )

    async def quiet(self, max_wait: float = 20.0, threshold: float = 0.5) -> float:
        """Wait (bounded) until other users of the machine take under `threshold` of a core.

        These machines are shared: a step measured while someone else's test suite
        holds a core says little. Returns the last 1-second reading of other load.
        """
        deadline = time.monotonic() + max_wait
        other = 0.0
        while True:
            before = self.cpu_snapshot()
            await asyncio.sleep(1.0)
            after = self.cpu_snapshot()
            ours = sum(after[k] - before[k] for k in ("server", "redis", "generator", "publisher"))
            busy = after["machine"] - before["machine"]
            other = (busy - ours) / (after["wall"] - before["wall"])
            if other < threshold or time.monotonic() > deadline:
                return other

    def cpu_snapshot(self) -> dict[str, float]:
        return {
            "server": self.stack.server_cpu(),
            "redis": self.stack.redis_cpu(),
            "generator": sum(process_cpu(w.pid) for w in self.workers),
            "publisher": self_cpu(),
            "machine": machine_busy(),
            "wall": time.monotonic(),
        }

    async def step(self, rate: float, duration: float, drain: float = 10.0,
                   rooms: list[str] | None = None,
                   receivers: list[list[int]] | None = None) -> dict[str, Any]:
        """Publish at `rate` for `duration`; gather latency, loss and CPU from every worker."""
        pub = await self.publisher_for(rooms)
        spy = await self._profile(rate, duration)
        before = self.cpu_snapshot()
        start_wall = time.time()
        sent = await publish_at_rate(pub, rate, duration)
        if spy is not None:
            try:
                await asyncio.wait_for(spy.wait(), duration + 15)
            except TimeoutError:
                spy.kill()
        answers = await asyncio.gather(*(
            w.ask({"op": "collect", "expect": sent["sent"], "timeout": drain,
                   "receivers": receivers[i] if receivers else None}, drain + 30)
            for i, w in enumerate(self.workers)
        ))
        after = self.cpu_snapshot()
        hist: dict[int, int] = {}
        for a in answers:
            for bucket, n in a["hist"].items():
                hist[int(bucket)] = hist.get(int(bucket), 0) + n
        deliveries = sum(a["deliveries"] for a in answers)
        last = max((a["last"] for a in answers if a["last"]), default=start_wall)
        span = max(last - start_wall, sent["publish_seconds"], 1e-6)
        wall = after["wall"] - before["wall"]

        def pct(key: str) -> float:
            return round(100 * (after[key] - before[key]) / wall, 1)

        def us_per_delivery(key: str) -> float | None:
            return round(1e6 * (after[key] - before[key]) / deliveries, 2) if deliveries else None

        # Busy time of the whole machine not charged to our processes: other users, and
        # kernel softirq work (loopback TCP) that no process is billed for.
        ours = sum(after[k] - before[k] for k in ("server", "redis", "generator", "publisher"))
        other = (after["machine"] - before["machine"]) - ours
        return {
            "target": self.kind, "rate": rate, "duration": duration, **sent,
            "profiled": spy is not None,  # py-spy ran: its sampling costs the machine CPU
            "clients": len(self.paths), **self.info,
            "deliveries": deliveries, "deliveries_per_s": round(deliveries / span),
            "p50_ms": percentile(hist, deliveries, 0.50),
            "p90_ms": percentile(hist, deliveries, 0.90),
            "p99_ms": percentile(hist, deliveries, 0.99),
            "max_ms": round(max((a["max_latency"] for a in answers), default=0) * 1000, 2),
            "lost": sum(a["lost"] for a in answers),
            "duplicated": sum(a["duplicated"] for a in answers),
            "out_of_order": sum(a["out_of_order"] for a in answers),
            "misrouted": sum(a.get("misrouted", 0) for a in answers),
            "clients_with_loss": sum(a["clients_with_loss"] for a in answers),
            "closed": sum(a["closed"] for a in answers),
            "close_reasons": [r for a in answers for r in a["close_reasons"]][:3],
            "window_s": round(wall, 2),
            "server_cpu_pct": pct("server"), "redis_cpu_pct": pct("redis"),
            "generator_cpu_pct": pct("generator"), "publisher_cpu_pct": pct("publisher"),
            "other_cpu_pct": round(100 * other / wall, 1),
            "server_cpu_s": round(after["server"] - before["server"], 4),
            "server_us_per_delivery": us_per_delivery("server"),
            "generator_us_per_delivery": us_per_delivery("generator"),
            "rss_end": self.stack.server_rss(),
        }


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores), to tell our load from others'."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0))


def median(values: list[float]) -> float:
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else float("nan")
