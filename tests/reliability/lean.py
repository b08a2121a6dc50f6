"""Lean, resuming clients and a raw producer for the reliability scenarios and scripts.

Library clients cost 30-70 us of CPU per delivery (PITFALLS.md); with hundreds of
clients in the test process the generator would become the bottleneck. These
speak just enough WebSocket / SSE over raw asyncio protocols, and behave like
the dashboard does: on any loss they come back with their last id (WS
`last_event_id`, SSE `Last-Event-ID`), SSE honouring the server's `retry:`.

Each `Follower` records what its user saw across reconnects: every event id
in arrival order, every way a connection ended (`closes`), every `reset`, the
`retry:` values and when each (re)connect completed.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bench.clients import HTTPBody, mask_frame

STREAM = "websocket-broadcast"


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class Close:
    """How one connection ended, as the client saw it."""

    at: float
    how: str  # "ws 1001", "ws 1013", "sse end", "lost", "refused: ...", "connect: ..."

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


class _Conn(asyncio.Protocol):
    """One connection of a Follower; parses frames and reports to it."""

    def __init__(self, owner: Follower, request: bytes, ws: bool) -> None:
        self.owner = owner
        self.request = request
        self.ws = ws
        self.buf = bytearray()
        self.http = HTTPBody()
        self.upgraded = False
        self.text = bytearray()
        self.block: dict[str, str] = {}
        self.transport: asyncio.Transport | None = None
        self.welcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.how = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        how = self.how or "lost"
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError(how))
        if not self.done.done():
            self.done.set_result(how)

    def _end(self, how: str) -> None:
        if not self.how:
            self.how = how
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.ws:
            self._ws_data()
        else:
            self._sse_data()

    # WebSocket ------------------------------------------------------------------
    def _ws_data(self) -> None:
        buf = self.buf
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:end]).split(b"\r\n", 1)[0].decode(errors="replace")
            if " 101 " not in status + " ":
                self._end(f"refused: {status}")
                return
            del buf[: end + 4]
            self.upgraded = True
        while len(buf) >= 2:
            length = buf[1] & 0x7F
            start = 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, start = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, start = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < start + length:
                return
            opcode = buf[0] & 0x0F
            payload = bytes(buf[start : start + length])
            del buf[: start + length]
            if opcode == 0x1:
                self.owner._ws_frame(orjson.loads(payload), self)
            elif opcode == 0x9 and self.transport is not None:
                self.transport.write(mask_frame(0xA, payload))
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if self.transport is not None:
                    self.transport.write(mask_frame(0x8, payload[:2]))
                self._end(f"ws {code}")
                return

    # SSE ------------------------------------------------------------------------
    def _sse_data(self) -> None:
        http = self.http
        if not http.have_head:
            if not http.head(self.buf):
                return
            if http.status != 200:
                self._end(f"refused: HTTP {http.status}")
                return
        text = self.text
        text += http.body(self.buf)
        start = 0
        while True:
            eol = text.find(b"\n", start)
            if eol < 0:
                break
            line = bytes(text[start:eol]).rstrip(b"\r").decode()
            start = eol + 1
            if not line:
                if self.block:
                    self.owner._sse_block(self.block, self)
                self.block = {}
            elif line.startswith(":"):
                continue
            else:
                key, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if key == "retry":
                    self.owner.record.retries.append(int(value))
                    self.owner.retry_ms = int(value)
                else:
                    self.block[key] = self.block.get(key, "") + value
        del text[:start]
        if http.done:
            self._end("sse end")


class Follower:
    """A client that keeps following the stream across losses, as the dashboard does."""

    def __init__(
        self, kind: str, host: str, port: int, token: str | None = None,
        rooms: str | None = None, last_id: str | None = None, reconnect: bool = True,
        backoff: tuple[float, float] = (0.05, 0.5), latencies: bool = False,
    ) -> None:
        assert kind in ("ws", "sse")
        self.kind = kind
        self.host = host
        self.port = port
        self.token = token
        self.rooms = rooms
        self.reconnect = reconnect
        self.backoff = backoff
        self.record = Record(last_id=last_id)
        #: seconds from the producer's `t` to arrival, when asked for (bench scripts)
        self.latencies: list[float] | None = [] if latencies else None
        self.retry_ms: int | None = None
        self.conn: _Conn | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.live = asyncio.Event()

    # what the user saw --------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        return self.record.ids

    def _event(self, entry_id: str, data: Any = None) -> None:
        self.record.ids.append(entry_id)
        self.record.last_id = entry_id
        if self.latencies is not None and isinstance(data, dict) and "t" in data:
            self.latencies.append(time.time() - data["t"])

    def _ws_frame(self, frame: dict[str, Any], conn: _Conn) -> None:
        kind = frame.get("type")
        if kind == "batch":
            for item in frame["events"]:
                self._event(item["id"], item.get("data"))
        elif kind == "event":
            self._event(frame["id"], frame.get("data"))
        elif kind == "welcome":
            if self.record.first_welcome is None:
                self.record.first_welcome = frame["last_id"]
            if self.record.last_id is None:
                self.record.last_id = frame["last_id"]
            if not conn.welcome.done():
                conn.welcome.set_result(None)
        elif kind == "reset":
            self.record.resets.append(frame["last_id"])
            self.record.last_id = frame["last_id"]
        elif kind == "error":
            self.record.errors.append(frame)

    def _sse_block(self, block: dict[str, str], conn: _Conn) -> None:
        name = block.get("event", "message")
        data = orjson.loads(block["data"]) if block.get("data") else None
        if name == "welcome":
            if self.record.first_welcome is None:
                self.record.first_welcome = data["last_id"]
            if self.record.last_id is None:
                self.record.last_id = data["last_id"]
            if not conn.welcome.done():
                conn.welcome.set_result(None)
        elif name == "reset":
            self.record.resets.append(data["last_id"])
            self.record.last_id = data["last_id"]
        elif "id" in block:
            self._event(block["id"], data)
        elif name == "error":
            self.record.errors.append(data)

    # connection loop ----------------------------------------------------------------
    def _request(self) -> bytes:
        params = []
        if self.token:
            params.append(f"token={quote(self.token)}")
        if self.rooms:
            params.append(f"rooms={quote(self.rooms)}")
        host = f"Host: {self.host}:{self.port}\r\n"
        if self.kind == "ws":
            if self.record.last_id is not None:
                params.append(f"last_event_id={quote(self.record.last_id)}")
            key = base64.b64encode(os.urandom(16)).decode()
            path = "/api/ws" + ("?" + "&".join(params) if params else "")
            return (
                f"GET {path} HTTP/1.1\r\n{host}Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        path = "/api/sse" + ("?" + "&".join(params) if params else "")
        last = f"Last-Event-ID: {self.record.last_id}\r\n" if self.record.last_id else ""
        return (f"GET {path} HTTP/1.1\r\n{host}Accept: text/event-stream\r\n{last}\r\n").encode()

    async def connect_once(self, within: float = 10.0) -> _Conn:
        """Open one connection and wait for its `welcome` (raises on failure)."""
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                lambda: _Conn(self, self._request(), self.kind == "ws"), self.host, self.port
            ),
            within,
        )
        self.conn = conn
        try:
            await asyncio.wait_for(asyncio.shield(conn.welcome), within)
        except BaseException:
            conn._end("connect: no welcome")
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
            self.conn._end("stopped")
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass


async def start_followers(followers: list[Follower], within: float = 30.0,
                          concurrency: int = 50) -> None:
    """Start every follower and wait until each one is live (welcome received)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(f: Follower) -> None:
        async with sem:
            f.start()
            await asyncio.wait_for(f.live.wait(), within)

    await asyncio.gather(*(one(f) for f in followers))


