"""WebSocket `/api/ws`: the DESIGN frames, a reader and a writer in one task group.

The reader never sends; it queues control frames (pong, joined, error) for the
writer, so there is exactly one sender, and a client that stops reading only
fills its own bounded queue until it is cut off with 1013.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from starlette.types import Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from dualcast.admission import Admission, Refusal, admit, error_response
from dualcast.auth import AuthError, Identity
from dualcast.cors import origin_netloc
from dualcast.direct import text_frame_header, ws_sink
from dualcast.feed import Feed, FeedClosed
from dualcast.frames import WS_PONG, ws_error, ws_frames, ws_room, ws_welcome
from dualcast.hub import CloseReason
from dualcast.names import name_rule
from dualcast.protocol import AUTH_CODES, ErrorCode, FrameType, Transport, WSClose
from dualcast.runtime import Runtime
from dualcast.stalls import Stalled, Writer
from dualcast.ws_protocol import Inbox, WebSocketProtocol, inbox_of

log = logging.getLogger("dualcast.ws")

#: How each way a feed ends closes the socket (code, reason); GONE needs no close.
_CLOSES = {
    CloseReason.LAGGING: (WSClose.TRY_AGAIN, "too slow: resume from your last id"),
    CloseReason.SHUTDOWN: (WSClose.GOING_AWAY, "server is restarting"),
    CloseReason.MOVED: (WSClose.GOING_AWAY, "reconnect: load is being spread over workers"),
    CloseReason.EXPIRED: (WSClose.POLICY, "token expired"),
}


def origin_allowed(ws: WebSocket, allowed: list[str]) -> bool:
    """Cross-site WebSocket hijacking guard: a browser's Origin must be this host or listed
    (`allowed` is in the form browsers send, normalised once by the settings)."""
    origin = ws.headers.get("origin")
    if origin is None:
        return True  # not a browser: let it in on its token
    if "*" in allowed or origin in allowed:
        return True
    host = ws.headers.get("host", "")
    return bool(host) and origin_netloc(origin) == host.lower()


class Session:
    """One WebSocket client: its identity, its feed, and frames waiting to be sent."""

    def __init__(self, ws: WebSocket, send: Send, rt: Runtime, identity: Identity,
                 feed: Feed, admission: Admission | None = None) -> None:
        self.ws = ws
        self.asgi_send = send
        self.rt = rt
        self.identity = identity
        self.feed = feed
        #: Holds the connection's slot (`lease`), released when the session ends.
        self.admission = admission
        self.control: list[str] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.bad_frames = 0
        self.stalled = False
        self.gone = False
        #: Set by _run: when the current send began, for the runtime's stall watch.
        self.writer = Writer(None)
        #: Set by _run: where uvicorn queues what the client sent, when it is ours.
        self.inbox: Inbox | None = None
        #: The task running `read`, if any: with an inbox, only while messages wait.
        self.reader: asyncio.Task[None] | None = None
        #: Named no rooms at connect: follows its token's default rooms (see `refresh`).
        self.defaults = admission is not None and admission.defaults
        self._room_ok = name_rule("room", rt.settings.room_pattern).accepts

    async def send(self, frame: str) -> None:
        """The one way a frame leaves: the ASGI send itself, watched by the stall watch.

        Starlette's `send_text` re-checks the connection state on every frame; this is
        the fan-out's hot path, so it calls the server's send directly (a failed send
        raises OSError here, which ends the session as "gone").
        """
        with self.writer:
            await self.asgi_send({"type": "websocket.send", "text": frame})

    def say(self, frame: str) -> None:
        """Queue a control frame for the writer (the reader never sends).

        Bounded: a client that pings without reading gets at most a queue's worth of
        replies waiting; past that it is cut off as a slow consumer would be.
        """
        if len(self.control) >= self.rt.settings.queue_size:
            self.feed.sub.close(CloseReason.LAGGING)
            return
        self.control.append(frame)
        self.feed.sub.notify()

    def refuse(self, code: ErrorCode | str, message: str) -> None:
        self.say(ws_error(code, message))

    def end(self, code: int, reason: str = "") -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self.feed.sub.notify()

    # reader ----------------------------------------------------------------

    async def read(self) -> None:
        """Until the client goes (then the writer is woken to end the session); with an
        inbox, only until nothing more waits in it (the next message starts another)."""
        inbox, ended = self.inbox, True
        try:
            while inbox is None or not inbox.empty():
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if text is None:
                    self.abuse(ErrorCode.BAD_FRAME,
                               "binary frames are not supported; send JSON text")
                    continue
                try:
                    frame = orjson.loads(text)
                except orjson.JSONDecodeError:
                    self.abuse(ErrorCode.BAD_JSON, "frames must be JSON objects")
                    continue
                if not isinstance(frame, dict):
                    self.abuse(ErrorCode.BAD_FRAME, "frames must be JSON objects")
                    continue
                await self.handle(frame)
            ended, self.reader = False, None
        finally:
            if ended:
                self.gone = True
                self.feed.sub.notify()

    def wake_reader(self) -> None:
        """The inbox's listener: a message arrived; read it unless a reader runs (or
        ended: the client is gone)."""
        if self.reader is None:
            self.reader = asyncio.create_task(self.read())

    def abuse(self, code: ErrorCode, message: str) -> None:
        self.bad_frames += 1
        self.refuse(code, message)
        if self.bad_frames >= self.rt.settings.max_bad_frames:
            self.end(WSClose.POLICY, "too many bad frames")

    async def handle(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == FrameType.PING:
            self.say(WS_PONG)
        elif kind == FrameType.JOIN or kind == FrameType.LEAVE:
            self.room(kind, frame.get("room"))
        elif kind == FrameType.AUTH:
            await self.refresh(frame.get("token"))
        else:
            self.abuse(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {str(kind)[:40]!r}")

    def room(self, kind: FrameType, room: object) -> None:
        sub, max_rooms = self.feed.sub, self.rt.settings.max_rooms
        if not isinstance(room, str) or not self._room_ok(room):
            self.abuse(ErrorCode.BAD_ROOM, "room must be a name matching the room pattern")
        elif kind == FrameType.LEAVE:
            self.feed.leave(room)
            self.say(ws_room(FrameType.LEFT, room))
        elif not self.identity.may_join(room):
            self.refuse(ErrorCode.FORBIDDEN_ROOM, f"not allowed in room {room!r}")
        elif room not in sub.rooms and len(sub.rooms) >= max_rooms:
            self.refuse(ErrorCode.TOO_MANY_ROOMS, f"at most {max_rooms} rooms")
        else:
            self.feed.join(room)
            self.say(ws_room(FrameType.JOINED, room))

    async def refresh(self, token: object) -> None:
        """`auth`: new credentials for the same subject; a narrower token narrows rooms.

        A connection that named no rooms asked for its token's defaults: it joins the
        default rooms the new token adds (all of them, for a connection that was
        anonymous; DUALCAST_MAX_ROOMS does not bound them, as at connect), with a
        `joined` frame each. Before, an anonymous WebSocket that sent a token in `auth`
        stayed on public events only, while the same token at connect joined its rooms
        and `user-<sub>`. Defaults the old token had too are not joined again: the client
        may have left them.
        """
        if not isinstance(token, str):
            self.abuse(ErrorCode.BAD_FRAME, "auth needs a token string")
            return
        try:
            fresh = await self.rt.auth.decode(token)
        except AuthError as exc:
            self.refuse(exc.code, exc.message)
            return
        if not self.identity.anonymous and fresh.sub != self.identity.sub:
            self.refuse(ErrorCode.INVALID_TOKEN, "a refreshed token must be for the same subject")
            return
        if self.identity.anonymous and self.admission is not None:
            # The slot was counted for the address; from now on it is the subject's, under
            # the subject's cap: else anonymous connections that sent a token in `auth`
            # held any number of connections for one token (a leaked one, from many
            # addresses), past DUALCAST_MAX_CONNECTIONS_PER_SUBJECT.
            lease = self.rt.quotas.acquire(fresh.sub, None)
            if lease is None:
                self.refuse(ErrorCode.TOO_MANY_CONNECTIONS,
                            "this token holds as many connections as this server allows; "
                            "close one")
                return
            self.admission.lease.release()
            self.admission.lease = lease
        before, self.identity = self.identity, fresh
        for room in list(self.feed.sub.rooms):
            if not fresh.may_join(room):
                self.feed.leave(room)
                self.say(ws_room(FrameType.LEFT, room))
        if self.defaults:
            self.join_defaults(fresh.default_rooms() - before.default_rooms())
        self.feed.extend(fresh.exp)

    def join_defaults(self, rooms: set[str]) -> None:
        """The token's default rooms, all of them, as at connect: DUALCAST_MAX_ROOMS
        bounds the rooms a client asks for, not the ones its token grants (the same token
        joined all of them at connect and only the first ones through `auth`)."""
        for room in sorted(rooms - self.feed.sub.rooms):
            self.feed.join(room)
            self.say(ws_room(FrameType.JOINED, room))

    # writer ----------------------------------------------------------------

    async def write(self) -> None:
        feed = self.feed
        while True:
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
                items = await feed.next(timeout=0 if feed.replaying else None)
            except FeedClosed as closed:
                if closed.reason is CloseReason.EXPIRED:
                    await self.send(ws_error(ErrorCode.TOKEN_EXPIRED, "the token has expired"))
                if closed.reason is not CloseReason.GONE:
                    self.end(*_CLOSES[closed.reason])
                return
            for frame in ws_frames(items):
                await self.send(frame)


async def websocket_endpoint(ws: WebSocket, send: Send | None = None) -> None:
    """`send` is the server's raw ASGI send (the app's fast path passes it)."""
    rt: Runtime = ws.app.state.dualcast
    if not origin_allowed(ws, rt.settings.allowed_origins):
        rt.stats.refused += 1
        await _deny(ws, Refusal(403, ErrorCode.BAD_ORIGIN,
                                "the Origin of this page may not connect"))
        return
    try:
        admission = await admit(ws, rt, Transport.WEBSOCKET, lenient_rooms=True)
    except Refusal as refusal:
        await _deny(ws, refusal)
        return
    try:
        await _serve(ws, send or ws.send, rt, admission)
    finally:
        admission.lease.release()


async def _serve(ws: WebSocket, send: Send, rt: Runtime, admission: Admission) -> None:
    feed = Feed(rt.hub, rt.log, rt.settings, Transport.WEBSOCKET, admission.rooms,
                admission.cursor, expires=admission.identity.exp)
    rt.auth.follow(admission.identity, feed)  # an identity the app renews extends the feed
    feed.sub.sink = ws_sink(send)  # events straight to the socket while the writer idles
    # The feed is entered before the upgrade is accepted, so the welcome names where live
    # delivery starts; events that arrive before the 101 wait in the queue (the sink
    # writes nothing to a connection that is not open yet).
    async with feed:
        session = Session(ws, send, rt, admission.identity, feed, admission)
        welcome = ws_welcome(admission.rooms, feed.start_id)
        if not await _accept_with(ws, send, welcome):
            await ws.accept()
            await session.send(welcome)
        rt.stats.opened[Transport.WEBSOCKET] += 1
        for code, message in admission.refused:
            session.refuse(code, message)
        await _run(session)


async def _accept_with(ws: WebSocket, send: Send, welcome: str) -> bool:
    """Accept the upgrade with the welcome in the same write, where the server's protocol
    can (`WebSocketProtocol.accept_with`); False where the caller accepts as usual.
    Starlette's state moves on as its `accept` would move it: the `websocket.connect`
    that uvicorn queued is read first (as `accept` itself reads it, so the fallback
    loses nothing). 30,000 WebSocket connects on two workers
    (`python -m bench fleet --transports ws`, three interleaved runs each, 2026-11-29):
    263 -> 217 us of server CPU per connect (medians), 5,418 -> 6,220 connects/s."""
    proto = getattr(send, "__self__", None)
    if not isinstance(proto, WebSocketProtocol):
        return False
    if ws.client_state is WebSocketState.CONNECTING:
        await ws.receive()
    payload = welcome.encode()
    if not proto.accept_with(text_frame_header(len(payload)) + payload):
        return False
    ws.application_state = WebSocketState.CONNECTED
    return True


async def _run(session: Session) -> None:
    """The writer runs in the connection's own task, and the reader in one more only
    while the client's messages wait: the fewest tasks (and coroutine frames: one
    function, not two) per idle connection. Whoever ends first ends the session.

    A reader parked in `receive()` for the connection's life (its task, four
    coroutine frames down to uvicorn's queue, a future) was 1.5 KB of every idle
    WebSocket by tracemalloc at 2,000 connections; with our protocol's inbox (see
    `dualcast.ws_protocol`) a reader starts when a message arrives and ends when
    none waits: 18.3 -> 16.9 KB RSS per idle WebSocket at 10,000 (`python -m bench idle`).
    Under another server (no inbox) one reader runs for the session, as before.
    """
    ws = session.ws
    inbox = session.inbox = inbox_of(session.asgi_send)
    with session.rt.stalls.writer() as writer:
        session.writer = writer
        if inbox is None:
            session.reader = asyncio.create_task(session.read())
        else:
            inbox.listen(session.wake_reader)
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
            if inbox is not None:
                inbox.listen(None)
            reader = session.reader
            results: tuple[BaseException | None, ...] = ()
            if reader is not None:
                reader.cancel()
                results = tuple(await asyncio.gather(reader, return_exceptions=True))
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
                await ws.close(session.close_code or WSClose.NORMAL, session.close_reason)
        except (RuntimeError, OSError, WebSocketDisconnect, Stalled):
            pass  # the client went first, or stopped reading


async def _deny(ws: WebSocket, refusal: Refusal) -> None:
    """Refuse before the session starts.

    Credentials refused: accept, say why in an `error` frame, close 1008, because a
    browser's WebSocket shows a script nothing of an HTTP answer, and a client must
    tell "log in again" from "this transport is blocked". Anything else (a transport
    off, a drain, an Origin, a bad cursor): refuse the upgrade with the HTTP status,
    so a proxy can retry elsewhere and nothing streams.
    """
    if refusal.code in AUTH_CODES or refusal.code == ErrorCode.AUTH_UNAVAILABLE:
        try:
            await ws.accept()
            await ws.send_text(ws_error(refusal.code, refusal.message))
            await ws.close(WSClose.POLICY, refusal.code)
        except (RuntimeError, OSError, WebSocketDisconnect):
            # The client went first (a close frame right behind its upgrade, a tab
            # closed while connecting): nothing to tell it. Each such refusal was an
            # "Exception in ASGI application" traceback at ERROR in the log.
            pass
    elif "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(error_response(refusal.status, refusal.code,
                                                     refusal.message))
    else:
        await ws.close(WSClose.POLICY)
