"""What every transport asks of a request: who, which rooms, from which cursor.

Refusals are raised as `Refusal` where detected; HTTP transports turn them
into JSON errors, the WebSocket into `error` frames.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from dualcast.auth import Authenticator, AuthError, Identity
from dualcast.config import Settings
from dualcast.events import ZERO, StreamId, parse_id


class Refusal(Exception):
    """A client error with an HTTP status, a machine code and a human message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message)


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="dualcast"'
    return JSONResponse(
        {"error": code, "message": message, **extra}, status_code=status, headers=headers
    )


async def caller(conn: HTTPConnection, auth: Authenticator) -> Identity:
    try:
        return await auth.identify(conn)
    except AuthError as exc:
        raise Refusal(exc.status, exc.code, exc.message) from None


@dataclass
class RoomChoice:
    """The rooms a subscriber gets, and the ones it asked for and may not have."""

    rooms: set[str]
    forbidden: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    too_many: bool = False


def choose_rooms(raw: str | None, identity: Identity, settings: Settings) -> RoomChoice:
    """Apply DESIGN's subscription rule: no rooms named = every room the token allows.

    At most `max_rooms` distinct names are looked at: a query with thousands of
    names costs one `too_many_rooms` refusal, not thousands of checks and frames.
    """
    if raw is None or not raw.strip():
        return RoomChoice(identity.default_rooms())
    pattern = re.compile(settings.room_pattern)
    choice = RoomChoice(set())
    names = list(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    if len(names) > settings.max_rooms:
        choice.too_many = True
        names = names[: settings.max_rooms]
    for name in names:
        if not pattern.fullmatch(name):
            choice.malformed.append(name[:80])
        elif not identity.may_join(name):
            choice.forbidden.append(name)
        else:
            choice.rooms.add(name)
    return choice


def strict_rooms(raw: str | None, identity: Identity, settings: Settings) -> set[str]:
    """For SSE and poll: any bad room refuses the whole request before a stream starts."""
    choice = choose_rooms(raw, identity, settings)
    if choice.malformed:
        raise Refusal(400, "bad_room", f"malformed room name {choice.malformed[0]!r}")
    if choice.too_many:
        raise Refusal(400, "too_many_rooms", f"at most {settings.max_rooms} rooms per subscriber")
    if choice.forbidden:
        raise Refusal(403, "forbidden_room", f"not allowed in room {choice.forbidden[0]!r}")
    return choice.rooms


def parse_cursor(raw: str | None, name: str = "last_event_id") -> StreamId | None:
    """None = live from now; `0`/`0-0` = from the oldest retained; else after that id."""
    if raw is None or raw == "" or raw == "$":
        return None
    try:
        return parse_id(raw.strip())
    except ValueError:
        raise Refusal(
            400, "bad_cursor", f"{name} must be a stream id like 1732550000000-0"
        ) from None


def is_zero(cursor: StreamId | None) -> bool:
    return cursor == ZERO
