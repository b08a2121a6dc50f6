"""One admission path: a request becomes an admitted subscription or one typed refusal.

Every subscriber endpoint (and the HTTP API) asks the same questions in the same
order: is the transport offered, is the server draining, who is calling, which
rooms, from which cursor. The answer is an `Admission` or a `Refusal`; how a
refusal reaches the client (HTTP status and JSON, a WebSocket denial or an
`error` frame) is each transport's only say.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from dualcast.auth import AuthError, Identity
from dualcast.events import StreamId, parse_id
from dualcast.names import name_rule
from dualcast.protocol import ErrorCode, Transport
from dualcast.query import query_of
from dualcast.quotas import FREE, Lease

if TYPE_CHECKING:
    from dualcast.config import Settings
    from dualcast.runtime import Runtime

log = logging.getLogger("dualcast.auth")

class Refusal(Exception):
    """A client error with an HTTP status, a machine code and a human message."""

    def __init__(self, status: int, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message)


def error_response(status: int, code: ErrorCode | str, message: str, **extra: Any) -> JSONResponse:
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="dualcast"'
    return JSONResponse(
        {"error": code, "message": message, **extra}, status_code=status, headers=headers
    )


@dataclass(slots=True)
class Admission:
    """Who was admitted, to which rooms, from which cursor (None: live from now).

    `refused` holds the rooms asked for and not granted, as (code, message): only a
    lenient admission (WebSocket, which keeps the connection and says so in `error`
    frames) has any; a strict one refuses the whole request instead.
    """

    identity: Identity
    rooms: set[str]
    cursor: StreamId | None
    refused: list[tuple[ErrorCode, str]] = field(default_factory=list)
    #: The caller's connection slot: released when the subscription ends.
    lease: Lease = FREE
    #: No room was named: the rooms are the identity's defaults, and a WebSocket that
    #: refreshes its token (`auth`) joins the defaults the new token adds.
    defaults: bool = False


async def identify(conn: HTTPConnection, rt: Runtime) -> Identity:
    """The caller's identity, or a Refusal (HTTP API endpoints use this alone)."""
    try:
        return await rt.auth.identify(conn)
    except AuthError as exc:
        raise Refusal(exc.status, exc.code, exc.message) from None


#: A cursor's other name: streams take `last_event_id`, polls `after`; each also takes
#: the other's when its own is absent.
_OTHER_CURSOR = {"after": "last_event_id", "last_event_id": "after"}


async def admit(
    conn: HTTPConnection, rt: Runtime, transport: Transport, *,
    cursor_param: str = "last_event_id", cursor_header: bool = False, lenient_rooms: bool = False,
) -> Admission:
    """Admit one subscriber or raise Refusal (counted in the runtime's stats)."""
    try:
        return await _admit(conn, rt, transport, cursor_param, cursor_header, lenient_rooms)
    except Refusal:
        rt.stats.refused += 1
        raise


async def _admit(
    conn: HTTPConnection, rt: Runtime, transport: Transport, cursor_param: str,
    cursor_header: bool, lenient_rooms: bool,
) -> Admission:
    settings = rt.settings
    if transport not in settings.transports:
        raise Refusal(403, ErrorCode.TRANSPORT_DISABLED, f"{transport} is not offered here")
    if rt.draining:
        # 503: a proxy retries another instance; a client retries later, and does not
        # take it as "this transport is refused".
        raise Refusal(503, ErrorCode.DRAINING, "server is restarting; retry")
    identity = await identify(conn, rt)
    query = query_of(conn)
    raw_cursor = conn.headers.get("last-event-id") if cursor_header else None
    if not raw_cursor and cursor_param not in query:
        # The other transports' name for the cursor: a poll given `last_event_id` (as
        # the streams take it) went live from now without a word, and what the client
        # meant to resume from was lost to it.
        other = _OTHER_CURSOR[cursor_param]
        if other in query:
            cursor_param = other
    cursor = parse_cursor(raw_cursor or query.get(cursor_param), cursor_param)
    if lenient_rooms:
        rooms, refused = choose_rooms(query.get("rooms"), identity, settings)
    else:
        rooms, refused = requested_rooms(conn, identity, settings), []
    # Last: a request refused for another reason holds no slot.
    if rt.quotas.full():
        # 503, as for a drain: a client retries, a proxy tries another instance.
        _said_full(rt)
        raise Refusal(503, ErrorCode.TOO_MANY_CONNECTIONS,
                      "this server process holds all the connections it allows "
                      "(DUALCAST_MAX_CONNECTIONS); retry")
    lease = rt.quotas.acquire(None if identity.anonymous else identity.sub,
                              conn.client.host if conn.client else None)
    if lease is None:
        who = "this token" if not identity.anonymous else "this address"
        raise Refusal(429, ErrorCode.TOO_MANY_CONNECTIONS,
                      f"{who} holds as many connections as this server allows; close one")
    return Admission(identity, rooms, cursor, refused, lease,
                     defaults=not room_names(query.get("rooms")))


