"""WebSocket `/api/ws`: the DESIGN frames, a reader and a writer in one task group.

The reader never sends; it queues control frames (pong, joined, error) for the
writer, so there is exactly one sender, and a client that stops reading only
fills its own bounded queue until it is cut off with 1013.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from typing import Any
from urllib.parse import urlsplit

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from dualcast.auth import AuthError, Identity
from dualcast.events import Event, dumps
from dualcast.feed import Feed, FeedClosed
from dualcast.hub import CloseReason, Reset
from dualcast.query import query_of
from dualcast.runtime import Runtime
from dualcast.stalls import Stalled, Writer
from dualcast.transports.common import Refusal, caller, choose_rooms, error_response, parse_cursor

log = logging.getLogger("dualcast.ws")


class Close(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY = 1008
    TOO_BIG = 1009
    TRY_AGAIN = 1013


def origin_allowed(ws: WebSocket, allowed: list[str]) -> bool:
    """Cross-site WebSocket hijacking guard: a browser's Origin must be this host or listed."""
    origin = ws.headers.get("origin")
    if origin is None:
        return True  # not a browser: let it in on its token
    if "*" in allowed or origin in allowed:
        return True
    host = ws.headers.get("host", "")
    return urlsplit(origin).netloc.lower() == host.lower() and bool(host)


def error_frame(code: str, message: str) -> str:
    return dumps({"type": "error", "code": code, "message": message}).decode()


def encode_items(items: list[Event | Reset]) -> list[str]:
    """Frames for a batch: runs of events coalesce into one `batch` frame."""
    frames: list[str] = []
    run: list[str] = []
    for item in items:
        if isinstance(item, Event):
            run.append(item.ws_frame())
            continue
        if run:
            frames.append(_batch(run))
            run = []
        frames.append(dumps({"type": "reset", "last_id": item.last_id}).decode())
    if run:
        frames.append(_batch(run))
    return frames


def _batch(run: list[str]) -> str:
    if len(run) == 1:
        return run[0]
    return '{"type":"batch","events":[' + ",".join(run) + "]}"


