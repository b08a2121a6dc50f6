"""Ingestion that cannot be poisoned: what a producer XADDs is data, never a reason to stop.

Entries are written raw (redis-py with bytes, as any producer can) to a real
redis-server read by a real dualcast process; real WebSocket, SSE and long-poll
clients must see only the good events, each once, with the bad ones skipped,
logged once with their id and counted by reason.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from dualcast.events import Malformed, MalformedEntry, decode_entry
from tests.conftest import token
from tests.harness.clients import Poller, SSEClient, WSClient
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.waits import wait_for

pytestmark = pytest.mark.timeout(120)

ADMIN = token("root", admin=True)
USER = token("456")


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def envelope(event: Any = "ok", data: Any = None, **extra: Any) -> bytes:
    return json.dumps({"event": event, "data": data, **extra}).encode()


#: (fields as a producer writes them, why they must be skipped)
BAD: list[tuple[dict[bytes, bytes], Malformed]] = [
    ({b"data": b'\xff\xfe{"event":"x"}'}, Malformed.NOT_UTF8),
    ({b"data": b'{"event":"x","data":"caf\xe9"}'}, Malformed.NOT_UTF8),
    ({b"data": envelope(), b"timestamp": b"\xff"}, Malformed.NOT_UTF8),
    ({b"data": b"not json"}, Malformed.NOT_JSON),
    # valid UTF-8 with a byte order mark (a .NET or PowerShell producer): once counted
    # and logged as not UTF-8, which sent its owner looking for the wrong mistake
    ({b"data": b"\xef\xbb\xbf" + envelope()}, Malformed.NOT_JSON),
    ({b"data": b'{"event":"x","data":1e400}'}, Malformed.NOT_JSON),
    # integers past 64 bits: orjson reads them as floats, so they would arrive changed
    ({b"data": envelope(data=2**64)}, Malformed.NOT_JSON),
    ({b"data": envelope(data=-(2**63) - 1)}, Malformed.NOT_JSON),
    ({b"data": envelope(data={"rows": [1, {"n": 10**30}]})}, Malformed.NOT_JSON),
    ({b"data": b'["a list"]'}, Malformed.NOT_OBJECT),
    ({b"other": b"field"}, Malformed.NO_DATA),
    ({b"data": envelope(event=7)}, Malformed.BAD_EVENT),
    ({b"data": envelope(event="x\nid: 1\nevent: forged")}, Malformed.BAD_EVENT),
    ({b"data": envelope(event="x\n")}, Malformed.BAD_EVENT),
    ({b"data": envelope(event="")}, Malformed.BAD_EVENT),
    *[({b"data": envelope(data={"secret": f"leak-{i}"}, rooms=rooms)}, Malformed.BAD_ROOMS)
      for i, rooms in enumerate([{}, "", None, False, 0, "admin", ["bad name"], [1],
                                 ["admin", None], ["x"] * 101, ["a" * 65]])],
    ({b"data": envelope(), b"timestamp": str(2**64).encode()}, Malformed.BAD_TIMESTAMP),
    ({b"data": envelope(), b"timestamp": str(-(2**63) - 1).encode()}, Malformed.BAD_TIMESTAMP),
    ({b"data": envelope(), b"timestamp": b"soon"}, Malformed.BAD_TIMESTAMP),
    # nests past what orjson writes: 300 levels everywhere; 254 only in the frames that
    # wrap data once more (WS, poll), while SSE alone could still send it: never in part.
    ({b"data": b'{"event":"deep","data":' + nested(300).encode() + b"}"}, Malformed.UNENCODABLE),
    ({b"data": b'{"event":"deep","data":' + nested(254).encode() + b"}"}, Malformed.UNENCODABLE),
]

GOOD: list[dict[bytes, bytes]] = [
    {b"data": envelope()},
    {b"data": envelope(rooms=[])},  # empty: public, as documented
    {b"data": envelope(rooms=["admin", "user-456"]), b"timestamp": b"1732550000000"},
    {b"data": b'{"event":"deep","data":' + nested(253).encode() + b"}"},
    {b"data": envelope(data=2**63)},  # an unsigned 64-bit integer: encodable
    {b"data": envelope(data=[2**64 - 1, -(2**63)])},  # the range's two ends
    {b"data": envelope(data={"id": "12345678901234567890123", "t": 1.5e30})},  # not integers
    {b"data": envelope(), b"timestamp": str(2**63 - 1).encode()},
    {b"data": envelope(extra_key=1)},  # producers may add fields of their own
]


@pytest.mark.parametrize(("fields", "reason"), BAD, ids=[f"{r.value}-{i}" for i, (_, r) in
                                                          enumerate(BAD)])
def test_decode_entry_refuses_with_a_reason(fields: dict[bytes, bytes], reason: Malformed) -> None:
    with pytest.raises(MalformedEntry) as caught:
        decode_entry("1-0", fields)
    assert caught.value.reason is reason
    # the same entry read by the memory engine (text fields) fails the same way
    if all(_utf8(v) for v in fields.values()):
        text = {k.decode(): v.decode() for k, v in fields.items()}
        with pytest.raises(MalformedEntry) as again:
            decode_entry("1-0", text)
        assert again.value.reason is reason


def _utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("fields", GOOD)
def test_decode_entry_accepts_and_every_frame_encodes(fields: dict[bytes, bytes]) -> None:
    """The WebSocket frame is encoded at ingestion, the others on first use: whatever
    passes the first must encode for every transport (253 levels, 64-bit integers)."""
    event = decode_entry("1-0", fields)
    assert event._ws is not None
    assert json.loads(event.ws_frame())["id"] == "1-0"
    assert json.loads(event.ws_frame())["data"] == json.loads(fields[b"data"])["data"]  # exact
    assert json.loads(event.poll_item())["id"] == "1-0"
    assert event.sse_frame().startswith(b"id: 1-0\nevent: ")
    assert event.sse_plain_frame().startswith(b"id: 1-0\ndata: {")


def test_bad_entry_ids_are_malformed_not_errors() -> None:
    with pytest.raises(MalformedEntry) as caught:
        decode_entry("x-1", {b"data": envelope()})
    assert caught.value.reason is Malformed.BAD_ID


# --- a real dualcast reading a real redis-server ---------------------------------------


@pytest.fixture
def stream() -> str:
    return f"ingest-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def raw(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)  # bytes in, bytes out
    yield client
    client.close()


def metric(server: DualcastProcess, name: str, labels: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} (\S+)$", text, re.M)
    assert match, f"{name}{{{labels}}} not in /metrics"
    return float(match.group(1))


async def test_poisoned_entries_are_skipped_once_and_delivery_goes_on_everywhere(
    redis_server: RedisProcess, raw: redis.Redis, stream: str, dualcast: Any,
) -> None:
    server: DualcastProcess = dualcast(redis_server.url, env={"DUALCAST_STREAM": stream,
                                                              "DUALCAST_BLOCK_MS": "300"})
    anonymous_ws = WSClient(server.ws_url)
    user_ws = WSClient(server.ws_url, token=USER)
    sse = SSEClient(server.url)
    poller = Poller(server.url)
    await poller.poll_once(0)  # a cursor at the head, then follow it
    async with anonymous_ws, user_ws, sse:
        poller.start()
        try:
            bad_ids = [raw.xadd(stream, fields).decode() for fields, _ in BAD]
            public = raw.xadd(stream, {b"data": envelope("after", {"n": 1})}).decode()
            private = raw.xadd(stream, {b"data": envelope("mine", 2, rooms=["user-456"])}).decode()
            await wait_for(lambda: public in anonymous_ws.seen.ids and public in sse.seen.ids
                           and public in poller.seen.ids and private in user_ws.seen.ids,
                           20, "the good events after the bad ones, on every transport")
            for seen in (anonymous_ws.seen, sse.seen, poller.seen):
                assert seen.ids == [public], seen.events
            assert user_ws.seen.ids == [public, private]
            assert anonymous_ws.seen.closed is None and user_ws.seen.closed is None
            assert not anonymous_ws.seen.errors and not user_ws.seen.errors
            assert sse.status == 200 and not sse.ended.is_set()
        finally:
            await poller.close()
    assert server.ready()

    # Replay from `0` on every transport skips the same entries, and nothing leaked.
    async with WSClient(server.ws_url, last_event_id="0") as ws0, \
            SSEClient(server.url, last_event_id="0") as sse0:
        await wait_for(lambda: public in ws0.seen.ids and public in sse0.seen.ids, 10,
                       "the replay from 0")
        assert ws0.seen.ids == [public] and sse0.seen.ids == [public]
        assert not ws0.seen.resets and not sse0.seen.resets
    polled = httpx.get(server.url + "/api/events", params={"after": "0", "timeout": "0"},
                       headers={"Authorization": f"Bearer {USER}"}, timeout=10).json()
    assert [e["id"] for e in polled["events"]] == [public, private]
    overview = httpx.get(server.url + "/api/overview", timeout=10)
    assert overview.status_code == 200 and "leak-" not in overview.text

    # Skipped once: one log line per bad entry, with its id; counted by reason.
    log = server.log()
    for entry_id in bad_ids:
        assert len(re.findall(rf"skipping malformed stream entry {entry_id}\b", log)) == 1, entry_id
    assert "Traceback" not in log
    for reason in Malformed:
        want = sum(1 for _, r in BAD if r is reason)
        assert metric(server, "dualcast_malformed_entries_total", f'reason="{reason.value}"') \
            == want, reason


async def test_a_poisoned_head_does_not_stop_a_new_instance(
    redis_server: RedisProcess, raw: redis.Redis, stream: str, dualcast: Any,
) -> None:
    """An instance started after the bad entries were written replays and folds past them."""
    for fields, _ in BAD:
        raw.xadd(stream, fields)
    good = raw.xadd(stream, {b"data": envelope("session_created", {"sessionId": "s1"})}).decode()
    server: DualcastProcess = dualcast(redis_server.url, env={"DUALCAST_STREAM": stream,
                                                              "DUALCAST_BLOCK_MS": "300"})
    await wait_for(server.ready, 10, "readyz")
    async with WSClient(server.ws_url, last_event_id="0") as ws0:
        await wait_for(lambda: good in ws0.seen.ids, 10, "the replay from 0")
        assert ws0.seen.ids == [good]
    overview = httpx.get(server.url + "/api/overview", timeout=10)
    assert overview.status_code == 200, overview.text
    assert list(overview.json()["sessions"]) == ["s1"]
    after = raw.xadd(stream, {b"data": envelope("after")}).decode()
    async with WSClient(server.ws_url, last_event_id=good) as ws:
        await wait_for(lambda: after in ws.seen.ids, 10, "the next event")
    assert "Traceback" not in server.log()


async def test_publish_nested_too_deep_is_422_not_500(
    redis_server: RedisProcess, stream: str, dualcast: Any,
) -> None:
    server: DualcastProcess = dualcast(redis_server.url, env={"DUALCAST_STREAM": stream})
    auth = {"Authorization": f"Bearer {token('p', publish=True)}"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=10) as http:
        for depth in (254, 300, 1000):
            body = '{"event":"deep","data":' + nested(depth) + "}"
            response = await http.post("/api/publish", content=body,
                                       headers={"Content-Type": "application/json"})
            assert response.status_code == 422, (depth, response.status_code, response.text)
            assert response.json()["error"] in ("unencodable", "bad_json")
        ok = await http.post("/api/publish", json={"event": "deep", "data": json.loads(nested(253))})
        assert ok.status_code == 202, ok.text
    assert "Traceback" not in server.log()


async def test_anonymous_callers_get_status_words_not_hosts_or_errors(
    fresh_redis: RedisProcess, dualcast: Any, stream: str,
) -> None:
    server: DualcastProcess = dualcast(fresh_redis.url, env={
        "DUALCAST_STREAM": stream, "DUALCAST_BLOCK_MS": "300", "DUALCAST_REDIS_TIMEOUT": "1",
        "DUALCAST_BACKOFF_MAX": "0.5"})
    first = httpx.post(server.url + "/api/publish", json={"event": "e", "data": 1},
                       headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).json()["id"]
    fresh_redis.stop()
    await wait_for(lambda: not server.ready(), 15, "readyz to say not ready")
    port = str(fresh_redis.port)

    def clean(response: httpx.Response) -> None:
        text = response.text
        assert response.status_code < 500 or response.status_code == 503, text
        assert port not in text and "127.0.0.1" not in text and "Error" not in text, text
        assert "redis" not in text.lower() or response.request.url.path == "/readyz", text

    ready = httpx.get(server.url + "/readyz", timeout=5)
    clean(ready)
    assert ready.status_code == 503 and ready.json()["reason"] == "log_unreachable"
    detailed = httpx.get(server.url + "/readyz", headers={"Authorization": f"Bearer {ADMIN}"},
                         timeout=5).json()
    assert "redis" in detailed["detail"]  # admins (and the log) get the detail
    clean(httpx.get(server.url + "/api/overview", timeout=10))
    polled = httpx.get(server.url + "/api/events", params={"after": "0", "timeout": "0"},
                       timeout=10)
    assert polled.status_code == 503, polled.text
    clean(polled)
    published = httpx.post(server.url + "/api/publish", json={"event": "e", "data": 1},
                           headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert published.status_code == 503
    clean(published)
    assert first  # (the publish before the outage worked)
    fresh_redis.start()
    await wait_for(server.ready, 15, "readyz to recover")
