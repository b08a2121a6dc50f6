"""The Python client and `dualcast tail` through a real nginx that breaks transports.

nginx runs from the project's templates in its fault modes (`no-websocket`
refuses every upgrade with 403; `buffering` refuses upgrades and holds SSE back
completely) in front of two real dualcast instances sharing a real redis-server.
The client must find the transport that works, carry one cursor across its
switches and its failed probes of better transports, and deliver each id once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dualcast.client import State, Status, Timing, Transport
from tests.conftest import require_tool
from tests.harness.nginx import NginxProcess
from tests.harness.procs import ROOT
from tests.test_client import publish, until, watching

pytestmark = [pytest.mark.nginx, pytest.mark.timeout(120)]

#: Probes of the better transports every second or so: each failed probe is a chance
#: to deliver something twice or lose it, so the tests make many of them.
PROBING = Timing(welcome=4.0, retry_base=0.1, retry_cap=1.0, climb_base=0.3, climb_cap=1.0)


@pytest.fixture
def proxy(tmp_path: Path, redis_server: Any,
          dualcast: Callable[..., Any]) -> Iterator[Callable[[str], NginxProcess]]:
    require_tool("nginx", "these tests run a real nginx")
    pair = [dualcast(redis_server.url), dualcast(redis_server.url)]
    started: list[NginxProcess] = []

    def start(mode: str) -> NginxProcess:
        proc = NginxProcess(tmp_path / f"nginx{len(started)}", [p.port for p in pair], mode)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


@pytest.mark.parametrize(("mode", "lands_on"), [
    ("no-websocket", Transport.SSE),
    ("buffering", Transport.POLLING),
])
async def test_auto_falls_back_to_what_the_proxy_lets_through(
    proxy: Callable[[str], NginxProcess], mode: str, lands_on: Transport
) -> None:
    nginx = proxy(mode)
    marker = await publish(nginx.url, "marker", 0)
    async with watching(nginx.url, last_event_id=marker, timing=PROBING) as (watch, events):
        await until(lambda: watch.live_on(lands_on), timeout=20, what=f"live on {lands_on}")
        published = []
        for n in range(30):  # over a few seconds: several failed climbs happen meanwhile
            published.append(await publish(nginx.url, "tick", {"n": n}))
            if n % 5 == 4:
                await until(lambda: published[-1] in watch.ids, what=f"event {n}")
        await until(lambda: len(watch.ids) >= len(published), what="every event")
        assert watch.ids == published
        assert events.transport is lands_on
        assert watch.failure is None
        # It tried the better ones first, in order, and never claimed one was live.
        tried = list(dict.fromkeys(s.transport for s in watch.statuses))
        assert tried[0] is Transport.WEBSOCKET and tried[-1] is lands_on
        assert {s.transport for s in watch.statuses if s.state is State.LIVE} == {lands_on}


async def test_it_climbs_back_to_websocket_when_the_proxy_lets_it(
    proxy: Callable[[str], NginxProcess]
) -> None:
    nginx = proxy("no-websocket")
    marker = await publish(nginx.url, "marker", 0)
    async with watching(nginx.url, last_event_id=marker, timing=PROBING) as (watch, _):
        await until(lambda: watch.live_on(Transport.SSE), timeout=20, what="live on SSE")
        published = [await publish(nginx.url, "before", n) for n in range(5)]
        await until(lambda: published[-1] in watch.ids)
        await asyncio.to_thread(nginx.reload, "plain")
        for n in range(40):  # keep publishing across the switch
            published.append(await publish(nginx.url, "across", n))
            if watch.live_on(Transport.WEBSOCKET) and n >= 10:
                break
            await asyncio.sleep(0.1)  # a producer's pace, so the switch falls mid-stream
        await until(lambda: watch.live_on(Transport.WEBSOCKET), timeout=20,
                    what="the climb back to WebSocket")
        published += [await publish(nginx.url, "after", n) for n in range(5)]
        await until(lambda: len(watch.ids) >= len(published), what="every event")
        assert watch.ids == published
        assert Status(Transport.SSE, State.LIVE) in watch.statuses


async def test_dualcast_tail_through_the_buffering_proxy(
    proxy: Callable[[str], NginxProcess]
) -> None:
    nginx = proxy("buffering")
    marker = await publish(nginx.url, "marker", 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALCAST_")}
    env["PYTHONUNBUFFERED"] = "1"
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dualcast", "tail", nginx.url, "--last-event-id", marker,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert tail.stdout is not None and tail.stderr is not None
    lines: list[dict[str, Any]] = []
    errors: list[str] = []

    async def read(stream: asyncio.StreamReader, sink: Callable[[str], None]) -> None:
        while line := await stream.readline():
            sink(line.decode())

    readers = [
        asyncio.create_task(read(tail.stdout, lambda text: lines.append(json.loads(text)))),
        asyncio.create_task(read(tail.stderr, errors.append)),
    ]
    try:
        await until(lambda: "dualcast tail: polling live\n" in errors, timeout=30,
                    what=f"tail to go live on polling ({errors})")
        published = [await publish(nginx.url, "tick", {"n": n, "s": "ü"}) for n in range(20)]
        await until(lambda: len(lines) >= len(published), timeout=30,
                    what=f"every event on stdout ({len(lines)} of {len(published)})")
        assert [line["id"] for line in lines] == published
        assert lines[-1]["event"] == "tick" and lines[-1]["data"] == {"n": 19, "s": "ü"}
        assert set(lines[-1]) == {"id", "event", "data", "ts"}
        assert isinstance(lines[-1]["ts"], int)
        tail.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(tail.wait(), 15)
        await asyncio.wait_for(asyncio.gather(*readers), 5)
        assert code == 0, "".join(errors)
        assert not any("Traceback" in line for line in errors), "".join(errors)
        assert len(lines) == len(published)  # nothing more came after
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()
        for task in readers:
            task.cancel()
