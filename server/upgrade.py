"""A WebSocket upgrade answered from httptools' parse of it, not parsed a second time.

uvicorn (0.54) hands an upgrade request to the WebSocket protocol as bytes: it
writes the method, URL and headers httptools had just parsed back into a request,
which websockets parses again (a generator step per line, a regex per header,
its `Headers`), checks (`process_request`: its header-list parsers), and from
which uvicorn then builds the ASGI scope, encoding every header back to bytes.
About 40 % of the server's CPU per WebSocket connect was that handshake
(py-spy, `python -m bench fleet --transports ws`). Here a plain upgrade goes
from httptools' pieces straight to the WebSocket protocol, which starts
websockets' frame parser as it would after parsing the request and answers with
the same 101: server CPU per WebSocket connect 557 -> 420 us, connects/s
1,750 -> 2,840 (`python -m bench fleet --clients 15000 --server-workers 2
--transports ws`, medians of four interleaved runs each, 2026-11-29).

"Plain" is checked here, header by header, against what websockets would make of
the request: a valid key and version 13, one `Upgrade: websocket`, well-formed
`Connection` and `Sec-WebSocket-Protocol` lists, at most one Origin, no body, no
extension offer when extensions are on, every line within websockets' limits,
every value as websockets would store it. Anything else (a request websockets
would refuse or answer otherwise, bytes behind the request in the same segment,
TLS, debug logging) takes uvicorn's path unchanged, so every refusal is the one
websockets gives. uvicorn, websockets and httptools versions other than the ones
this was written against get uvicorn's protocol (`HTTP_PROTOCOL`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import re
from typing import Any

import uvicorn
import websockets.http11
from uvicorn.config import Config
from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.utils import is_ssl
from uvicorn.server import ServerState
from websockets.http11 import MAX_NUM_HEADERS
from websockets.utils import accept_key
from websockets.version import version as websockets_version

from dualcast.direct import default_header_lines
from dualcast.loops import running_loop
from dualcast.ws_protocol import Handshake, WebSocketProtocol, addresses

# A browser's WebSocket upgrade carries its token in the request line (it cannot set
# headers), and a token may be 8,192 characters (`auth.Authenticator.MAX_TOKEN`):
# websockets' default of 8 KiB per line answered such upgrades 414, so the longest tokens
# could never use WebSocket. Lines of 16 KiB are taken here and by websockets' own parser
# (it reads this module global on each parse), as the shipped nginx takes them; an
# operator's WEBSOCKETS_MAX_LINE_LENGTH wins. The whole head stays bounded at 64 KiB.
if "WEBSOCKETS_MAX_LINE_LENGTH" not in os.environ:
    websockets.http11.MAX_LINE_LENGTH = 16 * 1024
MAX_LINE_LENGTH = websockets.http11.MAX_LINE_LENGTH

try:
    import httptools
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
except ImportError:  # pragma: no cover - uvicorn without httptools: its own choice stands
    httptools = None  # type: ignore[assignment]
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

#: The most bytes one request's head (request line and headers) may take. httptools
#: sets no limit and uvicorn (0.54) none for it: a client could send headers without
#: end and every byte was kept (RSS +117 MB for one 200 MB head), the URL and any
#: one header value grown by concatenation. A browser's head is a few KB (a token in
#: the query, cookies); nginx refuses over 32 KB by default. Checked after each read
#: (a head that ends in the read that crosses the limit is served): what a connection
#: holds stays within this and one read.
MAX_REQUEST_HEAD = 64 * 1024
#: Seconds a refused connection is still read (and what it sends dropped) before it is
#: closed, so that its answer arrives before the reset a close with bytes unread causes.
LINGER = 1.0

#: Seconds a connection may take to send a whole request head, counted from its
#: opening or from the first byte of the head. uvicorn (0.54) times only the idle
#: time after an answer: a client that connected and sent nothing, or half a head,
#: held its connection (a file descriptor of the process's few thousand) for as long
#: as it liked. nginx allows 60 s (`client_header_timeout`); a head takes a client
#: one write.
HEAD_TIMEOUT = 10.0

class _Head:
    """What the request-head limits track for one connection, in one attribute.

    Why one: uvicorn's protocol objects share their attribute names in one table (a
    dict of ~300 B each) only up to 30 attributes; four more of our own gave every
    connection that stays on this protocol (an SSE stream) a table of its own, 1.3 KB
    (`python -m bench idle --connections 10000`: 13.0 -> 14.3 KB per idle SSE stream).
    """

    __slots__ = ("ended", "pending", "refused", "size", "timer")

    def __init__(self) -> None:
        self.timer: asyncio.TimerHandle | None = None
        #: A head has begun and not ended, and its bytes so far (`MAX_REQUEST_HEAD`).
        self.pending = False
        self.size = 0
        #: A request ended during the current `data_received` (its bytes are then not
        #: all the next request's).
        self.ended = False
        self.refused = False  # answered 431: what still comes is dropped

    def unset_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


#: The versions whose request path this module reproduces.
KNOWN = (uvicorn.__version__ == "0.54.0" and websockets_version.startswith("17.")
         and httptools is not None and httptools.__version__.startswith("0."))

# websockets' header grammar (RFC 9110 tokens; field values it stores after stripping
# spaces and tabs): a value matching _STORED is valid and already stripped.
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_EDGE, _INNER = rb"[\x21-\x7e\x80-\xff]", rb"[\x09\x20-\x7e\x80-\xff]"
_STORED = re.compile(b"(?:" + _EDGE + b"(?:" + _INNER + b"*" + _EDGE + b")?)?")
_OWS = b" \t"

#: Headers that make websockets read the request differently (a body) or that this
#: module does not check as websockets would: their requests take uvicorn's path.
_UNUSUAL = frozenset((b"transfer-encoding", b"content-length"))


def _tokens(value: bytes) -> list[bytes] | None:
    """The elements of a comma-separated token list, or None unless each is a token
    (websockets' `parse_list` accepts every such value and also some this refuses)."""
    items = [item.strip(_OWS) for item in value.split(b",")]
    return items if all(_TOKEN.fullmatch(item) for item in items) else None


def plain_handshake(method: str, url: bytes, headers: list[tuple[bytes, bytes]],
                    extensions_on: bool) -> Handshake | None:
    """What websockets would accept this upgrade request with, or None where it would
    refuse it or where this module cannot vouch for the answer.

    `headers` are httptools' (lowercased names, raw values) as uvicorn collected them.
    """
    if method != "GET" or len(headers) > MAX_NUM_HEADERS:
        return None
    if len(method) + len(url) + 12 > MAX_LINE_LENGTH:  # "GET <url> HTTP/1.1\r\n"
        return None
    try:
        path = url.decode("ascii")
    except UnicodeDecodeError:
        return None
    key = version = origin = None
    upgrades = 0
    connection_upgrade = False
    subprotocols: list[str] = []
    for name, value in headers:
        if (len(name) + len(value) + 4 > MAX_LINE_LENGTH or not _TOKEN.fullmatch(name)
                or not _STORED.fullmatch(value) or name in _UNUSUAL):
            return None
        if name == b"sec-websocket-key":
            if key is not None:
                return None
            key = value
        elif name == b"sec-websocket-version":
            if version is not None:
                return None
            version = value
        elif name == b"upgrade":
            upgrades += 1
            if value.lower() != b"websocket":
                return None
        elif name == b"connection":
            tokens = _tokens(value)
            if tokens is None:
                return None
            connection_upgrade = connection_upgrade or any(t.lower() == b"upgrade" for t in tokens)
        elif name == b"origin":
            if origin is not None:
                return None
            origin = value
        elif name == b"sec-websocket-protocol":
            tokens = _tokens(value)
            if tokens is None:
                return None
            subprotocols += [t.decode("ascii") for t in tokens]
        elif name == b"sec-websocket-extensions" and extensions_on:
            return None
    if key is None or version != b"13" or upgrades != 1 or not connection_upgrade:
        return None
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except binascii.Error:
        return None
    return Handshake(
        path=path, headers=headers, accept=accept_key(key.decode("ascii")),
        origin=None if origin is None else origin.decode("latin-1"),
        subprotocols=subprotocols,
    )


if KNOWN and HttpToolsProtocol is not None:

    class UpgradeProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, handing a plain WebSocket upgrade over parsed."""

        def __init__(self, config: Config, server_state: ServerState,
                     app_state: dict[str, Any], _loop: asyncio.AbstractEventLoop | None = None
                     ) -> None:
            # uvicorn looks the loop up itself when not given one (`dualcast.loops`)
            super().__init__(config, server_state, app_state, _loop or running_loop())

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            """uvicorn's, with the addresses the transport already holds (`addresses`)."""
            self.connections.add(self)
            self.transport = transport
            self.flow = FlowControl(transport)
            self.server, self.client = addresses(transport)
            self.scheme = "https" if is_ssl(transport) else "http"
            if self.logger.level <= TRACE_LOG_LEVEL:
                prefix = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
                self.logger.log(TRACE_LOG_LEVEL, "%sHTTP connection made", prefix)
            self._head = head = _Head()
            head.timer = self.loop.call_later(HEAD_TIMEOUT, self._head_timed_out)

        def connection_lost(self, exc: Exception | None) -> None:
            self._head.unset_timer()
            super().connection_lost(exc)

        def _head_timed_out(self) -> None:
            """No whole request head in `HEAD_TIMEOUT`: the connection is closed (a
            client that sends nothing is told nothing, as uvicorn's keep-alive does)."""
            self._head.timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            # uvicorn's, but for the upgrade: its HttpParserUpgrade carries where the
            # request ended in `data`, which uvicorn's method does not keep.
            head = self._head
            if head.refused:
                return  # (read to be dropped: see `_refuse_head`)
            self._unset_keepalive_if_required()
            head.ended = False
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
                return
            except httptools.HttpParserUpgrade as upgrade:
                if not self._should_upgrade():
                    self._unsupported_upgrade_warning()
                elif not (upgrade.args and upgrade.args[0] == len(data)
                          and self.upgrade_parsed()):
                    self.handle_websocket_upgrade()
                    # Frames the client sent right behind its request, in the same read
                    # (a client that does not wait for the 101): uvicorn passes on the
                    # request alone and they were lost, a first `join` or `auth` unanswered.
                    rest = data[upgrade.args[0]:] if upgrade.args else b""
                    protocol = self.transport.get_protocol()
                    if rest and isinstance(protocol, WebSocketProtocol):
                        protocol.hold_early(rest)
                return
            if head.pending:
                # (a chunk in which an earlier request ended also holds its tail: not
                # counted, so at most one read's worth goes uncounted, none twice)
                if not head.ended:
                    head.size += len(data)
                if head.size > MAX_REQUEST_HEAD:
                    self._refuse_head()
            elif (head.timer is None and self.timeout_keep_alive_task is None
                  and (self.cycle is None or self.cycle.response_complete)
                  and not self.pipeline):
                # Bytes that begin no request (the blank lines a client may send between
                # requests) cancelled uvicorn's keep-alive timer above and start no
                # head: without a timer the idle connection was kept forever.
                head.timer = self.loop.call_later(HEAD_TIMEOUT, self._head_timed_out)

        def on_message_begin(self) -> None:
            head = self._head
            head.pending, head.size = True, 0
            if head.timer is None:
                head.timer = self.loop.call_later(HEAD_TIMEOUT, self._head_timed_out)
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._head.pending = False
            self._head.unset_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._head.ended = True
            super().on_message_complete()

        def _refuse_head(self) -> None:
            """431, then the end of what this connection sends; what the client still sends
            is read and dropped for a moment before the close, since closing a socket
            with bytes unread resets the connection and the client would never see why."""
            self._head.pending, self._head.refused = False, True
            self.logger.warning("Request head over %d bytes refused.", MAX_REQUEST_HEAD)
            msg = b"Request header fields too large."
            transport = self.transport
            transport.write(b"".join((
                STATUS_LINE[431], default_header_lines(self.server_state.default_headers),
                b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n" % len(msg), msg)))
            if transport.can_write_eof():
                transport.write_eof()
                self.loop.call_later(LINGER, transport.close)
            else:
                transport.close()

        def upgrade_parsed(self) -> bool:
            """Answer the upgrade request httptools parsed without writing it out for
            websockets to parse again; False, having done nothing, where it is not plain."""
            ws_class = self.ws_protocol_class
            if (not isinstance(ws_class, type) or not issubclass(ws_class, WebSocketProtocol)
                    or self.scheme != "http" or self.logger.isEnabledFor(logging.DEBUG)):
                return False
            handshake = plain_handshake(self.scope["method"], self.url, self.headers,
                                        bool(self.config.ws_per_message_deflate))
            if handshake is None:
                return False
            self.connections.discard(self)
            protocol = ws_class(config=self.config, server_state=self.server_state,
                                app_state=self.app_state, _loop=self.loop)
            protocol.connection_made(self.transport)
            protocol.handshake_parsed(handshake)
            self.transport.set_protocol(protocol)
            return True

    HTTP_PROTOCOL: Any = UpgradeProtocol
else:  # pragma: no cover - other versions: uvicorn's own choice
    HTTP_PROTOCOL = "auto"
