"""Rooms as a security boundary (issue 4): who sees what, bad tokens, expiry, Origin, cookies.

Everything runs against a real `dualcast serve` process on real Redis with real
clients (websockets, httpx). The visibility matrix publishes one event per room
set and checks, per identity and per path (live WS/SSE/poll, replay, overview),
that each subscriber sees exactly what the room rule allows: never an `admin` or
`user-456` event it may not see, and nothing it may see missing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
import websockets

from dualcast.auth import mint_token
from tests.conftest import SECRET, token, token_of_length
from tests.harness.clients import Poller, SSEClient, Subscriber, Transport, WSClient, subscribe
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.waits import wait_for

ALLOWED_ORIGIN = "https://dash.example.com"

#: One event per room set: label -> rooms of the envelope.
EVENTS: dict[str, list[str]] = {
    "public": [],
    "admin": ["admin"],
    "u456": ["user-456"],
    "u789": ["user-789"],
    "teamx": ["team-x"],
    "admin_u456": ["admin", "user-456"],
}

ADMIN = token("root", admin=True)
PUBLISHER = token("producer", publish=True)
USER_456 = token("456")
USER_789 = token("789")
EXTRA = token("555", rooms=["team-x"])

#: name -> (token, rooms query, labels it must see). Written out by hand from the
#: DESIGN rule, not computed with the server's own code.
WHO: dict[str, tuple[str | None, str | None, set[str]]] = {
    "anonymous": (None, None, {"public"}),
    "user-456": (USER_456, None, {"public", "u456", "admin_u456"}),
    "user-789": (USER_789, None, {"public", "u789"}),
    "admin": (ADMIN, None, {"public", "admin", "admin_u456"}),
    "extra-rooms": (EXTRA, None, {"public", "teamx"}),
    "admin-joins-user-456": (ADMIN, "user-456", {"public", "u456", "admin_u456"}),
    "extra-names-team-x": (EXTRA, "team-x", {"public", "teamx"}),
}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def signed(payload: Any, secret: str = SECRET, alg: str = "HS256") -> str:
    """A JWT signed by hand, so claims of any type (or a non-object payload) can be made."""
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = _b64(json.dumps(payload).encode())
    digest = {"HS256": hashlib.sha256, "HS512": hashlib.sha512}[alg]
    mac = hmac.new(secret.encode(), f"{header}.{body}".encode(), digest).digest()
    return f"{header}.{body}.{_b64(mac)}"


def unsigned(payload: dict[str, Any]) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(payload).encode())}."


def _claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "456", "rooms": [], "exp": int(time.time()) + 3600, **extra}


def _tampered() -> str:
    """A user token whose payload was swapped for an admin one, signature kept."""
    head, _, sig = USER_456.split(".")
    return f"{head}.{_b64(json.dumps(_claims(admin=True)).encode())}.{sig}"


#: kind -> (token, expected error code)
BAD_TOKENS: dict[str, tuple[str, str]] = {
    "expired": (token("456", ttl=-120), "token_expired"),
    "wrong-signature": (mint_token("another-secret-" + "y" * 24, "456", admin=True),
                        "invalid_token"),
    "tampered-payload": (_tampered(), "invalid_token"),
    "alg-none": (unsigned(_claims(admin=True)), "invalid_token"),
    "alg-hs512": (signed(_claims(admin=True), alg="HS512"), "invalid_token"),
    "malformed": ("not-a-jwt", "invalid_token"),
    "three-garbage-parts": ("eyJhbGciOiJIUzI1NiJ9.@@@.###", "invalid_token"),
    "sub-not-a-string": (signed(_claims(sub=456)), "invalid_token"),
    "rooms-not-a-list": (signed(_claims(rooms="admin")), "invalid_token"),
    "admin-not-a-bool": (signed(_claims(admin="yes")), "invalid_token"),
    "publish-not-a-bool": (signed(_claims(publish=1)), "invalid_token"),
    "exp-not-a-number": (signed(_claims(exp="tomorrow")), "invalid_token"),
    "no-exp": (signed({"sub": "456", "admin": True}), "invalid_token"),
    "no-sub": (signed({"exp": int(time.time()) + 3600, "admin": True}), "invalid_token"),
    "payload-not-an-object": (signed(["admin"]), "invalid_token"),
}


@pytest.fixture(scope="module")
def server(server_with: Callable[..., DualcastProcess]) -> DualcastProcess:
    """One server for the module, on its own stream key of the session's Redis."""
    return server_with({"DUALCAST_ALLOWED_ORIGINS": ALLOWED_ORIGIN}, name="auth")


