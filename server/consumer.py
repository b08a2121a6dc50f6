"""The one stream consumer per process: XREAD BLOCK from the last delivered id.

It never dies on data (a malformed entry is logged with its id, counted by
reason and skipped, once: the position moves past it like past any other entry;
`decode_entry` turns everything a producer can write into MalformedEntry) and
never dies on Redis (it backs off with jitter, reconnects, and
resumes from its last id, never `$`, so entries added meanwhile arrive once).
Clients stay connected to the hub the whole time.

It also keeps the overview folded (`OverviewFolds`): the retained stream once at
start, then each batch it reads, so `/api/overview` never reads the log.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

from dualcast.config import Settings
from dualcast.events import (
    ZERO,
    Event,
    Malformed,
    MalformedEntry,
    StreamId,
    decode_entry,
    format_id,
    id_before,
    parse_id,
)
from dualcast.hub import Hub
from dualcast.log import EventLog, LogInfo, LogRefused, LogUnavailable
from dualcast.log.base import RawEntry
from dualcast.logs import redact_url
from dualcast.overview import OverviewFolds

log = logging.getLogger("dualcast.consumer")


class _Following(Protocol):
    """A log whose blocking read can hand the consumer its batches as they arrive."""

    async def read_blocking(self, after: str, count: int, block_ms: int,
                            follow: Callable[[list[RawEntry]], str | None] | None = None,
                            ) -> list[RawEntry]: ...


#: Seconds between two trims of the overview to the log's retained window.
_TRIM_EVERY = 5.0


class Readiness(enum.Enum):
    OK = "ok"
    CONNECTING = "connecting"
    UNREACHABLE = "log_unreachable"
    #: Redis answers, and refuses the stream key (another type, an ACL) or the connection
    #: (a database it lacks): "unreachable" sent whoever read the probe to the network,
    #: while the key or the URL is what to fix.
    REFUSED = "log_refused"
    STALLED = "consumer_stalled"


@dataclass
class ConsumerStats:
    consumed: int = 0
    malformed: int = 0
    malformed_by: dict[Malformed, int] = field(default_factory=dict)
    reconnects: int = 0
    #: every client told to reset: the stream went backwards, or trimmed unread entries
    resets: int = 0


class Consumer:
    def __init__(self, log_: EventLog, hub: Hub, settings: Settings) -> None:
        self.log = log_
        self.hub = hub
        self.settings = settings
        self.stats = ConsumerStats()
        self.position: StreamId | None = None
        self.connected = False
        self.last_error: str | None = None
        #: what Redis refused at the last error (LogRefused: the stream key, or the
        #: connection), None when the log was unreachable or is back
        self.refused: str | None = None
        #: monotonic time of the last read that completed (with or without entries)
        self.last_read_at: float | None = None
        self.started_at = time.monotonic()
        self._last_info_at = 0.0
        self._failed_starts = 0
        self.overview = OverviewFolds()
        self._trimmed_at = 0.0
        self._following = (cast(_Following, log_) if getattr(log_, "follows", False)
                           else None)
        #: A read of at least this many entries may follow a trim past the position: a
        #: trim keeps MAXLEN entries, all of them after a position it went past.
        self._gap_check_at = min(settings.batch_count, settings.maxlen)
        self._told_reset_at: StreamId | None = None
        #: A position this consumer set without reading its entry (the head at first
        #: start, a reset's): a missing entry there says nothing of lost data.
        self._unread_position: StreamId | None = None

    @property
    def seconds_since_read(self) -> float:
        since = self.last_read_at if self.last_read_at is not None else self.started_at
        return time.monotonic() - since

    def healthy(self) -> tuple[bool, str]:
        """Ready means: the log answered and a read completed within the stall bound."""
        status, detail = self.readiness()
        return status is Readiness.OK, detail

    def readiness(self) -> tuple[Readiness, str]:
        """A status word anyone may see, and the detail (hosts, errors) for logs and admins."""
        if not self.connected:
            if self.refused:
                return Readiness.REFUSED, f"event log refuses {self.refused}: {self.last_error}"
            status = Readiness.CONNECTING if self.last_error is None else Readiness.UNREACHABLE
            return status, f"event log unreachable: {self.last_error or 'connecting'}"
        if self.seconds_since_read > self.settings.stall_seconds:
            return Readiness.STALLED, (
                f"consumer has not completed a read for {self.seconds_since_read:.1f}s "
                f"(bound {self.settings.stall_seconds}s)"
            )
        return Readiness.OK, "ok"

    async def run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._connect()
                attempt = 0
                await self._read_forever()
            except LogUnavailable as exc:
                self._lost(exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the outermost boundary: log, back off, go on
                log.exception("consumer error; restarting the read loop")
                self._lost(exc)
            attempt += 1
            self.stats.reconnects += 1
            cap = min(self.settings.backoff_max, 0.1 * 2 ** min(attempt, 10))
            await asyncio.sleep(random.uniform(cap / 2, cap))

    def _what_is_refused(self, exc: BaseException) -> str | None:
        """What a LogRefused refuses, in words: a database index out of range refused the
        connection, and was logged as the stream key refused."""
        if not isinstance(exc, LogRefused):
            return None
        return f"the stream key {self.settings.stream!r}" if exc.on_key else "the connection"

    def _lost(self, exc: BaseException) -> None:
        refused = self._what_is_refused(exc)
        if self.connected:
            if refused:
                log.warning("event log refuses %s (%s): fix it in Redis; "
                            "clients stay connected, retrying", refused, exc)
            else:
                log.warning("event log lost (%s); clients stay connected, reconnecting", exc)
        elif self.position is None:
            # Never reached since start: a wrong or unreachable URL. Loud (ERROR, naming
            # the address but never a password), on tries 1, 2, 4, 8... then every 64th.
            self._failed_starts += 1
            tries = self._failed_starts
            if tries & (tries - 1) == 0 or tries % 64 == 0:
                where = redact_url(self.settings.redis_url) if self.settings.redis_url else "memory"
                if refused:
                    # Reached, and refused (WRONGTYPE, NOPERM, OOM): "unreachable" sent
                    # people to the network; the key is what to look at (or the ACL).
                    log.error("event log at %s refuses %s since start (%d tries; retrying "
                              "until that is fixed in Redis): %s", where, refused, tries, exc)
                else:
                    log.error("event log at %s unreachable since start (%d tries; "
                              "retrying): %s", where, tries, exc)
        self.connected = False
        self.last_error = str(exc)
        self.refused = refused

    async def _connect(self) -> None:
        await self.log.connect()
        info = await self.log.info()
        if self.position is None:
            # First start only: live from the head. Never again `$`: after a
            # reconnect we resume from the last id we delivered.
            self.position = self._unread_position = info.last_id
            self.hub.set_position(info.last_id)
            log.info("consuming %s engine from %s", self.log.engine, format_id(info.last_id))
        elif (not self._went_backwards(info.last_id) and not self._trimmed_past(info)
              and not await self._lost_last_delivered(info)):
            if self.stats.reconnects and not self.connected:
                log.info("event log back; resuming after %s", format_id(self.position))
        self.connected = True
        self.last_error = None
        self.refused = None
        self.last_read_at = time.monotonic()

    async def _fold_retained(self) -> None:
        """Fold the retained stream up to the consumer's position into the overview, in
        pages, before the consumer delivers past it (so the fold stays in id order)."""
        assert self.position is not None
        folds = self.overview
        folds.clear()
        head = self.position
        after = ZERO
        page = 1000
        started, read = time.monotonic(), 0
        while after < head:
            entries = await self.log.read_after(format_id(after), page)
            kept = [(i, f) for i, f in entries if parse_id(i) <= head]
            if not kept:
                break
            events: list[Event] = []
            for entry_id, fields in kept:
                try:
                    events.append(decode_entry(entry_id, fields))
                except MalformedEntry as exc:  # (counted by whoever read it live)
                    log.debug("overview skips malformed stream entry %s: %s", entry_id, exc)
            after = parse_id(kept[-1][0])
            folds.apply(events, after)
            read += len(kept)
            if len(kept) < page:
                break
            await asyncio.sleep(0)  # let subscribers' writers run between pages
        folds.mark_built()
        log.info("overview folded from %d retained entries in %.2fs", read,
                 time.monotonic() - started)
        self._trimmed_at = time.monotonic()

    async def _trim_overview(self) -> None:
        """Every few seconds, make the overview forget what the stream has trimmed away."""
        now = time.monotonic()
        if now - self._trimmed_at < _TRIM_EVERY:
            return
        self._trimmed_at = now
        self.overview.trim_to(await self.log.info())

    def _skip(self, entry_id: str, exc: MalformedEntry) -> None:
        stats = self.stats
        stats.malformed += 1
        stats.malformed_by[exc.reason] = stats.malformed_by.get(exc.reason, 0) + 1
        log.warning("skipping malformed stream entry %s: %s", entry_id, exc)

    async def _read_forever(self) -> None:
        settings = self.settings
        following = self._following
        while True:
            if not self.overview.built:
                await self._fold_retained()
            assert self.position is not None
            after = format_id(self.position)
            if following is not None:
                entries = await following.read_blocking(after, settings.batch_count,
                                                        settings.block_ms, self._follow)
            else:
                entries = await self.log.read_blocking(after, settings.batch_count,
                                                       settings.block_ms)
            self.last_read_at = time.monotonic()
            if not entries:
                await self._check_head()
                await self._trim_overview()
                continue
            if len(entries) >= self._gap_check_at:
                # (before delivering: a gap must reach clients as a reset ahead of these)
                self._trimmed_past(await self.log.info())
            self._deliver(entries)
            await self._trim_overview()
            # Let subscribers' writers run between big batches.
            await asyncio.sleep(0)

    def _follow(self, entries: list[RawEntry]) -> str | None:
        """A batch taken in the XREAD reply's callback (log/xread.py): delivered there,
        the next read sent at once, the consumer's task not woken. Declined (None,
        nothing done) when the task has work due: the overview's trim, or its fold.

        Why: at 100 events/s each worker is woken once per event to read it, which is
        what a second worker adds per event; waking the task for the reply and yielding
        once more after the batch were about a fifth of that. `python -m bench.readcost
        --repeat 3 --duration 20` (one worker, no subscriber, 100 events/s, interleaved
        with the tree before): 290 -> 235 µs of server CPU per event (290 / 290 / 260
        -> 235 / 245 / 235). Every other batch still goes through the task as before.
        """
        now = time.monotonic()
        if now - self._trimmed_at >= _TRIM_EVERY or not self.overview.built:
            return None
        if len(entries) >= self._gap_check_at:
            return None  # the task looks for a trim past the position first
        self.last_read_at = now
        self._deliver(entries)
        return entries[-1][0]  # the id as Redis wrote it, which is its canonical form

    def _deliver(self, entries: list[RawEntry]) -> StreamId:
        """Decode a batch (skipping what is malformed), move past it, deliver it, fold it."""
        events: list[Event] = []
        for entry_id, fields in entries:
            try:
                events.append(decode_entry(entry_id, fields))
            except MalformedEntry as exc:
                self._skip(entry_id, exc)
        last_id = entries[-1][0]
        last = events[-1].key if events and events[-1].id == last_id else parse_id(last_id)
        self.stats.consumed += len(events)
        # The position moves first: nothing after this line may make the batch be
        # read again (a skipped entry is skipped once, a delivered one delivered once).
        self.position = last
        self.hub.publish(events)
        self.overview.apply(events, last)
        return last

    async def _check_head(self) -> None:
        """On an idle read, notice a stream that went backwards (Redis restarted empty)."""
        now = time.monotonic()
        if now - self._last_info_at < 1.0:
            return
        self._last_info_at = now
        self._went_backwards((await self.log.info()).last_id)

    def _went_backwards(self, head: StreamId) -> bool:
        """The stream is behind what we delivered: Redis lost data (restarted empty, or a
        failover to a stale replica). Cursors are meaningless: every client must reset."""
        assert self.position is not None
        if not head < self.position:
            return False
        log.warning(
            "stream went backwards (%s < %s): Redis lost data; telling every client to reset",
            format_id(head), format_id(self.position),
        )
        self.stats.resets += 1
        self.position = self._unread_position = head
        self.hub.reset_all(head)
        self.overview.clear()  # folded again, from what the stream holds now
        return True

    async def _lost_last_delivered(self, info: LogInfo) -> bool:
        """The entry delivered last is gone, and newer ones are there: Redis lost data
        while the consumer was away (restarted empty, or a replica promoted without the
        last writes), and producers appended before this reconnect. Their ids are newer
        than the position (they are made from the clock), so the head alone does not look
        backwards (`_went_backwards`): clients went on from events the stream no longer
        holds, without a word. One read, at a reconnect only. Every client is told
        `reset` to just before the first entry after the position, and everything from
        that entry on is delivered after the reset.

        An entry the stream itself records deleting (`max_deleted`: an XDEL, or a trim
        `_trimmed_past` judges) was not lost: an operator who XDELed the event delivered
        last (a bad one) while the consumer was away got every client told `reset`."""
        position = self.position
        if position is None or position == self._unread_position or position == ZERO:
            return False  # (the head at first start may be an id whose entry was deleted)
        if info.max_deleted >= position:
            return False
        entries = await self.log.read_after(format_id(id_before(position)), 1)
        if not entries or entries[0][0] == format_id(position):
            return False  # still there, or nothing after it (then nothing is known lost)
        first = parse_id(entries[0][0])  # (after the position: the read began at it)
        log.warning(
            "the entry delivered last (%s) is gone from the stream, and newer ones are there "
            "(from %s): Redis lost data; telling every client to reset",
            format_id(position), format_id(first),
        )
        key = id_before(first)
        self.stats.resets += 1
        self.position = self._unread_position = key
        self.hub.reset_all(key)
        self.overview.clear()  # folded again, from what the stream holds now
        return True

    def _trimmed_past(self, info: LogInfo) -> bool:
        """The stream trimmed entries after our position before we read them (we were
        away from Redis, or fell MAXLEN behind). XREAD just goes on from the oldest
        retained entry, so live subscribers would miss them without a word; instead
        every client is told `reset`, as a client resuming from this position would be
        (`feed.cursor_gone`). The consumer still reads on from its position: what the
        stream retains after it is delivered after the reset."""
        assert self.position is not None
        if not self.position < info.max_deleted or self.position == self._told_reset_at:
            return False  # (told already: the first read after a reconnect looks again)
        self._told_reset_at = self.position
        log.warning(
            "stream trimmed past the consumer (%s < %s): entries were lost unread; "
            "telling every client to reset", format_id(self.position),
            format_id(info.max_deleted),
        )
        self.stats.resets += 1
        self.hub.reset_all(self.position)
        return True

    async def lag(self) -> int:
        """Entries between the stream head and what this consumer delivered (for /metrics;
        LogUnavailable when the log cannot say, which the scrape shows as -1: a 0 there
        read as "caught up" all through an outage)."""
        if self.position is None:
            return 0
        info = await self.log.info()
        if info.last_id <= self.position:
            return 0
        # Counted up to a cap: a gauge needs "how far behind", not an exact large number.
        entries = await self.log.read_after(format_id(self.position), 1_000)
        return len(entries)
