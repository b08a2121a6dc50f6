"""Simulated LLM-API-proxy traffic, so the dashboard is alive on first run.

The simulation is what an operator of such a proxy sees: users open sessions on
providers (OpenAI, Anthropic, Mistral, ...), each session makes requests that are
logged with tokens, cost, latency and status code, sessions end; once in a
while a provider degrades, its circuit breaker opens, goes half-open and closes
again once it recovers, while new sessions fail over to the others.

It runs on a simulated clock advanced in fixed ticks, paced against the wall
clock by ``speed``, so the same ``seed`` gives the same sequence of events at any
speed (tests run it fast; ``dualcast serve --demo`` at speed 1, a few events per
second). Events go to a ``sink(event, data, rooms)``; the shapes are the event types
the dashboard reads (docs/producers.md, "Demo traffic"). Rooms: per-user events go to
``user-<id>`` and ``admin``; global metrics to ``admin``; provider status changes are
public. When the demo stops (its ``stop`` event, or a cancel: Ctrl-C, a server shutting
down) it ends every open session (``cancelled``) and sends metrics with no active session,
so nothing it started stays live.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from dualcast.redis_connect import TlsFiles

log = logging.getLogger("dualcast.demo")

#: `(event, data, rooms)`; may return an awaitable (an async callable) or not.
Sink = Callable[[str, Any, list[str]], object]
CircuitState = Literal["closed", "half-open", "open"]

#: Simulated seconds per tick; the wall-clock pause is TICK / speed.
TICK = 0.25
ADMIN_ROOM = "admin"
FAILURE_THRESHOLD = 5  # failures that open a provider's circuit
OPEN_SECONDS = 12.0  # how long an open circuit refuses traffic before a half-open trial
HALF_OPEN_SUCCESSES = 3  # successful trials that close it again
FIRST_INCIDENT_AT = 12.0  # simulated seconds: early, so a short demo shows one
INCIDENT_EVERY = (90.0, 150.0)
#: How long a stopping demo may take to end its open sessions.
WIND_DOWN_SECONDS = 3.0
USERS = ("456", "789", "123", "234", "567", "890", "321", "654")


@dataclass(frozen=True)
class Model:
    name: str
    usd_in: float  # per 1M input tokens
    usd_out: float  # per 1M output tokens
    first_token_ms: float
    ms_per_token: float


@dataclass
class Breaker:
    """The circuit breaker the proxy keeps per provider (closed -> open -> half-open)."""

    circuit: CircuitState = "closed"
    failures: int = 0
    opened_at: float = 0.0
    trial_successes: int = 0


@dataclass
class Provider:
    """An upstream: its models, its share of traffic, and how healthy it is right now."""

    id: str
    name: str
    models: tuple[Model, ...]
    weight: float
    status: str = "healthy"  # healthy | degraded | down
    error_rate: float = 0.01
    slowdown: float = 1.0
    incident_until: float = 0.0
    breaker: Breaker = field(default_factory=Breaker)


#: Each provider's models: (name, $ per 1M input tokens, $ per 1M output tokens, first
#: token ms, ms per token), and the provider's share of the traffic.
_CATALOGUE: dict[tuple[str, str, float], list[tuple[str, float, float, float, float]]] = {
    ("openai", "OpenAI", 0.36): [("gpt-4o", 2.5, 10.0, 380, 14), ("o3-mini", 1.1, 4.4, 900, 11),
                                 ("gpt-4o-mini", 0.15, 0.6, 260, 7)],
    ("anthropic", "Anthropic", 0.28): [("claude-3-5-sonnet", 3.0, 15.0, 450, 16),
                                       ("claude-3-5-haiku", 0.8, 4.0, 300, 8)],
    ("mistral", "Mistral AI", 0.14): [("mistral-large", 2.0, 6.0, 350, 12),
                                      ("mistral-small", 0.2, 0.6, 220, 6)],
    ("google", "Google Gemini", 0.14): [("gemini-1.5-pro", 1.25, 5.0, 420, 12),
                                        ("gemini-1.5-flash", 0.075, 0.3, 240, 5)],
    ("groq", "Groq", 0.08): [("llama-3.1-70b", 0.59, 0.79, 150, 2.5)],
}


def _providers() -> list[Provider]:
    return [Provider(pid, name, tuple(Model(*model) for model in models), weight=weight)
            for (pid, name, weight), models in _CATALOGUE.items()]


@dataclass
class Session:
    id: str
    user: str
    provider: Provider
    model: Model
    started: float
    ends_at: float
    next_request: float
    cost: float = 0.0
    errors: int = 0


@dataclass
class Totals:
    requests: int = 0
    cost: float = 0.0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=200))

    def add(self, cost: float, latency_ms: float) -> None:
        self.requests += 1
        self.cost += cost
        self.latencies.append(latency_ms)

    def avg_ms(self) -> float | None:
        return round(sum(self.latencies) / len(self.latencies), 1) if self.latencies else None


def _iso_now() -> str:
    """UTC ISO 8601 with milliseconds and `Z`, what JavaScript's `toISOString()` writes."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Simulation:
    """The proxy's state; `step()` advances it one tick and returns the events it caused."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.now = 0.0
        self.providers = _providers()
        self.sessions: dict[str, Session] = {}
        self.totals = Totals()
        # a plausible "so far today", so the cards do not start at zero
        self.totals.requests = rng.randint(8_000, 14_000)
        self.totals.cost = round(self.totals.requests * rng.uniform(0.004, 0.007), 4)
        self.user_totals: dict[str, Totals] = {u: Totals() for u in USERS}
        self.user_dirty: set[str] = set()
        self.user_last_metrics: dict[str, float] = {}
        self.next_metrics = 0.0
        self.next_incident = FIRST_INCIDENT_AT
        self.last_incident: str | None = None
        self.out: list[tuple[str, dict[str, Any], list[str]]] = []

    # -- output

    def emit(self, event: str, data: dict[str, Any], rooms: list[str]) -> None:
        self.out.append((event, data, rooms))

    def user_rooms(self, user: str) -> list[str]:
        return [f"user-{user}", ADMIN_ROOM]

    def provider_changed(self, p: Provider) -> None:
        self.emit("provider_status_change", {
            "providerId": p.id, "name": p.name, "status": p.status,
            "circuitState": p.breaker.circuit, "failureCount": p.breaker.failures,
            "timestamp": _iso_now(),
        }, [])  # public: every dashboard shows provider health

    # -- the simulation

    def start(self) -> list[tuple[str, dict[str, Any], list[str]]]:
        """The opening picture: every provider's status, a few sessions already running, metrics."""
        for p in self.providers:
            self.provider_changed(p)
        for _ in range(5):
            self.open_session()
        self.metrics()
        return self.drain()

    def close(self) -> list[tuple[str, dict[str, Any], list[str]]]:
        """The demo stops: every open session ends (`cancelled`) and the metrics say so.

        Without this, the sessions of a stopped demo stay "live" in every overview and
        dashboard for as long as the stream keeps their `session_created`.
        """
        for session in list(self.sessions.values()):
            self.end(session, "cancelled")
        self.metrics()
        self.user_last_metrics.clear()  # the last per-user figures go out now, unthrottled
        self.user_metrics()
        return self.drain()

    def drain(self) -> list[tuple[str, dict[str, Any], list[str]]]:
        out, self.out = self.out, []
        return out

    def step(self) -> list[tuple[str, dict[str, Any], list[str]]]:
        self.now += TICK
        self.incidents()
        self.circuits()
        self.start_sessions()
        for session in list(self.sessions.values()):
            self.advance(session)
        if self.now >= self.next_metrics:
            self.next_metrics = self.now + 1.0
            self.metrics()
        self.user_metrics()
        return self.drain()

    def _rate(self, per_second: float) -> bool:
        """A Poisson arrival in this tick."""
        return self.rng.random() < 1.0 - math.exp(-per_second * TICK)

    def start_sessions(self) -> None:
        active = len(self.sessions)
        # busier when few sessions run, quieter near the cap: hovers around 6-10
        rate = 0.45 if active < 6 else 0.3 if active < 10 else 0.05
        if self._rate(rate):
            self.open_session()

    def open_session(self) -> None:
        usable = [p for p in self.providers if p.breaker.circuit != "open"]
        if not usable:
            return
        provider = self.rng.choices(
            usable, weights=[p.weight * (0.3 if p.status != "healthy" else 1) for p in usable]
        )[0]
        model = self.rng.choice(provider.models)
        user = self.rng.choice(USERS)
        session = Session(
            id=f"sess_{self.rng.getrandbits(48):012x}", user=user, provider=provider,
            model=model, started=self.now, ends_at=self.now + self.rng.uniform(8, 45),
            next_request=self.now + self.rng.uniform(0.2, 1.5),
        )
        self.sessions[session.id] = session
        self.emit("session_created", {
            "sessionId": session.id, "userId": user, "providerId": provider.id,
            "model": model.name, "createdAt": _iso_now(),
        }, self.user_rooms(user))
        self.user_dirty.add(user)

    def advance(self, s: Session) -> None:
        if self.now >= s.ends_at or (s.provider.breaker.circuit == "open" and s.errors):
            self.end(s, "failed" if s.errors >= 3 or s.provider.breaker.circuit == "open"
                     else "cancelled" if self.rng.random() < 0.04 else "completed")
            return
        if self.now < s.next_request:
            return
        s.next_request = self.now + self.rng.uniform(2.0, 7.0)
        self.request(s)

    def request(self, s: Session) -> None:
        p, m = s.provider, s.model
        rng = self.rng
        input_tokens = int(rng.lognormvariate(6.6, 0.8))  # ~700 median, long tail
        output_tokens = int(rng.lognormvariate(5.3, 0.7))  # ~200 median
        failing = p.breaker.circuit == "open" or rng.random() < p.error_rate
        if failing:
            status = rng.choice((500, 502, 503, 503, 504)) if p.status != "healthy" else \
                rng.choice((429, 429, 500, 503))
            latency = 30_000.0 if status == 504 else rng.uniform(80, 1_500) * p.slowdown
            output_tokens = 0
            cost = 0.0
            s.errors += 1
            if status != 429:
                self.provider_failure(p)
        else:
            status = 200
            latency = (m.first_token_ms + m.ms_per_token * output_tokens) * p.slowdown
            latency *= rng.lognormvariate(0, 0.25)
            cost = (input_tokens * m.usd_in + output_tokens * m.usd_out) / 1_000_000
            self.provider_success(p)
        latency_ms = round(latency)
        s.cost += cost
        self.totals.add(cost, latency_ms)
        self.user_totals[s.user].add(cost, latency_ms)
        self.user_dirty.add(s.user)
        self.emit("usage_log_added", {
            "sessionId": s.id, "userId": s.user, "model": m.name, "inputTokens": input_tokens,
            "outputTokens": output_tokens, "costUsd": round(cost, 6), "latencyMs": latency_ms,
            "statusCode": status,
        }, self.user_rooms(s.user))

    def end(self, s: Session, status: str) -> None:
        del self.sessions[s.id]
        self.emit("session_ended", {
            "sessionId": s.id, "userId": s.user, "providerId": s.provider.id,
            "durationMs": round((self.now - s.started) * 1000), "costUsd": round(s.cost, 6),
            "status": status,
        }, self.user_rooms(s.user))
        self.user_dirty.add(s.user)

    # -- provider health: incident -> failures -> open -> half-open -> closed

    def incidents(self) -> None:
        if self.now < self.next_incident:
            return
        self.next_incident = self.now + self.rng.uniform(*INCIDENT_EVERY)
        candidates = [p for p in self.providers
                      if p.status == "healthy" and p.id != self.last_incident]
        p = self.rng.choice(candidates)
        self.last_incident = p.id
        p.status = "degraded"
        p.error_rate = 0.65
        p.slowdown = 2.5
        p.incident_until = self.now + self.rng.uniform(20, 35)
        self.provider_changed(p)

    def circuits(self) -> None:
        for p in self.providers:
            b = p.breaker
            if p.status != "healthy" and self.now >= p.incident_until and p.error_rate > 0.01:
                p.error_rate, p.slowdown = 0.01, 1.0  # the upstream fixed itself
            if b.circuit == "closed" and p.status == "degraded" and self._rate(0.5):
                # the proxy's own health probe also sees the trouble (or its end)
                if self.rng.random() < p.error_rate:
                    self.provider_failure(p)
                else:
                    self.provider_success(p)
            elif b.circuit == "open" and self.now - b.opened_at >= OPEN_SECONDS:
                b.circuit, p.status, b.trial_successes = "half-open", "degraded", 0
                self.provider_changed(p)
            elif b.circuit == "half-open" and self._rate(1.0):
                # trial probes between user requests
                if self.rng.random() < p.error_rate:
                    self.provider_failure(p)
                else:
                    self.provider_success(p)

    def provider_failure(self, p: Provider) -> None:
        b = p.breaker
        b.failures += 1
        if b.circuit == "half-open" or (b.circuit == "closed" and b.failures >= FAILURE_THRESHOLD):
            b.circuit, p.status, b.opened_at = "open", "down", self.now
        elif b.circuit == "closed" and p.status == "healthy":
            p.status = "degraded" if b.failures >= 2 else p.status
            if p.status == "healthy":
                return  # a lone error on a healthy provider is no status change
        elif b.circuit == "open":
            return
        self.provider_changed(p)

    def provider_success(self, p: Provider) -> None:
        b = p.breaker
        if b.circuit == "half-open":
            b.trial_successes += 1
            if b.trial_successes >= HALF_OPEN_SUCCESSES:
                b.circuit, b.failures, b.trial_successes = "closed", 0, 0
                p.status, p.error_rate, p.slowdown = "healthy", 0.01, 1.0
                self.provider_changed(p)
        elif b.circuit == "closed" and b.failures and self.rng.random() < 0.5:
            b.failures -= 1  # old failures age out while requests succeed
            if b.failures == 0 and p.status == "degraded":
                p.status = "healthy"
                self.provider_changed(p)

    # -- metrics

    def metrics(self) -> None:
        data: dict[str, Any] = {
            "activeSessions": len(self.sessions), "totalRequests": self.totals.requests,
            "totalCost": round(self.totals.cost, 6), "timestamp": _iso_now(),
        }
        avg = self.totals.avg_ms()
        if avg is not None:
            data["avgResponseMs"] = avg
        self.emit("metrics_update", data, [ADMIN_ROOM])

    def user_metrics(self) -> None:
        """Per-user metrics when they changed, at most every 3 s per user (a throttle)."""
        for user in sorted(self.user_dirty):
            if self.now - self.user_last_metrics.get(user, -math.inf) < 3.0:
                continue
            self.user_dirty.discard(user)
            self.user_last_metrics[user] = self.now
            t = self.user_totals[user]
            data: dict[str, Any] = {
                "userId": user,
                "activeSessions": sum(1 for s in self.sessions.values() if s.user == user),
                "totalRequests": t.requests, "totalCost": round(t.cost, 6),
                "timestamp": _iso_now(),
            }
            avg = t.avg_ms()
            if avg is not None:
                data["avgResponseMs"] = avg
            self.emit("metrics_update", data, [f"user-{user}"])


