"""A server that was away: the page comes back on the best transport, not the last one tried.

Falling back WebSocket -> SSE -> polling is for a path that blocks a transport. A server
that restarts (or an instance behind nginx that stops) refuses every transport alike;
when it is back the page must open a WebSocket again at once, not settle on polling and
climb up a probe at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.conftest import Page, Stack, assert_each_once, login_url, wait_ids, wait_transport
from tests.harness.nginx import NginxProcess
from tests.harness.procs import DualcastProcess, RedisProcess

pytestmark = pytest.mark.browser

# what <body> said, in order: a MutationObserver installed over DevTools (the CSP
# forbids eval in the page, not page.evaluate)
RECORD = """() => {
  window.__seen = [];
  const note = () => window.__seen.push(
    `${document.body.dataset.transport}/${document.body.dataset.state}`);
  note();
  new MutationObserver(note).observe(document.body,
    { attributes: true, attributeFilter: ['data-transport', 'data-state'] });
}"""


def first_live_after(seen: list[str], mark: int) -> str:
    lives = [s for s in seen[mark:] if s.endswith("/live")]
    assert lives, f"never live again: {seen[mark:]}"
    return lives[0]


@pytest.mark.parametrize("front", ["direct", "nginx"])
def test_a_restarted_server_is_met_on_websocket_again(
    front: str, stack: Callable[..., Stack], open_page: Callable[..., Page],
    dualcast: Callable[..., DualcastProcess], redis_server: RedisProcess,
    nginx: Callable[..., NginxProcess],
) -> None:
    """dualcast restarts on its port (direct), or the one instance behind nginx stops and
    nginx answers 502 to every transport meanwhile: back, the page is live on WebSocket
    first, with each event once."""
    s = stack()
    base = s.base_url if front == "direct" else nginx(s.server.port, "plain").url
    p = open_page(login_url(base, sub="ops", admin=True))
    page: Any = p.page
    wait_transport(page, "websocket")
    page.evaluate(RECORD)
    before = s.publish("usage_log_added", {"n": 0})
    wait_ids(page, [before])
    s.server.stop()
    page.wait_for_selector('body[data-state="offline"]', state="attached", timeout=30000)
    mark = len(page.evaluate("window.__seen"))
    s.server = dualcast(redis_server.url, env={"DUALCAST_STREAM": s.stream}, port=s.server.port)
    page.wait_for_selector('body[data-state="live"]', state="attached", timeout=40000)
    seen = page.evaluate("window.__seen")
    assert first_live_after(seen, mark) == "websocket/live", seen
    after = s.publish("usage_log_added", {"n": 1})
    assert_each_once(wait_ids(page, [before, after]), [before, after])


def test_a_tab_that_takes_over_in_an_outage_meets_the_server_on_websocket(
    stack: Callable[..., Stack], open_page: Callable[..., Page],
    dualcast: Callable[..., DualcastProcess], redis_server: RedisProcess,
) -> None:
    """The leader tab closes while the server is away and its last status said
    polling/offline: the tab that takes over starts on the transport last live, so the
    returning server is met on WebSocket, not on polling."""
    s = stack()
    first = open_page(login_url(s.base_url, sub="ops", admin=True))
    wait_transport(first.page, "websocket")
    second = open_page(s.base_url + "/", context=first.page.context)
    wait_transport(second.page, "websocket")
    before = s.publish("usage_log_added", {"n": 0})
    for p in (first, second):
        wait_ids(p.page, [before])
    roles = [p.page.text_content("#status-role") for p in (first, second)]
    assert sorted(roles) == ["", "shared"], roles
    leader, follower = (first, second) if roles[0] == "" else (second, first)
    s.server.stop()
    # the follower mirrors the leader's last word from the outage
    wait_transport(follower.page, "polling", state="offline")
    leader.page.close()
    follower.page.wait_for_selector("#status-role:text-is('')", state="attached", timeout=30000)
    follower.page.evaluate(RECORD)
    mark = len(follower.page.evaluate("window.__seen"))
    s.server = dualcast(redis_server.url, env={"DUALCAST_STREAM": s.stream}, port=s.server.port)
    follower.page.wait_for_selector('body[data-state="live"]', state="attached", timeout=40000)
    seen = follower.page.evaluate("window.__seen")
    assert first_live_after(seen, mark) == "websocket/live", seen
    after = s.publish("usage_log_added", {"n": 1})
    assert_each_once(wait_ids(follower.page, [before, after]), [before, after])
