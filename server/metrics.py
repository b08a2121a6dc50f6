"""Prometheus text for /metrics, read from the runtime's plain counters at scrape time.

Counters on the hot path are plain ints (no locks, no label lookups per
delivery); this collector turns them into metric families when scraped.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dualcast.events import Malformed
from dualcast.runtime import Runtime
from dualcast.tasks import TaskState

#: Seconds a scrape waits for the log to count the consumer's lag.
LAG_TIMEOUT = 1.0


class RuntimeCollector(Collector):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.lag = 0
        #: this process's place among `--workers N` (None when it serves alone)
        self.worker: str | None = None

    def collect(self) -> Iterator[Metric]:
        if self.worker is None:
            yield from self._collect()
            return
        # With several workers a scrape reaches whichever one the kernel hands the
        # connect: unlabelled, one series took each worker's value in turn, and every
        # counter went down (30, 20, 30...) which Prometheus reads as a reset, so
        # rate() counted the other worker's total again at each switch. Labelled by the
        # worker's slot (0..N-1, kept by its replacement), each series is one process's.
        for family in self._collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labelled.add_sample(sample.name, {**sample.labels, "worker": self.worker},
                                    sample.value, sample.timestamp)
            yield labelled

    def _collect(self) -> Iterator[Metric]:
        rt = self.runtime
        conns = GaugeMetricFamily(
            "dualcast_connections", "Open subscriber connections by transport",
            labels=["transport"],
        )
        counts = {"websocket": 0, "sse": 0, "polling": rt.stats.polls_waiting}
        for sub in rt.hub.subscribers:
            counts[sub.transport] = counts.get(sub.transport, 0) + 1
        for transport, n in counts.items():
            conns.add_metric([transport], n)
        yield conns
        opened = CounterMetricFamily(
            "dualcast_connections_opened", "Subscriber connections opened", labels=["transport"]
        )
        for transport, n in rt.stats.opened.items():
            opened.add_metric([transport], n)
        yield opened
        c = rt.consumer.stats
        h = rt.hub.stats
        yield CounterMetricFamily(
            "dualcast_events_consumed", "Events read from the log", c.consumed
        )
        yield CounterMetricFamily(
            "dualcast_deliveries", "Events queued to subscribers", h.deliveries
        )
        yield CounterMetricFamily("dualcast_drops", "Subscribers cut off for lagging", h.cutoffs)
        yield CounterMetricFamily(
            "dualcast_stalled_drops", "Subscribers dropped because one send to them took "
            "longer than the stall limit (they stopped reading)", rt.stalls.dropped)
        malformed = CounterMetricFamily(
            "dualcast_malformed_entries", "Stream entries the consumer skipped, by reason",
            labels=["reason"],
        )
        for reason in Malformed:
            malformed.add_metric([reason.value], c.malformed_by.get(reason, 0))
        yield malformed
        yield CounterMetricFamily(
            "dualcast_consumer_reconnects", "Consumer reconnects to the log", c.reconnects
        )
        yield CounterMetricFamily(
            "dualcast_resets", "Times every client was told to reset (the stream went "
            "backwards, or was trimmed past what the consumer had read)", c.resets)
        yield CounterMetricFamily(
            "dualcast_refusals", "Requests refused (auth, bad input)", rt.stats.refused
        )
        # (counted since the API was written, never shown: a publisher's failures were
        # invisible to the scrape that alerts on them)
        yield CounterMetricFamily(
            "dualcast_published", "Events appended through POST /api/publish", rt.stats.published
        )
        yield CounterMetricFamily(
            "dualcast_publish_failures",
            "POST /api/publish calls answered 503: the event log was unreachable or slow",
            rt.stats.publish_failures,
        )
        yield GaugeMetricFamily(
            "dualcast_consumer_lag_entries",
            "Entries between the stream head and the consumer (counted up to 1000; -1 when "
            "the log did not say within a second)", self.lag,
        )
        yield GaugeMetricFamily(
            "dualcast_consumer_last_read_age_seconds",
            "Seconds since the consumer last completed a read", rt.consumer.seconds_since_read,
        )
        yield from _task_metrics(rt)
        yield from _auth_metrics(rt)
        yield GaugeMetricFamily(
            "dualcast_consumer_connected", "1 when the log is reachable",
            1 if rt.consumer.connected else 0,
        )
        yield GaugeMetricFamily(
            "dualcast_gc_frozen_objects",
            "Objects kept by the last full collection, skipped by the next ones",
            gc.get_freeze_count(),
        )


def _task_metrics(rt: Runtime) -> Iterator[Metric]:
    running = GaugeMetricFamily(
        "dualcast_tasks", "Background tasks by state (1 in the task's current state)",
        labels=["task", "state"],
    )
    restarts = CounterMetricFamily(
        "dualcast_task_restarts", "Background tasks restarted after they died", labels=["task"]
    )
    for name, record in rt.tasks.records.items():
        for state in TaskState:
            running.add_metric([name, state], 1 if record.state == state else 0)
        restarts.add_metric([name], record.restarts)
    yield running
    yield restarts


def _auth_metrics(rt: Runtime) -> Iterator[Metric]:
    """The auth hook's and the issuer key set's calls, shown only when they are configured."""
    hook, jwks = rt.auth.hook, rt.auth.jwks
    if hook is not None:
        h = hook.stats
        yield CounterMetricFamily(
            "dualcast_auth_hook_calls", "Requests made to the application's auth hook", h.calls
        )
        yield CounterMetricFamily(
            "dualcast_auth_hook_failures",
            "Hook calls with no usable answer (timeout, 5xx, bad JSON): callers got 503",
            h.failures,
        )
        yield CounterMetricFamily(
            "dualcast_auth_hook_refusals", "Hook answers that refused (401/403)", h.refusals
        )
        yield CounterMetricFamily(
            "dualcast_auth_hook_cache_hits",
            "Identities answered without a call of their own (cached, or a call in flight)",
            h.cache_hits,
        )
    if jwks is not None:
        j = jwks.stats
        yield CounterMetricFamily(
            "dualcast_jwks_fetches", "Fetches of the issuer's JWKS", j.fetches
        )
        yield CounterMetricFamily(
            "dualcast_jwks_fetch_failures", "JWKS fetches that failed (last good set kept)",
            j.failures,
        )
        yield CounterMetricFamily(
            "dualcast_jwks_cache_hits", "Token keys found in the held JWKS without a fetch",
            j.cache_hits,
        )
        yield GaugeMetricFamily("dualcast_jwks_keys", "Keys in the held JWKS", len(jwks.keys))


class Metrics:
    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = RuntimeCollector(runtime)
        self.registry.register(self.collector)

    async def render(self) -> bytes:
        try:
            # Bounded: the lag is the only figure that asks Redis, and a slow or stalled
            # Redis held every scrape DUALCAST_REDIS_TIMEOUT seconds (twice, with a lag
            # to count), past a scraper's timeout, so the scrape that should show the
            # outage (dualcast_consumer_connected 0) was lost with it.
            async with asyncio.timeout(LAG_TIMEOUT):
                self.collector.lag = await self.collector.runtime.consumer.lag()
        except Exception:
            self.collector.lag = -1
        return generate_latest(self.registry)