class Session:
    """One WebSocket client: its identity, its feed, and frames waiting to be sent."""

    def __init__(self, ws: WebSocket, rt: Runtime, identity: Identity, feed: Feed) -> None:
        self.ws = ws
        self.rt = rt
        self.identity = identity
        self.feed = feed
        self.control: list[str] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.bad_frames = 0
        self.stalled = False
        self.gone = False
        #: Set by _run: when the current send began, for the runtime's stall watch.
        self.writer = Writer(None)
        self._room_re = re.compile(rt.settings.room_pattern)

    async def send(self, frame: str) -> None:
        with self.writer:
            await self.ws.send_text(frame)

    def say(self, frame: dict[str, Any]) -> None:
        self.control.append(dumps(frame).decode())
        self.feed.sub._wake()

    def refuse(self, code: str, message: str) -> None:
        self.say({"type": "error", "code": code, "message": message})

    def end(self, code: int, reason: str = "") -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self.feed.sub._wake()

    # reader ----------------------------------------------------------------

    async def read(self) -> None:
        """Until the client goes (then the writer is woken to end the session)."""
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if text is None:
                    self.abuse("bad_frame", "binary frames are not supported; send JSON text")
                    continue
                try:
                    frame = orjson.loads(text)
                except orjson.JSONDecodeError:
                    self.abuse("bad_json", "frames must be JSON objects")
                    continue
                if not isinstance(frame, dict):
                    self.abuse("bad_frame", "frames must be JSON objects")
                    continue
                self.handle(frame)
        finally:
            self.gone = True
            self.feed.sub._wake()

    def abuse(self, code: str, message: str) -> None:
        self.bad_frames += 1
        self.refuse(code, message)
        if self.bad_frames >= self.rt.settings.max_bad_frames:
            self.end(Close.POLICY, "too many bad frames")

    def handle(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "ping":
            self.say({"type": "pong"})
        elif kind in ("join", "leave"):
            room = frame.get("room")
            if not isinstance(room, str) or not self._room_re.fullmatch(room):
                self.abuse("bad_room", "room must be a name matching the room pattern")
            elif kind == "leave":
                self.feed.leave(room)
                self.say({"type": "left", "room": room})
            elif not self.identity.may_join(room):
                self.refuse("forbidden_room", f"not allowed in room {room!r}")
            elif room not in self.feed.sub.rooms and (
                len(self.feed.sub.rooms) >= self.rt.settings.max_rooms
            ):
                self.refuse("too_many_rooms", f"at most {self.rt.settings.max_rooms} rooms")
            else:
                self.feed.join(room)
                self.say({"type": "joined", "room": room})
        elif kind == "auth":
            token = frame.get("token")
            if not isinstance(token, str):
                self.abuse("bad_frame", "auth needs a token string")
                return
            try:
                fresh = self.rt.auth.decode_now(token)
            except AuthError as exc:
                self.refuse(exc.code, exc.message)
                return
            if not self.identity.anonymous and fresh.sub != self.identity.sub:
                self.refuse("invalid_token", "a refreshed token must be for the same subject")
                return
            self.identity = fresh
            for room in list(self.feed.sub.rooms):
                if not fresh.may_join(room):
                    self.feed.leave(room)
                    self.say({"type": "left", "room": room})
            self.feed.sub._wake()  # the writer re-reads the expiry
        else:
            self.abuse("unknown_type", f"unknown frame type {str(kind)[:40]!r}")

    # writer ----------------------------------------------------------------

    async def write(self) -> None:
        asgi_send = self.ws._send
        while True:
            left = self.identity.seconds_left()
            if left is not None and left <= 0:
                await self.send(error_frame("token_expired", "the token has expired"))
                self.end(Close.POLICY, "token expired")
            if self.control:
                control, self.control = self.control, []
                for frame in control:
                    await self.send(frame)
            if self.close_code is not None or self.gone:
                return
            try:
                # While the feed replays it awaits the log; a control frame queued then
                # (a pong) wakes nobody, so right after the replay do not block on the
                # queue: come back and flush the control frames first.
                replaying = self.feed.replaying
                items = await self.feed.next(timeout=0 if replaying else left)
            except FeedClosed as closed:
                if closed.reason is CloseReason.LAGGING:
                    self.end(Close.TRY_AGAIN, "too slow: resume from your last id")
                else:
                    self.end(Close.GOING_AWAY, "server is restarting")
                return
            writer = self.writer
            for frame in encode_items(items):
                # The fan-out's hot path: Session.send inlined, and the ASGI send called
                # directly (Starlette's send_text re-checks the state on every frame; a
                # failed send raises OSError here, which ends the session as "gone").
                with writer:
                    await asgi_send({"type": "websocket.send", "text": frame})


async def websocket_endpoint(ws: WebSocket) -> None:
    rt: Runtime = ws.app.state.dualcast
    settings = rt.settings
    if "websocket" not in settings.transports:
        await _deny(ws, 403, "websocket_disabled", "WebSocket is not offered here; use /api/sse")
        return
    if rt.draining:
        # 503, not 403: a proxy retries another instance, a client does not fall back to SSE.
        await _deny(ws, 503, "draining", "server is restarting; retry")
        return
    if not origin_allowed(ws, settings.allowed_origins):
        rt.stats.refused += 1
        await _deny(ws, 403, "bad_origin", "the Origin of this page may not connect")
        return
    try:
        identity = await caller(ws, rt.auth)
    except Refusal as refusal:
        rt.stats.refused += 1
        await ws.accept()
        await ws.send_text(error_frame(refusal.code, refusal.message))
        await ws.close(Close.POLICY, refusal.code)
        return
    await ws.accept()
    choice = choose_rooms(query_of(ws).get("rooms"), identity, settings)
    errors = [("bad_room", f"malformed room name {r!r}") for r in choice.malformed]
    errors += [("forbidden_room", f"not allowed in room {r!r}") for r in choice.forbidden]
    if choice.too_many:
        errors.append(("too_many_rooms", f"at most {settings.max_rooms} rooms per subscriber"))
    try:
        cursor = parse_cursor(query_of(ws).get("last_event_id"))
    except Refusal as refusal:
        errors.append((refusal.code, refusal.message))
        cursor = None
    rt.stats.opened["websocket"] += 1
    async with Feed(rt.hub, rt.log, settings, "websocket", choice.rooms, cursor) as feed:
        session = Session(ws, rt, identity, feed)
        await ws.send_text(
            dumps({"type": "welcome", "rooms": sorted(choice.rooms), "last_id": feed.start_id})
            .decode()
        )
        for code, message in errors:
            session.refuse(code, message)
        await _run(session)


async def _run(session: Session) -> None:
    """The writer runs in the connection's own task and the reader in one more: the
    fewest tasks (and coroutine frames: one function, not two) per idle connection.
    Whoever ends first ends the session."""
    ws = session.ws
    with session.rt.stalls.writer() as writer:
        session.writer = writer
        reader = asyncio.create_task(session.read())
        failure: BaseException | None = None
        try:
            await session.write()
        except (WebSocketDisconnect, OSError, RuntimeError):
            session.gone = True  # a send failed: the client is gone
        except Stalled:
            # The peer stopped reading: give up on it without blocking on a close
            # frame it will never read; uvicorn closes the transport.
            session.stalled = True
        except Exception as exc:
            failure = exc
        finally:
            reader.cancel()
            results = await asyncio.gather(reader, return_exceptions=True)
        for error in (failure, *results):
            if isinstance(error, Exception) and not isinstance(
                error, (WebSocketDisconnect, OSError, RuntimeError)
            ):
                log.error("websocket session failed", exc_info=error)
        if (session.gone and session.close_code is None) or session.stalled:
            return
        try:
            # (a lagging client may not read its close frame either: watched like any send)
            with writer:
                await ws.close(session.close_code or Close.NORMAL, session.close_reason)
        except (RuntimeError, OSError, WebSocketDisconnect, Stalled):
            pass  # the client went first, or stopped reading


async def _deny(ws: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse the upgrade with an HTTP status (403) when the server supports it."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(error_response(status, code, message))
    else:
        await ws.close(Close.POLICY)
