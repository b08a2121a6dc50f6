"""The producer library against a real redis-server: wire format, fail-open, throttle, batch.

Each test uses its own stream key on the session's redis-server, or a redis of
its own when it kills, stops or restarts it. Time bounds are measured, not slept:
the waits are for conditions, with deadlines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import logging
import math
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import websockets

from dualcast.events import Envelope, decode_entry, parse_id
from dualcast.publisher import (
    Outcome,
    Publisher,
    SyncPublisher,
    UnpublishableValue,
    encode_envelope,
    encoding,
)
from tests.conftest import token
from tests.harness.probes import metric
from tests.harness.procs import RedisProcess, clean_env
from tests.harness.waits import wait_for, wait_until

pytestmark = pytest.mark.timeout(60)


#: The timeout of tests that are not about timeouts: generous, so a loaded CI machine
#: (a stalled loop or redis-server) cannot turn a slow success into a fail-open None.
OK = 5.0


def stream_key() -> str:
    return f"test-pub-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def reader(redis_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


async def entries(client: aioredis.Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    return [(i, dict(f)) for i, f in await client.xrange(stream)]


class Recorder:
    """A local fallback like the app's runtime: records what it is given, returns ids."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, list[str]]] = []

    def publish_local(self, event: str, data: Any, rooms: list[str]) -> str:
        self.calls.append((event, data, rooms))
        return f"{int(time.time() * 1000)}-{len(self.calls)}"


# --------------------------------------------------------------------------- wire format


async def test_ids_in_order_and_wire_format(redis_server: RedisProcess, reader: aioredis.Redis):
    stream = stream_key()
    before = int(time.time() * 1000)
    async with Publisher(redis_server.url, stream=stream, timeout=OK) as pub:
        ids = []
        for i in range(20):
            rooms = [] if i % 3 == 0 else ["admin", f"user-{i}"]
            ids.append(await pub.publish("usage_log_added", {"n": i}, rooms))
    assert all(ids)
    keys = [parse_id(i) for i in ids]
    assert keys == sorted(keys) and len(set(keys)) == 20

    got = await entries(reader, stream)
    assert [i for i, _ in got] == ids
    for n, (entry_id, fields) in enumerate(got):
        assert set(fields) == {"data", "timestamp"}
        body = orjson.loads(fields["data"])
        if n % 3 == 0:
            assert body == {"event": "usage_log_added", "data": {"n": n}}  # public: no rooms
        else:
            assert body == {"event": "usage_log_added", "data": {"n": n},
                            "rooms": ["admin", f"user-{n}"]}
        Envelope.model_validate(body)  # what POST /api/publish would accept
        assert before <= int(fields["timestamp"]) <= int(time.time() * 1000)
        event = decode_entry(entry_id, fields)  # what the consumer does
        assert (event.event, event.data) == ("usage_log_added", {"n": n})
        assert event.rooms == tuple(body.get("rooms", ()))
    assert pub.stats.published == 20 and pub.stats.dropped == 0


async def test_maxlen_trims_approximately(redis_server: RedisProcess, reader: aioredis.Redis):
    stream = stream_key()
    async with Publisher(redis_server.url, stream=stream, maxlen=100, timeout=OK) as pub:
        for start in range(0, 3000, 500):
            ids = await pub.publish_many([("tick", i) for i in range(start, start + 500)])
            assert all(ids)
    length = await reader.xlen(stream)
    assert 100 <= length < 3000  # MAXLEN ~: trimmed by whole nodes, never below maxlen


async def test_rooms_are_deduplicated_in_order(redis_server: RedisProcess, reader: aioredis.Redis):
    stream = stream_key()
    async with Publisher(redis_server.url, stream=stream, timeout=OK) as pub:
        await pub.publish("x", 1, ("user-1", "admin", "user-1"))
    [(_, fields)] = await entries(reader, stream)
    assert orjson.loads(fields["data"])["rooms"] == ["user-1", "admin"]


# --------------------------------------------------------------------------- batch


async def test_publish_many_is_one_round_trip(fresh_redis: RedisProcess):
    """Redis counts one read event per batch of bytes it receives: a pipeline is one."""
    stats = aioredis.from_url(fresh_redis.url, decode_responses=True)

    async def reads() -> int:
        return int((await stats.info("stats"))["total_reads_processed"])

    async def xadd_calls() -> int:
        return int((await stats.info("commandstats")).get("cmdstat_xadd", {}).get("calls", 0))

    stream = stream_key()
    async with Publisher(fresh_redis.url, stream=stream, timeout=OK) as pub:
        await pub.publish("warm-up", None)  # connects (and its handshake) outside the count
        a = await reads()
        b = await reads()
        idle = b - a  # what one INFO costs in read events
        calls = await xadd_calls()
        a = await reads()
        ids = await pub.publish_many([("batch", i, ["admin"]) for i in range(25)])
        b = await reads()
        assert b - a - idle == 1, "publish_many took more than one round trip"
        assert await xadd_calls() - calls == 25

        a = await reads()
        for i in range(25):
            await pub.publish("single", i)
        b = await reads()
        assert b - a - idle == 25  # the same count of XADDs one by one: 25 round trips

    assert all(ids)
    keys = [parse_id(i) for i in ids]  # type: ignore[arg-type]
    assert keys == sorted(keys)
    got = [(i, decode_entry(i, f)) for i, f in await stats.xrange(stream, "-", "+")]
    batch = [(i, e.data) for i, e in got if e.event == "batch"]
    assert batch == list(zip(ids, range(25), strict=True))
    await stats.aclose()


async def test_publish_many_validates_everything_first(
    redis_server: RedisProcess, reader: aioredis.Redis
):
    stream = stream_key()
    async with Publisher(redis_server.url, stream=stream, timeout=OK) as pub:
        with pytest.raises(ValueError):
            await pub.publish_many([("fine", 1), ("not fine", 2)])
        with pytest.raises(ValueError):
            await pub.publish_many([("fine", 1, ["bad room"])])
        with pytest.raises(ValueError):
            await pub.publish_many([("only-name",)])  # type: ignore[list-item]
        assert await pub.publish_many([]) == []
    assert await reader.xlen(stream) == 0


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("event", ["", "has space", "x" * 65, "naïve", None, 42, "line\n"])
async def test_invalid_event_names_raise(redis_server: RedisProcess, event: Any):
    async with Publisher(redis_server.url, stream=stream_key(), timeout=OK) as pub:
        with pytest.raises(ValueError):
            await pub.publish(event, {})


