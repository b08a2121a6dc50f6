"""Throttle and conflation: at most one append per interval per key, never losing the last value."""

from __future__ import annotations

import heapq
from typing import Generic, TypeVar

T = TypeVar("T")


class _Slot(Generic[T]):
    __slots__ = ("every", "last_sent", "pending")

    def __init__(self, every: float, last_sent: float) -> None:
        self.every = every
        self.last_sent = last_sent
        self.pending: T | None = None


class Conflator(Generic[T]):
    """Leading + trailing throttle per key, driven by a clock the owner passes in.

    A key's first value goes out at once (leading edge); values offered within
    the interval replace one another and the last one goes out when the interval
    ends (trailing edge), which starts a new interval. A heap of due times keeps
    the work per wake-up O(log n), whatever the number of keys. Not thread-safe:
    the owner locks around it where threads share it.
    """

    def __init__(self) -> None:
        self.slots: dict[str, _Slot[T]] = {}
        self._due: list[tuple[float, int, str]] = []
        self._seq = 0

    def _schedule(self, key: str, at: float) -> None:
        self._seq += 1
        heapq.heappush(self._due, (at, self._seq, key))

    def offer(self, key: str, every: float, value: T, now: float) -> tuple[bool, bool]:
        """Return (send_now, replaced): send at once, or hold; `replaced` if a held value died."""
        slot = self.slots.get(key)
        if slot is None:
            self.slots[key] = _Slot(every, now)
            self._schedule(key, now + every)
            return True, False
        slot.every = every
        if slot.pending is None and now >= slot.last_sent + every:
            slot.last_sent = now  # the timer is late; this is a new leading edge
            return True, False
        replaced = slot.pending is not None
        slot.pending = value
        return False, replaced

    def next_due(self) -> float | None:
        return self._due[0][0] if self._due else None

    def pop_due(self, now: float) -> list[T]:
        """The trailing values whose interval has ended; idle keys are forgotten."""
        out: list[T] = []
        while self._due and self._due[0][0] <= now:
            _, _, key = heapq.heappop(self._due)
            slot = self.slots.get(key)
            if slot is None:
                continue
            if now < slot.last_sent + slot.every:  # `every` changed or a late leading edge
                self._schedule(key, slot.last_sent + slot.every)
                continue
            if slot.pending is None:
                del self.slots[key]
                continue
            out.append(slot.pending)
            slot.pending = None
            slot.last_sent = now
            self._schedule(key, now + slot.every)
        return out

    def drain(self) -> list[T]:
        """Every held value, at once (on close: the last value is never lost)."""
        out = [slot.pending for slot in self.slots.values() if slot.pending is not None]
        self.slots.clear()
        self._due.clear()
        return out
