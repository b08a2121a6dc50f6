"""`/api/overview`: the dashboard's state, folded from the retained events a caller may see.

Folded incrementally as the consumer reads each batch, so a call costs what its
answer costs, not a decode of the retained stream: before, every call read and
decoded the whole stream (0.13 s of CPU for 10,000 entries), and 200 anonymous
calls a second pushed a live client's delivery delay from 35 ms to 2.5 s.

The state is kept per visibility class: the set of rooms an event names (the
empty set: public). Classes are disjoint, so the answer for a caller's rooms
merges the public class with every class that names one of them, each keyed
value taking the newest event (by id) that set it. That is what the full fold
over the same events gives (`fold` below, the reference a test compares with).
Each class remembers which event set what, so what the stream trims away leaves
the answer too, and the answer stays the fold of the *retained* events.

Still folded from the log (every instance reads the same stream), so every
instance gives the same answer for the same caller.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections import OrderedDict, deque
from typing import Any

import orjson

from dualcast.events import ZERO, Event, StreamId, format_id
from dualcast.feed import decode_visible
from dualcast.log import EventLog, LogInfo

RECENT_USAGE = 50
CHART_MINUTES = 60
#: Distinct room sets whose encoded answer is kept until the next batch.
CACHED_ANSWERS = 256

Keyed = dict[str, tuple[StreamId, Any]]


class Slot(enum.Enum):
    """Which keyed value of a class an event set (so trimming can take it back)."""

    METRICS = "metrics"
    BY_USER = "metrics_by_user"
    PROVIDER = "providers"
    SESSION = "sessions"


_METRICS_KEY = ""  # the one key of the METRICS slot


class ClassFold:
    """The fold of one visibility class, with the ids that set each value."""

    __slots__ = ("minutes", "setters", "slots", "usage", "usage_minutes")

    def __init__(self) -> None:
        self.slots: dict[Slot, Keyed] = {slot: {} for slot in Slot}
        self.usage: deque[tuple[StreamId, dict[str, Any]]] = deque(maxlen=RECENT_USAGE)
        self.minutes: dict[int, int] = {}
        #: (id, minute) of every usage event held, oldest first, to un-count trimmed ones.
        self.usage_minutes: deque[tuple[StreamId, int]] = deque()
        #: (id, slot, key) of every keyed value set, oldest first, to drop trimmed ones.
        self.setters: deque[tuple[StreamId, Slot, str]] = deque()

    def _set(self, key: StreamId, slot: Slot, name: str, value: Any) -> None:
        self.slots[slot][name] = (key, value)
        self.setters.append((key, slot, name))

    def apply(self, event: Event) -> None:
        """The reference `fold`'s rules, one event; `None` marks an ended session."""
        data = event.data if isinstance(event.data, dict) else {}
        name = event.event
        key = event.key
        if name == "metrics_update":
            user = data.get("userId")
            if user is None:
                self._set(key, Slot.METRICS, _METRICS_KEY, data)
            else:
                self._set(key, Slot.BY_USER, str(user), data)
        elif name == "provider_status_change":
            provider = data.get("providerId")
            if provider is not None:
                self._set(key, Slot.PROVIDER, str(provider), data)
        elif name == "session_created":
            session = data.get("sessionId")
            if session is not None:
                self._set(key, Slot.SESSION, str(session), data)
        elif name == "session_ended":
            # A tombstone, not a delete: the session may have started in another class.
            self._set(key, Slot.SESSION, str(data.get("sessionId")), None)
        elif name == "usage_log_added":
            self.usage.append((key, {**data, "id": event.id, "ts": event.ts}))
            minute = event.ts // 60_000 * 60_000
            self.minutes[minute] = self.minutes.get(minute, 0) + 1
            self.usage_minutes.append((key, minute))

    def empty(self) -> bool:
        return not (self.setters or self.usage_minutes)

    def trim(self, first: StreamId) -> bool:
        """Forget what events older than `first` (no longer retained) contributed."""
        changed = False
        setters = self.setters
        while setters and setters[0][0] < first:
            key, slot, name = setters.popleft()
            values = self.slots[slot]
            held = values.get(name)
            if held is not None and held[0] == key:
                del values[name]
                changed = True
        usage = self.usage
        while usage and usage[0][0] < first:
            usage.popleft()
            changed = True
        counted = self.usage_minutes
        while counted and counted[0][0] < first:
            _, minute = counted.popleft()
            left = self.minutes[minute] - 1
            if left:
                self.minutes[minute] = left
            else:
                del self.minutes[minute]
            changed = True
        # Setters of values overwritten since are dead weight: keep the queue near the
        # number of live values (an untrimmed stream would otherwise grow it forever).
        live = sum(len(values) for values in self.slots.values())
        if len(setters) > 2 * live + 64:
            slots = self.slots
            self.setters = deque(
                (key, slot, name) for key, slot, name in setters
                if (held := slots[slot].get(name)) is not None and held[0] == key
            )
        return changed


