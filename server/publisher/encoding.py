"""The envelope as it goes into the stream: JSON that every dualcast server can carry.

A producer's data passes through here once. Odd types are converted the way a
dashboard wants them (datetimes as ISO 8601, sets as lists, integers beyond
2^53 as strings...). What a server would have to drop is refused with
:class:`UnpublishableValue` (a ValueError) before anything reaches Redis:

* NaN and infinite floats or Decimals (JSON has no such numbers; orjson would
  quietly write ``null``);
* a Decimal that does not fit the JSON number a server decodes it to: an
  integral one past 64 bits, any other past the float range (``1E+400``);
* an integer past 64 bits (orjson refuses to write it);
* nesting deeper than the server can write back out (see :data:`MAX_DEPTH`);
* a string (value or key) holding a lone surrogate (``"\\ud800"``, as Python's own
  ``json.loads`` or ``surrogateescape`` produce): it is not UTF-8, so orjson cannot
  write it and no server decodes it.

The fast path is one ``orjson.dumps``; the Python walk runs only when that
fails or its output could hide a refusal (a ``null`` that may have been a NaN,
or more brackets than :data:`MAX_DEPTH`), so plain data pays two byte counts.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from datetime import date, datetime, timedelta
from datetime import time as dt_time
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

import orjson

from dualcast.names import EVENT_NAME_PATTERN, ROOM_NAME_PATTERN, check_event, check_rooms

#: Largest integer a JavaScript number holds exactly; beyond it the dashboard gets a string.
MAX_SAFE_INT = 2**53 - 1
#: The integers orjson writes: signed and unsigned 64-bit.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
#: orjson writes at most 254 nested containers. A server wraps data in up to two
#: more (the overview's state -> per-id map -> data; event frames wrap it once).
MAX_DEPTH = 254 - 2
_JSON_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_STRICT_INTEGER | orjson.OPT_SERIALIZE_NUMPY


class UnpublishableValue(ValueError):
    """A value no dualcast server could deliver; the message names where it sits in data."""

    def __init__(self, problem: str, where: str = "") -> None:
        shown = where if len(where) <= 60 else f"{where[:28]}...{where[-28:]}"
        super().__init__(f"data{shown}: {problem}; dualcast servers cannot deliver it")
        self.problem = problem
        self.where = where

    def inside(self, key: object) -> UnpublishableValue:
        """The same refusal, one container further out (the path is built on the way up)."""
        step = f"[{key!r}]" if isinstance(key, (str, int)) else f"[{type(key).__name__}]"
        return UnpublishableValue(self.problem, step + self.where)


def _safe_str(obj: Any) -> str:
    try:
        return str(obj)
    except Exception:  # a hostile __str__ still must not break the caller
        return f"<unencodable {type(obj).__name__}>"


def _decimal(value: Decimal) -> orjson.Fragment:
    """The exact decimal text as a JSON number, if a server decodes it to the same number."""
    if not value.is_finite():
        raise UnpublishableValue(f"Decimal {str(value)!r} is not a finite number")
    text = str(value).replace("E", "e")
    if "." not in text and "e" not in text:  # read back as an integer
        if not INT_MIN <= int(value) <= INT_MAX:
            raise UnpublishableValue(f"Decimal {_short(text)} is an integer past 64 bits")
    elif math.isinf(float(value)):
        raise UnpublishableValue(f"Decimal {_short(text)} is beyond the range of a float")
    return orjson.Fragment(text)


def _text(value: str) -> str:
    """The string itself, unless it holds a lone surrogate: then UnpublishableValue.

    orjson refuses to write one (a TypeError, which once escaped `publish` as is) and
    the fallback below would have turned the whole of `data` into its repr, silently.
    """
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise UnpublishableValue(
            f"string holds a lone surrogate (U+{ord(bad):04X}), which is not UTF-8"
        ) from None
    return value


def _short(text: str) -> str:
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


def _json_default(obj: Any) -> Any:
    """What orjson cannot encode natively, as a dashboard wants it.

    Raises only UnpublishableValue (for a Decimal); anything else degrades to text.
    """
    if isinstance(obj, Decimal):
        return _decimal(obj)
    if isinstance(obj, (set, frozenset)):
        try:
            return sorted(obj)
        except TypeError:
            return list(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode("utf-8", "replace")
    if isinstance(obj, timedelta):
        return obj.total_seconds()
    if isinstance(obj, Mapping):
        return dict(obj)
    for method, kwargs in (("model_dump", {"mode": "json"}), ("isoformat", {})):
        # pydantic models and other libraries' date-likes, without importing them
        func = getattr(obj, method, None)
        if callable(func):
            try:
                return func(**kwargs)
            except Exception:
                return _safe_str(obj)
    if isinstance(obj, Iterable) and not isinstance(obj, str):
        try:
            return list(obj)
        except Exception:
            return _safe_str(obj)
    return _safe_str(obj)


_LEAVES = (str, type(None), datetime, date, dt_time, UUID)


def _key(key: Any) -> str:
    if isinstance(key, str):
        return _text(key)
    if isinstance(key, bool) or key is None:
        return orjson.dumps(key).decode()
    if isinstance(key, (datetime, date, dt_time)):
        return key.isoformat()
    return _safe_str(key)


def _number(value: int | float) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UnpublishableValue(f"{value!r} is not a finite number")
        return value
    if -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        return value
    if INT_MIN <= value <= INT_MAX:
        return str(value)
    raise UnpublishableValue(f"integer {_short(str(value))} is past 64 bits")


_UNSEEN = object()


class _Walk:
    """One encode: what orjson's `default` converted is remembered, and the slow path
    reuses it instead of converting again (a generator can be read only once)."""

    __slots__ = ("converted", "path")

    def __init__(self) -> None:
        self.converted: dict[int, Any] = {}
        self.path: set[int] = set()  # ids of the containers above: a cycle is cut, not followed

    def default(self, obj: Any) -> Any:
        value = self.converted[id(obj)] = _json_default(obj)
        return value

    def native(self, value: Any, depth: int) -> Any:
        """A JSON-ready copy of `value`, `depth` containers deep; cycles become ``"<cycle>"``.

        One frame per level (no helper calls in between): data nested to MAX_DEPTH
        must fit in Python's default recursion limit with the caller's own frames.
        """
        if isinstance(value, str):
            return _text(value)
        if isinstance(value, _LEAVES) or isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, Enum):
            return _number(value)
        if isinstance(value, Decimal):
            return _decimal(value)
        if isinstance(value, Enum):
            return self.native(value.value, depth)
        if is_dataclass(value) and not isinstance(value, type):
            value = {f.name: getattr(value, f.name, None) for f in fields(value)}
        elif not isinstance(value, (Mapping, list, tuple, deque)):
            converted = self.converted.get(id(value), _UNSEEN)
            if converted is _UNSEEN:
                converted = self.default(value)
            if isinstance(converted, str):
                return _text(converted)  # a str() or isoformat() may hold one too
            if not isinstance(converted, (dict, list)):
                return converted
            value = converted
        if id(value) in self.path:
            return "<cycle>"
        if depth >= MAX_DEPTH:
            raise UnpublishableValue(f"nested deeper than {MAX_DEPTH} levels")
        self.path.add(id(value))
        key: Any = None
        try:
            if isinstance(value, Mapping):
                out: dict[str, Any] = {}
                for key, item in value.items():
                    out[_key(key)] = self.native(item, depth + 1)
                return out
            items: list[Any] = []
            for index, item in enumerate(value):
                key = index  # named in the refusal's path
                items.append(self.native(item, depth + 1))
            return items
        except UnpublishableValue as exc:
            raise exc.inside(key) from None
        finally:
            self.path.discard(id(value))


def _maybe_refused(text: bytes) -> bool:
    """Whether the fast path's output may hide a refusal: a NaN written as null, or depth
    (which takes two bytes a level, so short output is never too deep)."""
    if b"null" in text:
        return True
    return len(text) > 2 * MAX_DEPTH and text.count(b"[") + text.count(b"{") > MAX_DEPTH


def encode_envelope(event: str, data: Any, rooms: Sequence[str]) -> str:
    """The JSON of the stream entry's ``data`` field.

    Any value encodes (odd types are converted, cycles become ``"<cycle>"``,
    anything unknown its ``str()``), except what a server could not deliver:
    that raises :class:`UnpublishableValue` (see the module docstring).
    """
    body: dict[str, Any] = {"event": event, "data": data}
    if rooms:
        body["rooms"] = list(rooms)
    walk = _Walk()
    try:  # the fast path: orjson alone (it refuses integers beyond 2^53 here)
        text = orjson.dumps(body, default=walk.default, option=_JSON_OPTS)
        if not _maybe_refused(text):
            return text.decode()
    except TypeError:  # orjson.JSONEncodeError
        pass
    try:
        body["data"] = walk.native(data, 0)
        return orjson.dumps(body, default=_json_default, option=_JSON_OPTS).decode()
    except UnpublishableValue:
        raise
    except RecursionError:  # a caller already deep in its own stack
        raise UnpublishableValue(f"nested too deep to check (at most {MAX_DEPTH} levels)") from None
    except Exception:
        # (a str() may hold a lone surrogate too: escaped, so that this never raises)
        body["data"] = _safe_str(data).encode("utf-8", "backslashreplace").decode()
        return orjson.dumps(body).decode()


@dataclass(slots=True)
class Entry:
    """One validated, encoded event, ready to append (or to hand to the fallback)."""

    event: str
    rooms: list[str]
    body: str  # the JSON of the `data` field
    ts: int = 0  # epoch ms; stamped when the entry is appended

    def fields(self) -> dict[str, str]:
        ts = self.ts or int(time.time() * 1000)
        return {"data": self.body, "timestamp": str(ts)}

    def local_data(self) -> Any:
        """The data as the stream would carry it (so the fallback sees the same JSON)."""
        return orjson.loads(self.body).get("data")


def prepare(event: str, data: Any, rooms: Iterable[str] | None,
            event_pattern: str = EVENT_NAME_PATTERN,
            room_pattern: str = ROOM_NAME_PATTERN) -> Entry:
    """Check the names, encode the envelope; ValueError for anything a server would refuse.

    The patterns are the deployment's (DUALCAST_EVENT_PATTERN, DUALCAST_ROOM_PATTERN):
    a server decodes names with its own, and skips an entry whose names it refuses.
    """
    name = check_event(event, event_pattern)
    room_list = check_rooms(rooms, room_pattern)
    return Entry(name, room_list, encode_envelope(name, data, room_list))
