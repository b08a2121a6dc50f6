"""The small protocol every event-log engine satisfies.

Transports and the consumer talk to this, never to Redis, so the memory engine
and the Redis engine run the same test suite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dualcast.events import ZERO, RawFields, StreamId

#: One stream entry as stored: its id and its field map (wire format, undecoded: the
#: Redis engine hands over bytes, which only `decode_entry` turns into text).
RawEntry = tuple[str, RawFields]


class LogUnavailable(Exception):
    """The log cannot be reached right now (connection refused, timeout, Redis loading)."""


class LogRefused(LogUnavailable):
    """Redis answered the command with an error that trying again will not mend (the
    stream's key holds another type, the ACL user may not run it, maxmemory is reached
    with no eviction): the message carries Redis's own words for whoever must fix it.
    `on_key` is False when the connection itself was refused (a database index out of
    range on PING), which is then no matter of the stream's key."""

    def __init__(self, message: str, on_key: bool = True) -> None:
        super().__init__(message)
        self.on_key = on_key


class LogNoAnswer(LogUnavailable):
    """A command went out and its reply did not come in time: it may have been carried
    out (an append may be in the log), unlike a log that could not be reached."""


@dataclass(frozen=True)
class LogInfo:
    """Where the retained window starts and ends.

    `last_id` is the last id ever generated (Redis `last-generated-id`), which may
    be newer than the last retained entry; `max_deleted` is the newest id trimmed
    away, so a cursor older than it has lost entries and must be reset.
    """

    exists: bool
    length: int
    first_id: StreamId | None
    last_id: StreamId
    max_deleted: StreamId = ZERO


class EventLog(Protocol):
    engine: str

    async def connect(self) -> None:
        """Open connections; raise LogUnavailable when the log cannot be reached."""

    async def close(self) -> None: ...

    async def append(self, fields: dict[str, str]) -> str:
        """Append one entry (wire-format fields); return its id."""

    async def append_many(self, entries: list[dict[str, str]]) -> list[str]:
        """Append several entries in one round trip; return their ids in order."""

    async def read_after(self, after: str, count: int) -> list[RawEntry]:
        """Up to `count` entries with id strictly greater than `after` (a replay page)."""

    async def read_blocking(self, after: str, count: int, block_ms: int) -> list[RawEntry]:
        """Entries after `after`, waiting up to `block_ms` for the first one (the consumer)."""

    async def info(self) -> LogInfo:
        """The retained window; raise LogUnavailable when unreachable."""

    async def ping(self) -> None: ...
