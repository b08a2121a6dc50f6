"""The long-poll connection path (server/transports/poll_conn.py) answers as uvicorn did.

After a first poll, a keep-alive connection's plain polls are read and answered by
the poll connection instead of uvicorn. These tests serve the real app with the
production uvicorn config in process, so they can see which protocol holds the
connection, and compare every answer on a taken-over connection with the answer
to the same request on a fresh connection (which uvicorn reads): same status,
same headers but the date, same body. Events polled on one connection arrive
all, once, in order.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import uvicorn

from dualcast.app import create_app
from dualcast.config import Settings
from dualcast.serve import uvicorn_config
from dualcast.transports.poll_conn import PollConnection, parse_poll
from tests.conftest import SECRET, token
from tests.harness.probes import metric
from tests.harness.procs import DualcastProcess
from tests.harness.waits import wait_for


@dataclass
class Served:
    server: uvicorn.Server
    port: int
    app: Any

    def poll_connections(self) -> int:
        """How many of the server's connections the poll connection reads."""
        return sum(isinstance(c.transport.get_protocol(), PollConnection)
                   for c in self.server.server_state.connections)


@pytest.fixture
async def served(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    async with serving(monkeypatch, Settings(secret=SECRET, max_connections_per_address=0)) as s:
        yield s


@pytest.fixture
async def capped(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    """One waiting poll per client address."""
    async with serving(monkeypatch, Settings(secret=SECRET, max_connections_per_address=1)) as s:
        yield s


@asynccontextmanager
async def serving(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> AsyncIterator[Served]:
    app = create_app(settings)
    config = uvicorn_config(settings, app)
    config.host, config.port = "127.0.0.1", 0
    config.timeout_keep_alive = 1  # (uvicorn's default is 5 s)
    # As `dualcast serve` runs: no access log (pytest's capture handlers would make uvicorn
    # log each request, and a logged request is never answered in one write or taken over).
    monkeypatch.setattr(logging.getLogger("uvicorn.access"), "hasHandlers", lambda: False)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.01)
        yield Served(server, server.servers[0].sockets[0].getsockname()[1], app)
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)


class Client:
    """One keep-alive HTTP/1.1 connection; `ask` sends raw request bytes, reads one answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def ask(self, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.lower()] = value.strip()
        if b"content-length" in headers:
            body = await self.reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while size := int((await self.reader.readline()).strip(), 16):
                body += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readline()
        else:
            body = await self.reader.read()
        headers.pop(b"date", None)
        return status, headers, body

    async def closed(self) -> bool:
        return await self.reader.read() == b""

    def close(self) -> None:
        self.writer.close()


def get(target: str, extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()


async def taken_over(served: Served, extra: str = "") -> Client:
    """A connection whose first poll uvicorn answered: the poll connection reads it now."""
    client = await Client.open(served.port)
    before = served.poll_connections()
    status, _, _ = await client.ask(get("/api/events?timeout=0", extra))
    assert status == 200
    assert served.poll_connections() == before + 1
    return client


async def publish(served: Served, n: int, rooms: list[str] | None = None) -> None:
    client = await Client.open(served.port)
    body = orjson.dumps({"event": "tick", "data": {"n": n}, **({"rooms": rooms} if rooms else {})})
    status, _, _ = await client.ask(
        b"POST /api/publish HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
        % (token("p", publish=True).encode(), len(body), body))
    client.close()
    assert status == 202


@pytest.mark.timeout(30)
async def test_polls_on_one_connection_get_every_event_once_in_order(served: Served) -> None:
    client = await taken_over(served)
    _, _, body = await client.ask(get("/api/events?timeout=0"))
    cursor = orjson.loads(body)["last_id"]
    seen: list[int] = []
    for n in range(41):
        if n < 40:
            await publish(served, n)
        if n % 3 == 0:  # sometimes several events wait, sometimes the poll waits for one
            continue
        while len(seen) < min(n + 1, 40):
            status, _, body = await client.ask(get(f"/api/events?after={cursor}&timeout=5"))
            answer = orjson.loads(body)
            assert status == 200 and answer["reset"] is False
            seen += [e["data"]["n"] for e in answer["events"]]
            cursor = answer["last_id"]
    assert seen == list(range(40))
    assert served.poll_connections() == 1  # every one of those polls was read there
    client.close()


@pytest.mark.timeout(30)
async def test_pollers_at_one_cursor_each_get_their_rooms_events_and_no_stale_answer(
        served: Served) -> None:
    """Pollers at the same cursor share an answer only when their rooms are the same,
    and only until the next batch."""
    tokens = {"a": token("a", rooms=["red"]), "b": token("b", rooms=["blue"]),
              "a2": token("a2", rooms=["red"]), "anon": ""}
    clients = {name: await taken_over(served, f"Authorization: Bearer {tok}\r\n" if tok else "")
               for name, tok in tokens.items()}
    await publish(served, -1)  # a cursor after it is in the hub's window, not "0-0"
    _, _, body = await clients["anon"].ask(get("/api/events?after=0-0&timeout=5"))
    cursor = orjson.loads(body)["last_id"]

    async def poll(name: str, after: str) -> tuple[list[int], str]:
        tok = tokens[name]
        _, _, body = await clients[name].ask(get(
            f"/api/events?after={after}&timeout=5",
            f"Authorization: Bearer {tok}\r\n" if tok else ""))
        answer = orjson.loads(body)
        return [e["data"]["n"] for e in answer["events"]], answer["last_id"]

    async def until(name: str, last: int) -> None:
        """Until `name` is answered event `last` (so the hub holds it and those before)."""
        async with asyncio.timeout(10):
            while last not in (await poll(name, cursor))[0]:
                await asyncio.sleep(0.01)

    await publish(served, 0, ["red"])
    await publish(served, 1)
    await publish(served, 2, ["blue"])
    await until("b", 2)
    for _ in range(2):  # the second round may be answered from what the first built
        assert (await poll("a", cursor))[0] == [0, 1]
        assert (await poll("a2", cursor))[0] == [0, 1]
        assert (await poll("b", cursor))[0] == [1, 2]
        assert (await poll("anon", cursor))[0] == [1]
    await publish(served, 3)
    await until("a", 3)
    assert (await poll("a", cursor))[0] == [0, 1, 3]
    assert (await poll("a2", cursor))[0] == [0, 1, 3]
    assert (await poll("b", cursor))[0] == [1, 2, 3]
    assert (await poll("anon", cursor))[0] == [1, 3]
    for client in clients.values():
        client.close()


BAD = [
    "/api/events?after=nonsense&timeout=0",  # bad cursor
    "/api/events?timeout=99999",  # bad timeout
    "/api/events?token=not-a-token&timeout=0",  # bad token
    f"/api/events?token={token('u1', rooms=['x'])}&rooms=y&timeout=0",  # forbidden room
    "/api/events?rooms=bad%20name&timeout=0",  # malformed room
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("target", BAD)
async def test_bad_input_gets_the_answer_uvicorn_gave(served: Served, target: str) -> None:
    fresh = await Client.open(served.port)
    expected = await fresh.ask(get(target))
    fresh.close()
    assert expected[0] in (400, 401, 403)
    client = await taken_over(served)
    assert await client.ask(get(target)) == expected
    status, _, _ = await client.ask(get("/api/events?timeout=0"))  # and it goes on
    assert status == 200
    client.close()


OTHERS = [
    b"POST /api/events HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n",  # 405
    b"HEAD /api/events?timeout=0 HTTP/1.1\r\nHost: test\r\n\r\n",
    get("/healthz"),
    get("/api/%65vents?timeout=0"),  # the same path, encoded: uvicorn decodes it
    get("/api/events?timeout=0", "Origin: http://elsewhere.example\r\n"),  # CORS refusal
    get("/api/events?timeout=0", "Cookie: a=b\r\nAuthorization: Basic eDp5\r\n"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("request_bytes", OTHERS)
async def test_other_requests_get_the_answer_uvicorn_gave(served: Served,
                                                          request_bytes: bytes) -> None:
    fresh = await Client.open(served.port)
    if request_bytes.startswith(b"HEAD"):
        fresh.writer.write(request_bytes)  # no body follows a HEAD answer's length
        expected_head = await fresh.reader.readuntil(b"\r\n\r\n")
    else:
        expected = await fresh.ask(request_bytes)
    fresh.close()
    client = await taken_over(served)
    if request_bytes.startswith(b"HEAD"):
        client.writer.write(request_bytes)
        head = await client.reader.readuntil(b"\r\n\r\n")
        strip = [line for line in head.split(b"\r\n") if not line.startswith(b"date:")]
        assert strip == [line for line in expected_head.split(b"\r\n")
                         if not line.startswith(b"date:")]
    else:
        assert await client.ask(request_bytes) == expected
    status, _, _ = await client.ask(get("/api/events?timeout=0"))  # the connection goes on
    assert status == 200
    client.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("header", ["X-A: a\x00b", "Cookie: dualcast_token=a\x01b", "X-A: a\x7f"])
async def test_a_control_character_in_a_header_gets_uvicorns_400(served: Served,
                                                                 header: str) -> None:
    """httptools refuses a header value holding a control character (400, connection
    closed); the poll connection served such a poll, and passed its Cookie on."""
    request = get("/api/events?timeout=0", header + "\r\n")
    fresh = await Client.open(served.port)
    expected = await fresh.ask(request)
    fresh.close()
    assert expected[0] == 400
    client = await taken_over(served)
    assert await client.ask(request) == expected
    assert await client.closed()


@pytest.mark.timeout(30)
async def test_a_request_in_pieces_and_two_at_once_are_answered_in_order(
        served: Served) -> None:
    client = await taken_over(served)
    request = get("/api/events?timeout=0")
    for byte in request[:-1]:  # one byte at a time
        client.writer.write(bytes([byte]))
        await client.writer.drain()
    status, _, body = await client.ask(request[-1:])
    assert status == 200 and orjson.loads(body)["events"] == []
    # pipelined: a poll that waits, then a request that is not a poll, sent together
    _, _, body = await client.ask(get("/api/events?timeout=0"))
    cursor = orjson.loads(body)["last_id"]
    client.writer.write(get(f"/api/events?after={cursor}&timeout=5") + get("/healthz"))
    await publish(served, 1)
    first = await client.ask(b"")
    second = await client.ask(b"")
    assert first[0] == 200 and [e["data"] for e in orjson.loads(first[2])["events"]] == [{"n": 1}]
    assert second[0] == 200 and b"events" not in second[2]
    client.close()


@pytest.mark.timeout(30)
async def test_connection_close_and_a_closing_client_end_the_connection(
        served: Served) -> None:
    client = await taken_over(served)
    status, headers, _ = await client.ask(get("/api/events?timeout=0", "Connection: close\r\n"))
    assert status == 200 and headers[b"connection"] == b"close"
    assert await client.closed()
    client = await taken_over(served)
    client.writer.write(get("/api/events?timeout=10"))  # waits in the server
    client.writer.close()
    async with asyncio.timeout(10):
        while served.server.server_state.connections:
            await asyncio.sleep(0.01)


def test_only_a_plain_poll_head_is_parsed() -> None:
    plain = b"GET /api/events?after=1-0&timeout=5 HTTP/1.1\r\nHost: x\r\nAccept:  */* "
    assert parse_poll(plain) == (b"after=1-0&timeout=5", [(b"host", b"x"), (b"accept", b"*/*")],
                                 False)
    assert parse_poll(b"GET /api/events HTTP/1.1\r\nConnection: Keep-Alive") == (
        b"", [(b"connection", b"Keep-Alive")], False)
    assert parse_poll(b"GET /api/events HTTP/1.1\r\nX-A: a\tb\x80") == (  # as httptools
        b"", [(b"x-a", b"a\tb\x80")], False)
    assert parse_poll(b"GET /api/events HTTP/1.1\r\nX-Forwarded-Proto: https") == (
        b"", [(b"x-forwarded-proto", b"https")], True)
    for head in [
        b"GET /api/events HTTP/1.0\r\nHost: x",
        b"POST /api/events HTTP/1.1\r\nHost: x",
        b"GET /api/eventsx HTTP/1.1\r\nHost: x",
        b"GET /api/events/ HTTP/1.1\r\nHost: x",
        b"GET /api/events?a#b HTTP/1.1\r\nHost: x",
        b"GET /api/events?a b HTTP/1.1\r\nHost: x",
        b"GET /api/events HTTP/1.1\r\nHost x",
        b"GET /api/events HTTP/1.1\r\nHost: x\r\n folded",
        b"GET /api/events HTTP/1.1\r\nHost: x\r\nConnection: close",
        b"GET /api/events HTTP/1.1\r\nOrigin: http://a",
        b"GET /api/events HTTP/1.1\r\nContent-Length: 0",
        b"GET /api/events HTTP/1.1\r\nTransfer-Encoding: chunked",
        b"GET /api/events HTTP/1.1\r\nUpgrade: websocket",
        b"GET /api/events HTTP/1.1\r\nExpect: 100-continue",
        b"GET /api/events HTTP/1.1\r\nX-A: a\x00b",
        b"GET /api/events HTTP/1.1\r\nX-A: \x1b[31m",
        b"GET /api/events HTTP/1.1\r\nX-A: a\nb",
    ]:
        assert parse_poll(head) is None, head


FROM_A = "X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\n"
FROM_B = "X-Forwarded-For: 10.0.0.2\r\n"


@pytest.mark.timeout(30)
async def test_a_proxys_forwarded_address_counts_as_uvicorn_sets_it(capped: Served) -> None:
    """Behind a proxy every poll names its client: the per-address cap counts that one."""
    quotas = capped.app.state.dualcast.quotas
    a = await taken_over(capped, FROM_A)
    b = await taken_over(capped, FROM_B)
    _, _, body = await a.ask(get("/api/events?timeout=0", FROM_A))
    a.writer.write(get(f"/api/events?after={orjson.loads(body)['last_id']}&timeout=10", FROM_A))
    async with asyncio.timeout(10):  # 10.0.0.1's poll waits, holding its one slot
        while quotas.held() < 1:
            await asyncio.sleep(0.01)
    status, _, _ = await b.ask(get("/api/events?timeout=0", FROM_B))
    assert status == 200  # another address
    status, _, body = await b.ask(get("/api/events?timeout=0", FROM_A))
    assert status == 429 and orjson.loads(body)["error"] == "too_many_connections"
    assert capped.poll_connections() == 2
    await publish(capped, 7)
    status, _, body = await a.ask(b"")
    assert status == 200 and [e["data"] for e in orjson.loads(body)["events"]] == [{"n": 7}]
    a.close()
    b.close()


@pytest.mark.timeout(30)
async def test_keep_alive_closes_an_idle_connection_never_a_busy_one(served: Served) -> None:
    client = await taken_over(served)
    # a poll that waits longer than the keep-alive timeout (1 s here) is answered...
    status, _, body = await client.ask(get("/api/events?timeout=2"))
    assert status == 200 and orjson.loads(body)["events"] == []
    status, _, _ = await client.ask(get("/api/events?timeout=0"))  # ...and the connection lives
    assert status == 200
    assert await asyncio.wait_for(client.closed(), 10)  # then, idle, it is closed
    assert served.poll_connections() == 0


@pytest.mark.timeout(60)
async def test_a_poll_waiting_on_a_kept_connection_is_answered_when_the_server_stops(
    dualcast: Callable[..., DualcastProcess],
) -> None:
    """SIGTERM closed every connection whose last request uvicorn had answered, and for a
    taken-over connection that is the poll before the one waiting here: each long-poller
    (a browser keeps its connection) lost its poll with no answer at all, a network error,
    where a poll on a new connection was answered. Now it is answered, `connection: close`,
    and then the connection closes."""
    proc = dualcast()
    client = await Client.open(proc.port)
    status, _, body = await client.ask(get("/api/events?timeout=0"))
    assert status == 200
    after = orjson.loads(body)["last_id"]
    waiting = asyncio.create_task(client.ask(get(f"/api/events?timeout=25&after={after}")))
    await wait_for(lambda: metric(proc, "dualcast_connections"), 10, "the poll waiting")
    proc.signal(signal.SIGTERM)
    status, headers, body = await asyncio.wait_for(waiting, 15)
    assert status == 200, body
    assert orjson.loads(body)["events"] == []
    assert headers.get(b"connection") == b"close"
    assert await asyncio.wait_for(client.closed(), 10)
    client.close()
