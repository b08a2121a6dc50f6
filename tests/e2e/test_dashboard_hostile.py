"""What a producer writes cannot break the dashboard, in a real Chromium against a real dualcast.

Anyone with a publish token writes event data that every dashboard draws: odd types,
odd keys, huge values and long strings must leave the page live, every event shown
and the panels drawn, now and after a reload (from the overview).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import redis

from tests.e2e.conftest import (
    Page,
    Stack,
    assert_each_once,
    login_url,
    wait_ids,
    wait_js,
    wait_transport,
)
from tests.harness.tcpproxy import TCPProxy
from tests.harness.waits import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

# valid JSON that String(), Number(), template literals and property keys throw on
HOSTILE = {"toString": 1}


def _admin_page(stack: Callable[..., Stack], open_page: Callable[..., Page]) -> tuple[Stack, Page]:
    """A fresh server and an admin's dashboard on it, live over WebSocket."""
    s = stack()
    p = open_page(login_url(s.base_url, sub="ops", admin=True))
    wait_transport(p.page, "websocket")
    return s, p


def test_objects_with_a_to_string_key_do_not_freeze_the_dashboard(
    stack: Callable[..., Stack], open_page: Callable[..., Page],
) -> None:
    s, p = _admin_page(stack, open_page)
    now = int(time.time() * 1000)
    ids = [
        s.publish("provider_status_change", {"providerId": "evil", "name": HOSTILE,
                                             "status": HOSTILE, "circuitState": HOSTILE,
                                             "failureCount": HOSTILE, "timestamp": HOSTILE}),
        s.publish("session_created", {"sessionId": HOSTILE, "userId": HOSTILE,
                                      "providerId": HOSTILE, "model": HOSTILE,
                                      "createdAt": HOSTILE}),
        s.publish("usage_log_added", {"sessionId": HOSTILE, "userId": HOSTILE,
                                      "model": HOSTILE, "inputTokens": HOSTILE,
                                      "costUsd": HOSTILE, "latencyMs": HOSTILE}),
        s.publish("metrics_update", {"userId": HOSTILE, "totalRequests": HOSTILE}),
        s.publish("metrics_update", {"activeSessions": HOSTILE, "totalRequests": HOSTILE,
                                     "totalCost": HOSTILE, "timestamp": HOSTILE}),
        s.publish("provider_status_change", {"providerId": "openai", "name": "OpenAI",
                                             "status": "healthy", "circuitState": "closed",
                                             "failureCount": 0, "timestamp": now}),
        s.publish("metrics_update", {"activeSessions": 1, "totalRequests": 42,
                                     "totalCost": 1.5, "timestamp": now}),
    ]
    assert_each_once(wait_ids(p.page, ids), ids)
    # the panels keep following the events
    wait_js(p.page, "document.getElementById('card-requests').textContent === '42'")
    wait_js(p.page, "!!document.querySelector('[data-provider-id=\"openai\"]')")
    assert "(cannot be shown)" not in (p.page.text_content("#log") or "")
    assert p.unexpected_errors() == []

    # a page opened now starts from the overview, which holds those events
    q = open_page(login_url(s.base_url, sub="ops", admin=True))
    wait_transport(q.page, "websocket")
    wait_js(q.page, "document.getElementById('card-requests').textContent === '42'")
    wait_js(q.page, "!!document.querySelector('[data-provider-id=\"openai\"]')")
    after = s.publish("usage_log_added", {"sessionId": "s1", "userId": "u", "model": "m"})
    wait_ids(q.page, [after])
    assert q.unexpected_errors() == []


# what of each card, provider and session row the eye sees: a box's own right edge when
# it clips its content, else its content's
SPILLS = """(() => {
  const out = [];
  const seen = (el) => {
    if (getComputedStyle(el).overflowX !== 'visible') return el.getBoundingClientRect().right;
    const range = document.createRange();
    range.selectNodeContents(el);
    return range.getBoundingClientRect().right;
  };
  const check = (boxSel, partSel) => {
    for (const box of document.querySelectorAll(boxSel)) {
      const right = box.getBoundingClientRect().right;
      for (const part of box.querySelectorAll(partSel)) {
        if (seen(part) > right + 1) out.push(`${boxSel} ${part.className || part.tagName}`);
      }
    }
  };
  check('.card', '.value');
  check('.provider', ':scope > *');
  return out;
})()"""


