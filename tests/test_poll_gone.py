"""A long-poll whose client goes away ends at once, not at its timeout.

A poll waits up to its timeout (here 30 s, the most a client may ask) for events,
holding a connection lease of its subject or address meanwhile. A reloaded page or
a closed tab leaves such a poll behind; it must let go as soon as the client has
gone, on both paths a poll can take: the first request of a connection (read by
uvicorn) and the next ones (read by the poll connection, server/transports/poll_conn.py).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable

import pytest

from tests.harness.leaving import LEAVE_WAYS, connections, leave_one_then_the_rest
from tests.harness.procs import DualcastProcess
from tests.harness.waits import wait_until

pytestmark = pytest.mark.timeout(60)

POLL = b"GET /api/events?timeout=%d HTTP/1.1\r\nHost: dualcast\r\n\r\n"


def answer(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one response (the server always sends content-length)."""
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    size = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < size:
        chunk = sock.recv(4096)
        assert chunk, body
        body += chunk
    return int(head.split(b" ", 2)[1]), body


def first_poll(port: int) -> socket.socket:
    """A connection whose first request, read by uvicorn, is a waiting poll."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(POLL % 30)
    return sock


def next_poll(port: int) -> socket.socket:
    """A connection answered once, whose next request (the poll connection's) waits."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(POLL % 0)
    status, _ = answer(sock)
    assert status == 200
    sock.sendall(POLL % 30)
    return sock


@LEAVE_WAYS
@pytest.mark.parametrize("open_poll", [first_poll, next_poll], ids=["uvicorn", "taken-over"])
def test_a_gone_poller_stops_waiting_at_once(
    open_poll: Callable[[int], socket.socket], leave: Callable[[socket.socket], None],
    dualcast: Callable[..., DualcastProcess],
) -> None:
    server = dualcast(env={"DUALCAST_MAX_CONNECTIONS_PER_ADDRESS": "0"})
    leave_one_then_the_rest([open_poll(server.port) for _ in range(3)], leave, server, "polling")


@pytest.mark.parametrize("open_poll", [first_poll, next_poll], ids=["uvicorn", "taken-over"])
def test_a_reloaded_page_is_not_refused_for_its_own_old_poll(
    open_poll: Callable[[int], socket.socket], dualcast: Callable[..., DualcastProcess],
) -> None:
    """One poll per address: the page's poll after a reload takes the lease its
    previous one held, instead of a 429 until that one's timeout."""
    server = dualcast(env={"DUALCAST_MAX_CONNECTIONS_PER_ADDRESS": "1"})
    old = open_poll(server.port)
    wait_until(lambda: connections(server, "polling") == 1, timeout=10, what="the old page's poll")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as other:
        other.sendall(POLL % 0)
        assert answer(other)[0] == 429  # the cap holds while the old page is there
    old.close()

    def admitted() -> bool:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as new:
            new.sendall(POLL % 0)
            return answer(new)[0] == 200

    wait_until(admitted, timeout=10, what="the reloaded page's poll admitted")
