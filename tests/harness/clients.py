"""Recording subscribers for tests: one WebSocket, SSE or long-poll subscription each.

Each collects what a user would see in a `Seen`: event ids in arrival order, the
frames, resets, errors, the `welcome`, and how the connection closed. They run on
the harness's lean connections (`tests.harness.lean`), like the load generator.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from tests.harness.lean import PollConn, SSEConn, WSConn
from tests.harness.waits import cancel
from tests.harness.wire import with_query

Transport = Literal["ws", "sse", "poll"]
TRANSPORTS: tuple[Transport, ...] = ("ws", "sse", "poll")


@dataclass
class Seen:
    ids: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    resets: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    welcome: dict[str, Any] | None = None
    #: the WebSocket close code (1006: the connection went away without one)
    closed: int | None = None
    last_id: str | None = None

    def add_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.ids.append(event["id"])
        self.last_id = event["id"]


def flatten(frame: dict[str, Any]) -> list[dict[str, Any]]:
    if frame.get("type") == "batch":
        return list(frame["events"])
    return [frame]


def host_port(base: str) -> tuple[str, int]:
    parts = urlsplit(base)
    assert parts.hostname is not None and parts.port is not None, base
    return parts.hostname, parts.port


async def _opened(conn: WSConn | SSEConn, within: float) -> None:
    """Wait until `conn` is ready (welcome) or has ended, whichever comes first."""
    either: set[asyncio.Future[Any]] = {conn.ready, conn.done}
    await asyncio.wait_for(asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED), within)


class _WSRecorder(WSConn):
    def __init__(self, owner: WSClient, host: str, port: int, path: str,
                 headers: dict[str, str]) -> None:
        super().__init__(host, port, path, headers)
        self.owner = owner

    def on_message(self, payload: bytes) -> None:
        seen = self.owner.seen
        for item in flatten(json.loads(payload)):
            seen.frames.append(item)
            kind = item.get("type")
            if kind == "welcome":
                seen.welcome = item
                seen.last_id = item["last_id"]
                self.set_ready()
            elif kind == "event":
                seen.add_event(item)
            elif kind == "reset":
                seen.resets.append(item["last_id"])
                seen.last_id = item["last_id"]
            elif kind == "error":
                seen.errors.append(item)


class WSClient:
    """A WebSocket subscriber that records every frame until closed."""

    def __init__(self, base: str, **query: str | None) -> None:
        self.host, self.port = host_port(base)
        self.path = with_query("/api/ws", query)
        self.seen = Seen()
        self.conn: _WSRecorder | None = None

    async def __aenter__(self) -> WSClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, headers: dict[str, str] | None = None,
                      origin: str | None = None) -> None:
        """Open and wait for `welcome` (or the server closing first); a refusal raises."""
        headers = dict(headers or {})
        if origin is not None:
            headers["Origin"] = origin
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(
            lambda: _WSRecorder(self, self.host, self.port, self.path, headers),
            self.host, self.port), 10)
        self.conn = conn
        conn.done.add_done_callback(self._ended)
        await _opened(conn, 10)
        if not conn.upgraded:
            raise ConnectionRefusedError(conn.close_reason)

    def _ended(self, _: object) -> None:
        assert self.conn is not None
        self.seen.closed = self.conn.close_code if self.conn.close_code is not None else 1006

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        """Send a text frame (a dict as JSON), or a binary frame for bytes."""
        assert self.conn is not None
        if isinstance(frame, bytes):
            self.conn.send_frame(0x2, frame)
        else:
            self.conn.send_text(frame if isinstance(frame, str) else json.dumps(frame))

    async def close(self) -> None:
        """The closing handshake (1000); the connection is dropped if it takes over 5 s."""
        conn = self.conn
        if conn is None or conn.done.done():
            return
        conn.start_close(1000)
        try:
            await asyncio.wait_for(asyncio.shield(conn.done), 5)
        except TimeoutError:
            conn.abort()
            await asyncio.wait_for(asyncio.shield(conn.done), 5)


class _SSERecorder(SSEConn):
    def __init__(self, owner: SSEClient, host: str, port: int, path: str,
                 headers: dict[str, str]) -> None:
        super().__init__(host, port, path, headers)
        self.owner = owner

    def on_event(self, event: bytes, last_id: bytes | None, data: bytes) -> None:
        seen = self.owner.seen
        name = event.decode()
        item: Any = json.loads(data) if data else None
        if name == "welcome":
            seen.welcome = item
            seen.last_id = item["last_id"]
            self.set_ready()
        elif name == "reset":
            seen.resets.append(item["last_id"])
            seen.last_id = item["last_id"]
        elif name == "error" and last_id is None:
            seen.errors.append(item)
        else:
            seen.add_event({"id": last_id.decode() if last_id is not None else None,
                            "event": name, "data": item})

    def on_retry(self, ms: int) -> None:
        self.owner.retries.append(ms)

    def on_refused(self, status: int, body: bytes) -> None:
        self.owner.body = body.decode(errors="replace")


class SSEClient:
    """An SSE subscriber: `status` and `body` of a refusal, `retries`, `ended` when it ends."""

    def __init__(self, base: str, headers: dict[str, str] | None = None,
                 **query: str | None) -> None:
        self.host, self.port = host_port(base)
        self.path = with_query("/api/sse", query)
        self.headers = headers or {}
        self.seen = Seen()
        self.body = ""
        self.retries: list[int] = []
        self.ended = asyncio.Event()
        self.conn: _SSERecorder | None = None

    @property
    def status(self) -> int | None:
        if self.conn is None or not self.conn.http.have_head:
            return None
        return self.conn.http.status

    async def __aenter__(self) -> SSEClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, wait_welcome: bool = True) -> None:
        """Open the stream; with `wait_welcome`, until `welcome` or the stream's end."""
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: _SSERecorder(self, self.host, self.port, self.path, self.headers),
                self.host, self.port), 10)
        except OSError:
            self.ended.set()
            return
        self.conn = conn
        conn.done.add_done_callback(lambda _: self.ended.set())
        if wait_welcome:
            await _opened(conn, 10)

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            await asyncio.wait_for(asyncio.shield(self.conn.done), 5)


