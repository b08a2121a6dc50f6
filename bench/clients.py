"""Lean load-generator clients: raw asyncio protocols, no client libraries.

Library clients cost 30-70 us of CPU per delivery (PITFALLS.md), which on two
shared cores makes the generator the bottleneck. These speak just enough of
each protocol: a WebSocket handshake and unmasked-server-frame parser (client
frames masked, as RFC 6455 requires), Engine.IO v4 / Socket.IO v5 over that,
and HTTP/1.1 with chunked decoding for SSE and long-polling.

Every client records deliveries of events whose data is `{"seq": n, "t": epoch}`
into a shared `Tally` (latency histogram) and its own seen-map (lost, duplicated,
out of order). Warm-up events carry a negative `seq` and only mark the client warm.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from typing import Any
from urllib.parse import quote

import orjson

# Latency histogram: 50 us buckets up to 1 s, then 10 ms buckets up to 61 s (the last
# bucket also holds anything slower). Cheap to fill, small to ship, exact enough.
FINE_S = 50e-6
FINE_N = 20_000
COARSE_S = 0.01
N_BUCKETS = FINE_N + 6_000


def bucket_of(latency: float) -> int:
    b = int(latency / FINE_S)
    if b < FINE_N:
        return b if b > 0 else 0
    b = FINE_N + int((latency - FINE_N * FINE_S) / COARSE_S)
    return b if b < N_BUCKETS else N_BUCKETS - 1


def bucket_upper(b: int) -> float:
    """The upper bound (s) of bucket `b`."""
    if b < FINE_N:
        return (b + 1) * FINE_S
    return FINE_N * FINE_S + (b - FINE_N + 1) * COARSE_S
_loads = orjson.loads
_now = time.time


class Tally:
    """Deliveries of one worker process: a latency histogram plus totals."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.hist = [0] * N_BUCKETS
        self.max_latency = 0.0
        self.deliveries = 0
        self.first = 0.0
        self.last = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "hist": {i: n for i, n in enumerate(self.hist) if n},
            "max_latency": self.max_latency,
            "deliveries": self.deliveries,
            "first": self.first,
            "last": self.last,
        }


class Client(asyncio.Protocol):
    """Shared bookkeeping; subclasses parse their protocol and call `deliver`."""

    def __init__(self, tally: Tally, host: str, port: int, path: str) -> None:
        self.tally = tally
        self.host = host
        self.port = port
        self.path = path
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.close_reason = ""
        self.warm = False
        self.reset()

    def reset(self) -> None:
        self.seen = bytearray(1024)
        self.count = 0
        self.dup = 0
        self.ooo = 0
        self.last_seq = -1

    # asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request())  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.close_reason:
            self.close_reason = f"connection lost: {exc!r}" if exc else "connection closed"
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(self.close_reason))

    def request(self) -> bytes:
        raise NotImplementedError

    def set_ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def fail(self, reason: str) -> None:
        self.close_reason = reason
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # deliveries ---------------------------------------------------------------------
    def deliver(self, data: Any) -> None:
        """Record one event delivery; `data` is the event's data object."""
        try:
            seq = data["seq"]
            sent = data["t"]
        except (TypeError, KeyError):
            return
        if seq < 0:
            self.warm = True
            return
        now = _now()
        tally = self.tally
        latency = now - sent
        bucket = int(latency / FINE_S)
        if not 0 <= bucket < FINE_N:
            bucket = bucket_of(latency)
        tally.hist[bucket] += 1
        if latency > tally.max_latency:
            tally.max_latency = latency
        tally.deliveries += 1
        if not tally.first:
            tally.first = now
        tally.last = now
        seen = self.seen
        if seq >= len(seen):
            seen.extend(bytes(seq - len(seen) + 4096))
        if seen[seq]:
            self.dup += 1
            return
        seen[seq] = 1
        self.count += 1
        if seq < self.last_seq:
            self.ooo += 1
        else:
            self.last_seq = seq


def _head_end(buf: bytearray) -> int:
    return buf.find(b"\r\n\r\n")


# ----------------------------------------------------------------------------- WebSocket
def mask_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (FIN set, masked with a random key, as servers require)."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    repeated = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")
    return head + key + masked