@pytest.mark.parametrize(
    "rooms",
    [["bad room"], [""], ["r" * 65], ["user/1"], "admin", [None], [f"r{i}" for i in range(101)],
     ["admin\n"]],
)
async def test_invalid_rooms_raise(redis_server: RedisProcess, reader: aioredis.Redis, rooms: Any):
    stream = stream_key()
    async with Publisher(redis_server.url, stream=stream, timeout=OK) as pub:
        with pytest.raises(ValueError):
            await pub.publish("fine", {}, rooms)
    assert await reader.xlen(stream) == 0


@pytest.mark.parametrize("event", ["ok", "a.b:c-d_e", "x" * 64, "", "x" * 65, "a b", "a\n", "é"])
@pytest.mark.parametrize("rooms", [[], ["admin", "user-1@x"], ["r" * 65], ["a\n"], ["a b"]])
def test_the_envelope_and_the_publisher_share_one_rule(event: str, rooms: list[str]):
    """POST /api/publish validates with `Envelope`; both must accept and refuse alike."""
    def accepted(check: Any) -> bool:
        try:
            check()
        except ValueError:  # pydantic's ValidationError is one too
            return False
        return True

    by_envelope = accepted(lambda: Envelope(event=event, data=1, rooms=rooms))
    by_publisher = accepted(lambda: encoding.prepare(event, 1, rooms))
    assert by_envelope == by_publisher


async def test_invalid_throttle_arguments_raise(redis_server: RedisProcess):
    async with Publisher(redis_server.url, stream=stream_key(), timeout=OK) as pub:
        for kwargs in ({"throttle_key": "k", "every": 0}, {"throttle_key": "k", "every": -1},
                       {"throttle_key": "", "every": 1}, {"every": 1.0}):
            with pytest.raises(ValueError):
                await pub.publish("fine", 1, **kwargs)


def test_validation_does_not_need_redis():
    """A programming error is raised even while Redis is away (not swallowed as an outage)."""
    with SyncPublisher("redis://127.0.0.1:1/0", timeout=0.2) as pub, pytest.raises(ValueError):
        pub.publish("bad name", 1)


# --------------------------------------------------------------------------- odd data


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Usage:
    tokens: int
    cost: Decimal


class Opaque:
    def __str__(self) -> str:
        return "opaque!"


class Hostile:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


async def test_odd_data_types_encode(redis_server: RedisProcess, reader: aioredis.Redis):
    stream = stream_key()
    moment = datetime(2026, 11, 25, 12, 30, 5, 123000, tzinfo=UTC)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    cases: dict[str, tuple[Any, Any]] = {
        "datetime": (moment, "2026-11-25T12:30:05.123000+00:00"),
        "naive": (datetime(2026, 1, 2, 3, 4, 5), "2026-01-02T03:04:05"),
        "date": (date(2026, 11, 25), "2026-11-25"),
        "decimal": (Decimal("0.012345"), 0.012345),
        "decimal_int": (Decimal("-42"), -42),
        "decimal_exp": (Decimal("1E+2"), 100.0),
        "uuid": (ident, str(ident)),
        "safe_int": (2**53 - 1, 2**53 - 1),
        "big_int": (2**53 + 1, str(2**53 + 1)),
        "int64": (-(2**63), str(-(2**63))),
        "uint64": (2**64 - 1, str(2**64 - 1)),
        "set": ({3, 1, 2}, [1, 2, 3]),
        "frozenset": (frozenset({"b", "a"}), ["a", "b"]),
        "tuple": ((1, "a"), [1, "a"]),
        "bytes": (b"hi\xff", "hi\ufffd"),
        "timedelta": (timedelta(minutes=1, milliseconds=500), 60.5),
        "enum": (Colour.RED, "red"),
        "dataclass": (Usage(2**60, Decimal("1.5")), {"tokens": str(2**60), "cost": 1.5}),
        "int_keys": ({1: "a", 2: "b"}, {"1": "a", "2": "b"}),
        "none": (None, None),
        "object": (Opaque(), "opaque!"),
        "hostile": (Hostile(), "<unencodable Hostile>"),
        "cycle": (cyclic, [1, "<cycle>"]),
        "generator": ((i * i for i in range(3)), [0, 1, 4]),
    }
    async with Publisher(redis_server.url, stream=stream, timeout=OK) as pub:
        for name, (value, _) in cases.items():
            assert await pub.publish("odd", {"case": name, "value": value}), name
        # a big integer deep inside otherwise plain data takes the slow path correctly
        assert await pub.publish("odd", {"case": "nested", "value": [{"a": [2**63]}, moment]})
    decoded = {e.data["case"]: e.data["value"]
               for e in (decode_entry(i, f) for i, f in await entries(reader, stream))}
    for name, (_, expected) in cases.items():
        assert decoded[name] == expected, name
    assert decoded["nested"] == [{"a": [str(2**63)]}, "2026-11-25T12:30:05.123000+00:00"]


def test_encode_envelope_never_raises_on_data():
    class Weird(dict):  # type: ignore[type-arg]
        def items(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    for value in (Weird(a=1), {(1, 2): {3, "x"}}, [Hostile()] * 3, object()):
        body = orjson.loads(encode_envelope("e", value, []))
        assert body["event"] == "e" and "data" in body


def nested(levels: int, mapping: bool = False) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value} if mapping else [value]
    return value


UNDELIVERABLE: dict[str, tuple[Any, str]] = {
    "nan": (float("nan"), "not a finite number"),
    "inf": ({"cost": [1.0, float("inf")]}, "data['cost'][1]: inf"),
    "minus_inf": (float("-inf"), "not a finite number"),
    "decimal_nan": (Decimal("NaN"), "not a finite number"),
    "decimal_inf": (Decimal("-Infinity"), "not a finite number"),
    "decimal_past_float": ({"total": Decimal("1E+400")}, "data['total']: Decimal 1e+400"),
    "decimal_int_past_64_bits": (Decimal(2**64), "past 64 bits"),
    "int_past_64_bits": ([2**64], "data[0]: integer 18446744073709551616 is past 64 bits"),
    "negative_past_64_bits": (-(2**63) - 1, "past 64 bits"),
    "lists_too_deep": (nested(253), "nested deeper than 252 levels"),
    "objects_too_deep": (nested(253, mapping=True), "nested deeper than 252 levels"),
    # a lone surrogate (stdlib json.loads('"\\ud800"'), surrogateescape): not UTF-8. Once a
    # TypeError from inside orjson, and in a key or a list the whole of data became its repr
    "lone_surrogate": ("\ud800", "data: string holds a lone surrogate (U+D800)"),
    "surrogate_in_list": (["ok", "x\ud83d"], "data[1]: string holds a lone surrogate"),
    "surrogate_in_key": ({"a": {"\udfff": 1}}, "data['a']['\\udfff']: string holds"),
}


