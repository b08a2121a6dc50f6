"""The overview folded as events arrive gives the full fold's answer, at the cost of the answer.

The reference is `fold` over the retained events a caller may see (what every
`/api/overview` call computed before, by reading the whole stream). The
incremental `OverviewFolds` must equal it for every room set, across batches and
across trimming; a real dualcast must answer it without reading the stream.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import httpx
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from dualcast.config import load_settings
from dualcast.demo import Simulation
from dualcast.events import ZERO, Envelope, Event, decode_entry, entry_fields, format_id
from dualcast.log import LogInfo
from dualcast.log.redis import RedisLog
from dualcast.overview import OverviewFolds, build_overview, fold
from tests.conftest import token
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.tcpproxy import TCPProxy
from tests.harness.waits import wait_for

pytestmark = pytest.mark.timeout(120)

ROOM_SETS: list[frozenset[str]] = [
    frozenset(), frozenset({"admin"}), frozenset({"user-456"}),
    frozenset({"admin", "user-456", "user-789"}),
    frozenset({"admin", *(f"user-{u}" for u in ("456", "789", "123", "234", "567", "890",
                                                   "321", "654"))}),
]


def demo_events(n: int, seed: int = 7) -> list[tuple[str, Any, list[str]]]:
    sim = Simulation(random.Random(seed))
    out = list(sim.start())
    while len(out) < n:
        out += sim.step()
    return out[:n]


def as_events(raw: list[tuple[str, Any, list[str]]], start_ms: int = 1_700_000_000_000,
              ) -> list[Event]:
    return [decode_entry(format_id((start_ms + i * 7, i % 3)),
                         entry_fields(Envelope(event=e, data=d, rooms=r), start_ms + i * 1_300))
            for i, (e, d, r) in enumerate(raw)]


def reference(events: list[Event], rooms: frozenset[str]) -> dict[str, Any]:
    state = fold([e for e in events if e.visible_to(rooms)])
    if events:
        state["last_id"] = events[-1].id  # the newest retained entry, as build_overview says
    return state


def check(folds: OverviewFolds, retained: list[Event], rooms: frozenset[str]) -> None:
    got = folds.state(rooms)
    want = reference(retained, rooms)
    assert got == want, {k: (got[k], want[k]) for k in got if got[k] != want[k]}


def test_incremental_equals_full_fold_on_the_demo_events_across_batches_and_trims() -> None:
    events = as_events(demo_events(2000))
    folds = OverviewFolds()
    first = 0
    rng = random.Random(1)
    at = 0
    while at < len(events):
        size = rng.randint(1, 60)
        batch = events[at:at + size]
        folds.apply(batch, batch[-1].key)
        at += size
        if rng.random() < 0.2:  # the stream trims its head now and then (MAXLEN ~)
            first = min(at - 1, first + rng.randint(0, 200))
            folds.trim(events[first].key)
        if rng.random() < 0.25 or at >= len(events):
            for rooms in ROOM_SETS:
                check(folds, events[first:at], rooms)
    assert folds.state(ROOM_SETS[-1])["usage"], "the demo produced usage to compare"
    last = events[-1].key
    # the stream emptied: nothing is kept, not even empty room sets
    folds.trim_to(LogInfo(exists=True, length=0, first_id=None, last_id=last))
    assert folds.classes == {} and folds.state(ROOM_SETS[-1])["providers"] == {}


def test_a_stale_empty_window_never_trims_what_was_read_since() -> None:
    """The window a call uses may be a second old: said empty before an event arrived,
    it must not take that event away (Redis restarted empty, then a new XADD)."""
    folds = OverviewFolds()
    event, = as_events([("provider_status_change", {"providerId": "p"}, [])])
    folds.apply([event], event.key)
    folds.trim_to(LogInfo(exists=False, length=0, first_id=None, last_id=ZERO))
    assert folds.state(frozenset())["providers"] == {"p": {"providerId": "p"}}


rooms_pool = ["admin", "user-1", "user-2", "team"]
fold_events = st.tuples(
    st.sampled_from(["metrics_update", "provider_status_change", "session_created",
                     "session_ended", "usage_log_added", "other"]),
    st.one_of(
        st.fixed_dictionaries({}, optional={
            "userId": st.sampled_from([None, "1", "2", 3, False]),
            "providerId": st.sampled_from([None, "p1", "p2"]),
            "sessionId": st.sampled_from([None, "s1", "s2", "None", 5]),
            "x": st.integers(-(2**31), 2**31)}),
        st.none(), st.integers(-(2**31), 2**31), st.lists(st.booleans(), max_size=2)),
    st.lists(st.sampled_from(rooms_pool), max_size=3, unique=True),
    st.integers(0, 10 * 60_000),
)


@settings(max_examples=150, deadline=None, database=None)
@given(raw=st.lists(fold_events, max_size=80), cuts=st.lists(st.integers(0, 80), max_size=6),
       trims=st.lists(st.integers(0, 80), max_size=4))
def test_incremental_equals_full_fold_for_any_events_rooms_and_trims(
    raw: list[tuple[str, Any, list[str], int]], cuts: list[int], trims: list[int],
) -> None:
    events = [decode_entry(f"{1000 + i}-0", entry_fields(Envelope(event=e, data=d, rooms=r), ts))
              for i, (e, d, r, ts) in enumerate(raw)]
    folds = OverviewFolds()
    bounds = sorted({c for c in cuts if c < len(events)} | {len(events)})
    first = 0
    done = 0
    trim_at = sorted(trims)
    for bound in bounds:
        batch = events[done:bound]
        if batch:
            folds.apply(batch, batch[-1].key)
        done = bound
        if trim_at and done:
            first = max(first, min(trim_at.pop(0), done - 1))
            folds.trim(events[first].key)
        for rooms in [frozenset(s) for s in ([], ["admin"], ["user-1", "team"], rooms_pool)]:
            check(folds, events[first:done], rooms)


# --- a real dualcast against a real redis-server ----------------------------------------


def xrange_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_xrange", {}).get("calls", 0))


#: Each identity's token and the rooms it joins when it names none (DESIGN "Subscriptions").
IDENTITIES: list[tuple[str | None, set[str]]] = [
    (None, set()),
    (token("root", admin=True), {"admin", "user-root"}),
    (token("456"), {"user-456"}),
    (token("ops", rooms=["admin", "user-456", "user-789"]),
     {"admin", "user-456", "user-789", "user-ops"}),
]


async def mismatches(server: DualcastProcess, redis_url: str, stream: str) -> list[str]:
    """The identities whose overview from the server differs from the full fold."""
    log = RedisLog(load_settings(redis_url=redis_url, stream=stream))
    wrong: list[str] = []
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            for tok, rooms in IDENTITIES:
                headers = {"Authorization": f"Bearer {tok}"} if tok else {}
                got = (await http.get("/api/overview", headers=headers)).json()
                if got != await build_overview(log, rooms):
                    wrong.append(",".join(sorted(rooms)) or "public")
    finally:
        await log.close()
    return wrong


async def eventually_matches(server: DualcastProcess, redis_url: str, stream: str,
                             timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while wrong := await mismatches(server, redis_url, stream):
        assert loop.time() < deadline, f"overview differs from the full fold for {wrong}"
        await asyncio.sleep(0.1)


async def test_a_server_answers_the_full_fold_without_reading_the_stream(
    redis_server: RedisProcess, dualcast: Any,
) -> None:
    stream = f"overview-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_server.url)
    raw = demo_events(1200, seed=3)

    def xadd_all(items: list[tuple[str, Any, list[str]]]) -> None:
        with client.pipeline(transaction=False) as pipe:
            for e, d, r in items:
                pipe.xadd(stream, entry_fields(Envelope(event=e, data=d, rooms=r)))  # type: ignore[arg-type]
            pipe.execute()

    xadd_all(raw[:600])  # folded at start
    server: DualcastProcess = dualcast(redis_server.url, env={"DUALCAST_STREAM": stream,
                                                              "DUALCAST_BLOCK_MS": "300"})
    await wait_for(server.ready, 10, "readyz")
    xadd_all(raw[600:])  # folded as they arrive
    last = client.xrevrange(stream, count=1)[0][0].decode()
    await wait_for(lambda: httpx.get(server.url + "/api/overview", timeout=5).json()["last_id"]
                   == last, 10, "the overview to reach the last entry")
    assert await mismatches(server, redis_server.url, stream) == []

    # A call costs what its answer costs: no overview call reads the stream.
    before = xrange_calls(client)
    for _ in range(50):
        for tok, _rooms in IDENTITIES:
            headers = {"Authorization": f"Bearer {tok}"} if tok else {}
            assert httpx.get(server.url + "/api/overview", headers=headers,
                             timeout=5).status_code == 200
    assert xrange_calls(client) == before

    # What the stream trims leaves the answer too (the window is cached a second at most).
    client.xtrim(stream, maxlen=300, approximate=False)
    await eventually_matches(server, redis_server.url, stream, 10)
    client.close()
    assert "Traceback" not in server.log()


async def test_the_overview_is_folded_again_when_redis_loses_the_stream(
    fresh_redis: RedisProcess, dualcast: Any,
) -> None:
    """Redis restarted empty: the old answer would describe events no longer anywhere."""
    stream = f"overview-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(fresh_redis.url)
    server: DualcastProcess = dualcast(fresh_redis.url, env={
        "DUALCAST_STREAM": stream, "DUALCAST_BLOCK_MS": "200", "DUALCAST_REDIS_TIMEOUT": "1",
        "DUALCAST_BACKOFF_MAX": "0.5"})
    await wait_for(server.ready, 10, "readyz")

    def providers() -> dict[str, Any]:
        return dict(httpx.get(server.url + "/api/overview", timeout=5).json()["providers"])

    def status(provider: str, value: str) -> None:
        client.xadd(stream, entry_fields(Envelope(  # type: ignore[arg-type]
            event="provider_status_change", data={"providerId": provider, "status": value})))

    status("openai", "down")
    await wait_for(lambda: providers() == {"openai": {"providerId": "openai", "status": "down"}},
                   10, "the first provider status")
    client.flushall()  # as a Redis restarted without its data
    await wait_for(lambda: providers() == {}, 15, "the overview to forget the lost stream")
    status("mistral", "healthy")
    await wait_for(lambda: list(providers()) == ["mistral"], 10, "the new provider status")
    assert await mismatches(server, fresh_redis.url, stream) == []
    client.close()


async def test_an_overview_from_a_lagging_instance_reaches_the_logs_head(
    redis_server: RedisProcess, dualcast: Any,
) -> None:
    """A page told `reset` by one instance reloads the overview, maybe from another whose
    consumer is behind that position; the overview ended before it while the page's
    stream went on after it, and what came between was never folded. The overview now
    waits (2 s at most) for its consumer to reach the log's head as it was asked."""
    stream = f"overview-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_server.url)
    with TCPProxy(redis_server.port) as proxy:
        server: DualcastProcess = dualcast(f"redis://127.0.0.1:{proxy.port}/0",
                                           env={"DUALCAST_STREAM": stream})
        await wait_for(server.ready, 10, "readyz")
        proxy.delay_replies(0.6)  # every read of this instance's consumer lands 0.6 s late
        async with httpx.AsyncClient(timeout=10) as http:
            for n in range(3):
                newest = client.xadd(stream, entry_fields(Envelope(  # type: ignore[arg-type]
                    event="provider_status_change",
                    data={"providerId": f"p{n}", "status": "down"}))).decode()
                answer = (await http.get(server.url + "/api/overview")).json()
                assert answer["last_id"] == newest, (n, answer["last_id"], newest)
                assert f"p{n}" in answer["providers"]
    client.close()
