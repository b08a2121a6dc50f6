"""The demo traffic: every event has a documented name and shape, the right rooms, and a story.

The simulation runs fast (high `speed`) into a list sink and stops as soon as
what a test looks for has appeared, with a deadline.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from dualcast.demo import demo_against_redis, run_demo
from dualcast.events import Envelope, decode_entry
from tests.harness.procs import RedisProcess

pytestmark = pytest.mark.timeout(60)

Record = tuple[str, Any, list[str]]

#: The event types the dashboard reads: required keys, optional keys.
SHAPES: dict[str, tuple[set[str], set[str]]] = {
    "session_created": ({"sessionId", "userId", "providerId", "model", "createdAt"}, set()),
    "session_ended": (
        {"sessionId", "userId", "providerId", "durationMs", "costUsd", "status"}, set()),
    "metrics_update": (
        {"activeSessions", "totalRequests", "totalCost", "timestamp"}, {"userId", "avgResponseMs"}),
    "provider_status_change": (
        {"providerId", "status", "circuitState", "failureCount", "timestamp"}, {"name"}),
    "usage_log_added": ({"sessionId", "userId", "model", "inputTokens", "outputTokens",
                         "costUsd", "latencyMs", "statusCode"}, set()),
}


def is_iso(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    return datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None


def is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


async def collect(until: Any, speed: float = 400.0, seed: int | None = 7,
                  within: float = 20.0) -> list[Record]:
    """Run the demo into a list until `until(records)` holds (or fail after `within` s)."""
    records: list[Record] = []
    stop = asyncio.Event()

    async def sink(event: str, data: Any, rooms: list[str]) -> None:
        if stop.is_set():
            return  # the wind-down (sessions ended on stop) has a test of its own
        records.append((event, data, rooms))
        if until(records):
            stop.set()

    task = asyncio.create_task(run_demo(sink, stop=stop, speed=speed, seed=seed))
    try:
        async with asyncio.timeout(within):
            await stop.wait()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    return records


def circuit_cycle_seen(records: list[Record]) -> bool:
    """Some provider went open, then half-open, then closed and healthy again."""
    states: dict[str, list[str]] = {}
    for event, data, _ in records:
        if event == "provider_status_change":
            states.setdefault(data["providerId"], []).append(data["circuitState"])
    for seq in states.values():
        if "open" in seq:
            i = seq.index("open")
            j = next((k for k in range(i, len(seq)) if seq[k] == "half-open"), None)
            if j is not None and "closed" in seq[j:]:
                return True
    return False


async def test_every_event_matches_the_design_shapes_and_rooms():
    records = await collect(lambda r: circuit_cycle_seen(r) and len(r) > 800)
    names = {event for event, _, _ in records}
    assert names == set(SHAPES)
    for event, data, rooms in records:
        Envelope(event=event, data=data, rooms=rooms)  # valid names and rooms per DESIGN
        required, optional = SHAPES[event]
        assert required <= set(data) <= required | optional, (event, data)
        if event == "metrics_update":
            assert all(is_num(data[k]) for k in ("activeSessions", "totalRequests", "totalCost"))
            assert is_iso(data["timestamp"])
            if "userId" in data:
                assert rooms == [f"user-{data['userId']}"]
            else:
                assert rooms == ["admin"]  # global metrics: admins only
        elif event == "provider_status_change":
            assert rooms == []  # public: every dashboard shows provider health
            assert data["circuitState"] in {"closed", "half-open", "open"}
            assert data["status"] in {"healthy", "degraded", "down"}
            assert isinstance(data["failureCount"], int) and data["failureCount"] >= 0
            assert isinstance(data["name"], str) and is_iso(data["timestamp"])
        else:
            assert rooms == [f"user-{data['userId']}", "admin"]
            assert re.fullmatch(r"\d+", data["userId"])
        if event == "usage_log_added":
            assert all(isinstance(data[k], int) and data[k] >= 0
                       for k in ("inputTokens", "outputTokens", "latencyMs"))
            assert is_num(data["costUsd"])
            assert data["statusCode"] in {200, 429, 500, 502, 503, 504}
            if data["statusCode"] != 200:
                assert data["outputTokens"] == 0 and data["costUsd"] == 0
        if event == "session_created":
            assert is_iso(data["createdAt"]) and data["model"]
        if event == "session_ended":
            assert data["status"] in {"completed", "failed", "cancelled"}
            assert is_num(data["durationMs"]) and is_num(data["costUsd"])


async def test_sessions_tell_a_consistent_story():
    records = await collect(lambda r: sum(e == "session_ended" for e, _, _ in r) >= 40)
    open_sessions: dict[str, dict[str, Any]] = {}
    usage_cost: dict[str, float] = {}
    for event, data, _ in records:
        if event == "session_created":
            assert data["sessionId"] not in open_sessions
            open_sessions[data["sessionId"]] = data
        elif event == "usage_log_added":
            created = open_sessions[data["sessionId"]]  # usage only for a running session
            assert created["userId"] == data["userId"] and created["model"] == data["model"]
            usage_cost[data["sessionId"]] = usage_cost.get(data["sessionId"], 0) + data["costUsd"]
        elif event == "session_ended":
            created = open_sessions.pop(data["sessionId"])
            assert (created["userId"], created["providerId"]) == (data["userId"],
                                                                  data["providerId"])
            assert data["costUsd"] == pytest.approx(usage_cost.get(data["sessionId"], 0),
                                                    abs=1e-5)
        elif event == "metrics_update" and "userId" not in data:
            assert data["activeSessions"] == len(open_sessions)
    providers = {d["providerId"] for e, d, _ in records if e == "session_created"}
    assert len(providers) >= 3
    users = {d["userId"] for e, d, _ in records if e == "session_created"}
    assert {"456", "789"} <= users


async def test_a_provider_degrades_opens_and_recovers():
    records = await collect(circuit_cycle_seen)
    changes = [d for e, d, _ in records if e == "provider_status_change"]
    by_provider: dict[str, list[dict[str, Any]]] = {}
    for change in changes:
        by_provider.setdefault(change["providerId"], []).append(change)
    degraded = [p for p, seq in by_provider.items()
                if any(c["circuitState"] == "open" for c in seq)]
    assert degraded
    seq = by_provider[degraded[0]]
    assert seq[0]["status"] == "healthy" and seq[0]["circuitState"] == "closed"  # opening picture
    opened = next(c for c in seq if c["circuitState"] == "open")
    assert opened["status"] == "down" and opened["failureCount"] >= 5
    assert any(c["status"] == "degraded" and c["circuitState"] == "closed" for c in seq)
    assert seq[-1]["circuitState"] == "closed" and seq[-1]["status"] == "healthy"
    assert seq[-1]["failureCount"] == 0
    # failures show up in the usage log while the provider is in trouble
    assert any(e == "usage_log_added" and d["statusCode"] >= 500 for e, d, _ in records)


async def test_global_metrics_about_once_a_second_and_a_few_events_per_second():
    records = await collect(
        lambda r: sum(e == "metrics_update" and "userId" not in d for e, d, _ in r) >= 121
    )
    seconds = sum(e == "metrics_update" and "userId" not in d for e, d, _ in records) - 1
    # one global metrics_update per simulated second, so it is the demo's clock
    per_second = len(records) / seconds
    assert 2 <= per_second <= 10, per_second


async def test_real_time_pace_at_speed_one():
    started = time.monotonic()
    records = await collect(lambda r: len(r) >= 15, speed=1.0, within=10)
    elapsed = time.monotonic() - started
    # the opening picture (providers, running sessions) at once, then a few per second
    assert elapsed < 6
    assert sum(e == "metrics_update" and "userId" not in d for e, d, _ in records) <= elapsed + 2


async def test_same_seed_same_story():
    def skeleton(records: list[Record]) -> list[tuple[str, list[str], tuple[str, ...]]]:
        return [(e, r, tuple(sorted((k, str(v)) for k, v in d.items()
                                    if k not in {"timestamp", "createdAt"})))
                for e, d, r in records]

    first = await collect(lambda r: len(r) >= 300, seed=42)
    second = await collect(lambda r: len(r) >= 300, seed=42, speed=50.0)
    assert skeleton(first[:300]) == skeleton(second[:300])


async def test_stop_ends_the_demo_promptly_even_when_slow():
    stop = asyncio.Event()
    first = asyncio.Event()
    task = asyncio.create_task(run_demo(lambda e, d, r: first.set(), stop=stop, speed=0.01))
    await asyncio.wait_for(first.wait(), 5)  # it runs; its next tick is 25 s away
    started = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 2)
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("how", ["stop", "cancel"])
async def test_a_stopping_demo_ends_its_open_sessions(how: str):
    """A clean stop (or the cancel of Ctrl-C / a server shutting down) ends every open
    session in the log, so no dashboard keeps them live; the last metrics say 0."""
    records: list[Record] = []
    stop = asyncio.Event()
    opened = asyncio.Event()

    def sink(event: str, data: Any, rooms: list[str]) -> None:
        records.append((event, data, rooms))
        if sum(e == "session_created" for e, _, _ in records) >= 8:
            opened.set()

    task = asyncio.create_task(run_demo(sink, stop=stop, speed=50, seed=5))
    await asyncio.wait_for(opened.wait(), 20)
    before = len(records)
    if how == "stop":
        stop.set()
        await asyncio.wait_for(task, 5)
    else:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    live: set[str] = set()
    for event, data, _ in records:
        if event == "session_created":
            live.add(data["sessionId"])
        elif event == "session_ended":
            live.discard(data["sessionId"])
    assert live == set()
    wound_down = [d for e, d, _ in records[before:] if e == "session_ended"]
    assert wound_down and {d["status"] for d in wound_down} == {"cancelled"}
    last_global = [d for e, d, _ in records if e == "metrics_update" and "userId" not in d][-1]
    assert last_global["activeSessions"] == 0


async def test_a_failing_sink_does_not_end_the_demo():
    calls = 0
    stop = asyncio.Event()

    async def flaky(event: str, data: Any, rooms: list[str]) -> None:
        nonlocal calls
        calls += 1
        if calls % 3 == 0:
            raise ConnectionError("the log is away")
        if calls >= 300:
            stop.set()

    await asyncio.wait_for(run_demo(flaky, stop=stop, speed=400, seed=1), 20)
    assert calls >= 300


def test_bad_speed_is_refused():
    with pytest.raises(ValueError):
        asyncio.run(run_demo(lambda *a: None, stop=asyncio.Event(), speed=0))


async def test_demo_against_redis_writes_the_wire_format(redis_server: RedisProcess):
    stream = f"test-demo-{uuid.uuid4().hex[:12]}"
    stop = asyncio.Event()
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    task = asyncio.create_task(
        demo_against_redis(redis_server.url, stream, 1000, stop, speed=200.0, seed=3))
    try:
        deadline = time.monotonic() + 15
        while await client.xlen(stream) < 200:
            assert time.monotonic() < deadline, "the demo wrote too little to Redis"
            assert not task.done(), task
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    events = [decode_entry(i, f) for i, f in await client.xrange(stream)]
    await client.aclose()
    assert {e.event for e in events} <= set(SHAPES)
    assert {"session_created", "usage_log_added", "metrics_update"} <= {e.event for e in events}
    assert all(e.rooms in {(), ("admin",)} or e.rooms[0].startswith("user-") for e in events)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_dualcast_demo_ends_its_sessions_on_sigterm_and_ctrl_c(
        redis_server: RedisProcess, tmp_path: Any, signum: str) -> None:
    """`docker stop` and systemd send SIGTERM, a person Ctrl-C: either way the demo ends
    its open sessions and exits."""
    import json
    import signal
    import subprocess
    import sys

    import redis

    from tests.harness.procs import clean_env
    from tests.harness.waits import wait_until

    stream = f"demo-term-{uuid.uuid4().hex}"
    client = redis.Redis.from_url(redis_server.url)

    def events() -> list[dict[str, Any]]:
        return [json.loads(fields[b"data"]) for _, fields in client.xrange(stream)]

    with open(tmp_path / "demo.log", "wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "dualcast", "demo", "--redis-url", redis_server.url,
             "--speed", "20"], env=clean_env({"DUALCAST_STREAM": stream}),
            stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: any(e["event"] == "session_created" for e in events()), 20,
                       what="a session")
            demo.send_signal(getattr(signal, signum))
            assert demo.wait(timeout=15) == 0
        finally:
            if demo.poll() is None:
                demo.kill()
    created = {e["data"]["sessionId"] for e in events() if e["event"] == "session_created"}
    ended = {e["data"]["sessionId"] for e in events() if e["event"] == "session_ended"}
    assert created and created <= ended
    # its log reads as `dualcast serve`'s does: a time, then the counts in words
    said = (tmp_path / "demo.log").read_text().splitlines()
    assert said and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ",
                                 line) for line in said), said
    assert re.search(r"demo: stopped; published \d+$", said[-1]), said[-1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("speed", ["0", "-1", "nan", "inf", "101", "fast"])
def test_dualcast_demo_refuses_a_bad_speed_in_one_line(
        redis_server: RedisProcess, speed: str) -> None:
    """As `serve --demo-speed 0` is: one line naming the flag, exit 2, nothing published
    (it was a ValueError traceback after "publishing ... speed 0.0")."""
    import subprocess
    import sys

    import redis

    from tests.harness.procs import clean_env

    stream = f"demo-speed-{uuid.uuid4().hex}"
    done = subprocess.run(
        [sys.executable, "-m", "dualcast", "demo", "--redis-url", redis_server.url,
         f"--speed={speed}"], env=clean_env({"DUALCAST_STREAM": stream}),
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--speed" in lines[0] and repr(speed) in lines[0] and "at most 100" in lines[0]
    assert done.stdout == ""
    assert redis.Redis.from_url(redis_server.url).exists(stream) == 0


@pytest.mark.timeout(60)
def test_dualcast_demo_against_an_unreachable_redis_exits_1_in_one_line() -> None:
    """Nothing listening at the URL: the demo ran for ever dropping every event ("events
    are dropped (fail open)"), and Ctrl-C then exited 0; a wrong URL looked like a demo
    that worked. It now says so in one line and exits 1 at once."""
    import subprocess
    import sys

    from tests.harness.procs import clean_env, free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    done = subprocess.run([sys.executable, "-m", "dualcast", "demo", "--redis-url", url],
                          env=clean_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"dualcast demo: Redis at {url} cannot take the events: "
                           "ConnectionError")
    assert line.endswith("nothing was published")
    assert done.stdout == ""


@pytest.mark.timeout(60)
def test_dualcast_demo_to_a_stream_key_that_is_no_stream_exits_1_in_one_line(
        redis_server: RedisProcess) -> None:
    """A stream key holding a string: Redis refused every XADD (WRONGTYPE), the demo
    logged it once and ran for ever, and Ctrl-C exited 0."""
    import subprocess
    import sys

    import redis

    from tests.harness.procs import clean_env

    stream = f"demo-clash-{uuid.uuid4().hex}"
    redis.Redis.from_url(redis_server.url).set(stream, "a string, not a stream")
    done = subprocess.run(
        [sys.executable, "-m", "dualcast", "demo", "--redis-url", redis_server.url],
        env=clean_env({"DUALCAST_STREAM": stream}), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line == (f"dualcast demo: Redis at {redis_server.url} cannot take the events: the "
                    f"key {stream!r} holds a string, not a stream: every event would be "
                    "refused (choose another stream key, DUALCAST_STREAM); nothing was published")
