"""A WebSocket upgrade answered from httptools' parse (`dualcast.upgrade`) gets, byte for
byte, the answer uvicorn's own path gives: the same 101 and scope for the requests it
takes, the same refusal for those it hands back.

Two in-process uvicorn servers, one with uvicorn's httptools protocol and one with
`UpgradeProtocol`, both with `dualcast.ws_protocol`'s WebSocket protocol, serve a small
app that shows the client its scope in the first frame (or refuses, as dualcast does).
Each request goes to both; their answers must match once the Date values are masked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from dualcast.direct import text_frame_header
from dualcast.upgrade import HTTP_PROTOCOL, KNOWN, MAX_LINE_LENGTH, plain_handshake
from dualcast.ws_protocol import Handshake, WebSocketProtocol
from tests.harness.wire import mask_frame

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not KNOWN, reason="other uvicorn/websockets: uvicorn's path")]

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
SERVER_CLOSE = b"\x88\x02\x03\xe8"  # the app's close (1000), unmasked


class Counted(WebSocketProtocol):
    """Counts the handshakes that took the parsed path."""

    parsed = 0
    accepted_with = 0

    def handshake_parsed(self, handshake: Handshake) -> None:
        type(self).parsed += 1
        super().handshake_parsed(handshake)


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http":  # the addresses uvicorn's protocol put in the scope
        body = json.dumps({"server": scope["server"], "client": scope["client"]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})
        return
    assert scope["type"] == "websocket"
    await receive()  # websocket.connect
    headers = dict(scope["headers"])
    if headers.get(b"origin") == b"http://refused.example":  # dualcast's 403, by denial
        await send({"type": "websocket.http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "websocket.http.response.body", "body": b"origin refused"})
        return
    if scope["query_string"] == b"close":  # closing before accepting: uvicorn's 403
        await send({"type": "websocket.close", "code": 1008})
        return
    shown = {k: scope[k] for k in ("path", "root_path", "scheme", "http_version",
                                   "subprotocols")}
    shown.update({k: scope[k].decode("latin-1") for k in ("raw_path", "query_string")})
    if scope["query_string"] == b"addresses":  # they differ between the two servers
        shown.update(server=scope["server"], client=scope["client"])
    shown["headers"] = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]]
    text = json.dumps(shown)
    protocol = getattr(send, "__self__", None)
    payload = text.encode()
    if (scope["query_string"] == b"with" and isinstance(protocol, WebSocketProtocol)
            and protocol.accept_with(text_frame_header(len(payload)) + payload)):
        # dualcast's accept: the 101 and the first frame in one write (the parsed path's)
        Counted.accepted_with += 1
    else:
        offered = scope["subprotocols"]
        await send({"type": "websocket.accept", "subprotocol": offered[0] if offered else None})
        await send({"type": "websocket.send", "text": text})
    await send({"type": "websocket.close", "code": 1000})
    while (await receive())["type"] != "websocket.disconnect":
        pass


async def serve(http: Any) -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=http, ws=Counted, ws_per_message_deflate=False,
                            log_level="critical", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()


@pytest.fixture
async def ports() -> AsyncIterator[tuple[int, int]]:
    old = serve("httptools")
    new = serve(HTTP_PROTOCOL)
    old_port, new_port = await anext(old), await anext(new)
    yield old_port, new_port
    for gen in (old, new):
        with pytest.raises(StopAsyncIteration):
            await anext(gen)


async def answer(port: int, request: bytes) -> bytes:
    """Everything the server sends for `request`, until it closes or sends the app's
    close frame (then the client answers it, as a client would)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = b""
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            while SERVER_CLOSE not in got:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                got += chunk
        if SERVER_CLOSE in got:
            writer.write(mask_frame(0x8, b"\x03\xe8"))
    finally:
        writer.close()
    return re.sub(rb"(?im)^(date: )[^\r]*", rb"\1-", got)


def request(target: str = "/ws", lines: str = "", key: str = KEY, version: str = "13",
            method: str = "GET") -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: {version}\r\n{lines}\r\n").encode("latin-1")


