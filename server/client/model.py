"""What a subscriber sees: events, resets, transports, states, and the client's errors.

Nothing here imports the server: the client is installed next to applications
that only need to read a dualcast stream.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

#: What `dualcast.client` re-exports from here (the vocabulary a subscriber handles).
__all__ = [
    "TRANSPORTS", "AuthFailed", "ClientError", "Event", "Item", "Refused", "Reset",
    "ServerError", "State", "Status", "Transport",
]


class Transport(enum.StrEnum):
    WEBSOCKET = "websocket"
    SSE = "sse"
    POLLING = "polling"


#: Best first: the order the client tries them in unless told otherwise.
TRANSPORTS: tuple[Transport, ...] = (Transport.WEBSOCKET, Transport.SSE, Transport.POLLING)


class State(enum.StrEnum):
    CONNECTING = "connecting"
    LIVE = "live"
    OFFLINE = "offline"


#: Error codes that mean "who you are is no longer good": the client asks its token
#: source for a fresh token, or gives up with AuthFailed when it has none.
AUTH_CODES = frozenset({
    "unauthenticated", "invalid_token", "token_expired", "no_secret", "unauthorized",
    "anonymous_not_allowed",
})


@dataclass(frozen=True, slots=True)
class Event:
    """One event as every transport delivers it. `ts` is the entry's timestamp (ms);
    None when the transport did not carry one (SSE frames may not)."""

    id: str
    event: str
    data: Any
    ts: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "event": self.event, "data": self.data, "ts": self.ts}


@dataclass(frozen=True, slots=True)
class Reset:
    """The cursor the subscription resumed from is gone (older than the retained
    window, or newer than the stream after a Redis reset). Events may be missing
    before this point: reload your state; the events after it continue from `last_id`."""

    last_id: str | None


Item = Event | Reset


@dataclass(frozen=True, slots=True)
class Status:
    """Which transport feeds the subscription and whether it is live; `reason`, for a
    subscription gone offline, why the last attempt failed (not compared)."""

    transport: Transport
    state: State
    reason: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class ServerError:
    """An `error` the server sent that does not end the subscription (for example a
    room the token may not join, on any transport: the other rooms are kept, and
    later connections no longer ask for it)."""

    transport: Transport
    code: str
    message: str


class ClientError(Exception):
    """Base of what `subscribe` raises."""


class Refused(ClientError):
    """The server refused the subscription itself (none of the rooms asked for may be
    joined, a bad cursor, too many rooms, no dualcast server at that URL: code
    `not_found`, a TLS certificate the client does not trust: `tls_certificate`, no
    transport asked for offered by the server: `transport_disabled`): trying again,
    on any transport, would not help."""

    def __init__(self, status: int | None, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.status = status
        self.code = code
        self.message = message


class AuthFailed(Refused):
    """The token is missing, invalid or expired, and no token source gave a better one."""


#: ASCII digits, matched whole: `\d` also takes other scripts' digits (int() reads an
#: Arabic-Indic "17" as 17) and `$` a trailing newline, as the server refuses both.
_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")


def id_key(value: str | None) -> tuple[int, int] | None:
    """A stream id `<ms>-<seq>` as a comparable pair; None for anything else."""
    if value is None:
        return None
    match = _ID.fullmatch(value)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 0)


def is_after(value: str, cursor: str | None) -> bool:
    """Whether `value` comes after `cursor` (ids are totally ordered; no cursor yet =
    everything is new). An id that does not parse is never after anything."""
    key = id_key(value)
    if key is None:
        return False
    current = id_key(cursor)
    return current is None or key > current
