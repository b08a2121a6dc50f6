"""Keepalive pings from one ring per event loop (`dualcast.keepalive`).

The ring on its own (beats run again and again, a finished one is forgotten, a
failing one does not stop the others, no timer while nothing is in it), and a real
server's pings on the wire: a WebSocket that answers them stays open, one that stops
answering is closed with 1011, and an SSE stream gets `: ping` while events flow too.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import struct
from collections.abc import Callable

import httpx
import pytest
import uvicorn

from dualcast.app import create_app
from dualcast.config import Settings
from dualcast.keepalive import Keepalive, keepalive
from dualcast.serve import uvicorn_config
from tests.conftest import SECRET, token
from tests.harness.procs import DualcastProcess
from tests.harness.waits import lines_of, wait_for
from tests.harness.wire import mask_frame, upgrade_request

pytestmark = pytest.mark.timeout(60)


async def test_a_beat_runs_again_and_again_until_it_is_forgotten() -> None:
    ring = Keepalive(asyncio.get_running_loop(), 0.2)
    runs = {"a": 0, "b": 0}

    def beat(name: str) -> Callable[[], bool]:
        def run() -> bool:
            runs[name] += 1
            return True
        return run

    slot_a = ring.add("a", beat("a"))
    ring.add("b", beat("b"))
    await wait_for(lambda: runs["a"] >= 3 and runs["b"] >= 3, 10, "three beats each")
    Keepalive.forget(slot_a, "a")
    after = runs["a"]
    await wait_for(lambda: runs["b"] >= runs["a"] + 3, 10, "b's beats go on")
    assert runs["a"] == after
    assert len(ring) == 1
    ring.close()


async def test_a_finished_or_failing_beat_is_dropped_and_the_others_go_on() -> None:
    ring = Keepalive(asyncio.get_running_loop(), 0.2)
    runs = {"done": 0, "broken": 0, "live": 0}

    def done() -> bool:
        runs["done"] += 1
        return False

    def broken() -> bool:
        runs["broken"] += 1
        raise RuntimeError("a connection's fault")

    def live() -> bool:
        runs["live"] += 1
        return True

    ring.add("done", done)
    ring.add("broken", broken)
    ring.add("live", live)
    await wait_for(lambda: runs["live"] >= 3, 10, "the live beat, three times")
    assert runs["done"] == 1
    assert runs["broken"] == 1
    assert len(ring) == 1
    ring.close()


async def test_a_ring_wakes_only_for_the_slots_that_hold_beats() -> None:
    """A few connections fill a few of the ring's slots; its timer skips the empty ones
    (each tick wakes the whole process), and each beat still runs once per interval."""
    walks = 0

    class Counting(Keepalive):
        def _walk(self) -> None:
            nonlocal walks
            walks += 1
            super()._walk()

    loop = asyncio.get_running_loop()
    ring = Counting(loop, 0.4)  # a tick of 0.1 s: four slots
    times: list[float] = []
    ring.add("one", lambda: times.append(loop.time()) or True)
    await wait_for(lambda: len(times) >= 5, 20, "five beats")
    ring.close()
    assert walks <= len(times) + 1  # (the first tick, armed by `add`, may find it empty)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) > 0.3, gaps  # once per interval, not once per tick


async def test_an_empty_ring_stops_its_timer_and_starts_it_again() -> None:
    loop = asyncio.get_running_loop()
    ring = keepalive(loop, 0.2)
    assert keepalive(loop, 0.2) is ring  # one ring per loop and interval
    ran = asyncio.Event()
    ring.add("once", lambda: ran.set() or False)
    await asyncio.wait_for(ran.wait(), 10)
    assert not ring.armed and len(ring) == 0
    again = asyncio.Event()
    ring.add("again", lambda: again.set() or False)
    assert ring.armed
    await asyncio.wait_for(again.wait(), 10)


@pytest.fixture
def pinging(dualcast: Callable[..., DualcastProcess]) -> DualcastProcess:
    return dualcast(env={"DUALCAST_PING_INTERVAL": "0.5"})


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""
    head = await reader.readexactly(2)
    size = head[1] & 0x7F
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2), "big")
    elif size == 127:
        size = int.from_bytes(await reader.readexactly(8), "big")
    return head[0] & 0x0F, await reader.readexactly(size)


async def test_a_websocket_that_answers_pings_stays_and_one_that_stops_is_closed_1011(
        pinging: DualcastProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", pinging.port)
    try:
        writer.write(upgrade_request("/api/ws", "127.0.0.1", pinging.port))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101")
        opcode, _ = await asyncio.wait_for(_read_frame(reader), 10)
        assert opcode == 0x1  # the welcome
        answered = 0
        while answered < 3:  # three pings answered: the connection stays
            opcode, payload = await asyncio.wait_for(_read_frame(reader), 10)
            assert opcode == 0x9, f"expected a ping, got opcode {opcode}"
            writer.write(mask_frame(0xA, payload))
            answered += 1
        opcode, payload = await asyncio.wait_for(_read_frame(reader), 10)
        assert opcode == 0x9  # the fourth ping, left unanswered
        opcode, payload = await asyncio.wait_for(_read_frame(reader), 10)
        assert opcode == 0x8, f"expected the close, got opcode {opcode}"
        assert int.from_bytes(payload[:2], "big") == 1011
        assert await asyncio.wait_for(reader.read(), 10) == b""  # and the server hung up
    finally:
        writer.close()


async def test_an_sse_stream_gets_its_ping_while_events_flow(pinging: DualcastProcess) -> None:
    headers = {"Authorization": "Bearer " + token("p", publish=True)}
    async with httpx.AsyncClient(base_url=pinging.url, timeout=10) as http:
        async with http.stream("GET", "/api/sse") as response, lines_of(response) as seen:
            await wait_for(lambda: "event: welcome" in seen, 10, "the welcome")
            n = 0
            while seen.count(": ping") < 3:  # an event every 0.1 s, pings between them
                assert (await http.post("/api/publish", headers=headers,
                                        json={"event": "tick", "data": {"n": n}})
                        ).status_code == 202
                n += 1
                assert n < 500, "fewer than three pings in 500 events"
                await asyncio.sleep(0.1)
            await wait_for(lambda: seen.count("event: tick") == n, 10, "every event")


async def test_connections_that_end_leave_the_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every WebSocket and SSE stream is in its loop's ring while it lasts, and none is
    left in it once the clients have gone (closed or reset), long before any ping."""
    # A ring of its own (no other test pings every 4.5 s). Its timer skips empty slots, so
    # once a tick found beats further on, the next tick may be up to an interval away:
    # with an interval of an hour, "stopped at its next tick" waited for that hour
    # whenever setting up the 20 clients outlasted the first tick (a loaded CI machine).
    interval = 4.5
    settings = Settings(secret=SECRET, ping_interval=interval)
    config = uvicorn_config(settings, create_app(settings))
    config.host, config.port = "127.0.0.1", 0
    monkeypatch.setattr(logging.getLogger("uvicorn.access"), "hasHandlers", lambda: False)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    ring = keepalive(asyncio.get_running_loop(), interval)
    clients: list[asyncio.StreamWriter] = []
    try:
        await wait_for(lambda: server.started, 10, "the server")
        port = server.servers[0].sockets[0].getsockname()[1]
        for n in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            clients.append(writer)
            if n % 2:
                writer.write(upgrade_request("/api/ws", "127.0.0.1", port))
                assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                        ).startswith(b"HTTP/1.1 101")
                assert (await asyncio.wait_for(_read_frame(reader), 10))[0] == 0x1  # welcome
            else:
                writer.write(b"GET /api/sse HTTP/1.1\r\nHost: dualcast\r\n\r\n")
                await asyncio.wait_for(reader.readuntil(b"event: welcome"), 10)
        await wait_for(lambda: len(ring) == 20, 10, "every connection in the ring")
        for n, writer in enumerate(clients):
            if n % 4 == 0:  # a reset rather than a close
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
        await wait_for(lambda: len(ring) == 0, 10, "an empty ring")
        await wait_for(lambda: not ring.armed, 10, "the ring's timer stopped at its next tick")
    finally:
        for writer in clients:
            writer.close()
        server.should_exit = True
        await asyncio.wait_for(serving, 15)