@dataclass
class Answer:
    """One long-poll answer, as a test reads it."""

    status_code: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)  # the body's JSON, whatever its shape


class _PollRecorder(PollConn):
    def __init__(self, host: str, port: int, path: str, first_query: str) -> None:
        super().__init__(host, port, path, first_query)
        self.answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()

    def next_answer(self) -> asyncio.Future[Answer]:
        if self.answer.done():
            self.answer = asyncio.get_running_loop().create_future()
        return self.answer

    def on_answer(self, status: int, body: bytes) -> None:
        if not self.answer.done():
            self.answer.set_result(Answer(status, body.decode(errors="replace")))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.answer.done():
            self.answer.set_exception(ConnectionError(self.close_reason))
            self.answer.exception()


class Poller:
    """A long-polling subscriber that follows `last_id` from answer to answer."""

    def __init__(self, base: str, after: str | None = None, **query: str | None) -> None:
        self.host, self.port = host_port(base)
        self.path = with_query("/api/events", query)
        self.after = after
        self.seen = Seen()
        self.conn: _PollRecorder | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def poll_once(self, timeout: float = 5) -> Answer:
        """One request (`after` the last answer's cursor); a 200 answer is recorded."""
        query = with_query("", {"timeout": f"{timeout:g}", "after": self.after})[1:]
        conn = self.conn
        if conn is None or conn.closed:
            loop = asyncio.get_running_loop()
            _, fresh = await asyncio.wait_for(loop.create_connection(
                lambda: _PollRecorder(self.host, self.port, self.path, query),
                self.host, self.port), 10)
            self.conn = fresh
            pending = fresh.answer
        else:
            pending = conn.next_answer()
            conn.ask(query)
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
        # that arrives as the answer does, and a closed Poller would poll on.
        async with asyncio.timeout(timeout + 30):
            answer = await pending
        if answer.status_code == 200:
            body = answer.json()
            for event in body["events"]:
                self.seen.add_event(event)
            if body["reset"]:
                self.seen.resets.append(body["last_id"])
            self.after = body["last_id"]
        return answer

    async def _loop(self) -> None:
        while not self._closing:
            try:
                await self.poll_once(5)
            except (OSError, TimeoutError):
                await asyncio.sleep(0.2)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        self._closing = True
        await cancel(self._task)
        if self.conn is not None:
            self.conn.close()


Subscriber = WSClient | SSEClient | Poller


async def subscribe(transport: Transport, base: str, after: str | None = None,
                    **query: str | None) -> Subscriber:
    """A live subscriber over `transport` to the server at `base` (its http:// URL).

    With `after`, it resumes after that id the way each transport's clients do
    (WS `last_event_id`, SSE `Last-Event-ID`, poll `after`); without, it starts at
    the head of the stream. Returns once the subscription is live; close it after.
    """
    if transport == "ws":
        ws = WSClient(base.replace("http://", "ws://", 1), last_event_id=after, **query)
        await ws.connect()
        return ws
    if transport == "sse":
        sse = SSEClient(base, {"Last-Event-ID": after} if after else None, **query)
        await sse.connect()
        return sse
    poller = Poller(base, after=after, **query)
    if after is None:
        await poller.poll_once(0)  # the head: later answers hold only what came after it
    poller.start()
    return poller
