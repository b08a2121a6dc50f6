"""The shortcuts taken for speed (issue 8) keep the behaviour they replace.

Query strings parse like Starlette's QueryParams; a cached token still expires;
concurrent readers of the log's window share one fetch; the subscriber endpoints
served in front of Starlette still answer other methods with Starlette's 405;
an idle SSE stream gets its `: ping` comment.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qsl

import httpx
import orjson
import pytest
import websockets
from hypothesis import given
from hypothesis import strategies as st

from dualcast import auth
from dualcast.auth import Authenticator, AuthError, mint_token
from dualcast.collector import THRESHOLDS, FreezeAfterFullCollections
from dualcast.config import Settings
from dualcast.events import Event
from dualcast.hub import Hub, Subscriber
from dualcast.log import LogInfo
from dualcast.loops import running_loop
from dualcast.query import parse_query
from dualcast.runtime import Runtime
from dualcast.stalls import Stalled, StallWatch
from tests.conftest import SECRET, token
from tests.harness.probes import metric
from tests.harness.procs import DualcastProcess

query_text = st.text(alphabet=st.sampled_from("ab=&%+2Ee9 é€;x"), max_size=40)


@given(raw=query_text)
def test_query_parses_like_starlette(raw: str) -> None:
    assert parse_query(raw.encode("utf-8")) == dict(parse_qsl(raw.encode("utf-8").decode("latin-1"),
                                                              keep_blank_values=True))


@pytest.mark.parametrize(("raw", "rooms"), [
    ("rooms=a&rooms=b", "a,b"),
    ("rooms=a,b&token=t&rooms=c%2Cd", "a,b,c,d"),
    ("rooms=&rooms=a", ",a"),
    ("rooms=a", "a"),
])
def test_repeated_rooms_add_up_to_one_list(raw: str, rooms: str) -> None:
    """`?rooms=a&rooms=b` gave `b` alone (the last one won); other names still do."""
    query = parse_query(raw.encode())
    assert query["rooms"] == rooms
    assert parse_query(b"token=a&token=b") == {"token": "b"}


def test_a_cached_token_is_refused_once_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    authenticator = Authenticator(SECRET)
    soon = mint_token(SECRET, "456", ttl=60)
    first = authenticator.decode_now(soon)
    assert authenticator.decode_now(soon) is first  # the second look is the cache's
    later = time.time() + 120
    monkeypatch.setattr(auth.time, "time", lambda: later)
    with pytest.raises(AuthError) as refused:
        authenticator.decode_now(soon)
    assert refused.value.code == "token_expired"


def test_the_token_cache_is_bounded_and_belongs_to_one_authenticator() -> None:
    other = Authenticator("another-secret-0123456789abcdef-0123456789")
    mine = Authenticator(SECRET)
    token = mint_token(SECRET, "456", ttl=600)
    mine.decode_now(token)
    with pytest.raises(AuthError):
        other.decode_now(token)  # verified under one secret is not verified under another
    for n in range(Authenticator.CACHE_MAX + 10):
        mine.decode_now(mint_token(SECRET, f"u{n}", ttl=600))
    assert len(mine._verified) <= Authenticator.CACHE_MAX


@pytest.mark.timeout(10)
async def test_concurrent_window_readers_share_one_fetch() -> None:
    rt = Runtime(Settings(), SECRET)
    calls = 0
    real_info = rt.log.info
    gate = asyncio.Event()

    async def slow_info() -> LogInfo:
        nonlocal calls
        calls += 1
        await gate.wait()
        return await real_info()

    rt.log.info = slow_info  # type: ignore[method-assign]
    readers = [asyncio.create_task(rt.log_window(1.0)) for _ in range(200)]
    await asyncio.sleep(0)
    gate.set()
    windows = await asyncio.gather(*readers)
    assert calls == 1 and all(w is windows[0] for w in windows)
    assert await rt.log_window(1.0) is windows[0]  # fresh enough: the cache answers
    assert calls == 1
    readers[0].cancel()  # a reader cancelled after the fact changes nothing
    await rt.log_window(0.0)
    assert calls == 2


@pytest.mark.timeout(10)
async def test_a_cancelled_window_reader_does_not_cancel_the_others() -> None:
    rt = Runtime(Settings(), SECRET)
    gate = asyncio.Event()
    real_info = rt.log.info

    async def slow_info() -> LogInfo:
        await gate.wait()
        return await real_info()

    rt.log.info = slow_info  # type: ignore[method-assign]
    first = asyncio.create_task(rt.log_window(0.0))
    second = asyncio.create_task(rt.log_window(0.0))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert (await second).exists is not None
    assert first.cancelled()


@pytest.fixture
def pinging(dualcast: Callable[..., DualcastProcess]) -> DualcastProcess:
    return dualcast(env={"DUALCAST_PING_INTERVAL": "1"})


@pytest.mark.timeout(30)
async def test_idle_sse_gets_a_ping_comment_and_stays_live(pinging: DualcastProcess) -> None:
    async with httpx.AsyncClient(base_url=pinging.url, timeout=10) as http:
        async with http.stream("GET", "/api/sse") as response:
            lines = response.aiter_lines()
            seen: list[str] = []

            async def until(line: str) -> None:
                async for got in lines:
                    seen.append(got)
                    if got == line:
                        return

            await asyncio.wait_for(until(": ping"), 5)
            assert seen[:2] == ["retry: 3000", "event: welcome"]
            await asyncio.wait_for(until(": ping"), 5)  # and again: the stream goes on
            answer = await http.post("/api/publish", json={"event": "tick", "data": {"n": 1}},
                                     headers={"Authorization": "Bearer " + token("p", publish=True)})
            assert answer.status_code == 202
            await asyncio.wait_for(until("event: tick"), 5)


@pytest.mark.timeout(30)
async def test_other_methods_on_subscriber_paths_get_starlettes_405(
    pinging: DualcastProcess,
) -> None:
    async with httpx.AsyncClient(base_url=pinging.url, timeout=10) as http:
        for path in ("/api/sse", "/api/events"):
            refused = await http.post(path)
            assert refused.status_code == 405, path
            assert "GET" in refused.headers["allow"]
        answer = await http.get("/api/events", params={"timeout": "0"})
        assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
        body = answer.json()
        assert body["events"] == [] and body["reset"] is False and "last_id" in body


@pytest.mark.timeout(10)
async def test_the_stall_watch_cancels_only_a_send_that_lasts() -> None:
    watch = StallWatch(limit=5.0)
    blocked = asyncio.get_running_loop().create_future()
    outcome: list[str] = []

    async def writer_task(sends_forever: bool) -> None:
        with watch.writer() as writer:
            try:
                with writer:
                    if sends_forever:
                        await blocked  # a send to a client that stopped reading
                await asyncio.sleep(3600)  # idle between sends: never "stalled"
            except Stalled:
                outcome.append("stalled")
            except asyncio.CancelledError:
                outcome.append("cancelled")
                raise

    stuck = asyncio.create_task(writer_task(True))
    idle = asyncio.create_task(writer_task(False))
    await asyncio.sleep(0)
    assert watch.sweep(time.monotonic()) == 0  # nobody has been sending for 5 s yet
    assert watch.sweep(time.monotonic() + 6) == 1
    await stuck
    assert outcome == ["stalled"] and not stuck.cancelled() and len(watch.writers) == 1
    idle.cancel()  # a shutdown's cancel is not mistaken for a stall
    with pytest.raises(asyncio.CancelledError):
        await idle
    assert outcome == ["stalled", "cancelled"] and watch.writers == set()


@pytest.mark.timeout(10)
async def test_a_waiting_writer_keeps_one_alarm_across_deliveries() -> None:
    """Writers wait with a deadline on every delivery; the subscriber re-arms its timer
    only when it would ring too late, and the timeout still ends an idle wait."""
    hub = Hub()
    hub.set_position((1, 0))
    sub = Subscriber("sse", ["public"], maxsize=100)
    hub.add(sub)
    waiting = asyncio.create_task(sub.wait(5.0))
    await asyncio.sleep(0)
    alarm = sub._bell._alarm
    assert alarm is not None
    for n in range(2, 12):  # ten deliveries, each followed by a wait with a later deadline
        hub.publish([Event(f"{n}-0", "tick", {}, ("public",), n)])
        await waiting
        assert len(sub.drain()) == 1
        waiting = asyncio.create_task(sub.wait(5.0))
        await asyncio.sleep(0)
        assert sub._bell._alarm is alarm
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    started = time.monotonic()
    await sub.wait(0.05)  # sooner than the armed alarm: re-armed, and it rings
    assert 0.04 <= time.monotonic() - started < 1.0
    assert sub._bell._alarm is None
    waiting = asyncio.create_task(sub.wait(3.0))
    await asyncio.sleep(0)
    armed = sub._bell._alarm
    assert armed is not None
    waiting.cancel()
    hub.remove(sub)  # a subscriber that leaves takes its alarm with it
    assert sub._bell._alarm is None and armed.cancelled()


def test_full_collections_freeze_what_they_keep_and_thaw_on_schedule() -> None:
    """Survivors of a full pass are frozen (later passes skip them), frozen objects are
    still freed by reference counting, and a due refresh thaws them for one full scan."""
    collector = FreezeAfterFullCollections(refresh=3600)
    before = gc.get_threshold()
    collector.install()
    try:
        assert gc.get_threshold() == THRESHOLDS  # full passes often, while they are small
        baseline = gc.get_freeze_count()
        kept = [[n] for n in range(20_000)]  # a connection's worth of lists, times many
        gc.collect()
        assert gc.get_freeze_count() >= baseline + 20_000
        del kept  # no cycles: reference counting frees them although they are frozen
        assert gc.get_freeze_count() < baseline + 1_000
        collector.thawed_at -= 3600  # the refresh is due
        gc.collect()
        assert gc.get_freeze_count() == 0 and collector.thawed  # the next pass scans all
        gc.collect()
        assert gc.get_freeze_count() > 0 and not collector.thawed
    finally:
        collector.uninstall()
    assert gc.get_freeze_count() == 0
    assert collector._on_collection not in gc.callbacks
    assert gc.get_threshold() == before


@pytest.mark.timeout(120)
async def test_closed_connections_leave_no_frozen_objects_behind(
        dualcast: Callable[..., DualcastProcess]) -> None:
    """Real WebSocket connections frozen by a full pass are freed when they close."""
    server = dualcast(env={"DUALCAST_MAX_CONNECTIONS_PER_ADDRESS": "0"})  # thousands, one address

    async def frozen() -> int:
        return int(await metric(server, "dualcast_gc_frozen_objects"))

    before = await frozen()
    conns: list[websockets.ClientConnection] = []
    try:
        # Enough connections that the growth rule runs full passes while they are open.
        deadline = time.monotonic() + 60
        while await frozen() < before + 20_000:
            assert len(conns) < 3_000 and time.monotonic() < deadline, (
                f"no full collection froze the connections ({await frozen()} frozen)")
            for _ in range(100):
                conns.append(await websockets.connect(server.ws_url + "/api/ws"))
        for conn in conns[-100:]:
            assert orjson.loads(await conn.recv())["type"] == "welcome"
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    deadline = time.monotonic() + 30
    while (now := await frozen()) > before + 5_000:
        assert time.monotonic() < deadline, f"{now - before} objects still frozen after close"
        await asyncio.sleep(0.2)


@pytest.mark.timeout(60)
async def test_an_sse_client_dropped_for_not_reading_is_not_logged_as_an_error(
        dualcast: Callable[..., DualcastProcess]) -> None:
    """The stall watch ends such a stream without its last write (it could never be
    read); uvicorn's "returned without completing response" error is ours, not a bug."""
    server = dualcast(env={"DUALCAST_PING_INTERVAL": "1", "DUALCAST_LOG_LEVEL": "info"})
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", server.port))
    stuck.sendall(b"GET /api/sse HTTP/1.1\r\nHost: dualcast\r\n\r\n")  # and never reads
    try:
        headers = {"Authorization": "Bearer " + token("p", publish=True)}
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            for n in range(300):  # ~18 MB: more than the socket buffers hold
                answer = await http.post("/api/publish", headers=headers,
                                         json={"event": "big", "data": {"n": n, "pad": "x" * 60_000}})
                assert answer.status_code == 202
        deadline = time.monotonic() + 30
        while "dropped 1 clients that stopped reading" not in server.log():
            assert time.monotonic() < deadline, "the stall watch did not drop the client"
            await asyncio.sleep(0.2)


        def read_to_the_end() -> None:
            stuck.settimeout(20)
            while stuck.recv(1 << 20):
                pass

        # The server has closed the connection (uvicorn does so right after its log
        # line) once what it had buffered is read and the socket ends.
        await asyncio.wait_for(asyncio.to_thread(read_to_the_end), 25)
    finally:
        stuck.close()
    problems = [line for line in server.log().splitlines()
                if "ERROR" in line or "without completing" in line or "Traceback" in line]
    assert problems == []


def test_the_running_loop_is_found_again_when_it_changes() -> None:
    """`running_loop` keeps the loop it found, and is right across loops and threads."""
    with pytest.raises(RuntimeError):
        running_loop()

    async def found() -> bool:
        return running_loop() is asyncio.get_running_loop() is running_loop()

    assert asyncio.run(found())
    assert asyncio.run(found())  # a new loop in the same thread, the old one closed
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(asyncio.run, found()).result(timeout=10)
    with pytest.raises(RuntimeError):
        running_loop()  # the last loop found here is not running any more