#: Requests the parsed path takes, and what the answer starts with.
TAKEN = {
    "plain": request(),
    "query": request("/ws/a%20b?token=x.y.z&room=r%2F1"),
    "subprotocol": request(lines="Sec-WebSocket-Protocol: chat, superchat\r\n"),
    "browser": request(lines="Origin: http://app.example\r\nConnection: keep-alive, Upgrade\r\n"
                       "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
                       "User-Agent: Mozilla/5.0 (X11)\r\nCookie: a=b; c=d\r\n"),
    "latin-1 value": request(lines="X-Name: caf\xe9\r\n"),
    "origin refused": request(lines="Origin: http://refused.example\r\n"),
    "closed before accepting": request("/ws?close"),
    "accepted with its first frame": request("/ws?with"),
}
#: Requests the parsed path hands back to uvicorn's.
HANDED_BACK = {
    "bad key": request(key="not-a-key"),
    "short key": request(key=base64.b64encode(os.urandom(8)).decode()),
    "bad version": request(version="8"),
    "no version": request().replace(b"Sec-WebSocket-Version: 13\r\n", b""),
    "two keys": request(lines=f"Sec-WebSocket-Key: {KEY}\r\n"),
    "two origins": request(lines="Origin: http://a.example\r\nOrigin: http://b.example\r\n"),
    "post": request(method="POST"),
    "bad subprotocol list": request(lines="Sec-WebSocket-Protocol: chat,,\r\n"),
    "body": request(lines="Content-Length: 5\r\n"),  # answered by a close, no status
    "empty body": request(lines="Content-Length: 0\r\n"),
    "header line too long": request(lines=f"X-Long: {'x' * (MAX_LINE_LENGTH + 8)}\r\n"),
    "frames behind the request": request() + mask_frame(0x9, b"ping"),
}


@pytest.mark.parametrize("name", list(TAKEN) + list(HANDED_BACK))
async def test_the_answer_is_uvicorns_byte_for_byte(ports: tuple[int, int], name: str) -> None:
    raw = {**TAKEN, **HANDED_BACK}[name]
    old_port, new_port = ports
    before = Counted.parsed
    old = await answer(old_port, raw)
    assert Counted.parsed == before  # uvicorn's own protocol never parses for it
    accepted_with = Counted.accepted_with
    new = await answer(new_port, raw)
    assert Counted.parsed == before + (name in TAKEN)
    assert Counted.accepted_with == accepted_with + (name == "accepted with its first frame")
    if name == "frames behind the request":
        # uvicorn drops what follows the request in its read; ours reads it once the 101
        # is out (`WebSocketProtocol.hold_early`): the ping is answered, after the 101
        head, sep, rest = old.partition(b"\r\n\r\n")
        old = head + sep + b"\x8a\x04ping" + rest
    assert new == old


async def test_a_taken_upgrade_is_answered_as_a_websocket(ports: tuple[int, int]) -> None:
    got = await answer(ports[1], TAKEN["query"])
    head, _, frames = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    assert frames[0] == 0x81  # the scope, as text
    length = frames[1]
    scope = json.loads(frames[2:2 + length] if length < 126 else frames[4:4 + int.from_bytes(
        frames[2:4], "big")])
    assert scope["path"] == "/ws/a b"
    assert scope["raw_path"] == "/ws/a%20b"
    assert scope["query_string"] == "token=x.y.z&room=r%2F1"


async def test_the_scope_has_the_connections_addresses(ports: tuple[int, int]) -> None:
    """Server and client addresses come from the transport (`dualcast.ws_protocol.
    addresses`), not from a socket object per look, and say what uvicorn's say."""
    for port in ports:
        for request in (b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
                        (f"GET /ws?addresses HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
                         "Sec-WebSocket-Version: 13\r\n\r\n").encode()):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                mine = writer.get_extra_info("sockname")
                writer.write(request)
                got = await asyncio.wait_for(reader.readuntil(b"}"), 10)
            finally:
                writer.close()
            shown = json.loads(got[got.index(b"{"):])
            assert shown["server"] == ["127.0.0.1", port]
            assert shown["client"] == [mine[0], mine[1]]


def test_only_what_websockets_accepts_is_taken() -> None:
    def check(lines: list[tuple[bytes, bytes]], method: str = "GET",
              url: bytes = b"/ws") -> Handshake | None:
        base = [(b"host", b"h"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                (b"sec-websocket-key", KEY.encode()), (b"sec-websocket-version", b"13")]
        return plain_handshake(method, url, base + lines, extensions_on=False)

    plain = check([])
    assert plain is not None and plain.accept == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert check([(b"x", b"trailing space ")]) is None  # websockets would strip it
    assert check([(b"x", b"ctl\x01")]) is None
    assert check([(b"upgrade", b"websocket")]) is None  # two Upgrade values
    assert check([(b"sec-websocket-protocol", b"a b")]) is None
    assert check([], url="/caf\xe9".encode("latin-1")) is None
    assert check([(f"x-{i}".encode(), b"v") for i in range(124)]) is None  # 129 headers
    assert check([(b"x-long", b"v" * (MAX_LINE_LENGTH + 8))]) is None
    offered = check([(b"sec-websocket-protocol", b"a, b"), (b"sec-websocket-protocol", b"c")])
    assert offered is not None and offered.subprotocols == ["a", "b", "c"]
    extensions = [(b"sec-websocket-extensions", b"permessage-deflate")]
    assert check(extensions) is not None
    base = [(b"upgrade", b"websocket"), (b"connection", b"upgrade"),
            (b"sec-websocket-key", KEY.encode()), (b"sec-websocket-version", b"13")]
    assert plain_handshake("GET", b"/", base + extensions, extensions_on=True) is None
