"""Cross-site attacks on a signed-in dashboard, in a real Chromium.

The attacker's pages are served from ANOTHER PORT of the same host (127.0.0.1),
which is the same *site*: SameSite=Strict does not keep the victim's cookie off
its requests, so only the server's own checks can refuse them. A second attacker
origin, http://localhost:<port>, is a different site (the cookie stays home) for
the login-link case. Each attack is watched where a user would notice it: the
stream, the victim's session, the login screen, the framed page.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from dualcast.headers import CONTENT_SECURITY_POLICY
from tests.conftest import token
from tests.e2e.conftest import Page, Stack, login_url, wait_ids, wait_transport
from tests.harness.pages import QuietLog, send_html
from tests.harness.waits import wait_until

pytestmark = pytest.mark.timeout(120)

ATTACKER_TOKEN = token("mallory", publish=True)
FORGED = '{"event":"forged","data":{"x":"'  # a text/plain form field name ...
FORGED_TAIL = '"},"rooms":[]}'  # ... and value: name=value is valid JSON

# Records every securitypolicyviolation the page sees (the console has them too).
CSP_WATCH = """
window.__csp = [];
document.addEventListener('securitypolicyviolation',
  (e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


def attacker_pages(target: str) -> dict[str, str]:
    """Hostile pages aimed at the dashboard at `target`."""
    return {
        "/form-publish": f"""<!doctype html><form method="post" action="{target}/api/publish"
            enctype="text/plain"><input type="hidden" name='{FORGED}' value='{FORGED_TAIL}'>
            </form><script>document.forms[0].submit()</script>""",
        "/fetch-publish": f"""<!doctype html><script>
            fetch("{target}/api/publish", {{method: "POST", mode: "no-cors",
              credentials: "include", headers: {{"Content-Type": "text/plain"}},
              body: JSON.stringify({{event: "forged", data: {{via: "fetch"}}, rooms: []}})}})
              .then(() => {{ document.title = "sent"; }}, () => {{ document.title = "failed"; }});
            </script>""",
        "/logout": f"""<!doctype html><form method="post" action="{target}/api/logout"></form>
            <script>document.forms[0].submit()</script>""",
        "/login-link": f"""<!doctype html><script>
            location.href = "{target}/?token={ATTACKER_TOKEN}";</script>""",
        "/frame": f"""<!doctype html><iframe id="victim" src="{target}/"
            width="800" height="600"></iframe>""",
    }


class AttackerSite:
    """An HTTP server of the attacker's own on a free loopback port (a real socket)."""

    def __init__(self, target: str) -> None:
        pages = attacker_pages(target)

        class Handler(QuietLog, BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pages.get(self.path.split("?")[0])
                if body is None:
                    self.send_error(404)
                    return
                send_html(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}"

    def __enter__(self) -> AttackerSite:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def victim(stack: Callable[..., Stack], open_page: Callable[..., Page]) -> tuple[Stack, Page]:
    """A dashboard signed in with the cookie as an admin (who may publish), live."""
    dash = stack()
    page = open_page(login_url(dash.base_url, sub="victim", admin=True))
    page.page.context.add_init_script(CSP_WATCH)
    page.page.reload()
    wait_transport(page.page, "websocket")
    return dash, page


@pytest.fixture
def attacker(victim: tuple[Stack, Page]) -> Iterator[AttackerSite]:
    with AttackerSite(victim[0].base_url) as site:
        yield site


def events_in_stream(dash: Stack) -> list[str]:
    """Every event name in the log, read with a producer's Bearer token (no cookie)."""
    answer = httpx.get(dash.base_url + "/api/events",
                       params={"after": "0", "timeout": "0", "token": token("auditor", admin=True)},
                       timeout=10)
    assert answer.status_code == 200, answer.text
    return [e["event"] for e in answer.json()["events"]]


def signed_in_as(page: Any) -> str | None:
    me = page.evaluate("fetch('/api/me', {cache: 'no-store'}).then((r) => r.json())")
    return None if me.get("anonymous") else str(me["sub"])


def attack(page: Any, url: str, path: str) -> int:
    """Open an attacker page in the victim's browser; the status the dashboard answered."""
    with page.expect_response(lambda r: path in r.url, timeout=20_000) as answer:
        page.goto(url)
    return int(answer.value.status)


def test_a_same_site_page_cannot_publish_or_sign_out_with_the_cookie(
    victim: tuple[Stack, Page], attacker: AttackerSite
) -> None:
    dash, dashboard = victim
    hostile = dashboard.page.context.new_page()
    assert attack(hostile, attacker.url() + "/form-publish", "/api/publish") == 403
    assert "cross_site" in hostile.content()  # what the form's navigation shows
    assert attack(hostile, attacker.url() + "/fetch-publish", "/api/publish") == 403
    assert attack(hostile, attacker.url() + "/logout", "/api/logout") == 403
    assert "forged" not in events_in_stream(dash)
    assert signed_in_as(dashboard.page) == "victim"

    # the dashboard itself, same origin, still publishes with the cookie and signs out
    status = dashboard.page.evaluate("""fetch('/api/publish', {method: 'POST',
        headers: {'Content-Type': 'application/json'},
        body: JSON.stringify({event: 'from_dashboard', data: {ok: true}, rooms: []})})
        .then(async (r) => [r.status, (await r.json()).id])""")
    assert status[0] == 202
    wait_ids(dashboard.page, [status[1]])
    assert events_in_stream(dash).count("from_dashboard") == 1
    dashboard.page.click("#logout")
    dashboard.page.wait_for_selector('#login[data-reason="signed-out"]', state="visible")
    assert signed_in_as(dashboard.page) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"], ids=["same-site", "cross-site"])
def test_a_login_link_from_another_page_asks_before_swapping_the_session(
    victim: tuple[Stack, Page], attacker: AttackerSite, host: str
) -> None:
    _, dashboard = victim
    page = dashboard.page
    page.goto(attacker.url(host) + "/login-link")
    page.wait_for_selector('#login[data-reason="switch"]', state="visible", timeout=20_000)
    assert "mallory" in page.inner_text("#login-reason")
    assert "victim" in page.inner_text("#login-reason")
    assert "token=" not in page.url and "login_confirm" not in page.url
    assert signed_in_as(page) == "victim"  # nothing swapped while the question is open

    page.click("#login-switch-no")
    wait_transport(page, "websocket")
    assert signed_in_as(page) == "victim"

    # the person may still switch on purpose
    page.goto(attacker.url(host) + "/login-link")
    page.wait_for_selector('#login[data-reason="switch"]', state="visible", timeout=20_000)
    page.click("#login-switch-yes")
    wait_until(lambda: signed_in_as(page) == "mallory", timeout=20, what="the switch to mallory")


def test_a_login_link_in_a_browser_with_no_session_signs_in_at_once(
    victim: tuple[Stack, Page], attacker: AttackerSite, open_page: Callable[..., Page]
) -> None:
    fresh = open_page(attacker.url("localhost") + "/login-link")
    wait_transport(fresh.page, "websocket")
    assert signed_in_as(fresh.page) == "mallory"
    assert not fresh.unexpected_errors()


def test_another_page_cannot_frame_the_dashboard(
    victim: tuple[Stack, Page], attacker: AttackerSite
) -> None:
    _, dashboard = victim
    hostile = dashboard.page.context.new_page()
    console: list[str] = []
    hostile.on("console", lambda m: console.append(m.text))
    hostile.goto(attacker.url() + "/frame", wait_until="load")
    wait_until(lambda: any("frame-ancestors" in line or "X-Frame-Options" in line
                           for line in console), timeout=20, what="Chromium refusing the frame")
    framed = [f for f in hostile.frames if f != hostile.main_frame]
    assert framed, "the attacker page has no iframe"
    assert not framed[0].url.startswith(dashboard.page.url.rstrip("/")), framed[0].url
    for frame in framed:
        assert frame.query_selector("#dashboard") is None


def test_the_dashboard_runs_under_its_csp_without_a_violation(
    victim: tuple[Stack, Page]
) -> None:
    dash, dashboard = victim
    page = dashboard.page
    response = page.reload()
    assert response is not None
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    wait_transport(page, "websocket")
    ids = [dash.publish("usage_log_added", {"n": n}) for n in range(3)]
    wait_ids(page, ids)
    assert page.evaluate("window.__csp") == []
    violations = [e for e in dashboard.errors if "Content Security Policy" in e]
    assert not violations, violations
    assert not dashboard.unexpected_errors(), dashboard.unexpected_errors()
