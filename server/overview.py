"""`/api/overview`: the dashboard's state, folded from the retained events a caller may see.

Folded from the log (not from this instance's memory), so every instance gives
the same answer for the same caller.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from dualcast.events import Event
from dualcast.feed import decode_visible
from dualcast.log import EventLog

RECENT_USAGE = 50
CHART_MINUTES = 60


def fold(events: list[Event], state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply events in id order to an overview state (also usable incrementally)."""
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
