"""Event and frame encoders: every transport's bytes say the same thing, encoded once."""

from __future__ import annotations

import json

import pytest

from dualcast.events import Event, format_id, parse_id
from dualcast.frames import (
    Reset,
    sse_chunk,
    sse_error,
    sse_welcome,
    ws_error,
    ws_frames,
    ws_welcome,
)
from dualcast.protocol import ErrorCode


def sse_fields(chunk: bytes) -> list[dict[str, str]]:
    """The messages of an SSE chunk as field dicts (what an EventSource parser sees)."""
    messages = []
    for block in chunk.decode().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):  # as EventSource does: not on U+2028
            name, _, value = line.partition(": ")
            fields[name] = value
        fields.pop("", None)
        if fields:
            messages.append(fields)
    return messages


def event(n: int, data: object = None, rooms: tuple[str, ...] = ()) -> Event:
    return Event(format_id((1000 + n, 0)), "tick", data, rooms, 5000 + n)


@pytest.mark.parametrize("raw, parsed", [
    ("1732550000000-0", (1732550000000, 0)), ("7", (7, 0)), ("0-0", (0, 0)),
    ("18446744073709551615-3", (2**64 - 1, 3)),
])
def test_ids_parse_and_format_round_trip(raw: str, parsed: tuple[int, int]) -> None:
    assert parse_id(raw) == parsed
    assert parse_id(format_id(parsed)) == parsed


@pytest.mark.parametrize("raw", ["", "-", "1-", "a-1", "1-2-3", " 1-0", "18446744073709551616-0",
                                 "1" * 30])
def test_bad_ids_are_value_errors(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_id(raw)


def test_every_transport_carries_the_same_event() -> None:
    e = event(1, {"n": 1, "text": "naïve \u2028 line"})
    ws = json.loads(e.ws_frame())
    assert ws == {"type": "event", "id": "1001-0", "event": "tick",
                  "data": {"n": 1, "text": "naïve \u2028 line"}, "ts": 5001}
    assert json.loads(e.poll_item()) == {k: ws[k] for k in ("id", "event", "data", "ts")}
    [named] = sse_fields(e.sse_frame())
    assert named["id"] == "1001-0" and named["event"] == "tick"
    assert json.loads(named["data"]) == ws["data"]
    [plain] = sse_fields(e.sse_plain_frame())
    assert "event" not in plain  # unnamed: EventSource.onmessage receives it
    assert json.loads(plain["data"]) == json.loads(e.poll_item())


def test_frames_are_encoded_once_per_event() -> None:
    e = event(2, [1, 2, 3])
    assert e.ws_frame() is e.ws_frame()
    assert e.sse_frame() is e.sse_frame()
    assert e.poll_item() is e.poll_item()
    reset = Reset("5-0")
    assert reset.ws_frame() is reset.ws_frame()


def test_runs_of_events_coalesce_into_batches_around_a_reset() -> None:
    frames = [json.loads(f) for f in ws_frames([event(1), event(2), Reset("9-0"), event(3)])]
    assert [f["type"] for f in frames] == ["batch", "reset", "event"]
    assert [e["id"] for e in frames[0]["events"]] == ["1001-0", "1002-0"]
    assert frames[1] == {"type": "reset", "last_id": "9-0"}


def test_batches_stay_within_a_mebibyte_and_a_bigger_event_goes_alone() -> None:
    from dualcast.frames import BATCH_MAX_BYTES

    wide = "\u65e5" * 20_000  # three bytes each in UTF-8
    items = [event(n, wide) for n in range(100)] + [event(100, "x" * (2 << 20)), event(101)]
    frames = ws_frames(items)
    assert all(len(f.encode()) <= BATCH_MAX_BYTES for f in frames[:-2])
    decoded = [json.loads(f) for f in frames]
    ids = [e["id"] for f in decoded for e in (f["events"] if f["type"] == "batch" else [f])]
    assert ids == [format_id((1000 + n, 0)) for n in range(102)]
    assert decoded[-2]["type"] == "event" and decoded[-2]["id"] == "1100-0"  # alone
    assert len(frames) < 100  # still coalesced


def test_sse_chunk_is_one_write_of_every_message() -> None:
    chunk = sse_chunk([event(1), Reset("9-0")])
    messages = sse_fields(chunk)
    assert [m.get("event") for m in messages] == ["tick", "reset"]
    assert json.loads(messages[1]["data"]) == {"last_id": "9-0"}


def test_welcome_and_error_frames() -> None:
    assert json.loads(ws_welcome({"b", "a"}, "1-0")) == {
        "type": "welcome", "rooms": ["a", "b"], "last_id": "1-0"}
    assert json.loads(ws_error(ErrorCode.LAGGING, "slow")) == {
        "type": "error", "code": "lagging", "message": "slow"}
    retry, welcome = sse_welcome({"a"}, "1-0", 3000).decode().split("\n", 1)
    assert retry == "retry: 3000"
    [message] = sse_fields(welcome.encode())
    assert "id" not in message and message["event"] == "welcome"
    assert json.loads(message["data"]) == {"rooms": ["a"], "last_id": "1-0"}
    [error] = sse_fields(sse_error(ErrorCode.TOKEN_EXPIRED, "gone"))
    assert error["event"] == "error" and json.loads(error["data"])["code"] == "token_expired"
