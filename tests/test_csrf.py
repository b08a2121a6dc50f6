"""Cookie-authenticated writes only from the dashboard's own origin; JSON-only publish;
login links that would swap a session go through the login screen; page headers.

Against a real dualcast process over HTTP, with the headers a browser sends (the
same defences in a real Chromium, attacked from a page on another port, are in
tests/e2e/test_cross_site.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from urllib.parse import unquote

import httpx
import pytest

from dualcast.auth import COOKIE_NAME
from dualcast.headers import CONTENT_SECURITY_POLICY
from tests.conftest import token
from tests.harness.procs import DualcastProcess

ADMIN = token("victim", admin=True)
ATTACKER = token("mallory", publish=True)
BODY = {"event": "csrf_probe", "data": {"n": 1}, "rooms": []}


@pytest.fixture
def server(dualcast: Callable[..., DualcastProcess]) -> DualcastProcess:
    return dualcast()  # memory engine: the checks happen before the log is touched


@pytest.fixture
def http(server: DualcastProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10, follow_redirects=False) as client:
        yield client


def host_of(server: DualcastProcess) -> str:
    return f"127.0.0.1:{server.port}"


def published(http: httpx.Client) -> list[str]:
    """Event names in the log, read with a Bearer admin token (no cookie involved)."""
    answer = http.get("/api/events", params={"after": "0", "timeout": "0", "token": ADMIN})
    assert answer.status_code == 200, answer.text
    return [e["event"] for e in answer.json()["events"]]


def cookie_post(http: httpx.Client, path: str, headers: dict[str, str],
                **kwargs: object) -> httpx.Response:
    http.cookies.set(COOKIE_NAME, ADMIN)
    try:
        return http.post(path, headers=headers, **kwargs)  # type: ignore[arg-type]
    finally:
        http.cookies.clear()


def test_a_cookie_publish_from_another_origin_is_refused(
    server: DualcastProcess, http: httpx.Client
) -> None:
    other_port = f"http://127.0.0.1:{server.port + 1}"
    for headers in (
        {"Origin": other_port},
        {"Origin": "null"},
        {"Origin": f"http://{host_of(server)}", "Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        answer = cookie_post(http, "/api/publish", headers, json=BODY)
        assert answer.status_code == 403, (headers, answer.text)
        assert answer.json()["error"] == "cross_site"
    assert "csrf_probe" not in published(http)


def test_the_dashboards_own_cookie_publish_and_non_browsers_still_work(
    server: DualcastProcess, http: httpx.Client
) -> None:
    same = {"Origin": f"http://{host_of(server)}", "Sec-Fetch-Site": "same-origin"}
    assert cookie_post(http, "/api/publish", same, json=BODY).status_code == 202
    # curl or a script with the cookie: no Origin, no Sec-Fetch-Site
    assert cookie_post(http, "/api/publish", {}, json=BODY).status_code == 202
    # a producer's own credential is not a cookie: any Origin may come with it
    bearer = {"Authorization": f"Bearer {ATTACKER}", "Origin": "http://elsewhere.example"}
    assert http.post("/api/publish", headers=bearer, json=BODY).status_code == 202
    assert published(http).count("csrf_probe") == 3


def test_publish_takes_only_json(http: httpx.Client) -> None:
    bearer = {"Authorization": f"Bearer {ATTACKER}"}
    text = '{"event": "csrf_probe", "data": 1}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", None):
        headers = dict(bearer)
        if content_type:
            headers["Content-Type"] = content_type
        answer = http.post("/api/publish", content=text, headers=headers)
        assert answer.status_code == 415, (content_type, answer.text)
        assert answer.json()["error"] == "unsupported_media_type"
    charset = {**bearer, "Content-Type": "application/json; charset=utf-8"}
    assert http.post("/api/publish", content=text, headers=charset).status_code == 202
    assert published(http) == ["csrf_probe"]


def test_a_cross_site_logout_is_refused_and_the_cookie_kept(
    server: DualcastProcess, http: httpx.Client
) -> None:
    answer = cookie_post(http, "/api/logout", {"Origin": f"http://127.0.0.1:{server.port + 1}"})
    assert answer.status_code == 403 and answer.json()["error"] == "cross_site"
    assert "set-cookie" not in answer.headers
    own = cookie_post(http, "/api/logout", {"Origin": f"http://{host_of(server)}"})
    assert own.status_code == 200
    assert f'{COOKIE_NAME}=""' in own.headers["set-cookie"]


def login(http: httpx.Client, tok: str, site: str | None,
          cookie: str | None = None) -> httpx.Response:
    headers = {"Accept": "text/html"}
    if site is not None:
        headers["Sec-Fetch-Site"] = site
    if cookie is not None:
        http.cookies.set(COOKIE_NAME, cookie)
    try:
        return http.get("/", params={"token": tok}, headers=headers)
    finally:
        http.cookies.clear()


def asks_first(answer: httpx.Response, tok: str) -> bool:
    location = answer.headers["location"]
    return (answer.status_code == 303 and location.startswith("/#login_confirm=")
            and unquote(location.split("=", 1)[1]) == tok and "set-cookie" not in answer.headers)


def sets_cookie(answer: httpx.Response, tok: str) -> bool:
    return (answer.status_code == 303 and answer.headers["location"] == "/"
            and f"{COOKIE_NAME}={tok}" in answer.headers.get("set-cookie", ""))


def test_a_login_link_that_would_swap_the_session_asks_first(http: httpx.Client) -> None:
    # a page of another site: the Strict cookie is not sent, only the page can tell
    assert asks_first(login(http, ATTACKER, "cross-site"), ATTACKER)
    # a page on another port (same site): the cookie is sent and names someone else
    assert asks_first(login(http, ATTACKER, "same-site", cookie=ADMIN), ATTACKER)
    assert asks_first(login(http, ATTACKER, "none", cookie=ADMIN), ATTACKER)
    # nothing to swap, or the same person again: straight in
    assert sets_cookie(login(http, ATTACKER, "same-site"), ATTACKER)
    fresh = token("victim", admin=True, ttl=7200)
    assert sets_cookie(login(http, fresh, "same-site", cookie=ADMIN), fresh)
    # the dashboard's own login form and non-browsers are taken at their word
    assert sets_cookie(login(http, ATTACKER, "same-origin", cookie=ADMIN), ATTACKER)
    assert sets_cookie(login(http, ATTACKER, None, cookie=ADMIN), ATTACKER)


def test_every_page_answer_carries_the_security_headers(http: httpx.Client) -> None:
    answers = {
        "/": http.get("/"),
        "/app.js": http.get("/app.js"),
        "/style.css": http.get("/style.css"),
        "/index.html": http.get("/index.html"),
        "/?token= (login)": login(http, ADMIN, "same-origin"),
        "/?token= (refused)": login(http, "not-a-token", "same-origin"),
    }
    for name, answer in answers.items():
        assert answer.status_code in (200, 303), (name, answer.status_code)
        assert answer.headers.get("content-security-policy") == CONTENT_SECURITY_POLICY, name
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        assert answer.headers.get("x-frame-options") == "DENY", name
        assert answer.headers.get("x-content-type-options") == "nosniff", name
        assert answer.headers.get("referrer-policy") == "no-referrer", name
