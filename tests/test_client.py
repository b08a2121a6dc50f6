"""dualcast.client.subscribe against real dualcast processes: each transport forced,
resume and reset, token refresh, refusals, a server restart, and cleanup.

The fallback through real nginx fault configs and `dualcast tail` as a subprocess
are in tests/test_client_proxy.py.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from dualcast.client import (
    AuthFailed,
    Event,
    Refused,
    Reset,
    ServerError,
    State,
    Status,
    Subscription,
    Timing,
    Transport,
    bases,
    subscribe,
)
from dualcast.client.connections import sse_event
from dualcast.client.model import id_key, is_after
from dualcast.client.sse import Lines, Message, SSEParser
from dualcast.client.tokens import MIN_REFRESH, Tokens, expiry, refresh_in
from tests.conftest import token as mint
from tests.harness.waits import wait_until

pytestmark = pytest.mark.timeout(90)

#: Short timers so a fallback or a reconnect takes a second, not a minute.
FAST = Timing(welcome=3.0, retry_base=0.1, retry_cap=1.0, climb_base=0.3, climb_cap=1.0)
FORCED = [Transport.WEBSOCKET, Transport.SSE, Transport.POLLING]


# ---- helpers ------------------------------------------------------------------------------


async def until(condition: Callable[[], object], timeout: float = 15.0, what: str = "") -> None:
    """Wait for a condition with a deadline (no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.02)


async def publish(base: str, event: str, data: Any, rooms: list[str] | None = None) -> str:
    """POST /api/publish as a producer would; returns the entry id."""
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            base + "/api/publish", json={"event": event, "data": data, "rooms": rooms or []},
            headers={"Authorization": f"Bearer {mint('producer', publish=True)}"})
    assert response.status_code == 202, response.text
    entry_id: str = response.json()["id"]
    return entry_id


@dataclass
class Watch:
    """What a subscriber's user sees: items in order, status changes, server errors."""

    items: list[Event | Reset] = field(default_factory=list)
    statuses: list[Status] = field(default_factory=list)
    errors: list[ServerError] = field(default_factory=list)
    failure: BaseException | None = None
    done: bool = False

    @property
    def ids(self) -> list[str]:
        return [item.id for item in self.items if isinstance(item, Event)]

    def live_on(self, transport: Transport) -> bool:
        return bool(self.statuses) and self.statuses[-1] == Status(transport, State.LIVE)


@asynccontextmanager
async def watching(url: str, **options: Any) -> AsyncIterator[tuple[Watch, Subscription]]:
    """Subscribe and collect in a background task for the duration of the block."""
    watch = Watch()
    options.setdefault("timing", FAST)
    async with subscribe(url, on_status=watch.statuses.append, on_error=watch.errors.append,
                         **options) as events:

        async def collect() -> None:
            try:
                async for item in events:
                    watch.items.append(item)
            except Exception as exc:
                watch.failure = exc
            finally:
                watch.done = True

        task = asyncio.create_task(collect())
        try:
            yield watch, events
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# ---- pieces without a server -------------------------------------------------------------


async def test_each_kind_of_token_source_answers() -> None:
    """A plain function runs in a thread (it may block); an async one, an object with an
    async `__call__`, and a plain function returning a coroutine run on the loop."""
    import threading

    here = threading.get_ident()
    seen: dict[str, int] = {}

    def plain() -> str:
        seen["plain"] = threading.get_ident()
        return "t-plain"

    async def coroutine() -> str:
        seen["async"] = threading.get_ident()
        return "t-async"

    class Source:
        async def __call__(self) -> str:
            seen["object"] = threading.get_ident()
            return "t-object"

    async def later() -> str:
        seen["returned"] = threading.get_ident()
        return "t-returned"

    async with asyncio.timeout(10):
        assert await Tokens(plain).refresh() == "t-plain"
        assert await Tokens(coroutine).refresh() == "t-async"
        assert await Tokens(Source()).refresh() == "t-object"
        assert await Tokens(lambda: later()).refresh() == "t-returned"
        with pytest.raises(ZeroDivisionError):
            await Tokens(lambda: str(1 / 0)).refresh()
    assert seen["plain"] != here
    assert seen["async"] == seen["object"] == seen["returned"] == here


async def test_a_plain_token_function_that_raises_stop_iteration_fails_at_once() -> None:
    """`token=lambda: next(tokens)` with the iterator spent: the function failed in its
    thread, but a future cannot take StopIteration, so the failure was lost (an
    "Exception in callback" on the loop) and the call was said to have "not answered
    within 10 s", ten seconds later. It fails at once, as what it is."""
    spent: Any = iter(())
    source = Tokens(lambda: next(spent), timeout=30)
    async with asyncio.timeout(5):
        with pytest.raises(RuntimeError, match="StopIteration"):
            await source.refresh()


def test_sse_parser_follows_the_event_stream_rules() -> None:
    parser = SSEParser()
    lines = ["retry: 3000", "event: welcome", 'data: {"last_id":"1-0"}', "",
             ": ping", "", "id: 5-1", "event: x", "data:{\"a\":", "data: 1}", "",
             "id: bad\0id", "data: plain", ""]
    got = [m for m in (parser.line(line) for line in lines) if m is not None]
    assert got == [
        Message(None, "welcome", '{"last_id":"1-0"}'),
        Message("5-1", "x", '{"a":\n1}'),
        Message(None, "message", "plain"),  # an id with NUL is ignored
    ]


def test_sse_lines_end_only_at_cr_lf_or_crlf_across_chunks() -> None:
    lines = Lines()
    chunks = ["data: one\u2028two\u2029three\x85four\r", "\nid: 1", "-0\r", "\n\r",
              "\n", "\n", "data: x\ry\nda", "ta: z"]
    got = [line for chunk in chunks for line in lines.feed(chunk)]
    assert got == ["data: one\u2028two\u2029three\x85four", "id: 1-0", "", "", "data: x", "y"]
    assert lines.feed("\n") == ["data: z"]


