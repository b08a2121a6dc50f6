"""Event and room names: the one place their rules are written.

The publish API, the envelope model, the stream decoder and the producer library
all check names here. This module imports neither pydantic nor Starlette, so the
producer library (`dualcast.publisher`) can use it without pulling in the server.

Names are matched whole (`re.fullmatch`): with `re.match`, a `$` also matches
before a trailing newline, and an event name ends up on an SSE `event:` line,
where a line break would split the frame.

A deployment may set its own patterns (`DUALCAST_ROOM_PATTERN`,
`DUALCAST_EVENT_PATTERN`), wider or narrower than the defaults. Whatever they say,
some names would break the protocol, so a `NameRule` adds fixed limits to the
pattern (`protocol_safe`): a room name is a comma list's item (`?rooms=a,b`), so it
never holds a comma, whitespace or a control character; an event name becomes an
SSE `event:` line, so it never holds a line break or another control character;
neither is empty or longer than `MAX_NAME_LENGTH`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Literal

#: Defaults of the name patterns (settings may narrow or widen them for a deployment).
EVENT_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
ROOM_NAME_PATTERN = r"^[A-Za-z0-9_.:@-]{1,64}$"
#: Rooms one event may name.
MAX_ROOMS = 100
#: The longest name any pattern may admit (the defaults admit 64 characters).
MAX_NAME_LENGTH = 256

Kind = Literal["event", "room"]

#: What each kind of name may never hold, whatever the pattern, as a user reads it.
_NEVER = {
    "room": "a comma, whitespace or a control character",
    "event": "a line break or another control character",
}
#: Names a pattern must refuse; a start-up check, so the usual too-wide patterns
#: (`.*`, `\S+`, `[^/]+`) are one clear line, not a silent runtime refusal.
_PROBES: dict[Kind, tuple[str, ...]] = {
    "room": ("", ",", "a,b", " ", "a b", "\t", "a\n", "\n", "\r", "\x00", "\x7f", "\x85",
             "\u00a0", "\u2028", "\ufeff", "a" * (MAX_NAME_LENGTH + 1)),
    "event": ("", "\n", "a\n", "a\nb", "\r", "a\r\nb", "\x00", "\x7f", "\x85", "\u2028",
              "\ufeff", "a" * (MAX_NAME_LENGTH + 1)),
}
#: Patterns known to admit only protocol-safe names (tests/test_name_patterns.py proves it for
#: every code point), so the decoder's hot path pays for the pattern alone.
_KNOWN_SAFE = {("event", EVENT_NAME_PATTERN), ("room", ROOM_NAME_PATTERN)}


def protocol_safe(kind: Kind, name: str) -> bool:
    """The fixed limits every name keeps, whatever the configured pattern.

    `str.isprintable()` is False for control, format, separator (other than the
    space) and unassigned characters, so it refuses every line break an SSE parser
    or a browser might split on (CR, LF, NEL, U+2028/9) and invisible ones.
    """
    if not 0 < len(name) <= MAX_NAME_LENGTH or not name.isprintable():
        return False
    return kind == "event" or (" " not in name and "," not in name)


def _shown(value: object) -> str:
    """A bounded repr for an error line: a caller's huge or odd value stays one short line."""
    text = repr(value)
    return text if len(text) <= 72 else text[:69] + "..."


class NameRule:
    """One kind of name's rule: the configured pattern and the protocol's fixed limits.

    Sound whatever the pattern: `accepts` checks the fixed limits on every name, as
    probing a regular expression with sample names can never prove it refuses every
    unsafe one. The probes only make the common mistakes fail at start
    (`ValueError`, one line). `accepts` is what hot paths call: for a default
    pattern it is the compiled pattern's own `fullmatch` (the limits hold for every
    name it matches), for any other a function that checks both.
    """

    __slots__ = ("accepts", "kind", "pattern")

    def __init__(self, kind: Kind, pattern: str) -> None:
        if not pattern:
            raise ValueError("must not be empty (it would refuse every name)")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        for probe in _PROBES[kind]:
            if compiled.fullmatch(probe) is not None:
                raise ValueError(_accepts_unsafe(kind, probe))
        self.kind: Kind = kind
        self.pattern = pattern
        self.accepts: Callable[[str], object] = (
            compiled.fullmatch if (kind, pattern) in _KNOWN_SAFE else _both(kind, compiled)
        )

    def check(self, name: object) -> str:
        """The name itself, or ValueError naming what is wrong in one line."""
        if not isinstance(name, str) or not self.accepts(name):
            raise ValueError(f"{self.kind} name {_shown(name)} does not match {self.pattern}")
        return name

    def __repr__(self) -> str:
        return f"NameRule({self.kind!r}, {self.pattern!r})"


def _accepts_unsafe(kind: Kind, probe: str) -> str:
    if not probe:
        return f"accepts the empty {kind} name"
    if len(probe) > MAX_NAME_LENGTH:
        return f"accepts {kind} names over {MAX_NAME_LENGTH} characters (bound it, e.g. {{1,64}})"
    article = "an" if kind == "event" else "a"
    return f"accepts {_shown(probe)}: {article} {kind} name may never hold {_NEVER[kind]}"


def _both(kind: Kind, compiled: re.Pattern[str]) -> Callable[[str], object]:
    match = compiled.fullmatch
    if kind == "event":
        def accepts(name: str) -> object:
            return 0 < len(name) <= MAX_NAME_LENGTH and name.isprintable() and match(name)
    else:
        def accepts(name: str) -> object:
            return (0 < len(name) <= MAX_NAME_LENGTH and name.isprintable()
                    and " " not in name and "," not in name and match(name))
    return accepts


@functools.lru_cache(maxsize=32)
def name_rule(kind: Kind, pattern: str) -> NameRule:
    """The rule for a pattern, built once (a publisher checks names on every call)."""
    return NameRule(kind, pattern)


def check_event(name: object, pattern: str = EVENT_NAME_PATTERN) -> str:
    """The event name itself, or ValueError naming what is wrong in one line."""
    return name_rule("event", pattern).check(name)


def check_room(name: object, pattern: str = ROOM_NAME_PATTERN) -> str:
    """The room name itself, or ValueError naming what is wrong in one line."""
    return name_rule("room", pattern).check(name)


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
    rule = name_rule("room", pattern)
    out: list[str] = []
    seen: set[str] = set()
    for room in rooms:
        name = rule.check(room)
        if name not in seen:
            seen.add(name)
            out.append(name)
    if len(out) > limit:
        raise ValueError(f"{len(out)} rooms: at most {limit} per event")
    return out
