"""/metrics follows Prometheus conventions, and background tasks that die come back, counted.

The names are read from a real server's /metrics twice: with prometheus_client's own
text parser against our conventions, and with Prometheus's own linter
(`promtool check metrics`, from Debian's `prometheus` package, which the test
command installs).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dualcast.config import load_settings
from dualcast.metrics import Metrics
from dualcast.runtime import Runtime
from dualcast.tasks import TaskName, Tasks, TaskState
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.tools import require_tool
from tests.harness.waits import wait_until

UNITS = ("seconds", "bytes")


def families(text: str) -> dict[str, tuple[str, list[tuple[str, dict[str, str], float]]]]:
    return {
        family.name: (family.type, [(s.name, s.labels, s.value) for s in family.samples])
        for family in text_string_to_metric_families(text)
    }


def convention_problems(text: str) -> list[str]:
    problems = []
    for family in text_string_to_metric_families(text):
        name = family.name
        if not name.startswith("dualcast_"):
            problems.append(f"{name}: not in the dualcast_ namespace")
        if not family.documentation:
            problems.append(f"{name}: no HELP text")
        for unit in UNITS:
            if f"_{unit}_" in name + "_" and not name.endswith(f"_{unit}"):
                problems.append(f"{name}: the unit {unit} must be the suffix")
        if family.type == "gauge" and name.endswith("_total"):
            problems.append(f"{name}: a gauge named like a counter")
        for sample in family.samples:
            if family.type == "counter" and not sample.name.endswith(("_total", "_created")):
                problems.append(f"{sample.name}: a counter sample without _total")
            if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", sample.name):
                problems.append(f"{sample.name}: not a valid metric name")
    return problems


def test_the_checker_catches_the_old_names() -> None:
    """The names issue 19 reported fail the check (so a pass below means something)."""
    old = (
        "# HELP dualcast_consumer_seconds_since_read x\n"
        "# TYPE dualcast_consumer_seconds_since_read gauge\n"
        "dualcast_consumer_seconds_since_read 1.0\n"
    )
    assert convention_problems(old) == [
        "dualcast_consumer_seconds_since_read: the unit seconds must be the suffix"
    ]


@pytest.fixture
def metrics_text(dualcast: Callable[..., DualcastProcess], redis_server: RedisProcess) -> str:
    """/metrics of a real server on Redis, once it is ready."""
    proc = dualcast(redis_server.url)
    wait_until(proc.ready, timeout=20, what="ready")
    return httpx.get(proc.url + "/metrics", timeout=5).text


def test_metrics_follow_prometheus_conventions(metrics_text: str) -> None:
    text = metrics_text
    assert convention_problems(text) == []
    found = families(text)
    assert found["dualcast_consumer_lag_entries"][0] == "gauge"
    assert found["dualcast_consumer_last_read_age_seconds"][0] == "gauge"
    assert "dualcast_consumer_lag" not in found
    assert "dualcast_consumer_seconds_since_read" not in found
    # every background task the app owns, running, none restarted
    kind, samples = found["dualcast_tasks"]
    assert kind == "gauge"
    running = {s[1]["task"] for s in samples if s[1]["state"] == "running" and s[2] == 1}
    assert {"consumer", "stall-watch"} <= running
    restarts = found["dualcast_task_restarts"][1]
    assert all(value == 0 for _, _, value in restarts)


def promtool_problems(text: str) -> str:
    """What `promtool check metrics` says of an exposition (empty when it is clean)."""
    promtool = require_tool("promtool", "it lints /metrics as Prometheus itself would")
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)
    return (done.stdout + done.stderr).strip() if done.returncode or done.stdout.strip() \
        else ""


def test_promtool_catches_the_old_names() -> None:
    """promtool flags a counter without `_total` (so its silence below means something)."""
    old = (
        "# HELP dualcast_events_delivered x\n"
        "# TYPE dualcast_events_delivered counter\n"
        "dualcast_events_delivered 1\n"
    )
    assert "dualcast_events_delivered" in promtool_problems(old)


def test_promtool_finds_nothing_to_say_of_metrics(metrics_text: str) -> None:
    assert "dualcast_tasks" in metrics_text
    assert promtool_problems(metrics_text) == ""


async def test_a_task_that_dies_is_restarted_with_backoff_and_counted() -> None:
    async with asyncio.timeout(20):
        rt = Runtime(load_settings(), secret=None)
        rt.tasks = Tasks(backoff_first=0.01, backoff_max=0.05)
        deaths = 0
        steady = asyncio.Event()

        async def flaky() -> None:
            nonlocal deaths
            if deaths < 3:
                deaths += 1
                raise RuntimeError(f"boom {deaths}")
            steady.set()
            await asyncio.Event().wait()  # then runs for good

        record = rt.tasks.start(TaskName.DEMO, flaky)
        await steady.wait()
        assert record.restarts == 3 and record.state is TaskState.RUNNING
        text = (await Metrics(rt).render()).decode()
        samples = families(text)["dualcast_task_restarts"][1]
        assert ("dualcast_task_restarts_total", {"task": "demo"}, 3.0) in samples
        await rt.tasks.stop_all()
        assert record.task is not None and record.task.done()
        await rt.log.close()


async def test_a_task_that_returns_is_finished_not_restarted() -> None:
    async with asyncio.timeout(10):
        tasks = Tasks(backoff_first=0.01)
        calls = 0

        async def once() -> None:
            nonlocal calls
            calls += 1

        record = tasks.start(TaskName.DEMO, once)
        assert record.task is not None
        await record.task
        assert calls == 1 and record.state is TaskState.FINISHED and record.restarts == 0


@pytest.mark.timeout(90)
async def test_a_client_the_stall_watch_drops_is_counted(
    dualcast: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    """A client whose socket stopped taking bytes is dropped by the stall watch after one
    send outlasts its limit, before its queue ever overflows at a modest rate; that drop
    was an INFO line and nothing else (dualcast_drops_total counts queue overflows only),
    so no alert could see clients being cut off. Now dualcast_stalled_drops_total."""
    import json
    import socket

    import redis

    from tests.harness.probes import metric
    from tests.harness.waits import wait_for

    stream = f"stalls-{uuid.uuid4().hex[:8]}"
    proc = dualcast(redis_server.url, env={"DUALCAST_STREAM": stream,
                                           "DUALCAST_PING_INTERVAL": "5"})  # limit 10 s
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", proc.port))
    stuck.sendall(b"GET /api/sse HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # then never reads
    try:
        await wait_for(lambda: metric(proc, "dualcast_connections"), 10, "the stream open")
        raw = redis.Redis(port=redis_server.port)
        blob = "x" * 60_000
        for _ in range(200):  # 12 MB, far past the socket buffers; 200 < the queue's 1000
            raw.xadd(stream, {"data": json.dumps({"event": "big", "data": blob})})
        raw.close()
        await wait_for(lambda: "dropped 1 clients" in proc.log(), 40, "the stall watch")
        assert await metric(proc, "dualcast_stalled_drops") == 1
        assert await metric(proc, "dualcast_drops") == 0  # the queue never overflowed
    finally:
        stuck.close()


@pytest.mark.timeout(60)
def test_a_stalled_redis_does_not_hold_the_scrape(
    dualcast: Callable[..., DualcastProcess], fresh_redis: RedisProcess
) -> None:
    """The consumer's lag is counted by asking Redis at scrape time; with Redis stalled
    each scrape waited DUALCAST_REDIS_TIMEOUT (here 5 s) for it, past many a scraper's
    timeout, and the scrape that should show the outage was lost with it. The lag now
    gets a second; the rest of /metrics answers at once. A lag the log cannot give is
    -1 (it was 0, "caught up", all through an outage)."""
    import time

    from tests.harness.tcpproxy import TCPProxy

    with TCPProxy(fresh_redis.port) as proxy:
        proc = dualcast(f"redis://127.0.0.1:{proxy.port}/0",
                        env={"DUALCAST_REDIS_TIMEOUT": "5"})
        wait_until(proc.ready, timeout=20, what="ready")
        proxy.stall()
        started = time.monotonic()
        text = httpx.get(proc.url + "/metrics", timeout=30).text
        took = time.monotonic() - started
        assert took < 2.5, took
        lag = families(text)["dualcast_consumer_lag_entries"][1]
        assert lag[0][2] == -1, lag  # unknown, and said so
        proxy.restore()
        proxy.refuse()  # and with nothing answering at all: unknown too, not "caught up"
        wait_until(lambda: not proc.ready(), timeout=20, what="unready")
        text = httpx.get(proc.url + "/metrics", timeout=30).text
        assert families(text)["dualcast_consumer_lag_entries"][1][0][2] == -1
