"""An SSE client that goes away is freed at once, not at the next ping.

uvicorn's sends after a disconnect return silently, so only the disconnect itself
can wake the stream's writer: a real server, with a ping interval far longer than
the test, sees each way a client can leave.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from tests.harness.leaving import LEAVE_WAYS, leave_one_then_the_rest
from tests.harness.procs import DualcastProcess

pytestmark = pytest.mark.timeout(60)


def welcomed(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /api/sse HTTP/1.1\r\nHost: dualcast\r\n\r\n")
    got = b""
    while b"event: welcome" not in got:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    return sock


@LEAVE_WAYS
def test_a_gone_sse_client_is_freed_before_any_ping(
    leave: Callable[[socket.socket], None], dualcast: Callable[..., DualcastProcess],
) -> None:
    server = dualcast(env={"DUALCAST_PING_INTERVAL": "3600"})
    leave_one_then_the_rest([welcomed(server.port) for _ in range(3)], leave, server, "sse")