def testsse_events_are_read_named_or_as_whole_unnamed_messages() -> None:
    named = sse_event(Message("5-1", "deploy", '{"v": 2}'))
    assert named == Event("5-1", "deploy", {"v": 2}, None)  # a server without events=message
    whole = sse_event(Message("5-1", "message",
                               '{"id":"5-1","event":"deploy","data":{"v":2},"ts":17}'))
    assert whole == Event("5-1", "deploy", {"v": 2}, 17)
    # An event really named "message" whose data is not the whole event stays as it is.
    own = sse_event(Message("5-2", "message", '{"id":"other","event":"x"}'))
    assert own == Event("5-2", "message", {"id": "other", "event": "x"}, None)
    assert sse_event(Message("5-3", "raw", "not json")).data == "not json"


def test_ids_compare_as_stream_ids_not_strings() -> None:
    assert id_key("1732550000000-12") == (1732550000000, 12)
    assert id_key("7") == (7, 0)
    assert id_key("x-1") is None
    assert is_after("10-0", "9-5")      # as strings "10-0" < "9-5"
    assert is_after("9-10", "9-9")
    assert not is_after("9-9", "9-9")
    assert is_after("0-1", None)
    assert not is_after("junk", None)


def test_token_expiry_is_read_from_the_jwt_and_refreshed_before_it() -> None:
    now = time.time()
    jwt = mint("exp-test", ttl=300)
    exp = expiry(jwt)
    assert exp is not None and abs(exp - (now + 300)) < 5
    assert refresh_in(jwt, now=exp - 300) == pytest.approx(240)   # a minute before
    assert refresh_in(jwt, now=exp - 10) == pytest.approx(8)      # a fifth before
    # Never sooner than a second, even for a token already expired (no busy loop).
    assert refresh_in(jwt, now=exp + 5) == MIN_REFRESH == 1.0
    assert expiry("opaque-session-token") is None
    unsigned = "x." + base64.urlsafe_b64encode(b'{"exp":"soon"}').decode().rstrip("=") + ".y"
    assert expiry(unsigned) is None


async def test_a_single_string_for_rooms_or_transports_is_refused_not_split() -> None:
    with pytest.raises(ValueError, match="rooms must be a list of room names, not a single"):
        async with subscribe("http://127.0.0.1:9", rooms="ops"):
            pass
    with pytest.raises(ValueError, match="transports must be a list of transport names"):
        async with subscribe("http://127.0.0.1:9", transports="websocket"):
            pass
    with pytest.raises(ValueError, match="unknown transport 'pigeon': name websocket, sse"):
        async with subscribe("http://127.0.0.1:9", transports=["sse", "pigeon"]):
            pass


@pytest.mark.parametrize("rooms", [[""], ["ops", " "], ["ops,admin"]])
async def test_a_room_that_is_no_name_is_refused_before_connecting(rooms: list[str]) -> None:
    """`rooms=[""]` (a name that came out empty) asked for no room at all, which is every
    room the token allows; "ops,admin" was two rooms, not the one named."""
    with pytest.raises(ValueError, match="is no room name"):
        async with subscribe("http://127.0.0.1:9", rooms=rooms):
            pass


def test_server_urls() -> None:
    assert bases("http://127.0.0.1:8000/") == ("http://127.0.0.1:8000", "ws://127.0.0.1:8000")
    assert bases("wss://push.example.com/rt") == ("https://push.example.com/rt",
                                                  "wss://push.example.com/rt")
    with pytest.raises(ValueError):
        bases("127.0.0.1:8000")


def test_dualcast_tail_refuses_the_dashboard_link_instead_of_dropping_its_token() -> None:
    """`dualcast serve` prints an admin link, `http://host:port/?token=…`: pasted into
    `tail`, its token was dropped without a word and the stream read anonymously."""
    import subprocess
    import sys

    from tests.harness.procs import ROOT

    link = f"http://127.0.0.1:9/?token={mint('admin', admin=True)}"
    with pytest.raises(ValueError, match="no query or fragment: give the token with token="):
        bases(link)
    with pytest.raises(ValueError, match="no query or fragment"):
        bases("http://127.0.0.1:9/push#top")
    result = subprocess.run([sys.executable, "-m", "dualcast", "tail", link],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "dualcast tail: a dualcast server URL has no query or fragment: give the token with "
        "token= (dualcast tail: --token or DUALCAST_TOKEN), not in the URL "
        "http://127.0.0.1:9/\n")


@pytest.mark.parametrize("cursor", ["yesterday", "\u0661\u0667-0", "5-0\n", "\uff15"])
async def test_a_cursor_that_is_not_an_id_is_refused_before_connecting(cursor: str) -> None:
    """Other scripts' digits and a trailing newline passed the client's check (the
    server then refused them, or read them as another id)."""
    with pytest.raises(ValueError, match="stream id"):
        async with subscribe("http://127.0.0.1:9", last_event_id=cursor):
            pass


@pytest.mark.parametrize(("option", "error"), [
    ({"token": b"eyJ.a.b"}, TypeError),   # bytes (PyJWT 1's tokens): it went anonymous
    ({"token": 12345}, TypeError),
    ({"buffer": 0}, ValueError),          # asyncio.Queue(0): no bound at all
    ({"buffer": -1}, ValueError),
    ({"buffer": 2.5}, ValueError),
])
async def test_options_that_would_be_ignored_are_refused_before_connecting(
    option: dict[str, Any], error: type[Exception],
) -> None:
    with pytest.raises(error, match=r"token must be a string|buffer must be"):
        async with subscribe("http://127.0.0.1:9", **option):
            pass