class OverviewFolds:
    """Every visibility class's fold, kept current by the consumer; answers per room set."""

    def __init__(self) -> None:
        self.classes: dict[frozenset[str], ClassFold] = {}
        self._by_room: dict[str, list[ClassFold]] = {}
        self.last_key: StreamId = ZERO
        #: Set once the retained stream up to the consumer's start has been folded.
        self._built = asyncio.Event()
        self.version = 0
        self._answers: OrderedDict[frozenset[str], tuple[int, bytes]] = OrderedDict()

    def clear(self) -> None:
        """The stream went backwards (Redis lost data): fold it again from scratch."""
        self.classes.clear()
        self._by_room.clear()
        self._answers.clear()
        self.last_key = ZERO
        self._built.clear()
        self.version += 1

    @property
    def built(self) -> bool:
        return self._built.is_set()

    def mark_built(self) -> None:
        self._built.set()

    async def wait_built(self, timeout: float) -> bool:
        """Whether the fold is (or within `timeout` becomes) complete, e.g. just after start."""
        if not self._built.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._built.wait()
            except TimeoutError:
                return False
        return True

    def apply(self, events: list[Event], last_key: StreamId) -> None:
        """Fold a batch the consumer read; `last_key` is its last entry, malformed or not."""
        for event in events:
            if event.key <= self.last_key:
                continue
            rooms = frozenset(event.rooms)
            fold = self.classes.get(rooms)
            if fold is None:
                fold = self.classes[rooms] = ClassFold()
                for room in rooms:
                    self._by_room.setdefault(room, []).append(fold)
            fold.apply(event)
            self.last_key = event.key
        if last_key > self.last_key:
            self.last_key = last_key
        self.version += 1

    def trim_to(self, window: LogInfo) -> None:
        """Drop what the log's retained window no longer holds. An empty stream holds
        nothing up to its last generated id, never "nothing up to what I read": a window
        may be a second old, and events read since then are not trimmed by it."""
        last = window.last_id
        self.trim(window.first_id if window.first_id is not None else (last[0], last[1] + 1))

    def trim(self, first: StreamId) -> None:
        """Drop what events before `first` (the oldest retained entry) contributed."""
        changed = False
        emptied: list[frozenset[str]] = []
        for rooms, fold in self.classes.items():
            changed = fold.trim(first) or changed
            if fold.empty():
                emptied.append(rooms)
        for rooms in emptied:  # (a room set seen once, long ago, costs nothing forever)
            fold = self.classes.pop(rooms)
            for room in rooms:
                members = self._by_room[room]
                members.remove(fold)
                if not members:
                    del self._by_room[room]
        if changed:
            self.version += 1

    def _relevant(self, rooms: frozenset[str]) -> list[ClassFold]:
        found: dict[int, ClassFold] = {}
        public = self.classes.get(frozenset())
        if public is not None:
            found[id(public)] = public
        for room in rooms:
            for fold in self._by_room.get(room, ()):
                found[id(fold)] = fold
        return list(found.values())

    def state(self, rooms: frozenset[str]) -> dict[str, Any]:
        """The overview for a caller who sees `rooms` (public events always)."""
        folds = self._relevant(rooms)
        merged: dict[Slot, Keyed] = {}
        for slot in Slot:
            values: Keyed = {}
            for fold in folds:
                for name, held in fold.slots[slot].items():
                    mine = values.get(name)
                    if mine is None or held[0] > mine[0]:
                        values[name] = held
            merged[slot] = values
        usage = sorted((u for fold in folds for u in fold.usage), key=lambda u: u[0])
        minutes: dict[int, int] = {}
        for fold in folds:
            for minute, count in fold.minutes.items():
                minutes[minute] = minutes.get(minute, 0) + count
        metrics = merged[Slot.METRICS].get(_METRICS_KEY)
        return {
            "last_id": format_id(self.last_key),
            "metrics": metrics[1] if metrics is not None else {},
            "metrics_by_user": {k: v for k, (_, v) in merged[Slot.BY_USER].items()},
            "providers": {k: v for k, (_, v) in merged[Slot.PROVIDER].items()},
            "sessions": {k: v for k, (_, v) in merged[Slot.SESSION].items() if v is not None},
            "usage": [item for _, item in usage[-RECENT_USAGE:]],
            "requests_per_minute": [[m, minutes[m]] for m in sorted(minutes)[-CHART_MINUTES:]],
        }

    def answer(self, rooms: frozenset[str]) -> bytes:
        """The encoded overview, cached per room set until the next batch or trim, so a
        burst of calls between two batches costs one merge and one encode per room set."""
        cached = self._answers.get(rooms)
        if cached is not None and cached[0] == self.version:
            self._answers.move_to_end(rooms)
            return cached[1]
        state = self.state(rooms)
        try:
            body = orjson.dumps(state, option=orjson.OPT_NON_STR_KEYS)
        except (TypeError, ValueError):
            # The state nests data one level deeper than an event frame does, past
            # what orjson writes; the standard library has no such limit.
            body = json.dumps(state, separators=(",", ":"), ensure_ascii=False).encode()
        self._answers[rooms] = (self.version, body)
        self._answers.move_to_end(rooms)
        while len(self._answers) > CACHED_ANSWERS:
            self._answers.popitem(last=False)
        return body


