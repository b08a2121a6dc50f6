"""In-process bounded log with Redis-compatible `<ms>-<seq>` ids.

The default engine when no Redis is configured: `pip install` and go. It lives
in one process, so several workers cannot share it (the settings refuse that).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque

from dualcast.events import StreamId, format_id, parse_id
from dualcast.log.base import LogInfo, RawEntry


class MemoryLog:
    engine = "memory"

    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self._keys: deque[StreamId] = deque()
        self._entries: deque[RawEntry] = deque()
        # The log begins as if everything before its start had been trimmed: it holds
        # nothing from before it started (a restart loses what the process held). A
        # cursor a client kept from before a restart is then older than the retained
        # window and gets `reset`; the log started empty, it was taken for a cursor
        # with nothing after it, and once anything was published the client went on
        # from there: what it had missed before the restart was lost without a word.
        # `0` still means "everything retained" and is never reset.
        self._last: StreamId = (int(time.time() * 1000), 0)
        self._max_deleted: StreamId = self._last
        self._changed = asyncio.Condition()

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    def _next_id(self) -> StreamId:
        now = int(time.time() * 1000)
        if now > self._last[0]:
            return (now, 0)
        return (self._last[0], self._last[1] + 1)

    def _add(self, fields: dict[str, str]) -> str:
        key = self._next_id()
        self._last = key
        entry_id = format_id(key)
        self._keys.append(key)
        self._entries.append((entry_id, dict(fields)))
        while len(self._keys) > self.maxlen:
            self._max_deleted = self._keys.popleft()
            self._entries.popleft()
        return entry_id

    async def append(self, fields: dict[str, str]) -> str:
        entry_id = self._add(fields)
        async with self._changed:
            self._changed.notify_all()
        return entry_id

    async def append_many(self, entries: list[dict[str, str]]) -> list[str]:
        ids = [self._add(fields) for fields in entries]
        async with self._changed:
            self._changed.notify_all()
        return ids

    def _slice_after(self, after: StreamId, count: int) -> list[RawEntry]:
        start = bisect.bisect_right(self._keys, after)
        end = min(len(self._entries), start + count)
        return [self._entries[i] for i in range(start, end)]

    async def read_after(self, after: str, count: int) -> list[RawEntry]:
        return self._slice_after(parse_id(after), count)

    async def read_blocking(self, after: str, count: int, block_ms: int) -> list[RawEntry]:
        key = parse_id(after)
        entries = self._slice_after(key, count)
        if entries:
            return entries
        try:
            async with asyncio.timeout(block_ms / 1000), self._changed:
                await self._changed.wait_for(lambda: self._last > key)
        except TimeoutError:
            return []
        return self._slice_after(key, count)

    async def info(self) -> LogInfo:
        return LogInfo(
            exists=True,
            length=len(self._keys),
            first_id=self._keys[0] if self._keys else None,
            last_id=self._last,
            max_deleted=self._max_deleted,
        )
