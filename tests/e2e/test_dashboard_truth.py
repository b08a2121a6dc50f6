"""The dashboard never contradicts itself, in a real Chromium against a real dualcast.

No red "offline" pill on the login screen, compact cards when there are no figures,
one number of live sessions on the card and in the table, and any `ts` a producer's
entry carries (huge, negative, zero, none) rendered without losing its batch.
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

pytestmark = pytest.mark.browser


def test_the_login_screen_shows_no_offline_pill(stack: Callable[..., Stack],
                                                open_page: Callable[..., Page]) -> None:
    s = stack(env={"DUALCAST_ALLOW_ANONYMOUS": "false"})
    p = open_page(s.base_url + "/")
    p.page.wait_for_selector("#login:not([hidden])", timeout=10000)
    assert p.page.get_attribute("body", "data-state") == "offline"  # the DOM contract holds
    assert p.page.is_hidden("#status"), "a red offline pill beside 'not signed in'"


def test_cards_are_compact_until_there_are_figures(stack: Callable[..., Stack],
                                                   open_page: Callable[..., Page]) -> None:
    s = stack()
    p = open_page(s.base_url + "/")  # anonymous: no metrics of anyone's
    wait_transport(p.page, "websocket")
    p.page.wait_for_selector("#cards[data-empty]", state="attached", timeout=10000)
    tall = p.page.eval_on_selector_all(".card", "cs => Math.max(...cs.map(c => c.offsetHeight))")
    assert tall <= 70, f"empty cards are {tall}px tall"
    s.publish("metrics_update", {"activeSessions": 3, "totalRequests": 10, "totalCost": 1.5,
                                 "timestamp": int(time.time() * 1000)})
    p.page.wait_for_selector("#cards:not([data-empty])", state="attached", timeout=10000)
    assert p.page.text_content("#card-requests") == "10"


def test_concurrent_sessions_card_agrees_with_the_table(stack: Callable[..., Stack],
                                                        open_page: Callable[..., Page]) -> None:
    s = stack()
    p = open_page(login_url(s.base_url, sub="ops", admin=True))
    wait_transport(p.page, "websocket")
    now = int(time.time() * 1000)
    for n in range(3):
        s.publish("session_created", {"sessionId": f"s{n}", "userId": "456",
                                      "providerId": "openai", "model": "gpt-4o",
                                      "createdAt": now})
    s.publish("session_ended", {"sessionId": "s1", "userId": "456", "providerId": "openai",
                                "durationMs": 10, "costUsd": 0.1, "status": "ok"})
    # the producer's own figure lags behind (or runs ahead of) the session events
    last = s.publish("metrics_update", {"activeSessions": 7, "totalRequests": 5,
                                        "totalCost": 1.0, "timestamp": now})
    wait_ids(p.page, [last])
    wait_js(p.page, "document.querySelectorAll('#sessions tr').length === 2")
    wait_js(p.page, "document.getElementById('card-sessions').textContent === '2'")
    assert p.page.text_content("#sessions-count") == "2"


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_an_event_with_any_ts_renders_with_the_rest_of_its_batch(
    transport: str, stack: Callable[..., Stack], open_page: Callable[..., Page],
) -> None:
    env = {} if transport == "websocket" else {"DUALCAST_TRANSPORTS": "polling"}
    s = stack(env=env)
    p = open_page(login_url(s.base_url, sub="ops", admin=True))
    wait_transport(p.page, transport)
    client = redis.Redis.from_url(s.redis.url)
    try:  # one pipeline: the entries reach the page together, as one batch
        pipe = client.pipeline(transaction=False)
        stamps = ["9223372036854775807", "-9223372036854775808", "-5", "0", None,
                  str(int(time.time() * 1000))]
        for n, stamp in enumerate(stamps):
            envelope = {"event": "usage_log_added", "data": {"n": n, "model": "m"}}
            fields = {"data": json.dumps(envelope)}
            if stamp is not None:
                fields["timestamp"] = stamp
            pipe.xadd(s.stream, fields)  # type: ignore[arg-type]
        ids = [entry.decode() for entry in pipe.execute()]
    finally:
        client.close()
    assert_each_once(wait_ids(p.page, ids), ids)
    after = s.publish("usage_log_added", {"n": 99})
    assert_each_once(wait_ids(p.page, [*ids, after]), [*ids, after])
    assert p.unexpected_errors() == []
    # the row of an entry without a usable time still reads as a time
    times = p.page.eval_on_selector_all(
        "#log [data-event-id] time", "ts => ts.map(t => t.textContent)")
    assert all(times), times


def test_each_room_label_ticks_its_own_room(stack: Callable[..., Stack],
                                            open_page: Callable[..., Page]) -> None:
    s = stack()
    p = open_page(login_url(s.base_url, sub="ops", admin=True))
    wait_transport(p.page, "websocket")
    p.page.click("#rooms-picker summary")
    for room in ("team.eu", "team:eu", "team@eu"):
        p.page.fill("#rooms-add", room)
        p.page.click("#rooms-add-btn")
    checked = ("Object.fromEntries([...document.querySelectorAll('#rooms-options input')]"
               ".map(i => [i.value, i.checked]))")
    assert {k: v for k, v in p.page.evaluate(checked).items() if k.startswith("team")} == {
        "team.eu": True, "team:eu": True, "team@eu": True}
    # a click on a room's name unticks that room, not another one named alike
    p.page.locator("label.room-option", has_text="team:eu").click(position={"x": 60, "y": 5})
    assert {k: v for k, v in p.page.evaluate(checked).items() if k.startswith("team")} == {
        "team.eu": True, "team:eu": False, "team@eu": True}
