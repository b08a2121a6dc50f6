"""`?events=message`: SSE for generic clients.

By default every SSE event is named (`event: <name>`), which a plain
`EventSource.onmessage` handler never sees. With `?events=message` events arrive
unnamed, their data `{id, event, data, ts}` (the poll item), so a generic client
gets everything, `ts` included; `welcome`, `reset` and `error` stay named. Read here
by httpx-sse, a third-party SSE parser, as any Python consumer would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.harness.procs import DualcastProcess
from tests.harness.stream import xadd

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server(server_with: Callable[..., DualcastProcess]) -> DualcastProcess:
    return server_with(name="plain")


async def read_events(server: DualcastProcess, query: str, count: int,
                      publish: Callable[[], list[str]]) -> tuple[list[Any], list[str]]:
    """Connect, publish once welcomed, and return the first `count` SSE events after it."""
    seen: list[Any] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
        async with aconnect_sse(client, "GET", "/api/sse" + query) as source:
            published: list[str] = []
            async for sse in source.aiter_sse():
                if sse.event == "welcome":
                    published = await asyncio.to_thread(publish)
                    continue
                seen.append(sse)
                if len(seen) >= count:
                    return seen, published
    return seen, []


async def test_plain_mode_events_reach_an_onmessage_style_consumer(
    server: DualcastProcess, redis_server: Any,
) -> None:
    stream = server.extra_env["DUALCAST_STREAM"]

    def publish() -> list[str]:
        return [xadd(redis_server, "tick", {"n": n}, stream=stream) for n in range(3)]

    events, ids = await asyncio.wait_for(read_events(server, "?events=message", 3, publish), 30)
    assert [e.event for e in events] == ["message"] * 3  # unnamed on the wire
    bodies = [json.loads(e.data) for e in events]
    assert [b["id"] for b in bodies] == ids == [e.id for e in events]
    assert [b["event"] for b in bodies] == ["tick"] * 3
    assert [b["data"] for b in bodies] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert all(isinstance(b["ts"], int) for b in bodies)


async def test_default_mode_events_stay_named(
    server: DualcastProcess, redis_server: Any,
) -> None:
    stream = server.extra_env["DUALCAST_STREAM"]

    def publish() -> list[str]:
        return [xadd(redis_server, "tock", {"n": 9}, stream=stream)]

    events, ids = await asyncio.wait_for(read_events(server, "", 1, publish), 30)
    assert events[0].event == "tock" and events[0].id == ids[0]
    assert json.loads(events[0].data) == {"n": 9}