async def _deliver(sink: Sink, event: str, data: Any, rooms: list[str], errors: list[int]) -> None:
    """One sink call; a failing sink is logged (rate-limited) and the demo goes on."""
    try:
        result = sink(event, data, rooms)
        if inspect.isawaitable(result):
            await result
    except Exception as exc:
        errors[0] += 1
        if errors[0] == 1 or errors[0] % 100 == 0:
            log.warning("demo: the sink failed %d time(s), last: %s: %s",
                        errors[0], type(exc).__name__, exc)


async def run_demo(
    sink: Sink, *, stop: asyncio.Event, speed: float = 1.0, seed: int | None = None
) -> None:
    """Feed simulated proxy traffic to ``sink`` until ``stop`` is set.

    ``speed`` scales the simulated clock (1 = real time, a few events per second);
    the loop keeps its pace against the wall clock and, when the sink is slower
    than the pace, drops the backlog of time rather than bursting to catch up.
    """
    if not speed > 0 or math.isinf(speed):
        raise ValueError("speed must be a positive number")
    sim = Simulation(random.Random(seed))
    errors = [0]
    for event, data, rooms in sim.start():
        await _deliver(sink, event, data, rooms, errors)
    pause = TICK / speed
    next_at = time.monotonic()
    try:
        while not stop.is_set():
            for event, data, rooms in sim.step():
                await _deliver(sink, event, data, rooms, errors)
            next_at += pause
            delay = next_at - time.monotonic()
            if delay < -1.0:
                next_at = time.monotonic()  # far behind: do not burst, keep the pace from now
                delay = 0.0
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await stop.wait()
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(0)  # a fast sink must not starve the loop
    finally:  # `stop`, or a cancel (Ctrl-C of `dualcast demo`, a server shutting down)
        await _wind_down(sim, sink, errors)


