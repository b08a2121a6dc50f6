"""Writing a frame straight into a connection's transport, from the fan-out loop.

At low rates nothing coalesces: every event is one frame to every subscriber,
and waking each subscriber's writer task to send it (a future resolved, a task
step through four coroutine frames, a new future to wait on) cost as much as the
send itself. So when a writer is idle (parked, nothing queued) the hub hands the
event to the subscriber's *sink*, which writes the frame at once if the
transport takes it without waiting: the connection is open, nothing is in
flight, and the transport is below its high-water mark. Otherwise the sink says
no and the event is queued for the writer task as before, so backpressure, the
stall watch and the slow-consumer cut-off see exactly what they saw without it.

This is the one place that knows uvicorn's protocol objects (the ASGI `send`
is a bound method of one); a server it does not recognise gets no sink and
every event goes through the writer task.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

from starlette.types import Receive, Send
from websockets.protocol import State

try:
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle as HttpToolsCycle
except ImportError:  # pragma: no cover - uvicorn without httptools serves SSE through h11
    HttpToolsCycle = None  # type: ignore[assignment,misc]
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from dualcast.events import Event

#: Writes the event's frame now and returns True, or returns False having written nothing.
Sink = Callable[[Event], bool]


def ws_sink(send: Send) -> Sink | None:
    """A sink for the WebSocket whose ASGI `send` this is, or None."""
    proto = getattr(send, "__self__", None)
    if not isinstance(proto, WebSocketsSansIOProtocol):
        return None
    conn, transport, writable = proto.conn, proto.transport, proto.writable
    open_ = State.OPEN

    def write(event: Event) -> bool:
        if (conn.state is not open_ or proto.close_sent or not writable.is_set()
                or transport.is_closing()):
            return False
        try:
            if conn.extensions:  # permessage-deflate: websockets compresses per connection
                conn.send_text(event.ws_frame().encode())
                transport.write(b"".join(conn.data_to_send()))
            else:
                transport.write(event.ws_wire(text_frame_header))
        except Exception:  # never into the fan-out loop: the writer task will see it
            return False
        return True

    return write


def text_frame_header(size: int) -> bytes:
    """The header of an unmasked, unfragmented text frame (RFC 6455 5.2) of `size` bytes.

    A server's frames are not masked, so without an extension a frame is this header and
    the payload: building it here skips websockets' Frame object and serializer, 18.8 ->
    15.5 us of server CPU per delivery at 100 clients x 100 ev/s (medians of three runs,
    docs/performance.md). websockets keeps no state for the frames a server sends,
    beyond the connection state checked before.
    """
    if size < 126:
        return bytes((0x81, size))
    if size < 1 << 16:
        return _MEDIUM.pack(0x81, 126, size)
    return _LONG.pack(0x81, 127, size)


_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def chunked(body: bytes) -> bytes:
    """`body` as one chunk of a chunked HTTP/1.1 response body."""
    return b"%x\r\n%s\r\n" % (len(body), body)


def sse_sink(send: Send, frame: Callable[[Event], bytes]) -> Sink | None:
    """A sink for the chunked HTTP response whose ASGI `send` this is, or None; it
    writes nothing before the response's headers went out."""
    cycle = getattr(send, "__self__", None)
    if HttpToolsCycle is None or not isinstance(cycle, HttpToolsCycle):
        return None
    transport, flow = cycle.transport, cycle.flow

    def write(event: Event) -> bool:
        if (not cycle.response_started or cycle.response_complete or cycle.disconnected
                or not cycle.chunked_encoding or flow.write_paused or transport.is_closing()):
            return False
        body = frame(event)
        try:
            transport.write(chunked(body))
        except Exception:  # never into the fan-out loop: the writer task will see it
            return False
        return True

    return write


def sse_beat(send: Send, chunk: bytes) -> Callable[[], bool] | None:
    """A keepalive beat (`dualcast.keepalive`) for the chunked HTTP response whose ASGI
    `send` this is, or None: it writes `chunk` (the ping, framed as a chunk) when the
    transport takes it now, skips a round when it does not (a client that is not
    reading needs no ping; the stall watch deals with it when something is
    written), and returns False once the response is over.

    Chunks are whole `transport.write`s, from the stream's writer or its sink, so a
    ping written between two of them cannot split one; it waits for the response's
    headers (the welcome) like the sink.
    """
    cycle = getattr(send, "__self__", None)
    if HttpToolsCycle is None or not isinstance(cycle, HttpToolsCycle):
        return None
    transport, flow = cycle.transport, cycle.flow
    framed = chunked(chunk)

    def beat() -> bool:
        if cycle.response_complete or cycle.disconnected or transport.is_closing():
            return False
        if cycle.response_started and cycle.chunked_encoding and not flow.write_paused:
            transport.write(framed)
        return True

    return beat


_joined: tuple[object, bytes] = (None, b"")


def default_header_lines(headers: list[tuple[bytes, bytes]]) -> bytes:
    """uvicorn's default header lines (date, server), joined once per list: its main
    loop puts a new list in place when the date header changes, once a second."""
    global _joined
    if _joined[0] is not headers:
        _joined = (headers, b"".join(b"%s: %s\r\n" % pair for pair in headers))
    return _joined[1]


def _idle_cycle(send: Send) -> HttpToolsCycle | None:
    """uvicorn's httptools request cycle behind `send`, when nothing has been sent on it
    yet and its transport takes a write now; else None (the caller uses ASGI sends)."""
    cycle = getattr(send, "__self__", None)
    if HttpToolsCycle is None or not isinstance(cycle, HttpToolsCycle):
        return None
    if (cycle.response_started or cycle.disconnected or cycle.access_log
            or cycle.flow.write_paused or cycle.transport.is_closing()):
        return None
    return cycle