@pytest.mark.parametrize("case", UNDELIVERABLE)
async def test_refuses_what_no_server_could_deliver(
    redis_server: RedisProcess, reader: aioredis.Redis, case: str
):
    """Each of these was once written to Redis and then dropped by every server, silently."""
    value, says = UNDELIVERABLE[case]
    stream = stream_key()
    async with Publisher(redis_server.url, stream=stream, timeout=OK) as pub:
        with pytest.raises(UnpublishableValue) as refused:
            await pub.publish("odd", value)
        with pytest.raises(ValueError):  # in a batch too, before anything is sent
            await pub.publish_many([("fine", 1), ("odd", value)])
    with SyncPublisher(redis_server.url, stream=stream, timeout=OK) as spub, \
            pytest.raises(ValueError):
        spub.publish("odd", value)
    message = str(refused.value)
    assert says in message and "\n" not in message and len(message) < 200, message
    assert pub.stats.published == 0 and spub.stats.published == 0
    assert await reader.xlen(stream) == 0


async def test_what_it_accepts_at_the_limits_the_server_delivers(
    redis_server: RedisProcess, dualcast
):
    """The edges of each refusal, published for real and read back by a real WebSocket."""
    edges: dict[str, tuple[Any, Any]] = {
        "deepest_lists": (nested(252), nested(252)),
        "deepest_objects": (nested(252, mapping=True), nested(252, mapping=True)),
        "uint64": (2**64 - 1, str(2**64 - 1)),
        "int64": (-(2**63), str(-(2**63))),
        "largest_decimal": (Decimal("1.7E+308"), 1.7e308),
        "tiny_decimal": (Decimal("1E-400"), 0.0),
        "decimal_int64": (Decimal(2**63), 2**63),
        # docs/producers.md: a Decimal's exact digits reach the stream, not subscribers
        "decimal_digits": (Decimal("1.10"), 1.1),
        "decimal_past_a_double": (Decimal("0.1234567890123456789"), 0.12345678901234568),
        "null": (None, None),
    }
    stream = stream_key()
    server = dualcast(redis_server.url, env={"DUALCAST_STREAM": stream})
    url = f"{server.ws_url}/api/ws?token={token('456', admin=True)}"
    async with websockets.connect(url, open_timeout=10, max_size=None) as ws:
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "welcome"
        async with Publisher(redis_server.url, stream=stream, timeout=OK) as pub:
            sent = [await pub.publish(name, value) for name, (value, _) in edges.items()]
        assert all(sent)
        seen: dict[str, Any] = {}
        async with asyncio.timeout(10):
            while len(seen) < len(edges):
                frame = orjson.loads(await ws.recv())
                for event in frame["events"] if frame["type"] == "batch" else [frame]:
                    if event["type"] == "event":
                        seen[event["event"]] = event["data"]
    assert seen == {name: expected for name, (_, expected) in edges.items()}


def test_importing_the_publisher_imports_no_server_machinery():
    """A producer installs dualcast for the publisher alone: no web stack comes with it."""
    heavy = ("starlette", "uvicorn", "pydantic", "pydantic_settings", "jwt", "prometheus_client")
    code = (
        "import sys, json\n"
        "import dualcast.publisher\n"
        "from dualcast.publisher import Publisher, SyncPublisher, encode_envelope\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('dualcast.')\n"
        "                        and not m.startswith('dualcast.publisher'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, cwd=tempfile.gettempdir())
    assert done.returncode == 0, done.stderr
    web, ours = map(orjson.loads, done.stdout.splitlines())
    assert web == []
    # what docs/producers.md says it imports of the server's package
    assert ours == ["dualcast.names", "dualcast.redis_connect"]


# --------------------------------------------------------------------------- fail open


async def test_stopped_redis_fails_open_and_keeps_the_callers_pace(
    fresh_redis: RedisProcess, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="dualcast.publisher")
    timeout = 0.3
    async with Publisher(fresh_redis.url, stream=stream_key(), timeout=timeout) as pub:
        assert await pub.publish("before", 1)
        fresh_redis.kill()
        durations = []
        loop_started = time.monotonic()
        for i in range(200):  # a request loop that publishes every 5 ms
            started = time.monotonic()
            assert await pub.publish("during", i, ["admin"]) is None
            durations.append(time.monotonic() - started)
            await asyncio.sleep(0.005)
        loop_time = time.monotonic() - loop_started
    assert max(durations) < timeout + 0.1
    assert sum(durations) < timeout + 0.2  # at most one call paid, the rest returned at once
    assert loop_time < 200 * 0.005 + timeout + 1.5  # the loop kept its pace
    assert pub.stats.outages == 1
    assert pub.stats.failed >= 1 and pub.stats.failed + pub.stats.short_circuited == 200
    assert pub.stats.dropped == 200 and pub.stats.published == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()


async def test_unresponsive_redis_times_out_then_short_circuits(fresh_redis: RedisProcess):
    """SIGSTOP: the port still accepts connections, nothing answers: the slow case."""
    timeout = 0.3
    assert fresh_redis.proc is not None
    async with Publisher(fresh_redis.url, stream=stream_key(), timeout=timeout) as pub:
        assert await pub.publish("before", 1)
        fresh_redis.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert await pub.publish("stalled", 1) is None
            first = time.monotonic() - started
            assert timeout * 0.8 <= first < timeout + 0.2
            durations = []
            for i in range(50):
                started = time.monotonic()
                assert await pub.publish("stalled", i) is None
                durations.append(time.monotonic() - started)
                await asyncio.sleep(0.01)
            assert max(durations) < 0.05  # the breaker answers at once while Redis hangs
            many_started = time.monotonic()
            assert await pub.publish_many([("x", 1), ("y", 2)]) == [None, None]
            assert time.monotonic() - many_started < 0.05
        finally:
            fresh_redis.proc.send_signal(signal.SIGCONT)

        async def back() -> str | None:
            return await pub.publish("after", 1)

        assert await wait_for(back, 15, what="publishing again after SIGCONT")


async def test_recovers_after_redis_restarts_on_the_same_port(
    fresh_redis: RedisProcess, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="dualcast.publisher")
    stream = stream_key()
    async with Publisher(fresh_redis.url, stream=stream, timeout=0.3, cooldown=0.1) as pub:
        first = await pub.publish("before", 1)
        assert first
        fresh_redis.kill()
        assert await pub.publish("lost", 2) is None
        assert not pub.available
        fresh_redis.start(wipe=True)

        async def back() -> str | None:
            return await pub.publish("after", 3)

        after = await wait_for(back, 15, what="publishing after the restart")
        assert pub.available
        assert await pub.publish_many([("after", 4), ("after", 5)]) != [None, None]
    client = aioredis.from_url(fresh_redis.url, decode_responses=True)
    got = [decode_entry(i, f) for i, f in await client.xrange(stream)]
    await client.aclose()
    assert got[0].id == after and [e.data for e in got][-2:] == [4, 5]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in messages) == 1
    assert sum("Redis is back" in m for m in messages) == 1


