"""One token, or one address without a token, holds at most a set number of streams and
polls: the next is refused with 429 `too_many_connections`, on every transport, and
a slot comes back when a connection ends."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import token
from tests.harness.clients import SSEClient, WSClient
from tests.harness.procs import DualcastProcess

pytestmark = pytest.mark.timeout(60)

CAP = 3


@pytest.fixture(scope="module")
def server(server_with: Callable[..., DualcastProcess]) -> DualcastProcess:
    return server_with({"DUALCAST_MAX_CONNECTIONS_PER_SUBJECT": str(CAP),
                        "DUALCAST_MAX_CONNECTIONS_PER_ADDRESS": str(CAP)}, name="quotas")


async def refused_everywhere(server: DualcastProcess, status: int = 429, **auth: str) -> None:
    """A fourth WebSocket, SSE stream and poll are each refused with `status`."""
    ws = WSClient(server.ws_url, **auth)
    with pytest.raises(ConnectionRefusedError):
        await ws.connect()
    async with SSEClient(server.url, **auth) as sse:
        assert sse.status == status
        assert '"too_many_connections"' in sse.body or sse.ended.is_set()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        answer = await client.get("/api/events", params={"timeout": "0", **auth})
    assert answer.status_code == status
    assert answer.json()["error"] == "too_many_connections"


async def test_one_token_holds_at_most_its_cap_and_gets_a_slot_back(
    server: DualcastProcess,
) -> None:
    mine = token("quota-user")
    held = [WSClient(server.ws_url, token=mine) for _ in range(CAP - 1)]
    for ws in held:
        await ws.connect()
    sse = SSEClient(server.url, token=mine)
    await sse.connect()
    try:
        assert sse.status == 200
        await refused_everywhere(server, token=mine)
        # another subject is not affected
        other = WSClient(server.ws_url, token=token("someone-else"))
        await other.connect()
        await other.close()
        # a connection that ends gives its slot back
        await held[0].close()
        again = WSClient(server.ws_url, token=mine)
        await wait_for_admission(again)
        await again.close()
    finally:
        for ws in held[1:]:
            await ws.close()
        await sse.close()


async def test_anonymous_callers_are_capped_per_address(server: DualcastProcess) -> None:
    held = [SSEClient(server.url) for _ in range(CAP)]
    try:
        for sse in held:
            await sse.connect()
            assert sse.status == 200
        await refused_everywhere(server)
        # a token is counted by its subject, not by the address it comes from
        with_token = WSClient(server.ws_url, token=token("quota-other"))
        await with_token.connect()
        await with_token.close()
    finally:
        for sse in held:
            await sse.close()


async def test_a_token_sent_in_auth_counts_under_its_subjects_cap(
    server: DualcastProcess,
) -> None:
    """An anonymous WebSocket that sends a token in `auth` becomes that subject's: its
    slot was left counted for the address, so one token held any number of connections
    (3 more per address, from as many addresses as a leaked token reaches)."""
    from tests.harness.waits import wait_for

    mine = token("quota-auth")
    held = [WSClient(server.ws_url, token=mine) for _ in range(CAP - 1)]
    upgraded = [WSClient(server.ws_url) for _ in range(2)]
    try:
        for ws in held + upgraded:
            await ws.connect()
        await upgraded[0].send({"type": "auth", "token": mine})  # the cap's last slot
        await upgraded[0].send({"type": "ping"})  # answered once the auth was
        await wait_for(lambda: {"type": "pong"} in upgraded[0].seen.frames, 10, "a pong")
        await upgraded[1].send({"type": "auth", "token": mine})  # past it
        await wait_for(lambda: upgraded[1].seen.errors, 10, "an error frame")
        assert [e["code"] for e in upgraded[1].seen.errors] == ["too_many_connections"]
        assert upgraded[0].seen.errors == []
        await refused_everywhere(server, token=mine)
        await upgraded[0].close()  # the slot it took for the subject comes back
        again = WSClient(server.ws_url, token=mine)
        await wait_for_admission(again)
        await again.close()
    finally:
        for ws in held + upgraded[1:]:
            await ws.close()


async def wait_for_admission(ws: WSClient, within: float = 10) -> None:
    """The server learns of a close a moment after the client: retry until admitted."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            await ws.connect()
            return
        except ConnectionRefusedError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def capped_process(server_with: Callable[..., DualcastProcess]) -> DualcastProcess:
    return server_with({"DUALCAST_MAX_CONNECTIONS": str(CAP),
                        "DUALCAST_MAX_CONNECTIONS_PER_SUBJECT": "0",
                        "DUALCAST_MAX_CONNECTIONS_PER_ADDRESS": "0"}, name="process-cap")


async def test_one_process_holds_at_most_its_cap_and_gets_a_slot_back(
    capped_process: DualcastProcess,
) -> None:
    """DUALCAST_MAX_CONNECTIONS counts every caller, token or not: the next is refused with
    503 (retry, another worker or instance), and a connection that ends gives its slot back."""
    held = [SSEClient(capped_process.url) for _ in range(CAP - 1)]
    ws = WSClient(capped_process.ws_url, token=token("process-cap"))
    try:
        for sse in held:
            await sse.connect()
            assert sse.status == 200
        await ws.connect()
        await refused_everywhere(capped_process, status=503)
        await refused_everywhere(capped_process, status=503, token=token("someone-new"))
        # the operator is told, once for the six refusals (there was no line at all)
        said = [line for line in capped_process.log().splitlines()
                if "its cap (DUALCAST_MAX_CONNECTIONS" in line]
        assert len(said) == 1 and " WARNING " in said[0], said
        assert f"holds {CAP} connections" in said[0] and "get 503" in said[0], said
        await held[0].close()
        again = WSClient(capped_process.ws_url)
        await wait_for_admission(again)
        await again.close()
    finally:
        for sse in held[1:]:
            await sse.close()
        await ws.close()
