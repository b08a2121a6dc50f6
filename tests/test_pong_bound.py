"""A WebSocket client that pings without reading cannot grow the server's memory.

The reader queues one `pong` per `ping` for the writer; once the client stops
reading, the writer blocks and, before the bound, the replies piled up without
limit until the stall watch gave up on the client (tens of MB from one socket in
seconds). Now at most a queue's worth waits: past that the client is cut off as a
slow consumer would be.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import psutil
import pytest

from tests.harness.procs import DualcastProcess
from tests.harness.waits import wait_for

pytestmark = pytest.mark.timeout(90)

PINGS = 2_000_000


def masked_text_frame(payload: bytes) -> bytes:
    """A client's (masked) text frame; a zero mask keeps the payload as it is."""
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


async def test_pings_without_reading_do_not_grow_the_server(
    dualcast: Callable[..., DualcastProcess],
) -> None:
    # A long stall limit, so the bound (not the stall watch) is what this test sees.
    server = dualcast(env={"DUALCAST_PING_INTERVAL": "60", "DUALCAST_QUEUE_SIZE": "100"})
    rss_before = psutil.Process(server.pid).memory_info().rss
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # we never read: keep it small
    sock.sendall(b"GET /api/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    ping = masked_text_frame(b'{"type":"ping"}')
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    sent = 0
    try:
        async with asyncio.timeout(40):
            chunk = ping * 1000
            while sent < PINGS:
                try:
                    await loop.sock_sendall(sock, chunk)
                except OSError:
                    break  # the server cut us off: what the bound does
                sent += 1000
        grown = psutil.Process(server.pid).memory_info().rss - rss_before
        assert sent < PINGS, "the server took every ping and never cut the client off"
        # (without the bound: ~19 MB for 2,000,000 pings, and no cut-off within a minute)
        assert grown < 10 * 2**20, f"server grew {grown / 2**20:.1f} MB for {sent} pings"
        await wait_for(lambda: server.healthy(), 10, "the server still answers")
    finally:
        sock.close()