async def test_local_overload_is_not_an_outage(redis_server: RedisProcess):
    """A call queued behind the pool for the whole timeout fails open; the breaker stays shut."""
    timeout = 0.2
    async with Publisher(redis_server.url, stream=stream_key(), timeout=timeout,
                         max_connections=1) as pub:
        assert await pub.publish("warm-up", 0)
        async with pub._slots:  # as if this process's other publishes held every connection
            started = time.monotonic()
            assert await pub.publish("queued", 1) is None
            assert timeout * 0.8 <= time.monotonic() - started < timeout + 0.2
        assert pub.stats.overloaded == 1 and pub.stats.outages == 0
        assert pub.available
        assert await pub.publish("after", 2)  # no breaker to wait for
        # and a real burst: whatever does not fit in the timeout is dropped, never raised
        results = await asyncio.gather(*(pub.publish("burst", i) for i in range(2000)))
        assert pub.stats.published == 2 + sum(r is not None for r in results)


async def test_redis_refusing_the_write_is_not_an_outage(
    redis_server: RedisProcess, reader: aioredis.Redis
):
    """WRONGTYPE (the key is not a stream): None and counted, the breaker stays shut."""
    stream = stream_key()
    await reader.set(stream, "not a stream")
    async with Publisher(redis_server.url, stream=stream, timeout=OK) as pub:
        assert await pub.publish("e", 1) is None
        assert await pub.publish_many([("e", 1), ("e", 2)]) == [None, None]
        assert pub.stats.failed == 3 and pub.stats.outages == 0 and pub.available
    with SyncPublisher(redis_server.url, stream=stream, timeout=OK) as spub:
        assert spub.publish("e", 1) is None
        assert spub.stats.failed == 1 and spub.stats.outages == 0


