"""Clients that keep following the stream across losses, as the dashboard does.

On any loss a `Follower` comes back with its last id (WS `last_event_id`, SSE
`Last-Event-ID`, poll `after`), SSE honouring the server's `retry:`, the others
after a jittered backoff. Its `Record` is what its user saw across reconnects:
every event id in arrival order, every way a connection ended (`closes`), every
`reset`, the `retry:` values and when each (re)connect completed.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import orjson

from tests.harness.lean import Conn, PollConn, SSEConn, WSConn
from tests.harness.waits import cancel

__all__ = ["Close", "Follower", "Kind", "Record", "Stuck", "start_followers"]

Kind = Literal["ws", "sse", "poll"]


@dataclass
class Close:
    """How one connection ended, as the client saw it."""

    at: float
    how: str  # "ws 1001", "sse end", "lost", "refused: ...", "connect: ..."

    @property
    def by_server(self) -> bool:
        return self.how.startswith(("ws ", "sse end"))


@dataclass
class Record:
    ids: list[str] = field(default_factory=list)
    closes: list[Close] = field(default_factory=list)
    resets: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    retries: list[int] = field(default_factory=list)
    connected_at: list[float] = field(default_factory=list)
    last_id: str | None = None
    #: the cursor of the first `welcome`: where this client's view of the stream starts
    first_welcome: str | None = None


class _FollowWS(WSConn):
    def __init__(self, owner: Follower) -> None:
        super().__init__(owner.host, owner.port, owner.path())
        self.owner = owner

    def on_message(self, payload: bytes) -> None:
        self.owner.frame(orjson.loads(payload), self)


class _FollowSSE(SSEConn):
    def __init__(self, owner: Follower) -> None:
        last = owner.record.last_id
        super().__init__(owner.host, owner.port, owner.path(),
                         {"Last-Event-ID": last} if last else None)
        self.owner = owner

    def on_event(self, event: bytes, last_id: bytes | None, data: bytes) -> None:
        item = orjson.loads(data) if data else None
        if event == b"welcome" or event == b"reset" or last_id is None:
            self.owner.frame({"type": event.decode(), **(item if isinstance(item, dict) else {})}, self)
        else:
            self.owner.event(last_id.decode(), item)

    def on_retry(self, ms: int) -> None:
        self.owner.record.retries.append(ms)
        self.owner.retry_ms = ms


class _FollowPoll(PollConn):
    """Each answer is a batch of events plus the cursor for the next request."""

    def __init__(self, owner: Follower) -> None:
        super().__init__(owner.host, owner.port, owner.path(), self._query(owner))
        self.owner = owner

    @staticmethod
    def _query(owner: Follower) -> str:
        after = owner.record.last_id
        if after is None:
            return "timeout=0"
        return f"after={quote(after)}&timeout={owner.poll_wait}"

    def on_answer(self, status: int, body: bytes) -> None:
        if status != 200:
            self.fail(f"refused: HTTP {status}")
            return
        answer = orjson.loads(body)
        owner = self.owner
        if not self.ready.done():
            owner.frame({"type": "welcome", "last_id": answer["last_id"]}, self)
        if answer.get("reset"):
            owner.frame({"type": "reset", "last_id": answer["last_id"]}, self)
        for item in answer["events"]:
            owner.event(item["id"], item.get("data"))
        owner.record.last_id = answer["last_id"]
        self.ask(self._query(owner))


class Follower:
    """A client that keeps following the stream across losses, as the dashboard does."""

    def __init__(
        self, kind: Kind, host: str, port: int, token: str | None = None,
        rooms: str | None = None, last_id: str | None = None, reconnect: bool = True,
        backoff: tuple[float, float] = (0.05, 0.5), latencies: bool = False,
        poll_wait: int = 5,
    ) -> None:
        assert kind in ("ws", "sse", "poll")
        self.kind = kind
        self.host = host
        self.port = port
        self.token = token
        self.rooms = rooms
        self.reconnect = reconnect
        self.backoff = backoff
        self.poll_wait = poll_wait
        self.record = Record(last_id=last_id)
        #: seconds from the producer's `t` to arrival, when asked for (bench scripts)
        self.latencies: list[float] | None = [] if latencies else None
        self.retry_ms: int | None = None
        self.conn: Conn | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.live = asyncio.Event()

    # what the user saw --------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        return self.record.ids

    def event(self, entry_id: str, data: Any = None) -> None:
        self.record.ids.append(entry_id)
        self.record.last_id = entry_id
        if self.latencies is not None and isinstance(data, dict) and "t" in data:
            self.latencies.append(time.time() - data["t"])

    def frame(self, frame: dict[str, Any], conn: Conn) -> None:
        """One dualcast frame, whatever transport carried it."""
        kind = frame.get("type")
        if kind == "batch":
            for item in frame["events"]:
                self.event(item["id"], item.get("data"))
        elif kind == "event":
            self.event(frame["id"], frame.get("data"))
        elif kind == "welcome":
            if self.record.first_welcome is None:
                self.record.first_welcome = frame["last_id"]
            if self.record.last_id is None:
                self.record.last_id = frame["last_id"]
            conn.set_ready()
        elif kind == "reset":
            self.record.resets.append(frame["last_id"])
            self.record.last_id = frame["last_id"]
        elif kind == "error":
            self.record.errors.append(frame)

    # connection loop ----------------------------------------------------------------
    def path(self) -> str:
        base = {"ws": "/api/ws", "sse": "/api/sse", "poll": "/api/events"}[self.kind]
        params = []
        if self.token:
            params.append(f"token={quote(self.token)}")
        if self.rooms:
            params.append(f"rooms={quote(self.rooms)}")
        if self.kind == "ws" and self.record.last_id is not None:
            params.append(f"last_event_id={quote(self.record.last_id)}")
        return base + ("?" + "&".join(params) if params else "")

    def new_conn(self) -> Conn:
        if self.kind == "ws":
            return _FollowWS(self)
        if self.kind == "sse":
            return _FollowSSE(self)
        return _FollowPoll(self)

    async def connect_once(self, within: float = 10.0) -> Conn:
        """Open one connection and wait for its `welcome` (raises on failure)."""
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(self.new_conn, self.host, self.port), within)
        self.conn = conn
        try:
            await asyncio.wait_for(asyncio.shield(conn.ready), within)
        except BaseException:
            conn.end("connect: no welcome")
            raise
        self.record.connected_at.append(time.monotonic())
        self.live.set()
        return conn

    async def run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                conn = await self.connect_once()
                failures = 0
            except (OSError, TimeoutError, ConnectionError) as exc:
                failures += 1
                self.record.closes.append(Close(time.monotonic(), f"connect: {exc!r}"[:120]))
                if not self.reconnect:
                    return
                cap = min(self.backoff[1] * 2 ** min(failures, 4), 3.0)
                await asyncio.sleep(random.uniform(self.backoff[0], cap))
                continue
            how = await conn.done
            self.live.clear()
            if self._stopping:
                return
            self.record.closes.append(Close(time.monotonic(), how))
            if not self.reconnect:
                return
            if self.kind == "sse" and how == "sse end" and self.retry_ms is not None:
                delay = self.retry_ms / 1000  # what EventSource does with `retry:`
            else:
                delay = random.uniform(*self.backoff)  # the dashboard's jittered backoff
            await asyncio.sleep(delay)

    def start(self) -> Follower:
        self._task = asyncio.create_task(self.run())
        return self

    async def stop(self) -> None:
        self._stopping = True
        if self.conn is not None:
            self.conn.end("stopped")
        await cancel(self._task)


async def start_followers(followers: list[Follower], within: float = 30.0,
                          concurrency: int = 50) -> None:
    """Start every follower and wait until each one is live (welcome received)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(f: Follower) -> None:
        async with sem:
            f.start()
            await asyncio.wait_for(f.live.wait(), within)

    await asyncio.gather(*(one(f) for f in followers))