@pytest.fixture(scope="module")
def closed_server(server_with: Callable[..., DualcastProcess]) -> DualcastProcess:
    """A server with DUALCAST_ALLOW_ANONYMOUS=false (and cookies always Secure)."""
    return server_with({"DUALCAST_ALLOW_ANONYMOUS": "false", "DUALCAST_COOKIE_SECURE": "always"},
                       name="closed")


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


async def publish(base: str, event: str, data: Any, rooms: list[str] | None = None,
                  tok: str = PUBLISHER) -> str:
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        response = await client.post("/api/publish", headers=bearer(tok),
                                     json={"event": event, "data": data, "rooms": rooms or []})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def publish_set(base: str, tag: str) -> str:
    """One `session_created` per room set, then a public `marker`; returns the marker id."""
    for label, rooms in EVENTS.items():
        await publish(base, "session_created",
                      {"sessionId": f"{tag}-{label}", "tag": tag, "label": label}, rooms)
    return await publish(base, "marker", {"tag": tag})


def labels(events: list[dict[str, Any]], tag: str) -> set[str]:
    return {
        e["data"]["label"] for e in events
        if e.get("event") == "session_created" and isinstance(e.get("data"), dict)
        and e["data"].get("tag") == tag
    }


def has_marker(events: list[dict[str, Any]], tag: str) -> bool:
    return any(e.get("event") == "marker" and e.get("data") == {"tag": tag} for e in events)


def query(tok: str | None, rooms: str | None, **more: str) -> dict[str, str]:
    params = {"token": tok, "rooms": rooms, **more}
    return {k: v for k, v in params.items() if v is not None}


def assert_json_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    return dict(body)


# --- who sees what ---------------------------------------------------------------------


async def test_matrix_live_over_ws_sse_and_poll(
    server: DualcastProcess, transport: Transport,
) -> None:
    tag = uuid.uuid4().hex[:8]
    clients: dict[str, Subscriber] = {}
    try:
        for name, (tok, rooms, _) in WHO.items():
            clients[name] = await subscribe(transport, server.url, **query(tok, rooms))
        await publish_set(server.url, tag)
        for name, client in clients.items():
            await wait_for(lambda c=client: has_marker(c.seen.events, tag), 10,
                           f"{name} over {transport} to see the marker")
            assert labels(client.seen.events, tag) == WHO[name][2], name
            assert not client.seen.errors
    finally:
        for client in clients.values():
            await client.close()


async def test_matrix_replay_and_long_poll_history(server: DualcastProcess) -> None:
    """Reconnects with a cursor (WS last_event_id, SSE Last-Event-ID header and query, poll
    `after`, poll from `0` through the log) replay only what the caller may see."""
    tag = uuid.uuid4().hex[:8]
    start = await publish(server.url, "start", {"tag": tag})
    await publish_set(server.url, tag)
    for name, (tok, rooms, expected) in WHO.items():
        ws = WSClient(server.ws_url, **query(tok, rooms, last_event_id=start))
        sse_header = SSEClient(server.url, headers={"Last-Event-ID": start}, **query(tok, rooms))
        sse_query = SSEClient(server.url, None, **query(tok, rooms, last_event_id=start))
        try:
            await ws.connect()
            await sse_header.connect()
            await sse_query.connect()
            for what, seen in (("ws", ws.seen), ("sse-header", sse_header.seen),
                               ("sse-query", sse_query.seen)):
                await wait_for(lambda s=seen: has_marker(s.events, tag), 10,
                               f"{name} replay over {what}")
                assert labels(seen.events, tag) == expected, (name, what)
        finally:
            for client in (ws, sse_header, sse_query):
                await client.close()
        for after in (start, "0"):
            poller = Poller(server.url, after=after, **query(tok, rooms))
            try:
                for _ in range(50):
                    response = await poller.poll_once(timeout=0)
                    assert response.status_code == 200, response.text
                    if has_marker(poller.seen.events, tag):
                        break
                assert has_marker(poller.seen.events, tag), (name, after)
                assert labels(poller.seen.events, tag) == expected, (name, after)
            finally:
                await poller.close()


async def test_matrix_overview(server: DualcastProcess) -> None:
    tag = uuid.uuid4().hex[:8]
    await publish_set(server.url, tag)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        for name, (tok, rooms, expected) in WHO.items():
            response = await client.get("/api/overview", params=query(tok, rooms))
            assert response.status_code == 200, (name, response.text)
            sessions = response.json()["sessions"]
            seen = {s["label"] for s in sessions.values() if s.get("tag") == tag}
            assert seen == expected, name
        # Naming a forbidden room refuses the overview, as it refuses a stream.
        response = await client.get("/api/overview", params=query(USER_456, "admin"))
        assert_json_error(response, 403, "forbidden_room")


