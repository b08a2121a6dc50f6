"""A subscription as every streaming transport sees it: replay, then live, no gap, no twice.

The subscriber is registered with the hub *before* the replay starts, so live
events that arrive meanwhile are queued; the replay reads the log in pages
after the client's cursor; then the queue is drained, dropping everything at or
before the cursor. A cursor the log no longer covers (trimmed, newer than the
stream, or past the per-client replay cap) yields a `Reset` instead of a gap.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType

from dualcast.config import Settings
from dualcast.events import (
    ZERO,
    Event,
    MalformedEntry,
    StreamId,
    decode_entry,
    format_id,
    id_before,
    parse_id,
)
from dualcast.frames import Item, Reset
from dualcast.hub import CloseReason, Hub, Subscriber
from dualcast.log import EventLog, LogInfo, LogUnavailable, RawEntry

log = logging.getLogger("dualcast.feed")


def _pause(timeout: float | None) -> float:
    """How long a replay waits for the consumer before looking again: at most half a
    second, less when the writer asks for less. The WebSocket writer asks for 0 while
    replaying, meaning "come back for control frames": those ring the subscriber's
    bell (`Subscriber.notify`), which ends the wait; a wait of 0 spun instead."""
    return 0.5 if not timeout or timeout > 0.5 else timeout


class FeedClosed(Exception):
    def __init__(self, reason: CloseReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


def cursor_gone(cursor: StreamId, info: LogInfo) -> bool:
    """True when the log cannot replay everything after `cursor`."""
    if cursor == ZERO:
        return False
    if cursor > info.last_id:
        return True  # newer than the stream: Redis was reset under the client
    return cursor < info.max_deleted  # something after the cursor was trimmed away


async def lost_in_a_reset(log_: EventLog, hub: Hub, cursor: StreamId, info: LogInfo) -> bool:
    """True when `cursor` is from before a reset and the stream no longer holds its entry.

    Redis that lost data and took newer appends before the consumer was back (restarted
    empty, a replica promoted without the last writes) holds ids past such a cursor, so
    its window alone says the cursor is covered (`cursor_gone`), and a client that was
    reconnecting or between two polls at the reset went on from events the stream no
    longer holds, without the reset every connected client got. Asked only of cursors up
    to the newest position a reset was told at: one read, only after a reset. An entry
    the stream records deleting (`info.max_deleted`: trimmed, or XDELed) was not lost: a
    cursor there, with all after it retained, got `reset` once any reset had been told.
    """
    if not ZERO < cursor <= hub.reset_from or cursor <= info.max_deleted:
        return False
    entries = await log_.read_after(format_id(id_before(cursor)), 1)
    return not entries or parse_id(entries[0][0]) != cursor


def decode_visible(entries: list[RawEntry], rooms: set[str]) -> list[Event]:
    out: list[Event] = []
    for entry_id, fields in entries:
        try:
            event = decode_entry(entry_id, fields)
        except MalformedEntry:
            continue  # the consumer logs and counts these; replays skip them quietly
        if event.visible_to(rooms):
            out.append(event)
    return out


class Feed:
    """Async context manager around one hub subscriber; `next()` yields its batches."""

    def __init__(
        self, hub: Hub, log_: EventLog, settings: Settings, transport: str,
        rooms: set[str], cursor: StreamId | None, expires: float | None = None,
    ) -> None:
        self.hub = hub
        self.log = log_
        self.settings = settings
        #: `expires` (epoch seconds) ends the feed with CloseReason.EXPIRED, whatever
        #: the transport: credentials that run out end the subscription.
        self.sub = Subscriber(transport, rooms, settings.queue_size, expires)
        self._requested = cursor
        self._replaying = cursor is not None
        #: The hub's count of resets this feed has answered (see `_reset_told`).
        self._resets = hub.resets
        self._checked = False
        self._replayed = 0
        #: The client asked for everything retained (`0`): its replay is bounded by the
        #: stream itself, and a `reset` would tell a client loading its state from the
        #: start that its cursor is gone. Past the replay cap it got one: with
        #: `MAXLEN ~` Redis keeps a little more than MAXLEN (whole nodes of 100 entries),
        #: so with the cap equal to MAXLEN (both were 10,000 by default) a full stream
        #: replayed from `0` stopped at the 10,000th event with a reset, and the newest
        #: events were never sent.
        self._from_start = cursor == ZERO
        #: No cursor was asked for and none is known yet (see __aenter__).
        self._headless = False
        #: Where a gone cursor jumps to, found before the welcome (`_look_at_cursor`).
        self._gone_to: StreamId | None = None
        #: The look before the welcome stands for the replay's first check.
        self._looked = False
        #: The log had nothing after the cursor, which is ahead of this instance's
        #: consumer: the replay waits for the consumer to reach it (`_replay_step`).
        self._behind = False
        #: The cursor this feed starts from, for the `welcome` frame; None when the
        #: instance knows no position to offer (it never names one it does not know).
        self.start_id: str | None = format_id(cursor) if cursor is not None else hub.last_id

    async def __aenter__(self) -> Feed:
        sub, hub = self.sub, self.hub
        if self._requested is not None:
            sub.cursor = self._requested
            sub.catching_up = True
            await self._look_at_cursor()
            if hub.resets != self._resets:
                # Every client was told `reset` while the look read the log, this one not
                # yet in the hub: it replayed on from its cursor, through events the
                # stream may no longer hold, without a word. Told as the others were.
                self._resets = hub.resets
                self._gone_to = hub.last_key
                self.start_id = hub.last_id
        elif hub.started:
            sub.cursor = hub.last_key
            # The welcome's cursor must be where live delivery starts: SSE builds
            # the Feed in the request handler and enters it later, in the stream,
            # so events published in between would be skipped by this subscriber
            # while its welcome claims an older cursor (found by bench/soak.py).
            self.start_id = hub.last_id
        else:
            # The consumer has no position yet (the log was away when this instance
            # started): "live from now" is the log's head, read from the log, and the
            # feed replays from there until the consumer catches up with it.
            sub.catching_up = True
            self._replaying = True
            self._checked = True
            try:
                sub.cursor = (await self.log.info()).last_id
                self.start_id = format_id(sub.cursor)
            except LogUnavailable:
                self._headless = True
                self.start_id = None
        hub.add(sub)
        return self

    async def _look_at_cursor(self) -> None:
        """Whether the log still covers the client's cursor, asked before the welcome.

        A cursor the log no longer covers (older than the window, or newer than the
        stream after a Redis reset) is answered with a `reset` to the head; the welcome
        before it now names that head, not the client's cursor, since a welcome never
        carries a cursor the instance does not know (the client's cursor was echoed
        before). The look counts as the replay's first check, so a resume still costs
        one look at the log. With the log away, the welcome names the client's cursor
        as before and the replay looks once the log is back.
        """
        try:
            info = await self.log.info()
            gone = cursor_gone(self.sub.cursor, info) or await lost_in_a_reset(
                self.log, self.hub, self.sub.cursor, info)
        except LogUnavailable:
            return
        self._checked = self._looked = True
        if gone:
            target = max(self.hub.last_key, info.last_id)
            self._gone_to = target
            self.start_id = format_id(target)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.hub.remove(self.sub)

    @property
    def replaying(self) -> bool:
        return self._replaying

    def _jump_to(self, cursor: StreamId) -> Reset:
        """Tell the client `reset` and continue (replaying, then live) after `cursor`."""
        self.sub.cursor = cursor
        self._replayed = 0
        self._from_start = False
        return Reset(format_id(cursor))

    def _reset_told(self) -> list[Item] | None:
        """The `reset` every client was told since this replay last looked, first.

        The hub's reset moved this subscriber's cursor and queued the marker
        (`Subscriber.reset_to`), but a replay reads the log, not the queue: it jumped to
        the reset's position without a word (or, the reset landing during a read, went
        on from that read's page), and the marker came out once the replay had caught
        up, behind events newer than its `last_id`. The queue is dropped (the replay
        reads on from the log, as after an overflow) and the reset comes first.
        """
        hub, sub = self.hub, self.sub
        if hub.resets == self._resets:
            return None
        self._resets = hub.resets
        key = sub.cursor  # where the reset put it (read before `drain` moves it)
        sub.drain()
        self._gone_to = None  # (a look from before the reset: the reset says where now)
        self._checked = True  # (the reset's position is the hub's own: nothing to check)
        return [self._jump_to(key)]

    async def _replay_step(self, timeout: float | None) -> list[Item] | None:
        """The next replayed items, possibly none; None after waiting for the consumer
        (`next` then hands back to the writer, which may have control frames to send)."""
        told = self._reset_told()
        if told is not None:
            return told
        items = await self._replay_page(timeout)
        told = self._reset_told()  # (told while this step read the log: its page is void)
        return items if told is None else told

    async def _replay_page(self, timeout: float | None) -> list[Item] | None:
        sub, hub = self.sub, self.hub
        if self._headless:
            sub.cursor = (await self.log.info()).last_id  # no reset: there was no cursor
            self._headless = False
        checked_now = not self._checked or self._looked
        self._looked = False
        if self._gone_to is not None:
            target, self._gone_to = self._gone_to, None
            return [self._jump_to(target)]
        if not self._checked:
            info = await self.log.info()
            if hub.resets != self._resets:
                return []  # (see `_reset_told`: the reset's cursor must stand)
            self._checked = True
            gone = cursor_gone(sub.cursor, info) or await lost_in_a_reset(self.log, hub,
                                                                         sub.cursor, info)
            if hub.resets != self._resets:
                return []
            if gone:
                return [self._jump_to(max(hub.last_key, info.last_id))]
        if self._behind and hub.last_key < sub.cursor:
            # The log had nothing after the cursor, and this instance's consumer has not
            # reached it yet: what comes next reaches the log after what the consumer
            # has still to read, so wait for the consumer instead of asking the log again.
            await sub.wait_rung(_pause(timeout))
            return None
        self._behind = False
        # An overflow clears the queue of a catching-up subscriber, maybe of events after
        # the cursor that the read below, made before they reached the log, cannot see.
        sub.missed = False
        # Read after looking at the consumer, so an empty read means the consumer's
        # position (if it had one then) is at or after this cursor: nothing after the
        # cursor reached the hub before this read.
        consumer_positioned = hub.started and hub.last_key >= sub.cursor
        behind = hub.started and not consumer_positioned
        entries = await self.log.read_after(format_id(sub.cursor), self.settings.replay_page)
        if hub.resets != self._resets:
            return []
        if entries and not checked_now:
            # While the pages before were sent (a slow client holds the replay as long as
            # it likes), MAXLEN may have trimmed past this cursor: the read then began at
            # the oldest retained entry, and the events between were lost without a word.
            # Looked at after the read: what was gone before it is gone by now as well.
            info = await self.log.info()
            if hub.resets != self._resets:
                return []
            if cursor_gone(sub.cursor, info):
                return [self._jump_to(max(hub.last_key, info.last_id))]
        if not entries:
            if consumer_positioned and not sub.missed:
                # Everything after the cursor now reaches the queue through the hub.
                sub.catching_up = False
                self._replaying = False
            elif consumer_positioned:
                pass  # the queue overflowed during the read: read again
            elif behind:
                # The client's cursor is ahead of this instance's consumer (it comes from
                # an instance further ahead; this one lags behind it). Live, each event
                # the consumer still has to read before the cursor was queued for this
                # subscriber only to be dropped: a lag of more than its queue cut it off
                # (WS close 1013, SSE stream ended) for events it was never owed, again
                # at each reconnect until the consumer caught up. Replaying, an overflow
                # only clears the queue; live once the consumer reaches the cursor.
                self._behind = True
                await sub.wait_rung(_pause(timeout))
                return None
            else:
                # The consumer has not started (the log was away): going live now would
                # lose what is appended before it starts at the head, so keep reading.
                await sub.wait_rung(_pause(timeout))
                return None
            return []
        self._replayed += len(entries)
        cap = self.settings.replay_cap
        if cap is not None and self._replayed > cap and not self._from_start:
            # (the replay may have read past the consumer: never go back behind it)
            return [self._jump_to(max(hub.last_key, sub.cursor))]
        events = decode_visible(entries, sub.rooms)
        sub.cursor = parse_id(entries[-1][0])
        return list(events)

    def extend(self, expires: float | None) -> None:
        """New credentials: the subscription now ends at `expires` (None: never)."""
        self.sub.expires = expires
        self.sub.notify()

    def _left(self, timeout: float | None) -> float | None:
        """`timeout` cut to the time the credentials have left; FeedClosed once none."""
        expires = self.sub.expires
        if expires is None:
            return timeout
        left = expires - time.time()
        if left <= 0:
            self.sub.close(CloseReason.EXPIRED)
            raise FeedClosed(self.sub.closed or CloseReason.EXPIRED)
        return left if timeout is None else min(timeout, left)

    async def next(self, timeout: float | None = None) -> list[Item]:
        """The next items to send (possibly empty after `timeout`); raises FeedClosed."""
        sub = self.sub
        timeout = self._left(timeout)
        while self._replaying:
            if sub.closed is not None:
                raise FeedClosed(sub.closed)
            try:
                items = await self._replay_step(timeout)
            except LogUnavailable as exc:
                # The log is away; so is the consumer. Wait and retry the replay:
                # the client keeps its connection and loses nothing.
                log.debug("replay paused: %s", exc)
                await sub.wait(min(timeout or 1.0, 1.0))
                if sub.closed is not None:
                    raise FeedClosed(sub.closed) from None
                return []
            if items is None:
                return []
            if items:
                return items
        if sub.closed is not None:
            raise FeedClosed(sub.closed)
        items = sub.drain()
        if items:
            return items
        await sub.wait(timeout)
        if sub.closed is not None:
            raise FeedClosed(sub.closed)
        return sub.drain()

    def join(self, room: str) -> None:
        self.hub.join(self.sub, room)

    def leave(self, room: str) -> None:
        self.hub.leave(self.sub, room)

