"""Load-generator clients: the harness's lean connections, counting what they receive.

Library clients cost 30-70 us of CPU per delivery, which on two shared cores
makes the generator the bottleneck; the protocols are parsed by the raw asyncio
connections of `tests.harness.lean` (the same ones the tests use). This module
adds only what a benchmark needs on top: latency histograms, loss / duplicate /
order accounting, and the peers' framings (Engine.IO v4 / Socket.IO v5, the
broadcaster app's plain JSON).

Every client records deliveries of events whose data is `{"seq": n, "t": epoch}`
into a shared `Tally` (latency histogram) and its own seen-map (lost, duplicated,
out of order). Warm-up events carry a negative `seq` and only mark the client warm.
"""

from __future__ import annotations

import os
import time
from typing import Any
from urllib.parse import quote

import orjson

from tests.harness.lean import Conn, PollConn, SSEConn, WSConn

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


class Counting:
    """Delivery bookkeeping of one client; mixed into a harness connection class."""

    tally: Tally
    warm: bool
    seen: bytearray
    count: int
    dup: int
    ooo: int
    last_seq: int

    def counting(self, tally: Tally) -> None:
        self.tally = tally
        self.warm = False
        self.reset()

    def reset(self) -> None:
        self.seen = bytearray(1024)
        self.count = 0
        self.dup = 0
        self.ooo = 0
        self.last_seq = -1

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


class Client(Counting, Conn):
    """What the load workers hold: a connection that counts its deliveries."""


class LoadWS(Client, WSConn):
    def __init__(self, tally: Tally, host: str, port: int, path: str) -> None:
        WSConn.__init__(self, host, port, path)
        self.counting(tally)


class DualcastWS(LoadWS):
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


class PlainWS(LoadWS):
    """broadcaster peer: a welcome object, then each message is the event data itself."""

    def on_message(self, payload: bytes) -> None:
        frame = _loads(payload)
        if "seq" in frame:
            self.deliver(frame)
        elif frame.get("type") == "welcome":
            self.set_ready()


class SocketIOWS(LoadWS):
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


class SSEClient(Client, SSEConn):
    """Server-Sent Events (dualcast and the broadcaster peer): a `welcome` marks it ready."""

    def __init__(self, tally: Tally, host: str, port: int, path: str) -> None:
        SSEConn.__init__(self, host, port, path)
        self.counting(tally)

    def on_event(self, event: bytes, last_id: bytes | None, data: bytes) -> None:
        if event == b"bench":
            self.deliver(_loads(data))
        elif event == b"welcome":
            self.set_ready()

    def on_refused(self, status: int, body: bytes) -> None:
        self.close_reason = f"SSE status {status}: {body[:200]!r}"


class PollClient(Client, PollConn):
    """dualcast long-poll `/api/events` on one keep-alive connection.

    First asks with `timeout=0` for the current `last_id` (ready), then polls with
    `after=<last_id>` and asks again as soon as an answer arrives.
    """

    def __init__(self, tally: Tally, host: str, port: int, path: str, wait: int = 20) -> None:
        PollConn.__init__(self, host, port, path, "timeout=0")
        self.counting(tally)
        self.after: str | None = None
        self.wait = wait
        self.polls = 0
        self.stopping = False

    def on_answer(self, status: int, body: bytes) -> None:
        if status != 200:
            self.fail(f"poll status {status}: {body[:200]!r}")
            return
        answer = _loads(body)
        self.polls += 1
        for item in answer.get("events", ()):
            if item.get("event") == "bench":
                self.deliver(item.get("data"))
        self.after = answer.get("last_id") or self.after or "0-0"
        self.set_ready()
        if not self.stopping:
            self.ask(f"after={quote(self.after)}&timeout={self.wait}")


KINDS: dict[str, tuple[type[Client], str]] = {
    "dualcast-ws": (DualcastWS, "/api/ws"),
    "dualcast-sse": (SSEClient, "/api/sse"),
    "dualcast-poll": (PollClient, "/api/events"),
    "socketio-ws": (SocketIOWS, "/socket.io/?EIO=4&transport=websocket"),
    "broadcaster-ws": (PlainWS, "/ws"),
    "broadcaster-sse": (SSEClient, "/sse"),
}


def checkouts() -> dict[str, str]:
    """Other dualcast checkouts to serve side by side, from BENCH_TREES.

    `BENCH_TREES="before=/tmp/before,after=/tmp/after"` adds the targets `before-ws`,
    `before-sse`, `after-ws`, ... each served from that tree's `server/` folder, so two
    commits are measured in one run against the same peers (a before/after of a change).
    """
    pairs = (p.partition("=") for p in os.environ.get("BENCH_TREES", "").split(",") if p)
    return {label.strip(): root.strip() for label, _, root in pairs}


def base_kind(kind: str) -> str:
    """The client kind a target speaks: `before-ws` is a dualcast WebSocket client."""
    label, _, transport = kind.rpartition("-")
    return f"dualcast-{transport}" if label in checkouts() else kind


def client_path(kind: str, token: str | None = None, rooms: str | None = None) -> str:
    """The request path of a client of `kind`, with dualcast's token/rooms query."""
    base = KINDS[base_kind(kind)][1]
    params = []
    if token:
        params.append(f"token={quote(token)}")
    if rooms:
        params.append(f"rooms={quote(rooms)}")
    if not params:
        return base
    return base + ("&" if "?" in base else "?") + "&".join(params)