async def _wind_down(sim: Simulation, sink: Sink, errors: list[int]) -> None:
    """End the open sessions in the log, within WIND_DOWN_SECONDS (a sink that hangs, or
    a second cancel, leaves them to the dashboard's age-out)."""
    try:
        async with asyncio.timeout(WIND_DOWN_SECONDS):
            for event, data, rooms in sim.close():
                await _deliver(sink, event, data, rooms, errors)
    except TimeoutError:
        log.warning("demo: could not end the open sessions within %ss", WIND_DOWN_SECONDS)


#: How long `dualcast demo` waits for Redis's first answer before it gives up.
START_CHECK_SECONDS = 5.0


class RedisUnreachable(Exception):
    """`dualcast demo`'s Redis cannot take events at the start (it does not answer, or
    the stream key holds another type); the message says why."""


async def demo_against_redis(
    redis_url: str, stream: str = "websocket-broadcast", maxlen: int | None = 10_000,
    stop: asyncio.Event | None = None, speed: float = 1.0, seed: int | None = None,
    tls: TlsFiles | None = None,
) -> None:
    """`dualcast demo`: publish the simulated traffic to a Redis stream until ``stop``.

    Uses the fail-open publisher, so a Redis outage pauses the traffic (logged
    once) instead of ending the demo; a Redis that does not answer at the start
    raises RedisUnreachable (a wrong URL, a password missing).
    """
    from dualcast.publisher import Publisher  # the demo module itself stays import-light

    stop = stop or asyncio.Event()
    async with Publisher(redis_url, stream=stream, maxlen=maxlen, tls=tls) as publisher:
        # Not reachable at the start (a wrong URL), or a stream key that holds something
        # else: not an outage to ride out (the demo ran for ever, dropping every event,
        # and a Ctrl-C then exited 0).
        why = await publisher.ping(START_CHECK_SECONDS)
        if why is not None:
            raise RedisUnreachable(f"Redis at {publisher.where} cannot take the events: "
                                   f"{why}; nothing was published")
        log.info("demo: publishing simulated traffic to %s (stream %r, speed %s)",
                 publisher.where, stream, speed)
        try:
            await run_demo(publisher.publish, stop=stop, speed=speed, seed=seed)
        finally:
            # the counts that happened, as words ("{'published': 84, 'fallback': 0, ...}"
            # was nine counters, most of them 0, in a Python dict)
            counts = publisher.stats.as_dict()
            log.info("demo: stopped; %s", ", ".join(
                f"{name} {count}" for name, count in counts.items()
                if count or name == "published"))
