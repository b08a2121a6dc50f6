"""uvicorn's websockets-sansio protocol, with two handshake paths fixed and a leaner
idle connection.

- When websockets refuses an upgrade request while parsing it (a request line
  over its limit, 16 KiB as dualcast sets it: 414; header fields too large: 431;
  not HTTP at all), it queues its
  answer and waits to be flushed; uvicorn (0.54) never asks for it and never
  closes: the client waited forever and the server kept the socket with no timer
  to end it (one file descriptor per such request, for as long as the client
  liked). Here websockets' answer is written and the connection closed.
- A denial response (`websocket.http.response.*`: our 403 and 503 refusals) is
  the handshake's answer, but uvicorn did not count it as one and logged
  "ASGI callable returned without completing handshake." at error level after
  every refusal (upstream: Kludex/uvicorn#3138). Here it counts: a property,
  not a wrapper around `send`, which would add a coroutine to every frame sent.
- Memory per idle connection (`Inbox`, `Gate`, `handle_connect`,
  `start_keepalive`): what uvicorn keeps for the whole life of a connection but
  uses only during the handshake, or allocates as general-purpose asyncio
  objects where a few fields do, is dropped or replaced; and the inbox lets a
  session run a reader only while messages wait (`dualcast.transports.ws`).
  Together with that: 24.5 -> 14.8 KB of server RSS per idle WebSocket at
  10,000 connections (`python -m bench idle`; an SSE stream: 14.5 KB).
- A plain upgrade request that httptools parsed already is answered from its
  pieces (`handshake_parsed`, called by `dualcast.upgrade`), not parsed again, and
  its 101 can leave in one write with the session's first frame (`accept_with`).
- The keepalive pings come from the event loop's one ring (`dualcast.keepalive`),
  two prebuilt bytes per ping, instead of two timers per connection armed and
  cancelled around every ping.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

from uvicorn._types import ASGIReceiveEvent
from uvicorn.config import Config
from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string, is_ssl
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.datastructures import Headers
from websockets.frames import Frame
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, State

from dualcast.direct import default_header_lines
from dualcast.keepalive import Keepalive, Slot, keepalive
from dualcast.loops import running_loop


class Inbox:
    """What uvicorn's protocol asks of its `asyncio.Queue` of received messages
    (`put_nowait`, `get`, `empty`), in two fields.

    An `asyncio.Queue` is four deques (its items, getters and putters, and the
    deque of its `join` event), 760 bytes each even when empty: 3.2 KB of every
    idle WebSocket by tracemalloc (2,000 idle connections), the largest single
    item of the 24.5 KB a connection cost. Here the items are a list (uvicorn
    pauses reading after each message, so it holds one or two) and the one
    reader waits on one future, made only while it waits.
    """

    __slots__ = ("_items", "_listener", "_waiter")

    def __init__(self) -> None:
        self._items: list[ASGIReceiveEvent] = []
        self._waiter: asyncio.Future[None] | None = None
        self._listener: Callable[[], None] | None = None

    def listen(self, listener: Callable[[], None] | None) -> None:
        """Call `listener` whenever a message arrives and no reader waits in `get`
        (at once, too, if messages wait already), so an application can start a
        reader when there is something to read instead of keeping one parked in
        `get` for the connection's life (`None`: stop)."""
        self._listener = listener
        if listener is not None and self._items:
            listener()

    def put_nowait(self, item: ASGIReceiveEvent) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
        elif self._listener is not None:
            self._listener()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    async def get(self) -> ASGIReceiveEvent:
        while not self._items:
            # One reader per connection (the ASGI contract); a second would wait forever.
            if self._waiter is not None:
                raise RuntimeError("WebSocket receive() called while another is waiting")
            self._waiter = running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class Gate:
    """What uvicorn's protocol asks of its `writable` `asyncio.Event` (`set`, `clear`,
    `is_set`, `wait`): an Event allocates an empty deque of waiters (760 bytes) for a
    flag that is almost always set; this one makes a list only when a sender has to
    wait for the transport to drain. 0.8 KB per idle connection by tracemalloc.
    """

    __slots__ = ("_open", "_waiters")

    def __init__(self) -> None:
        self._open = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        self._open = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._open = False

    async def wait(self) -> bool:
        if self._open:
            return True
        waiter = running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


@dataclass(slots=True)
class Handshake:
    """A plain upgrade request as httptools parsed it, checked by `dualcast.upgrade`
    as websockets would: what the protocol needs to answer it without parsing it."""

    path: str  #: the request target, query included
    headers: list[tuple[bytes, bytes]]  #: lowercased names, values as websockets stores them
    accept: str  #: the Sec-WebSocket-Accept of its key
    origin: str | None
    subprotocols: list[str]  #: those the client offered, in order


