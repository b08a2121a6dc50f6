"""The HTTP and WebSocket edges as a sloppy client or an attacker meets them.

One real server (memory engine) for the module; each test sends what a broken
proxy, a hand-written client or a probe might, and checks that the answer is a
clear refusal (or the normal answer), that nothing lands in the log as a
traceback, and that the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator

import httpx
import jwt
import pytest
import websockets

from dualcast.authhook import HookUnavailable, parse_answer
from tests.conftest import SECRET, token
from tests.harness.procs import DualcastProcess
from tests.harness.waits import wait_for

USER = token("456", rooms=["ops"])
PUBLISHER = token("ci", publish=True)

#: Origin headers no browser sends, but anyone can: each is a refusal, never a 500.
BAD_ORIGINS = ["http://[::1", "http://[", "https://[zz]:80", "http://a]b"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DualcastProcess]:
    proc = DualcastProcess(tmp_path_factory.mktemp("edges"),
                           env={"DUALCAST_SECRET": SECRET}).start()
    yield proc
    proc.stop()


@pytest.fixture
def http(server: DualcastProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def no_traceback(server: DualcastProcess) -> None:
    log = server.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, (
        server.log_tail(3000))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("origin", BAD_ORIGINS)
def test_a_malformed_origin_is_refused_not_a_500(
    server: DualcastProcess, http: httpx.Client, origin: str
) -> None:
    for path in ("/api/me", "/api/overview", "/api/sse"):
        answer = http.get(path, headers={"Origin": origin})
        assert answer.status_code == 403, (path, answer.text)
        assert answer.json()["error"] == "bad_origin"
    preflight = http.options("/api/events", headers={
        "Origin": origin, "Access-Control-Request-Method": "GET"})
    assert preflight.status_code == 403, preflight.text
    # a cookie write with it is a cross-site write (CSRF), not a crash
    http.cookies.set("dualcast_token", PUBLISHER)
    try:
        publish = http.post("/api/publish", json={"event": "x"}, headers={"Origin": origin})
        logout = http.post("/api/logout", headers={"Origin": origin})
    finally:
        http.cookies.clear()
    assert (publish.status_code, logout.status_code) == (403, 403), (publish.text, logout.text)
    assert publish.json()["error"] == "cross_site"
    no_traceback(server)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("origin", BAD_ORIGINS)
async def test_a_websocket_with_a_malformed_origin_is_refused_not_a_500(
    server: DualcastProcess, origin: str
) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(f"{server.ws_url}/api/ws",
                                      additional_headers={"Origin": origin}):
            pass
    assert refused.value.response.status_code == 403
    # the server still serves WebSockets
    async with websockets.connect(f"{server.ws_url}/api/ws?token={USER}") as conn:
        welcome = await asyncio.wait_for(conn.recv(), 5)
        assert '"welcome"' in str(welcome)
    no_traceback(server)


def open_streams(http: httpx.Client, transport: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(f'dualcast_connections{{transport="{transport}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no dualcast_connections in /metrics")


@pytest.mark.timeout(60)
def test_head_of_the_sse_stream_ends_and_frees_the_connection(
    server: DualcastProcess, http: httpx.Client
) -> None:
    """HEAD has no body, so a client takes the headers as the whole answer and sends its
    next request on the same connection: that request must be answered, and the HEAD
    must not stay open as a stream behind the client's back."""
    with httpx.Client(base_url=server.url, timeout=5,
                      limits=httpx.Limits(max_connections=1)) as client:
        for _ in range(3):
            head = client.head("/api/sse", params={"token": USER})
            assert head.status_code == 200
            assert head.headers["content-type"].startswith("text/event-stream")
            assert client.get("/healthz").status_code == 200  # same connection: answered
        refused = client.head("/api/sse", params={"rooms": "admin", "token": USER})
        assert refused.status_code == 403  # GET's status, for HEAD too
        assert open_streams(http, "sse") == 0
    no_traceback(server)


