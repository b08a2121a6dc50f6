"""Event and room names: the one place their rules are written.

The publish API, the envelope model and the producer library all check names
here. This module imports neither pydantic nor Starlette, so the producer
library (`dualcast.publisher`) can use it without pulling in the server.

Names are matched whole (`re.fullmatch`): with `re.match`, a `$` also matches
before a trailing newline, and an event name ends up on an SSE `event:` line,
where a line break would split the frame.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

#: Defaults of the name patterns (settings may narrow them for a deployment).
EVENT_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
ROOM_NAME_PATTERN = r"^[A-Za-z0-9_.:@-]{1,64}$"
#: Rooms one event may name.
MAX_ROOMS = 100


def _shown(value: object) -> str:
    """A bounded repr for an error line: a caller's huge or odd value stays one short line."""
    text = repr(value)
    return text if len(text) <= 72 else text[:69] + "..."


@functools.lru_cache(maxsize=32)
def _compiled(pattern: str) -> re.Pattern[str]:
    """A publisher checks names on every call: skip `re`'s own, slower, cache lookup."""
    return re.compile(pattern)


def check_event(name: object, pattern: str = EVENT_NAME_PATTERN) -> str:
    """The event name itself, or ValueError naming what is wrong in one line."""
    if not isinstance(name, str) or _compiled(pattern).fullmatch(name) is None:
        raise ValueError(f"event name {_shown(name)} does not match {pattern}")
    return name


def check_room(name: object, pattern: str = ROOM_NAME_PATTERN) -> str:
    """The room name itself, or ValueError naming what is wrong in one line."""
    if not isinstance(name, str) or _compiled(pattern).fullmatch(name) is None:
        raise ValueError(f"room name {_shown(name)} does not match {pattern}")
    return name


def check_rooms(
    rooms: Iterable[object] | None, pattern: str = ROOM_NAME_PATTERN, limit: int = MAX_ROOMS
) -> list[str]:
    """Valid, de-duplicated room names in their first order; ValueError otherwise.

    A single string is refused rather than read as a list of one-letter rooms.
    """
    if rooms is None:
        return []
    if isinstance(rooms, (str, bytes)):
        raise ValueError("rooms must be a list of room names, not a single string")
    out: list[str] = []
    seen: set[str] = set()
    for room in rooms:
        name = check_room(room, pattern)
        if name not in seen:
            seen.add(name)
            out.append(name)
    if len(out) > limit:
        raise ValueError(f"{len(out)} rooms: at most {limit} per event")
    return out
