"""The transport-neutral hub: who is subscribed to which room, and fan-out.

The consumer hands the hub each batch it reads; the hub pushes the same Event
objects (with their once-encoded frames) into the queue of every subscriber that
may see them, found through a room index, so an event for `user-456` touches
only that room's subscribers. Pushing never awaits: a subscriber whose queue is
full is marked lagging and woken, and its transport closes it; nobody else waits.
The hub knows nothing of transports.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from dualcast.events import ZERO, Event, StreamId, format_id
from dualcast.frames import Item, Reset
from dualcast.loops import running_loop


class CloseReason(enum.Enum):
    LAGGING = "lagging"          # queue overflowed: cut off, resume from the cursor
    SHUTDOWN = "shutdown"        # the server is draining
    MOVED = "moved"              # sent to reconnect, so the kernel spreads it (spares woke)
    EXPIRED = "expired"          # the subscriber's credentials ran out
    GONE = "gone"                # the client went away (its transport saw the disconnect)


@dataclass
class HubStats:
    events: int = 0
    deliveries: int = 0
    cutoffs: int = 0


class Doorbell:
    """A wait that something else ends by ringing, with an optional timeout.

    The timer is lazy. Writers wait with a deadline on every delivery (the next SSE
    ping, a token's expiry), and arming and cancelling a timer per delivery was a
    measurable share of the fan-out (issue 8). So one alarm stays armed across
    waits; a wait re-arms it only when it would ring too late, and a wait whose
    deadline moved on since returns early once (callers loop and re-check their own
    deadlines). The running loop is fetched once: on Python 3.11 every
    get_running_loop() is a getpid() system call.
    """

    __slots__ = ("_alarm", "_loop", "_waiter")

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._alarm: asyncio.TimerHandle | None = None

    def waiting(self) -> bool:
        """True while a wait is parked here and nothing has rung it yet."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def ring(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float | None = None) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = running_loop()
        waiter = self._waiter = loop.create_future()
        if timeout is not None:
            deadline = loop.time() + max(timeout, 0.0)
            alarm = self._alarm
            if alarm is None or alarm.when() > deadline:
                if alarm is not None:
                    alarm.cancel()
                self._alarm = loop.call_at(deadline, self._on_alarm)
        try:
            await waiter
        finally:
            self._waiter = None

    def _on_alarm(self) -> None:
        self._alarm = None
        self.ring()

    def disarm(self) -> None:
        if self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None


class Subscriber:
    """One connected client, whatever its transport: a room set and a bounded queue.

    The queue is a plain list, swapped out whole by `drain`: an idle connection
    pays for an empty list (56 B), not a deque's first block (760 B).
    """

    __slots__ = (
        "_bell", "_queue", "catching_up", "closed", "cursor", "expires", "maxsize", "missed",
        "rooms", "sink", "stats", "transport",
    )

    def __init__(self, transport: str, rooms: Iterable[str], maxsize: int,
                 expires: float | None = None) -> None:
        self.transport = transport
        self.rooms: set[str] = set(rooms)
        self.maxsize = maxsize
        self._queue: list[Item] = []
        self._bell = Doorbell()
        self.closed: CloseReason | None = None
        #: While replaying from the log, an overflow is not fatal: the log still
        #: holds what was dropped, so the replay just reads further.
        self.catching_up = False
        self.missed = False
        self.cursor: StreamId = ZERO
        #: When the subscriber's credentials run out (epoch seconds), or None.
        self.expires = expires
        self.stats: HubStats | None = None  # set by the hub that holds this subscriber
        #: Set by the transport: writes an event's frame straight to the connection
        #: when it can without waiting, else returns False (see `offer`).
        self.sink: Callable[[Event], bool] | None = None

    def notify(self) -> None:
        """Wake the subscriber's writer (it has something new to look at)."""
        self._bell.ring()

    def push(self, item: Item) -> None:
        if self.closed is not None:
            return
        if len(self._queue) >= self.maxsize:
            if self.catching_up:
                self.missed = True
                self._queue.clear()
                return
            self.close(CloseReason.LAGGING)
            if self.stats is not None:
                self.stats.cutoffs += 1
            return
        self._queue.append(item)
        self._bell.ring()

    def offer(self, event: Event, now: float) -> None:
        """`push`, or straight onto the wire when the writer is idle (`now`: epoch
        seconds, read once per event by the hub, not once per subscriber).

        At one event per write (low rates) waking the writer task cost as much as the
        send. Skipping it, at 100 clients x 100 ev/s (three interleaved runs with
        broadcaster, docs/performance.md): WS 32.4 -> 18.8 us of server CPU per
        delivery, SSE 24.2 -> 15.0 us, p50 3.55 -> 2.25 ms. The sink is used only while
        the writer is parked with an empty queue, no replay running and the credentials
        valid: then nothing is in flight, so nothing can overtake, and the cursor moves
        as `drain` would move it. The sink declines when the transport is above its
        high-water mark; the event is queued and the writer (with the stall watch on
        its send) takes over.
        """
        sink = self.sink
        if (sink is not None and not self._queue and self.closed is None
                and not self.catching_up and self._bell.waiting() and event.key > self.cursor
                and (self.expires is None or now < self.expires) and sink(event)):
            self.cursor = event.key
            return
        self.push(event)

    def close(self, reason: CloseReason) -> None:
        if self.closed is None:
            self.closed = reason
            self._queue.clear()
        self._bell.ring()

    def reset_to(self, key: StreamId, marker: Reset) -> None:
        """Forget everything queued, continue after `key`, and tell the client `reset`."""
        self._queue.clear()
        self.cursor = key
        self.push(marker)

    def drain(self) -> list[Item]:
        """Everything waiting, oldest first; events at or before the cursor are dropped."""
        queue = self._queue
        if not queue:
            return []
        self._queue = []
        items: list[Item] = []
        cursor = self.cursor
        for item in queue:
            if isinstance(item, Event):
                if item.key <= cursor:
                    continue
                cursor = item.key
            items.append(item)
        self.cursor = cursor
        return items

    async def wait(self, timeout: float | None = None) -> None:
        """Until something is queued, the subscriber is closed, or about `timeout` passes
        (it may return early with nothing queued: see Doorbell)."""
        if self._queue or self.closed is not None:
            return
        await self._bell.wait(timeout)

    async def wait_rung(self, timeout: float) -> None:
        """Until the next push or notify, the subscriber is closed, or about `timeout`
        passes, whatever is queued: a replay waiting for the consumer to reach its
        cursor holds a queue of events it will drop, and `wait` would return at once."""
        if self.closed is None:
            await self._bell.wait(timeout)

    def disarm(self) -> None:
        """Cancel a pending alarm (the subscriber leaves the hub)."""
        self._bell.disarm()


class Hub:
    def __init__(self, recent_window: int = 2000) -> None:
        self.subscribers: set[Subscriber] = set()
        self._by_room: dict[str, set[Subscriber]] = {}
        self.last_key: StreamId = ZERO
        self.last_id: str = "0-0"
        #: The newest events, so long-pollers near the head are answered from
        #: memory instead of each reading the log on every wake-up.
        self.recent: deque[Event] = deque(maxlen=max(recent_window, 1))
        self._recent_enabled = recent_window > 0
        #: Every event after this key and up to last_key is in `recent`.
        self._recent_floor: StreamId = (2**64, 0)
        #: One doorbell per waiting long-poller, all rung by the next batch.
        self._pollers: set[Doorbell] = set()
        #: What long-polls built from `recent` as it is now, for the pollers that ask
        #: the same (server/transports/poll.py); emptied whenever `recent` may change.
        self.poll_answers: dict[Any, Any] = {}
        self.stats = HubStats()
        #: How many times every client was told to reset (a long-poll that waited across
        #: one is told as well), and the newest position any reset was told at: a poll
        #: that comes back with a cursor up to there, from before the reset, is checked.
        self.resets = 0
        self.reset_from: StreamId = ZERO
        self.started = False
        #: Whether lone events are offered to idle writers (see `_review_direct`).
        self._direct = True
        self._direct_cost = 20e-6  # CPU seconds of fan-out per delivery offered, averaged
        self._lone = 0  # lone events published (one in eight is timed)
        self._window_start = time.monotonic()
        self._window_deliveries = 0

    # registry -----------------------------------------------------------

    def add(self, sub: Subscriber) -> None:
        sub.stats = self.stats
        self.subscribers.add(sub)
        for room in sub.rooms:
            self._by_room.setdefault(room, set()).add(sub)

    def remove(self, sub: Subscriber) -> None:
        sub.disarm()
        self.subscribers.discard(sub)
        for room in sub.rooms:
            members = self._by_room.get(room)
            if members is not None:
                members.discard(sub)
                if not members:
                    del self._by_room[room]

    def join(self, sub: Subscriber, room: str) -> None:
        sub.rooms.add(room)
        if sub in self.subscribers:
            self._by_room.setdefault(room, set()).add(sub)

    def leave(self, sub: Subscriber, room: str) -> None:
        sub.rooms.discard(room)
        members = self._by_room.get(room)
        if members is not None:
            members.discard(sub)
            if not members:
                del self._by_room[room]

    def count(self, transport: str | None = None) -> int:
        if transport is None:
            return len(self.subscribers)
        return sum(1 for s in self.subscribers if s.transport == transport)

    # fan-out ------------------------------------------------------------

    def set_position(self, key: StreamId) -> None:
        """Where live delivery starts (the consumer's cursor), before any event."""
        self.last_key = key
        self.last_id = format_id(key)
        self._recent_floor = key
        self.recent.clear()
        self.poll_answers.clear()
        self.started = True

    #: Share of one core the direct writes may take (see `_review_direct`).
    DIRECT_BUDGET = 0.5

    def _review_direct(self, now: float) -> None:
        """Once a second: keep offering lone events to idle writers only while doing so
        for the last second's deliveries would take under DIRECT_BUDGET of a core.

        A direct write is one send per event per subscriber. At low rates that is all
        there is to do, and skipping the writer task halves the cost; at higher rates
        writers that fall a little behind coalesce several events into one send, which
        is cheaper. At 1,000 clients x 100 ev/s direct writes took the server from 60 to
        80 % of a core (WS; SSE 67 -> 82 %; one run each), so above the budget (about
        40,000 deliveries/s here) the writers coalesce.
        """
        delivered = self.stats.deliveries - self._window_deliveries
        self._direct = delivered / (now - self._window_start) * self._direct_cost \
            < self.DIRECT_BUDGET
        self._window_start = now
        self._window_deliveries = self.stats.deliveries

    def publish(self, events: list[Event]) -> None:
        """Deliver a batch, in order, to every subscriber that may see each event."""
        stats = self.stats
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self._review_direct(now)
        direct = self._direct and len(events) == 1
        # This thread's CPU time (not wall time, which a busy machine inflates), taken
        # around one lone event in eight: each look is a system call.
        self._lone += direct
        timed = direct and not self._lone & 7
        cpu = time.thread_time() if timed else 0.0
        for event in events:
            if event.key <= self.last_key:
                continue
            if event.rooms:
                rooms = event.rooms
                if len(rooms) == 1:
                    targets: Iterable[Subscriber] = self._by_room.get(rooms[0], ())
                else:
                    found: set[Subscriber] = set()
                    for room in rooms:
                        found.update(self._by_room.get(room, ()))
                    targets = found
            else:
                targets = self.subscribers
            delivered = 0
            if direct:
                # Alone in its batch: nothing to coalesce, so idle writers are skipped.
                wall = time.time()
                for sub in targets:
                    sub.offer(event, wall)
                    delivered += 1
                if timed and delivered:
                    cost = (time.thread_time() - cpu) / delivered
                    self._direct_cost += (cost - self._direct_cost) / 8
            else:
                for sub in targets:
                    sub.push(event)
                    delivered += 1
            stats.deliveries += delivered
            stats.events += 1
            self.last_key = event.key
            self.last_id = event.id
            if self._recent_enabled:
                if len(self.recent) == self.recent.maxlen:
                    self._recent_floor = self.recent[0].key
                self.recent.append(event)
        self._notify()

    def reset_all(self, key: StreamId) -> None:
        """Redis lost data (or trimmed it unread): every subscriber's cursor is
        meaningless; tell each one. Live delivery goes on after `key`."""
        self.resets += 1
        self.reset_from = max(self.reset_from, self.last_key)
        self.last_key = key
        self.last_id = format_id(key)
        self.recent.clear()
        # Just past `key`: a poller whose cursor is `key` itself asks the log, which says
        # whether it must reset, instead of `recent` answering it across the gap.
        self._recent_floor = (key[0], key[1] + 1)
        marker = Reset(self.last_id)
        for sub in list(self.subscribers):
            sub.reset_to(key, marker)
        self._notify()

    def wake_pollers(self) -> None:
        self._notify()

    def _notify(self) -> None:
        self.poll_answers.clear()
        if self._pollers:
            waiting, self._pollers = self._pollers, set()
            for bell in waiting:
                bell.ring()

    async def wait_for_events(self, timeout: float, bell: Doorbell) -> None:
        """Until the next batch is published (long-pollers wait here), `bell` rings, or
        the timeout."""
        self._pollers.add(bell)
        try:
            await bell.wait(timeout)
        finally:
            self._pollers.discard(bell)
            bell.disarm()

    def recent_after(self, key: StreamId) -> list[Event] | None:
        """Events after `key` from memory, or None when `key` is older than the window."""
        if key >= self.last_key:
            return []
        if not self._recent_enabled or key < self._recent_floor or key == ZERO:
            return None  # `0` means "from the oldest retained": that is the log's to say
        # Walk back from the newest: a caught-up poller costs a step or two, not the window.
        found: list[Event] = []
        for event in reversed(self.recent):
            if event.key <= key:
                break
            found.append(event)
        found.reverse()
        return found

    def close_all(self, reason: CloseReason) -> None:
        for sub in list(self.subscribers):
            sub.close(reason)