def test_dualcast_tail_says_what_is_wrong_with_its_arguments() -> None:
    import subprocess
    import sys

    from tests.harness.procs import ROOT

    result = subprocess.run(
        [sys.executable, "-m", "dualcast", "tail", "http://127.0.0.1:9", "--last-event-id", "x"],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "stream id" in result.stderr and "Traceback" not in result.stderr


def test_dualcast_tail_with_nothing_at_the_address_says_why_it_is_offline(
        tmp_path: Path) -> None:
    """A mistyped port: `dualcast tail` said "websocket offline" over and over, and never
    why; the offline line now carries the reason (nothing listens there)."""
    import signal
    import subprocess
    import sys

    from tests.harness.procs import ROOT, free_port

    log_path = tmp_path / "tail.log"
    with log_path.open("wb") as log:
        tail = subprocess.Popen([sys.executable, "-m", "dualcast", "tail",
                                 f"http://127.0.0.1:{free_port()}"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        line = wait_until(lambda: next((x for x in log_path.read_text().splitlines()
                                        if " offline" in x), None),
                          timeout=30, what="the offline line")
    finally:
        tail.send_signal(signal.SIGINT)
        assert tail.wait(15) == 0
    assert line.startswith("dualcast tail: websocket offline (ConnectionRefusedError: "), line


# ---- against a real server ---------------------------------------------------------------


@pytest.fixture
def server(redis_server: Any, dualcast: Callable[..., Any]) -> Any:
    return dualcast(redis_server.url)


@pytest.mark.parametrize("transport", FORCED)
async def test_each_transport_delivers_every_event_once_in_order(
    server: Any, transport: Transport
) -> None:
    before = [await publish(server.url, "before", {"n": n}) for n in range(3)]
    async with watching(server.url, transports=[transport],
                        last_event_id=before[0]) as (watch, events):
        await until(lambda: watch.live_on(transport), what=f"live on {transport}")
        after = [await publish(server.url, "after", {"n": n, "text": "é"}) for n in range(5)]
        expected = before[1:] + after
        await until(lambda: len(watch.ids) >= len(expected), what="every event")
        assert watch.ids == expected
        assert events.last_event_id == expected[-1]
        last = watch.items[-1]
        assert isinstance(last, Event)
        assert (last.event, last.data) == ("after", {"n": 4, "text": "é"})
        assert isinstance(last.ts, int) and last.ts > 1_700_000_000_000  # SSE too
        assert watch.failure is None and not watch.errors


@pytest.mark.parametrize("transport", FORCED)
async def test_data_with_unicode_line_separators_arrives_intact(
    server: Any, transport: Transport
) -> None:
    # Legal unescaped in JSON, and sent so: an SSE line ends only at CR or LF.
    data = {"text": "line one\u2028line two\u2029three", "nel": "a\x85b"}
    async with watching(server.url, transports=[transport]) as (watch, _):
        await until(lambda: watch.live_on(transport), what=f"live on {transport}")
        sent = await publish(server.url, "note", data)
        await until(lambda: sent in watch.ids, what="the event")
        last = watch.items[-1]
        assert isinstance(last, Event)
        assert (last.id, last.event, last.data) == (sent, "note", data)
        assert watch.failure is None and not watch.errors


@pytest.mark.parametrize("transport", FORCED)
async def test_rooms_decide_what_arrives(server: Any, transport: Transport) -> None:
    async with watching(server.url, transports=[transport], rooms=["ops"],
                        token=mint("u1", rooms=["ops"])) as (watch, _):
        await until(lambda: watch.live_on(transport))
        public = await publish(server.url, "public", 1)
        await publish(server.url, "secret", 2, rooms=["finance"])
        ops = await publish(server.url, "ops", 3, rooms=["ops"])
        mine = await publish(server.url, "direct", 4, rooms=["user-u1"])  # not joined
        last = await publish(server.url, "public", 5)
        await until(lambda: last in watch.ids)
        assert watch.ids == [public, ops, last]
        assert mine not in watch.ids


@pytest.mark.parametrize("transport", FORCED)
async def test_a_cursor_the_stream_does_not_hold_comes_out_as_a_reset_marker(
    server: Any, transport: Transport
) -> None:
    head = await publish(server.url, "head", 0)
    future = f"{int(head.split('-')[0]) + 10**9}-0"  # newer than the stream
    async with watching(server.url, transports=[transport],
                        last_event_id=future) as (watch, events):
        await until(lambda: any(isinstance(i, Reset) for i in watch.items), what="reset")
        reset = watch.items[0]
        assert isinstance(reset, Reset) and reset.last_id is not None
        fresh = await publish(server.url, "after-reset", 1)
        await until(lambda: fresh in watch.ids, what="the event after the reset")
        assert watch.ids == [fresh]
        assert events.last_event_id == fresh


@pytest.mark.parametrize("transport", FORCED)
async def test_when_no_room_asked_for_may_be_joined_it_raises_refused(
    server: Any, transport: Transport
) -> None:
    async with watching(server.url, transports=[transport], rooms=["finance", "hr"],
                        token=mint("u2", rooms=["ops"])) as (watch, _):
        await until(lambda: watch.done, what="the iteration to end")
    assert isinstance(watch.failure, Refused) and not isinstance(watch.failure, AuthFailed)
    assert watch.failure.code == "forbidden_room"


@pytest.mark.parametrize("transport", FORCED)
async def test_a_forbidden_room_is_reported_once_and_the_allowed_ones_kept(
    server: Any, transport: Transport
) -> None:
    async with watching(server.url, transports=[transport], rooms=["finance", "ops", "hr"],
                        token=mint("u3", rooms=["ops"])) as (watch, _):
        await until(lambda: watch.live_on(transport))
        ops = await publish(server.url, "ops", 1, rooms=["ops"])
        await until(lambda: ops in watch.ids)
        assert {(e.code, e.message) for e in watch.errors} == {
            ("forbidden_room", "not allowed in room 'finance'"),
            ("forbidden_room", "not allowed in room 'hr'")}
        assert len(watch.errors) == 2 and watch.failure is None


async def test_after_a_fallback_a_forbidden_room_is_not_asked_for_again(
    redis_server: Any, dualcast: Callable[..., Any]
) -> None:
    """Refused on WebSocket (an `error`, the rest kept), the room must not come back
    when the client falls back to SSE: there it would refuse the whole request."""
    first = dualcast(redis_server.url)
    async with watching(first.url, rooms=["ops", "finance"],
                        token=mint("u4", rooms=["ops"])) as (watch, _):
        await until(lambda: watch.live_on(Transport.WEBSOCKET) and watch.errors)
        before = await publish(first.url, "ops", 1, rooms=["ops"])
        await until(lambda: before in watch.ids)
        await asyncio.to_thread(first.kill)
        # The same port, without WebSocket now (a proxy that starts blocking upgrades).
        second = await asyncio.to_thread(dualcast, redis_server.url, port=first.port,
                                         env={"DUALCAST_TRANSPORTS": "sse,polling"})
        after = await publish(second.url, "ops", 2, rooms=["ops"])
        await until(lambda: after in watch.ids or watch.done, what="the event after the fallback")
        assert watch.failure is None
        assert watch.ids[-2:] == [before, after] and watch.live_on(Transport.SSE)
        assert [e.code for e in watch.errors] == ["forbidden_room"]  # once, not per connect


@pytest.mark.parametrize("transport", FORCED)
async def test_an_expired_token_without_a_source_raises_auth_failed(
    server: Any, transport: Transport
) -> None:
    async with watching(server.url, transports=[transport],
                        token=mint("short", ttl=2)) as (watch, _):
        await until(lambda: watch.done, timeout=20, what="the iteration to end")
    assert isinstance(watch.failure, AuthFailed), watch.failure
    assert watch.failure.code == "token_expired"


@pytest.mark.parametrize("transport", FORCED)
async def test_a_token_source_is_called_again_before_expiry_and_nothing_is_lost(
    server: Any, transport: Transport
) -> None:
    minted: list[float] = []

    async def fresh_token() -> str:
        minted.append(time.monotonic())
        return mint("refresher", ttl=3)

    async with watching(server.url, transports=[transport], token=fresh_token) as (watch, _):
        await until(lambda: watch.live_on(transport))
        published: list[str] = []
        started = time.monotonic()
        while time.monotonic() - started < 7:  # past two expiries of a 3 s token
            published.append(await publish(server.url, "tick", len(published)))
            await until(lambda: published[-1] in watch.ids, what=f"event {len(published)}")
        assert watch.ids == published
        assert len(minted) >= 3, minted
        assert watch.failure is None


@pytest.mark.parametrize("transport", FORCED)
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_token_source_that_gives_an_expired_token_ends_in_auth_failed(
    server: Any, transport: Transport, kind: str
) -> None:
    """A source handing out a stale token (a backend cache, a skewed clock) is asked
    once more, then the iteration ends: no busy loop, and no blocked event loop for a
    plain function."""
    expired = mint("stale", ttl=-5)
    calls: list[float] = []

    def stale() -> str:
        calls.append(time.monotonic())
        return expired

    async def stale_async() -> str:
        return stale()

    source = stale if kind == "sync" else stale_async
    async with watching(server.url, transports=[transport], token=source) as (watch, _):
        await until(lambda: watch.done, what="the iteration to end")
    assert isinstance(watch.failure, AuthFailed), watch.failure
    assert watch.failure.code == "token_expired"
    assert len(calls) == 2, calls


@pytest.mark.parametrize("when", ["at the start", "at a refresh"])
async def test_a_token_source_that_never_answers_ends_in_auth_failed(
    server: Any, when: str
) -> None:
    """An async token source that hangs (a token service that never answers) froze the
    subscription for ever, at the start or at a refresh; each call is now bounded by
    `Timing.token`, and then it fails as a source that raised does."""
    calls: list[float] = []
    answered = asyncio.Event()

    async def hanging() -> str:
        calls.append(time.monotonic())
        if when == "at a refresh" and len(calls) == 1:
            return mint("hangs-later", ttl=2)
        await answered.wait()  # never set
        return "never"

    timing = replace(FAST, token=0.5)
    started = time.monotonic()
    async with watching(server.url, transports=["websocket"], token=hanging,
                        timing=timing) as (watch, _):
        await until(lambda: watch.done, timeout=20, what="the iteration to end")
    assert isinstance(watch.failure, AuthFailed), watch.failure
    assert "the token source failed: it did not answer within 0.5 s" in str(watch.failure)
    if when == "at the start":
        assert time.monotonic() - started < 5
        assert len(calls) == 1


@pytest.mark.parametrize("when", ["at the start", "at a refresh"])
async def test_a_plain_token_function_that_blocks_fails_as_an_async_one_does(
    server: Any, when: str
) -> None:
    """A plain token function that blocks (a synchronous HTTP call to a token service
    that never answers) ran on the event loop: it froze everything on it, this
    subscription and every other task, for as long as it blocked, past `Timing.token`.
    It runs in a thread now: it fails after `Timing.token` as an async one does, and the
    event loop keeps running meanwhile."""
    import threading

    calls: list[float] = []
    released = threading.Event()

    def blocking() -> str:
        calls.append(time.monotonic())
        if when == "at a refresh" and len(calls) == 1:
            return mint("blocks-later", ttl=2)
        released.wait(5)  # (set when the test ends)
        return "never"

    ticks: list[float] = []

    async def heartbeat() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.05)

    beating = asyncio.create_task(heartbeat())
    timing = replace(FAST, token=0.5)
    try:
        async with watching(server.url, transports=["websocket"], token=blocking,
                            timing=timing) as (watch, _):
            await until(lambda: watch.done, timeout=20, what="the iteration to end")
        assert isinstance(watch.failure, AuthFailed), watch.failure
        assert "the token source failed: it did not answer within 0.5 s" in str(
            watch.failure)
        blocked_from = calls[-1]
        during = [t for t in ticks if t >= blocked_from]
        assert len(during) >= 5, during  # the loop ran while the function blocked
        assert max(b - a for a, b in itertools.pairwise(during)) < 0.4
    finally:
        released.set()
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)


async def test_leaving_the_block_closes_the_connection_even_on_error(server: Any) -> None:
    def open_websockets() -> float:
        text = httpx.get(server.url + "/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith('dualcast_connections{transport="websocket"}'):
                return float(line.split()[-1])
        return 0.0

    with pytest.raises(RuntimeError, match="the app failed"):
        async with subscribe(server.url, transports=["websocket"], timing=FAST) as events:
            await until(lambda: events.state is State.LIVE)
            assert open_websockets() == 1
            raise RuntimeError("the app failed")
    await until(lambda: open_websockets() == 0, what="the server to see the close")


def test_dualcast_tail_at_a_path_with_no_dualcast_server_says_so_and_exits(server: Any) -> None:
    import subprocess
    import sys

    from tests.harness.procs import ROOT

    result = subprocess.run(
        [sys.executable, "-m", "dualcast", "tail", server.url + "/nope"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout == ""
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"dualcast tail: refused: not_found: no dualcast server at "
                           f"{server.url}/nope (")
    assert "HTTP 404 on /api/sse" in last and "HTTP 404 on /api/events" in last
    assert "Traceback" not in result.stderr


def test_dualcast_tail_without_a_token_says_none_was_given(server: Any) -> None:
    """The README's `dualcast tail URL --token "$TOKEN" --rooms ops` with TOKEN unset read
    anonymously and said only "none of the rooms asked for may be joined (ops)"."""
    import subprocess
    import sys

    from tests.harness.procs import ROOT, clean_env

    result = subprocess.run(
        [sys.executable, "-m", "dualcast", "tail", server.url, "--token", "", "--rooms", "ops"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (1, "")
    last = result.stderr.splitlines()[-1]
    assert last.startswith("dualcast tail: refused: forbidden_room: "), result.stderr
    assert last.endswith("(no token was given: pass --token or set DUALCAST_TOKEN; "
                         "without one only public events)"), last
    given = subprocess.run(  # with a token, the refusal is the room's alone
        [sys.executable, "-m", "dualcast", "tail", server.url, "--token", mint("bob"),
         "--rooms", "ops"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert given.returncode == 1 and "no token was given" not in given.stderr, given.stderr


# ---- a server restart ------------------------------------------------------------------


@pytest.mark.parametrize("transport", [None, Transport.SSE, Transport.POLLING])
async def test_a_server_restart_loses_nothing_and_repeats_nothing(
    fresh_redis: Any, dualcast: Callable[..., Any], transport: Transport | None
) -> None:
    """Events are appended to Redis the whole time; the dualcast process is killed
    (SIGKILL) and started again on the same port while the subscriber keeps going."""
    instance = dualcast(fresh_redis.url)
    stream = aioredis.from_url(fresh_redis.url, decode_responses=True)
    published: list[str] = []

    async def produce(count: int) -> None:
        for n in range(count):
            body = json.dumps({"event": "tick", "data": {"n": len(published)}})
            published.append(await stream.xadd(
                "websocket-broadcast",
                {"data": body, "timestamp": str(int(time.time() * 1000))}))
            if n % 5 == 4:
                await asyncio.sleep(0.05)  # a steady producer, not a burst

    options: dict[str, Any] = {"last_event_id": "0"}
    if transport is not None:
        options["transports"] = [transport]
    try:
        async with watching(instance.url, **options) as (watch, _):
            expect = transport or Transport.WEBSOCKET
            await until(lambda: watch.live_on(expect), what=f"live on {expect}")
            await produce(40)
            await until(lambda: len(watch.ids) >= 10, what="the first events")
            await asyncio.to_thread(instance.kill)
            await produce(40)                    # while nobody serves
            await asyncio.to_thread(instance.start)
            await produce(40)
            await until(lambda: len(watch.ids) >= len(published), timeout=30,
                        what=f"all {len(published)} events (have {len(watch.ids)})")
            assert watch.ids == published
            assert watch.failure is None
            # It went down and came back (a status other than live in between).
            lives = [s for s in watch.statuses if s.state is State.LIVE]
            assert len(lives) >= 2, watch.statuses
    finally:
        await stream.aclose()


async def test_polls_adapt_to_a_server_whose_longest_wait_is_shorter(
    redis_server: Any, dualcast: Callable[..., Any]
) -> None:
    server = dualcast(redis_server.url, env={"DUALCAST_POLL_TIMEOUT_MAX": "4"})
    async with watching(server.url, transports=["polling"],
                        timing=Timing(poll=25, retry_base=0.1, retry_cap=1.0)) as (watch, _):
        await until(lambda: watch.live_on(Transport.POLLING))
        published: list[str] = []
        for n in range(6):  # a few seconds: several long polls at the server's limit
            published.append(await publish(server.url, "tick", n))
            await until(lambda: published[-1] in watch.ids, what=f"event {n}")
            await asyncio.sleep(0.5)  # a producer's pace, so polls wait in between
        assert watch.ids == published
        # One connection the whole time: no poll was refused and reconnected.
        assert watch.statuses == [Status(Transport.POLLING, State.CONNECTING),
                                  Status(Transport.POLLING, State.LIVE)]


async def test_a_replay_larger_than_64_mib_arrives_on_a_websocket(
    fresh_redis: Any, dualcast: Callable[..., Any]
) -> None:
    """Events of 1 MiB each go out as frames over 1 MiB (batches were once larger still: a
    replay page of them was one frame of 80 MiB). A browser takes a frame of any size;
    the client must too, else it closes the connection (1009), reconnects from the same
    cursor, and never gets further."""
    instance = dualcast(fresh_redis.url)
    stream = aioredis.from_url(fresh_redis.url)
    try:
        blob = "x" * (1 << 20)
        async with stream.pipeline(transaction=False) as pipe:
            for n in range(80):
                body = json.dumps({"event": "big", "data": {"n": n, "blob": blob}})
                pipe.xadd("websocket-broadcast",
                          {"data": body, "timestamp": str(int(time.time() * 1000))})
            published = [entry.decode() for entry in await pipe.execute()]
    finally:
        await stream.aclose()
    async with watching(instance.url, transports=[Transport.WEBSOCKET],
                        last_event_id="0") as (watch, _):
        await until(lambda: len(watch.ids) >= len(published) or watch.done, timeout=40,
                    what=f"the 80 events (have {len(watch.ids)})")
        assert watch.ids == published and watch.failure is None
        last = watch.items[-1]
        assert isinstance(last, Event) and last.data == {"n": 79, "blob": blob}
        # One connection: it never had to reconnect.
        assert watch.statuses == [Status(Transport.WEBSOCKET, State.CONNECTING),
                                  Status(Transport.WEBSOCKET, State.LIVE)]


async def test_dualcast_tail_prints_every_event_whatever_stdout_can_encode(server: Any) -> None:
    """A terminal in a Latin-1 (or ASCII) locale cannot show 日本: the line goes out with
    JSON's \\u escapes (the same object), not an encoding error that ends the command."""
    import os
    import signal
    import sys

    from tests.harness.procs import ROOT

    marker = await publish(server.url, "marker", 0)
    data = [{"text": "日本 €"}, None, {"text": "ASCII"}]
    published = [await publish(server.url, "note", item) for item in data]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALCAST_")}
    env["PYTHONIOENCODING"] = "latin-1"
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dualcast", "tail", server.url, "--last-event-id", marker,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert tail.stdout is not None and tail.stderr is not None
        lines = []
        async with asyncio.timeout(30):
            while len(lines) < len(published) and (line := await tail.stdout.readline()):
                lines.append(json.loads(line.decode("latin-1")))
        assert [(line["id"], line["data"]) for line in lines] == list(zip(published, data, strict=True))
        tail.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            await tail.wait()
            errors = (await tail.stderr.read()).decode()
        assert tail.returncode == 0, errors
        assert "codec" not in errors and "Traceback" not in errors, errors
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()


@asynccontextmanager
async def answering(head: Callable[[str], str], body: bytes = b"") -> AsyncIterator[str]:
    """A web server that answers every request alike: `head(target)` is its status line
    and headers; yields its URL."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            target = request.split(b" ", 2)[1].decode()
            writer.write(f"{head(target)}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    front = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{front.sockets[0].getsockname()[1]}"
    finally:
        front.close()
        await front.wait_closed()


def redirecting(to: str) -> Any:
    """A front that redirects every request to the same path and query at `to` (as
    nginx sends http:// to https://)."""
    return answering(lambda target: f"HTTP/1.1 301 Moved Permanently\r\nLocation: {to}{target}")


@pytest.mark.parametrize(("transports", "lands_on"), [
    # The WebSocket refused an http(s) Location as no WebSocket URI and fell back to SSE.
    (FORCED, Transport.WEBSOCKET),
    ([Transport.SSE], Transport.SSE),
    ([Transport.POLLING], Transport.POLLING),
])
async def test_a_server_url_that_redirects_is_followed(
    server: Any, transports: list[Transport], lands_on: Transport
) -> None:
    """A front that redirects (nginx's http:// to https://, a moved path) is followed by
    every transport, the WebSocket included."""
    marker = await publish(server.url, "marker", 0)
    async with redirecting(server.url) as front, watching(
            front, transports=transports, last_event_id=marker) as (watch, _):
        await until(lambda: watch.live_on(lands_on) or watch.done, what=f"live on {lands_on}")
        published = [await publish(server.url, "tick", n) for n in range(3)]
        await until(lambda: len(watch.ids) >= len(published) or watch.done, what="the events")
        assert watch.ids == published and watch.failure is None


async def test_a_redirect_to_https_is_followed_by_the_websocket_with_the_ca_given(
    server: Any, tmp_path: Path
) -> None:
    """http:// redirected to https:// (as nginx does): the WebSocket follows it to
    wss:// and verifies that hop with the subscription's own TLS context."""
    port = int(server.url.rsplit(":", 1)[1])
    async with tls_in_front(port, tmp_path) as (https, files), redirecting(https) as front:
        marker = await publish(server.url, "marker", 0)
        async with watching(front, transports=[Transport.WEBSOCKET], tls=str(files.ca),
                            last_event_id=marker) as (watch, _):
            await until(lambda: watch.live_on(Transport.WEBSOCKET) or watch.done, what="live")
            sent = await publish(server.url, "tick", 1)
            await until(lambda: sent in watch.ids or watch.done, what="the event")
    assert watch.ids == [sent] and watch.failure is None


async def test_a_redirect_loop_is_followed_a_bounded_number_of_times() -> None:
    """A front that redirects to itself: each transport gives up after a bounded number
    of hops and says why, rather than following it for ever."""
    hops: list[str] = []

    def again(target: str) -> str:
        hops.append(target)
        return f"HTTP/1.1 302 Found\r\nLocation: {target}"

    async with answering(again) as front, watching(front, transports=[Transport.WEBSOCKET]) \
            as (watch, _):
        await until(lambda: any(s.state is State.OFFLINE for s in watch.statuses),
                    what="offline")
    reasons = [s.reason or "" for s in watch.statuses if s.state is State.OFFLINE]
    assert "redirects" in reasons[0], reasons
    assert 10 <= len(hops) <= 40  # two tries of at most 10 hops each (and a third begun)


def test_an_upgrade_to_tls_of_the_same_host_keeps_the_token() -> None:
    """As httpx judges a redirect: ws:// to wss:// of the same host on the default ports
    is the same server (the token goes along); any other change of origin is not."""
    from dualcast.client.connections import _https_upgrade

    assert _https_upgrade("ws://push.example.com/api/ws", "wss://push.example.com/api/ws")
    assert _https_upgrade("ws://push.example.com:80/api/ws", "wss://push.example.com/x")
    assert not _https_upgrade("ws://push.example.com/api/ws", "wss://evil.example/api/ws")
    assert not _https_upgrade("ws://push.example.com:8000/", "wss://push.example.com:8443/")
    assert not _https_upgrade("wss://push.example.com/", "ws://push.example.com/")


async def test_a_web_site_that_answers_every_path_with_a_page_is_not_a_dualcast_server(
) -> None:
    """A site whose catch-all route answers 200 and HTML (the company's web site where
    the push server was meant): every transport says so, and the iteration ends with
    `not_found` instead of retrying for ever."""
    page = b"<!doctype html><title>Example</title><p>Welcome to our app"
    async with answering(lambda _: "HTTP/1.1 200 OK\r\nContent-Type: text/html", page) as site:
        async with watching(site) as (watch, _):
            await until(lambda: watch.done, what="the iteration to end")
    assert isinstance(watch.failure, Refused), watch.failure
    assert (watch.failure.status, watch.failure.code) == (200, "not_found")
    assert watch.failure.message == (
        f"no dualcast server at {site} (HTTP 200 text/html, not a WebSocket upgrade on "
        "/api/ws, HTTP 200 text/html, not an event stream on /api/sse, HTTP 200 text/html, "
        "not a poll answer on /api/events): check the URL and its path")
    assert watch.ids == [] and not watch.errors


async def test_dualcast_tail_piped_into_head_exits_when_head_does(server: Any) -> None:
    """`dualcast tail URL | head -1` in a script: once head has its line and exits, tail
    must exit quietly too, not hold the pipeline (and its connection) open until the
    next event shows it the pipe is gone (GNU `tail -f` watches its output alike)."""
    import os
    import sys

    from tests.harness.procs import ROOT

    marker = await publish(server.url, "marker", 0)
    first = await publish(server.url, "first", {"n": 1})
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALCAST_")}
    read_end, write_end = os.pipe()
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dualcast", "tail", server.url, "--last-event-id", marker,
        cwd=ROOT, env=env, stdout=write_end, stderr=asyncio.subprocess.PIPE)
    os.close(write_end)
    try:
        with open(read_end, "rb") as head:  # what `head -1` does: one line, then exit
            line = await asyncio.wait_for(asyncio.to_thread(head.readline), 30)
        assert json.loads(line)["id"] == first
        code = await asyncio.wait_for(tail.wait(), 15)
        assert tail.stderr is not None
        errors = (await tail.stderr.read()).decode()
        assert code == 0, errors
        assert "Traceback" not in errors and "Error" not in errors, errors
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()


async def test_a_huge_event_on_sse_arrives_in_time_linear_in_its_size(
    fresh_redis: Any, dualcast: Callable[..., Any]
) -> None:
    """One event of 64 MiB is one SSE line of 64 MiB, read in chunks of about 64 KiB:
    adding each chunk to what came before copied the line a thousand times (45 s of
    CPU for this event, 71 s at 80 MiB, against 2 s on a WebSocket)."""
    instance = dualcast(fresh_redis.url)
    stream = aioredis.from_url(fresh_redis.url, decode_responses=True)
    try:
        before = await stream.xadd("websocket-broadcast", {
            "data": json.dumps({"event": "small", "data": 0}), "timestamp": "1"})
        blob = "z" * (64 << 20)
        huge = await stream.xadd("websocket-broadcast", {
            "data": json.dumps({"event": "huge", "data": blob}),
            "timestamp": str(int(time.time() * 1000))})
    finally:
        await stream.aclose()
    async with watching(instance.url, transports=[Transport.SSE],
                        last_event_id=before) as (watch, _):
        await until(lambda: watch.ids or watch.done, timeout=25, what="the huge event")
        assert watch.ids == [huge] and watch.failure is None
        event = watch.items[0]
        assert isinstance(event, Event) and event.data == blob


async def test_a_server_certificate_the_client_does_not_trust_ends_with_a_clear_error(
    tmp_path: Any,
) -> None:
    """https:// to a server whose certificate comes from a CA the client does not know (a
    company's own CA): every try meets the same certificate, so the iteration ends with
    `tls_certificate` and how to fix it, instead of 'offline' for ever with no reason."""
    import ssl

    from tests.conftest import require_tool
    from tests.harness.tls import make_throwaway_ca

    require_tool("openssl", "the test makes a throwaway CA")
    files = make_throwaway_ca(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert, files.key)

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        except (OSError, ssl.SSLError):
            pass
        writer.close()

    site = await asyncio.start_server(hold, "127.0.0.1", 0, ssl=context)
    try:
        url = f"https://127.0.0.1:{site.sockets[0].getsockname()[1]}"
        async with watching(url) as (watch, _):
            await until(lambda: watch.done, what="the iteration to end")
    finally:
        site.close()
    assert isinstance(watch.failure, Refused), watch.failure
    assert watch.failure.code == "tls_certificate"
    assert watch.failure.message == (
        "the server's TLS certificate was not accepted (unable to get local issuer "
        "certificate); for a private CA, pass its bundle (tls=, dualcast tail --cacert) or "
        "set SSL_CERT_FILE to a bundle that holds it")


@asynccontextmanager
async def tls_in_front(port: int, tmp_path: Path) -> AsyncIterator[tuple[str, Any]]:
    """https:// and wss:// on a free port, in front of a plain dualcast server: a TLS
    terminating relay with a certificate from a throwaway CA; yields its URL and files."""
    import ssl

    from tests.conftest import require_tool
    from tests.harness.tls import make_throwaway_ca

    require_tool("openssl", "the test makes a throwaway CA")
    files = make_throwaway_ca(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert, files.key)
    pumps: set[asyncio.Task[None]] = set()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        for task in (pump(reader, up_writer), pump(up_reader, writer)):
            pumps.add(asyncio.create_task(task))

    site = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=context)
    try:
        yield f"https://127.0.0.1:{site.sockets[0].getsockname()[1]}", files
    finally:
        site.close()
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


@pytest.mark.parametrize("transport", FORCED)
@pytest.mark.parametrize("given", ["path", "context"])
async def test_every_transport_trusts_the_ca_it_is_given(
    server: Any, transport: Transport, given: str, tmp_path: Path,
) -> None:
    """The WebSocket verified with the system's CAs and SSE and polling with certifi's,
    and a private CA could be given to neither but through SSL_CERT_FILE: one context
    now serves every transport, and `tls=` (a CA bundle or an ssl context) sets it."""
    port = int(server.url.rsplit(":", 1)[1])
    async with tls_in_front(port, tmp_path) as (url, files):
        tls = str(files.ca) if given == "path" else files.client_context()
        async with watching(url, transports=[transport], tls=tls,
                            last_event_id=await publish(server.url, "marker", 0)) as (watch, _):
            await until(lambda: watch.live_on(transport) or watch.done, what="live")
            sent = await publish(server.url, "tick", 1)
            await until(lambda: sent in watch.ids or watch.done, what="the event")
        assert watch.ids == [sent] and watch.failure is None


def test_the_default_trust_is_made_once_per_process() -> None:
    """Loading the system's and certifi's CAs takes 50-100 ms of CPU on the event loop:
    once per process, not at every subscribe()."""
    from dualcast.client.connections import trust

    assert trust() is trust()
    assert trust(trust()) is trust()


def test_dualcast_tail_trusts_the_ca_bundle_it_is_given(server: Any, tmp_path: Path) -> None:
    """`dualcast tail --cacert FILE` for a server whose certificate a private CA signed."""
    import subprocess
    import sys

    from tests.harness.procs import ROOT, clean_env

    port = int(server.url.rsplit(":", 1)[1])

    async def run() -> tuple[str, str]:
        async with tls_in_front(port, tmp_path) as (url, files):
            marker = await publish(server.url, "marker", 0)
            sent = await publish(server.url, "tick", 1)
            tail = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dualcast", "tail", url, "--cacert", str(files.ca),
                "--last-event-id", marker, cwd=ROOT, env=clean_env(),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                assert tail.stdout is not None
                async with asyncio.timeout(30):
                    line = (await tail.stdout.readline()).decode()
            finally:
                tail.terminate()
                _, err = await tail.communicate()
            return line, f"{sent} {err.decode()}"

    line, rest = asyncio.run(run())
    sent, _, err = rest.partition(" ")
    assert json.loads(line)["id"] == sent, err


async def test_polls_do_not_run_back_to_back_when_the_server_allows_no_wait(
    redis_server: Any, dualcast: Callable[..., Any]
) -> None:
    """DUALCAST_POLL_TIMEOUT_MAX=0 (a short-poll-only server) caps each poll's 25 s at 0
    and answers at once: the client asked again the moment each answer came, some 700
    requests a second from one client. It polls once a second instead, and delivers."""

    def polls() -> float:
        text = httpx.get(server.url + "/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith('dualcast_connections_opened_total{transport="polling"}'):
                return float(line.split()[-1])
        return 0.0

    server = dualcast(redis_server.url, env={"DUALCAST_POLL_TIMEOUT_MAX": "0"})
    async with watching(server.url, transports=["polling"]) as (watch, _):
        await until(lambda: watch.live_on(Transport.POLLING))
        before = await asyncio.to_thread(polls)
        await asyncio.sleep(3)  # a window to count the polls in, not a wait for something
        during = await asyncio.to_thread(polls) - before
        sent = await publish(server.url, "tick", 1)
        await until(lambda: sent in watch.ids, what="the event")
    assert during <= 8, f"{during:g} polls in 3 s"
    assert watch.failure is None


async def test_a_transport_the_server_does_not_offer_ends_with_refused_when_forced(
    redis_server: Any, dualcast: Callable[..., Any]
) -> None:
    """`dualcast tail --transport websocket` against a server run with
    DUALCAST_TRANSPORTS=sse,polling: every try is refused `transport_disabled`, which no
    retry changes; the iteration says so instead of 'websocket offline' for ever."""
    server = dualcast(redis_server.url, env={"DUALCAST_TRANSPORTS": "sse,polling"})
    async with watching(server.url, transports=[Transport.WEBSOCKET]) as (watch, _):
        await until(lambda: watch.done, what="the iteration to end")
    assert isinstance(watch.failure, Refused), watch.failure
    assert (watch.failure.status, watch.failure.code) == (403, "transport_disabled")
    assert watch.failure.message == (
        f"the server at {server.url} offers none of the transports asked for (websocket)")
    # With the others allowed, it falls back as before.
    async with watching(server.url) as (watch, _):
        await until(lambda: watch.live_on(Transport.SSE), what="live on SSE")
        sent = await publish(server.url, "tick", 1)
        await until(lambda: sent in watch.ids, what="the event")
        assert watch.failure is None


async def test_dualcast_tail_with_stdout_or_stderr_closed(server: Any) -> None:
    """Started with stdout closed (`>&-`) tail failed with a traceback; with stderr closed
    (`2>&-`) its status lines went to stdout (print's fallback), among the JSON events."""
    import os
    import sys

    from tests.harness.procs import ROOT

    marker = await publish(server.url, "marker", 0)
    sent = await publish(server.url, "tick", {"n": 1})
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALCAST_")}
    command = f"exec '{sys.executable}' -m dualcast tail {server.url} --last-event-id {marker}"
    closed_out = await asyncio.create_subprocess_exec(
        "sh", "-c", command + " >&-", cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        _, errors = await closed_out.communicate()
    assert closed_out.returncode == 0 and errors == b"", errors.decode()
    closed_err = await asyncio.create_subprocess_exec(
        "sh", "-c", command + " 2>&-", cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE)
    try:
        assert closed_err.stdout is not None
        async with asyncio.timeout(30):
            line = await closed_err.stdout.readline()
        assert json.loads(line)["id"] == sent  # an event, not "dualcast tail: ... connecting"
    finally:
        closed_err.kill()
        await closed_err.wait()


def test_dualcast_tail_into_a_full_disk_says_so_in_one_line(server: Any) -> None:
    """stdout refusing a write (ENOSPC: /dev/full) ended tail with a traceback."""
    import os
    import subprocess
    import sys

    from tests.harness.procs import ROOT

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    marker = asyncio.run(publish(server.url, "marker", 0))
    asyncio.run(publish(server.url, "tick", {"n": 1}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALCAST_")}
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "dualcast", "tail", server.url, "--last-event-id", marker],
            cwd=ROOT, env=env, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "dualcast tail: cannot write the events: No space left on device")
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


@pytest.mark.parametrize("transport", FORCED)
async def test_last_event_id_of_a_live_subscription_resumes_without_a_gap(
    server: Any, transport: Transport
) -> None:
    """Subscribed live from now, with nothing for it yet: `events.last_event_id` was None,
    so an application that saved it at shutdown and resumed with it started live again
    and lost what was published while it was down. It is the position the subscription
    is live from (the server's head), as the browser client's `lastEventId` is."""
    head = await publish(server.url, "before", 0)
    async with watching(server.url, transports=[transport]) as (watch, events):
        await until(lambda: watch.live_on(transport), what=f"live on {transport}")
        saved = events.last_event_id
    assert saved is not None and not is_after(head, saved), (head, saved)
    missed = await publish(server.url, "while-down", 1)  # the application is down
    async with watching(server.url, transports=[transport], last_event_id=saved) as (watch, _):
        await until(lambda: missed in watch.ids or watch.done, what="the event published meanwhile")
        assert watch.ids == [missed]


def test_timing_says_which_defaults_are_the_browser_clients() -> None:
    """Timing's docstring once said every default matched the browser client while
    `welcome` (5 s / 3 s) and `idle` (45 s / 40 s) never did; the shared ones stay shared."""
    source = (Path(__file__).resolve().parents[1] / "static" / "dualcast.js").read_text()

    def js(option: str) -> float:
        match = re.search(rf"this\.{option} = opts\.{option} \?\? (\d+);", source)
        assert match is not None, f"{option} has no default in static/dualcast.js"
        return float(match.group(1))

    timing = Timing()
    shared = {"pollTimeout": timing.poll, "maxDeaths": timing.max_deaths}
    shared |= {f"{js_name}Ms": value * 1000 for js_name, value in {
        "retryBase": timing.retry_base, "retryCap": timing.retry_cap,
        "climbBase": timing.climb_base, "climbCap": timing.climb_cap,
        "stable": timing.stable, "deathWindow": timing.death_window}.items()}
    assert {name: js(name) for name in shared} == shared
    assert (timing.welcome, js("welcomeTimeoutMs")) == (5.0, 3000)
    assert (timing.idle, js("idleTimeoutMs")) == (45.0, 40000)
    assert Timing.__doc__ is not None and "5 s here (3 s" in Timing.__doc__
