"""Everything one app instance owns, in one object on `app.state.dualcast`.

No module globals: two apps in one process (as tests make them) share nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from dualcast.auth import Authenticator
from dualcast.config import Settings
from dualcast.consumer import Consumer
from dualcast.events import (
    Envelope,
    NameRules,
    decode_entry,
    entry_fields,
    format_id,
    use_names,
)
from dualcast.fdlimit import process_cap
from dualcast.flights import Flights
from dualcast.hub import CloseReason, Hub, Subscriber
from dualcast.log import EventLog, LogInfo, RawEntry, create_log
from dualcast.logs import Repeats
from dualcast.loops import running_loop
from dualcast.quotas import ConnectionQuotas
from dualcast.stalls import StallWatch
from dualcast.tasks import TaskName, Tasks

log = logging.getLogger("dualcast")


@dataclass
class TransportStats:
    opened: dict[str, int] = field(default_factory=lambda: {"websocket": 0, "sse": 0, "polling": 0})
    polls_waiting: int = 0
    refused: int = 0
    #: POST /api/publish: events appended, and calls answered 503 (the log unreachable)
    published: int = 0
    publish_failures: int = 0



def _close_over(subscribers: list[Subscriber], spread: float,
                reason: CloseReason) -> list[asyncio.TimerHandle]:
    """Close each subscriber at a random moment within `spread` seconds (so they do not
    all come back in the same second); the timers, to cancel."""
    loop = asyncio.get_running_loop()
    return [loop.call_later(random.uniform(0, spread), sub.close, reason)
            for sub in subscribers]

class Runtime:
    def __init__(self, settings: Settings, secret: str | None) -> None:
        self.settings = settings
        self.secret = secret
        # the decoder and the publish envelope check names with this deployment's patterns
        use_names(NameRules.of(settings.event_pattern, settings.room_pattern))
        self.auth = Authenticator.from_settings(settings, secret)
        self.log: EventLog = create_log(settings)
        self.hub = Hub(settings.recent_window)
        self.consumer = Consumer(self.log, self.hub, settings)
        # A client that stops reading is dropped after this long in one send.
        self.stalls = StallWatch(max(settings.ping_interval * 2, 10.0))
        self.stats = TransportStats()
        self.publish_failing = Repeats()  # POST /api/publish's 503s, said once per 30 s
        self.cap_refusing = Repeats()  # 503s of a process at DUALCAST_MAX_CONNECTIONS, too
        self.quotas = ConnectionQuotas(settings.max_connections_per_subject,
                                       settings.max_connections_per_address,
                                       process_cap(settings.max_connections))
        self.draining = False
        self.tasks = Tasks(backoff_max=max(settings.backoff_max, 1.0))
        self._window: LogInfo | None = None
        self._window_at = 0.0
        self._window_fetches: Flights[None, LogInfo] = Flights()
        self._pages: Flights[tuple[str, int], list[RawEntry]] = Flights()

    async def log_window(self, max_age: float = 0.0) -> LogInfo:
        """The log's retained window, cached for `max_age` seconds and fetched once for
        all concurrent callers, so a thousand long-pollers cost one XINFO, not a thousand
        (server/flights.py; behind a lock, under load a thousand pollers waited seconds:
        the long-poll bench's p99, issue 8).
        """
        loop = running_loop()  # (every long-poll with a cursor asks: no getpid() each time)
        if self._window is not None and loop.time() - self._window_at <= max_age:
            return self._window
        return await self._window_fetches.run(None, self._fetch_window)

    @property
    def last_window(self) -> LogInfo | None:
        """The log's window as last fetched, however old (None: never fetched)."""
        return self._window

    async def _fetch_window(self) -> LogInfo:
        info = await self.log.info()
        self._window, self._window_at = info, running_loop().time()
        return info

    async def poll_page(self, after: str, count: int) -> list[RawEntry]:
        """Up to `count` entries after `after` for long-polls: one read for all the polls
        asking the same at once (the list is shared: read it, do not change it).

        Not for a stream's replay (server/feed.py): there an empty page must mean that
        the consumer had nothing newer when the subscriber joined the hub, and a read
        shared from before it joined cannot say that. A poll only answers what a page
        holds, and waits on the hub when it holds nothing.
        """
        return await self._pages.run((after, count), partial(self.log.read_after, after, count))

    async def start(self) -> None:
        """Start what the app runs in the background (the lifespan's startup)."""
        self.tasks.start(TaskName.CONSUMER, self.consumer.run)
        self.tasks.start(TaskName.STALL_WATCH, self.stalls.run)
        self.tasks.start(TaskName.AUTH, self.auth.run)  # JWKS fetches, hook renewals
        if self.settings.demo:
            self.tasks.start(TaskName.DEMO, self._demo)

    async def stop(self) -> None:
        self.hub.close_all(CloseReason.SHUTDOWN)
        await self.tasks.stop_all()
        await self.auth.close()
        await self.log.close()

    async def _demo(self) -> None:
        """`serve --demo`: simulated proxy traffic appended to this app's own log."""
        from dualcast.demo import run_demo  # only demo servers load the simulation

        async def sink(event: str, data: Any, rooms: list[str]) -> object:
            envelope = Envelope(event=event, data=data, rooms=rooms)
            return await self.log.append(entry_fields(envelope))

        await run_demo(sink, stop=asyncio.Event(), speed=self.settings.demo_speed)

    async def drain(self, grace: float, hurry: Callable[[], bool] | None = None) -> None:
        """SIGTERM: send every subscriber away (WS 1001, SSE ends with a jittered `retry:`),
        spread over half the grace period so thousands of clients do not all come back in
        the same second; the consumer keeps delivering to those not yet closed.

        `hurry()` true (a second Ctrl-C) sends the rest away at once and returns.
        """
        if self.draining:
            return
        self.draining = True
        subscribers = list(self.hub.subscribers)
        spread = max(grace * 0.5, 0.0)
        log.info("draining %d subscribers over %.1fs", len(subscribers), spread)
        loop = asyncio.get_running_loop()
        closings = _close_over(subscribers, spread, CloseReason.SHUTDOWN)
        self.hub.wake_pollers()
        deadline = loop.time() + max(grace * 0.8, 0.1)
        while self.hub.subscribers and loop.time() < deadline:
            if hurry is not None and hurry():
                log.info("closing the %d subscribers left at once", len(self.hub.subscribers))
                for closing in closings:
                    closing.cancel()
                self.hub.close_all(CloseReason.SHUTDOWN)
                return
            await asyncio.sleep(0.05)

    def shed(self, share: float, spread: float) -> int:
        """Send `share` of the subscribers away to reconnect (WS 1001, SSE ends with the
        usual `retry:`, not a drain's longer one), at random moments over `spread`
        seconds; how many. Why: a worker that was serving alone when the load grew
        (`dualcast.spares`) holds connections made before the other workers listened;
        sent away, they come back through the kernel's spread, each resuming from its
        cursor (nothing lost)."""
        if self.draining:
            return 0
        subscribers = list(self.hub.subscribers)
        chosen = random.sample(subscribers, round(len(subscribers) * share))
        if not chosen:
            return 0
        _close_over(chosen, spread, CloseReason.MOVED)
        log.info("sending %d of %d subscribers to reconnect over %.1fs: the other workers "
                 "serve now", len(chosen), len(subscribers), spread)
        return len(chosen)

    def publish_local(self, event: str, data: Any, rooms: list[str]) -> str:
        """Deliver straight to this process's hub (a publisher's opt-in fallback while the
        log is unreachable). The id continues after the hub's position, so cursors stay
        ordered; such an event exists only in this process and is not replayable.
        """
        envelope = Envelope(event=event, data=data, rooms=rooms)
        now = int(time.time() * 1000)
        last_ms, last_seq = self.hub.last_key
        key = (now, 0) if now > last_ms else (last_ms, last_seq + 1)
        entry_id = format_id(key)
        self.hub.publish([decode_entry(entry_id, entry_fields(envelope, now))])
        return entry_id