def _head_of_200(cycle: HttpToolsCycle, head: bytes) -> list[bytes]:
    """A 200's status line and headers as uvicorn writes them: its defaults (server,
    date: lower-cased names, validated once), then `head`, then `connection: close`
    where the cycle will not keep the connection (the blank line is the caller's)."""
    parts = [b"HTTP/1.1 200 OK\r\n", default_header_lines(cycle.default_headers), head]
    if not cycle.keep_alive:
        parts.append(b"connection: close\r\n")
    return parts


def write_response(send: Send, head: bytes, body: bytes) -> bool:
    """Write a whole 200 response (`head`: its own header lines, each ending in CRLF)
    in one `transport.write` and close uvicorn's request cycle as its `send` would;
    False, having written nothing, where that is not uvicorn's httptools cycle or the
    cycle cannot take it now (then the caller sends the usual two ASGI messages).

    uvicorn writes the status line and headers and then the body in two system
    calls, and checks every header against two regular expressions on the way: a
    long-poll answer is the most frequent response this server makes, and at 5,000
    pollers its two sends were 28 % of the server's samples, 19 % in the two writes
    (py-spy, 2026-11-29); one write took that load's p99 from 1,070 to 897 ms
    (medians of three interleaved runs).
    """
    cycle = _idle_cycle(send)
    if cycle is None or cycle.scope["method"] == "HEAD":
        return False
    transport = cycle.transport
    parts = _head_of_200(cycle, head)
    parts += (b"\r\n", body)
    try:
        transport.write(b"".join(parts))
    except Exception:  # nothing taken: the ASGI send below meets the same error
        return False
    cycle.response_started = cycle.response_complete = True
    cycle.waiting_for_100_continue = False
    cycle.message_event.set()
    if not cycle.keep_alive:
        transport.close()
    cycle.on_response()
    return True


def start_chunked(send: Send, head: bytes, chunk: bytes) -> bool:
    """Start a 200 chunked response (`head`: its own header lines, each ending in CRLF)
    and write its first chunk, all in one `transport.write`, leaving uvicorn's request
    cycle as its `send` of `http.response.start` and one body chunk would; False, having
    written nothing, where that is not uvicorn's httptools cycle or the cycle cannot
    take it now (then the caller sends the usual two ASGI messages).

    Every SSE stream starts with its headers and its `welcome`: two sends were two
    system calls on the server and two reads on the client, per connect. The bytes
    on the wire are the same, in one segment: 160 -> 150 us of server CPU per SSE
    connect (15,000 connects on one worker, two runs each, 2026-11-29).
    """
    cycle = _idle_cycle(send)
    if cycle is None or cycle.chunked_encoding is not None or cycle.scope["method"] != "GET":
        return False
    transport = cycle.transport
    parts = _head_of_200(cycle, head)
    parts += (b"transfer-encoding: chunked\r\n\r\n", b"%x\r\n" % len(chunk), chunk, b"\r\n")
    try:
        transport.write(b"".join(parts))
    except Exception:  # nothing taken: the ASGI sends meet the same error
        return False
    cycle.response_started = True
    cycle.chunked_encoding = True
    cycle.waiting_for_100_continue = False
    return True


class _GoneEvent(asyncio.Event):
    """uvicorn's `message_event` of one request cycle, which also calls `gone` once
    when it is set after the connection was lost (uvicorn's `connection_lost` marks
    the cycle disconnected, then sets this event)."""

    def __init__(self, cycle: HttpToolsCycle, gone: Callable[[], None]) -> None:
        super().__init__()
        self.cycle: HttpToolsCycle | None = cycle
        self.gone = gone

    def set(self) -> None:
        super().set()
        if self.cycle is not None and self.cycle.disconnected:
            self.cycle = None
            self.gone()

    def forget(self) -> None:
        """Let go of the cycle and of `gone`: uvicorn's cycle keeps this event, and
        `gone` keeps the stream, which keeps the cycle again (its sink writes there)."""
        self.cycle = None
        self.gone = _nothing


def _nothing() -> None:
    pass


def on_disconnect(channel: Send | Receive, gone: Callable[[], None]) -> Callable[[], None] | None:
    """Call `gone` once, from uvicorn's `connection_lost`, when the client of the
    httptools request cycle behind `channel` (its ASGI `send` or `receive`) goes away;
    the undo, or None where that is not uvicorn's cycle (then the caller waits on ASGI
    `receive` for `http.disconnect`).

    The usual watch is a task per stream reading `receive` until the disconnect: a
    Task, its coroutine and an awaited future per SSE connect, each woken once more
    to be cancelled when the stream ends. This puts the same wake-up on the event
    uvicorn already sets from `connection_lost`: the cycle's `message_event` becomes
    one that also calls `gone`. Nothing else waits on it while the stream runs (an
    SSE request has no body to read), and its set/clear state is carried over.
    30,000 SSE connects on six workers (fleet --transports sse, three interleaved runs
    each, 2026-11-29): 213 -> 197 us of server CPU per connect (medians), 14.7 ->
    13.6 KB of server RSS per stream.
    """
    cycle = getattr(channel, "__self__", None)
    if HttpToolsCycle is None or not isinstance(cycle, HttpToolsCycle):
        return None
    watched = _GoneEvent(cycle, gone)
    if cycle.message_event.is_set():
        asyncio.Event.set(watched)  # the state, without the check
    cycle.message_event = watched
    cycle.flow.resume_reading()  # as `receive` does: a client's close is read, so seen
    if cycle.disconnected:  # gone already, before we looked
        watched.set()
    return watched.forget