def addresses(transport: asyncio.BaseTransport
              ) -> tuple[tuple[str, int | None] | None, tuple[str, int] | None]:
    """The (server, client) addresses uvicorn's protocols put in the ASGI scope, with
    the values uvicorn's `get_local_addr` and `get_remote_addr` give for a TCP socket.

    uvicorn asks the transport for its "socket" and calls getsockname() and
    getpeername() on it: for uvloop's transport that makes a stand-in socket object
    and, per call, a real socket object around the descriptor (a getsockname() of
    its own to learn the family) and a system call, three system calls per connect
    and three again for a WebSocket's second protocol. Both uvloop's and asyncio's
    transports already hold the two addresses, read once when the connection was
    made: 5-6 % of a worker's samples in getsockname/getpeername while 15,000
    connections each came in (py-spy --native, `python -m bench fleet --clients
    30000 --server-workers 2`, 2026-11-30). A UNIX socket's path goes in as
    uvicorn puts it, (path, None); anything else as None, as uvicorn does.
    """
    local, peer = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
    server: tuple[str, int | None] | None = None
    if isinstance(local, tuple):
        server = (str(local[0]), int(local[1]))
    elif isinstance(local, str):
        server = (local, None)
    client = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
    return server, client


#: A ping with no payload, as a server sends it (RFC 6455 5.2, 5.5.2).
PING = b"\x89\x00"


