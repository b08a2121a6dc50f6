"""The README's screenshot tour, taken from `dualcast serve --demo` as the quick start runs it.

The memory engine (no Redis), the demo at its normal pace, a real Chromium signed in
with an admin link: what a newcomer sees in the first minute, on a desktop and on a
phone. Each run asserts what the pictures must show and writes them to test-artifacts/;
with DUALCAST_SCREENSHOTS=docs it also replaces docs/tour-*.png, the committed ones.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Page, artifact, login_url, wait_js, wait_transport
from tests.harness.procs import ROOT, DualcastProcess
from tests.harness.waits import wait_until

pytestmark = pytest.mark.browser

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
CHART_FITS = (
    "(() => { const s = document.getElementById('rpm-chart');"
    " return s.viewBox.baseVal.width === Math.round(s.clientWidth); })()"
)


def shot(page: Any, name: str, full_page: bool = False) -> Path:
    """A screenshot into test-artifacts/, copied to docs/ when asked to."""
    path = artifact(name)
    page.screenshot(path=str(path), full_page=full_page)
    if os.environ.get("DUALCAST_SCREENSHOTS") == "docs":
        (ROOT / "docs" / name).write_bytes(path.read_bytes())
    return path


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def count(page: Any, selector: str) -> int:
    return int(page.evaluate(f"document.querySelectorAll({selector!r}).length"))


def test_the_screenshot_tour(dualcast: Callable[..., DualcastProcess],
                             open_page: Callable[..., Page]) -> None:
    server = dualcast(None, args=["--demo"])  # the quick start: memory engine, the demo
    p = open_page(login_url(server.url, sub="admin", admin=True), color_scheme="dark",
                  viewport=DESKTOP)
    page = p.page
    wait_transport(page, "websocket")

    # the first minute's story: every provider, sessions, requests, and an incident
    wait_until(lambda: count(page, "#providers li") == 5, timeout=30, what="five providers")
    wait_until(lambda: count(page, "#log [data-event]") >= 25, timeout=60, interval=0.2,
               what="25 events in the log")
    wait_until(lambda: count(page, "#providers .status-degraded, #providers .status-down"),
               timeout=90, interval=0.5, what="a provider incident (the demo starts one early)")
    rows = count(page, "#sessions tr")
    assert rows >= 1 and page.text_content("#card-sessions") == str(rows)
    assert page.text_content("#card-requests") not in ("", "—")
    bars = page.eval_on_selector_all("#rpm-chart rect.bar",
                                     "bs => bs.map(b => Number(b.getAttribute('height')))")
    assert max(bars) > 0, "no requests in the chart"
    assert page.is_hidden("#log-down") and page.is_hidden("#notice")
    wait_js(page, CHART_FITS)
    desktop = shot(page, "tour-desktop.png", full_page=True)  # down to the event log

    page.emulate_media(color_scheme="light")
    light = shot(page, "tour-light.png")
    page.emulate_media(color_scheme="dark")

    page.set_viewport_size(PHONE)
    wait_js(page, CHART_FITS)  # the chart redraws for its new width
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page scrolls sideways on a phone ({width}px)"
    phone = shot(page, "tour-phone.png")

    assert png_size(desktop)[0] == DESKTOP["width"] and png_size(desktop)[1] > DESKTOP["height"]
    assert png_size(light) == (DESKTOP["width"], DESKTOP["height"])
    assert png_size(phone) == (PHONE["width"], PHONE["height"])
    assert p.unexpected_errors() == []
