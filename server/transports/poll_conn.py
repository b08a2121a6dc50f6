"""A long-poller's keep-alive connection, read and answered here after its first poll.

A long-poller asks again as soon as it is answered, so at a few thousand pollers
the server's work is answering requests, and most of that was uvicorn's, not
ours: per request httptools calls back into Python for the URL and each header,
uvicorn builds a scope, a request cycle with its `asyncio.Event`, a task, runs
the proxy-headers middleware, and arms and cancels a keep-alive timer. At 5,000
pollers x 20 events/s uvicorn's request path and its `send` were 59 % of the
server's samples (py-spy, 2026-11-29), the endpoint with its admission 26 %.
Read here instead, the same load's p99 went from 897 to 722 ms and its p50 from
437 to 355 ms (`python -m bench poll --clients 5000`, three interleaved runs).

So once uvicorn has answered a poll on a keep-alive connection (`take_over`),
this protocol takes the connection's bytes: a plain `GET /api/events?...` (the
request line and headers as the poller sends them, nothing uvicorn would treat
specially) is answered by the same endpoint, with the same scope, in one write.
Forwarded-for and -proto headers (a proxy's) go through uvicorn's own
proxy-headers middleware, run on the scope alone. Anything else (another path or
method, a body, an upgrade, an Origin for the CORS layer, a malformed line) goes
back to uvicorn's protocol with the bytes unread, which answers it as it always
did, and keeps the connection. uvicorn still owns the connection's bookkeeping: it is in the
server's connection set (graceful shutdown asks it to close there, which comes
here: a waiting poll is answered first), our tasks are in its task set, and its
`connection_lost` runs when the connection ends.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from dualcast.direct import default_header_lines
from dualcast.upgrade import HEAD_TIMEOUT

try:
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle as HttpToolsCycle
except ImportError:  # pragma: no cover - uvicorn without httptools: nothing is taken over
    HttpToolsProtocol = HttpToolsCycle = None  # type: ignore[assignment,misc]
    STATUS_LINE = {}

log = logging.getLogger("dualcast")

#: What the endpoint returns: an `Answer` or a Starlette response (both have `body`).
Endpoint = Callable[[Request], Awaitable[Any]]

PATH = b"/api/events"
#: The scope key under which a poll served here finds its connection (`watch`).
CONNECTION = "dualcast.poll_connection"
#: A request head longer than this goes back to uvicorn (which has its own limits).
MAX_HEAD = 8192
#: Headers that make a request more than a plain poll: a body, an upgrade, a CORS
#: request (server/cors.py).
_HAND_BACK = frozenset((
    b"content-length", b"transfer-encoding", b"upgrade", b"expect", b"origin",
))
#: What uvicorn's proxy-headers middleware reads (behind nginx, every request has both).
_FORWARDED = frozenset((b"x-forwarded-for", b"x-forwarded-proto"))
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(rb"[\x21-\x7e]*")  # visible ASCII, as httptools takes a target
#: A control character other than a tab: httptools refuses a header value holding one
#: (400), so a poll carrying one goes back to uvicorn, which answers it so. Taken here,
#: it was served, and with DUALCAST_AUTH_URL its Cookie went on to the application,
#: which cannot take it (httpx refuses a NUL; an application behind uvicorn answers
#: 400): the poll got 503 and the hook was counted and logged as failing.
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def parse_poll(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bool] | None:
    """(query string, headers with lower-case names, whether any is a forwarded-for or
    -proto header) of a plain HTTP/1.1 `GET /api/events` head (without its final blank
    line), or None for anything else."""
    lines = head.split(b"\r\n")
    request_line = lines[0]
    if not request_line.startswith(b"GET /api/events") or not request_line.endswith(
            b" HTTP/1.1"):
        return None
    target = request_line[4:-9]
    path, sep, query = target.partition(b"?")
    if path != PATH or b"#" in target or not _TARGET.fullmatch(target):
        return None
    headers: list[tuple[bytes, bytes]] = []
    forwarded = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or _CTL.search(value) is not None:
            return None
        name = name.lower()
        value = value.strip(b" \t")
        if name in _HAND_BACK or (name == b"connection" and value.lower() != b"keep-alive"):
            return None
        forwarded = forwarded or name in _FORWARDED
        headers.append((name, value))
    return (query if sep else b""), headers, forwarded


def take_over(scope: Scope, send: Send, endpoint: Endpoint) -> None:
    """After `endpoint` answered the request of `scope` through uvicorn's `send`: take
    the keep-alive connection's next requests, if nothing makes that unsafe."""
    cycle = getattr(send, "__self__", None)
    if HttpToolsCycle is None or not isinstance(cycle, HttpToolsCycle):
        return
    transport = cycle.transport
    if (not cycle.response_complete or not cycle.keep_alive or cycle.disconnected
            or transport.is_closing()):
        return
    proto = transport.get_protocol()
    if (not isinstance(proto, HttpToolsProtocol) or proto.cycle is not cycle
            or proto.scope is not cycle.scope  # the next request has begun
            or proto.pipeline or proto.limit_concurrency is not None or proto.root_path
            or proto.access_log or proto.flow.write_paused):
        return
    app = scope["app"]
    if proto.app is app:
        proxy = None
    elif isinstance(proto.app, ProxyHeadersMiddleware) and proto.app.app is app:
        # uvicorn's own middleware, run on the scope alone when a request has its headers
        proxy = _rewriter(proto.config.forwarded_allow_ips)
    else:  # something else wraps the app (uvicorn's trace logging, say): it stays uvicorn's
        return
    proto._unset_keepalive_if_required()  # ours from now on
    conn = PollConnection(proto, app, endpoint, scope["asgi"], proxy)
    transport.set_protocol(conn)
    # A stopping server asks each connection in its set to shut down, and this one's
    # entry is uvicorn's protocol, whose last request has ended: it would close the
    # connection under a poll waiting here, which then got no answer at all.
    proto.shutdown = conn.shutdown  # type: ignore[method-assign]
    conn.idle()


