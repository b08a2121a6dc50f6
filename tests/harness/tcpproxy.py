"""A TCP proxy of our own between dualcast and Redis, for network-fault tests.

It runs an asyncio loop in a daemon thread, so sync and async tests drive it
alike. Faults, each undone by `restore()`:

- `drop()`: abort every open connection at once (RST), as a NAT or load
  balancer that forgets its flows; new connections are still accepted.
- `refuse()`: close the listening socket, so new connections get ECONNREFUSED
  (and drop the open ones), as a host that went away.
- `stall()`: keep every connection open but forward nothing in either
  direction: bytes are swallowed and replies never come, as a network path
  that black-holes packets. Only timeouts notice it; nothing is closed.
- `delay_replies(s)`: forward commands at once but hold each reply `s` seconds, as a
  slow network or disk: Redis carries a command out, its client gives up waiting.
- `sever()`: the connections open now lose their path for good while new ones
  flow, as behind a NAT that forgot its flows: what the server sends is lost and
  nothing is closed, so a client that only listens waits for ever (one that minds
  the silence reconnects); what the client sends is answered with a reset.

Counters (`accepted`, `active`) let a test wait for the client to reconnect.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from tests.harness.procs import free_port

T = TypeVar("T")


class TCPProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1",
                 port: int | None = None, tls: ssl.SSLContext | None = None) -> None:
        """`tls`: a server context, to terminate TLS in front of a plain server."""
        self.target = (target_host, target_port)
        self.tls = tls
        self.port = port or free_port()
        self.accepted = 0
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcpproxy",
                                        daemon=True)
        self._flowing: asyncio.Event | None = None
        self.reply_delay = 0.0
        self._severed: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        #: each client's handler, awaited at shutdown: a loop closed with one still
        #: pending logged "Task was destroyed but it is pending!" when it was collected
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping: asyncio.Event | None = None
        self.state = "stopped"

    # control (thread-safe, blocking) --------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> TCPProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def drop(self) -> None:
        """Abort every open connection (new ones are still accepted)."""
        self._call(self._drop())

    def refuse(self) -> None:
        """Stop listening (connects are refused) and abort the open connections."""
        self._call(self._refuse())

    def delay_replies(self, seconds: float) -> None:
        """Hold every reply from Redis `seconds` before passing it on (commands go at once)."""
        self.reply_delay = seconds

    def stall(self) -> None:
        """Forward nothing, close nothing: only the peers' timeouts can notice."""
        self._call(self._set_flowing(False))
        self.state = "stalled"

    def sever(self) -> None:
        """The open connections forward nothing from now on and are never closed."""
        self._call(self._sever())

    def restore(self) -> None:
        """Undo any fault: listen again and forward again."""
        self._call(self._restore())

    @property
    def active(self) -> int:
        return len(self._conns)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    def __enter__(self) -> TCPProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # inside the proxy's loop -----------------------------------------------------

    async def _start(self) -> None:
        self._stopping = asyncio.Event()
        self._flowing = asyncio.Event()
        self._flowing.set()
        await self._listen()

    async def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self._server = await asyncio.start_server(self._handle, sock=sock, ssl=self.tls)
        self.state = "up"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._conns.add(pair)
        try:
            await asyncio.gather(self._pump(reader, up_writer, pair, from_client=True),
                                 self._pump(up_reader, writer, pair, replies=True))
        finally:
            self._conns.discard(pair)
            self._severed.discard(pair)
            for w in pair:
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
                    from_client: bool = False, replies: bool = False) -> None:
        assert self._flowing is not None
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    if pair in self._severed:  # a severed path tells nobody: hold on
                        assert self._stopping is not None
                        await self._stopping.wait()
                    break
                if pair in self._severed and from_client:
                    for w in pair:  # the far end does not know this flow: a reset
                        w.transport.abort()
                    break
                if not self._flowing.is_set() or pair in self._severed:
                    continue  # black hole: swallowed, never forwarded, nothing closed
                if replies and self.reply_delay:
                    await asyncio.sleep(self.reply_delay)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # Either side ending ends both (a half-close is not a fault we model).
            writer.transport.abort()

    async def _drop(self) -> None:
        for pair in list(self._conns):
            for w in pair:
                w.transport.abort()
        self._conns.clear()

    async def _sever(self) -> None:
        self._severed.update(self._conns)

    async def _refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._drop()
        self.state = "refusing"

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _restore(self) -> None:
        self.reply_delay = 0.0
        await self._set_flowing(True)
        if self._server is None:
            await self._listen()
        self.state = "up"

    async def _shutdown(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._drop()
        if self._handlers:  # aborted, they end at their next step; a stuck one is cancelled
            _, stuck = await asyncio.wait(set(self._handlers), timeout=2)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=1)
        self.state = "stopped"
