"""The ways a client can leave a connection, for tests that the server notices each."""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Callable

import httpx
import pytest

from tests.harness.procs import DualcastProcess
from tests.harness.waits import wait_until


def close(sock: socket.socket) -> None:
    sock.close()


def reset(sock: socket.socket) -> None:
    """An RST instead of a FIN (SO_LINGER with a zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def half_close(sock: socket.socket) -> None:
    """Our FIN only; the server closes, then we do."""
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(10)
    while sock.recv(4096):
        pass
    sock.close()


#: `@LEAVE_WAYS` parametrizes a test's `leave` argument over the three.
LEAVE_WAYS = pytest.mark.parametrize("leave", [close, reset, half_close],
                                     ids=["close", "reset", "fin"])


def connections(server: DualcastProcess, transport: str) -> float:
    """The server's `dualcast_connections` gauge for `transport` (-1: not found)."""
    text = httpx.get(server.url + "/metrics", timeout=5).text
    match = re.search(r'dualcast_connections\{transport="' + transport + r'"\} (\S+)', text)
    return float(match.group(1)) if match else -1


def leave_one_then_the_rest(socks: list[socket.socket], leave: Callable[[socket.socket], None],
                            server: DualcastProcess, transport: str) -> None:
    """The server counts each client that left, one first and then all the others,
    each within 10 s (far less than any ping interval or timeout the tests set)."""
    count = len(socks)
    wait_until(lambda: connections(server, transport) == count, timeout=10,
               what=f"{count} {transport} connections")
    leave(socks.pop())
    wait_until(lambda: connections(server, transport) == count - 1, timeout=10,
               what="the one that left counted")
    for sock in socks:
        leave(sock)
    wait_until(lambda: connections(server, transport) == 0, timeout=10,
               what="every one that left counted")