_ok: tuple[object, bytes] = (None, b"")


def _ok_head(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The status line and default header lines of a 200: one bytes object per list of
    default headers (a new one each second, for the date), so that `Answer.wire` can
    keep a whole response by its identity."""
    global _ok
    if _ok[0] is not headers:
        _ok = (headers, STATUS_LINE[200] + default_header_lines(headers))
    return _ok[1]


_rewriters: dict[str | tuple[str, ...], ProxyHeadersMiddleware] = {}


def _rewriter(trusted: list[str] | str) -> ProxyHeadersMiddleware:
    """One proxy-headers middleware per trusted-hosts setting, shared by the connections
    (one each cost about 2 KB per poller)."""
    key = trusted if isinstance(trusted, str) else tuple(trusted)
    rewriter = _rewriters.get(key)
    if rewriter is None:
        # (uvicorn types ASGI with its own TypedDicts; Starlette's are plain mappings)
        rewriter = _rewriters[key] = ProxyHeadersMiddleware(
            _scope_only, trusted)  # type: ignore[arg-type]
    return rewriter


async def _scope_only(scope: Scope, receive: Receive, send: Send) -> None:
    """The app behind the proxy-headers middleware when only its scope rewrite is wanted."""


async def _no_receive() -> Message:
    raise RuntimeError("a long-poll has no request body")  # pragma: no cover


async def _no_send(message: Message) -> None:
    raise RuntimeError("the poll connection writes the answer")  # pragma: no cover


class PollConnection(asyncio.Protocol):
    """Plain polls answered here; anything else handed back to uvicorn's protocol."""

    def __init__(self, proto: HttpToolsProtocol, app: Any, endpoint: Endpoint,
                 asgi: dict[str, str], proxy: ProxyHeadersMiddleware | None) -> None:
        self.proto = proto
        self.transport: asyncio.Transport = proto.transport
        self.app = app
        self.endpoint = endpoint
        self.asgi = asgi
        self.proxy = proxy
        self.buf = bytearray()
        self.busy = False
        self.closed = False
        self.paused = False
        #: The server is stopping: the poll being served is the last one (`shutdown`).
        self.leaving = False
        self.timer: asyncio.TimerHandle | None = None
        #: While a request head has begun and not ended (`HEAD_TIMEOUT`).
        self.head_timer: asyncio.TimerHandle | None = None
        self.on_lost: Callable[[], None] | None = None

    # asyncio.Protocol -----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._unset_timer()
        self.buf += data
        if self.busy:  # the client sent its next request before this answer: it waits
            if len(self.buf) > MAX_HEAD and not self.paused:
                self.paused = True
                self.transport.pause_reading()
            return
        self._next()

    def eof_received(self) -> None:
        self.proto.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._unset_timer()
        self._unset_head_timer()
        self.proto.connection_lost(exc)
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()

    def pause_writing(self) -> None:
        self.proto.pause_writing()

    def resume_writing(self) -> None:
        self.proto.resume_writing()

    # requests --------------------------------------------------------------------

    def _next(self) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._hand_back()
            elif not buf:
                self.idle()
            elif self.head_timer is None:
                # half a head: it must end in time, as on uvicorn's side (server/upgrade.py)
                self.head_timer = self.proto.loop.call_later(HEAD_TIMEOUT, self._expire)
            return
        self._unset_head_timer()
        parsed = parse_poll(bytes(buf[:end]))
        if parsed is None:
            self._hand_back()
            return
        del buf[: end + 4]
        query, headers, forwarded = parsed
        proto = self.proto
        scope = {
            "type": "http", "asgi": self.asgi, "http_version": "1.1",
            "server": proto.server, "client": proto.client, "scheme": proto.scheme,
            "root_path": "", "headers": headers, "state": proto.app_state.copy(),
            "method": "GET", "path": "/api/events", "raw_path": PATH, "query_string": query,
            "app": self.app, CONNECTION: self,
        }
        self.busy = True
        task = proto.loop.create_task(self._serve(scope, forwarded))
        proto.tasks.add(task)
        task.add_done_callback(proto.tasks.discard)

    async def _serve(self, scope: Scope, forwarded: bool) -> None:
        try:
            if forwarded and self.proxy is not None:
                # the client and scheme, as uvicorn sets them
                await self.proxy(scope, _no_receive, _no_send)  # type: ignore[arg-type]
            response = await self.endpoint(Request(scope))
            wire = self._wire(response)
        except Exception:
            log.exception("Exception in the long-poll endpoint")
            wire = None
        self.busy = False
        if self.closed:
            return
        if wire is None:  # as uvicorn answers an application error
            self.transport.write(self._head(500) + b"content-type: text/plain; charset=utf-8"
                                 b"\r\ncontent-length: 21\r\nconnection: close\r\n\r\n"
                                 b"Internal Server Error")
            self.transport.close()
            return
        self.proto.server_state.total_requests += 1
        if self.leaving:
            # (after the status line: the client must not send its next poll down here)
            self.transport.write(wire.replace(b"\r\n", b"\r\nconnection: close\r\n", 1))
            self.transport.close()
            return
        self.transport.write(wire)
        if self.paused:
            self._resume()
        self._next()

    def watch(self, gone: Callable[[], None]) -> Callable[[], None]:
        """Call `gone` if the client goes away while its poll waits; the undo."""
        self.on_lost = gone
        return self._unwatch

    def _unwatch(self) -> None:
        self.on_lost = None

    def _head(self, status: int) -> bytes:
        return STATUS_LINE[status] + default_header_lines(self.proto.server_state.default_headers)

    def _wire(self, response: Any) -> bytes:
        """The whole response as uvicorn would write it for these ASGI messages."""
        body: bytes = response.body
        raw = getattr(response, "raw_headers", None)
        if raw is None:  # an Answer (server/transports/poll.py): 200 with its fixed head
            wire: bytes = response.wire(_ok_head(self.proto.server_state.default_headers))
            return wire
        lines = b"".join(b"%s: %s\r\n" % (name.lower(), value) for name, value in raw)
        return b"%s%s\r\n%s" % (self._head(response.status_code), lines, body)

    def shutdown(self) -> None:
        """The server is stopping (uvicorn's `shutdown` of the connection): an idle
        connection is closed now, as uvicorn closes its own; a poll being served is
        answered first, with `connection: close`, and then the connection closes."""
        if self.busy:
            self.leaving = True
        elif not self.transport.is_closing():
            self.transport.close()

    def _hand_back(self) -> None:
        """uvicorn's protocol reads from here on, starting with the bytes not yet read."""
        self._unset_head_timer()
        data, self.buf = bytes(self.buf), bytearray()
        vars(self.proto).pop("shutdown", None)  # its own again
        self.transport.set_protocol(self.proto)
        if self.paused:
            self._resume()
        if data:
            self.proto.data_received(data)

    # keep-alive --------------------------------------------------------------------

    def _resume(self) -> None:
        self.paused = False
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def idle(self) -> None:
        """Between requests: closed after uvicorn's keep-alive timeout, as uvicorn does.
        (One alarm kept across requests instead, checking the idle time when it rang,
        measured no different: p99 719 vs 731 ms at 5,000 pollers, three runs each.)"""
        self._unset_timer()
        # (the protocol's loop: on Python 3.11 asyncio.get_running_loop() is a getpid())
        self.timer = self.proto.loop.call_later(
            self.proto.timeout_keep_alive, self._expire)

    def _expire(self) -> None:
        self.timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _unset_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _unset_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