# --- the reference: today's full fold of the retained stream -------------------------


def fold(events: list[Event], state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply events in id order to an overview state (the full fold; see `OverviewFolds`)."""
    if state is None:
        state = {
            "last_id": "0-0", "metrics": {}, "metrics_by_user": {}, "providers": {},
            "sessions": {}, "usage": [], "requests_per_minute": [],
        }
    usage: deque[dict[str, Any]] = deque(state["usage"], maxlen=RECENT_USAGE)
    per_minute: dict[int, int] = dict((m, c) for m, c in state["requests_per_minute"])
    for event in events:
        data = event.data if isinstance(event.data, dict) else {}
        name = event.event
        if name == "metrics_update":
            user = data.get("userId")
            if user is None:
                state["metrics"] = data
            else:
                state["metrics_by_user"][str(user)] = data
        elif name == "provider_status_change":
            provider = data.get("providerId")
            if provider is not None:
                state["providers"][str(provider)] = data
        elif name == "session_created":
            session = data.get("sessionId")
            if session is not None:
                state["sessions"][str(session)] = data
        elif name == "session_ended":
            state["sessions"].pop(str(data.get("sessionId")), None)
        elif name == "usage_log_added":
            usage.append({**data, "id": event.id, "ts": event.ts})
            minute = event.ts // 60_000 * 60_000
            per_minute[minute] = per_minute.get(minute, 0) + 1
        state["last_id"] = event.id
    state["usage"] = list(usage)
    minutes = sorted(per_minute)[-CHART_MINUTES:]
    state["requests_per_minute"] = [[m, per_minute[m]] for m in minutes]
    return state


async def build_overview(log: EventLog, rooms: set[str], page: int = 1000) -> dict[str, Any]:
    """The full fold of the retained stream: what `OverviewFolds` must always equal."""
    state = fold([])
    after = "0-0"
    while True:
        entries = await log.read_after(after, page)
        if not entries:
            break
        after = entries[-1][0]
        fold(decode_visible(entries, rooms), state)
        if len(entries) < page:
            break
    if after != "0-0":
        state["last_id"] = after  # the newest retained entry, even one the caller may not see
    return state
