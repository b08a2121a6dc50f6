"""The client's transport manager with fake connections: the rules that real servers
rarely hit on cue (a probe promoted while the old transport still talks, replays
that overlap, deaths in a row, a refused token), driven step by step.

The fakes report to the manager's inbox exactly as real connections do; what the
tests read is what a user iterating the subscription gets.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from dualcast.client import AuthFailed, Event, Refused, Reset, State, Status, Timing, Transport
from dualcast.client.connections import Batch, Ended, ErrorFrame, Failure, Target, Welcome
from dualcast.client.subscription import Subscription
from dualcast.client.tokens import Tokens
from tests.test_client import until

pytestmark = pytest.mark.timeout(30)

WS, SSE, POLL = Transport.WEBSOCKET, Transport.SSE, Transport.POLLING
#: Nothing happens on a timer unless a test wants it to.
MANUAL = Timing(welcome=1000, retry_base=0.01, retry_cap=0.01, climb_base=1000, climb_cap=1000)


def ev(seq: int) -> Event:
    return Event(f"100-{seq}", "tick", {"n": seq}, 100)


class Fake:
    """A connection the test speaks for."""

    def __init__(self, transport: Transport, target: Target, cursor: str | None,
                 inbox: asyncio.Queue[Any]) -> None:
        self.transport = transport
        self.cursor = cursor
        self.token = target.token()
        self.inbox = inbox
        self.welcomed = False
        self.closed = False
        self.sent: list[Any] = []
        self.task = asyncio.create_task(asyncio.Event().wait())

    async def say(self, *signals: Any) -> None:
        for signal in signals:
            if isinstance(signal, Welcome):
                self.welcomed = True
            await self.inbox.put((self, signal))

    def close(self) -> None:
        self.closed = True
        self.task.cancel()

    async def send(self, frame: Any) -> bool:
        self.sent.append(frame)
        return True


class Run:
    def __init__(self) -> None:
        self.made: list[Fake] = []
        self.statuses: list[Status] = []
        self.sub: Subscription | None = None

    def connector(self, *args: Any) -> Fake:
        fake = Fake(*args)
        self.made.append(fake)
        return fake

    async def conn(self, index: int) -> Fake:
        await until(lambda: len(self.made) > index, timeout=5, what=f"connection #{index}")
        return self.made[index]

    async def items(self, count: int) -> list[Any]:
        assert self.sub is not None
        return [await asyncio.wait_for(self.sub.__anext__(), 5) for _ in range(count)]


@asynccontextmanager
async def manager(order: tuple[Transport, ...], timing: Timing = MANUAL, token: Any = None,
                  rand: Callable[[], float] = lambda: 1.0,
                  last_event_id: str | None = None) -> AsyncIterator[Run]:
    run = Run()
    run.sub = Subscription(
        "http://127.0.0.1:1", "ws://127.0.0.1:1", tokens=Tokens(token), rooms=(),
        last_event_id=last_event_id, transports=order, timing=timing,
        on_status=run.statuses.append, on_error=None, buffer=100, rand=rand,
        connector=run.connector)  # type: ignore[arg-type]
    await run.sub.start()
    try:
        yield run
    finally:
        await run.sub.close()


async def test_a_promoted_probe_overlapping_the_old_transport_delivers_each_id_once() -> None:
    climbing = Timing(welcome=1000, retry_base=0.01, retry_cap=0.01, climb_base=0.05,
                      climb_cap=0.05)
    async with manager((WS, SSE), timing=climbing) as run:
        ws = await run.conn(0)
        await ws.say(Ended(Failure.TRANSPORT, "403"))       # the upgrade is refused
        sse = await run.conn(1)
        assert sse.transport is SSE
        await sse.say(Welcome([], "100-0"), Batch([ev(1), ev(2), ev(3)]))
        assert await run.items(3) == [ev(1), ev(2), ev(3)]
        probe = await run.conn(2)                            # the climb: WebSocket again
        assert (probe.transport, probe.cursor) == (WS, "100-3")
        await sse.say(Batch([ev(4), ev(5)]))                 # the old one keeps feeding
        assert await run.items(2) == [ev(4), ev(5)]
        await probe.say(Welcome([], "100-3"), Batch([ev(4), ev(5), ev(6)]))  # replays 4, 5
        await sse.say(Batch([ev(7)]))                        # stale: it was replaced
        await probe.say(Batch([ev(7)]), Batch([ev(8)]))
        assert await run.items(3) == [ev(6), ev(7), ev(8)]
        assert sse.closed and not probe.closed
        assert run.statuses[-1] == Status(WS, State.LIVE)
        assert run.sub is not None and run.sub.transport is WS


async def test_a_reconnect_resumes_from_the_cursor_and_drops_the_overlap() -> None:
    async with manager((WS,), last_event_id="100-0") as run:
        first = await run.conn(0)
        assert first.cursor == "100-0"
        await first.say(Welcome([], "100-0"), Batch([ev(1), ev(2)]), Ended(Failure.TRANSPORT, "1006"))
        assert await run.items(2) == [ev(1), ev(2)]
        second = await run.conn(1)
        assert (second.transport, second.cursor) == (WS, "100-2")
        await second.say(Welcome([], "100-2"), Batch([ev(2), ev(3)]), Reset("200-0"))
        assert await run.items(2) == [ev(3), Reset("200-0")]
        assert run.sub is not None and run.sub.last_event_id == "200-0"
        await second.say(Ended(Failure.TRANSPORT, "1006"))
        third = await run.conn(2)
        assert third.cursor == "200-0"                       # after a reset: from the head


async def test_a_poll_answer_moves_the_cursor_even_without_visible_events() -> None:
    async with manager((POLL,)) as run:
        poll = await run.conn(0)
        await poll.say(Welcome([], "100-0"), Batch([], "100-9"), Ended(Failure.TRANSPORT, "reset"))
        again = await run.conn(1)
        assert again.cursor == "100-9"


async def test_an_unreachable_server_is_retried_on_the_same_transport() -> None:
    async with manager((WS, SSE, POLL)) as run:
        for index in range(3):
            conn = await run.conn(index)
            assert conn.transport is WS
            await conn.say(Ended(Failure.UNREACHABLE, "connection refused"))
        assert (await run.conn(3)).transport is WS


async def test_a_transport_that_dies_repeatedly_is_given_up_for_the_next() -> None:
    async with manager((WS, SSE, POLL)) as run:
        for index in range(3):
            conn = await run.conn(index)
            assert conn.transport is WS
            await conn.say(Welcome([], "100-0"), Ended(Failure.TRANSPORT, "1006"))
        assert (await run.conn(3)).transport is SSE


async def test_a_server_away_on_every_transport_is_met_again_on_the_one_last_live() -> None:
    """Behind nginx an instance that stops answers 502 on every path: the client fell
    back to polling, and stayed there once the server was back (climbing later, 5-30 s
    on the worse transport). When every transport failed to open, the next round starts
    again from the one last live; rounds in a row go offline and wait longer."""
    async with manager((WS, SSE, POLL)) as run:
        live = await run.conn(0)
        await live.say(Welcome([], "100-0"), Ended(Failure.TRANSPORT, "1006"))  # a restart
        index = 1
        for _ in range(2):                                   # two rounds: all three 502
            for transport in (WS, SSE, POLL):
                conn = await run.conn(index)
                assert conn.transport is transport, (index, conn.transport)
                await conn.say(Ended(Failure.TRANSPORT, "502 Bad Gateway"))
                index += 1
        back = await run.conn(index)                          # the server is back
        assert back.transport is WS and back.cursor == "100-0"
        offline = [s for s in run.statuses if s.state is State.OFFLINE]
        assert offline == [Status(WS, State.OFFLINE, "502 Bad Gateway")], run.statuses
        await back.say(Welcome([], "100-0"), Batch([ev(1)]))
        assert await run.items(1) == [ev(1)]
        assert run.statuses[-1] == Status(WS, State.LIVE)


async def test_no_welcome_in_time_falls_back() -> None:
    quick = Timing(welcome=0.05, retry_base=0.01, retry_cap=0.01, climb_base=1000,
                   climb_cap=1000)
    async with manager((WS, SSE, POLL), timing=quick) as run:
        ws = await run.conn(0)
        sse = await run.conn(1)                               # WS said nothing
        poll = await run.conn(2)                              # SSE was held back
        assert [ws.closed, sse.closed, poll.transport] == [True, True, POLL]


async def test_a_token_source_is_asked_again_after_token_expired() -> None:
    tokens = iter(["t1", "t2", "t3"])
    async with manager((WS,), token=lambda: next(tokens)) as run:
        first = await run.conn(0)
        assert first.token == "t1"
        await first.say(Welcome([], "100-0"), ErrorFrame("token_expired", "expired"))
        second = await run.conn(1)
        assert second.token == "t2" and first.closed
        await second.say(Ended(Failure.AUTH, "HTTP 401", 401, "token_expired", "expired"))
        # A fresh token refused as well: give up rather than loop.
        with pytest.raises(AuthFailed, match="token_expired"):
            await run.items(1)


async def test_without_a_token_source_an_auth_error_ends_the_iteration() -> None:
    async with manager((SSE,), token="fixed") as run:
        conn = await run.conn(0)
        assert conn.token == "fixed"
        await conn.say(Welcome([], "100-0"), Batch([ev(1)]),
                       ErrorFrame("token_expired", "the token has expired"))
        assert await run.items(1) == [ev(1)]
        with pytest.raises(AuthFailed):
            await run.items(1)
        with pytest.raises(AuthFailed):  # and stays ended
            await run.items(1)


async def test_a_refused_request_ends_the_iteration_with_refused() -> None:
    async with manager((SSE, POLL)) as run:
        conn = await run.conn(0)
        await conn.say(Ended(Failure.FATAL, "HTTP 403", 403, "forbidden_room", "not allowed"))
        with pytest.raises(Refused) as refused:
            await run.items(1)
        assert (refused.value.status, refused.value.code) == (403, "forbidden_room")
        assert len(run.made) == 1                             # no other transport was tried


def jwt(seconds: float) -> str:
    """An (unsigned) JWT whose `exp` is `seconds` from now: all the client reads."""
    claims = json.dumps({"exp": time.time() + seconds}).encode()
    return "h." + base64.urlsafe_b64encode(claims).decode().rstrip("=") + ".s"


async def test_a_websocket_gets_a_refreshed_token_in_an_auth_frame() -> None:
    issued = [jwt(0.2), jwt(3600)]  # the first one is to be replaced at once
    async with manager((WS,), token=lambda: issued.pop(0)) as run:
        conn = await run.conn(0)
        await conn.say(Welcome([], "100-0"))
        await until(lambda: conn.sent, timeout=5, what="the auth frame")
        assert conn.sent[0]["type"] == "auth" and conn.sent[0]["token"].startswith("h.")
        assert not conn.closed and len(run.made) == 1        # no reconnect needed


async def test_a_failing_token_source_at_the_start_is_auth_failed() -> None:
    def broken() -> str:
        raise RuntimeError("the identity provider is down")

    async with manager((WS,), token=broken) as run:
        with pytest.raises(AuthFailed, match="identity provider is down"):
            await run.items(1)
        assert run.made == []


async def test_iterating_after_the_block_ends_stops_instead_of_hanging() -> None:
    async with manager((WS,)) as run:
        await run.conn(0)
    assert run.sub is not None
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(run.sub.__anext__(), 5)


async def test_leaving_the_block_ends_an_iteration_waiting_in_another_task() -> None:
    async with manager((WS,)) as run:
        await run.conn(0)
        assert run.sub is not None
        reader = asyncio.create_task(run.sub.__anext__())
        await asyncio.sleep(0)  # one turn of the loop: the reader now waits for an item
        assert not reader.done()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(reader, 5)


async def test_a_404_falls_back_and_404s_everywhere_end_with_not_found() -> None:
    async with manager((WS, SSE, POLL)) as run:
        ws = await run.conn(0)
        await ws.say(Ended(Failure.TRANSPORT, "HTTP 404", 404))   # a proxy routes no /api/ws
        sse = await run.conn(1)
        await sse.say(Welcome([], "100-0"), Batch([ev(1)]))
        assert await run.items(1) == [ev(1)]
    async with manager((WS, SSE, POLL)) as run:
        for index, status in enumerate([403, 404, 404]):  # 403: an upgrade with no route
            conn = await run.conn(index)
            await conn.say(Ended(Failure.TRANSPORT, f"HTTP {status}", status))
        with pytest.raises(Refused, match="HTTP 404 on /api/sse") as refused:
            await run.items(1)
        assert (refused.value.status, refused.value.code) == (404, "not_found")
    async with manager((WS,)) as run:  # a 403 alone is a refusal, not a missing server
        for index in range(3):
            conn = await run.conn(index)
            await conn.say(Ended(Failure.TRANSPORT, "HTTP 403", 403))
        await run.conn(3)


@pytest.mark.parametrize("transport", [SSE, POLL])
async def test_sse_and_polling_reconnect_quietly_with_a_refreshed_token(
    transport: Transport
) -> None:
    issued = [jwt(0.3), jwt(3600)]
    async with manager((transport,), token=lambda: issued.pop(0)) as run:
        first = await run.conn(0)
        await first.say(Welcome([], "100-0"), Batch([ev(1)]))
        assert await run.items(1) == [ev(1)]
        second = await run.conn(1)                            # the 1 s floor, past exp
        assert first.closed and second.cursor == "100-1" and second.token != first.token
        await second.say(Welcome([], "100-1"), Batch([ev(1), ev(2)]))
        assert await run.items(1) == [ev(2)]
        assert run.statuses == [Status(transport, State.CONNECTING),
                                Status(transport, State.LIVE)]  # no blip for the refresh


async def test_a_certificate_one_transport_does_not_trust_falls_back_until_none_does() -> None:
    """Every transport verifies with the same context, but what answers on each path may
    differ (a proxy in front of one, with a certificate of its own): a refused certificate
    fails one transport and the next is tried; the subscription ends with
    `tls_certificate` only when none was accepted."""
    untrusted = Ended(Failure.TRANSPORT, "SSLCertVerificationError", None, "tls_certificate",
                      "the server's TLS certificate was not accepted (unable to get local "
                      "issuer certificate); for a private CA, set SSL_CERT_FILE ...")
    async with manager((WS, SSE, POLL)) as run:
        await (await run.conn(0)).say(untrusted)
        sse = await run.conn(1)
        await sse.say(Welcome([], "100-0"), Batch([ev(1)]))
        assert await run.items(1) == [ev(1)]
    async with manager((WS, SSE, POLL)) as run:
        for index in range(3):
            await (await run.conn(index)).say(untrusted)
        with pytest.raises(Refused, match="TLS certificate was not accepted") as refused:
            await run.items(1)
        assert refused.value.code == "tls_certificate"
