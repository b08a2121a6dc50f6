"""The event vocabulary: stream ids, the publish envelope, and decoded events.

Everything that turns bytes from the stream into an event, or an event into
bytes for a transport, lives here, so no transport filters or encodes on its own.
An `Event` caches its encoded frames: the hub hands one object to every
subscriber, and each frame kind is serialised once per event, not per client.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dualcast.names import EVENT_NAME_PATTERN as EVENT_NAME_PATTERN
from dualcast.names import ROOM_NAME_PATTERN as ROOM_NAME_PATTERN
from dualcast.names import check_event, check_rooms

_ID_RE = re.compile(r"^(\d{1,20})(?:-(\d{1,20}))?$")

StreamId = tuple[int, int]
ZERO: StreamId = (0, 0)


class MalformedEntry(ValueError):
    """A stream entry that is not a dualcast envelope; the consumer skips it."""


def parse_id(value: str) -> StreamId:
    """Parse `<ms>-<seq>` (or a bare `<ms>`, as Redis accepts) into a comparable tuple.

    Raises ValueError for anything else, so a caller can answer 400.
    """
    match = _ID_RE.match(value)
    if match is None:
        raise ValueError(f"not a stream id: {value[:40]!r}")
    ms, seq = match.groups()
    parsed = (int(ms), int(seq or 0))
    if parsed[0] >= 2**64 or parsed[1] >= 2**64:
        raise ValueError(f"stream id out of range: {value[:40]!r}")
    return parsed


def format_id(value: StreamId) -> str:
    return f"{value[0]}-{value[1]}"


def dumps(value: Any) -> bytes:
    """JSON encoding shared by every frame; non-native types become strings."""
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)


class Envelope(BaseModel):
    """What a producer appends: the JSON in the stream entry's `data` field."""

    model_config = ConfigDict(extra="forbid")

    event: str = Field(description="event name")
    data: Any = None
    rooms: list[str] = Field(default_factory=list)

    # the rules live in dualcast.names, shared with the publisher and the publish API
    @field_validator("event")
    @classmethod
    def _event_is_a_name(cls, event: str) -> str:
        return check_event(event)

    @field_validator("rooms")
    @classmethod
    def _rooms_are_names(cls, rooms: list[str]) -> list[str]:
        return check_rooms(rooms)


def entry_fields(envelope: Envelope, timestamp_ms: int | None = None) -> dict[str, str]:
    """The XADD fields of the DESIGN wire format: `data` (JSON envelope) and `timestamp` (ms)."""
    body: dict[str, Any] = {"event": envelope.event, "data": envelope.data}
    if envelope.rooms:
        body["rooms"] = envelope.rooms
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return {"data": dumps(body).decode(), "timestamp": str(ts)}


class Event:
    """One decoded stream entry, shared by every subscriber that receives it."""

    __slots__ = ("_plain", "_poll", "_sse", "_ws", "data", "event", "id", "key", "rooms", "ts")

    def __init__(
        self, id: str, event: str, data: Any, rooms: tuple[str, ...], ts: int
    ) -> None:
        self.id = id
        self.key = parse_id(id)
        self.event = event
        self.data = data
        self.rooms = rooms
        self.ts = ts
        self._ws: str | None = None
        self._sse: bytes | None = None
        self._poll: bytes | None = None
        self._plain: bytes | None = None

    def visible_to(self, rooms: set[str] | frozenset[str]) -> bool:
        return not self.rooms or any(room in rooms for room in self.rooms)

    def ws_frame(self) -> str:
        """The WebSocket `event` frame, encoded once for every subscriber."""
        if self._ws is None:
            self._ws = dumps(
                {"type": "event", "id": self.id, "event": self.event, "data": self.data,
                 "ts": self.ts}
            ).decode()
        return self._ws

    def sse_frame(self) -> bytes:
        """The SSE message (`id:`/`event:`/`data:` and the blank line), encoded once."""
        if self._sse is None:
            self._sse = b"id: %s\nevent: %s\ndata: %s\n\n" % (
                self.id.encode(), self.event.encode(), dumps(self.data)
            )
        return self._sse

    def sse_plain_frame(self) -> bytes:
        """The SSE message for generic clients (`?events=message`): unnamed, so a plain
        `EventSource.onmessage` receives it, with `{id, event, data, ts}` as its data."""
        if self._plain is None:
            self._plain = b"id: %s\ndata: %s\n\n" % (self.id.encode(), self.poll_item())
        return self._plain

    def poll_item(self) -> bytes:
        """The long-poll item `{"id","event","data","ts"}`, encoded once for every poller."""
        if self._poll is None:
            self._poll = dumps(
                {"id": self.id, "event": self.event, "data": self.data, "ts": self.ts}
            )
        return self._poll

    def __repr__(self) -> str:
        return f"Event({self.id!r}, {self.event!r}, rooms={self.rooms!r})"


def decode_entry(entry_id: str, fields: dict[str, str]) -> Event:
    """Decode one stream entry in the DESIGN wire format, or raise MalformedEntry."""
    raw = fields.get("data")
    if raw is None:
        raise MalformedEntry("no 'data' field")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedEntry(f"'data' is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MalformedEntry("'data' is not a JSON object")
    name = body.get("event")
    if not isinstance(name, str) or not name:
        raise MalformedEntry("'event' is missing or not a string")
    rooms = body.get("rooms") or []
    if not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
        raise MalformedEntry("'rooms' is not a list of strings")
    try:
        key = parse_id(entry_id)
    except ValueError as exc:
        raise MalformedEntry(str(exc)) from None
    ts_raw = fields.get("timestamp")
    ts = key[0]
    if ts_raw is not None:
        try:
            ts = int(ts_raw)
        except ValueError:
            ts = key[0]
    return Event(entry_id, name, body.get("data"), tuple(rooms), ts)
