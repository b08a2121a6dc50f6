"""`--workers N` with spares (DUALCAST_WORKERS_WAKE=busy, the default): the first worker
serves alone, the others neither listen nor read the stream until it is busy; then all
serve, and every subscriber, whichever worker holds it, gets every event once, in order.

Real processes: `dualcast serve` children, a real redis-server, psutil to see which
worker listens, which holds a connection to Redis and which holds the clients.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import psutil
import pytest

from dualcast.client import Event, Reset, State, Status
from dualcast.client import subscribe as client_subscribe
from dualcast.spares import FirstWorker, cpu_seconds, crowd
from tests.harness.clients import SSEClient, Subscriber, subscribe
from tests.harness.probes import log_problems
from tests.harness.procs import ROOT, DualcastProcess, RedisProcess
from tests.harness.stream import Producer, xadd
from tests.harness.waits import wait_for, wait_until
from tests.test_serve import clean_env, connected_to, listens_on, run_cli, wait_workers


def listening(workers: list[psutil.Process], port: int) -> list[psutil.Process]:
    return [w for w in workers if listens_on(w, "127.0.0.1", port)]


def first_alone(proc: DualcastProcess, count: int) -> tuple[list[psutil.Process], psutil.Process]:
    """The `count` workers once started, and the one that listens (the others asleep)."""
    workers = wait_workers(proc, count)
    wait_until(lambda: len(listening(workers, proc.port)) == 1, timeout=30,
               what="the first worker listening")
    return workers, listening(workers, proc.port)[0]


def reading(workers: list[psutil.Process], redis: RedisProcess) -> list[psutil.Process]:
    """The workers connected to Redis: those that read the stream."""
    return [w for w in workers if connected_to(w, redis.port)]


def holds_clients(worker: psutil.Process, port: int) -> bool:
    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
               for c in worker.net_connections("tcp"))


async def every_event_once(subscribers: list[Subscriber], ids: list[str]) -> None:
    await wait_for(lambda: all(s.seen.ids[-len(ids):] == ids for s in subscribers),
                   timeout=20, what="every subscriber to get the events")
    for s in subscribers:
        assert s.seen.ids == ids, s.seen.ids  # once each, in order, nothing before them


def test_crowd_is_a_thousand_or_a_quarter_of_an_even_share() -> None:
    assert crowd(0, 2) == 1000  # no cap
    assert crowd(19_900, 6) == 1000
    assert crowd(120, 3) == 20
    assert crowd(3, 4) == 1


@pytest.mark.timeout(120)
async def test_spares_read_nothing_until_the_first_is_crowded_then_all_serve(
    dualcast: Callable[..., DualcastProcess], fresh_redis: RedisProcess
) -> None:
    # a cap of 120 per process, three workers: the first alone holds at most 20
    proc = dualcast(fresh_redis.url, env={"DUALCAST_MAX_CONNECTIONS": "120"},
                    args=["--workers", "3"])
    workers, first = first_alone(proc, 3)
    wait_until(lambda: reading(workers, fresh_redis) == [first], timeout=30,
               what="the first worker reading the stream")
    spares = [w for w in workers if w.pid != first.pid]
    subscribers: list[Subscriber] = []
    try:
        subscribers += [await subscribe("sse", proc.url) for _ in range(10)]
        ids = [xadd(fresh_redis, "tick", {"n": 0})]
        await every_event_once(subscribers, ids)
        assert listening(workers, proc.port) == [first]
        assert reading(workers, fresh_redis) == [first]
        assert "now serve" not in proc.log()

        for _ in range(40):  # past 20 more connections, the spares wake
            subscribers.append(await subscribe("sse", proc.url))
            if "now serve too" in proc.log():
                break
        await wait_for(lambda: len(listening(workers, proc.port)) == 3, timeout=30,
                       what="every worker listening")
        assert "worker 0 is busy: it holds about" in proc.log()
        for _ in range(30):  # the kernel now spreads new connects over the three
            subscribers.append(await subscribe("sse", proc.url))
        assert any(holds_clients(w, proc.port) for w in spares)
        assert len(reading(workers, fresh_redis)) == 3

        more = [xadd(fresh_redis, "tick", {"n": n}) for n in range(1, 6)]
        late = subscribers[10:]  # connected after the first event
        await every_event_once(subscribers[:10], ids + more)
        await every_event_once(late, more)
    finally:
        for s in subscribers:
            await s.close()
    assert proc.stop() == 0
    assert not log_problems(proc)


def clients_held(worker: psutil.Process, port: int) -> int:
    return sum(1 for c in worker.net_connections("tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


@pytest.mark.timeout(150)
async def test_a_busy_first_worker_sends_subscribers_to_the_spare_and_none_loses_an_event(
    dualcast: Callable[..., DualcastProcess], fresh_redis: RedisProcess
) -> None:
    """The load grows on connections the first worker holds alone (300 streams, then 500
    events/s for each): its CPU wakes the spare, and it sends half of its subscribers
    away to reconnect, some of which land on the spare. Twelve subscribers of our own
    Python client, among them, get every event once, in order, shed or not."""
    proc = dualcast(fresh_redis.url, env={"DUALCAST_MAX_CONNECTIONS_PER_ADDRESS": "0"},
                    args=["--workers", "2"])
    workers, first = first_alone(proc, 2)
    spare = next(w for w in workers if w.pid != first.pid)
    got: list[list[str]] = [[] for _ in range(12)]
    lives = [0] * len(got)  # how often each follower went live: more than once, it was shed

    async def follow(ids: list[str], n: int) -> None:
        def status(st: Status) -> None:
            lives[n] += st.state is State.LIVE

        async with client_subscribe(proc.url, transports=["websocket"],
                                    on_status=status) as events:
            async for item in events:
                ids.append("reset" if isinstance(item, Reset) else
                           item.id if isinstance(item, Event) else repr(item))

    followers = [asyncio.create_task(follow(ids, n)) for n, ids in enumerate(got)]
    sinks = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.harness.sinks", proc.url, "300", "90", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE)
    producer = Producer(fresh_redis.url, rate=500)
    try:
        assert sinks.stdout is not None
        line = await asyncio.wait_for(sinks.stdout.readline(), 30)
        assert line.strip() == b"connected 300", line
        await wait_for(lambda: clients_held(first, proc.port) >= 312, timeout=30,
                       what="every client on the first worker")
        assert clients_held(spare, proc.port) == 0
        producer.start(limit=30_000)
        await wait_for(lambda: "subscribers to reconnect" in proc.log(), timeout=45,
                       what="the first worker shedding")
        assert "worker 0 is busy: it spent" in proc.log()
        assert "worker 0 is busy: it holds" not in proc.log()
        await wait_for(lambda: clients_held(spare, proc.port) >= 30, timeout=30,
                       what="streams sent away reconnecting on the spare")
        await producer.stop()
        ids = producer.acked
        await wait_for(lambda: all(len(g) >= len(ids) for g in got), timeout=60,
                       what="every follower to get every event")
        for g in got:
            assert g == ids, (len(g), len(ids))  # once each, in order, no reset
        # half of 312 were sent away: all twelve kept by chance is one run in 4,096
        assert any(n > 1 for n in lives), lives
    finally:
        await producer.stop()
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        if sinks.returncode is None:
            sinks.kill()
        await sinks.wait()
    assert proc.stop() == 0


@pytest.mark.timeout(90)
async def test_a_first_worker_that_dies_wakes_the_spare_and_the_port_keeps_serving(
    dualcast: Callable[..., DualcastProcess], fresh_redis: RedisProcess
) -> None:
    proc = dualcast(fresh_redis.url, args=["--workers", "2"])
    workers, first = first_alone(proc, 2)
    spare = next(w for w in workers if w.pid != first.pid)
    first.kill()
    await wait_for(lambda: listens_on(spare, "127.0.0.1", proc.port), timeout=30,
                   what="the spare listening")
    assert "worker 0 died: worker 1 now serves too" in proc.log()
    sub = await subscribe("ws", proc.url)
    try:
        ids = [xadd(fresh_redis, "tick", {"n": 1})]
        await every_event_once([sub], ids)
    finally:
        await sub.close()
    assert proc.stop() == 0


@pytest.mark.timeout(60)
async def test_sleeping_spares_stop_with_the_server(
    dualcast: Callable[..., DualcastProcess], fresh_redis: RedisProcess
) -> None:
    proc = dualcast(fresh_redis.url, args=["--workers", "3"])
    workers, _ = first_alone(proc, 3)
    assert "workers 1-2 wait until worker 0 is busy" in proc.log()
    assert proc.stop() == 0
    await wait_for(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE
                                   for w in workers), timeout=10, what="every worker gone")
    assert not log_problems(proc)


@pytest.mark.timeout(60)
async def test_a_worker_spending_a_core_is_busy_and_an_idle_one_is_not() -> None:
    """The supervisor's reading of /proc: a process that spins is busy within a few
    seconds; one that sleeps is not, over as many looks."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        loop = asyncio.get_running_loop()
        spinning, sleeping = FirstWorker(1000), FirstWorker(1000)
        spinning.follow(spin.pid)
        sleeping.follow(idle.pid)
        verdicts: list[str | None] = []

        def spin_is_busy() -> bool:
            verdicts.append(sleeping.busy(loop.time()))
            return spinning.busy(loop.time()) is not None

        await wait_for(spin_is_busy, timeout=20, interval=0.1, what="the spinner busy")
        assert spinning.busy(loop.time()) is not None
        assert "of a core" in (spinning.busy(loop.time()) or "")
        assert len(verdicts) >= 10 and verdicts == [None] * len(verdicts)
        assert cpu_seconds(idle.pid) is not None
    finally:
        for child in (spin, idle):
            os.kill(child.pid, signal.SIGKILL)
            child.wait()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_workers_wake_start_serves_every_worker_from_the_start(
    how: str, dualcast: Callable[..., DualcastProcess], fresh_redis: RedisProcess
) -> None:
    flag = ["--workers-wake", "start"] if how == "flag" else []
    env = {"DUALCAST_WORKERS_WAKE": "start"} if how == "env" else {}
    proc = dualcast(fresh_redis.url, env=env, args=["--workers", "2", *flag])
    workers = wait_workers(proc, 2)
    wait_until(lambda: len(listening(workers, proc.port)) == 2
               and len(reading(workers, fresh_redis)) == 2, timeout=30,
               what="both workers serving")
    assert "wait until worker 0 is busy" not in proc.log()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_workers_wake_that_is_neither_busy_nor_start_is_one_line(how: str) -> None:
    flag = ["--workers-wake", "later"] if how == "flag" else []
    env = clean_env(DUALCAST_REDIS_URL="redis://127.0.0.1:9/0",
                    **({"DUALCAST_WORKERS_WAKE": "later"} if how == "env" else {}))
    done = run_cli("serve", "--workers", "2", *flag, env=env)
    assert done.returncode != 0
    named = "--workers-wake" if how == "flag" else "DUALCAST_WORKERS_WAKE"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in done.stderr, done.stderr