async def test_raw_producer_entries_keep_their_rooms(
    server: DualcastProcess, redis_server: RedisProcess,
) -> None:
    """Entries XADDed by other producers: a room list limits them like a published one, a
    `rooms` of the wrong type is skipped (never taken for public), null means public."""
    tag = uuid.uuid4().hex[:8]
    stream = server.extra_env["DUALCAST_STREAM"]

    def raw(label: str, **body: Any) -> None:
        data = json.dumps({"event": "session_created", "data": {"tag": tag, "label": label},
                           **body})
        redis_server.command("XADD", stream, "*", "data", data,
                             "timestamp", str(int(time.time() * 1000)))

    async with WSClient(server.ws_url) as anon, WSClient(server.ws_url, token=USER_456) as user:
        raw("admin", rooms=["admin"])
        raw("u456", rooms=["user-456"])
        raw("string-rooms", rooms="user-456")
        raw("number-rooms", rooms=7)
        raw("null-rooms", rooms=None)
        raw("empty-rooms", rooms=[])
        marker = json.dumps({"event": "marker", "data": {"tag": tag}})
        redis_server.command("XADD", stream, "*", "data", marker)
        for ws in (anon, user):
            await wait_for(lambda w=ws: has_marker(w.seen.events, tag), 10, "marker")
        # Rooms fail closed: `rooms` present but not a list of names (null included)
        # makes the entry invalid for everyone, never public.
        assert labels(anon.seen.events, tag) == {"empty-rooms"}
        assert labels(user.seen.events, tag) == {"u456", "empty-rooms"}


