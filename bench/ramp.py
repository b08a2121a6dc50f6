"""A load generator's ramp: its clients connected `concurrency` at a time, by callbacks.

The generator shares the machine's two cores with the server it measures, so every
microsecond of its CPU per connect is one the server does not get. One connect here
is: a socket bound to a source address whose non-blocking connect() is started at
once (`start_connect`), a transport made from it (the one coroutine per connect,
uvloop's `create_connection(sock=...)`), and the client's `ready` future, whose
done-callback settles the attempt and starts the next one. No task per client
waits on a semaphore, no `wait_for`/`shield` wraps each step (one sweep a second
times out what hangs), and failed attempts are tried again `retries` times, 0.5 s
apart, as a real client would.

Measured at 30,000 clients (`python -m bench fleet --clients 30000 --events 1
--room-events 0 --idle-window 0`, the same server, three runs interleaved with the
tree before, medians): generator CPU per connect 330 -> 210 us (process start-up
included), connect rate 2,262 -> 3,057/s (the rate is noisy on the shared machine:
1,763-3,269 with this ramp, 1,910-2,701 before).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from bench.clients import Client

#: Linux's IP_BIND_ADDRESS_NO_PORT (Python names it from 3.12 only).
BIND_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_STARTED = (0, errno.EINPROGRESS)
#: How long the ramp lets events gather between loop iterations (`Ramp.run`).
NAP_S = 0.005


def start_connect(source: str | None, addr: tuple[str, int]) -> socket.socket:
    """A non-blocking TCP socket from `source` whose connect() to `addr` has started.

    Why not `loop.sock_connect`: uvloop resolves the address of every call through
    getaddrinfo on its thread pool (it passes no socket type, so its numeric fast
    path never applies): a thread hop, a futex wake-up and a callback per connect,
    about a fifth of the generator's CPU in a py-spy profile of a 30,000 ramp. A
    connect() on loopback runs the whole handshake inside the call (a send() right
    after it succeeds), so the transport can be made from the socket at once;
    when the server's accept queue is full the SYN waits, the first write returns
    EAGAIN and the transport sends the request when the socket becomes writable.

    `bind((source, 0))` picks the ephemeral port at bind time, with no destination to
    tell ports apart: the kernel's search grows with every socket already bound, and
    the first 100,000-client run spent 2.9 ms of generator CPU per connect (382
    connects/s). With IP_BIND_ADDRESS_NO_PORT the port is chosen at connect() per
    destination, as for an unbound socket. That search still grows with the ports in
    use: Linux's connect() walks the even half of `ip_local_port_range` (~14k ports)
    before it tries the odd half. With one address per generator (16,700 sockets each
    at 100,000) the generator spent 503 us of CPU per connect, against 253 us at
    30,000 (5,000 per address); spread over four addresses each (4,200 sockets per
    address), 233-291 us at 100,000, and the fleet's connect rate went 2,024 ->
    3,148/s (median of three).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source is not None:
            sock.setsockopt(socket.IPPROTO_IP, BIND_NO_PORT, 1)
            sock.bind((source, 0))
        err = sock.connect_ex(addr)
        if err not in _STARTED:
            raise OSError(err, f"connect {addr[0]}:{addr[1]}: {errno.errorcode.get(err, err)}")
    except BaseException:
        sock.close()
        raise
    return sock


