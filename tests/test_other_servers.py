"""The app served by uvicorn's stock protocols (h11 for HTTP, websockets-sansio for
WebSocket), as an application embedding `create_app` might serve it.

`dualcast serve` runs its own protocol classes, and several fast paths only work with
them: events written straight into the transport, the 101 and the welcome in one write,
the disconnect of an SSE client told by uvicorn's `connection_lost`, the pings from the
keepalive ring. Elsewhere each falls back to plain ASGI: a writer task per stream, a task
waiting for `http.disconnect`, the SSE writer's own ping, uvicorn's own WebSocket
keepalive. These tests run those fallbacks end to end.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
import websockets

from dualcast.app import create_app
from dualcast.config import Settings
from dualcast.runtime import Runtime
from tests.conftest import SECRET, token
from tests.harness.waits import lines_of, wait_for

pytestmark = pytest.mark.timeout(60)

PUBLISH = {"Authorization": "Bearer " + token("p", publish=True)}


@pytest.fixture
async def stock(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[str, Runtime]]:
    settings = Settings(secret=SECRET, ping_interval=0.5, max_connections_per_address=0)
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, http="h11", ws="websockets-sansio",
                            ws_ping_interval=0.5, ws_ping_timeout=0.5, log_level="warning",
                            lifespan="on")
    monkeypatch.setattr(logging.getLogger("uvicorn.access"), "hasHandlers", lambda: False)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: server.started, 10, "the server")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"127.0.0.1:{port}", app.state.dualcast
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)


async def test_sse_streams_pings_and_is_freed_when_its_client_goes(
        stock: tuple[str, Runtime]) -> None:
    where, rt = stock
    async with httpx.AsyncClient(base_url=f"http://{where}", timeout=10) as http:
        async with http.stream("GET", "/api/sse") as response, lines_of(response) as seen:
            assert response.status_code == 200
            await wait_for(lambda: "event: welcome" in seen, 10, "the welcome")
            assert rt.hub.count("sse") == 1
            answer = await http.post("/api/publish", headers=PUBLISH,
                                     json={"event": "tick", "data": {"n": 1}})
            assert answer.status_code == 202
            await wait_for(lambda: "event: tick" in seen, 10, "the event")
            await wait_for(lambda: seen.count(": ping") >= 2, 10, "the writer's pings")
        await wait_for(lambda: rt.hub.count("sse") == 0, 10, "the stream freed")


async def test_a_websocket_is_welcomed_fed_kept_alive_and_freed(
        stock: tuple[str, Runtime]) -> None:
    where, rt = stock
    async with websockets.connect(f"ws://{where}/api/ws") as ws:
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert welcome["type"] == "welcome"
        async with httpx.AsyncClient(base_url=f"http://{where}", timeout=10) as http:
            answer = await http.post("/api/publish", headers=PUBLISH,
                                     json={"event": "tick", "data": {"n": 2}})
            assert answer.status_code == 202
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert frame["type"] == "event" and frame["data"] == {"n": 2}
        # Past several of uvicorn's own keepalive rounds (0.5 s, pong within 0.5 s), which
        # the client answers: the connection stays and still answers.
        started = asyncio.get_running_loop().time()
        while asyncio.get_running_loop().time() - started < 2.0:
            await ws.send(json.dumps({"type": "ping"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"type": "pong"}
            await asyncio.sleep(0.25)
        assert rt.hub.count("websocket") == 1
    await wait_for(lambda: rt.hub.count("websocket") == 0, 10, "the session freed")
