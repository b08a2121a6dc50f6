"""The event vocabulary: stream ids, the publish envelope, and decoded events.

Everything that turns bytes from the stream into an event, or an event into
bytes for a transport, lives here, so no transport filters or encodes on its own.
An `Event` caches its encoded frames: the hub hands one object to every
subscriber, and each frame kind is serialised once per event, not per client.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dualcast.bigints import past_64_bits
from dualcast.names import EVENT_NAME_PATTERN as EVENT_NAME_PATTERN
from dualcast.names import MAX_ROOMS, NameRule, check_rooms, name_rule
from dualcast.names import ROOM_NAME_PATTERN as ROOM_NAME_PATTERN

#: ASCII digits only and matched whole: `\d` alone also takes other scripts' digits
#: (`int()` reads Arabic-Indic "17" as 17), and `$` a trailing newline, so a cursor no stream id
#: spells was taken as some other id instead of being refused.
_ID_RE = re.compile(r"(\d{1,20})(?:-(\d{1,20}))?", re.ASCII)

StreamId = tuple[int, int]
ZERO: StreamId = (0, 0)


class Malformed(enum.Enum):
    """Why a stream entry was skipped (the `reason` label of the malformed-entries counter)."""

    NO_DATA = "no_data"              # no `data` field
    NOT_UTF8 = "not_utf8"            # a field's bytes are not UTF-8
    NOT_JSON = "not_json"            # not JSON, or a number that does not fit (1e400, 2**64)
    NOT_OBJECT = "not_object"        # JSON, but not an object
    BAD_EVENT = "bad_event"          # `event` missing, not a string, or off the name pattern
    BAD_ROOMS = "bad_rooms"          # `rooms` present but not a list of valid room names
    BAD_TIMESTAMP = "bad_timestamp"  # `timestamp` not an integer that fits in 64 bits
    BAD_ID = "bad_id"                # an entry id that is not `<ms>-<seq>`
    UNENCODABLE = "unencodable"      # decodes, but some transport's frame cannot be encoded


class MalformedEntry(ValueError):
    """A stream entry that is not a dualcast envelope: skipped once, never delivered."""

    def __init__(self, reason: Malformed, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


def parse_id(value: str) -> StreamId:
    """Parse `<ms>-<seq>` (or a bare `<ms>`, as Redis accepts) into a comparable tuple.

    Raises ValueError for anything else, so a caller can answer 400.
    """
    match = _ID_RE.fullmatch(value)
    if match is None:
        raise ValueError(f"not a stream id: {value[:40]!r}")
    ms, seq = match.groups()
    parsed = (int(ms), int(seq or 0))
    if parsed[0] >= 2**64 or parsed[1] >= 2**64:
        raise ValueError(f"stream id out of range: {value[:40]!r}")
    return parsed


def format_id(value: StreamId) -> str:
    return f"{value[0]}-{value[1]}"


def id_before(key: StreamId) -> StreamId:
    """The greatest id below `key` (`key` above 0-0): reading after it starts at `key`."""
    ms, seq = key
    return (ms, seq - 1) if seq > 0 else (ms - 1, 2**64 - 1)


def dumps(value: Any) -> bytes:
    """JSON encoding shared by every frame; non-native types become strings."""
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)


class NameRules(NamedTuple):
    """The event and room name rules one process serves with."""

    event: NameRule
    room: NameRule

    @classmethod
    def of(cls, event_pattern: str, room_pattern: str) -> NameRules:
        return cls(name_rule("event", event_pattern), name_rule("room", room_pattern))


_rules = NameRules.of(EVENT_NAME_PATTERN, ROOM_NAME_PATTERN)
#: What the decoder calls per name: bound once here, so the hot path looks up one
#: global, as it did when it held the default patterns compiled at import.
_event_ok = _rules.event.accepts
_room_ok = _rules.room.accepts


def use_names(rules: NameRules) -> None:
    """Serve with these name rules: the decoder and the `Envelope` model follow them.

    Called once, when a process builds its runtime (each worker builds its own), so
    events published with a deployment's wider pattern are the events its decoder
    delivers. A process that never calls it (a producer) keeps the defaults.
    """
    global _rules, _event_ok, _room_ok
    _rules = rules
    _event_ok, _room_ok = rules.event.accepts, rules.room.accepts


class Envelope(BaseModel):
    """What a producer appends: the JSON in the stream entry's `data` field."""

    model_config = ConfigDict(extra="forbid")

    event: str = Field(description="event name")
    data: Any = None
    rooms: list[str] = Field(default_factory=list)

    # the rules live in dualcast.names; the patterns are this process's (`use_names`)
    @field_validator("event")
    @classmethod
    def _event_is_a_name(cls, event: str) -> str:
        return _rules.event.check(event)

    @field_validator("rooms")
    @classmethod
    def _rooms_are_names(cls, rooms: list[str]) -> list[str]:
        return check_rooms(rooms, _rules.room.pattern)


def entry_fields(envelope: Envelope, timestamp_ms: int | None = None) -> dict[str, str]:
    """The XADD fields of the DESIGN wire format: `data` (JSON envelope) and `timestamp` (ms)."""
    body: dict[str, Any] = {"event": envelope.event, "data": envelope.data}
    if envelope.rooms:
        body["rooms"] = envelope.rooms
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return {"data": dumps(body).decode(), "timestamp": str(ts)}


