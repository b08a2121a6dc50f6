"""Long-polling `/api/events`: answers from the log, so any instance answers any cursor.

Pollers near the head wait on the hub's tick and are answered from its recent
window (one log read per batch, by the consumer, not one per poller); a cursor
behind that window reads a page from the log.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from dualcast.admission import Refusal, admit, error_response
from dualcast.direct import on_disconnect, write_response
from dualcast.events import ZERO, Event, StreamId, format_id, parse_id
from dualcast.feed import cursor_gone, decode_visible, lost_in_a_reset
from dualcast.hub import Doorbell, Hub
from dualcast.log import LogInfo, LogUnavailable
from dualcast.protocol import ErrorCode, Transport
from dualcast.query import query_of
from dualcast.runtime import Runtime
from dualcast.transports.poll_conn import CONNECTION, PollConnection

MAX_EVENTS = 500


class Answer:
    """A poll answer: JSON bytes sent as two ASGI messages.

    Starlette's Response builds and checks its headers per instance; a long-poll
    answer is the most frequent response this server makes, with fixed headers.
    """

    __slots__ = ("_wire", "body")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self._wire: tuple[bytes, bytes] = (b"", b"")

    def wire(self, before: bytes) -> bytes:
        """The whole response: `before` (status and default header lines), its own
        headers, its body; kept for the next poller given the same `before` (the date
        in it changes once a second), as pollers at one cursor share an answer."""
        wire = self._wire
        if wire[0] is not before:
            wire = self._wire = (before, b"%s%s\r\n%s" % (before, self.head(), self.body))
        return wire[1]

    def head(self) -> bytes:
        """Its header lines, each ending in CRLF (the server adds date and server)."""
        return _HEAD % len(self.body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.body
        if write_response(send, self.head(), body):  # one write (server/direct.py)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"),
            (b"cache-control", b"no-store"),
            (b"content-length", b"%d" % len(body)),
        ]})
        await send({"type": "http.response.body", "body": body})


_HEAD = b"content-type: application/json\r\ncache-control: no-store\r\ncontent-length: %d\r\n"


def _answer(events: list[Event], last_id: str, reset: bool = False) -> Answer:
    # Each event's item is encoded once and shared by every poller that gets it.
    return Answer(b'{"events":[%s],"last_id":"%s","reset":%s}' % (
        b",".join(e.poll_item() for e in events), last_id.encode(), b"true" if reset else b"false"
    ))


def _reset(hub: Hub, info: LogInfo) -> Answer:
    """`reset` to the head: the consumer's position, or the log's when that is newer.

    As a streaming feed's reset does. The consumer's position alone was `0-0` while it
    had none yet (the instance started while Redis was away): a poller told to reset
    went on from `0-0`, everything retained, and got the whole window again as new
    events on top of the state it had just reloaded.
    """
    return _answer([], format_id(max(hub.last_key, info.last_id)), reset=True)


async def _gone(rt: Runtime, key: StreamId, info: LogInfo) -> tuple[bool, LogInfo]:
    """Whether the log no longer covers `key` (`cursor_gone`), and the window that says so.

    A key newer than the window's head is asked about again, alone: the window is one
    fetch shared by the polls that ask at once (`Runtime.log_window`), and one that began
    before this key's entry was written (another poll read that entry from the log and
    handed it to its poller meanwhile, ahead of this instance's consumer) said the key
    was newer than the stream: its poller was told `reset` back to the consumer's
    position and got again the events it had just had.
    """
    if not cursor_gone(key, info):
        return False, info
    if key > info.last_id:
        info = await rt.log.info()
    return cursor_gone(key, info), info


def _told_reset(hub: Hub) -> Answer:
    """`reset` for a poll under way when every client was told to reset (Redis lost data,
    or trimmed it unread): so is this one, as every stream is. A poll waiting then was
    answered at its timeout instead, or with the events after the loss and no reset at
    all, and one reading its page from the log then answered what the page held: either
    way the poller went on from events the stream no longer holds, without a word."""
    return _answer([], hub.last_id, reset=True)


def _shared(hub: Hub, memo: tuple[StreamId, frozenset[str]]) -> Answer | None:
    """The answer a poll at the same cursor with the same rooms got since the last batch."""
    answer: Answer | None = hub.poll_answers.get(memo)
    return answer


def _unavailable(exc: LogUnavailable) -> Response:
    # A status word only: the exception names the Redis host and port (the consumer logs it).
    return error_response(503, ErrorCode.LOG_UNAVAILABLE, "the event log is unreachable")


class _Wait(Doorbell):
    """A poll's wait for events, which its client's going away also ends.

    Without it a poll whose client left (a reloaded page, a closed tab) waited out its
    timeout, 25 s by default, holding its connection lease all along: a page reloaded
    a few times could hit its subject's or address's connection cap. Watched only
    once a poll waits; a poll answered at once pays nothing.
    """

    __slots__ = ("gone",)

    def __init__(self) -> None:
        super().__init__()
        self.gone = False

    def leave(self) -> None:
        self.gone = True
        self.ring()


def _watch(request: Request, wait: _Wait) -> Callable[[], None] | None:
    """Have the client's disconnect end `wait`: told by our own poll connection
    (server/transports/poll_conn.py) or by uvicorn's request cycle (server/direct.py);
    the undo, or None where neither can tell (then the poll waits out its timeout)."""
    conn: PollConnection | None = request.scope.get(CONNECTION)
    if conn is not None:
        return conn.watch(wait.leave)
    return on_disconnect(request.receive, wait.leave)


#: The `timeout` range every server accepts (the protocol's); a server whose own
#: limit is lower waits at most that long instead of refusing the poll.
PROTOCOL_TIMEOUT = 30.0


#: `timeout`'s spelling: ASCII digits, an optional fraction and exponent (JavaScript's
#: String(n) of a small number), no sign, no spaces.
_SECONDS = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _timeout(raw: str | None, limit: float) -> float:
    """How long a poll may wait: what it asks for, capped at this server's limit.

    A client cannot know an operator's `DUALCAST_POLL_TIMEOUT_MAX`: refusing its 25 s
    below a 20 s limit stopped the browser client for good. A poll may always be
    answered early, so a lower limit only shortens the wait."""
    if raw is None or raw == "":
        return min(25.0, limit)
    # float() alone also reads other scripts' digits (Arabic-Indic 17, a fullwidth 5), "1_0",
    # padding and a sign: a number in ASCII decimal notation only, as a cursor is.
    value = float(raw) if _SECONDS.fullmatch(raw) else -1.0
    accepted = max(limit, PROTOCOL_TIMEOUT)
    if not 0 <= value <= accepted or value != value:
        raise Refusal(
            400, ErrorCode.BAD_TIMEOUT, f"timeout must be seconds between 0 and {accepted:g}")
    return min(value, limit)


async def poll_endpoint(request: Request) -> Response | Answer:
    rt: Runtime = request.app.state.dualcast
    try:
        timeout = _timeout(query_of(request).get("timeout"), rt.settings.poll_timeout_max)
        admission = await admit(request, rt, Transport.POLLING, cursor_param="after")
    except Refusal as refusal:
        return refusal.response()
    if request.method == "HEAD":
        timeout = 0.0  # a probe asking for GET's status: answered now, not after the wait
    identity, rooms, cursor = admission.identity, admission.rooms, admission.cursor
    hub = rt.hub
    left = identity.seconds_left()
    # When the token runs out before the poll would, the answer at the deadline is the
    # expiry error (asyncio timers may fire a hair early, so do not re-read the clock).
    expires_first = left is not None and left <= timeout
    if left is not None:
        timeout = min(timeout, max(left, 0.0))
    deadline = time.monotonic() + timeout
    rt.stats.opened[Transport.POLLING] += 1
    rt.stats.polls_waiting += 1
    wait: _Wait | None = None
    unwatch: Callable[[], None] | None = None
    #: Whether this poll's key was checked against the log's window as it is now (a key
    #: answered from memory was not: see the loop).
    log_checked = False
    resets = hub.resets
    try:
        if cursor is not None:
            key = cursor
        elif hub.started:
            key = hub.last_key
        else:
            # The consumer has no position yet (the log was away at start): "from now"
            # is the log's head, never "0-0", which would hand out the whole stream.
            try:
                key = (await rt.log_window(0.0)).last_id
            except LogUnavailable as exc:
                return _unavailable(exc)
        if cursor is not None:
            # A cursor this instance still holds in memory may use a window a second old
            # (at worst it is answered from memory instead of reset: nothing is lost);
            # any other cursor is checked against the log's window as it is now.
            in_memory = cursor <= hub.last_key and hub.recent_after(cursor) is not None
            try:
                info = await rt.log_window(1.0 if in_memory else 0.0)
            except LogUnavailable as exc:
                # Redis is away. An in-memory cursor keeps its poll, on the last window
                # known (the same "at worst" as above), as a stream keeps its connection:
                # the poll waits for what the consumer reads once Redis is back.
                last = rt.last_window if in_memory else None
                if last is None:
                    return _unavailable(exc)
                info = last
            # (an in-memory cursor is not newer than the stream: the consumer read it there)
            if in_memory:
                gone = cursor < info.max_deleted
            else:
                try:
                    gone, info = await _gone(rt, cursor, info)
                    # (a cursor from before a reset: its poller was between two polls)
                    gone = gone or await lost_in_a_reset(rt.log, hub, cursor, info)
                except LogUnavailable as exc:
                    return _unavailable(exc)
            log_checked = not in_memory
            if gone and cursor != ZERO:
                return _reset(hub, info)
        while True:
            # Pollers come back at the same cursor with the same rooms, thousands of them
            # after each batch (or together after a restart): the first one's answer
            # serves the others until the next batch (hub.poll_answers is emptied then).
            memo = (key, frozenset(rooms))
            shared = _shared(hub, memo)
            if shared is not None:
                return shared
            recent = hub.recent_after(key)
            if recent is None and not log_checked:
                # Memory let go of this key while the poll waited: the consumer told every
                # client to reset (the stream was trimmed past what it had read), or a
                # burst overran the window. Read on from the log only if it still covers
                # the key; it once did so regardless, across the gap, without a reset.
                try:
                    info = await rt.log_window(0.0)
                except LogUnavailable as exc:
                    return _unavailable(exc)
                log_checked = True
                try:
                    gone, info = await _gone(rt, key, info)
                except LogUnavailable as exc:
                    return _unavailable(exc)
                if gone:
                    return _reset(hub, info)
            if recent is None:
                # Behind the in-memory window: a page from the log, one read for all the
                # polls asking the same at once.
                try:
                    entries = await rt.poll_page(format_id(key), MAX_EVENTS)
                except LogUnavailable as exc:
                    return _unavailable(exc)
                if hub.resets != resets:  # (what the page holds may be from either side)
                    return _told_reset(hub)
                shared = _shared(hub, memo)  # another poll decoded it meanwhile
                if shared is not None:
                    return shared
                if entries:
                    key = parse_id(entries[-1][0])
                    events = decode_visible(entries, rooms)
                    if events:
                        answer = hub.poll_answers[memo] = _answer(events, format_id(key))
                        return answer
                    continue
                recent = []
            else:
                events = [e for e in recent if e.visible_to(rooms)][:MAX_EVENTS]
                if recent:
                    key = events[-1].key if len(events) == MAX_EVENTS else recent[-1].key
                if events:
                    answer = hub.poll_answers[memo] = _answer(events, format_id(key))
                    return answer
            remaining = deadline - time.monotonic()
            if identity.expired() or (expires_first and remaining <= 0):
                return error_response(
                    401, ErrorCode.TOKEN_EXPIRED, "the token has expired; log in again")
            if remaining <= 0 or rt.draining:
                return _answer([], format_id(key))
            if wait is None:
                wait = _Wait()
                unwatch = _watch(request, wait)
            await hub.wait_for_events(remaining, wait)
            if wait.gone:  # nobody to answer: the answer goes nowhere
                return _answer([], format_id(key))
            if hub.resets != resets:
                return _told_reset(hub)
    except asyncio.CancelledError:
        raise
    finally:
        if unwatch is not None:
            unwatch()
        rt.stats.polls_waiting -= 1
        admission.lease.release()