class WebSocketProtocol(WebSocketsSansIOProtocol):
    _handshake_complete = False
    _keepalive_slot: Slot | None = None
    _accept_key: str | None = None  #: the Sec-WebSocket-Accept of a parsed request

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        # uvicorn's own upgrade path gives no loop, and uvicorn would look it up (`dualcast.loops`)
        super().__init__(config, server_state, app_state, _loop or running_loop())
        # Duck-typed stand-ins for the asyncio objects uvicorn made (see their docstrings);
        # uvicorn's code only calls the methods these provide.
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Gate()  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """uvicorn's, with the addresses the transport already holds (`addresses`)."""
        self.connections.add(self)
        self.transport = cast(asyncio.Transport, transport)
        self.server, self.client = addresses(transport)
        self.scheme = "wss" if is_ssl(self.transport) else "ws"
        if self.logger.level <= TRACE_LOG_LEVEL:
            prefix = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
            self.logger.log(TRACE_LOG_LEVEL, "%sWebSocket connection made", prefix)

    @property
    def handshake_complete(self) -> bool:
        # A denial is complete once its body went out (uvicorn then sets close_sent).
        return self._handshake_complete or (self.initial_response is not None
                                            and self.close_sent)

    @handshake_complete.setter
    def handshake_complete(self, value: bool) -> None:
        self._handshake_complete = value

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if (not self.handshake_initiated and self.conn.handshake_exc is not None
                and not self.transport.is_closing()):
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()

    def handle_connect(self, event: Request) -> None:
        """The upgrade request is history once uvicorn made the ASGI scope of it (the
        scope keeps the headers the application reads) and websockets its answer.
        uvicorn keeps it as `request`, and websockets' parser generator keeps it as a
        local of its handshake frame for the connection's life (that frame then runs
        the frame parser): its headers, parsed into websockets' `Headers` (a dict of
        lists and a list of pairs), were 1.9 KB per idle connection by tracemalloc
        (2,000 idle connections). They are emptied in place, the request dropped."""
        super().handle_connect(event)
        event.headers.clear()
        self.__dict__.pop("request", None)

    def handshake_parsed(self, handshake: Handshake) -> None:
        """Where `data_received` of the request would have led, for a request that was
        parsed already (`dualcast.upgrade`): websockets' state after `parse` read the
        request and `accept` accepted it, then uvicorn's `handle_connect` for a 101,
        the scope built from the parsed headers as it builds it from websockets'."""
        conn = self.conn
        # ServerProtocol.parse reads the request, then runs its base class's frame parser.
        conn.parser = Protocol.parse(conn)
        next(conn.parser)
        conn.accept_called = True
        conn.origin = handshake.origin  # type: ignore[assignment]
        # `accept`'s answer is made only if uvicorn's `send` asks for it (`response`):
        # `accept_with` writes it from the key.
        self._accept_key = handshake.accept
        self.handshake_initiated = True
        raw_path, _, query_string = handshake.path.partition("?")
        self.scope = {
            "type": "websocket",
            "asgi": {"version": self.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": self.scheme,
            "server": self.server,
            "client": self.client,
            "root_path": self.root_path,
            "path": self.root_path + unquote(raw_path),
            "raw_path": self.root_path.encode("ascii") + raw_path.encode("ascii"),
            "query_string": query_string.encode("ascii"),
            "headers": handshake.headers,
            "subprotocols": handshake.subprotocols,
            "state": self.app_state.copy(),
            "extensions": {"websocket.http.response": {}},
        }
        self.queue.put_nowait({"type": "websocket.connect"})
        task = self.loop.create_task(self.run_asgi())
        task.add_done_callback(self.on_task_complete)
        self.tasks.add(task)

    @property
    def response(self) -> Response:
        """The 101 that uvicorn's `send` of `websocket.accept` sends. For a request
        `handshake_parsed` took, made only when asked: `accept` would have made it (no
        extension, no subprotocol: uvicorn offers none), and uvicorn's `send` deletes
        its Date before sending it, so none is formatted for it here."""
        made: Response | None = self.__dict__.get("_response")
        if made is None and self._accept_key is not None:
            made = self._response = Response(101, "Switching Protocols", Headers([
                ("Date", ""), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
                ("Sec-WebSocket-Accept", self._accept_key),
            ]))
        assert made is not None, "no handshake to answer"
        return made

    @response.setter
    def response(self, value: Response) -> None:
        self._response = value

    def accept_with(self, frame: bytes) -> bool:
        """Accept the upgrade `handshake_parsed` took and send `frame` (a whole frame,
        the session's first) in the same write; False, having done nothing, where
        that is not such a request or it cannot be accepted now (then the caller
        sends `websocket.accept` and its frame as usual).

        uvicorn's `send` of the accept builds the 101 through websockets' `Headers`
        and `Response` (lower-casing its default headers on the way) and writes it;
        the first frame follows in a second ASGI send and a second system call. The
        bytes here are the same (`tests/test_ws_upgrade.py` compares them), and
        websockets' state moves on as its `send_response` of a 101 would move it.
        """
        key = self._accept_key
        if (key is None or self.handshake_complete or self.initial_response is not None
                or self.disconnected or not self.writable.is_set()
                or self.transport.is_closing() or self.conn.state is not State.CONNECTING):
            return False
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info('%s - "WebSocket %s" [accepted]', get_client_addr(self.scope),
                             get_path_with_query_string(self.scope))
        self.transport.write(b"".join((
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: ", key.encode(), b"\r\n",
            default_header_lines(self.default_headers), b"\r\n", frame)))
        self.handshake_complete = True
        self.conn.state = State.OPEN
        self.start_keepalive()
        return True

    def start_keepalive(self) -> None:
        """Called right after the 101 went out: that answer (a `Response` with its
        `Headers`, 1 KB by tracemalloc) is kept for the connection's life, so it is
        dropped here. The pings come from the loop's one keepalive ring
        (`dualcast.keepalive`), not from timers of this connection's own."""
        self.__dict__.pop("_response", None)
        self.__dict__.pop("_accept_key", None)  # back to the class's None, no entry kept
        if self.ping_interval is not None and self.ping_interval > 0:
            self._keepalive_slot = keepalive(self.loop, self.ping_interval).add(self, self._beat)
        early = self.__dict__.pop("_early", None)
        if early and not self.transport.is_closing():
            self.data_received(early)

    def hold_early(self, data: bytes) -> None:
        """Bytes the client sent behind its upgrade request, in the same read (frames
        from a client that did not wait for the 101). uvicorn hands the request alone to
        this protocol, and they were lost; read now, a ping would be answered before
        the 101. They are read once the 101 went out (`start_keepalive`); a refused
        upgrade never reads them."""
        self._early = data

    def stop_keepalive(self) -> None:
        Keepalive.forget(self._keepalive_slot, self)
        self._keepalive_slot = None
        super().stop_keepalive()

    def _beat(self) -> bool:
        """One keepalive round, as uvicorn's timers did it: end the connection when the
        last ping went unanswered (uvicorn's `keepalive_timeout`: a 1011 close; the
        ring's next beat comes one interval after the ping, which is how long
        `dualcast serve` lets uvicorn wait for a pong), else send the next ping. A
        server's frame is unmasked and a control frame never compressed, so a ping
        with no payload is two fixed bytes, written without websockets' framing (which
        keeps no state for the frames it sends). The pong that answers it is empty too
        (RFC 6455 5.5.3): `handle_pong` takes it."""
        if (self.close_sent or self.transport.is_closing()
                or self.conn.state is not State.OPEN):
            return False
        if self.pending_ping_payload is not None and self.ping_timeout is not None:
            self.keepalive_timeout()
            return False
        self.pending_ping_payload = b""
        self.transport.write(PING)
        return True

    def handle_pong(self, event: Frame) -> None:
        """The answer to the ring's last ping (empty, as the ping was): the connection
        is alive. uvicorn's version also times the round trip, which nothing reads."""
        if not event.data:
            self.pending_ping_payload = None


def inbox_of(send: Callable[..., Any]) -> Inbox | None:
    """The inbox of the connection whose ASGI `send` (a bound method of its protocol)
    this is, when this module's protocol serves it; else None."""
    protocol = getattr(send, "__self__", None)
    if isinstance(protocol, WebSocketProtocol) and isinstance(protocol.queue, Inbox):
        return protocol.queue
    return None
