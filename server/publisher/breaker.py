"""The circuit breaker: while Redis is known to be away, callers are answered at once."""

from __future__ import annotations

import logging
import math
import time

from dualcast.publisher.results import PublisherStats, describe

log = logging.getLogger(__name__)


class Breaker:
    """Open after a failure; closed again once a probe succeeds. Also rate-limits the log.

    The async publisher probes from a background task (`retry_at` says when);
    the sync one lets one caller through as the probe (`probe_due`). Not
    thread-safe: the sync publisher locks around it.
    """

    def __init__(self, cooldown: float, cooldown_max: float, log_every: float) -> None:
        self.cooldown_min = cooldown
        self.cooldown_max = cooldown_max
        self.cooldown = cooldown
        self.log_every = log_every
        self.open = False
        self.opened_at = 0.0
        #: what opened it, in one line (the results of the calls it refuses say so)
        self.reason = ""
        self.retry_at = 0.0
        self._last_log = -math.inf

    def failure(
        self, exc: BaseException, stats: PublisherStats, where: str, outcome: str,
        probe: bool = False,
    ) -> None:
        now = time.monotonic()
        if self.open:
            if probe:  # a failed probe backs off; calls that were in flight do not
                self.cooldown = min(self.cooldown * 2, self.cooldown_max)
                self.retry_at = now + self.cooldown
            return
        self.open = True
        self.opened_at = now
        self.reason = describe(exc)
        self.cooldown = self.cooldown_min
        self.retry_at = now + self.cooldown
        stats.outages += 1
        if now - self._last_log >= self.log_every:
            self._last_log = now
            log.warning(
                "publisher: Redis at %s unavailable (%s); events are %s until it is back",
                where, describe(exc), outcome,
            )

    def success(self, stats: PublisherStats) -> None:
        if not self.open:
            return
        self.open = False
        self.cooldown = self.cooldown_min
        log.info(
            "publisher: Redis is back after %.1f s (so far: %d failed, %d short-circuited, "
            "%d sent to the local fallback, %d dropped)",
            time.monotonic() - self.opened_at, stats.failed, stats.short_circuited,
            stats.fallback, stats.dropped,
        )

    def probe_due(self) -> bool:
        """Let one call through as a probe once the cooldown passed (for the sync publisher)."""
        now = time.monotonic()
        if now < self.retry_at:
            return False
        self.retry_at = now + self.cooldown  # other threads keep short-circuiting meanwhile
        return True