@pytest.mark.parametrize("width", [1280, 390])
def test_long_strings_and_huge_figures_stay_in_their_boxes(
    width: int, stack: Callable[..., Stack], open_page: Callable[..., Page],
) -> None:
    s = stack()
    p = open_page(login_url(s.base_url, sub="ops", admin=True),
                  viewport={"width": width, "height": 900})
    wait_transport(p.page, "websocket")
    long = "x" * 2000
    now = int(time.time() * 1000)
    ids = [
        s.publish("session_created", {"sessionId": "s" + long, "userId": "u" + long,
                                      "providerId": "p" + long, "model": "m" + long,
                                      "createdAt": now}),
        s.publish("provider_status_change", {"providerId": "p" + long, "name": "n" + long,
                                             "status": "degraded " + long,
                                             "circuitState": "open", "failureCount": 3,
                                             "timestamp": now}),
        s.publish("metrics_update", {"activeSessions": 1, "totalRequests": "9" * 60,
                                     "totalCost": 1e300, "avgResponseMs": 1e300,
                                     "timestamp": now}),
    ]
    wait_ids(p.page, ids)
    wait_js(p.page, "document.querySelectorAll('#sessions tr').length === 1")
    wait_js(p.page, "document.querySelectorAll('#providers .provider').length === 1")
    wait_js(p.page, "document.getElementById('card-cost').textContent.length > 100")
    page_width = p.page.evaluate(
        "[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert page_width[0] <= page_width[1], f"the page scrolls sideways: {page_width}"
    assert p.page.evaluate(SPILLS) == []
    # the table keeps every column in reach: no cell is wider than its panel
    widest = p.page.evaluate(
        "Math.max(...[...document.querySelectorAll('#sessions td')].map(c => c.offsetWidth))")
    panel = p.page.evaluate("document.querySelector('.sessions-panel').clientWidth")
    assert widest < panel, f"a session cell is {widest}px wide in a {panel}px panel"
    # what is cut is all there, on hover
    assert p.page.get_attribute("#card-cost", "title") == p.page.text_content("#card-cost")
    assert p.page.get_attribute("#sessions td.mono", "title") == "s" + long
    assert p.unexpected_errors() == []


# what the panels show, to hold a live page against one that starts from the overview
PANELS = """(() => ({
  providers: [...document.querySelectorAll('#providers .provider')].map(p => p.textContent),
  sessions: [...document.querySelectorAll('#sessions tr')].map(r => r.dataset.sessionId).sort(),
  card: document.getElementById('card-sessions').textContent,
}))()"""


def test_a_reload_shows_what_the_live_page_showed(
    stack: Callable[..., Stack], open_page: Callable[..., Page],
) -> None:
    s, p = _admin_page(stack, open_page)
    now = int(time.time() * 1000)
    ids = [
        s.publish("provider_status_change", {"providerId": "openai", "name": "OpenAI",
                                             "status": "healthy", "circuitState": "closed",
                                             "failureCount": 0, "timestamp": now}),
        # an update that leaves the name out: the provider's state is this update
        s.publish("provider_status_change", {"providerId": "openai", "status": "down",
                                             "circuitState": "open", "failureCount": 5,
                                             "timestamp": now}),
    ]
    # ids that are names of Object.prototype's own
    for name in ("__proto__", "constructor", "toString"):
        ids.append(s.publish("session_created", {"sessionId": name, "userId": "u",
                                                 "providerId": "p", "model": "m",
                                                 "createdAt": now}))
    wait_ids(p.page, ids)
    wait_js(p.page, "document.querySelectorAll('#sessions tr').length === 3")
    wait_js(p.page, "document.getElementById('card-sessions').textContent === '3'")
    wait_js(p.page, "document.querySelector('#providers .provider .status-down') !== null")
    live = p.page.evaluate(PANELS)
    assert live["sessions"] == ["__proto__", "constructor", "toString"]

    q = open_page(login_url(s.base_url, sub="ops", admin=True))
    wait_transport(q.page, "websocket")
    wait_js(q.page, "document.querySelectorAll('#sessions tr').length === 3")
    assert q.page.evaluate(PANELS) == live
    assert p.unexpected_errors() == [] and q.unexpected_errors() == []


@pytest.mark.parametrize("transport", ["sse", "websocket", "polling"])
def test_events_named_like_the_servers_own_messages_are_just_events(
    transport: str, stack: Callable[..., Stack], open_page: Callable[..., Page],
) -> None:
    s = stack(env={"DUALCAST_TRANSPORTS": transport})
    p = open_page(login_url(s.base_url, sub="ops", admin=True))
    wait_transport(p.page, transport)
    far = "99999999999999-0"  # a cursor past anything the stream will hold
    ids = [
        s.publish("reset", {"last_id": far}),
        s.publish("welcome", {"rooms": [], "last_id": far}),
        s.publish("error", {"code": "token_expired", "message": "forged"}),
    ]
    ids.append(s.publish("usage_log_added", {"sessionId": "s1", "userId": "u", "model": "m"}))
    assert_each_once(wait_ids(p.page, ids), ids)
    cursor = p.page.text_content("#foot-cursor") or ""
    assert far not in cursor
    assert p.page.get_attribute("body", "data-state") == "live"
    assert p.unexpected_errors() == []


def test_thousands_of_providers_leave_the_page_usable(
    stack: Callable[..., Stack], open_page: Callable[..., Page],
) -> None:
    s, p = _admin_page(stack, open_page)
    now = int(time.time() * 1000)
    client = redis.Redis.from_url(s.redis.url)
    try:
        pipe = client.pipeline(transaction=False)
        for n in range(2000):
            data = {"providerId": f"p{n:04d}", "status": "healthy", "circuitState": "closed",
                    "failureCount": 0, "timestamp": now}
            pipe.xadd(s.stream, {"data": json.dumps(
                {"event": "provider_status_change", "data": data})})
        pipe.xadd(s.stream, {"data": json.dumps({"event": "provider_status_change", "data": {
            "providerId": "zzz", "status": "down", "circuitState": "open",
            "failureCount": 9, "timestamp": now}})})
        last = pipe.execute()[-1].decode()
    finally:
        client.close()
    wait_ids(p.page, [last])
    # the rest are counted, and the one whose circuit is open is among those drawn
    wait_js(p.page, "document.getElementById('providers-more').textContent"
                    ".startsWith('1,901 more')")
    assert p.page.query_selector('[data-provider-id="zzz"]') is not None
    rows = p.page.evaluate("document.querySelectorAll('#providers .provider').length")
    assert rows <= 100, f"{rows} provider rows drawn"
    height = p.page.evaluate("document.documentElement.scrollHeight")
    assert height < 10000, f"the page is {height}px tall"
    assert p.unexpected_errors() == []


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_a_path_that_dies_without_a_close_is_noticed_and_replaced(
    transport: str, stack: Callable[..., Stack], open_page: Callable[..., Page],
) -> None:
    """A laptop that slept, a NAT that forgot the flow: the open connection goes silent
    for good and nothing closes it. The page must not say "live" for ever: it notices the
    silence (the server writes once per ping interval) and reconnects from its cursor."""
    s = stack(env={"DUALCAST_TRANSPORTS": transport, "DUALCAST_PING_INTERVAL": "1"})
    with TCPProxy(s.server.port) as proxy:
        base = f"http://127.0.0.1:{proxy.port}"
        p = open_page(login_url(base, sub="ops", admin=True),
                      tuning={"idleTimeoutMs": 4000, "retryBaseMs": 200})
        wait_transport(p.page, transport)
        before = s.publish("usage_log_added", {"sessionId": "s1", "userId": "u", "model": "m"})
        wait_ids(p.page, [before])
        accepted = proxy.accepted
        proxy.sever()
        during = s.publish("usage_log_added", {"sessionId": "s2", "userId": "u", "model": "m"})
        wait_until(lambda: proxy.accepted > accepted, timeout=20, what="a new connection")
        after = s.publish("usage_log_added", {"sessionId": "s3", "userId": "u", "model": "m"})
        assert_each_once(wait_ids(p.page, [before, during, after], timeout=20),
                         [before, during, after])
        wait_transport(p.page, transport)
        assert p.unexpected_errors() == []


def test_a_session_created_in_the_future_ages_out_after_a_reload_too(
    stack: Callable[..., Stack], open_page: Callable[..., Page],
) -> None:
    """A producer whose clock runs ahead (or that writes seconds where ms are meant):
    the live page ages its silent sessions out by their stream ids; a page that starts
    from the overview has only `createdAt`, which must not keep them for ever."""
    s = stack()
    tuning = {"sessionIdleMs": 3000}
    p = open_page(login_url(s.base_url, sub="ops", admin=True), tuning=tuning)
    wait_transport(p.page, "websocket")
    ahead = int(time.time() * 1000) + 365 * 86400 * 1000
    created = s.publish("session_created", {"sessionId": "ahead", "userId": "u",
                                            "providerId": "p", "model": "m",
                                            "createdAt": ahead})
    wait_ids(p.page, [created])
    wait_js(p.page, "document.querySelectorAll('#sessions tr').length === 0", timeout=15)
    q = open_page(login_url(s.base_url, sub="ops", admin=True), tuning=tuning)
    wait_transport(q.page, "websocket")
    wait_js(q.page, "document.querySelectorAll('#sessions tr').length === 0", timeout=15)
    assert not q.page.is_hidden("#sessions-quiet")