@pytest.mark.timeout(60)
async def test_a_shed_sends_half_away_with_the_usual_retry_not_a_drains(
    dualcast: Callable[..., DualcastProcess], fresh_redis: RedisProcess
) -> None:
    """What the supervisor's SIGUSR1 makes the first worker do, asked here directly:
    half of its 8 streams are sent away, each ending with `retry:` at
    DUALCAST_SSE_RETRY_MS (3 s), not a drain's spread over the grace (up to 3 + 30 s
    here: a stream kept away that long); the other half stay and get the next event.
    (WebSockets get 1001: the Python clients of the busy test above reconnect from it.)"""
    proc = dualcast(fresh_redis.url, env={"DUALCAST_SHUTDOWN_GRACE": "30"},
                    args=["--workers", "2"])
    _, first = first_alone(proc, 2)
    streams = [SSEClient(proc.url) for _ in range(8)]
    for stream in streams:
        await stream.connect()
    try:
        os.kill(first.pid, signal.SIGUSR1)
        await wait_for(lambda: "sending 4 of 8 subscribers" in proc.log(), timeout=10,
                       what="the shed")
        await wait_for(lambda: sum(s.ended.is_set() for s in streams) == 4, timeout=10,
                       what="four streams sent away")
        away = [s for s in streams if s.ended.is_set()]
        assert [s.retries[-1] for s in away] == [3000] * 4, [s.retries for s in away]
        ids = [xadd(fresh_redis, "tick", {"n": 1})]
        await every_event_once([s for s in streams if s not in away], ids)
        assert sum(s.ended.is_set() for s in streams) == 4
    finally:
        for stream in streams:
            await stream.close()