class Ramp:
    """One worker's connects: at most `concurrency` in flight, each settled by callback.

    `placed` holds (index into paths, client) of every client that is ready, and of
    each whose last attempt failed after its connection was opened (it counts as
    closed and lost, as a client that gave up does).
    """

    def __init__(self, paths: list[str], factory: Callable[[str], Client],
                 addr: tuple[str, int], sources: list[str], concurrency: int,
                 timeout: float, retries: int) -> None:
        self.paths = paths
        self.factory = factory
        self.addr = addr
        self.sources = sources
        self.concurrency = concurrency
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.todo: deque[tuple[int, int]] = deque((i, retries) for i in range(len(paths)))
        #: client -> (index, retries left, deadline)
        self.inflight: dict[Client, tuple[int, int, float]] = {}
        self.waiting = 0  # attempts sleeping before a retry
        self.placed: list[tuple[int, Client]] = []
        self.errors: Counter[str] = Counter()
        self.tries = 0
        self.finished: asyncio.Future[None] = self.loop.create_future()

    async def run(self) -> None:
        """All attempts settled; the loop meanwhile wakes every NAP_S, not on each event.

        Against a server that answers a few connects at a time, each wake-up of the
        event loop (epoll_wait, libuv's handles, the callbacks) served one or two
        connects: with one connect in flight at a time a generator spent 82-94 us of
        CPU per connect against a canned-answer server, 52-56 us with ten or more.
        Napping between iterations makes each one take what arrived meanwhile
        (a connect takes four or five iterations: at 5 ms it stays ~25 ms, well
        within a fleet's in-flight time). Fleet at 100,000 (the default run), the
        same server, back to back: 121 us of generator CPU per connect and 4,187
        connects/s with it, 164 us and 3,160/s without (one run each; the server
        spent 35.9 against 41.1 s of CPU on the ramp). At 30,000, where the server
        keeps up better, it pays little: medians of three 143 against 153 us.
        """
        sweep = self.loop.call_later(1.0, self._sweep)
        self._launch()
        try:
            while not self.finished.done():
                time.sleep(NAP_S)  # not asyncio.sleep: the point is to not wake up
                await asyncio.sleep(0)
        finally:
            sweep.cancel()

    def _launch(self) -> None:
        todo, inflight = self.todo, self.inflight
        while todo and len(inflight) < self.concurrency:
            i, left = todo.popleft()
            self._start(i, left)
        if not todo and not inflight and not self.waiting and not self.finished.done():
            self.finished.set_result(None)

    def _start(self, i: int, left: int) -> None:
        self.tries += 1
        sources = self.sources
        try:
            sock = start_connect(sources[i % len(sources)] if sources else None, self.addr)
        except OSError as exc:
            self._failed(i, left, exc, None)
            return
        client = self.factory(self.paths[i])
        self.inflight[client] = (i, left, time.monotonic() + self.timeout)
        made = self.loop.create_task(self.loop.create_connection(lambda: client, sock=sock))
        made.add_done_callback(lambda task: self._made(task, client))
        client.ready.add_done_callback(lambda fut: self._settled(fut, client))

    def _made(self, task: asyncio.Task[Any], client: Client) -> None:
        """A connection that failed before it was handed to the client.

        uvloop has closed the socket then (closing it again here could close a
        descriptor reused since)."""
        exc = None if task.cancelled() else task.exception()
        if exc is None:
            return
        entry = self.inflight.pop(client, None)
        if entry is not None:
            self._failed(entry[0], entry[1], exc, None)
            self._launch()

    def _settled(self, ready: asyncio.Future[None], client: Client) -> None:
        entry = self.inflight.pop(client, None)
        if entry is None:  # already given up on
            return
        i, left, _ = entry
        exc = ready.exception()
        if exc is None:
            self.placed.append((i, client))
        else:
            self._failed(i, left, exc, client)
        self._launch()

    def _failed(self, i: int, left: int, exc: BaseException, client: Client | None) -> None:
        self.errors[repr(exc)[:160]] += 1
        if left:
            if client is not None:
                client.close()
            self.waiting += 1
            self.loop.call_later(0.5, self._retry, i, left - 1)
        elif client is not None:  # kept: it counts as closed and lost, as before
            self.placed.append((i, client))

    def _retry(self, i: int, left: int) -> None:
        self.waiting -= 1
        self.todo.append((i, left))
        self._launch()

    def _sweep(self) -> None:
        """Fail the attempts past their deadline (one timer for all, not one each)."""
        now = time.monotonic()
        late = [c for c, (_, _, deadline) in self.inflight.items() if deadline < now]
        for client in late:
            client.fail(f"not ready within {self.timeout:g} s")
        if not self.finished.done():
            self.loop.call_later(1.0, self._sweep)