@pytest.fixture
def guarded_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server with a user `app` whose password is `right` (and the default user
    open, so that the harness can PING it)."""
    proc = RedisProcess(tmp_path / "redis",
                        args=["--user", "app", "on", ">right", "~*", "&*", "+@all"]).start()
    yield proc
    proc.stop()


async def test_a_result_says_why_redis_did_not_take_the_event(guarded_redis: RedisProcess):
    """A wrong password, a key of another type, a database past `databases` and a closed
    port: the result names the cause (what `dualcast publish` prints), the async and the
    sync publisher alike; a call the open breaker refuses says what opened it."""
    base = f"127.0.0.1:{guarded_redis.port}"
    wrongtype = stream_key()
    check = aioredis.from_url(f"redis://{base}/0")
    await check.set(wrongtype, "not a stream")
    await check.aclose()
    cases = [
        (f"redis://app:not-the-pa55word@{base}/0", stream_key(),
         "AuthenticationError: invalid username-password pair or user is disabled."),
        (f"redis://{base}/0", wrongtype,
         "ResponseError: WRONGTYPE Operation against a key holding the wrong kind of value"),
        (f"redis://{base}/99", stream_key(), "ResponseError: DB index is out of range"),
        ("redis://127.0.0.1:1/0", stream_key(), "ConnectionError: Error 111 connecting to "
                                                "127.0.0.1:1."),
    ]
    for url, stream, cause in cases:
        async with Publisher(url, stream=stream, timeout=OK) as pub:
            result = await pub.publish_result("e", 1)
            again = await pub.publish_result("e", 2)
        assert (result.id, result.outcome) == (None, Outcome.DROPPED)
        assert result.error is not None and result.error.startswith(cause), url
        if pub.stats.outages:  # the breaker opened: the next call was not sent
            assert again.error == f"not sent while Redis is unavailable ({result.error})"
        else:
            assert again.error == result.error
        with SyncPublisher(url, stream=stream, timeout=OK) as spub:
            sync_result = spub.publish_result("e", 1)
        assert sync_result.error is not None and sync_result.error.startswith(cause), url
        assert "pa55word" not in result.error + sync_result.error
    async with Publisher(f"redis://app:right@{base}/0", stream=stream_key(), timeout=OK) as pub:
        published = await pub.publish_result("e", 1)
    assert published.outcome is Outcome.PUBLISHED and published.error is None


async def test_unreachable_from_the_start_never_raises():
    async with Publisher("redis://127.0.0.1:1/0", stream=stream_key(), timeout=0.2) as pub:
        started = time.monotonic()
        results = [await pub.publish("e", i) for i in range(20)]
        results += await pub.publish_many([("e", 1), ("e", 2)])
    assert results == [None] * 22
    assert time.monotonic() - started < 0.2 + 0.5
    assert pub.stats.dropped == 22


async def test_local_fallback_receives_events_while_redis_is_away(fresh_redis: RedisProcess):
    local = Recorder()
    async with Publisher(fresh_redis.url, stream=stream_key(), timeout=0.3, fallback=local) as pub:
        assert await pub.publish("normal", 1)
        assert local.calls == []
        fresh_redis.kill()
        first = await pub.publish("outage", {"big": 2**60, "when": date(2026, 1, 1)}, ["admin"])
        second = await pub.publish("outage", 2)
        many = await pub.publish_many([("outage", 3, ["user-1"]), ("outage", 4)])
    assert first and second and all(many)
    assert local.calls == [
        ("outage", {"big": str(2**60), "when": "2026-01-01"}, ["admin"]),  # as the stream has it
        ("outage", 2, []), ("outage", 3, ["user-1"]), ("outage", 4, []),
    ]
    assert pub.stats.fallback == 4 and pub.stats.dropped == 0


async def test_no_redis_url_publishes_to_the_fallback_only():
    local = Recorder()
    async with Publisher(None, fallback=local) as pub:
        entry_id = await pub.publish("e", 1, ["admin"])
        assert entry_id is not None and entry_id.endswith("-1")  # the fallback's own id
    assert local.calls == [("e", 1, ["admin"])]


@pytest.mark.parametrize("front", [Publisher, SyncPublisher])
@pytest.mark.parametrize(("option", "named"), [
    ({"max_connections": 1.5}, "max_connections"),   # every publish was dropped
    ({"max_connections": True}, "max_connections"),
    ({"maxlen": True}, "maxlen"),                    # Redis refused every XADD
    ({"maxlen": 2.5}, "maxlen"),
    ({"timeout": math.nan}, "timeout"),              # calls bounded by nothing
    ({"timeout": math.inf}, "timeout"),
    ({"cooldown": -1.0}, "cooldown"),                # the probe ran in a loop
    ({"cooldown": math.nan}, "cooldown"),
    ({"cooldown_max": 0}, "cooldown_max"),
    ({"log_every": math.nan}, "log_every"),
    ({"wait_replicas": 1.5}, "wait_replicas"),
    ({"wait_replicas": 1, "wait_timeout_ms": 0.5}, "wait_timeout_ms"),
])
def test_numbers_that_would_fail_every_call_are_refused_at_construction(
    front: type[Any], option: dict[str, Any], named: str,
) -> None:
    """They were accepted, and then every call failed open in silence (or was bounded by
    nothing): a bug in the caller, said where the other bad arguments are."""
    with pytest.raises(ValueError, match=named):
        front("redis://127.0.0.1:9/0", **option)


@pytest.mark.parametrize("front", [Publisher, SyncPublisher])
def test_no_redis_url_and_no_fallback_is_refused_at_construction(front: type[Any]) -> None:
    """`Publisher(None)` dropped every event without a word (a missing setting, as in
    `Publisher(os.environ.get("REDIS_URL"))`, looked like a working publisher); it is
    refused where the other unusable arguments are."""
    with pytest.raises(ValueError, match="no Redis URL and no fallback: every event would "
                       "be dropped"):
        front(None)
    # `os.environ.get("REDIS_URL", "")`: every call was dropped on an AssertionError
    for empty in ("", "  "):
        with pytest.raises(ValueError, match="redis_url is empty"):
            front(empty)


async def test_a_failing_fallback_does_not_raise(fresh_redis: RedisProcess):
    class Broken:
        def publish_local(self, event: str, data: Any, rooms: list[str]) -> str:
            raise RuntimeError("hub is gone")

    fresh_redis.kill()
    async with Publisher(fresh_redis.url, stream=stream_key(), timeout=0.2,
                         fallback=Broken()) as pub:
        assert await pub.publish("e", 1) is None
    assert pub.stats.dropped == 1


# --------------------------------------------------------------------------- throttle


async def test_throttle_keeps_leading_and_trailing_values_and_caps_the_rate(
    redis_server: RedisProcess, reader: aioredis.Redis
):
    stream = stream_key()
    every = 0.2
    async with Publisher(redis_server.url, stream=stream, timeout=OK) as pub:
        results = []
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < 1.0 and n < 500:  # a value every ~5 ms for 1 s
            results.append(await pub.publish("metrics_update", {"n": n}, ["admin"],
                                              throttle_key="metrics:admin", every=every))
            n += 1
            await asyncio.sleep(0.005)
        last = n - 1
        assert results[0] is not None  # leading edge: the first value goes out at once

        async def trailing_arrived() -> bool:  # the background task, not close, sends it
            got = await entries(reader, stream)
            return bool(got) and orjson.loads(got[-1][1]["data"])["data"] == {"n": last}

        await wait_for(trailing_arrived, 5, what="the trailing value")
        assert pub.stats.conflated > 0
    got = [decode_entry(i, f) for i, f in await entries(reader, stream)]
    values = [e.data["n"] for e in got]
    assert values[0] == 0 and values[-1] == last
    assert values == sorted(values)
    elapsed = (got[-1].ts - got[0].ts) / 1000
    assert len(got) <= elapsed / every + 2  # at most once per interval (plus both edges)
    assert len(got) >= 4  # ...but it did keep publishing through the burst
    gaps = [(b.ts - a.ts) / 1000 for a, b in itertools.pairwise(got)]
    assert min(gaps) >= every - 0.03


async def test_throttle_keys_are_independent_and_close_flushes(
    redis_server: RedisProcess, reader: aioredis.Redis
):
    stream = stream_key()
    async with Publisher(redis_server.url, stream=stream, timeout=OK) as pub:
        for user in ("456", "789"):
            assert await pub.publish("metrics_update", {"u": user, "v": 1}, [f"user-{user}"],
                                     throttle_key=f"m:{user}", every=60)
        for v in (2, 3, 4):
            assert await pub.publish("metrics_update", {"u": "456", "v": v}, ["user-456"],
                                     throttle_key="m:456", every=60) is None
        assert await reader.xlen(stream) == 2
    # closing flushed the last held value (v=4), not the superseded ones
    values = [(e.data["u"], e.data["v"]) for e in
              (decode_entry(i, f) for i, f in await entries(reader, stream))]
    assert values == [("456", 1), ("789", 1), ("456", 4)]
    assert pub.stats.conflated == 2


async def test_throttle_after_a_quiet_interval_is_a_new_leading_edge(
    redis_server: RedisProcess, reader: aioredis.Redis
):
    stream = stream_key()
    async with Publisher(redis_server.url, stream=stream, timeout=OK) as pub:
        assert await pub.publish("m", 1, throttle_key="k", every=0.1)

        async def idle() -> bool:
            return not pub._conflator.slots  # the slot is forgotten once its interval passed

        await wait_for(idle, 5, what="the throttle slot to expire")
        assert await pub.publish("m", 2, throttle_key="k", every=0.1)  # leading again
    assert await reader.xlen(stream) == 2


def test_conflator_edges_on_a_fake_clock():
    """The throttle's rules, clock-driven: lodash-style leading + trailing edges per key."""
    from dualcast.publisher.encoding import Entry, prepare
    from dualcast.publisher.throttle import Conflator

    c: Conflator[Entry] = Conflator()

    def offer(key: str, value: int, now: float, every: float = 1.0) -> bool:
        return c.offer(key, every, prepare("m", value, None), now)[0]

    def due(now: float) -> list[int]:
        return [orjson.loads(e.body)["data"] for e in c.pop_due(now)]

    assert offer("a", 1, 0.0)  # leading edge
    assert not offer("a", 2, 0.1) and not offer("a", 3, 0.5)  # held, 3 replaces 2
    assert offer("b", 10, 0.2)  # another key has its own interval
    assert due(0.99) == []
    assert due(1.0) == [3]  # trailing edge at the end of a's interval...
    assert not offer("a", 4, 1.5)  # ...which started a new interval
    assert due(1.2) == []  # b had nothing held: forgotten
    assert "b" not in c.slots
    assert due(2.0) == [4]
    assert due(3.0) == [] and "a" not in c.slots  # a quiet interval ends the key
    assert offer("a", 5, 3.1)  # so the next value is a leading edge again
    # many keys: each gets its trailing value exactly once, in due order
    for k in range(1000):
        assert offer(f"k{k}", 0, 10.0 + k / 1000)
        assert not offer(f"k{k}", k, 10.5 + k / 1000)
    assert sorted(due(12.0)) == list(range(1000))
    assert c.drain() == [] and not c.slots


