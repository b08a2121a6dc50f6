"""One connection per object over raw asyncio protocols: WebSocket, SSE and long-poll.

The one client stack of tests and bench. Each class speaks its protocol and hands
what arrives to a hook a subclass fills in: `on_message` (a WebSocket text frame),
`on_event` (an SSE message), `on_answer` (a long-poll answer). The load generator's
counting clients, the resuming `Follower` and the tests' recording clients are all
such subclasses, so a protocol is parsed in one place only.

Every connection ends once, with a reason in `close_reason` that `done` also
resolves to: ``"ws <code>"`` (a close frame from the server), ``"sse end"`` (the
server ended the stream), ``"refused: <status line>"``, ``"lost"`` (the TCP
connection went away), or whatever the owner passed to `end()`.
"""

from __future__ import annotations

import asyncio

from tests.harness.wire import HTTPBody, get_request, header_lines, mask_frame, upgrade_request


class Conn(asyncio.Protocol):
    """Shared bookkeeping: the request written on connect, `ready`, `done`, `close_reason`."""

    def __init__(self, host: str, port: int, path: str,
                 headers: dict[str, str] | None = None) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.headers = headers or {}
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        loop = asyncio.get_running_loop()
        #: resolved by the subclass when the connection is usable (e.g. on `welcome`)
        self.ready: asyncio.Future[None] = loop.create_future()
        #: resolved with `close_reason` when the connection has ended
        self.done: asyncio.Future[str] = loop.create_future()
        self.closed = False
        self.close_reason = ""

    # asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport
        self.transport.write(self.request())  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.close_reason:
            self.close_reason = f"lost: {exc!r}" if exc else "lost"
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(self.close_reason))
            self.ready.exception()  # retrieved: an owner that never awaits it is not an error
        if not self.done.done():
            self.done.set_result(self.close_reason)

    # for subclasses and owners ---------------------------------------------------------
    def request(self) -> bytes:
        raise NotImplementedError

    def set_ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def end(self, reason: str) -> None:
        """Close the connection, remembering why (the first reason given wins)."""
        if not self.close_reason:
            self.close_reason = reason
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def fail(self, reason: str) -> None:
        """The connection cannot be used: `ready` raises `ConnectionError(reason)`."""
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
            self.ready.exception()
        self.end(reason)

    def close(self) -> None:
        self.end("closed by client")

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake, as a lost network does."""
        if self.transport is not None:
            self.transport.abort()


class WSConn(Conn):
    """RFC 6455 client: handshake, unmasked server frames in, masked client frames out."""

    def __init__(self, host: str, port: int, path: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(host, port, path, headers)
        self.upgraded = False
        self.fragments: list[bytes] = []
        #: the code of the server's close frame, once one came
        self.close_code: int | None = None

    def request(self) -> bytes:
        return upgrade_request(self.path, self.host, self.port, header_lines(self.headers))

    def send_text(self, text: str | bytes) -> None:
        payload = text.encode() if isinstance(text, str) else text
        self.send_frame(0x1, payload)

    def send_frame(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(mask_frame(opcode, payload))

    def start_close(self, code: int = 1000) -> None:
        """Send a close frame; the connection ends when the server answers with its own."""
        self.send_frame(0x8, code.to_bytes(2, "big"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:end]).split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" ":
                self.fail(f"refused: {status.decode(errors='replace')}")
                return
            del buf[: end + 4]
            self.upgraded = True
            self.on_open()
        while True:
            n = len(buf)
            if n < 2:
                return
            length = buf[1] & 0x7F
            if length < 126:
                start = 2
            elif length == 126:
                if n < 4:
                    return
                length = (buf[2] << 8) | buf[3]
                start = 4
            else:
                if n < 10:
                    return
                length = int.from_bytes(buf[2:10], "big")
                start = 10
            end = start + length
            if n < end:
                return
            head = buf[0]
            payload = bytes(buf[start:end])
            del buf[:end]
            opcode = head & 0x0F
            if not head & 0x80:  # fragment: keep until FIN
                self.fragments.append(payload)
                continue
            if opcode == 0 and self.fragments:
                payload = b"".join(self.fragments) + payload
                self.fragments.clear()
                opcode = 0x1
            if opcode == 0x1 or opcode == 0x2:
                self.on_message(payload)
            elif opcode == 0x9:
                self.send_frame(0xA, payload)
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close_code = code
                self.send_frame(0x8, payload[:2])
                self.end(f"ws {code}")
                return

    def on_open(self) -> None:
        """The upgrade was accepted."""

    def on_message(self, payload: bytes) -> None:
        raise NotImplementedError


class SSEConn(Conn):
    """Server-Sent Events over raw HTTP: one `on_event(event, id, data)` per message.

    Several messages may arrive in one write and one message may span writes. A
    refusal (any status but 200) is read to its end and given to `on_refused`.
    """

    def __init__(self, host: str, port: int, path: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(host, port, path, headers)
        self.http = HTTPBody()
        self.text = bytearray()
        self.refusal = bytearray()
        self.event: bytes | None = None
        self.last_id: bytes | None = None
        self.data: bytes | None = None

    def request(self) -> bytes:
        extra = "Accept: text/event-stream\r\n" + header_lines(self.headers)
        return get_request(self.path, self.host, self.port, extra)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        http = self.http
        if not http.have_head and not http.head(buf):
            return
        if http.status != 200:
            self.refusal += http.body(buf)
            if http.done:
                self._refused()
            return
        text = self.text
        text += http.body(buf)
        end = text.rfind(b"\n")
        if end >= 0:
            block = bytes(text[:end])
            del text[: end + 1]
            self._lines(block)
        if http.done:
            self.end("sse end")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.http.have_head and self.http.status != 200 and not self.close_reason:
            self._refused()  # a refusal whose body ran until close
        super().connection_lost(exc)

    def _refused(self) -> None:
        self.on_refused(self.http.status, bytes(self.refusal))
        self.fail(f"refused: HTTP {self.http.status}")

    def _lines(self, block: bytes) -> None:
        """Parse complete lines; a message is dispatched at the blank line that ends it.

        The load generator runs this for every event it receives, so a field is
        told by its first three bytes and CRs are dealt with once per block
        (lines ending in a lone CR, which no server here sends, are not split).
        """
        if b"\r" in block:  # CRLF line ends; the block was cut just before its last LF
            block = block.replace(b"\r\n", b"\n").removesuffix(b"\r")
        event, last_id, data = self.event, self.last_id, self.data
        on_event = self.on_event
        for line in block.split(b"\n"):
            if not line:
                if data is not None or event is not None:
                    on_event(event or b"message", last_id, data if data is not None else b"")
                event = last_id = data = None
                continue
            field = line[:3]  # enough to tell apart the fields servers send
            if field == b"dat":
                value = line[6:] if line[5:6] == b" " else line[5:]
                data = value if data is None else data + b"\n" + value
            elif field == b"id:":
                last_id = line[4:] if line[3:4] == b" " else line[3:]
            elif field == b"eve":
                event = line[7:] if line[6:7] == b" " else line[6:]
            elif field == b"ret":
                self.on_retry(int(line[6:]))
        self.event, self.last_id, self.data = event, last_id, data

    def on_event(self, event: bytes, last_id: bytes | None, data: bytes) -> None:
        raise NotImplementedError

    def on_retry(self, ms: int) -> None:
        """The server's `retry:` advice (milliseconds)."""

    def on_refused(self, status: int, body: bytes) -> None:
        """The stream was refused with `status`; `body` is the whole answer body."""


class PollConn(Conn):
    """Long-poll requests one after another on one keep-alive connection.

    `ask(query)` sends the next request; every complete answer goes to
    `on_answer(status, body)`, which usually asks again.
    """

    def __init__(self, host: str, port: int, path: str, first_query: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(host, port, path, headers)
        self.http = HTTPBody()
        self.body = bytearray()
        self.first_query = first_query
        self.answers = 0

    def _get(self, query: str) -> bytes:
        sep = "&" if "?" in self.path else "?"
        target = self.path + (sep + query if query else "")
        return get_request(target, self.host, self.port, header_lines(self.headers))

    def request(self) -> bytes:
        return self._get(self.first_query)

    def ask(self, query: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._get(query))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            http = self.http
            if not http.have_head and not http.head(buf):
                return
            self.body += http.body(buf)
            if not http.done:
                return
            body = bytes(self.body)
            self.body.clear()
            self.http = HTTPBody()
            self.answers += 1
            self.on_answer(http.status, body)
            if self.closed or self.transport is None or self.transport.is_closing():
                return

    def on_answer(self, status: int, body: bytes) -> None:
        raise NotImplementedError
