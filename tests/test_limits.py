"""Bad input and limits (issue 4): each refusal is a clear error that costs nobody else.

One server with small limits (3 rooms, 4 KiB frames, 2 KiB bodies, 5 bad frames) on
real Redis; every test keeps a healthy WebSocket subscriber connected and checks
at the end that it is still open and still receiving.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import websockets

from tests.conftest import token
from tests.harness.clients import WSClient
from tests.harness.procs import DualcastProcess
from tests.harness.waits import wait_for

MAX_ROOMS = 3
MAX_FRAME = 4096
MAX_BODY = 2048
MAX_BAD = 5

ADMIN = token("root", admin=True)
PUBLISHER = token("producer", publish=True)
USER = token("456")


@pytest.fixture(scope="module")
def server(server_with: Callable[..., DualcastProcess]) -> DualcastProcess:
    return server_with(
        {"DUALCAST_MAX_ROOMS": str(MAX_ROOMS), "DUALCAST_MAX_FRAME_BYTES": str(MAX_FRAME),
         "DUALCAST_MAX_BODY_BYTES": str(MAX_BODY), "DUALCAST_MAX_BAD_FRAMES": str(MAX_BAD),
         "DUALCAST_BODY_TIMEOUT": "1"},
        name="limits",
    )


@pytest.fixture
async def healthy(server: DualcastProcess) -> AsyncIterator[WSClient]:
    """A well-behaved subscriber that must not notice anyone else's bad input."""
    async with WSClient(server.ws_url, token=USER) as ws:
        yield ws


async def still_served(server: DualcastProcess, ws: WSClient) -> None:
    tag = uuid.uuid4().hex
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        response = await client.post("/api/publish", headers={"Authorization": f"Bearer {ADMIN}"},
                                     json={"event": "canary", "data": {"tag": tag},
                                           "rooms": ["user-456"]})
        assert response.status_code == 202, response.text
        assert (await client.get("/healthz")).status_code == 200
    await wait_for(lambda: any(e["data"] == {"tag": tag} for e in ws.seen.events), 10,
                   "the healthy client to get the canary")
    assert ws.seen.closed is None and not ws.seen.errors


def assert_json_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    return dict(body)


async def raw_ws(server: DualcastProcess, query: str = "") -> websockets.ClientConnection:
    conn = await websockets.connect(f"{server.ws_url}/api/ws?token={ADMIN}{query}",
                                    max_size=2**22)
    welcome = json.loads(await asyncio.wait_for(conn.recv(), 5))
    assert welcome["type"] == "welcome"
    return conn


async def next_frame(conn: websockets.ClientConnection) -> dict[str, Any]:
    return dict(json.loads(await asyncio.wait_for(conn.recv(), 5)))


async def closed_with(conn: websockets.ClientConnection) -> int | None:
    """Read until the server closes; the close code it sent."""
    with pytest.raises(websockets.ConnectionClosed):
        for _ in range(100):
            await asyncio.wait_for(conn.recv(), 5)
    return conn.close_code


# --- room names and counts -------------------------------------------------------------

#: (Whitespace around a name in the comma list is trimmed, so "room\n" is fine there; on a
#: WS `join` frame it is refused.)
BAD_ROOMS = ["a b", "x" * 65, "röom", "room/1", "<script>", "a;b", "'", "room\x00"]


