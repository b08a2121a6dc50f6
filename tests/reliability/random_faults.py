"""A seeded run of random faults against instances behind nginx and one durable Redis.

Shared by the suite's short run (tests/reliability/test_random_faults.py) and the
long one (`python -m bench.faults`). Everything is real: a redis-server with an
append-only file (a SIGKILL and a restart keep the stream), two or three dualcast
processes behind nginx, a raw-XADD producer at a steady rate, and followers of all
three transports that resume through nginx with their last id, as the dashboard
does. Faults are drawn from `random.Random(seed)`: the same seed replays the same
plan (timing on a busy machine still varies, so a replay is close, not exact).

At the end each client's ids are checked against XRANGE from where its first
welcome put it: every event once and in order, or an explicit `reset` followed by
every event after the reset's cursor. Nothing else counts as correct.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import random
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx

from tests.harness.follow import Follower, Kind, start_followers
from tests.harness.nginx import NginxProcess
from tests.harness.probes import log_problems, metric
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.stream import Producer, id_key, stream_ids
from tests.harness.waits import wait_for

__all__ = ["FaultKind", "Outcome", "Plan", "ResetAwareFollower", "check_resumed", "run"]

SEED_ENV = "DUALCAST_FAULT_SEED"

#: Fast fault detection (the XREAD block well under the socket timeout), a short
#: drain, and SSE clients told to come back quickly.
INSTANCE_ENV = {
    "DUALCAST_BLOCK_MS": "300",
    "DUALCAST_REDIS_TIMEOUT": "1",
    "DUALCAST_STALL_SECONDS": "2",
    # The production default (5 s): an instance that starts during an outage may then
    # reach Redis seconds after Redis returns, the window where resuming clients were lost.
    "DUALCAST_BACKOFF_MAX": "5",
    "DUALCAST_SHUTDOWN_GRACE": "2",
    "DUALCAST_SSE_RETRY_MS": "300",
    "DUALCAST_LOG_LEVEL": "info",
}

#: The consumer reports an unreachable Redis at ERROR, by design: the faults cause
#: those lines. Anything else at ERROR, and any traceback, is a problem.
EXPECTED_LOG = re.compile(r"ERROR dualcast\.consumer: event log at \S+ unreachable")


class FaultKind(StrEnum):
    INSTANCE_KILL = "instance-kill"  # SIGKILL, then a restart on the same port
    INSTANCE_DRAIN = "instance-drain"  # SIGTERM (drain), then a restart
    REDIS_KILL = "redis-kill"  # SIGKILL, then a restart that reloads the append-only file
    REDIS_PAUSE = "redis-pause"  # SIGSTOP, then SIGCONT: a hung Redis, connections open
    RESTART_IN_OUTAGE = "restart-in-outage"  # Redis away while an instance dies and restarts


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    instance: int  # which instance (ignored by the Redis-only kinds)
    down: float  # seconds the victim stays down (or paused)
    gap: float  # seconds of steady load before the next fault
    drop_seed: int = 0  # RESTART_IN_OUTAGE: which streaming clients lose their connection
    redis_how: FaultKind = FaultKind.REDIS_KILL  # RESTART_IN_OUTAGE: how Redis goes away
    instance_how: FaultKind = FaultKind.INSTANCE_KILL  # RESTART_IN_OUTAGE: how the instance dies

    def describe(self) -> str:
        if self.kind is FaultKind.RESTART_IN_OUTAGE:
            return (f"{self.kind}({self.redis_how}, {self.instance_how} #{self.instance}, "
                    f"down {self.down:.1f}s)")
        target = "" if self.kind in (FaultKind.REDIS_KILL, FaultKind.REDIS_PAUSE) \
            else f" #{self.instance}"
        return f"{self.kind}{target} (down {self.down:.1f}s)"


@dataclass(frozen=True)
class Plan:
    seed: int
    faults: list[Fault]

    @classmethod
    def draw(cls, seed: int, count: int, instances: int) -> Plan:
        """`count` faults from `seed`. When `count` allows, every kind appears at least
        once (a short run still covers them all); the rest are drawn freely."""
        rng = random.Random(seed)
        kinds = list(FaultKind)
        if count >= len(kinds):
            chosen = kinds + [rng.choice(kinds) for _ in range(count - len(kinds))]
        else:
            chosen = rng.sample(kinds, count)
        rng.shuffle(chosen)
        faults = [
            Fault(kind=kind, instance=rng.randrange(instances),
                  # The outage outlasts the restart and nginx's fail_timeout, then this:
                  # the fresh instance's consumer backs off for seconds meanwhile, the
                  # window where resuming clients were lost.
                  down=round(rng.uniform(1.0, 4.0) if kind is FaultKind.RESTART_IN_OUTAGE
                             else rng.uniform(0.3, 2.5), 2),
                  gap=round(rng.uniform(0.3, 1.5), 2),
                  drop_seed=rng.randrange(1 << 30),
                  redis_how=rng.choice([FaultKind.REDIS_KILL, FaultKind.REDIS_PAUSE]),
                  instance_how=rng.choice([FaultKind.INSTANCE_KILL, FaultKind.INSTANCE_DRAIN]))
            for kind in chosen
        ]
        return cls(seed, faults)


class ResetAwareFollower(Follower):
    """A Follower that also remembers where in its ids each `reset` came."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: (how many ids had arrived, the reset's cursor) per reset
        self.reset_marks: list[tuple[int, str]] = []

    def frame(self, frame: dict[str, Any], conn: Any) -> None:
        if frame.get("type") == "reset":
            self.reset_marks.append((len(self.record.ids), str(frame["last_id"])))
        super().frame(frame, conn)


