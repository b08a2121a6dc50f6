"""One load-generator worker process: opens its share of the clients and reports.

The runner starts several of these (`python -m bench.loadgen`) so the generator
spreads over the cores, and talks to each over stdin/stdout, one JSON object per
line. The first line in is the spec (too big for argv with 10,000 token paths):

    worker -> {"op": "connected", "ok": n, "failed": m, "errors": [...], "cpu_user": s, ...}
    runner -> {"op": "status"}                    worker -> {"op": "status", "warm": n, ...}
    runner -> {"op": "collect", "expect": K, "timeout": s}
                                                  worker -> {"op": "result", ...} (and resets)
    runner -> {"op": "exit"}

Spec keys: kind, host, port, paths (one request path per client), concurrency,
connect_timeout, wait (long-poll timeout); optional: source (a loopback address to
bind, e.g. 127.0.0.2: each source address has its own ~28k ephemeral ports, so a
fleet of generators passes the 64k limit of one; or a list of them, taken in turn:
see `bench.ramp.start_connect` for why one address should stay well below its 28k), retries
(connects refused or failed are tried again this many times, 0.5 s apart, as a real client would).
Clients keep the order of `paths` (collect's `receivers` are indices into it).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import socket
import sys
import time
import types
from collections import Counter
from collections.abc import Callable
from typing import Any


def lean_harness() -> None:
    """Let `tests.harness.lean` (and its `wire`) load without the package's __init__.

    That __init__ imports the whole harness (httpx, redis, ...): 0.34 s of CPU to start
    a generator against 0.14 s without, times six generators that start while the
    first of them already connect. A bare package with the same path stands in for
    it; only a generator process does this (see `__main__` below), as everything
    else may want the package's names.
    """
    if "tests.harness" in sys.modules:
        return
    import tests

    harness = types.ModuleType("tests.harness")
    harness.__path__ = [os.path.join(os.path.dirname(tests.__file__), "harness")]
    sys.modules["tests.harness"] = harness


if __name__ == "__main__":
    lean_harness()

from bench.clients import KINDS, Client, PollClient, Tally, base_kind  # noqa: E402
from bench.ramp import Ramp  # noqa: E402


def raise_nofile() -> None:
    """The open-file limit up to its hard limit (tests.harness.procs has the same,
    with the httpx import this process goes without)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.kind: str = spec["kind"]
        self.tally = Tally()
        self.clients: list[Client] = []
        #: the index in `paths` of each client (a client that never connected has none)
        self.slots: list[int] = []

    async def connect_all(self) -> dict[str, Any]:
        cls: Any = KINDS[base_kind(self.kind)][0]  # each kind's own signature
        host, port = self.spec["host"], self.spec["port"]
        source = self.spec.get("source")
        sources: list[str] = [source] if isinstance(source, str) else list(source or ())
        factory: Callable[[str], Client]
        if cls is PollClient:
            wait = self.spec.get("wait", 20)
            factory = lambda path: PollClient(self.tally, host, port, path, wait)  # noqa: E731
        else:
            factory = lambda path: cls(self.tally, host, port, path)  # noqa: E731
        # resolved once: the ramp connects to a numeric address
        info = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
        addr: tuple[str, int] = (str(info[0][4][0]), int(info[0][4][1]))
        ramp = Ramp(self.spec["paths"], factory, addr, sources,
                    int(self.spec.get("concurrency", 50)),
                    float(self.spec.get("connect_timeout", 30.0)),
                    int(self.spec.get("retries", 0)))
        started = time.time()
        await ramp.run()
        ended = time.time()
        cpu = os.times()
        placed = sorted(ramp.placed, key=lambda pair: pair[0])
        self.clients = [c for _, c in placed]
        self.slots = [i for i, _ in placed]
        ok = sum(1 for c in self.clients if c.ready.done() and not c.ready.exception())
        return {"op": "connected", "ok": ok, "failed": len(self.spec["paths"]) - ok,
                "errors": ramp.errors.most_common(5), "attempts": ramp.tries,
                "started": started, "ended": ended,
                # this process's CPU so far (start-up included), split as the kernel has it
                "cpu_user": cpu.user, "cpu_system": cpu.system}

    def status(self) -> dict[str, Any]:
        alive = [c for c in self.clients if not c.closed]
        return {"op": "status", "alive": len(alive), "warm": sum(c.warm for c in alive),
                "deliveries": self.tally.deliveries}

    async def collect(
        self, expect: int, wait_s: float, receivers: list[int] | None = None
    ) -> dict[str, Any]:
        """Wait until every live client has all `expect` events (or timeout); report; reset.

        With `receivers` (indices into this worker's `paths`) only those should get
        the events (a room event); anything another client gets is misrouted.
        """
        slots = self.slots
        wanted = set(slots if receivers is None else receivers)
        targets = [c for i, c in zip(slots, self.clients, strict=True) if i in wanted]
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if all(c.count >= expect or c.closed for c in targets):
                break
            await asyncio.sleep(0.02)
        lost = dup = ooo = misrouted = 0
        clients_with_loss = closed = 0
        reasons: Counter[str] = Counter()
        for i, c in zip(slots, self.clients, strict=True):
            if i not in wanted:
                misrouted += c.count
                c.reset()
                continue
            missing = max(0, expect - c.count)
            lost += missing
            clients_with_loss += missing > 0
            dup += c.dup
            ooo += c.ooo
            if c.closed:
                closed += 1
                reasons[c.close_reason[:120]] += 1
            c.reset()
        result = {"op": "result", **self.tally.summary(),
                  "lost": lost, "duplicated": dup,
                  "out_of_order": ooo, "misrouted": misrouted,
                  "clients_with_loss": clients_with_loss,
                  "closed": closed, "close_reasons": reasons.most_common(3),
                  "clients": len(self.clients)}
        self.tally.reset()
        return result

    def close_all(self) -> None:
        for c in self.clients:
            if isinstance(c, PollClient):
                c.stopping = True
            c.close()


async def main() -> None:
    raise_nofile()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = Worker(json.loads(await reader.readline()))

    def emit(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    # No cyclic GC during the ramp: each connect leaves objects that live on (the
    # client, its futures and transport), so collections there found little to free
    # and grew with the clients held (9% of a generator's samples in a py-spy
    # profile of a 30,000 ramp). One collection after it, then the survivors frozen.
    gc.disable()
    emit(await worker.connect_all())
    # The generator's own GC pauses would show up as server latency: keep them rare.
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    gc.enable()
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        op = cmd.get("op")
        if op == "status":
            emit(worker.status())
        elif op == "collect":
            emit(await worker.collect(
                int(cmd["expect"]), float(cmd.get("timeout", 10)), cmd.get("receivers")
            ))
        elif op == "exit":
            break
    worker.close_all()
    await asyncio.sleep(0.2)  # let close frames go out


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # plain asyncio works, only slower
        asyncio.run(main())
    else:
        uvloop.run(main())