class Event:
    """One decoded stream entry, shared by every subscriber that receives it."""

    __slots__ = ("_plain", "_poll", "_sse", "_wire", "_ws", "data", "event", "id", "key", "rooms",
                 "ts")

    def __init__(
        self, id: str, event: str, data: Any, rooms: tuple[str, ...], ts: int,
        key: StreamId | None = None,
    ) -> None:
        self.id = id
        self.key = parse_id(id) if key is None else key  # (the decoder has parsed it)
        self.event = event
        self.data = data
        self.rooms = rooms
        self.ts = ts
        self._ws: str | None = None
        self._sse: bytes | None = None
        self._poll: bytes | None = None
        self._plain: bytes | None = None
        self._wire: bytes | None = None

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

    def ws_wire(self, header: Callable[[int], bytes]) -> bytes:
        """The `event` frame as a whole unmasked WebSocket text frame (`header(size)` and
        the UTF-8 payload), for writes straight to the socket: built once per event, not
        once per subscriber."""
        if self._wire is None:
            payload = self.ws_frame().encode()
            self._wire = header(len(payload)) + payload
        return self._wire

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


#: What one stream entry holds as read: `bytes` from Redis, `str` from the memory engine.
RawFields = Mapping[Any, str | bytes]

_TIMESTAMP = re.compile(r"-?[0-9]{1,19}")
_I64 = 2**63


def _field(fields: RawFields, name: bytes) -> str | bytes | None:
    value = fields.get(name)
    return fields.get(name.decode()) if value is None else value


def _timestamp(raw: str | bytes, default: int) -> int:
    if type(raw) is bytes and 0 < len(raw) < 19 and raw.isdigit():
        return int(raw)  # what producers write (ASCII digits, fits): no decode, no regex
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise MalformedEntry(Malformed.NOT_UTF8, "'timestamp' is not UTF-8") from None
    text = text.strip()
    if not text:
        return default
    if _TIMESTAMP.fullmatch(text) is None:
        raise MalformedEntry(Malformed.BAD_TIMESTAMP, f"'timestamp' {text[:30]!r} is not ms")
    ts = int(text)
    if not -_I64 <= ts < _I64:
        raise MalformedEntry(Malformed.BAD_TIMESTAMP, "'timestamp' does not fit in 64 bits")
    return ts


def _rooms(body: dict[str, Any]) -> tuple[str, ...]:
    """Fail closed: a `rooms` that is present must be a list of valid names (maybe empty);
    `{}`, `""`, `null`, `false` or `0` would read as "public" to a truthiness test."""
    if "rooms" not in body:
        return ()
    rooms = body["rooms"]
    if type(rooms) is not list or len(rooms) > MAX_ROOMS:
        raise MalformedEntry(Malformed.BAD_ROOMS, "'rooms' is not a list of at most 100 names")
    for room in rooms:
        if type(room) is not str or not _room_ok(room):
            raise MalformedEntry(Malformed.BAD_ROOMS, f"room {str(room)[:70]!r} is not a room name")
    return tuple(rooms)


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


def decode_entry(entry_id: str, fields: RawFields) -> Event:
    """Decode, validate and encode one stream entry, or raise MalformedEntry (nothing else).

    What decodes may still not encode (orjson reads 1024 levels of nesting but writes
    254, and a JSON string may hold a lone surrogate), and an entry that fails for one
    transport must fail for all, before any subscriber holds it. So the WebSocket frame
    is encoded here, at ingestion, and the SSE and long-poll frames on first use: each
    holds the same values (the poll item the same keys at the same depth, the SSE
    message `data` alone, one level shallower), so whatever the WebSocket frame can
    encode they can too (tests/test_ingest.py holds an entry to each limit). Encoding
    all three here cost ~7 µs per event in every process whether or not anyone
    listened on SSE or polled (of ~16 µs to decode an entry of ~450 bytes, warm); a
    worker whose subscribers are all WebSocket now pays for the one frame they need.
    `python -m bench.readcost --repeat 3 --duration 20` (one worker, no subscriber,
    100 events/s, interleaved): 235 -> 215 µs of server CPU per event.
    """
    raw = _field(fields, b"data")
    if raw is None:
        raise MalformedEntry(Malformed.NO_DATA, "no 'data' field")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # Asked of the bytes, not read from orjson's message: "UTF-8 byte order mark (BOM)
        # is not supported" was counted and logged as "not UTF-8", on valid UTF-8.
        if isinstance(raw, bytes) and not _utf8(raw):
            raise MalformedEntry(Malformed.NOT_UTF8, "'data' is not UTF-8") from None
        raise MalformedEntry(Malformed.NOT_JSON, f"'data' is not JSON: {exc}") from None
    if type(body) is not dict:
        raise MalformedEntry(Malformed.NOT_OBJECT, "'data' is not a JSON object")
    if (where := past_64_bits(raw)) is not None:  # orjson made it a float: not delivered
        raise MalformedEntry(Malformed.NOT_JSON, f"'data' holds an integer past 64 bits "
                                                 f"at {where}")
    name = body.get("event")
    if type(name) is not str or not _event_ok(name):
        raise MalformedEntry(Malformed.BAD_EVENT, f"'event' {str(name)[:70]!r} is not a name")
    rooms = _rooms(body)
    try:
        key = parse_id(entry_id)
    except ValueError as exc:
        raise MalformedEntry(Malformed.BAD_ID, str(exc)) from None
    ts_raw = _field(fields, b"timestamp")
    ts = key[0] if ts_raw is None else _timestamp(ts_raw, key[0])
    event = Event(entry_id, name, body.get("data"), rooms, ts, key)
    try:
        event.ws_frame()
    except (TypeError, ValueError, RecursionError) as exc:  # orjson.JSONEncodeError is a TypeError
        raise MalformedEntry(Malformed.UNENCODABLE, f"cannot be encoded: {exc}") from None
    return event
