"""A connection that ends is freed by reference counting alone.

The server freezes what survives a full collection (`dualcast.collector`), so later
collections skip the objects of every open connection. A frozen object is still
freed when its last reference goes; one that is part of a reference cycle is not,
and waits for the next thaw (an hour by default). So whatever a WebSocket, an SSE
stream or a long-poll holds must form no cycle once it has ended: otherwise every
long-lived connection that closes leaves its objects behind until then (an SSE
stream once left ~30 objects that way: its sink and uvicorn's request cycle kept
each other alive through the disconnect hook).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import struct

import pytest
import uvicorn

from dualcast.app import create_app
from dualcast.config import Settings
from dualcast.direct import _GoneEvent
from dualcast.feed import Feed
from dualcast.hub import Subscriber
from dualcast.runtime import Runtime
from dualcast.serve import uvicorn_config
from dualcast.transports.sse import EventStream
from dualcast.transports.ws import Session
from tests.conftest import SECRET
from tests.harness.waits import wait_for
from tests.harness.wire import upgrade_request

pytestmark = pytest.mark.timeout(60)

#: What one connection holds for its life, on every transport that keeps one.
HELD = (EventStream, Session, Feed, Subscriber, _GoneEvent)


async def test_connections_that_end_leave_no_cycle_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(secret=SECRET)
    app = create_app(settings)
    config = uvicorn_config(settings, app)
    config.host, config.port = "127.0.0.1", 0
    monkeypatch.setattr(logging.getLogger("uvicorn.access"), "hasHandlers", lambda: False)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    clients: list[asyncio.StreamWriter] = []
    try:
        await wait_for(lambda: server.started, 10, "the server")
        rt: Runtime = app.state.dualcast
        port = server.servers[0].sockets[0].getsockname()[1]
        for n in range(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            clients.append(writer)
            if n % 3 == 0:
                writer.write(upgrade_request("/api/ws", "127.0.0.1", port))
                await asyncio.wait_for(reader.readuntil(b'"welcome"'), 10)
            elif n % 3 == 1:
                writer.write(b"GET /api/sse HTTP/1.1\r\nHost: dualcast\r\n\r\n")
                await asyncio.wait_for(reader.readuntil(b"event: welcome"), 10)
            else:  # a long-poll that is still waiting when its client goes
                writer.write(b"GET /api/events?timeout=2 HTTP/1.1\r\nHost: dualcast\r\n\r\n")
        await wait_for(lambda: rt.hub.count() == 20 and rt.stats.polls_waiting == 10, 10,
                       "every stream subscribed, every poll waiting")
        gc.collect()  # what is left now is theirs or the server's; the collector froze it
        gc.disable()  # from here on, a cycle stays where the test can see it
        for n, writer in enumerate(clients):
            if n % 2:  # a reset rather than a close
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
        # (a poll whose client left ends at its timeout, as it does not watch for that)
        await wait_for(lambda: rt.hub.count() == 0 and rt.stats.polls_waiting == 0
                       and rt.quotas.total == 0, 10, "every connection gone")
        for _ in range(5):  # the endings' last callbacks
            await asyncio.sleep(0)
        gc.unfreeze()  # frozen cycles are invisible to get_objects
        left = [type(o).__name__ for o in gc.get_objects() if isinstance(o, HELD)]
        assert left == [], f"kept by a reference cycle after the connection ended: {left}"
    finally:
        gc.enable()
        for writer in clients:
            writer.close()
        server.should_exit = True
        await asyncio.wait_for(serving, 15)