# --------------------------------------------------------------------------- sync


def test_sync_publisher_publishes_batches_and_throttles(redis_server: RedisProcess):
    import redis

    stream = stream_key()
    with SyncPublisher(redis_server.url, stream=stream, timeout=OK) as pub:
        first = pub.publish("script", {"at": datetime(2026, 1, 1, tzinfo=UTC)}, ["admin"])
        many = pub.publish_many([("script", i) for i in range(10)])
        assert first and all(many)
        assert pub.publish("m", 0, throttle_key="k", every=1.0)
        for v in range(1, 20):
            assert pub.publish("m", v, throttle_key="k", every=1.0) is None
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        deadline = time.monotonic() + 5
        while True:  # the flush thread sends the trailing value without close()
            got = [decode_entry(i, f) for i, f in client.xrange(stream)]
            if got[-1].event == "m" and got[-1].data == 19:
                break
            assert time.monotonic() < deadline, "no trailing value from the flush thread"
            time.sleep(0.02)
    assert [e.data for e in got if e.event == "m"] == [0, 19]
    ids = [e.id for e in got]
    assert ids[:11] == [first, *many]
    client.close()


def test_sync_publisher_fails_open_fast(fresh_redis: RedisProcess):
    timeout = 0.3
    local = Recorder()
    with SyncPublisher(fresh_redis.url, stream=stream_key(), timeout=timeout, cooldown=1.0) as pub:
        assert pub.publish("before", 1)
        fresh_redis.kill()
        durations = []
        for i in range(100):
            started = time.monotonic()
            assert pub.publish("during", i) is None
            durations.append(time.monotonic() - started)
        assert max(durations) < timeout + 0.1
        assert sum(durations) < 2 * timeout + 0.2
        fresh_redis.start()
        deadline = time.monotonic() + 15
        while pub.publish("after", 1) is None:  # inline probes, one per cooldown
            assert time.monotonic() < deadline, "sync publisher never recovered"
            time.sleep(0.05)
    assert pub.stats.outages == 1
    with SyncPublisher(None, fallback=local) as pub2:
        assert pub2.publish("e", 1)
    assert local.calls == [("e", 1, [])]


def test_sync_local_overload_is_not_an_outage(redis_server: RedisProcess):
    with SyncPublisher(redis_server.url, stream=stream_key(), timeout=0.2,
                       max_connections=1) as pub:
        assert pub.publish("warm-up", 0)
        pool = pub._client().connection_pool
        held = pool.get_connection()  # another thread of this process holds the only one
        try:
            assert pub.publish("queued", 1) is None
        finally:
            pool.release(held)
        assert pub.stats.overloaded == 1 and pub.stats.outages == 0
        assert pub.publish("after", 2)


# --------------------------------------------------------------------------- WAIT


def replication_online(primary: RedisProcess) -> bool:
    info = primary.command("INFO", "replication")
    return b"connected_slaves:1" in info and b"state=online" in info


@pytest.fixture
def replica(fresh_redis: RedisProcess, tmp_path: Path) -> Iterator[RedisProcess]:
    """A real redis-server replicating `fresh_redis`, on a free port in a temp dir of its own."""
    replica = RedisProcess(tmp_path / "replica",
                           args=["--replicaof", "127.0.0.1", str(fresh_redis.port)])
    try:
        replica.start()
        wait_until(lambda: replication_online(fresh_redis), timeout=20,
                   what="the replica to sync with its primary")
        yield replica
    finally:
        replica.stop()


def publish_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dualcast", "publish", *args, "--redis-url", redis_url],
        capture_output=True, text=True, timeout=30, env=clean_env(), cwd=tempfile.gettempdir(),
    )


PUBLISH = ("metrics_update", '{"activeSessions": 1}', "--room", "admin")


async def test_wait_replicas_acknowledged(fresh_redis: RedisProcess, replica: RedisProcess):
    stream = stream_key()
    async with Publisher(fresh_redis.url, stream=stream, timeout=OK, wait_replicas=1,
                         wait_timeout_ms=5000) as pub:
        result = await pub.publish_result("metrics_update", {"n": 1}, ["admin"])
        assert (result.outcome, result.replicas, result.wanted) == (Outcome.PUBLISHED, 1, 1)
        assert result.replicated and result.id
        batch = await pub.publish_many_results([("tick", i) for i in range(5)])
        assert [r.replicas for r in batch] == [1] * 5 and all(r.replicated for r in batch)
        assert await pub.publish("tick", 6)  # the plain API still answers the id
    with SyncPublisher(fresh_redis.url, stream=stream, timeout=OK, wait_replicas=1,
                       wait_timeout_ms=5000) as spub:
        sync_result = spub.publish_result("tick", 7)
        assert sync_result.replicated and sync_result.replicas == 1
    assert pub.stats.under_replicated == 0 and spub.stats.under_replicated == 0
    # what WAIT acknowledged is on the replica, in order
    replica_client = aioredis.from_url(f"redis://127.0.0.1:{replica.port}/0",
                                       decode_responses=True)
    try:
        ids = [i for i, _ in await replica_client.xrange(stream)]
    finally:
        await replica_client.aclose()
    assert ids[0] == result.id and ids[-1] == sync_result.id and len(ids) == 8

    done = publish_cli(fresh_redis.url, *PUBLISH, "--wait-replicas", "1", "--wait-timeout", "5000")
    assert done.returncode == 0, done.stderr
    parse_id(done.stdout.strip())
    assert done.stderr == ""