async def test_api_me_describes_the_caller(server: DualcastProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        anonymous = (await client.get("/api/me")).json()
        assert anonymous["anonymous"] is True and anonymous["rooms"] == []
        me = (await client.get("/api/me", headers=bearer(EXTRA))).json()
        assert me["sub"] == "555" and me["anonymous"] is False and me["admin"] is False
        assert set(me["rooms"]) == {"team-x", "user-555"}
        admin = (await client.get("/api/me", params={"token": ADMIN})).json()
        assert admin["admin"] is True and "admin" in admin["rooms"]


# --- forbidden rooms -------------------------------------------------------------------


@pytest.mark.parametrize(("tok", "rooms"), [
    (None, "user-456"), (None, "admin"), (USER_456, "admin"), (USER_456, "user-789"),
    (USER_456, "user-456,admin"), (EXTRA, "team-y"), (USER_789, "user-456"),
])
async def test_forbidden_rooms_refused_on_sse_and_poll_before_any_stream(
    server: DualcastProcess, tok: str | None, rooms: str,
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        async with client.stream("GET", "/api/sse", params=query(tok, rooms)) as response:
            await response.aread()
            body = assert_json_error(response, 403, "forbidden_room")
            assert "event:" not in response.text
        assert rooms.split(",")[-1] in body["message"]
        response = await client.get("/api/events", params=query(tok, rooms, timeout="0"))
        assert_json_error(response, 403, "forbidden_room")


async def test_ws_forbidden_rooms_get_error_frames_and_keep_the_allowed_ones(
    server: DualcastProcess,
) -> None:
    tag = uuid.uuid4().hex[:8]
    async with WSClient(server.ws_url, token=USER_456, rooms="user-456,admin,user-789") as ws:
        assert ws.seen.welcome is not None and ws.seen.welcome["rooms"] == ["user-456"]
        await wait_for(lambda: len(ws.seen.errors) >= 2, 5, "two error frames")
        refused = sorted(e["message"] for e in ws.seen.errors)
        assert all(e["code"] == "forbidden_room" for e in ws.seen.errors)
        assert "admin" in refused[0] and "user-789" in refused[1]
        await ws.send({"type": "join", "room": "admin"})
        await ws.send({"type": "join", "room": "team-x"})
        await ws.send({"type": "ping"})
        await wait_for(lambda: any(f["type"] == "pong" for f in ws.seen.frames), 5, "pong")
        assert [e["code"] for e in ws.seen.errors] == ["forbidden_room"] * 4
        assert not any(f["type"] == "joined" for f in ws.seen.frames)
        await publish_set(server.url, tag)
        await wait_for(lambda: has_marker(ws.seen.events, tag), 10, "marker")
        assert labels(ws.seen.events, tag) == {"public", "u456", "admin_u456"}
        assert ws.seen.closed is None


async def test_ws_join_and_leave_within_the_token(server: DualcastProcess) -> None:
    """An admin joins user-456 on a live connection and leaves admin: the room set follows."""
    tag = uuid.uuid4().hex[:8]
    async with WSClient(server.ws_url, token=ADMIN) as ws:
        await ws.send({"type": "join", "room": "user-456"})
        await ws.send({"type": "leave", "room": "admin"})
        await wait_for(lambda: any(f["type"] == "left" for f in ws.seen.frames), 5, "left")
        assert {"type": "joined", "room": "user-456"} in ws.seen.frames
        await publish_set(server.url, tag)
        await wait_for(lambda: has_marker(ws.seen.events, tag), 10, "marker")
        assert labels(ws.seen.events, tag) == {"public", "u456", "admin_u456"}


# --- bad tokens ------------------------------------------------------------------------


async def test_a_backend_clock_a_little_ahead_does_not_refuse_its_fresh_tokens(
    server: DualcastProcess,
) -> None:
    """The application's backend mints HS256 tokens with `iat` (the documented recipe) on
    its own machine; a page connects the moment it gets one. With that clock a moment
    ahead, the token was refused 'not valid yet', on every transport, until ours caught
    up. A little skew is tolerated on iat/nbf, as for other issuers; never on exp."""
    ahead = int(time.time()) + 2
    fresh = signed(_claims(iat=ahead, nbf=ahead, rooms=["ops"]))
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        answer = await client.get("/api/me", headers=bearer(fresh))
        assert answer.status_code == 200, answer.text
        assert answer.json()["sub"] == "456"
        far = int(time.time()) + 120
        assert_json_error(await client.get("/api/me", headers=bearer(
            signed(_claims(iat=far)))), 401, "invalid_token")
        assert_json_error(await client.get("/api/me", headers=bearer(
            signed(_claims(exp=int(time.time()) - 1)))), 401, "token_expired")
    ws = WSClient(server.ws_url, token=fresh, rooms="ops")
    await ws.connect()
    try:
        assert ws.seen.welcome is not None and ws.seen.welcome["rooms"] == ["ops"]
    finally:
        await ws.close()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        poll = await client.get("/api/events", params={"rooms": "ops", "timeout": "0"},
                                headers=bearer(fresh))
        assert poll.status_code == 200, poll.text


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_bad_tokens_get_401_json_everywhere(server: DualcastProcess, kind: str) -> None:
    bad, code = BAD_TOKENS[kind]
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        for path in ("/api/me", "/api/sse", "/api/events", "/api/overview"):
            for how in ("query", "header", "cookie"):
                params = {"token": bad} if how == "query" else {}
                headers = bearer(bad) if how == "header" else {}
                cookies = {"dualcast_token": bad} if how == "cookie" else {}
                client.cookies.clear()
                client.cookies.update(cookies)
                response = await client.get(path, params={**params, "timeout": "0"},
                                            headers=headers)
                body = assert_json_error(response, 401, code)
                assert bad not in response.text, (path, how)
                assert "sub" not in body and "rooms" not in body
        client.cookies.clear()
        response = await client.post("/api/publish", headers=bearer(bad),
                                     json={"event": "x", "data": 1})
        assert_json_error(response, 401, code)
        response = await client.get("/", params={"token": bad})
        assert_json_error(response, 401, code)
        assert "set-cookie" not in response.headers


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_bad_tokens_on_ws_get_an_error_frame_then_1008(
    server: DualcastProcess, kind: str,
) -> None:
    bad, code = BAD_TOKENS[kind]
    async with websockets.connect(f"{server.ws_url}/api/ws?token={quote(bad)}") as conn:
        frame = json.loads(await asyncio.wait_for(conn.recv(), 5))
        assert frame["type"] == "error" and frame["code"] == code and frame["message"]
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(conn.recv(), 5)
        assert conn.close_code == 1008


async def test_non_bearer_authorization_is_not_ours(server: DualcastProcess) -> None:
    """A proxy's Basic auth header does not break the query token; `Bearer` with no token
    is refused, not read as anonymous."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        me = await client.get("/api/me", params={"token": USER_456},
                              headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert me.status_code == 200 and me.json()["sub"] == "456"
        response = await client.get("/api/me", headers={"Authorization": "Bearer"})
        assert_json_error(response, 401, "invalid_token")


# --- expiry on live connections --------------------------------------------------------


def _expiry(tok: str) -> float:
    claims = jwt.decode(tok, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    return float(claims["exp"])


async def test_ws_token_expiry_sends_error_then_closes_1008(server: DualcastProcess) -> None:
    short = token("456", ttl=2)
    async with WSClient(server.ws_url, token=short) as ws:
        await wait_for(lambda: ws.seen.closed is not None, 6, "the expiry close")
        assert ws.seen.closed == 1008
        assert ws.seen.errors[-1]["code"] == "token_expired"
        assert time.time() >= _expiry(short) - 0.5


async def test_ws_token_refresh_keeps_the_connection(server: DualcastProcess) -> None:
    short = token("456", ttl=2)
    async with WSClient(server.ws_url, token=short) as ws:
        await ws.send({"type": "auth", "token": token("456", ttl=3600)})
        deadline = _expiry(short) + 1.5
        await wait_for(lambda: time.time() > deadline or ws.seen.closed is not None, 6,
                       "the old expiry to pass")
        tag = uuid.uuid4().hex[:8]
        await publish_set(server.url, tag)
        await wait_for(lambda: has_marker(ws.seen.events, tag), 10, "marker after refresh")
        assert ws.seen.closed is None and not ws.seen.errors
        assert labels(ws.seen.events, tag) == {"public", "u456", "admin_u456"}


async def test_ws_refresh_with_another_subject_or_bad_token_is_refused(
    server: DualcastProcess,
) -> None:
    async with WSClient(server.ws_url, token=USER_456) as ws:
        await ws.send({"type": "auth", "token": USER_789})
        await ws.send({"type": "auth", "token": BAD_TOKENS["expired"][0]})
        await ws.send({"type": "auth", "token": BAD_TOKENS["alg-none"][0]})
        await wait_for(lambda: len(ws.seen.errors) >= 3, 5, "three refusals")
        assert [e["code"] for e in ws.seen.errors] == [
            "invalid_token", "token_expired", "invalid_token"]
        tag = uuid.uuid4().hex[:8]
        await publish_set(server.url, tag)
        await wait_for(lambda: has_marker(ws.seen.events, tag), 10, "marker")
        assert labels(ws.seen.events, tag) == {"public", "u456", "admin_u456"}


async def test_ws_refresh_to_fewer_rights_leaves_the_rooms_it_lost(
    server: DualcastProcess,
) -> None:
    """An admin connection refreshed with a plain token of the same subject is no longer
    in `admin`: it is told (`left`) and admin events stop reaching it."""
    tag = uuid.uuid4().hex[:8]
    async with WSClient(server.ws_url, token=ADMIN, rooms="admin,user-456") as ws:
        await ws.send({"type": "auth", "token": token("root")})
        await wait_for(lambda: len([f for f in ws.seen.frames if f["type"] == "left"]) == 2, 5,
                       "left admin and user-456")
        assert {f["room"] for f in ws.seen.frames if f["type"] == "left"} == {"admin", "user-456"}
        await ws.send({"type": "join", "room": "admin"})
        await wait_for(lambda: bool(ws.seen.errors), 5, "the refused join")
        assert ws.seen.errors[0]["code"] == "forbidden_room"
        await publish_set(server.url, tag)
        await wait_for(lambda: has_marker(ws.seen.events, tag), 10, "marker")
        assert labels(ws.seen.events, tag) == {"public"}


def room_frames(ws: WSClient, kind: str) -> list[str]:
    return [f["room"] for f in ws.seen.frames if f["type"] == kind]


async def settled(ws: WSClient) -> None:
    """Every frame the server queued before this point has arrived (a pong follows them)."""
    pongs = sum(f["type"] == "pong" for f in ws.seen.frames)
    await ws.send({"type": "ping"})
    await wait_for(lambda: sum(f["type"] == "pong" for f in ws.seen.frames) > pongs, 5, "pong")


async def test_an_anonymous_ws_that_sends_a_token_joins_that_tokens_rooms(
    server: DualcastProcess,
) -> None:
    """A WebSocket opened with no token and no rooms, then `auth`: it stayed on public events
    only, though with the token at connect it joins the token's rooms and `user-<sub>`."""
    tag = uuid.uuid4().hex[:8]
    async with WSClient(server.ws_url) as ws:
        assert ws.seen.welcome is not None and ws.seen.welcome["rooms"] == []
        await ws.send({"type": "auth", "token": EXTRA})
        await wait_for(lambda: len(room_frames(ws, "joined")) == 2, 5, "two joined frames")
        assert sorted(room_frames(ws, "joined")) == ["team-x", "user-555"]
        await publish_set(server.url, tag)
        await wait_for(lambda: has_marker(ws.seen.events, tag), 10, "marker")
        assert labels(ws.seen.events, tag) == {"public", "teamx"}
        assert not ws.seen.errors


async def test_an_anonymous_ws_that_named_rooms_keeps_its_choice_after_auth(
    server: DualcastProcess,
) -> None:
    tag = uuid.uuid4().hex[:8]
    async with WSClient(server.ws_url, rooms="team-x") as ws:
        await wait_for(lambda: bool(ws.seen.errors), 5, "team-x refused to the anonymous")
        await ws.send({"type": "auth", "token": EXTRA})
        await settled(ws)
        assert room_frames(ws, "joined") == []
        await publish_set(server.url, tag)
        await wait_for(lambda: has_marker(ws.seen.events, tag), 10, "marker")
        assert labels(ws.seen.events, tag) == {"public"}


async def test_ws_on_default_rooms_joins_what_a_wider_token_adds(server: DualcastProcess) -> None:
    """Named no rooms = the token's defaults: a same-subject token that lists one more
    room joins it; a room the client left is not joined again; a narrower token narrows."""
    async with WSClient(server.ws_url, token=token("556", rooms=["team-x"])) as ws:
        assert ws.seen.welcome is not None
        assert ws.seen.welcome["rooms"] == ["team-x", "user-556"]
        await ws.send({"type": "leave", "room": "team-x"})
        await ws.send({"type": "auth", "token": token("556", rooms=["team-x", "team-y"])})
        await wait_for(lambda: room_frames(ws, "joined"), 5, "joined team-y")
        await settled(ws)
        assert room_frames(ws, "joined") == ["team-y"]
        await ws.send({"type": "auth", "token": token("556")})
        await wait_for(lambda: len(room_frames(ws, "left")) == 2, 5, "left team-y")
        assert room_frames(ws, "left") == ["team-x", "team-y"]
        await settled(ws)
        assert not ws.seen.errors and room_frames(ws, "joined") == ["team-y"]
    async with WSClient(server.ws_url, token=token("557"), rooms="user-557") as named:
        await named.send({"type": "auth", "token": token("557", rooms=["team-x"])})
        await settled(named)
        assert room_frames(named, "joined") == [] and not named.seen.errors


async def test_sse_stream_ends_with_an_error_event_at_expiry(server: DualcastProcess) -> None:
    short = token("456", ttl=2)
    async with SSEClient(server.url, token=short) as sse:
        await asyncio.wait_for(sse.ended.wait(), 6)
        assert sse.seen.errors and sse.seen.errors[-1]["code"] == "token_expired"


async def test_long_poll_ends_with_a_json_error_at_expiry(server: DualcastProcess) -> None:
    short = token("456", ttl=2)
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
        begun = time.monotonic()
        response = await client.get("/api/events", params={"token": short, "timeout": "15"})
        assert time.monotonic() - begun < 6
        assert_json_error(response, 401, "token_expired")


async def test_reconnect_with_an_expired_token_is_refused_not_downgraded(
    server: DualcastProcess,
) -> None:
    expired = BAD_TOKENS["expired"][0]
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        for path in ("/api/sse", "/api/events", "/api/me", "/api/overview"):
            response = await client.get(path, params={"last_event_id": "0", "after": "0",
                                                      "timeout": "0"},
                                        headers={"Last-Event-ID": "0-0",
                                                 "Cookie": f"dualcast_token={expired}"})
            assert_json_error(response, 401, "token_expired")
    async with websockets.connect(f"{server.ws_url}/api/ws?last_event_id=0",
                                  additional_headers={"Cookie": f"dualcast_token={expired}"},
                                  ) as conn:
        frame = json.loads(await asyncio.wait_for(conn.recv(), 5))
        assert frame == {"type": "error", "code": "token_expired", "message": frame["message"]}
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(conn.recv(), 5)
        assert conn.close_code == 1008


# --- anonymous off ---------------------------------------------------------------------


async def test_anonymous_turned_away_when_not_allowed(closed_server: DualcastProcess) -> None:
    async with httpx.AsyncClient(base_url=closed_server.url, timeout=10) as client:
        for path in ("/api/sse", "/api/events", "/api/overview", "/api/me"):
            response = await client.get(path, params={"timeout": "0"})
            assert_json_error(response, 401, "unauthenticated")
        me = await client.get("/api/me", headers=bearer(USER_456))
        assert me.status_code == 200 and me.json()["sub"] == "456"
    async with websockets.connect(f"{closed_server.ws_url}/api/ws") as conn:
        frame = json.loads(await asyncio.wait_for(conn.recv(), 5))
        assert frame["type"] == "error" and frame["code"] == "unauthenticated"
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(conn.recv(), 5)
        assert conn.close_code == 1008
    async with WSClient(closed_server.ws_url, token=USER_456) as ws:
        assert ws.seen.welcome is not None and ws.seen.welcome["rooms"] == ["user-456"]


# --- Origin ----------------------------------------------------------------------------


@pytest.mark.parametrize("origin", [
    "http://evil.example", "null", "http://127.0.0.1.evil.example", "https://dash.example.com.evil",
    "http://localhost:1",
])
async def test_cross_origin_websocket_refused_with_403(
    server: DualcastProcess, origin: str,
) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"{server.ws_url}/api/ws?token={ADMIN}", origin=origin)  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body or b"{}")["error"] == "bad_origin"


