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
import struct
from collections.abc import Callable

import httpx
import pytest

from tests.harness.procs import DualcastProcess
from tests.harness.waits import wait_until

pytestmark = pytest.mark.timeout(60)

POLL = b"GET /api/events?timeout=%d HTTP/1.1\r\nHost: dualcast\r\n\r\n"


def polls_waiting(server: DualcastProcess) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    match = re.search(r'dualcast_connections\{transport="polling"\} (\S+)', text)
    return float(match.group(1)) if match else -1


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


def close(sock: socket.socket) -> None:
    sock.close()


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def half_close(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_WR)  # our FIN; the server closes, then we do
    sock.settimeout(10)
    while sock.recv(4096):
        pass
    sock.close()


@pytest.mark.parametrize("leave", [close, reset, half_close], ids=["close", "reset", "fin"])
@pytest.mark.parametrize("open_poll", [first_poll, next_poll], ids=["uvicorn", "taken-over"])
def test_a_gone_poller_stops_waiting_at_once(
    open_poll: Callable[[int], socket.socket], leave: Callable[[socket.socket], None],
    dualcast: Callable[..., DualcastProcess],
) -> None:
    server = dualcast(env={"DUALCAST_MAX_CONNECTIONS_PER_ADDRESS": "0"})
    polls = [open_poll(server.port) for _ in range(3)]
    wait_until(lambda: polls_waiting(server) == 3, timeout=10, what="3 waiting polls")
    leave(polls.pop())
    wait_until(lambda: polls_waiting(server) == 2, timeout=10, what="the gone one ended")
    for sock in polls:
        leave(sock)
    wait_until(lambda: polls_waiting(server) == 0, timeout=10, what="every gone one ended")


@pytest.mark.parametrize("open_poll", [first_poll, next_poll], ids=["uvicorn", "taken-over"])
def test_a_reloaded_page_is_not_refused_for_its_own_old_poll(
    open_poll: Callable[[int], socket.socket], dualcast: Callable[..., DualcastProcess],
) -> None:
    """One poll per address: the page's poll after a reload takes the lease its
    previous one held, instead of a 429 until that one's timeout."""
    server = dualcast(env={"DUALCAST_MAX_CONNECTIONS_PER_ADDRESS": "1"})
    old = open_poll(server.port)
    wait_until(lambda: polls_waiting(server) == 1, timeout=10, what="the old page's poll")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as other:
        other.sendall(POLL % 0)
        assert answer(other)[0] == 429  # the cap holds while the old page is there
    old.close()

    def admitted() -> bool:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as new:
            new.sendall(POLL % 0)
            return answer(new)[0] == 200

    wait_until(admitted, timeout=10, what="the reloaded page's poll admitted")
