"""The lean clients parse what real servers send, however the bytes are split."""

from __future__ import annotations

import random
import time

import orjson
import pytest

from bench.clients import DualcastWS, PollClient, SocketIOWS, SSEClient, Tally


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def feed(client: object, data: bytes, rng: random.Random) -> None:
    """Deliver `data` in random pieces, as TCP may."""
    i = 0
    while i < len(data):
        n = rng.randint(1, 40)
        client.data_received(data[i : i + n])  # type: ignore[attr-defined]
        i += n


def ws_frame(text: str | bytes, opcode: int = 1) -> bytes:
    payload = text.encode() if isinstance(text, str) else text
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
    return head + payload


def event(seq: int) -> dict[str, object]:
    return {"type": "event", "id": f"1-{seq}", "event": "bench",
            "data": {"seq": seq, "t": time.time()}, "ts": 1}


async def test_dualcast_ws_events_and_batches_split_anywhere() -> None:
    rng = random.Random(1)
    client = DualcastWS(Tally(), "h", 1, "/api/ws")
    client.connection_made(FakeTransport())  # type: ignore[arg-type]
    stream = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    stream += ws_frame(orjson.dumps({"type": "welcome", "rooms": [], "last_id": "0-0"}))
    stream += ws_frame(orjson.dumps(event(0)))
    big = {"type": "batch", "events": [event(i) for i in range(1, 399)]}  # > 16 KiB: 16-bit length
    stream += ws_frame(orjson.dumps(big))
    stream += ws_frame(b"ping", opcode=0x9)
    stream += ws_frame(orjson.dumps(event(399)))
    stream += ws_frame(orjson.dumps(event(5)))  # a duplicate
    feed(client, stream, rng)
    assert client.ready.done()
    assert client.count == 400 and client.dup == 1 and client.ooo == 0
    pong = client.transport.written[-1]  # type: ignore[union-attr]
    assert pong[0] == 0x8A and pong[1] & 0x80  # masked pong


async def test_sse_chunked_messages_split_anywhere() -> None:
    rng = random.Random(2)
    client = SSEClient(Tally(), "h", 1, "/api/sse")
    client.connection_made(FakeTransport())  # type: ignore[arg-type]
    body = b"retry: 3000\nevent: welcome\ndata: {\"rooms\":[]}\n\n"
    for seq in range(50):
        body += b"id: 1-%d\r\nevent: bench\r\ndata: %s\r\n\r\n" % (
            seq, orjson.dumps({"seq": seq, "t": time.time()}))
    body += b": ping\n\n"
    chunks = b""
    i = 0
    while i < len(body):
        n = rng.randint(1, 300)
        part = body[i : i + n]
        chunks += b"%x\r\n%s\r\n" % (len(part), part)
        i += n
    stream = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunks
    feed(client, stream, rng)
    assert client.ready.done()
    assert client.count == 50 and client.dup == 0


async def test_poll_client_follows_last_id() -> None:
    client = PollClient(Tally(), "h", 1, "/api/events")
    transport = FakeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    assert b"timeout=0" in transport.written[-1]
    answer = orjson.dumps({"events": [], "last_id": "5-0", "reset": False})
    client.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
    assert b"after=5-0" in transport.written[-1]
    events = [{"id": f"6-{i}", "event": "bench", "data": {"seq": i, "t": time.time()}, "ts": 1}
              for i in range(3)]
    answer = orjson.dumps({"events": events, "last_id": "6-2", "reset": False})
    client.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
    assert client.count == 3
    assert b"after=6-2" in transport.written[-1]


async def test_socketio_handshake_ping_and_events() -> None:
    client = SocketIOWS(Tally(), "h", 1, "/socket.io/?EIO=4&transport=websocket")
    transport = FakeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    client.data_received(b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + ws_frame('0{"sid":"x"}'))
    assert transport.written[-1][0] == 0x81  # "40" sent, masked text
    client.data_received(ws_frame('40{"sid":"y"}') + ws_frame("2"))
    assert client.ready.done()
    data = orjson.dumps(["bench", {"seq": 0, "t": time.time()}]).decode()
    client.data_received(ws_frame("42" + data))
    assert client.count == 1


@pytest.mark.parametrize("status", [b"403 Forbidden", b"400 Bad Request"])
async def test_refused_handshake_fails_ready(status: bytes) -> None:
    client = DualcastWS(Tally(), "h", 1, "/api/ws")
    client.connection_made(FakeTransport())  # type: ignore[arg-type]
    client.data_received(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\n\r\n")
    with pytest.raises(ConnectionError):
        client.ready.result()