async def test_a_refused_upgrade_is_not_logged_as_an_error(server: DualcastProcess) -> None:
    """A 403 denial is the handshake's answer: uvicorn logged "returned without
    completing handshake" at error level after each one (server/ws_protocol.py)."""
    for _ in range(3):
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(f"{server.ws_url}/api/ws", origin="http://evil.example")  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403
    assert "403" in server.log()  # uvicorn's access line: the refusals are in this log
    assert [line for line in server.log().splitlines() if "ERROR" in line] == []


async def test_cross_origin_websocket_with_the_login_cookie_is_refused(
    server: DualcastProcess,
) -> None:
    """The hijacking case itself: an evil page's WebSocket would carry the victim's cookie."""
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"{server.ws_url}/api/ws", origin="https://evil.example",  # type: ignore[arg-type]
                                 additional_headers={"Cookie": f"dualcast_token={ADMIN}"})
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize("origin", ["same-host", ALLOWED_ORIGIN, None])
async def test_same_origin_listed_origin_and_no_origin_get_in(
    server: DualcastProcess, origin: str | None,
) -> None:
    value = f"http://127.0.0.1:{server.port}" if origin == "same-host" else origin
    ws = WSClient(server.ws_url, token=USER_456)
    await ws.connect(origin=value)
    try:
        assert ws.seen.welcome is not None and ws.seen.welcome["rooms"] == ["user-456"]
    finally:
        await ws.close()