async def test_wait_replicas_times_out_when_the_replica_is_gone(
    fresh_redis: RedisProcess, replica: RedisProcess
):
    replica.kill()
    stream = stream_key()
    wait_ms = 300
    async with Publisher(fresh_redis.url, stream=stream, timeout=OK, wait_replicas=1,
                         wait_timeout_ms=wait_ms) as pub:
        started = time.monotonic()
        result = await pub.publish_result("metrics_update", {"n": 1}, ["admin"])
        took = time.monotonic() - started
    assert result.outcome is Outcome.PUBLISHED and result.id  # on the primary all the same
    assert result.replicas == 0 and not result.replicated
    assert wait_ms / 1000 * 0.9 <= took < OK + wait_ms / 1000  # WAIT waited, and was bounded
    assert pub.stats.under_replicated == 1 and pub.stats.published == 1
    assert pub.available  # too few replicas is not an outage
    with SyncPublisher(fresh_redis.url, stream=stream, timeout=OK, wait_replicas=1,
                       wait_timeout_ms=wait_ms) as spub:
        assert spub.publish_result("tick", 2).replicas == 0
    assert spub.stats.under_replicated == 1

    done = publish_cli(fresh_redis.url, *PUBLISH, "--wait-replicas", "1",
                       "--wait-timeout", str(wait_ms))
    assert done.returncode == 0, done.stderr
    parse_id(done.stdout.strip())
    assert done.stderr.strip() == (
        f"dualcast publish: warning: 0 of 1 replicas acknowledged within {wait_ms} ms")


def test_wait_options_are_checked():
    with pytest.raises(ValueError, match="wait_timeout_ms"):
        Publisher("redis://127.0.0.1:1/0", wait_replicas=1, wait_timeout_ms=0)
    with pytest.raises(ValueError, match="wait_replicas"):
        SyncPublisher("redis://127.0.0.1:1/0", wait_replicas=-1)


def test_cli_refusals_are_one_line(redis_server: RedisProcess):
    for args, says in (
        (("bad name", "{}"), "event name 'bad name' does not match"),
        (("ok", "{}", "--room", "no room"), "room name 'no room' does not match"),
        (("ok", '{"x": NaN}'), "data['x']: nan is not a finite number"),
        (("ok", "[" * 253 + "]" * 253), "nested deeper than 252 levels"),
        (("ok", '{"x": "\\ud800"}'), "data['x']: string holds a lone surrogate (U+D800)"),
        (("ok", "{}", "--wait-replicas", "many"), "--wait-replicas"),
        # named the library's wait_timeout_ms, not the flag the person typed
        (("ok", "{}", "--wait-replicas", "1", "--wait-timeout", "0"),
         "argument --wait-timeout: '0' is not a whole number of milliseconds >= 1"),
    ):
        done = publish_cli(redis_server.url, *args)
        assert done.returncode == 2 and done.stdout == "", (args, done)
        lines = done.stderr.strip().splitlines()
        assert says in lines[-1], (args, done.stderr)
        assert len(lines) == 1 or lines[0].startswith("usage:"), done.stderr


# --------------------------------------------------------------------------- end to end


async def test_published_events_reach_a_websocket_client(redis_server: RedisProcess, dualcast):
    stream = stream_key()
    server = dualcast(redis_server.url, env={"DUALCAST_STREAM": stream})
    url = f"{server.ws_url}/api/ws?token={token('456', admin=True)}&rooms=admin,user-456"
    async with websockets.connect(url, open_timeout=10) as ws:
        welcome = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        assert welcome["type"] == "welcome"
        async with Publisher(redis_server.url, stream=stream, timeout=OK) as pub:
            sent = [
                await pub.publish("provider_status_change", {"providerId": "openai"}),
                await pub.publish("metrics_update", {"activeSessions": 3}, ["admin"]),
                await pub.publish("usage_log_added", {"userId": "456"}, ["user-456"]),
                await pub.publish("usage_log_added", {"userId": "789"}, ["user-789"]),
            ]
            sent += await pub.publish_many([("session_created", {"sessionId": "s1"}, ["user-456"]),
                                            ("session_ended", {"sessionId": "s1"}, ["user-456"])])
        assert all(sent)
        expected = [sent[0], sent[1], sent[2], sent[4], sent[5]]  # not user-789's
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while len(seen) < len(expected):
            frame = orjson.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
            if frame["type"] == "event":
                seen.append(frame)
            elif frame["type"] == "batch":
                seen.extend(frame["events"])
    assert [f["id"] for f in seen] == expected
    assert [f["event"] for f in seen] == ["provider_status_change", "metrics_update",
                                         "usage_log_added", "session_created", "session_ended"]
    assert seen[2]["data"] == {"userId": "456"}
    assert all(isinstance(f["ts"], int) for f in seen)


async def test_fallback_keeps_an_in_process_dashboard_live_through_an_outage(
    fresh_redis: RedisProcess,
):
    """The opt-in fallback with the real app: Redis dies, events still reach a WS client."""
    import uvicorn

    from dualcast.app import create_app
    from dualcast.config import Settings
    from tests.conftest import SECRET

    stream = stream_key()
    settings = Settings(redis_url=fresh_redis.url, stream=stream, secret=SECRET,
                        redis_timeout=0.5, backoff_max=0.5)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="on"))
    serving = asyncio.create_task(server.serve())
    try:
        async def started() -> bool:
            return server.started

        await wait_for(started, 10, what="uvicorn to start")
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}/api/ws?token={token('456', admin=True)}"
        async with websockets.connect(url, open_timeout=10) as ws, Publisher(
            fresh_redis.url, stream=stream, timeout=0.3, fallback=app.state.dualcast
        ) as pub:
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "welcome"
            before = await pub.publish("metrics_update", {"activeSessions": 1}, ["admin"])
            fresh_redis.kill()
            during = await pub.publish("metrics_update", {"activeSessions": 2}, ["admin"])
            also = await pub.publish_many([("provider_status_change", {"providerId": "x"})])
            assert before and during and also[0]
            assert pub.stats.fallback == 2
            assert parse_id(before) < parse_id(during) < parse_id(also[0])  # cursors stay ordered
            seen: list[dict[str, Any]] = []
            async with asyncio.timeout(10):
                while len(seen) < 3:
                    frame = orjson.loads(await ws.recv())
                    if frame["type"] == "event":
                        seen.append(frame)
                    elif frame["type"] == "batch":
                        seen.extend(frame["events"])
        assert [f["id"] for f in seen] == [before, during, also[0]]
        assert [f["data"] for f in seen][:2] == [{"activeSessions": 1}, {"activeSessions": 2}]
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)