def check_resumed(seen: list[str], resets: list[tuple[int, str]],
                  expected: list[str]) -> str | None:
    """None when `seen` is `expected` once and in order, except that after each reset
    the client continues with every event after the reset's cursor; else what is wrong."""
    keys = [id_key(i) for i in expected]
    cursor = 0
    start = 0
    bounds = [at for at, _ in resets] + [len(seen)]
    for n, end in enumerate(bounds):
        segment = seen[start:end]
        want = expected[cursor:cursor + len(segment)]
        if segment != want:
            where = next((k for k, (a, b) in enumerate(zip(segment, want, strict=False))
                          if a != b), min(len(segment), len(want)))
            return (f"segment {n} (after {'start' if n == 0 else 'reset ' + resets[n - 1][1]}): "
                    f"at {where} saw {segment[where:where + 3]} where the stream has "
                    f"{want[where:where + 3]} ({len(segment)} seen in the segment)")
        cursor += len(segment)
        if n < len(resets):
            cursor = bisect.bisect_right(keys, id_key(resets[n][1]))
        start = end
    if cursor != len(expected):
        return f"missing the last {len(expected) - cursor} events (first {expected[cursor]})"
    return None


@dataclass
class Outcome:
    """What one run did and what went wrong; `problems` empty means the run held."""

    plan: Plan
    done: list[str] = field(default_factory=list)  # each fault as carried out, with timings
    events: int = 0
    clients: int = 0
    reconnects: int = 0
    resets: int = 0
    producer_retries: int = 0
    bad_gateways: int = 0  # connections nginx answered 502
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"seed {self.plan.seed}: {len(self.done)} faults, {self.events} events, "
                f"{self.clients} clients, {self.reconnects} reconnects, {self.resets} resets, "
                f"{self.producer_retries} producer retries, {self.bad_gateways} answers 502, "
                f"{self.seconds:.0f}s")

    def report(self) -> str:
        lines = [self.summary(), *("  " + d for d in self.done)]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        lines.append(f"replay with {SEED_ENV}={self.plan.seed}")
        return "\n".join(lines)


