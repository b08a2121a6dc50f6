"""Every frame kind but the event itself, encoded once, beside `Event`'s encoders.

`Event` encodes its own frames (one encode per event for every subscriber);
the other kinds (welcome, reset, error, the WS control replies) are encoded
here, so no transport writes a frame's JSON or SSE lines by hand, and the WS
`batch` coalescing and the SSE single write live in one place each.
"""

from __future__ import annotations

from collections.abc import Iterable

from dualcast.events import Event, dumps
from dualcast.protocol import ErrorCode, FrameType

#: An SSE comment line: keeps proxies from timing the stream out.
SSE_PING = b": ping\n\n"


class Reset:
    """The subscriber's cursor is gone (trimmed, newer than the stream, or Redis lost
    data): the client reloads its state and continues from `last_id`. One object is
    queued for every subscriber after a stream reset, so it encodes once, like Event."""

    __slots__ = ("_sse", "_ws", "last_id")

    def __init__(self, last_id: str) -> None:
        self.last_id = last_id
        self._ws: str | None = None
        self._sse: bytes | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reset) and other.last_id == self.last_id

    def __hash__(self) -> int:
        return hash(self.last_id)

    def __repr__(self) -> str:
        return f"Reset({self.last_id!r})"

    def ws_frame(self) -> str:
        if self._ws is None:
            self._ws = dumps({"type": FrameType.RESET, "last_id": self.last_id}).decode()
        return self._ws

    def sse_frame(self) -> bytes:
        if self._sse is None:
            self._sse = sse_message(FrameType.RESET, {"last_id": self.last_id})
        return self._sse


Item = Event | Reset


# WebSocket ------------------------------------------------------------------------

#: A `batch` frame stays within 1 MiB. Client libraries cap the size of a message
#: they accept, many at 1 MiB (Python's websockets), and close the connection with
#: 1009 past it: a replay page of 500 events of 20 KB coalesced into one 10 MB frame,
#: and such a client never got past it, though every single event was well within its
#: limit. Counted in characters (a frame is a str; UTF-8 takes at most four bytes per
#: character), events and their commas, so no per-event encode is needed. An event
#: larger than a batch may be still goes, alone, as its own `event` frame (what its
#: producer sent, the client's to take): the cap only keeps coalescing from making
#: frames larger than the events themselves.
BATCH_MAX_BYTES = 1 << 20
_BATCH_MAX_CHARS = (BATCH_MAX_BYTES - 64) // 4


def ws_frames(items: Iterable[Item]) -> list[str]:
    """The frames for a batch: each run of events coalesces into `batch` frames of at
    most BATCH_MAX_BYTES each."""
    frames: list[str] = []
    run: list[str] = []
    size = 0
    for item in items:
        if isinstance(item, Event):
            frame = item.ws_frame()
            if run and size + len(frame) >= _BATCH_MAX_CHARS:
                frames.append(_batch(run))
                run, size = [], 0
            run.append(frame)
            size += len(frame) + 1
            continue
        if run:
            frames.append(_batch(run))
            run, size = [], 0
        frames.append(item.ws_frame())
    if run:
        frames.append(_batch(run))
    return frames


def _batch(run: list[str]) -> str:
    if len(run) == 1:
        return run[0]
    return '{"type":"batch","events":[' + ",".join(run) + "]}"


def ws_welcome(rooms: Iterable[str], last_id: str | None) -> str:
    return dumps({"type": FrameType.WELCOME, "rooms": sorted(rooms), "last_id": last_id}).decode()


def ws_error(code: ErrorCode | str, message: str) -> str:
    return dumps({"type": FrameType.ERROR, "code": code, "message": message}).decode()


def ws_room(kind: FrameType, room: str) -> str:
    """`joined` / `left`."""
    return dumps({"type": kind, "room": room}).decode()


WS_PONG = dumps({"type": FrameType.PONG}).decode()


# Server-Sent Events ---------------------------------------------------------------

def sse_message(event: str, payload: object) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event.encode(), dumps(payload))


def sse_chunk(items: Iterable[Item]) -> bytes:
    """Everything waiting for one client, as one write."""
    return b"".join([item.sse_frame() for item in items])


def sse_welcome(rooms: Iterable[str], last_id: str | None, retry_ms: int) -> bytes:
    """`retry:` and the `welcome` (no `id:` line): sent at once, so a client can tell a
    live stream from one a proxy holds back."""
    return b"retry: %d\n" % retry_ms + sse_message(
        FrameType.WELCOME, {"rooms": sorted(rooms), "last_id": last_id})


def sse_error(code: ErrorCode | str, message: str) -> bytes:
    return sse_message(FrameType.ERROR, {"code": code, "message": message})


def sse_retry(retry_ms: int) -> bytes:
    return b"retry: %d\n\n" % retry_ms
