"""dualcast.js on a page of ANOTHER origin, in a real Chromium: docs/examples as they are.

The example pages are served by a second HTTP server on its own port (a second
origin); they import `dualcast.js` from the dualcast server with `<script
type="module">` and connect to it (directly or through a real nginx in a fault
mode), authenticating with a token. The server lists the page's origin in
DUALCAST_ALLOWED_ORIGINS, except where the point is that it does not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.conftest import token
from tests.e2e.conftest import Page, Stack, assert_each_once
from tests.harness.nginx import NginxProcess
from tests.harness.pages import page_servers
from tests.harness.procs import ROOT
from tests.harness.waits import wait_until

pytestmark = pytest.mark.browser

EXAMPLES = ROOT / "docs" / "examples"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """The page server's access log is noise in a test's output."""


@pytest.fixture
def page_origin() -> Iterator[Callable[[], str]]:
    """Factory: a static server of docs/examples on a free loopback port; its origin."""
    with page_servers() as start:
        yield lambda: start(functools.partial(QuietHandler, directory=str(EXAMPLES)))


def shown_ids(page: Any, rows: str) -> list[str]:
    return page.eval_on_selector_all(rows, "rows => rows.map(r => r.dataset.eventId)")


def wait_shown(page: Any, rows: str, ids: list[str], timeout: float = 20) -> list[str]:
    wanted = set(ids)

    def shown() -> list[str] | None:
        got = shown_ids(page, rows)
        return got if wanted <= set(got) else None

    return wait_until(shown, timeout=timeout, interval=0.1, what=f"ids {sorted(wanted)}")


def example_url(origin: str, page: str, **params: str) -> str:
    return f"{origin}/{page}?{urlencode(params)}"


def publish_some(s: Stack, n: int) -> list[str]:
    return [s.publish("usage_log_added", {"n": i}) for i in range(n)]


def test_example_page_on_another_origin_goes_live_on_websocket(
    stack: Callable[..., Stack], open_page: Callable[..., Page],
    page_origin: Callable[[], str],
) -> None:
    origin = page_origin()
    s = stack(env={"DUALCAST_ALLOWED_ORIGINS": origin})
    p = open_page(example_url(origin, "index.html", server=s.base_url,
                              token=token("ops", admin=True)))
    p.page.wait_for_selector('body[data-transport="websocket"][data-state="live"]',
                             state="attached", timeout=20000)
    ids = publish_some(s, 5)
    assert_each_once(wait_shown(p.page, "#events [data-event-id]", ids), ids)
    assert p.unexpected_errors() == []


@pytest.mark.parametrize(("mode", "transport"), [("no-websocket", "sse"), ("buffering", "polling")])
def test_example_page_through_a_faulty_proxy_falls_back(
    mode: str, transport: str, stack: Callable[..., Stack], open_page: Callable[..., Page],
    page_origin: Callable[[], str], nginx: Callable[..., NginxProcess],
) -> None:
    """Through nginx that refuses WebSocket: SSE; through one that buffers: polling.

    SSE and polls from another origin work only with CORS (preflight included: the
    token and Last-Event-ID are headers no simple request may carry).
    """
    origin = page_origin()
    s = stack(env={"DUALCAST_ALLOWED_ORIGINS": origin})
    proxy = nginx(s.server.port, mode)
    # the module, too, comes through nginx (which serves it from static/ with ACAO *)
    p = open_page(example_url(origin, "index.html", server=proxy.url,
                              token=token("ops", admin=True)))
    p.page.wait_for_selector(f'body[data-transport="{transport}"][data-state="live"]',
                             state="attached", timeout=30000)
    ids = publish_some(s, 8)
    assert_each_once(wait_shown(p.page, "#events [data-event-id]", ids), ids)
    assert p.page.get_attribute("body", "data-transport") == transport
    # the refused upgrade and the held-back stream are the browser's own console lines
    assert p.unexpected_errors() == []


def test_embed_snippet_in_an_app_page(
    stack: Callable[..., Stack], open_page: Callable[..., Page],
    page_origin: Callable[[], str],
) -> None:
    origin = page_origin()
    s = stack(env={"DUALCAST_ALLOWED_ORIGINS": origin})
    p = open_page(example_url(origin, "embed.html", server=s.base_url,
                              token=token("456", rooms=["ops"]), rooms="ops"))
    p.page.wait_for_selector('#feed[data-transport="websocket"][data-state="live"]',
                             state="attached", timeout=20000)
    mine = s.publish("usage_log_added", {"n": 1}, rooms=["ops"])
    other = s.publish("usage_log_added", {"n": 2}, rooms=["admin"])
    public = s.publish("usage_log_added", {"n": 3})
    got = wait_shown(p.page, "#feed [data-event-id]", [mine, public])
    assert_each_once(got, [mine, public])
    assert other not in got, "the embed joined only the rooms it asked for"
    assert p.unexpected_errors() == []


def test_an_origin_not_on_the_list_is_refused_and_gets_nothing(
    stack: Callable[..., Stack], open_page: Callable[..., Page],
    page_origin: Callable[[], str],
) -> None:
    listed, unlisted = page_origin(), page_origin()
    s = stack(env={"DUALCAST_ALLOWED_ORIGINS": listed})
    params = {"server": s.base_url, "token": token("ops", admin=True)}
    refused = open_page(example_url(unlisted, "index.html", **params))
    allowed = open_page(example_url(listed, "index.html", **params))
    allowed.page.wait_for_selector('body[data-state="live"]', state="attached", timeout=20000)
    # every transport tried and refused: the page ends up offline on the last one
    refused.page.wait_for_selector('body[data-transport="polling"][data-state="offline"]',
                                   state="attached", timeout=30000)
    ids = publish_some(s, 3)
    # the listed page shows them; by then the refused one would have them too
    assert_each_once(wait_shown(allowed.page, "#events [data-event-id]", ids), ids)
    assert shown_ids(refused.page, "#events [data-event-id]") == []
    assert refused.page.get_attribute("body", "data-state") != "live"
    assert s.gauge("websocket") == 1 and s.gauge("sse") == 0