class Cluster:
    """The processes of one run, each stopped by the PID this class started."""

    def __init__(self, workdir: Path, instances: int, secret: str,
                 root: Path | None = None) -> None:
        self.redis = RedisProcess(workdir / "redis", appendonly=True)
        env = {**INSTANCE_ENV, "DUALCAST_SECRET": secret}
        self.instances = [DualcastProcess(workdir / f"dc{n}", self.redis.url, env=env, root=root)
                          for n in range(instances)]
        #: the clients, once started (a fault may cut their connections)
        self.followers: list[ResetAwareFollower] = []
        #: when the last instance fault's victim was serving again
        self.instance_back_at = 0.0
        self.nginx = NginxProcess(workdir / "nginx", upstreams=[d.port for d in self.instances])

    async def start(self) -> None:
        await asyncio.to_thread(self.redis.start)
        await asyncio.gather(*(asyncio.to_thread(d.start) for d in self.instances))
        await asyncio.to_thread(self.nginx.start)

    def stop(self) -> None:
        self.nginx.stop()
        for d in self.instances:
            d.stop(5)
        if self.redis.proc is not None:
            self.redis.signal(signal.SIGCONT)  # a paused Redis cannot act on SIGTERM
        self.redis.stop()

    # the faults' moves ---------------------------------------------------------------
    async def take_down_instance(self, n: int, how: FaultKind) -> None:
        victim = self.instances[n]
        if how is FaultKind.INSTANCE_KILL:
            await asyncio.to_thread(victim.kill)
        else:
            victim.signal(signal.SIGTERM)
            assert victim.proc is not None
            await asyncio.to_thread(victim.proc.wait, 15)

    async def connections(self, n: int) -> str:
        """Open client connections on instance `n`, by its own /metrics (for the report)."""
        try:
            return f"{await metric(self.instances[n], 'dualcast_connections'):.0f}"
        except (KeyError, httpx.HTTPError) as exc:
            return f"? ({exc!r})"[:60]

    def drop_clients(self, rng: random.Random) -> int:
        """Abort the TCP connection of about half the WebSocket and SSE clients, as a
        network blip on their side would; they come back by themselves."""
        streaming = [f for f in self.followers if f.kind != "poll" and f.conn is not None]
        chosen = rng.sample(streaming, len(streaming) // 2)
        for f in chosen:
            assert f.conn is not None
            f.conn.abort()
        return len(chosen)

    async def restart_instance(self, n: int) -> None:
        await asyncio.to_thread(self.instances[n].start)  # same port; waits for /healthz
        self.instance_back_at = time.monotonic()

    async def take_down_redis(self, how: FaultKind) -> None:
        if how is FaultKind.REDIS_KILL:
            await asyncio.to_thread(self.redis.kill)
        else:
            self.redis.signal(signal.SIGSTOP)

    async def bring_back_redis(self, how: FaultKind) -> None:
        if how is FaultKind.REDIS_KILL:
            await asyncio.to_thread(self.redis.start)  # same port, the AOF reloaded
        else:
            self.redis.signal(signal.SIGCONT)

    def fail_timeout(self) -> float:
        """nginx's `fail_timeout` for the instances, read from the config it runs."""
        found = re.search(r"^\s*server \S+ .*fail_timeout=(\d+)s;", self.nginx.site_conf.read_text(),
                          re.MULTILINE)
        assert found is not None, "no fail_timeout in the nginx config"
        return float(found.group(1))

    async def keep_one_out_of_rotation(self) -> float:
        """Hold the next instance fault until nginx uses the last victim again; returns
        the seconds held.

        nginx skips an instance for `fail_timeout` after one refused connection, even
        once it is back (its checks are passive), and the last refusal came before the
        restart finished. Faults on every instance within that time leave nginx none to
        try, and it answers 502: true of any instance behind such a config, and what a
        deploy script avoids by pacing. So instance faults are paced by it; Redis faults
        are not, since they must never take an instance out of rotation."""
        hold = self.instance_back_at + self.fail_timeout() + 0.5 - time.monotonic()
        if hold > 0:
            await asyncio.sleep(hold)  # the fault schedule's pacing, derived from the config
        return max(hold, 0.0)

    async def apply(self, fault: Fault) -> str:
        """Carry out one fault; returns what was done, with how long each step took."""
        kind = fault.kind
        waited = 0.0
        if kind not in (FaultKind.REDIS_KILL, FaultKind.REDIS_PAUSE):
            waited = await self.keep_one_out_of_rotation()
        t0 = time.monotonic()
        after = f" (held {waited:.1f}s for nginx's fail_timeout)" if waited > 0 else ""
        if kind in (FaultKind.INSTANCE_KILL, FaultKind.INSTANCE_DRAIN):
            await self.take_down_instance(fault.instance, kind)
            await asyncio.sleep(fault.down)  # the instance stays down this long (the fault)
            await self.restart_instance(fault.instance)
        elif kind in (FaultKind.REDIS_KILL, FaultKind.REDIS_PAUSE):
            await self.take_down_redis(kind)
            try:
                await asyncio.sleep(fault.down)  # the outage itself
            finally:
                await self.bring_back_redis(kind)
        else:
            await self.take_down_redis(fault.redis_how)
            try:
                await self.take_down_instance(fault.instance, fault.instance_how)
                await self.restart_instance(fault.instance)  # starts with no Redis to reach
                # nginx takes the fresh instance back once its fail_timeout has passed;
                # then streaming clients whose network blips come back through nginx,
                # which (least_conn) sends them to the fresh instance first: they resume
                # there while it has never reached Redis. (The outage lasts that long.)
                await self.keep_one_out_of_rotation()
                dropped = self.drop_clients(random.Random(fault.drop_seed))
                await asyncio.sleep(fault.down)  # the outage goes on this long
                there = await self.connections(fault.instance)
            finally:
                await self.bring_back_redis(fault.redis_how)
            return (f"{fault.describe()} took {time.monotonic() - t0:.1f}s, "
                    f"{dropped} clients dropped, {there} connections on the fresh instance"
                    f"{after}")
        return f"{fault.describe()} took {time.monotonic() - t0:.1f}s{after}"


async def run(workdir: Path, plan: Plan, token: str, secret: str, instances: int = 3,
              per_transport: int = 4, rate: float = 40, settle: float = 30,
              on_fault: Callable[[str], None] | None = None,
              root: Path | None = None) -> Outcome:
    """Start everything, apply `plan` under load, stop the load, check every client.

    `root` serves another checkout's `server/` (to show what an older version lost)."""
    outcome = Outcome(plan)
    t_start = time.monotonic()
    cluster = Cluster(workdir, instances, secret, root)
    followers: list[ResetAwareFollower] = []
    producer: Producer | None = None
    try:
        await cluster.start()
        redis_url = cluster.redis.url
        await Producer(redis_url, rate=200).start(limit=3).wait(10)  # a head to start from
        kinds: list[Kind] = ["ws", "sse", "poll"]
        followers = [ResetAwareFollower(kind, "127.0.0.1", cluster.nginx.port, token=token,
                                        poll_wait=2)
                     for kind in kinds for _ in range(per_transport)]
        cluster.followers = followers
        await start_followers([*followers])
        steady = producer = Producer(redis_url, rate=rate).start()
        await wait_for(lambda: len(steady.acked) >= rate, 15, "a second of events")
        for fault in plan.faults:
            line = await cluster.apply(fault)
            outcome.done.append(line)
            if on_fault is not None:
                on_fault(line)
            await asyncio.sleep(fault.gap)  # steady load between faults (pacing, no sync)
        await producer.stop()
        outcome.producer_retries = producer.failures
        everything = await stream_ids(redis_url)
        outcome.events = len(everything)
        last = everything[-1]
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: all(f.record.last_id == last for f in followers), settle,
                           "every client to reach the stream's last event")
        keys = [id_key(i) for i in everything]
        for f in followers:
            start = f.record.first_welcome
            after = bisect.bisect_right(keys, id_key(start)) if start else 0
            problem = check_resumed(f.ids, f.reset_marks, everything[after:])
            if problem is not None:
                closes = [c.how for c in f.record.closes][-4:]
                outcome.problems.append(f"{f.kind} client from {start}: {problem}; "
                                        f"last id {f.record.last_id}, closes {closes}")
        outcome.clients = len(followers)
        outcome.reconnects = sum(max(0, len(f.record.connected_at) - 1) for f in followers)
        outcome.resets = sum(len(f.reset_marks) for f in followers)
        # At most one instance is ever out of rotation (keep_one_out_of_rotation), so nginx
        # always has a live one to try: a 502 means it took healthy instances out (as it
        # did when it counted the polls' 503s during a Redis outage as failures).
        outcome.bad_gateways = sum(" 502" in c.how for f in followers for c in f.record.closes)
        if outcome.bad_gateways:
            outcome.problems.append(f"{outcome.bad_gateways} connections answered 502 by nginx")
        for n, d in enumerate(cluster.instances):
            bad = [line for line in log_problems(d) if not EXPECTED_LOG.search(line)]
            outcome.problems += [f"instance #{n} log: {line[:200]}" for line in bad[:5]]
    finally:
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()
        await asyncio.gather(*(f.stop() for f in followers))
        cluster.stop()
        outcome.seconds = time.monotonic() - t_start
    return outcome