#: A deployment's own name patterns: rooms with a slash, lower-case event names only.
PATTERNS = {"DUALCAST_ROOM_PATTERN": r"^[a-z0-9/-]{1,64}$",
            "DUALCAST_EVENT_PATTERN": r"^[a-z_]{1,32}$"}


async def test_names_follow_the_deployments_patterns(redis_server: RedisProcess, dualcast):
    """`dualcast publish` once checked the default patterns whatever the deployment set:
    it refused `--room team/a`, which every server of the deployment accepts, and it
    appended `Big` (printing its id, exit 0), which every server then skipped as
    bad_event. The CLI now uses the settings' patterns; the library takes them."""
    stream = stream_key()
    env = {**PATTERNS, "DUALCAST_STREAM": stream}
    server = dualcast(redis_server.url, env=env)
    url = f"{server.ws_url}/api/ws?token={token('456', admin=True)}&rooms=team/a"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dualcast", "publish", *args, "--redis-url", redis_server.url],
            capture_output=True, text=True, timeout=30, env=clean_env(env),
            cwd=tempfile.gettempdir(),
        )

    refused = cli("Big", "{}")
    assert refused.returncode == 2 and refused.stdout == "", refused
    assert "event name 'Big' does not match ^[a-z_]{1,32}$" in refused.stderr
    async with websockets.connect(url, open_timeout=10) as ws:
        welcome = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        assert welcome["type"] == "welcome" and welcome["rooms"] == ["team/a"]
        done = cli("team_update", '{"n": 1}', "--room", "team/a")
        assert done.returncode == 0, done.stderr
        from_cli = done.stdout.strip()
        async with Publisher(redis_server.url, stream=stream, timeout=OK,
                             event_pattern=PATTERNS["DUALCAST_EVENT_PATTERN"],
                             room_pattern=PATTERNS["DUALCAST_ROOM_PATTERN"]) as pub:
            with pytest.raises(ValueError, match="does not match"):
                await pub.publish("Big", 1)
            with pytest.raises(ValueError, match="does not match"):
                await pub.publish_many([("fine", 1), ("Big", 2)])
            from_lib = await pub.publish("team_update", {"n": 2}, ["team/a"])
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while len(seen) < 2:
                frame = orjson.loads(await ws.recv())
                seen += [e for e in (frame["events"] if frame["type"] == "batch" else [frame])
                         if e["type"] == "event"]
    assert [(e["id"], e["data"]) for e in seen] == [(from_cli, {"n": 1}), (from_lib, {"n": 2})]
    assert await metric(server, "dualcast_malformed_entries") == 0


def test_a_pattern_that_breaks_the_protocol_is_refused_at_once():
    with pytest.raises(ValueError, match=re.escape("room_pattern '.*': accepts the empty room")):
        Publisher("redis://127.0.0.1:1/0", room_pattern=".*")
    with pytest.raises(ValueError, match="event_pattern"):
        SyncPublisher("redis://127.0.0.1:1/0", event_pattern="(")


def test_a_publisher_kept_across_event_loops_publishes_every_event(redis_server: RedisProcess):
    """A module-level Publisher used from `asyncio.run()` per job (or per test) once
    dropped every other event: the pooled connection belonged to the loop that had
    closed ("Event loop is closed"), and only the failure discarded it."""
    import redis as sync_redis

    stream = stream_key()
    pub = Publisher(redis_server.url, stream=stream, timeout=OK)

    async def job(n: int) -> list[str | None]:
        return [await pub.publish("job", n),
                *await pub.publish_many([("job", n), ("job", n)])]

    sent = [asyncio.run(job(n)) for n in range(4)]
    asyncio.run(pub.aclose())
    assert all(all(ids) for ids in sent), (sent, pub.stats)
    assert (pub.stats.published, pub.stats.dropped) == (12, 0)
    with sync_redis.Redis.from_url(redis_server.url) as raw:
        assert raw.xlen(stream) == 12


async def test_a_reply_too_late_says_the_event_may_be_in_the_stream(redis_server: RedisProcess):
    """Redis carried the XADD out but its reply came after the timeout: `dualcast
    publish` said Redis "did not take the event" (exit 1), so a script that retried
    appended it twice, and a result's error read like a refusal. Both now say that the
    event may be in the stream."""
    from tests.harness.tcpproxy import TCPProxy

    stream = stream_key()
    local = Recorder()
    with TCPProxy(redis_server.port) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        async with Publisher(url, stream=stream, timeout=0.3, fallback=local) as pub:
            assert await pub.publish("warm", 0)  # a connection, open and proven
            proxy.delay_replies(1.0)
            late = await pub.publish_result("late", 1)
        with SyncPublisher(url, stream=stream, timeout=0.3, fallback=local) as spub:
            proxy.delay_replies(0)
            assert spub.publish("warm", 0)
            proxy.delay_replies(1.0)
            sync_late = spub.publish_result("late", 2)
        done = subprocess.run(
            [sys.executable, "-m", "dualcast", "publish", "late", "3", "--redis-url", url],
            capture_output=True, text=True, timeout=30, cwd=tempfile.gettempdir(),
            env=clean_env({"DUALCAST_STREAM": stream, "DUALCAST_REDIS_TIMEOUT": "0.3"}),
        )
        proxy.restore()
    for result in (late, sync_late):
        # (fail open: the fallback still takes it, as documented, at the risk of twice)
        assert result.outcome is Outcome.FALLBACK, result
        assert result.error and result.error.endswith("(Redis may still have appended it)")
    assert [event for event, _, _ in local.calls] == ["late", "late"]
    assert done.returncode == 1 and "may or may not have taken the event" in done.stderr, done
    async with aioredis.from_url(redis_server.url, decode_responses=True) as raw:
        # (the CLI's connection never got through its handshake: it sent no XADD)
        await wait_for(lambda: _count(raw, stream, "late", 2), 10, "the late XADDs to land")


async def _count(raw: aioredis.Redis, stream: str, event: str, n: int) -> bool:
    bodies = [orjson.loads(fields["data"]) for _, fields in await raw.xrange(stream)]
    return sum(body["event"] == event for body in bodies) == n