def requested_rooms(conn: HTTPConnection, identity: Identity, settings: Settings) -> set[str]:
    """The rooms of `?rooms=`, all of them granted, or a Refusal for the first that is not."""
    rooms, refused = choose_rooms(query_of(conn).get("rooms"), identity, settings)
    if refused:
        # the client's own mistakes first: a malformed name, then too many, then forbidden
        code, message = min(refused, key=lambda r: _REFUSAL_ORDER.index(r[0]))
        raise Refusal(403 if code is ErrorCode.FORBIDDEN_ROOM else 400, code, message)
    return rooms


_REFUSAL_ORDER = (ErrorCode.BAD_ROOM, ErrorCode.TOO_MANY_ROOMS, ErrorCode.FORBIDDEN_ROOM)


def choose_rooms(
    raw: str | None, identity: Identity, settings: Settings,
) -> tuple[set[str], list[tuple[ErrorCode, str]]]:
    """DESIGN's subscription rule (no rooms named = every room the identity allows),
    and the names refused, in the order a WebSocket client is told about them.

    At most `max_rooms` distinct names are looked at: a query with thousands of
    names costs one `too_many_rooms` refusal, not thousands of checks and frames.
    """
    accepts = name_rule("room", settings.room_pattern).accepts
    names = room_names(raw)
    if not names:
        # (`?rooms=,` or `?rooms=, ,`, as a client joining an empty list may send: no room
        # named, like `?rooms=`; it joined no room at all, not even `user-<sub>`)
        return _default_rooms(identity, accepts, settings.room_pattern), []
    malformed: list[tuple[ErrorCode, str]] = []
    forbidden: list[tuple[ErrorCode, str]] = []
    too_many: list[tuple[ErrorCode, str]] = []
    if len(names) > settings.max_rooms:
        too_many.append((ErrorCode.TOO_MANY_ROOMS,
                         f"at most {settings.max_rooms} rooms per subscriber"))
        names = names[: settings.max_rooms]
    rooms: set[str] = set()
    for name in names:
        if not accepts(name):
            malformed.append((ErrorCode.BAD_ROOM, f"malformed room name {name[:80]!r}"))
        elif not identity.may_join(name):
            forbidden.append((ErrorCode.FORBIDDEN_ROOM, f"not allowed in room {name!r}"))
        else:
            rooms.add(name)
    return rooms, malformed + forbidden + too_many


def room_names(raw: str | None) -> list[str]:
    """The names of a `rooms` comma list, in order, each once (none: the defaults)."""
    if raw is None:
        return []
    return list(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))


def _said_full(rt: Runtime) -> None:
    """A process at its connection cap answered 503 to every new stream and poll without
    a line in its log (only a counter said so): the first refusal is a WARNING, then one
    line per 30 s with the count, as a failing publish is."""
    count = rt.cap_refusing.due()
    if count is not None:
        more = f" ({count} refused since the last such line)" if count > 1 else ""
        log.warning("this process holds %d connections, its cap (DUALCAST_MAX_CONNECTIONS; "
                    "unset, the open-file limit minus 100): new streams and polls get 503%s; "
                    "add workers or instances, or raise the cap; said at most every %gs, "
                    "dualcast_refusals_total counts each", rt.quotas.per_process, more,
                    rt.cap_refusing.every)


_told_of_unnamed_rooms = False  # the warning below, once per process


def _default_rooms(identity: Identity, accepts: Callable[[str], object],
                   pattern: str) -> set[str]:
    """The identity's own rooms, with a warning the first time one breaks the room pattern.

    Subjects from other issuers often do: Auth0's `auth0|64f0...` or
    `google-oauth2|1057...` give `user-auth0|64f0...`, which the default pattern refuses.
    The subscriber is still in that room, but no producer may publish to it and no
    `?rooms=` may name it, so its owner would wait for events that can never come.
    """
    global _told_of_unnamed_rooms
    rooms = identity.default_rooms()
    if not _told_of_unnamed_rooms:
        unnamed = sorted(room for room in rooms if not accepts(room))
        if unnamed:
            _told_of_unnamed_rooms = True
            log.warning(
                "subject %r is in room %r, which DUALCAST_ROOM_PATTERN %s refuses: no "
                "producer can publish to it. Widen the pattern on the server and its "
                "producers (for subjects like 'auth0|abc': ^[A-Za-z0-9_.:@|-]{1,64}$); "
                "said once", identity.sub, unnamed[0], pattern)
    return rooms


def parse_cursor(raw: str | None, name: str = "last_event_id") -> StreamId | None:
    """None = live from now; `0`/`0-0` = from the oldest retained; else after that id."""
    if raw is None or raw == "" or raw == "$":
        return None
    try:
        return parse_id(raw.strip())
    except ValueError:
        raise Refusal(
            400, ErrorCode.BAD_CURSOR, f"{name} must be a stream id like 1732550000000-0"
        ) from None