@pytest.mark.timeout(60)
def test_head_of_a_long_poll_is_answered_at_once(server: DualcastProcess) -> None:
    """A probe's HEAD /api/events waited out the whole poll (30 s) for headers only."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        head = client.head("/api/events", params={"token": USER, "timeout": "30"})
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-type"] == "application/json"
        refused = client.head("/api/events", params={"rooms": "admin", "token": USER})
        assert refused.status_code == 403  # GET's status, for HEAD too
    no_traceback(server)


#: Digits of other scripts: `int()` reads each as a number, no stream id is spelt so.
FOREIGN_DIGITS = ["\u0661\u0667-0", "1-\u0660", "\uff11\uff12\uff13", "\u09e7"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cursor", FOREIGN_DIGITS)
async def test_a_cursor_in_other_digits_is_refused(server: DualcastProcess, cursor: str) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        poll = await client.get("/api/events", params={"after": cursor, "timeout": "0"})
        assert poll.status_code == 400, poll.text
        assert poll.json()["error"] == "bad_cursor"
        sse = await client.get("/api/sse", params={"last_event_id": cursor})
        assert sse.status_code == 400, sse.text
        assert sse.json()["error"] == "bad_cursor"
    query = httpx.QueryParams({"last_event_id": cursor})
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(f"{server.ws_url}/api/ws?{query}"):
            pass
    assert refused.value.response.status_code == 400
    no_traceback(server)


async def answer_to(server: DualcastProcess, pieces: list[bytes]) -> tuple[bytes, bool]:
    """What the server answers to a request sent in `pieces` (each its own write), read
    as it arrives (a close while we still send may reset the connection, and a reset
    discards what was not read yet), and whether the server ended the connection
    within 10 s. Sending stops once the server has closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    got = bytearray()

    async def read() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                got.extend(chunk)

    reading = asyncio.create_task(read())
    try:
        for piece in pieces:
            if reading.done():
                break
            writer.write(piece)
            try:
                await writer.drain()
            except ConnectionError:
                break
        try:
            await asyncio.wait_for(asyncio.shield(reading), 10)
        except TimeoutError:
            return bytes(got), False
        return bytes(got), True
    finally:
        reading.cancel()
        writer.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["headers", "one header", "url", "websocket"])