class WSClient(Client):
    """Minimal RFC 6455 client: handshake, then parse unmasked server frames."""

    def __init__(self, tally: Tally, host: str, port: int, path: str) -> None:
        super().__init__(tally, host, port, path)
        self.upgraded = False
        self.fragments: list[bytes] = []

    def request(self) -> bytes:
        key = base64.b64encode(os.urandom(16)).decode()
        return (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()

    def send_text(self, text: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(mask_frame(0x1, text.encode()))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = _head_end(buf)
            if end < 0:
                return
            status = bytes(buf[:end]).split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" ":
                self.fail(f"handshake refused: {status.decode(errors='replace')}")
                return
            del buf[: end + 4]
            self.upgraded = True
            self.on_open()
        while True:
            n = len(buf)
            if n < 2:
                return
            length = buf[1] & 0x7F
            if length < 126:
                start = 2
            elif length == 126:
                if n < 4:
                    return
                length = (buf[2] << 8) | buf[3]
                start = 4
            else:
                if n < 10:
                    return
                length = int.from_bytes(buf[2:10], "big")
                start = 10
            end = start + length
            if n < end:
                return
            head = buf[0]
            payload = bytes(buf[start:end])
            del buf[:end]
            opcode = head & 0x0F
            if not head & 0x80:  # fragment: keep until FIN
                self.fragments.append(payload)
                continue
            if opcode == 0 and self.fragments:
                payload = b"".join(self.fragments) + payload
                self.fragments.clear()
                opcode = 0x1
            if opcode == 0x1 or opcode == 0x2:
                self.on_message(payload)
            elif opcode == 0x9:
                if self.transport is not None:
                    self.transport.write(mask_frame(0xA, payload))
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close_reason = f"close {code} {payload[2:].decode(errors='replace')}"
                if self.transport is not None:
                    self.transport.write(mask_frame(0x8, payload[:2]))
                    self.transport.close()
                return

    def on_open(self) -> None:
        pass

    def on_message(self, payload: bytes) -> None:
        raise NotImplementedError


class DualcastWS(WSClient):
    """dualcast `/api/ws`: welcome, then `event` frames or coalesced `batch` frames."""

    def on_message(self, payload: bytes) -> None:
        frame = _loads(payload)
        kind = frame.get("type")
        if kind == "batch":
            for item in frame["events"]:
                if item.get("event") == "bench":
                    self.deliver(item.get("data"))
        elif kind == "event":
            if frame.get("event") == "bench":
                self.deliver(frame.get("data"))
        elif kind == "welcome":
            self.set_ready()
        elif kind == "error":
            self.close_reason = f"error frame: {frame}"
            if not self.ready.done():
                self.fail(self.close_reason)


class PlainWS(WSClient):
    """broadcaster peer: a welcome object, then each message is the event data itself."""

    def on_message(self, payload: bytes) -> None:
        frame = _loads(payload)
        if "seq" in frame:
            self.deliver(frame)
        elif frame.get("type") == "welcome":
            self.set_ready()


class SocketIOWS(WSClient):
    """Engine.IO v4 over WebSocket: `0{open}`, `40` connect, `42[event,data]`, `2`/`3`."""

    def on_message(self, payload: bytes) -> None:
        if payload[:2] == b"42":
            name, data = _loads(payload[2:])[:2]
            if name == "bench":
                self.deliver(data)
        elif payload == b"2":
            self.send_text("3")
        elif payload[:1] == b"0":
            self.send_text("40")
        elif payload[:2] == b"40":
            self.set_ready()
        elif payload[:2] == b"44":
            self.fail(f"socket.io connect error: {payload!r}")


# ----------------------------------------------------------------------------- HTTP
class HTTPBody:
    """Incremental HTTP/1.1 response reader: head, then Content-Length or chunked body."""

    def __init__(self) -> None:
        self.status = 0
        self.have_head = False
        self.chunked = False
        self.remaining = -1  # body bytes left (Content-Length mode)
        self.chunk_left = 0  # bytes left in the current chunk, -1 = expecting a size line
        self.done = False

    def head(self, buf: bytearray) -> bool:
        end = _head_end(buf)
        if end < 0:
            return False
        lines = bytes(buf[:end]).split(b"\r\n")
        del buf[: end + 4]
        self.status = int(lines[0].split()[1])
        self.remaining = -1
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
                self.chunk_left = -1
            elif name == b"content-length":
                self.remaining = int(value.strip())
        self.have_head = True
        return True

    def body(self, buf: bytearray) -> bytes:
        """Take the body bytes available in `buf`; sets `done` at the end of the message."""
        if not self.chunked:
            if self.remaining < 0:  # until close
                out = bytes(buf)
                buf.clear()
                return out
            take = min(self.remaining, len(buf))
            out = bytes(buf[:take])
            del buf[:take]
            self.remaining -= take
            if self.remaining == 0:
                self.done = True
            return out
        parts: list[bytes] = []
        while buf:
            if self.chunk_left == -2:  # the CRLF that ends a chunk
                if len(buf) < 2:
                    break
                del buf[:2]
                self.chunk_left = -1
                continue
            if self.chunk_left == -1:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    break
                size = int(bytes(buf[:eol]).split(b";")[0], 16)
                del buf[: eol + 2]
                if size == 0:
                    if len(buf) >= 2:
                        del buf[:2]
                    self.done = True
                    break
                self.chunk_left = size
            take = min(self.chunk_left, len(buf))
            parts.append(bytes(buf[:take]))
            del buf[:take]
            self.chunk_left -= take
            if self.chunk_left == 0:
                self.chunk_left = -2
        return b"".join(parts)


def http_get(path: str, host: str, port: int, extra: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n").encode()


class SSEClient(Client):
    """Server-Sent Events over raw HTTP: splits lines, reads `event:` and `data:` fields.

    A `welcome` event (dualcast, and the broadcaster peer) marks the client ready.
    Several SSE messages may arrive in one write, and one message may span writes.
    """

    def __init__(self, tally: Tally, host: str, port: int, path: str) -> None:
        super().__init__(tally, host, port, path)
        self.http = HTTPBody()
        self.text = bytearray()
        self.event = b"message"

    def request(self) -> bytes:
        return http_get(self.path, self.host, self.port, "Accept: text/event-stream\r\n")

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        http = self.http
        if not http.have_head:
            if not http.head(buf):
                return
            if http.status != 200:
                self.fail(f"SSE status {http.status}: {bytes(buf[:200])!r}")
                return
        text = self.text
        text += http.body(buf)
        end = text.rfind(b"\n")
        if end >= 0:
            block = bytes(text[:end])
            del text[: end + 1]
            event = self.event
            for line in block.split(b"\n"):
                if line[:5] == b"data:":
                    if event == b"bench":
                        self.deliver(_loads(line[5:]))  # JSON whitespace covers " " and "\r"
                    elif event == b"welcome":
                        self.set_ready()
                elif line[:6] == b"event:":
                    event = line[6:].strip()
                elif not line or line == b"\r":
                    event = b"message"
            self.event = event
        if http.done:
            self.close_reason = "SSE stream ended"
            self.close()


class PollClient(Client):
    """dualcast long-poll `/api/events` on one keep-alive connection.

    First asks with `timeout=0` for the current `last_id` (ready), then polls with
    `after=<last_id>` and asks again as soon as an answer arrives.
    """

    def __init__(self, tally: Tally, host: str, port: int, path: str, wait: int = 20) -> None:
        super().__init__(tally, host, port, path)
        self.http = HTTPBody()
        self.body = bytearray()
        self.after: str | None = None
        self.wait = wait
        self.polls = 0
        self.stopping = False

    def request(self) -> bytes:
        sep = "&" if "?" in self.path else "?"
        if self.after is None:
            query = f"{sep}timeout=0"
        else:
            query = f"{sep}after={quote(self.after)}&timeout={self.wait}"
        return http_get(self.path + query, self.host, self.port)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            http = self.http
            if not http.have_head and not http.head(buf):
                return
            self.body += http.body(buf)
            if not http.done:
                return
            if http.status != 200:
                self.fail(f"poll status {http.status}: {bytes(self.body[:200])!r}")
                return
            answer = _loads(self.body)
            self.body.clear()
            self.http = HTTPBody()
            self.polls += 1
            for item in answer.get("events", ()):
                if item.get("event") == "bench":
                    self.deliver(item.get("data"))
            self.after = answer.get("last_id") or self.after
            if self.after is None:
                self.after = "0-0"
            self.set_ready()
            if self.stopping or self.transport is None or self.transport.is_closing():
                return
            self.transport.write(self.request())


KINDS: dict[str, tuple[type[Client], str]] = {
    "dualcast-ws": (DualcastWS, "/api/ws"),
    "dualcast-sse": (SSEClient, "/api/sse"),
    "dualcast-poll": (PollClient, "/api/events"),
    "socketio-ws": (SocketIOWS, "/socket.io/?EIO=4&transport=websocket"),
    "broadcaster-ws": (PlainWS, "/ws"),
    "broadcaster-sse": (SSEClient, "/sse"),
}


def client_path(kind: str, token: str | None = None, rooms: str | None = None) -> str:
    """The request path of a client of `kind`, with dualcast's token/rooms query."""
    base = KINDS[kind][1]
    params = []
    if token:
        params.append(f"token={quote(token)}")
    if rooms:
        params.append(f"rooms={quote(rooms)}")
    if not params:
        return base
    return base + ("&" if "?" in base else "?") + "&".join(params)