# --- cookie login ----------------------------------------------------------------------


def _set_cookie(response: httpx.Response) -> str:
    values = response.headers.get_list("set-cookie")
    assert len(values) == 1, values
    return values[0]


async def test_cookie_login_flow(server: DualcastProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        response = await client.get("/", params={"token": USER_456})
        assert response.status_code == 303
        assert response.headers["location"] == "/"
        cookie = _set_cookie(response)
        attrs = [part.strip().lower() for part in cookie.split(";")]
        assert attrs[0] == f"dualcast_token={USER_456}".lower()
        assert "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs
        assert "secure" not in attrs
        assert client.cookies.get("dualcast_token") == USER_456

        page = await client.get("/")
        assert page.status_code == 200 and "html" in page.headers["content-type"]
        me = (await client.get("/api/me")).json()
        assert me["sub"] == "456" and me["anonymous"] is False
        async with SSEClient(server.url) as anon:
            assert anon.seen.welcome is not None and anon.seen.welcome["rooms"] == []
        sse = SSEClient(server.url, headers={"Cookie": f"dualcast_token={USER_456}"})
        async with sse:
            assert sse.seen.welcome is not None and sse.seen.welcome["rooms"] == ["user-456"]
        ws = WSClient(server.ws_url)
        await ws.connect(headers={"Cookie": f"dualcast_token={USER_456}"})
        try:
            assert ws.seen.welcome is not None and ws.seen.welcome["rooms"] == ["user-456"]
        finally:
            await ws.close()

        out = await client.post("/api/logout")
        assert out.status_code == 200
        cleared = _set_cookie(out).lower()
        assert cleared.startswith('dualcast_token=""') or cleared.startswith("dualcast_token=;")
        assert "max-age=0" in cleared or "expires=" in cleared
        assert "dualcast_token" not in client.cookies
        me = (await client.get("/api/me")).json()
        assert me["anonymous"] is True


async def test_a_refused_login_link_sends_a_browser_to_the_login_screen(
        server: DualcastProcess) -> None:
    """A person who follows an expired link lands on the dashboard's login screen with
    the reason (`/#login_error=<code>`); an API client still gets the 401 JSON."""
    expired = mint_token(SECRET, "456", ttl=-60)
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        followed = await client.get("/", params={"token": expired}, headers=browser)
        assert followed.status_code == 303
        assert followed.headers["location"] == "/#login_error=token_expired"
        assert "set-cookie" not in followed.headers
        forged = await client.get("/", params={"token": "not-a-jwt"}, headers=browser)
        assert forged.headers["location"] == "/#login_error=invalid_token"
        api = await client.get("/", params={"token": expired})
        assert api.status_code == 401 and api.json()["error"] == "token_expired"


async def test_a_login_link_too_long_for_a_cookie_says_so(server: DualcastProcess) -> None:
    """Browsers drop, without a word, a Set-Cookie whose name and value exceed 4096 bytes:
    a login link with a longer token was answered 303 with that cookie, and the dashboard
    opened signed out with nothing to say why. A token just within the limit still signs in."""
    room = len("dualcast_token")
    fits = token_of_length(4096 - room, over=False)
    too_long = token_of_length(4096 - room, over=True)
    assert len(fits) >= 4096 - room - 4 and len(too_long) <= 4096 - room + 4
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        for headers in (browser, {}):
            assert (await client.get("/api/me", headers=bearer(too_long))).status_code == 200
            refused = await client.get("/", params={"token": too_long}, headers=headers)
            assert refused.status_code == 400, refused.text
            assert "set-cookie" not in refused.headers and not client.cookies
            assert refused.headers["cache-control"] == "no-store"
            said = refused.text if headers else refused.json()["message"]
            assert "too long to keep as the login cookie" in said, said
            assert "shorter token" in said and "Authorization: Bearer" in said
            if headers:
                assert refused.headers["content-type"].startswith("text/html")
                assert "frame-ancestors 'none'" in refused.headers["content-security-policy"]
            else:
                assert refused.json()["error"] == "too_large"

        signed_in = await client.get("/", params={"token": fits}, headers=browser)
        assert signed_in.status_code == 303, signed_in.text
        assert _set_cookie(signed_in).startswith(f"dualcast_token={fits};")
        assert (await client.get("/api/me")).json()["sub"] == "456"


@pytest.mark.parametrize("how", ["x-forwarded-proto", "plain-http"])
async def test_login_cookie_is_secure_only_over_https(server: DualcastProcess, how: str) -> None:
    headers = {"X-Forwarded-Proto": "https"} if how == "x-forwarded-proto" else {}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        response = await client.get("/", params={"token": ADMIN}, headers=headers)
        assert response.status_code == 303
        attrs = [part.strip().lower() for part in _set_cookie(response).split(";")]
        assert ("secure" in attrs) is (how == "x-forwarded-proto")


async def test_cookie_secure_always_setting(closed_server: DualcastProcess) -> None:
    """Behind a TLS terminator that sends no X-Forwarded-Proto: DUALCAST_COOKIE_SECURE=always."""
    async with httpx.AsyncClient(base_url=closed_server.url, timeout=10) as client:
        response = await client.get("/", params={"token": USER_456})
        assert response.status_code == 303
        attrs = [part.strip().lower() for part in _set_cookie(response).split(";")]
        assert "secure" in attrs and "httponly" in attrs


# --- publish ---------------------------------------------------------------------------


@pytest.mark.parametrize(("who", "status"), [
    (None, 401), (USER_456, 403), (EXTRA, 403), (PUBLISHER, 202), (ADMIN, 202),
])
async def test_publish_needs_publish_or_admin(
    server: DualcastProcess, who: str | None, status: int,
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        response = await client.post("/api/publish", headers=bearer(who) if who else {},
                                     json={"event": "probe", "data": {}, "rooms": ["admin"]})
    assert response.status_code == status, response.text
    if status == 202:
        assert response.json()["id"]
    else:
        assert response.json()["error"] in ("unauthenticated", "forbidden")


# --- logs ------------------------------------------------------------------------------


async def test_logs_never_print_a_token(server: DualcastProcess, tmp_path: Path) -> None:
    """Runs after the rest of the module has sent tokens every way (query, header, cookie,
    WS, bad ones); one more round here makes it stand on its own."""
    fresh = token("4242", ttl=600)
    async with WSClient(server.ws_url, token=fresh):
        pass
    async with SSEClient(server.url, token=fresh):
        pass
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        await client.get("/api/events", params={"token": fresh, "timeout": "0"})
        await client.get("/", params={"token": fresh})
        await client.get("/api/me", params={"token": "garbage-" + fresh[::-1]})
    text = server.log()
    assert "WebSocket /api/ws" in text  # the log does carry request lines...
    used = [fresh, ADMIN, PUBLISHER, USER_456, USER_789, EXTRA]
    used += [tok for tok, _ in BAD_TOKENS.values() if len(tok) > 20]
    for tok in used:
        assert tok not in text
        assert tok.split(".")[-1] not in text or len(tok.split(".")[-1]) < 8
    assert "token=eyJ" not in text