class Stuck:
    """A subscriber that stops reading: a tiny receive buffer, reading paused after welcome."""

    def __init__(self, kind: str, host: str, port: int, token: str | None = None) -> None:
        self.follower = Follower(kind, host, port, token=token, reconnect=False)
        self.transport: asyncio.Transport | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (self.follower.host, self.follower.port))
        f = self.follower
        transport, conn = await loop.create_connection(
            lambda: _Conn(f, f._request(), f.kind == "ws"), sock=sock
        )
        f.conn = conn
        await asyncio.wait_for(asyncio.shield(conn.welcome), 10)
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


class Producer:
    """Raw XADDs at a steady rate, straight to Redis, retrying while Redis is away.

    `acked` holds the ids Redis acknowledged; an XADD whose reply was lost in a
    crash may still have been persisted, so the truth is the stream itself.
    """

    def __init__(self, redis_url: str, rate: float, pad: int = 0, stream: str = STREAM,
                 rooms: list[str] | None = None) -> None:
        self.url = redis_url
        self.rate = rate
        self.pad = "x" * pad
        self.stream = stream
        self.rooms = rooms
        self.acked: list[str] = []
        self.failures = 0
        self.seq = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def _fields(self) -> dict[str, str]:
        body: dict[str, Any] = {"event": "rel", "data": {"seq": self.seq, "t": time.time(),
                                                          "pad": self.pad}}
        if self.rooms:
            body["rooms"] = self.rooms
        return {"data": orjson.dumps(body).decode(), "timestamp": str(int(time.time() * 1000))}

    async def _run(self, limit: int | None) -> None:
        client = aioredis.Redis.from_url(self.url, decode_responses=True, socket_timeout=1,
                                         socket_connect_timeout=1)
        interval = 1 / self.rate
        next_at = time.monotonic()
        try:
            while not self._stop.is_set() and (limit is None or self.seq < limit):
                try:
                    entry_id = await client.xadd(self.stream, self._fields())  # type: ignore[arg-type]
                    self.acked.append(str(entry_id))
                    self.seq += 1
                except (RedisError, OSError):
                    self.failures += 1
                    await asyncio.sleep(0.05)  # Redis is away: retry the same event
                    continue
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    try:
                        await asyncio.wait_for(self._stop.wait(), delay)
                    except TimeoutError:
                        pass
                else:
                    next_at = time.monotonic()
        finally:
            await client.aclose()

    def start(self, limit: int | None = None) -> Producer:
        self._task = asyncio.create_task(self._run(limit))
        return self

    async def wait(self, within: float) -> None:
        assert self._task is not None
        await asyncio.wait_for(asyncio.shield(self._task), within)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)


