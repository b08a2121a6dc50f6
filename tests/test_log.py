"""Both event-log engines pass one suite: append, read after an id, block, window info."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest

from dualcast.config import load_settings
from dualcast.events import Envelope, decode_entry, entry_fields, format_id, parse_id
from dualcast.log import EventLog, LogUnavailable, create_log
from tests.harness.procs import RedisProcess, free_port
from tests.harness.stream import xadd
from tests.harness.tcpproxy import TCPProxy
from tests.harness.waits import wait_for

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["memory", "redis"])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[EventLog]:
    stream = f"test-{uuid.uuid4().hex[:8]}"
    if request.param == "memory":
        settings = load_settings(redis_url=None, maxlen=50, stream=stream)
    else:
        redis: RedisProcess = request.getfixturevalue("redis_server")
        settings = load_settings(redis_url=redis.url, maxlen=50, stream=stream)
    log = create_log(settings)
    await log.connect()
    yield log
    await log.close()


def fields(event: str, data: object = None, rooms: list[str] | None = None) -> dict[str, str]:
    return entry_fields(Envelope(event=event, data=data, rooms=rooms or []))


async def test_append_returns_increasing_stream_ids(engine: EventLog) -> None:
    ids = [await engine.append(fields("tick", i)) for i in range(20)]
    keys = [parse_id(i) for i in ids]
    assert keys == sorted(keys) and len(set(keys)) == 20
    assert all("-" in i for i in ids)


async def test_read_after_is_exclusive_paged_and_ordered(engine: EventLog) -> None:
    ids = await engine.append_many([fields("tick", i) for i in range(10)])
    page = await engine.read_after(ids[2], 3)
    assert [entry_id for entry_id, _ in page] == ids[3:6]
    rest = await engine.read_after(ids[5], 100)
    assert [entry_id for entry_id, _ in rest] == ids[6:]
    assert await engine.read_after(ids[-1], 100) == []
    event = decode_entry(*page[0])
    assert (event.event, event.data) == ("tick", 3)


async def test_read_blocking_waits_for_the_next_entry(engine: EventLog) -> None:
    head = await engine.append(fields("first"))
    reader = asyncio.create_task(engine.read_blocking(head, 10, 5000))
    await asyncio.sleep(0.05)
    assert not reader.done()
    new_id = await engine.append(fields("second"))
    entries = await asyncio.wait_for(reader, 5)
    assert [entry_id for entry_id, _ in entries] == [new_id]


async def test_read_blocking_times_out_empty(engine: EventLog) -> None:
    head = await engine.append(fields("only"))
    assert await engine.read_blocking(head, 10, 100) == []


async def test_info_reports_the_retained_window_and_trims(engine: EventLog) -> None:
    info = await engine.info()
    assert info.length == 0 and info.first_id is None
    ids = await engine.append_many([fields("tick", i) for i in range(300)])
    info = await engine.info()
    assert info.last_id == parse_id(ids[-1])
    # MAXLEN ~ 50: approximately trimmed, never below the limit.
    assert 50 <= info.length < 300
    assert info.first_id is not None and info.first_id > parse_id(ids[0])
    # Everything before the first retained entry counts as deleted: a cursor there
    # has lost entries; the entry just before the first one lost nothing.
    assert parse_id(ids[0]) <= info.max_deleted < info.first_id
    kept = ids.index(format_id(info.first_id))
    assert info.max_deleted == parse_id(ids[kept - 1]) or info.max_deleted < info.first_id


async def test_raw_xadd_from_another_producer_is_readable(redis_server: RedisProcess) -> None:
    stream = f"raw-{uuid.uuid4().hex[:8]}"
    log = create_log(load_settings(redis_url=redis_server.url, stream=stream))
    await log.connect()
    try:
        entry_id = xadd(redis_server, "usage_log_added", {"costUsd": 0.5}, ["admin"], stream)
        (got_id, got_fields), = await log.read_after("0-0", 10)
        assert got_id == entry_id
        event = decode_entry(got_id, got_fields)
        assert event.event == "usage_log_added"
        assert event.data == {"costUsd": 0.5}
        assert event.rooms == ("admin",)
        assert json.loads(got_fields[b"data"])["event"] == "usage_log_added"  # bytes, as stored
    finally:
        await log.close()


async def test_unreachable_redis_raises_log_unavailable() -> None:
    settings = load_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout=0.5)
    log = create_log(settings)
    with pytest.raises(LogUnavailable):
        await log.connect()
    with pytest.raises(LogUnavailable):
        await log.append(fields("x"))
    await log.close()


async def test_a_connection_option_redis_py_refuses_is_log_unavailable(
    redis_server: RedisProcess,
) -> None:
    """redis-py raises TypeError on every connect when a connection option does not fit
    the connection class (what a `unix://...?socket_keepalive=true` URL did before such
    URLs were refused): it must read as the log being unavailable, a 503 and a line in
    the consumer's log, never escape as a 500 or a traceback per retry."""
    settings = load_settings(redis_url=redis_server.url, stream=f"test-{uuid.uuid4().hex[:8]}",
                             redis_timeout=0.5)
    log = create_log(settings)
    for client in (log._client, log._reader):  # type: ignore[attr-defined]
        client.connection_pool.connection_kwargs["not_an_option"] = 1
    try:
        with pytest.raises(LogUnavailable, match=r"TypeError: .*'not_an_option'"):
            await log.connect()
        with pytest.raises(LogUnavailable, match="'not_an_option'"):
            await log.append(fields("x"))
        with pytest.raises(LogUnavailable, match="'not_an_option'"):
            await log.read_after("0-0", 10)
        with pytest.raises(LogUnavailable, match="'not_an_option'"):
            await log.read_blocking("0-0", 10, 100)
    finally:
        await log.close()


async def test_commands_after_redis_comes_back_do_not_fail_on_connections_that_died(
    redis_server: RedisProcess,
) -> None:
    """Pooled connections cut while Redis was away were handed out as if alive, and the
    first command after Redis came back failed on one: a long-poll that had waited
    through the outage answered 503 with Redis up, and so did the first publish."""
    with TCPProxy(redis_server.port) as proxy:
        settings = load_settings(redis_url=f"redis://127.0.0.1:{proxy.port}/0",
                                 stream=f"test-{uuid.uuid4().hex[:8]}", redis_timeout=1)
        log = create_log(settings)
        try:
            await log.append(fields("before"))
            for command in (lambda: log.read_after("0-0", 10), log.info, log.ping,
                            lambda: log.append(fields("after"))):
                # several connections in the pool, all of them cut by the outage
                await asyncio.gather(*(log.read_after("0-0", 10) for _ in range(5)))
                proxy.refuse()
                await wait_for(lambda: _pool_saw_the_cut(log), 5, "the pool to see the cut")
                proxy.restore()
                await command()
        finally:
            await log.close()


def _pool_saw_the_cut(log: EventLog) -> bool:
    """Whether every idle pooled connection has read its peer's close (nothing was asked
    of Redis while it was away, as on a quiet server)."""
    idle = log._client.connection_pool._available_connections  # type: ignore[attr-defined]
    return bool(idle) and all(c._reader is None or c._reader.at_eof() for c in idle)
