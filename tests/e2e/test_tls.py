"""The dashboard in a real Chromium through the production nginx layout: https with
HTTP/2 on a throwaway CA, WebSocket upgraded over HTTP/1.1 beside it, and a login
cookie that is Secure.

Chromium trusts the test's certificate by its key hash only
(--ignore-certificate-errors-spki-list), not by ignoring certificate errors.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool, token
from tests.e2e.conftest import (
    CHROMIUM,
    CHROMIUM_ARGS,
    EXPECTED_CONSOLE,
    wait_transport,
)
from tests.harness.nginx import NginxProcess, require_nginx
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.tls import TlsFiles, make_throwaway_ca
from tests.harness.tools import missing

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    require_tool("openssl", "the TLS tests make a throwaway CA with it")
    return make_throwaway_ca(tmp_path / "tls")


@pytest.fixture
def https_stack(
    tmp_path: Path, tls: TlsFiles, redis_server: RedisProcess,
    dualcast: Callable[..., DualcastProcess],
) -> Iterator[NginxProcess]:
    require_nginx()
    instance = dualcast(redis_server.url, env={"DUALCAST_STREAM": f"tls-{tmp_path.name}"})
    with NginxProcess(tmp_path / "nginx", [instance.port], tls=tls) as proxy:
        yield proxy


@pytest.fixture
def pinned_browser(tls: TlsFiles) -> Iterator[Any]:
    """A Chromium that accepts exactly the test certificate, and no other."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[test]')")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        missing(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as pw:
        instance = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={tls.spki_sha256()}"],
        )
        yield instance
        instance.close()


def test_the_dashboard_over_https_http2_with_a_secure_cookie(
    https_stack: NginxProcess, pinned_browser: Any
) -> None:
    context = pinned_browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(f"{https_stack.url}/?token={token('alice', admin=True)}")
    wait_transport(page, "websocket")
    assert page.url == https_stack.url + "/"

    cookie = next(c for c in context.cookies() if c["name"] == "dualcast_token")
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    protocols = page.evaluate("""() => ({
        page: performance.getEntriesByType('navigation')[0].nextHopProtocol,
        api: performance.getEntriesByType('resource')
          .filter((e) => e.name.includes('/api/')).map((e) => e.nextHopProtocol),
    })""")
    assert protocols["page"] == "h2", protocols
    assert protocols["api"] and set(protocols["api"]) == {"h2"}, protocols
    assert not [e for e in errors if not EXPECTED_CONSOLE.search(e)], errors
    context.close()
