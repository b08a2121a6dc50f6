"""Real protocol clients for tests: WebSocket (websockets), SSE and long-poll (httpx).

Each collects what a user would see: event ids in arrival order, resets, errors.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection


@dataclass
class Seen:
    ids: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    resets: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    welcome: dict[str, Any] | None = None
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


class WSClient:
    """A WebSocket subscriber that records every frame until closed."""

    def __init__(self, base: str, **query: str) -> None:
        params = "&".join(f"{k}={v}" for k, v in query.items() if v is not None)
        self.url = f"{base}/api/ws" + (f"?{params}" if params else "")
        self.seen = Seen()
        self.conn: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._welcome = asyncio.Event()

    async def __aenter__(self) -> WSClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, headers: dict[str, str] | None = None, **kwargs: Any) -> None:
        self.conn = await websockets.connect(self.url, additional_headers=headers,
                                             max_size=2**24, **kwargs)
        self._task = asyncio.create_task(self._read())
        await asyncio.wait_for(self._welcome.wait(), 10)

    async def _read(self) -> None:
        assert self.conn is not None
        try:
            async for raw in self.conn:
                frame = json.loads(raw)
                for item in flatten(frame):
                    self.seen.frames.append(item)
                    kind = item.get("type")
                    if kind == "welcome":
                        self.seen.welcome = item
                        self.seen.last_id = item["last_id"]
                        self._welcome.set()
                    elif kind == "event":
                        self.seen.add_event(item)
                    elif kind == "reset":
                        self.seen.resets.append(item["last_id"])
                        self.seen.last_id = item["last_id"]
                    elif kind == "error":
                        self.seen.errors.append(item)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.seen.closed = self.conn.close_code if self.conn.close_code is not None else 1006
            self._welcome.set()

    async def send(self, frame: dict[str, Any] | str) -> None:
        assert self.conn is not None
        await self.conn.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()


class SSEClient:
    """An SSE subscriber over httpx streaming, parsing `id:`/`event:`/`data:` blocks."""

    def __init__(self, base: str, headers: dict[str, str] | None = None, **query: str) -> None:
        self.base = base
        self.params = {k: v for k, v in query.items() if v is not None}
        self.headers = headers or {}
        self.seen = Seen()
        self.status: int | None = None
        self.body: str = ""
        self.retries: list[int] = []
        self.ended = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._welcome = asyncio.Event()
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(10, read=None))

    async def __aenter__(self) -> SSEClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, wait_welcome: bool = True) -> None:
        self._task = asyncio.create_task(self._read())
        if wait_welcome:
            await asyncio.wait_for(self._welcome.wait(), 10)

    async def _read(self) -> None:
        try:
            async with self._client.stream("GET", self.base + "/api/sse", params=self.params,
                                           headers=self.headers) as response:
                self.status = response.status_code
                if response.status_code != 200:
                    self.body = (await response.aread()).decode()
                    return
                block: dict[str, str] = {}
                async for line in response.aiter_lines():
                    if line == "":
                        self._dispatch(block)
                        block = {}
                        continue
                    if line.startswith(":"):
                        continue
                    key, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if key == "retry":
                        self.retries.append(int(value))
                    else:
                        block[key] = block.get(key, "") + value
        except (httpx.HTTPError, OSError):
            pass
        finally:
            self.ended.set()
            self._welcome.set()

    def _dispatch(self, block: dict[str, str]) -> None:
        if not block.get("data") and "event" not in block:
            return
        name = block.get("event", "message")
        data = json.loads(block["data"]) if block.get("data") else None
        if name == "welcome":
            self.seen.welcome = data
            self.seen.last_id = data["last_id"]
            self._welcome.set()
        elif name == "reset":
            self.seen.resets.append(data["last_id"])
            self.seen.last_id = data["last_id"]
        elif name == "error" and "id" not in block:
            self.seen.errors.append(data)
        else:
            self.seen.add_event({"id": block.get("id"), "event": name, "data": data})

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self._client.aclose()


class Poller:
    """A long-polling subscriber that follows `last_id` from answer to answer."""

    def __init__(self, base: str, after: str | None = None, **query: str) -> None:
        self.base = base
        self.after = after
        self.params = {k: v for k, v in query.items() if v is not None}
        self.seen = Seen()
        self._client = httpx.AsyncClient(timeout=40)
        self._task: asyncio.Task[None] | None = None

    async def poll_once(self, timeout: float = 5) -> httpx.Response:
        params = dict(self.params, timeout=str(timeout))
        if self.after is not None:
            params["after"] = self.after
        response = await self._client.get(self.base + "/api/events", params=params)
        if response.status_code == 200:
            body = response.json()
            for event in body["events"]:
                self.seen.add_event(event)
            if body["reset"]:
                self.seen.resets.append(body["last_id"])
            self.after = body["last_id"]
        return response

    async def _loop(self) -> None:
        while True:
            try:
                await self.poll_once(5)
            except httpx.HTTPError:
                await asyncio.sleep(0.2)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self._client.aclose()


async def wait_for(condition: Any, timeout: float = 10.0, what: str = "") -> None:
    """Await a condition (a no-arg callable) with a deadline; no fixed sleeps."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.01)


def xadd(redis: Any, event: str, data: Any, rooms: list[str] | None = None,
         stream: str = "websocket-broadcast") -> str:
    """A raw XADD in the DESIGN wire format, as any producer would write it."""
    import time

    body: dict[str, Any] = {"event": event, "data": data}
    if rooms:
        body["rooms"] = rooms
    reply = redis.command("XADD", stream, "*", "data", json.dumps(body),
                          "timestamp", str(int(time.time() * 1000)))
    return reply.decode().split("\r\n")[1]