async def one_of_each(port: int, token: str, after: str) -> list[Follower]:
    """A WebSocket and an SSE follower, live, and a poller from `after`: one client of
    each transport to check against the stream after a fault."""
    followers = [Follower(kind, "127.0.0.1", port, token=token) for kind in ("ws", "sse")]
    await start_followers(followers)
    return [*followers, Follower("poll", "127.0.0.1", port, token=token, last_id=after,
                                 poll_wait=2).start()]


class Stuck:
    """A subscriber that stops reading: a tiny receive buffer, reading paused after welcome."""

    def __init__(self, kind: Kind, host: str, port: int, token: str | None = None) -> None:
        self.follower = Follower(kind, host, port, token=token, reconnect=False)
        self.transport: asyncio.Transport | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (self.follower.host, self.follower.port))
        transport, conn = await loop.create_connection(self.follower.new_conn, sock=sock)
        self.follower.conn = conn
        await asyncio.wait_for(asyncio.shield(conn.ready), 10)
        self.transport = transport
        transport.pause_reading()

    async def resume(self, within: float) -> str | None:
        """Read again; return how the server ended the connection, None if it is still open."""
        assert self.transport is not None and self.follower.conn is not None
        self.transport.resume_reading()
        try:
            return await asyncio.wait_for(asyncio.shield(self.follower.conn.done), within)
        except TimeoutError:
            return None
