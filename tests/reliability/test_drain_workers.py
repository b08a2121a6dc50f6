"""`dualcast serve --workers 2` drains without a single non-200 answer (issue 18 item 4).

A browser's EventSource reconnects by itself after a network error (a refused or
reset connection) but gives up for good on any answer that is not a 200
`text/event-stream`. It also sends its reconnect down a kept-alive connection when
it has one. The clients here do exactly that (httpx keeps connections alive the
same way): a non-200 ends a client, and is counted. A worker is SIGTERMed while
events flow, then the whole server is stopped and started again on its port; every
client must end with every event of the stream, in order, none twice.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import psutil
import pytest

from tests.conftest import token
from tests.harness.probes import log_problems
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.stream import Producer, check_exact, stream_ids
from tests.harness.waits import cancel, wait_for
from tests.reliability.conftest import FAST

pytestmark = pytest.mark.timeout(120)

CLIENTS = 30


@dataclass
class BrowserSSE:
    """An EventSource as a browser runs it: one per page, on a keep-alive HTTP client."""

    url: str
    ids: list[str] = field(default_factory=list)
    welcomes: int = 0
    refusals: list[str] = field(default_factory=list)  # a browser gives up on each
    network_errors: int = 0
    retry_ms: int = 3000
    last_id: str | None = None
    first_welcome: str | None = None
    task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None), limits=limits) as http:
            while True:
                headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
                if self.last_id is not None:
                    headers["Last-Event-ID"] = self.last_id
                try:
                    async with http.stream("GET", self.url, headers=headers) as answer:
                        kind = answer.headers.get("content-type", "")
                        if answer.status_code != 200 or not kind.startswith("text/event-stream"):
                            body = (await answer.aread())[:200]
                            self.refusals.append(f"{answer.status_code} {kind} {body!r}")
                            return  # EventSource.readyState = CLOSED, for good
                        await self._read(answer)
                except httpx.TransportError:
                    self.network_errors += 1
                # the stream ended or the network failed: retry after `retry:` (jittered,
                # as our own client does; a browser waits the plain value)
                await asyncio.sleep(self.retry_ms / 1000 * random.uniform(0.1, 0.5))

    async def _read(self, answer: httpx.Response) -> None:
        event, data, entry_id = "message", "", None
        async for line in answer.aiter_lines():
            if line == "":
                self._dispatch(event, data, entry_id)
                event, data, entry_id = "message", "", None
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    event = value
                elif name == "data":
                    data = f"{data}\n{value}" if data else value
                elif name == "id":
                    entry_id = value
                elif name == "retry" and value.isdigit():
                    self.retry_ms = int(value)

    def _dispatch(self, event: str, data: str, entry_id: str | None) -> None:
        if event == "welcome":
            self.welcomes += 1
            if self.last_id is None:
                self.last_id = self.first_welcome = orjson.loads(data)["last_id"]
        elif event == "reset":
            raise AssertionError(f"unexpected reset: {data}")
        elif entry_id is not None:
            self.ids.append(entry_id)
            self.last_id = entry_id

    def start(self) -> BrowserSSE:
        self.task = asyncio.create_task(self.run())
        return self


def _workers(dc: DualcastProcess) -> list[psutil.Process]:
    children = psutil.Process(dc.pid).children()
    return [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]


def _streams(worker: psutil.Process, port: int) -> int:
    """How many clients' connections to `port` this worker holds."""
    return sum(1 for c in worker.net_connections("tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


async def _refused(port: int) -> bool:
    """Whether a connect to `port` is refused (False: accepted, or no answer in time)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.5)
    except ConnectionRefusedError:
        return True
    except (OSError, TimeoutError):
        return False
    writer.close()
    return False


async def _in_stream(clients: list[BrowserSSE], n: int, within: float, what: str) -> None:
    await wait_for(lambda: all(len(c.ids) >= n or c.refusals for c in clients), within,
                   what=what)
    refused = [r for c in clients for r in c.refusals]
    assert not refused, f"{len(refused)} clients were answered non-200: {refused[:3]}"


async def test_draining_workers_never_answer_non_200(
    tmp_path: Path, fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess],
) -> None:
    # both workers serving from the start: what is drained is two workers' clients
    env = {**FAST, "DUALCAST_SHUTDOWN_GRACE": "4", "DUALCAST_SSE_RETRY_MS": "300",
           "DUALCAST_WORKERS_WAKE": "start"}
    dc = dualcast(fresh_redis.url, env=env, args=["--workers", "2"])
    await wait_for(lambda: len(_workers(dc)) == 2, 30, what="two workers")
    url = f"{dc.url}/api/sse?token={token('drain')}"
    clients = [BrowserSSE(url).start() for _ in range(CLIENTS)]
    producer = Producer(fresh_redis.url, rate=40).start()
    try:
        await wait_for(lambda: all(c.welcomes for c in clients), 30, what="every client welcomed")
        await _in_stream(clients, 20, 20, "20 events on every client")

        # One worker drains and exits; the supervisor starts another. The victim is the
        # worker holding the most clients: the kernel may hand all 30 to one of the two.
        victim = max(_workers(dc), key=lambda w: _streams(w, dc.port))
        assert _streams(victim, dc.port) > 0
        victim.send_signal(signal.SIGTERM)
        await asyncio.to_thread(victim.wait, 20)
        await wait_for(lambda: len(_workers(dc)) == 2, 30, what="a replacement worker")
        await wait_for(lambda: sum(c.welcomes >= 2 for c in clients) >= 1, 20,
                       what="the drained worker's clients back")
        n = min(len(c.ids) for c in clients)
        await _in_stream(clients, n + 40, 30, "40 more events after the worker drained")

        # The whole server drains, stops, and starts again on the same port. While its
        # workers drain, a new connection is refused at once (EventSource retries that),
        # not accepted by a socket nobody reads any more and held until the server exits.
        dc.signal(signal.SIGTERM)
        term = time.monotonic()
        # (the drain takes about half the grace period, 2 s: refused well before it ends)
        await wait_for(lambda: _refused(dc.port), 1.0,
                       what="new connections refused while the workers drain")
        refused_after = time.monotonic() - term
        assert dc.alive(), "the server had already exited: the drain was not observed"
        await asyncio.to_thread(dc.stop, 30)
        dc.start()
        n = min(len(c.ids) for c in clients)
        await _in_stream(clients, n + 40, 40, "40 more events after the restart")
        await producer.stop()
        for client in clients:
            assert client.first_welcome is not None
            expected = await stream_ids(fresh_redis.url, after=client.first_welcome)
            await wait_for(lambda c=client, e=expected: len(c.ids) >= len(e) or c.refusals, 20,
                           what="every client to catch up")
            problem = check_exact(client.ids, expected)
            assert problem is None, f"a client: {problem}"
        refused = [r for c in clients for r in c.refusals]
        assert refused == [], f"non-200 answers: {refused[:3]}"
        errors = sum(c.network_errors for c in clients)
        welcomes = sum(c.welcomes for c in clients)
        print(f"\ndrain: {CLIENTS} browser-like SSE clients, one worker SIGTERMed then the whole "
              f"server restarted: 0 non-200, {welcomes} welcomes, {errors} network errors; "
              f"new connects refused {refused_after:.2f}s after the server's SIGTERM")
        assert log_problems(dc) == []
    finally:
        await producer.stop()
        for client in clients:
            await cancel(client.task)