async def test_a_request_head_without_end_is_refused(server: DualcastProcess, where: str) -> None:
    """httptools keeps every header byte it is sent until the head ends: a client that
    never ends it grew the server's memory without bound. Past the limit: 431, closed."""
    line = b"X-Junk: " + b"j" * 1000 + b"\r\n"
    starts = {
        "headers": (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", line),
        "one header": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-One: ", b"j" * 1000),
        "url": (b"GET /healthz?q=", b"j" * 1000),
        "websocket": (b"GET /api/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\n", line),
    }
    start, piece = starts[where]
    answer, closed = await answer_to(server, [start, *([piece] * 1000)])  # 1 MB, never ended
    assert closed, f"the connection is still open after {answer[:200]!r}"
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        # a large head that ends is served as before, and so is everyone else
        big = await client.get("/api/me", headers={"X-Big": "b" * 40_000},
                               params={"token": USER})
        assert big.status_code == 200 and big.json()["sub"] == "456"
    no_traceback(server)


@pytest.mark.timeout(60)
async def test_a_connection_without_a_whole_request_head_is_closed_in_time(
    server: DualcastProcess,
) -> None:
    """Connect and send nothing, or half a head (also on a long-poller's kept
    connection), or a blank line after an answer: each held a file descriptor for as
    long as the client liked. Now each is closed after HEAD_TIMEOUT, and streams whose
    heads ended are not touched."""
    async def opened(first: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        if first:
            writer.write(first)
            await writer.drain()
        return reader, writer

    async def closed_by_server(reader: asyncio.StreamReader) -> float:
        start = asyncio.get_running_loop().time()
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        return asyncio.get_running_loop().time() - start

    poll = b"GET /api/events?timeout=0 HTTP/1.1\r\nHost: x\r\n"
    kept_reader, kept_writer = await opened(poll + b"\r\n")  # answered, then kept alive
    answer = await asyncio.wait_for(kept_reader.readuntil(b"\r\n\r\n"), 10)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    await asyncio.wait_for(kept_reader.readexactly(
        int(answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0])), 10)
    kept_writer.write(poll)  # half of the next poll's head
    blank_reader, blank_writer = await opened(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await asyncio.wait_for(blank_reader.readuntil(b"\r\n\r\n"), 10)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    blank_writer.write(b"\r\n")  # a blank line between requests: no head begins
    idle = [await opened(), await opened(poll), await opened(b"GET /api/sse?rooms=a"),
            (kept_reader, kept_writer), (blank_reader, blank_writer)]
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        async with client.stream("GET", "/api/sse", params={"token": USER}) as stream, \
                websockets.connect(f"{server.ws_url}/api/ws?token={USER}") as conn:
            assert '"welcome"' in str(await asyncio.wait_for(conn.recv(), 5))
            lines = stream.aiter_lines()
            while "event: welcome" not in await anext(lines):
                pass
            waited = await asyncio.wait_for(
                asyncio.gather(*(closed_by_server(reader) for reader, _ in idle)), 30)
            assert max(waited) < 25, waited
            # the streams whose heads had ended are still served
            await conn.send('{"type":"ping"}')
            assert await asyncio.wait_for(conn.recv(), 5) == '{"type":"pong"}'
            sent = await client.post("/api/publish", json={"event": "after_idle"},
                                     headers={"Authorization": f"Bearer {PUBLISHER}"})
            assert sent.status_code == 202
            while "after_idle" not in await asyncio.wait_for(anext(lines), 10):
                pass
    for _, writer in idle:
        writer.close()
    no_traceback(server)


@pytest.mark.timeout(60)
async def test_a_producer_that_leaves_mid_body_leaves_no_traceback(
    server: DualcastProcess,
) -> None:
    """A publish whose client goes before its body is whole (a killed producer, a
    dropped network) has nobody to answer; it was an ASGI traceback in the log."""
    head = (f"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUBLISHER}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
    for _ in range(3):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(head + b'{"event": "cut')
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        # (requests after the cut ones: the server has handled those cuts by their answer)
        for _ in range(3):
            sent = await client.post("/api/publish", json={"event": "whole"},
                                     headers={"Authorization": f"Bearer {PUBLISHER}"})
            assert sent.status_code == 202
        events = await client.get("/api/events", params={"after": "0", "timeout": "0"})
        assert "cut" not in [e["event"] for e in events.json()["events"]]
    no_traceback(server)


#: A signed token whose `exp` is an integer no float holds (PyJWT checks it as an int).
HUGE_EXP = jwt.encode({"sub": "456", "exp": 10**400}, SECRET, algorithm="HS256")


@pytest.mark.timeout(60)
async def test_a_token_with_an_exp_past_any_float_is_refused_not_a_500(
    server: DualcastProcess,
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        for path in ("/api/me", "/api/sse", "/api/events", "/api/overview"):
            answer = await client.get(path, params={"token": HUGE_EXP, "timeout": "0"})
            assert answer.status_code == 401, (path, answer.text)
            assert answer.json()["error"] == "invalid_token"
    async with websockets.connect(f"{server.ws_url}/api/ws?token={HUGE_EXP}") as conn:
        frame = json.loads(await asyncio.wait_for(conn.recv(), 5))
        assert (frame["type"], frame["code"]) == ("error", "invalid_token")
    no_traceback(server)


def test_a_hook_answer_with_an_exp_past_any_float_is_the_hooks_fault() -> None:
    with pytest.raises(HookUnavailable):
        parse_answer({"sub": "456", "exp": 10**400}, time.time(), 60.0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rooms", [",", ", ,", ",,,"])
async def test_a_rooms_list_of_only_commas_names_no_room(
    server: DualcastProcess, rooms: str
) -> None:
    """DESIGN: a subscriber that names no rooms joins every room its token allows. `?rooms=`
    did; `?rooms=,` (an empty list joined with commas) joined none, not even user-<sub>."""
    expected = ["ops", "user-456"]
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        async with client.stream("GET", "/api/sse",
                                 params={"token": USER, "rooms": rooms}) as stream:
            lines = stream.aiter_lines()
            while not (line := await asyncio.wait_for(anext(lines), 10)).startswith("data:"):
                pass
            assert sorted(json.loads(line[5:])["rooms"]) == expected
        overview = await client.get("/api/overview", params={"token": USER, "rooms": rooms})
        assert overview.status_code == 200
    query = httpx.QueryParams({"token": USER, "rooms": rooms})
    async with websockets.connect(f"{server.ws_url}/api/ws?{query}") as conn:
        welcome = json.loads(await asyncio.wait_for(conn.recv(), 5))
        assert sorted(welcome["rooms"]) == expected
    no_traceback(server)


def masked_text(text: str) -> bytes:
    """A client's text frame (masked, RFC 6455 5.3), payload under 126 bytes."""
    payload, mask = text.encode(), b"\x01\x02\x03\x04"
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(
        b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.timeout(60)
async def test_frames_sent_behind_the_upgrade_request_are_read(server: DualcastProcess) -> None:
    """A client that writes its first frames without waiting for the 101 (in one write
    with the request): uvicorn hands the request alone to the WebSocket and they were
    dropped, the client's first `ping`/`join` never answered."""
    request = (f"GET /api/ws?token={USER}&rooms=ops HTTP/1.1\r\nHost: x\r\n"
               "Upgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request + masked_text('{"type":"ping"}')
                     + masked_text('{"type":"join","room":"user-456"}'))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 "), head
        frames = []
        while len(frames) < 3:
            first, length = await asyncio.wait_for(reader.readexactly(2), 10)
            assert first == 0x81 and length < 126, (first, length)  # short text frames
            frames.append(json.loads(await asyncio.wait_for(reader.readexactly(length), 10)))
        assert [f["type"] for f in frames] == ["welcome", "pong", "joined"], frames
    finally:
        writer.close()
    no_traceback(server)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("query", ["token=not-a-token", f"token={token('1', ttl=-10)}"])
async def test_a_client_gone_before_its_token_refusal_leaves_no_traceback(
    server: DualcastProcess, query: str,
) -> None:
    """A refused token is told in an `error` frame and a 1008 after the 101; a client
    that sent its close frame right behind the upgrade (or left) was gone by then, and
    each such connect logged 'Exception in ASGI application' with its traceback."""
    request = (f"GET /api/ws?{query} HTTP/1.1\r\nHost: x\r\n"
               "Upgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    close = bytes([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8])  # masked close 1000
    for _ in range(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request + close)
        await writer.drain()
        await asyncio.wait_for(reader.read(), 10)  # until the server closes
        writer.close()
    async with websockets.connect(server.ws_url + "/api/ws") as ws:  # and it goes on
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "welcome"
    no_traceback(server)


@pytest.mark.timeout(30)
async def test_a_text_frame_that_is_not_utf8_is_closed_1007_without_a_traceback(
    server: DualcastProcess,
) -> None:
    """uvicorn closes such a client with 1007, as it should, and logged it at ERROR with a
    whole UnicodeDecodeError traceback, one per client: now one INFO line."""
    from websockets.frames import Frame, Opcode

    before = server.log().count("Invalid UTF-8 sequence received from client.")
    async with websockets.connect(server.ws_url + "/api/ws") as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "welcome"
        ws.protocol.send_frame(Frame(Opcode.TEXT, b'{"type":"ping","x":"\xff"}'))
        ws.send_data()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
    await wait_for(lambda: server.log().count("Invalid UTF-8 sequence received from client.")
                   > before, 10, "the line")
    assert "INFO:     Invalid UTF-8 sequence received from client." in server.log()
    no_traceback(server)


class _Transport(asyncio.Transport):
    """Just enough of a socket's transport for the HTTP protocol to read a request."""

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


@pytest.mark.timeout(30)
async def test_the_head_limits_cost_a_long_lived_connection_no_memory() -> None:
    """The request-head limits keep their state in one attribute: four more attributes
    on uvicorn's protocol object gave every connection that stays on it (an SSE stream)
    a dict of its own instead of the shared-key one, 1.3 KB more per idle SSE stream."""
    import sys

    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from dualcast.upgrade import HTTP_PROTOCOL

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        assert callable(send)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    config = Config(app, http=HTTP_PROTOCOL, log_level="warning")
    config.load()
    protocol = HTTP_PROTOCOL(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(_Transport())
    shared = sys.getsizeof(protocol.__dict__)
    protocol.data_received(b"GET /api/sse HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_for(lambda: protocol.cycle is not None and protocol.cycle.response_complete,
                   10, "the answer")  # (the response cycle runs as a task)
    assert sys.getsizeof(protocol.__dict__) == shared
    protocol.connection_lost(None)