async def stream_ids(redis_url: str, after: str = "-", stream: str = STREAM) -> list[str]:
    """Every id in the stream after `after` (exclusive unless '-'): the ground truth."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        start = after if after == "-" else f"({after}"
        ids: list[str] = []
        while True:
            page = await client.xrange(stream, min=start, max="+", count=5000)
            if not page:
                return ids
            ids.extend(str(i) for i, _ in page)
            start = f"({page[-1][0]}"
    finally:
        await client.aclose()


async def stream_entries(redis_url: str, after: str = "-",
                         stream: str = STREAM) -> list[tuple[str, list[str]]]:
    """Every (id, rooms) in the stream after `after`: who may see what."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        start = after if after == "-" else f"({after}"
        out: list[tuple[str, list[str]]] = []
        while True:
            page = await client.xrange(stream, min=start, max="+", count=1000)
            if not page:
                return out
            for entry_id, fields in page:
                try:
                    rooms = orjson.loads(fields.get("data", "{}")).get("rooms") or []
                except (orjson.JSONDecodeError, AttributeError):
                    rooms = []
                out.append((str(entry_id), list(rooms)))
            start = f"({page[-1][0]}"
    finally:
        await client.aclose()


def visible(entries: list[tuple[str, list[str]]], rooms: set[str]) -> list[str]:
    """The ids a subscriber in `rooms` should see (public events plus its rooms)."""
    return [i for i, r in entries if not r or rooms.intersection(r)]


def check_exact(seen: list[str], expected: list[str]) -> str | None:
    """None when `seen` is exactly `expected` (in order, none twice), else what is wrong."""
    if seen == expected:
        return None
    seen_set = set(seen)
    dups = len(seen) - len(seen_set)
    missing = [i for i in expected if i not in seen_set]
    extra = sorted(seen_set - set(expected), key=id_key)
    disorder = sum(1 for a, b in itertools.pairwise(seen) if id_key(b) <= id_key(a))
    return (f"{len(seen)} seen vs {len(expected)} expected: {len(missing)} missing "
            f"(first {missing[:3]}), {dups} duplicates, {len(extra)} unexpected "
            f"(first {extra[:3]}), {disorder} out of order")
