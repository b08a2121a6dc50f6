"""Fixtures for the dashboard in a real Chromium: the browser, a stack to point it at, helpers.

Chromium is Debian's `/usr/bin/chromium`, driven by Playwright for Python through
`executable_path` (never `playwright install`). Without it the tests skip with a
loud reason, and fail when CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import token
from tests.harness.nginx import NginxProcess, require_nginx
from tests.harness.procs import ROOT, DualcastProcess, RedisProcess
from tests.harness.tools import missing
from tests.harness.waits import wait_until

CHROMIUM = os.environ.get("DUALCAST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"

# Console noise a browser makes by itself when a transport is refused or a 401 is the
# expected answer; anything else on the console is a bug in the page.
EXPECTED_CONSOLE = re.compile(
    r"WebSocket connection to .* failed|Failed to load resource: the server responded with a "
    r"status of (401|403)|net::ERR_ABORTED"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium per module; every test opens its own contexts.

    Module scope, not session: Playwright's sync API owns an event loop while it runs,
    and the async tests of other modules should not share a session with it.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[test]')")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        missing(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as pw:
        try:
            instance = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
        except Exception as exc:  # a broken install: say what Chromium said
            missing(f"Chromium at {CHROMIUM} does not start: {exc}")
        yield instance
        instance.close()


@dataclass
class Page:
    """A Playwright page plus what its console said."""

    page: Any
    errors: list[str] = field(default_factory=list)

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not EXPECTED_CONSOLE.search(e)]


@dataclass
class Stack:
    """A dualcast instance (and maybe nginx) with a stream of this test's own."""

    server: DualcastProcess
    base_url: str
    stream: str
    redis: RedisProcess
    published: list[str] = field(default_factory=list)

    def publish(self, event: str = "usage_log_added", data: Any = None,
                rooms: list[str] | None = None) -> str:
        """POST /api/publish with a producer token; returns the stream id."""
        body = {"event": event, "data": data if data is not None else {"n": len(self.published)},
                "rooms": rooms or []}
        response = httpx.post(
            self.server.url + "/api/publish", json=body, timeout=10,
            headers={"Authorization": f"Bearer {token('producer', publish=True)}"},
        )
        assert response.status_code == 202, response.text
        entry_id = str(response.json()["id"])
        self.published.append(entry_id)
        return entry_id

    def gauge(self, transport: str) -> float:
        text = httpx.get(self.server.url + "/metrics", timeout=5).text
        match = re.search(
            rf'^dualcast_connections\{{transport="{transport}"\}} ([0-9.e+-]+)$', text, re.M
        )
        assert match, f"no dualcast_connections gauge for {transport} in /metrics"
        return float(match.group(1))


@pytest.fixture
def stack(
    redis_server: RedisProcess, dualcast: Callable[..., DualcastProcess]
) -> Callable[..., Stack]:
    """Factory: a dualcast on the session's redis, with a stream key of this test's own."""

    def start(env: dict[str, str] | None = None, args: list[str] | None = None,
              stream: str | None = None) -> Stack:
        stream = stream or f"dash-{uuid.uuid4().hex[:12]}"
        server = dualcast(redis_server.url, env={"DUALCAST_STREAM": stream, **(env or {})},
                          args=args)
        return Stack(server=server, base_url=server.url, stream=stream, redis=redis_server)

    return start


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[..., Page]]:
    """Factory: a page in a context (a new one unless given), closed when the test ends."""
    contexts: list[Any] = []

    def new_context(tuning: dict[str, int] | None = None, **options: Any) -> Any:
        options.setdefault("viewport", {"width": 1280, "height": 900})
        context = browser.new_context(**options)
        if tuning:
            # timing overrides the page reads at start (see static/app.js tuning())
            literal = json.dumps(json.dumps(tuning))
            context.add_init_script(f"localStorage.setItem('dualcast.tuning', {literal})")
        contexts.append(context)
        return context

    def open_(url: str, context: Any = None, **options: Any) -> Page:
        ctx = context or new_context(**options)
        page = ctx.new_page()
        wrapped = Page(page)
        page.on("console", lambda m: wrapped.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: wrapped.errors.append(f"pageerror: {e}"))
        page.goto(url)
        return wrapped

    open_.new_context = new_context  # type: ignore[attr-defined]
    yield open_
    for context in contexts:
        context.close()


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[..., NginxProcess]]:
    """Factory: a real nginx in front of one dualcast, in a mode; stopped at the end."""
    started: list[NginxProcess] = []

    def start(upstream_port: int, mode: str) -> NginxProcess:
        require_nginx()
        proc = NginxProcess(tmp_path / f"nginx{len(started)}", [upstream_port], mode=mode)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


def login_url(base: str, **claims: Any) -> str:
    """The cookie login link: GET /?token=… sets the HttpOnly cookie and redirects to /."""
    return f"{base}/?token={token(**claims)}"


def wait_transport(page: Any, transport: str, state: str = "live", timeout: float = 30) -> None:
    """Wait until <body> says it is `state` on `transport` (the DOM contract)."""
    page.wait_for_selector(
        f'body[data-transport="{transport}"][data-state="{state}"]',
        timeout=timeout * 1000, state="attached",
    )


def wait_js(page: Any, expression: str, timeout: float = 30) -> None:
    """Wait until a JS expression is truthy in the page.

    Not Playwright's wait_for_function: its polling evaluates the expression with
    eval() inside the page, which the dashboard's CSP (script-src 'self') forbids.
    page.evaluate goes through the DevTools protocol, which the CSP does not govern.
    """
    wait_until(lambda: bool(page.evaluate(expression)), timeout=timeout, interval=0.1,
               what=f"JS: {expression}")


def log_ids(page: Any) -> list[str]:
    """Every data-event-id in the event log, in DOM order (duplicates kept)."""
    return page.eval_on_selector_all(
        "#log [data-event-id]", "rows => rows.map(r => r.dataset.eventId)"
    )


def wait_ids(page: Any, ids: list[str], timeout: float = 20) -> list[str]:
    """Wait until every id is in the log; return the log's ids."""
    wanted = set(ids)

    def shown() -> list[str] | None:
        got = log_ids(page)
        return got if wanted <= set(got) else None

    return wait_until(shown, timeout=timeout, interval=0.1, what=f"event ids {sorted(wanted)}")


def assert_each_once(ids_in_log: list[str], published: list[str]) -> None:
    """Each published id appears exactly once in the log."""
    counts: dict[str, int] = {}
    for entry in ids_in_log:
        counts[entry] = counts.get(entry, 0) + 1
    missing = [i for i in published if counts.get(i, 0) == 0]
    twice = {i: c for i, c in counts.items() if c > 1}
    assert not missing, f"never shown: {missing}"
    assert not twice, f"shown more than once: {twice}"


def artifact(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name
