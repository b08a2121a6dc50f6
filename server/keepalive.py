"""One timer per event loop for every connection's keepalive.

Every connection is pinged once per `ping_interval` (15 s by default): uvicorn did it
for each WebSocket with timers of its own (the ping armed, fired, a pong deadline
armed and cancelled, the next ping armed), and each SSE stream's writer task woke
from its own timeout to send `: ping` through the ASGI `send`. At 100,000 idle
connections that is 6,700 pings a second, each its own wake-up and 50-70 us of
server CPU (docs/performance.md).

Here a connection puts a *beat* (a plain function) into one of the slots of a ring
that one timer walks, a slot per tick: the beats of a slot run together, each
writing a prebuilt ping straight to its transport, so a ping costs a write and the
pings due together share one wake-up (and so do their pongs). A connection costs a
dict entry, not a timer. A beat that returns False (its connection is over) is
forgotten; a connection that ends between beats takes itself out with `forget`.
`python -m bench idle --connections 10000`, two interleaved runs each (2026-11-29):
idle server CPU per 10,000 WebSockets 4.2 -> 2.2 % of a core, per 10,000 SSE streams
2.9 -> 1.3 %; 14.1 -> 13.6 KB of RSS per idle WebSocket.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections.abc import Callable

log = logging.getLogger("dualcast.keepalive")

#: Pings its connection (or ends it, when the last ping went unanswered); False once
#: the connection is over, so the ring forgets it.
Beat = Callable[[], bool]
#: The slot a connection's beat sits in, for `Keepalive.forget`.
Slot = dict[object, Beat]

#: The longest tick: a slot's beats run in one callback, so a tick of a quarter of a
#: second spreads 20,000 connections' pings at 15 s over 60 slots of ~330 each.
MAX_TICK = 0.25


class Keepalive:
    """A ring of slots walked one per tick, so each beat runs once per `interval`."""

    __slots__ = ("_loop", "_next", "_slots", "_timer", "_when", "interval", "tick")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self._loop = loop
        self.interval = interval
        self.tick = min(MAX_TICK, interval / 4)
        self._slots: list[Slot] = [{} for _ in range(max(1, round(interval / self.tick)))]
        self._next = 0  #: the slot the next tick walks
        self._timer: asyncio.TimerHandle | None = None
        self._when = 0.0

    def add(self, key: object, beat: Beat) -> Slot:
        """Run `beat` about once per interval from now on (the first within one tick
        less than an interval); `key` names the entry for `forget`."""
        # The slot whose turn passed last: its turn comes again in an interval, less the
        # part of a tick that has passed since. The timer may be set for a slot several
        # ticks ahead (the empty ones between are skipped); their turns pass all the same.
        now = self._loop.time()
        behind = 1 if self._timer is None else max(1, math.ceil((self._when - now) / self.tick))
        slot = self._slots[(self._next - behind) % len(self._slots)]
        slot[key] = beat
        if self._timer is None:
            self._when = now + self.tick
            self._timer = self._loop.call_at(self._when, self._walk)
        return slot

    @staticmethod
    def forget(slot: Slot | None, key: object) -> None:
        if slot is not None:
            slot.pop(key, None)

    @property
    def armed(self) -> bool:
        """True while the ring's timer is set (it is not while the ring is empty)."""
        return self._timer is not None

    def __len__(self) -> int:
        return sum(map(len, self._slots))

    def _walk(self) -> None:
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        for key, beat in list(slot.items()):
            try:
                alive = beat()
            except Exception:  # one connection's fault must not stop the others' pings
                log.exception("keepalive beat failed")
                alive = False
            if not alive:
                slot.pop(key, None)
        # The next slot that holds beats: a few connections fill a few of the slots, and
        # each tick is a wake-up of the whole process (50-150 µs of CPU on a 2-core VM,
        # most of it cold caches); 20 idle WebSockets woke a worker 4 times a second for
        # about one beat a second.
        slots = self._slots
        count = len(slots)
        ahead = next((i for i in range(count) if slots[(self._next + i) % count]), None)
        if ahead is None:
            self._timer = None  # nothing to ping: no wake-ups until the next `add`
            return
        self._next = (self._next + ahead) % count
        # On the ring's own cadence, not the callback's: a late tick does not push every
        # later ping back.
        self._when = max(self._when + self.tick * (ahead + 1), self._loop.time())
        self._timer = self._loop.call_at(self._when, self._walk)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for slot in self._slots:
            slot.clear()


_rings: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, Keepalive]] = (
    weakref.WeakKeyDictionary())


def keepalive(loop: asyncio.AbstractEventLoop, interval: float) -> Keepalive:
    """The ring of `loop` for pings every `interval` seconds (one per loop and interval)."""
    rings = _rings.get(loop)
    if rings is None:
        rings = _rings[loop] = {}
    ring = rings.get(interval)
    if ring is None:
        ring = rings[interval] = Keepalive(loop, interval)
    return ring
