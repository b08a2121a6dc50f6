"""An SSE client that goes away is freed at once, not at the next ping.

uvicorn's sends after a disconnect return silently, so only the disconnect itself
can wake the stream's writer: a real server, with a ping interval far longer than
the test, sees each way a client can leave.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Callable

import httpx
import pytest

from tests.harness.procs import DualcastProcess
from tests.harness.waits import wait_until

pytestmark = pytest.mark.timeout(60)


def sse_gauge(server: DualcastProcess) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    match = re.search(r'dualcast_connections\{transport="sse"\} (\S+)', text)
    return float(match.group(1)) if match else -1


def welcomed(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /api/sse HTTP/1.1\r\nHost: dualcast\r\n\r\n")
    got = b""
    while b"event: welcome" not in got:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    return sock


def close(sock: socket.socket) -> None:
    sock.close()


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def half_close(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_WR)  # our FIN; the server closes, then we do
    sock.recv(4096)


@pytest.mark.parametrize("leave", [close, reset, half_close], ids=["close", "reset", "fin"])
def test_a_gone_sse_client_is_freed_before_any_ping(
    leave: Callable[[socket.socket], None], dualcast: Callable[..., DualcastProcess],
) -> None:
    server = dualcast(env={"DUALCAST_PING_INTERVAL": "3600"})
    streams = [welcomed(server.port) for _ in range(3)]
    wait_until(lambda: sse_gauge(server) == 3, timeout=10, what="3 SSE subscribers")
    leave(streams.pop())
    wait_until(lambda: sse_gauge(server) == 2, timeout=10, what="the gone one freed")
    for sock in streams:
        leave(sock)
    wait_until(lambda: sse_gauge(server) == 0, timeout=10, what="every gone one freed")
