"""CORS on the subscriber API and the browser client at /dualcast.js, against a real server.

What a browser on another origin needs (and what it must never get): its origin echoed
with `Vary: Origin`, a preflight that admits the token and Last-Event-ID headers, no
credentials, no cookie honoured; an origin not listed: 403 before anything streams.
Same-origin requests see none of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from dualcast.headers import PAGE_HEADERS
from tests.conftest import token
from tests.harness.clients import WSClient
from tests.harness.procs import DualcastProcess

LISTED = "https://app.example.com"
PATHS = ["/api/sse", "/api/events", "/api/me", "/api/overview"]


@pytest.fixture(scope="module")
def server(server_with: Callable[..., DualcastProcess]) -> DualcastProcess:
    return server_with({"DUALCAST_ALLOWED_ORIGINS": f"{LISTED},https://other.example.com"})


@pytest.fixture
def client(server: DualcastProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def get(client: httpx.Client, path: str, headers: dict[str, str]) -> httpx.Response:
    """GET that reads only the head of an endless SSE answer."""
    params = {"timeout": "0"} if path == "/api/events" else {}
    with client.stream("GET", path, headers=headers, params=params) as response:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            first = next(response.iter_bytes())
            assert b"event: welcome" in first
        else:
            response.read()
        return response


@pytest.mark.parametrize("path", PATHS)
def test_a_listed_origin_gets_its_origin_back_without_credentials(
    client: httpx.Client, path: str
) -> None:
    response = get(client, path, {"Origin": LISTED, "Authorization": f"Bearer {token('456')}"})
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == LISTED
    assert "Origin" in response.headers.get_list("vary")
    assert "access-control-allow-credentials" not in response.headers


@pytest.mark.parametrize("path", PATHS)
def test_preflight_admits_the_token_and_last_event_id(client: httpx.Client, path: str) -> None:
    response = client.options(path, headers={
        "Origin": LISTED, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization,last-event-id",
    })
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == LISTED
    allowed = {h.strip() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "last-event-id"} <= allowed
    assert "GET" in response.headers["access-control-allow-methods"]
    assert int(response.headers["access-control-max-age"]) > 0
    assert "access-control-allow-credentials" not in response.headers


@pytest.mark.parametrize("path", PATHS)
def test_an_unlisted_origin_is_refused_before_anything_streams(
    client: httpx.Client, path: str
) -> None:
    for method in ("GET", "OPTIONS"):
        response = client.request(method, path, headers={
            "Origin": "https://evil.example", "Authorization": f"Bearer {token('456')}",
        })
        assert response.status_code == 403, (method, response.text)
        assert response.json()["error"] == "bad_origin"
        assert "access-control-allow-origin" not in response.headers


def test_cross_origin_requests_authenticate_by_token_never_the_cookie(
    server: DualcastProcess, client: httpx.Client
) -> None:
    login = client.get("/", params={"token": token("ops", admin=True)}, follow_redirects=False)
    cookie = login.headers["set-cookie"].split(";")[0]
    same = client.get("/api/me", headers={"Cookie": cookie})
    assert same.json()["sub"] == "ops"
    cross = client.get("/api/me", headers={"Cookie": cookie, "Origin": LISTED})
    assert cross.status_code == 200
    assert cross.json()["anonymous"] is True, "the cookie was honoured across origins"
    bearer = client.get("/api/me", headers={"Origin": LISTED,
                                            "Authorization": f"Bearer {token('456')}"})
    assert bearer.json()["sub"] == "456"


@pytest.mark.timeout(30)
async def test_a_listed_origin_opens_a_websocket_on_its_token_never_the_cookie(
    server: DualcastProcess,
) -> None:
    """A listed page on a sibling subdomain is the same site: the browser sends the
    SameSite=Strict login cookie with its WebSocket upgrade too. It was honoured: the
    page subscribed to the visitor's rooms as the visitor (here an admin)."""
    cookie = f"dualcast_token={token('ops', admin=True)}"
    for origin, welcomed in ((LISTED, []), (server.url, ["admin", "user-ops"])):
        ws = WSClient(server.ws_url)
        await ws.connect(headers={"Cookie": cookie}, origin=origin)
        try:
            assert ws.seen.welcome is not None
            assert sorted(ws.seen.welcome["rooms"]) == welcomed, origin
        finally:
            await ws.close()
    # the browser's word that the page is this origin's own (behind a proxy that
    # rewrites Host) keeps the cookie
    ws = WSClient(server.ws_url)
    await ws.connect(headers={"Cookie": cookie, "Sec-Fetch-Site": "same-origin"},
                     origin=LISTED)
    try:
        assert ws.seen.welcome is not None
        assert sorted(ws.seen.welcome["rooms"]) == ["admin", "user-ops"]
    finally:
        await ws.close()
    ws = WSClient(server.ws_url, token=token("456"))
    await ws.connect(headers={"Cookie": cookie, "Sec-Fetch-Site": "same-site"}, origin=LISTED)
    try:
        assert ws.seen.welcome is not None
        assert ws.seen.welcome["rooms"] == ["user-456"]
    finally:
        await ws.close()


def test_same_origin_requests_carry_no_cors_headers(
    server: DualcastProcess, client: httpx.Client
) -> None:
    for headers in ({}, {"Origin": server.url}):
        response = get(client, "/api/sse", headers)
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize(("path", "kind"), [
    ("/dualcast.js", "text/javascript"), ("/dualcast.d.ts", "application/typescript"),
])
def test_the_client_is_served_to_any_origin(client: httpx.Client, path: str, kind: str) -> None:
    response = client.get(path, headers={"Origin": "https://anyone.example"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(kind)
    assert response.headers["access-control-allow-origin"] == "*"
    assert "export class Dualcast" in response.text or "declare class Dualcast" in response.text
    # the dashboard's own module: the headers of its other files (as nginx serves it),
    # nosniff above all
    for name, value in PAGE_HEADERS.items():
        assert response.headers.get(name) == value, name


# DUALCAST_ALLOWED_ORIGINS as people write it ------------------------------------------

#: A listed value as written -> the Origin a browser sends for that page.
WRITTEN = {
    "https://slash.example.com/": "https://slash.example.com",
    "https://Upper.Example.com": "https://upper.example.com",
    "https://port.example.com:443": "https://port.example.com",
    "HTTP://plain.example.com:80": "http://plain.example.com",
    "http://[0:0::1]:8080": "http://[::1]:8080",
}


@pytest.fixture(scope="module")
def written(server_with: Callable[..., DualcastProcess]) -> DualcastProcess:
    return server_with({"DUALCAST_ALLOWED_ORIGINS": ",".join(WRITTEN)}, name="written")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("origin", WRITTEN.values())
async def test_an_origin_listed_in_another_form_admits_what_the_browser_sends(
    written: DualcastProcess, origin: str
) -> None:
    """Listed with a trailing slash, capitals or its default port, an origin was
    accepted at start and then never matched: 403 bad_origin on polls and upgrades."""
    async with httpx.AsyncClient(base_url=written.url, timeout=10) as client:
        poll = await client.get("/api/events", params={"timeout": "0"},
                                headers={"Origin": origin})
    assert poll.status_code == 200, poll.text
    assert poll.headers["access-control-allow-origin"] == origin
    ws = WSClient(written.ws_url)
    await ws.connect(origin=origin)
    try:
        assert ws.seen.welcome is not None
    finally:
        await ws.close()