@pytest.mark.parametrize("room", BAD_ROOMS)
async def test_malformed_room_is_400_on_sse_and_poll(
    server: DualcastProcess, healthy: WSClient, room: str,
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        for path in ("/api/sse", "/api/events", "/api/overview"):
            response = await client.get(path, params={"token": ADMIN, "rooms": f"admin,{room}",
                                                      "timeout": "0"})
            body = assert_json_error(response, 400, "bad_room")
            assert "room" in body["message"]
    await still_served(server, healthy)


async def test_malformed_rooms_on_ws_get_error_frames_connection_kept(
    server: DualcastProcess, healthy: WSClient,
) -> None:
    conn = await raw_ws(server, "&rooms=admin,bad%20room")
    try:
        frame = await next_frame(conn)
        assert frame["type"] == "error" and frame["code"] == "bad_room"
        for room in ("x" * 65, "room\n", 42, ["admin"]):  # under MAX_BAD: abuse closes
            await conn.send(json.dumps({"type": "join", "room": room}))
            frame = await next_frame(conn)
            assert frame["type"] == "error" and frame["code"] == "bad_room", room
        await conn.send(json.dumps({"type": "ping"}))
        assert (await next_frame(conn)) == {"type": "pong"}
        await conn.send(json.dumps({"type": "join", "room": "ok-room"}))
        assert (await next_frame(conn)) == {"type": "joined", "room": "ok-room"}
    finally:
        await conn.close()
    await still_served(server, healthy)


async def test_too_many_rooms(
    server: DualcastProcess, healthy: WSClient,
) -> None:
    four = "r1,r2,r3,r4"
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        for path in ("/api/sse", "/api/events"):
            response = await client.get(path, params={"token": ADMIN, "rooms": four,
                                                      "timeout": "0"})
            body = assert_json_error(response, 400, "too_many_rooms")
            assert str(MAX_ROOMS) in body["message"]
        # Three is fine, and duplicates count once.
        response = await client.get("/api/events", params={"token": ADMIN, "timeout": "0",
                                                           "rooms": "r1,r2,r3,r1,r2"})
        assert response.status_code == 200, response.text
        # A thousand names cost one refusal (kept under 8 KiB: uvicorn's websockets-sansio
        # never answers a WS upgrade whose request line is longer).
        many = ",".join(f"r{i}" for i in range(1000))
        response = await client.get("/api/events", params={"token": USER, "rooms": many})
        assert_json_error(response, 400, "too_many_rooms")
    conn = await raw_ws(server, f"&rooms={four}")
    try:
        frame = await next_frame(conn)
        assert frame["type"] == "error" and frame["code"] == "too_many_rooms"
        await conn.send(json.dumps({"type": "join", "room": "r9"}))
        frame = await next_frame(conn)
        assert frame["type"] == "error" and frame["code"] == "too_many_rooms"
        await conn.send(json.dumps({"type": "leave", "room": "r1"}))
        assert (await next_frame(conn)) == {"type": "left", "room": "r1"}
        await conn.send(json.dumps({"type": "join", "room": "r9"}))
        assert (await next_frame(conn)) == {"type": "joined", "room": "r9"}
    finally:
        await conn.close()
    ws = WSClient(server.ws_url, token=USER, rooms=many)
    await ws.connect()
    try:
        await ws.send({"type": "ping"})
        await wait_for(lambda: any(f["type"] == "pong" for f in ws.seen.frames), 5, "pong")
        assert len(ws.seen.errors) <= MAX_ROOMS + 1
        assert ws.seen.errors[-1]["code"] == "too_many_rooms"
    finally:
        await ws.close()
    await still_served(server, healthy)


async def sse_welcome(client: httpx.AsyncClient, query: list[tuple[str, str]],
                      ) -> dict[str, Any]:
    async with client.stream("GET", "/api/sse", params=query) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                return dict(json.loads(line.removeprefix("data:")))
    raise AssertionError("no welcome")


async def test_repeated_rooms_parameters_all_count_on_every_transport(
    server: DualcastProcess, healthy: WSClient,
) -> None:
    """`?rooms=a&rooms=b` subscribed to `b` alone (the last one won, without a word); every
    `rooms` now counts, as one comma list would, with the same limits and refusals."""
    tag = uuid.uuid4().hex[:8]
    a, b, c, d = (f"{name}-{tag}" for name in "abcd")
    member = token("rep", rooms=[a, b, c])
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        both = [("token", member), ("rooms", a), ("rooms", f"{b},{a}")]
        assert (await sse_welcome(client, both))["rooms"] == sorted([a, b])
        conn = await websockets.connect(
            f"{server.ws_url}/api/ws?token={member}&rooms={a}&rooms={b},{a}")
        try:
            assert (await next_frame(conn))["rooms"] == sorted([a, b])
        finally:
            await conn.close()
        after = (await client.get("/api/events", params=[*both, ("timeout", "0")])).json()
        headers = {"Authorization": f"Bearer {ADMIN}"}
        for room in (a, b, c):
            response = await client.post("/api/publish", headers=headers,
                                         json={"event": "rep", "data": room, "rooms": [room]})
            assert response.status_code == 202, response.text
        polled: list[str] = []
        for _ in range(10):
            answer = (await client.get("/api/events", params=[
                *both, ("after", after["last_id"]), ("timeout", "5")])).json()
            polled += [e["data"] for e in answer["events"]]
            after = answer
            if len(polled) >= 2:
                break
        assert polled == [a, b]
        # the limits and refusals of one list, before anything streams
        cases = [([("rooms", a), ("rooms", d)], 403, "forbidden_room"),
                 ([("rooms", a), ("rooms", "bad room")], 400, "bad_room"),
                 ([("rooms", f"{a},{b}"), ("rooms", f"{c},{d}")], 400, "too_many_rooms")]
        for rooms, status, code in cases:
            for path in ("/api/sse", "/api/events"):
                response = await client.get(path, params=[("token", member), *rooms,
                                                          ("timeout", "0")])
                assert_json_error(response, status, code)
    conn = await websockets.connect(
        f"{server.ws_url}/api/ws?token={member}&rooms={a}&rooms={d}")
    try:
        assert (await next_frame(conn))["rooms"] == [a]
        frame = await next_frame(conn)
        assert frame["type"] == "error" and frame["code"] == "forbidden_room" and d in frame["message"]
    finally:
        await conn.close()
    await still_served(server, healthy)


async def test_an_anonymous_ws_sending_a_token_joins_its_rooms_as_at_connect(
    server: DualcastProcess, healthy: WSClient,
) -> None:
    """The default rooms a token grants are joined on `auth` as at connect: all of them.
    DUALCAST_MAX_ROOMS (3 here) bounds the rooms a client asks for; the same token joined
    five at connect and three through `auth`, then an error."""
    grant = token("cap", rooms=["r1", "r2", "r3", "r4"])
    want = ["r1", "r2", "r3", "r4", "user-cap"]
    at_connect = WSClient(server.ws_url, token=grant)
    await at_connect.connect()
    ws = WSClient(server.ws_url)
    await ws.connect()
    try:
        assert at_connect.seen.welcome is not None
        assert sorted(at_connect.seen.welcome["rooms"]) == want
        await ws.send({"type": "auth", "token": grant})
        await wait_for(lambda: len([f for f in ws.seen.frames if f["type"] == "joined"]) == 5,
                       5, "five rooms joined")
        assert sorted(f["room"] for f in ws.seen.frames if f["type"] == "joined") == want
        assert ws.seen.errors == []
    finally:
        await ws.close()
        await at_connect.close()
    await still_served(server, healthy)


# --- WebSocket frames ------------------------------------------------------------------


async def test_frame_over_the_limit_closes_1009(
    server: DualcastProcess, healthy: WSClient,
) -> None:
    conn = await raw_ws(server)
    await conn.send(json.dumps({"type": "ping", "pad": "x" * MAX_FRAME}))
    assert await closed_with(conn) == 1009
    conn = await raw_ws(server)
    try:
        await conn.send(json.dumps({"type": "ping", "pad": "x" * (MAX_FRAME - 100)}))
        assert (await next_frame(conn)) == {"type": "pong"}
    finally:
        await conn.close()
    await still_served(server, healthy)


@pytest.mark.parametrize(("frame", "code"), [
    ("{not json", "bad_json"),
    ("", "bad_json"),
    ("[1, 2]", "bad_frame"),
    ('"ping"', "bad_frame"),
    ("null", "bad_frame"),
    (b"\x00\x01binary", "bad_frame"),
    ('{"type": "subscribe", "room": "admin"}', "unknown_type"),
    ('{"no_type": 1}', "unknown_type"),
    ('{"type": 7}', "unknown_type"),
    ('{"type": "auth"}', "bad_frame"),
    ('{"type": "auth", "token": 5}', "bad_frame"),
])
async def test_bad_frames_get_error_frames_and_the_connection_stays(
    server: DualcastProcess, healthy: WSClient, frame: str | bytes, code: str,
) -> None:
    conn = await raw_ws(server)
    try:
        await conn.send(frame)
        reply = await next_frame(conn)
        assert reply["type"] == "error" and reply["code"] == code and reply["message"]
        await conn.send(json.dumps({"type": "ping"}))
        assert (await next_frame(conn)) == {"type": "pong"}
    finally:
        await conn.close()
    await still_served(server, healthy)


async def test_repeated_abuse_closes_1008(
    server: DualcastProcess, healthy: WSClient,
) -> None:
    conn = await raw_ws(server)
    for i in range(MAX_BAD):
        await conn.send("{bad" if i % 2 else '{"type":"nope"}')
    errors = 0
    with pytest.raises(websockets.ConnectionClosed):
        for _ in range(MAX_BAD + 2):
            frame = await next_frame(conn)
            assert frame["type"] == "error"
            errors += 1
    assert errors == MAX_BAD
    assert conn.close_code == 1008
    await still_served(server, healthy)


async def test_bad_cursor_on_ws_refuses_the_upgrade(
    server: DualcastProcess, healthy: WSClient,
) -> None:
    """As on SSE and poll, a malformed cursor is refused before anything streams: the
    upgrade is answered 400 with the JSON error, no `welcome` first."""
    with pytest.raises(websockets.InvalidStatus) as refused:
        await raw_ws(server, "&last_event_id=yesterday")
    response = refused.value.response
    assert response.status_code == 400
    assert json.loads(response.body)["error"] == "bad_cursor"
    await still_served(server, healthy)


async def test_ping_during_a_replay_is_answered(
    server: DualcastProcess, healthy: WSClient,
) -> None:
    """A pong queued while the feed replays from the log must not wait for the next event
    (regression: it was held until one arrived, forever for a quiet anonymous client)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        for i in range(30):
            response = await client.post("/api/publish",
                                         headers={"Authorization": f"Bearer {ADMIN}"},
                                         json={"event": "private", "data": i, "rooms": ["admin"]})
            assert response.status_code == 202
    async with websockets.connect(f"{server.ws_url}/api/ws?last_event_id=0") as conn:
        assert (await next_frame(conn))["type"] == "welcome"
        await conn.send(json.dumps({"type": "ping"}))
        assert (await next_frame(conn)) == {"type": "pong"}
    await still_served(server, healthy)


# --- cursors and timeouts --------------------------------------------------------------

BAD_IDS = ["abc", "1-2-3", "-1", "1-", "99999999999999999999999-0", "1.5", " ", "0x10", "1-a",
           "\u0661\u0667-0", "\uff15", "1-\u0661"]  # Arabic-Indic, fullwidth digits


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_bad_cursors_are_400(server: DualcastProcess, healthy: WSClient, bad: str) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        response = await client.get("/api/events", params={"after": bad, "timeout": "0"})
        assert_json_error(response, 400, "bad_cursor")
        response = await client.get("/api/sse", params={"last_event_id": bad})
        assert_json_error(response, 400, "bad_cursor")
        if bad.strip() and bad.isascii():  # (a header is Latin-1)
            response = await client.get("/api/sse", headers={"Last-Event-ID": bad})
            assert_json_error(response, 400, "bad_cursor")
    await still_served(server, healthy)


@pytest.mark.parametrize("bad", ["-1", "31", "abc", "nan", "inf", "-inf", "1e9", "0x5", " ",
                                 # float() read these: other scripts' digits, "1_0", padding
                                 "\u0661\u0667", "\uff15", "\u0665", "1_0", " 5", "+2"])
async def test_bad_poll_timeouts_are_400(
    server: DualcastProcess, healthy: WSClient, bad: str,
) -> None:
    """A timeout is ASCII decimal notation, as a cursor is: `?timeout=` with Arabic-Indic
    digits for 17 (float() reads them) waited 17 s instead of being refused."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        response = await client.get("/api/events", params={"timeout": bad})
        body = assert_json_error(response, 400, "bad_timeout")
        assert "timeout" in body["message"]
    await still_served(server, healthy)


async def test_a_poll_asking_longer_than_the_server_waits_is_answered_at_its_limit(
    dualcast: Callable[..., DualcastProcess],
) -> None:
    """The protocol's range (0-30 s) is never refused; an operator's lower limit only
    shortens the wait (the browser client asks 25 s whatever the server's limit)."""
    server = dualcast(env={"DUALCAST_POLL_TIMEOUT_MAX": "1"})
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        response = await client.get("/api/events", params={"timeout": "25"})
        assert response.status_code == 200  # within the client's 10 s, not after 25
        assert response.json()["events"] == []
        response = await client.get("/api/events", params={"timeout": "30.5"})
        assert_json_error(response, 400, "bad_timeout")


# --- publish bodies --------------------------------------------------------------------


def _post(client: httpx.AsyncClient, content: bytes | str,
          headers: dict[str, str] | None = None) -> Any:
    return client.post("/api/publish", content=content,
                       headers={"Authorization": f"Bearer {PUBLISHER}",
                                "Content-Type": "application/json", **(headers or {})})


async def test_publish_body_over_the_limit_is_413(
    server: DualcastProcess, healthy: WSClient,
) -> None:
    big = json.dumps({"event": "big", "data": "x" * MAX_BODY})
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        assert_json_error(await _post(client, big), 413, "too_large")

        async def chunks() -> AsyncIterator[bytes]:
            """No Content-Length: the limit holds on a chunked body too."""
            for _ in range(8):
                yield b" " * 512
            yield b'{"event": "big", "data": 1}'

        response = await client.post("/api/publish", content=chunks(),
                                     headers={"Authorization": f"Bearer {PUBLISHER}",
                                              "Content-Type": "application/json"})
        assert_json_error(response, 413, "too_large")
        ok = json.dumps({"event": "fits", "data": "x" * (MAX_BODY - 100)})
        assert (await _post(client, ok)).status_code == 202
    await still_served(server, healthy)


async def test_a_publish_body_that_never_ends_is_408(
    server: DualcastProcess, healthy: WSClient,
) -> None:
    """A token holder that sends a few bytes of the body it announced and then nothing
    held the connection for as long as it liked; now it is answered and let go."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"POST /api/publish HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + PUBLISHER.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     b'{"event": ')
        await writer.drain()
        async with asyncio.timeout(15):
            answer = await reader.read()  # the server answers, then closes
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert json.loads(body)["error"] == "body_timeout"
    await still_served(server, healthy)


@pytest.mark.parametrize(("body", "field"), [
    ({"event": "bad name", "data": 1}, "event"),
    ({"event": "", "data": 1}, "event"),
    ({"event": "x" * 65, "data": 1}, "event"),
    ({"event": "ok\n", "data": 1}, "event"),
    ({"event": 5, "data": 1}, "event"),
    ({"data": 1}, "event"),
    ({"event": "ok", "rooms": "admin"}, "rooms"),
    ({"event": "ok", "rooms": ["bad room"]}, "rooms"),
    ({"event": "ok", "rooms": [1]}, "rooms"),
    ({"event": "ok", "extra": True}, "extra"),
    ({"event": "ok", "data": {"total": 2**64}}, "data"),  # would be read as a float
    ({"event": "ok", "data": [0, -(2**63) - 1]}, "data"),
])
async def test_invalid_envelopes_are_422_naming_the_field(
    server: DualcastProcess, healthy: WSClient, body: dict[str, Any], field: str,
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        response = await _post(client, json.dumps(body))
        answer = assert_json_error(response, 422, "invalid")
        assert answer["field"].split(".")[0] == field, answer
        assert field in answer["message"]
    await still_served(server, healthy)


@pytest.mark.parametrize("body", ["not json", "{", "", "\xff", "[1, 2", '{"event": NaN}'])
async def test_publish_bodies_that_are_not_json_are_422(
    server: DualcastProcess, healthy: WSClient, body: str,
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        response = await _post(client, body.encode("latin-1"))
        assert_json_error(response, 422, "bad_json")
        assert response.json()["field"] == "body"  # every 422 names where
    await still_served(server, healthy)


@pytest.mark.parametrize("body", ["[]", "1", "null", '"event"'])
async def test_publish_json_that_is_not_an_object_is_422(
    server: DualcastProcess, healthy: WSClient, body: str,
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        assert_json_error(await _post(client, body), 422, "invalid")
    await still_served(server, healthy)


def _upgrade(path: str, extra_headers: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: dualcast\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra_headers}\r\n").encode()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("request_bytes", "status"), [
    (_upgrade("/api/ws?pad=" + "x" * 17_000), b"414"),
    (_upgrade("/api/ws", "X-Pad: " + "x" * 17_000 + "\r\n"), b"431"),
], ids=["request-line-over-16KiB", "header-line-over-16KiB"])
async def test_an_upgrade_too_large_to_parse_is_answered_and_closed(
    server: DualcastProcess, healthy: WSClient, request_bytes: bytes, status: bytes,
) -> None:
    """uvicorn left such a connection open forever, unanswered (server/transports/
    ws_protocol.py): each one held a socket for as long as the client liked."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request_bytes)
        answer = await asyncio.wait_for(reader.read(), 5)  # until the server closes
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:80]
    await still_served(server, healthy)


@pytest.mark.timeout(30)
async def test_the_longest_token_opens_a_websocket(server: DualcastProcess) -> None:
    """A browser's upgrade carries its token in the request line; one near the 8,192
    characters dualcast takes made a line over websockets' 8 KiB and got 414, so such
    a token could never use WebSocket."""
    rooms = 1
    while len(token("long", rooms=[f"r{i:05d}" for i in range(rooms + 1)])) <= 8192:
        rooms += 1
    long = token("long", rooms=[f"r{i:05d}" for i in range(rooms)])
    assert 8_100 < len(long) <= 8192
    url = f"{server.ws_url}/api/ws?token={long}&last_event_id=0-0"
    assert len(url) > 8192
    async with websockets.connect(url) as ws:
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert welcome["type"] == "welcome" and "user-long" in welcome["rooms"], welcome


def test_zz_the_log_holds_no_token(server: DualcastProcess) -> None:
    """After every refusal above (tokens in queries of WS, SSE, poll), none reached the log."""
    text = server.log()
    assert "WebSocket /api/ws" in text
    for tok in (ADMIN, PUBLISHER, USER):
        assert tok not in text
    assert "eyJ" not in text
