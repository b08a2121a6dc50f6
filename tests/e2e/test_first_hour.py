"""What a newcomer sees in the first hour, in a real Chromium against real processes.

The event log (Redis) goes away under a live page: the page says so in words instead
of a green "live"; it comes back: the banner goes and events flow. Sessions end when
the `dualcast demo` that opened them is stopped (Ctrl-C), and sessions whose producer
died without a word age out of the live table after a documented time.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SECRET
from tests.e2e.conftest import Page, Stack, login_url, wait_ids, wait_js, wait_transport
from tests.harness.procs import ROOT, DualcastProcess, RedisProcess, clean_env
from tests.harness.waits import wait_until

pytestmark = pytest.mark.browser

LOG_DOWN = "event log unreachable: events are not arriving"
#: Chromium's own console line for the 503 of /readyz while the log is away
READYZ_503 = "status of 503"


def banner(page: Any) -> str | None:
    """The log-down banner's text when it is shown, else None."""
    text = page.evaluate("(() => { const el = document.getElementById('log-down');"
                         " return el.hidden ? null : el.innerText; })()")
    return None if text is None else str(text)


def dot_colour(page: Any) -> str:
    return str(page.eval_on_selector("#status .dot", "d => getComputedStyle(d).backgroundColor"))


def test_an_unreachable_event_log_is_said_not_shown_green(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess],
    open_page: Callable[..., Page],
) -> None:
    server = dualcast(fresh_redis.url, env={"DUALCAST_STREAM": "first-hour"})
    p = open_page(login_url(server.url, sub="ops", admin=True), tuning={"readyPollMs": 500})
    page = p.page
    wait_transport(page, "websocket")
    page.wait_for_selector("body[data-log=reachable]", state="attached", timeout=10000)
    assert banner(page) is None
    assert page.text_content("#status-state") == "live"
    live_dot = dot_colour(page)

    fresh_redis.stop()
    wait_until(lambda: banner(page), timeout=30, interval=0.2, what="the log-down banner")
    assert LOG_DOWN in (banner(page) or "")
    assert page.get_attribute("body", "data-log") == "unreachable"
    assert page.text_content("#status-state") == "event log unreachable"
    # the badge's dot leaves the live green for the banner's red
    red = page.eval_on_selector("#log-down", "el => getComputedStyle(el).color")
    assert dot_colour(page) == red != live_dot, "a green dot while nothing can arrive"
    page.screenshot(path=str(ROOT / "test-artifacts" / "log-unreachable.png"))

    fresh_redis.start()
    wait_until(lambda: banner(page) is None, timeout=60, interval=0.2,
               what="the banner gone once the log is back")
    assert page.get_attribute("body", "data-log") == "reachable"
    stack = Stack(server=server, base_url=server.url, stream="first-hour", redis=fresh_redis)
    after = stack.publish("usage_log_added", {"n": 1})
    wait_ids(page, [after], timeout=30)
    assert page.text_content("#status-state") == "live"
    assert [e for e in p.unexpected_errors() if READYZ_503 not in e] == []


def test_a_page_opened_while_the_log_is_away_says_so(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess],
    open_page: Callable[..., Page],
) -> None:
    fresh_redis.stop()
    server = dualcast(fresh_redis.url)
    p = open_page(server.url + "/", tuning={"readyPollMs": 500})  # anonymous: /readyz is public
    wait_until(lambda: banner(p.page), timeout=30, interval=0.2, what="the log-down banner")
    assert LOG_DOWN in (banner(p.page) or "")


@pytest.fixture
def demo_process(tmp_path: Path) -> Iterator[Callable[[str, str], subprocess.Popen[bytes]]]:
    """Factory: `python -m dualcast demo` on a Redis stream; killed at the end if still up."""
    started: list[subprocess.Popen[bytes]] = []

    def start(redis_url: str, stream: str) -> subprocess.Popen[bytes]:
        env = clean_env({"DUALCAST_STREAM": stream, "DUALCAST_SECRET": SECRET})
        log = (tmp_path / f"demo{len(started)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "dualcast", "demo", "--redis-url",
                                 redis_url, "--speed", "4"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def session_rows(page: Any) -> int:
    return int(page.evaluate(
        "document.querySelectorAll('#sessions tr').length"))


def test_stopping_the_demo_ends_its_sessions(
    stack: Callable[..., Stack], open_page: Callable[..., Page],
    demo_process: Callable[[str, str], subprocess.Popen[bytes]],
) -> None:
    s = stack()
    p = open_page(login_url(s.base_url, sub="ops", admin=True))
    page = p.page
    wait_transport(page, "websocket")
    demo = demo_process(s.redis.url, s.stream)
    wait_until(lambda: session_rows(page) >= 3, timeout=30, interval=0.2,
               what="the demo's sessions in the live table")
    demo.send_signal(signal.SIGINT)  # Ctrl-C, as a person stops it
    assert demo.wait(15) == 0
    wait_until(lambda: session_rows(page) == 0, timeout=15, interval=0.2,
               what="every demo session ended")
    assert page.text_content("#sessions-count") == "0"
    assert page.is_visible("#sessions-empty")
    wait_js(page, "document.getElementById('card-sessions').textContent === '0'", timeout=10)
    assert page.is_hidden("#sessions-quiet")  # ended, not aged out
    assert p.unexpected_errors() == []


def test_sessions_without_news_age_out_of_the_live_table(
    stack: Callable[..., Stack], open_page: Callable[..., Page],
) -> None:
    """A producer that died mid-session: its sessions leave the table after the idle
    time (shortened here through the page's tuning), while a session with news stays."""
    s = stack()
    p = open_page(login_url(s.base_url, sub="ops", admin=True), tuning={"sessionIdleMs": 4000})
    page = p.page
    wait_transport(page, "websocket")
    now = int(time.time() * 1000)
    for sid in ("sess_busy", "sess_dead"):
        s.publish("session_created", {"sessionId": sid, "userId": "456", "providerId": "openai",
                                      "model": "gpt-4o", "createdAt": now})
    wait_js(page, "document.querySelectorAll('#sessions tr').length === 2", timeout=10)
    # the busy one keeps making requests; the dead one says nothing more
    deadline = time.monotonic() + 20
    dead_gone = "!document.querySelector('#sessions tr[data-session-id=sess_dead]')"
    while not page.evaluate(dead_gone):
        assert time.monotonic() < deadline, "the silent session never aged out"
        news = s.publish("usage_log_added", {
            "sessionId": "sess_busy", "userId": "456", "model": "gpt-4o", "inputTokens": 10,
            "outputTokens": 5, "costUsd": 0.001, "latencyMs": 300, "statusCode": 200})
        wait_ids(page, [news])  # one request at a time, each seen by the page
    assert page.eval_on_selector_all("#sessions tr", "rs => rs.map(r => r.dataset.sessionId)") \
        == ["sess_busy"]
    assert page.text_content("#card-sessions") == "1"
    note = page.text_content("#sessions-quiet") or ""
    assert page.is_visible("#sessions-quiet") and note.startswith("1 session with no news for 4 s")

    # a page opened later ages the same silent session out at once (from its createdAt)
    later = open_page(login_url(s.base_url, sub="ops", admin=True),
                      tuning={"sessionIdleMs": 4000}).page
    wait_transport(later, "websocket")
    wait_js(later, "!document.getElementById('sessions-quiet').hidden", timeout=10)
    shown = later.eval_on_selector_all("#sessions tr", "rs => rs.map(r => r.dataset.sessionId)")
    assert "sess_dead" not in shown
    assert p.unexpected_errors() == []
