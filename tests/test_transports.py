"""WebSocket, SSE and long-poll against real servers on one real Redis.

Every client here is a real protocol client; events come from raw XADDs (any
producer) or the publish API; assertions are what a subscriber sees.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import require_tool, token
from tests.harness.clients import Poller, SSEClient, Transport, WSClient, subscribe
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.stream import xadd
from tests.harness.waits import wait_for

pytestmark = pytest.mark.timeout(90)


class Cluster:
    """Two dualcast instances (A, B) sharing one Redis stream of this module's own."""

    def __init__(self, redis: RedisProcess, a: DualcastProcess, b: DualcastProcess, stream: str):
        self.redis, self.a, self.b, self.stream = redis, a, b, stream

    def xadd(self, event: str, data: object, rooms: list[str] | None = None) -> str:
        return xadd(self.redis, event, data, rooms, self.stream)


@pytest.fixture(scope="module")
def cluster(redis_server: RedisProcess, server_with: Callable[..., DualcastProcess]) -> Cluster:
    stream = f"transports-{uuid.uuid4().hex[:8]}"
    env = {"DUALCAST_STREAM": stream, "DUALCAST_QUEUE_SIZE": "50",
           "DUALCAST_REPLAY_MAX": "300", "DUALCAST_REPLAY_PAGE": "40"}
    return Cluster(redis_server, server_with(env, "a"), server_with(env, "b"), stream)


async def test_each_transport_receives_in_order_with_stream_ids(
    cluster: Cluster, transport: Transport,
) -> None:
    client = await subscribe(transport, cluster.a.url)
    try:
        if not isinstance(client, Poller):  # long-poll has no welcome
            assert client.seen.welcome is not None and client.seen.welcome["rooms"] == []
        ids = [cluster.xadd("tick", {"n": n}) for n in range(30)]
        await wait_for(lambda: len(client.seen.ids) >= 30, 10, "30 events")
        assert client.seen.ids == ids
        assert [e["data"]["n"] for e in client.seen.events] == list(range(30))
        assert {e["event"] for e in client.seen.events} == {"tick"}
        if isinstance(client, WSClient):
            frame = client.seen.events[0]
            assert set(frame) >= {"type", "id", "event", "data", "ts"}
            assert isinstance(frame["ts"], int)
    finally:
        await client.close()


async def test_room_events_reach_members_and_public_events_reach_all(cluster: Cluster) -> None:
    admin = WSClient(cluster.a.ws_url, token=token("1", admin=True))
    user = SSEClient(cluster.b.url, token=token("456"))
    anon = WSClient(cluster.b.ws_url)
    for c in (admin, user, anon):
        await c.connect()
    try:
        assert admin.seen.welcome and admin.seen.welcome["rooms"] == ["admin", "user-1"]
        a = cluster.xadd("secret", 1, ["admin"])
        u = cluster.xadd("mine", 2, ["user-456"])
        p = cluster.xadd("public", 3)
        await wait_for(lambda: p in anon.seen.ids and p in user.seen.ids and p in admin.seen.ids, 10)
        assert admin.seen.ids == [a, p]  # admin joined admin + user-1 by default, not user-456
        assert user.seen.ids == [u, p]
        assert anon.seen.ids == [p]
    finally:
        for c in (admin, user, anon):
            await c.close()


async def test_ws_join_and_leave_while_connected(cluster: Cluster) -> None:
    async with WSClient(cluster.a.ws_url, token=token("9", rooms=["ops"]), rooms="user-9") as c:
        before = cluster.xadd("ops", 0, ["ops"])
        fence = cluster.xadd("public", "fence")  # once it arrives, `before` has gone by
        await wait_for(lambda: fence in c.seen.ids, 5)
        await c.send({"type": "join", "room": "ops"})
        await wait_for(lambda: {"type": "joined", "room": "ops"} in c.seen.frames, 5)
        inside = cluster.xadd("ops", 1, ["ops"])
        await wait_for(lambda: inside in c.seen.ids, 5)
        await c.send({"type": "leave", "room": "ops"})
        await wait_for(lambda: {"type": "left", "room": "ops"} in c.seen.frames, 5)
        cluster.xadd("ops", 2, ["ops"])
        marker = cluster.xadd("public", 3)
        await wait_for(lambda: marker in c.seen.ids, 5)
        assert c.seen.ids == [fence, inside, marker] and before not in c.seen.ids
        await c.send({"type": "ping"})
        await wait_for(lambda: {"type": "pong"} in c.seen.frames, 5)


async def _producer(cluster: Cluster, ids: list[str], stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set() and n < 2000:
        ids.append(cluster.xadd("flow", n))
        n += 1
        await asyncio.sleep(0.005)


@pytest.mark.parametrize(
    ("first", "second"),
    [("ws", "ws"), ("ws", "sse"), ("sse", "poll"), ("poll", "ws"), ("sse", "sse")],
)
async def test_resume_across_transports_and_instances_loses_nothing(
    cluster: Cluster, first: Transport, second: Transport
) -> None:
    """Disconnect mid-flow, reconnect (on the other instance) with the last id seen."""
    published: list[str] = []
    stop = asyncio.Event()
    await asyncio.sleep(0)
    start_marker = cluster.xadd("flow-start", None)
    producer = asyncio.create_task(_producer(cluster, published, stop))
    seen: list[str] = []
    try:
        cursor = start_marker
        for kind, server in ((first, cluster.a), (second, cluster.b)):
            got = await _consume(kind, server, cursor)
            seen += got
            cursor = seen[-1] if seen else cursor
        stop.set()
        await producer
        # the last client catches up on the rest after the producer stopped
        if not seen or seen[-1] != published[-1]:
            seen += await _consume("poll", cluster.a, cursor, until=published[-1])
    finally:
        stop.set()
        await producer
    assert seen == published, f"{len(seen)} seen vs {len(published)} published"


async def _consume(kind: Transport, server: DualcastProcess, cursor: str,
                   until: str | None = None) -> list[str]:
    """Connect with `cursor`, take events for a while (at least 30), then drop the connection."""
    def done(ids: list[str]) -> bool:
        if until is not None:
            return bool(ids) and ids[-1] == until
        return len(ids) >= 30

    client = await subscribe(kind, server.url, after=cursor)
    try:
        await wait_for(lambda: done(client.seen.ids), 20, f"{kind} events")
    finally:
        await client.close()
    assert client.seen.resets == []
    return list(client.seen.ids)


async def test_publish_on_a_reaches_every_transport_on_b(
    cluster: Cluster, transport: Transport,
) -> None:
    client = await subscribe(transport, cluster.b.url)
    try:
        async with httpx.AsyncClient(base_url=cluster.a.url) as http:
            answer = await http.post("/api/publish", json={"event": "via-a", "data": {"k": 1}},
                                     headers={"Authorization": f"Bearer {token('p', publish=True)}"})
        assert answer.status_code == 202
        entry_id = answer.json()["id"]
        await wait_for(lambda: entry_id in client.seen.ids, 10, "the published event")
    finally:
        await client.close()


async def test_trimmed_newer_and_malformed_cursors(
    fresh_redis: RedisProcess, dualcast: object
) -> None:
    server = dualcast(fresh_redis.url, env={"DUALCAST_MAXLEN": "10"})  # type: ignore[operator]
    old = xadd(fresh_redis, "old", 0)
    ids = [xadd(fresh_redis, "tick", n) for n in range(400)]
    fresh_redis.command("XTRIM", "websocket-broadcast", "MAXLEN", "10")  # as MAXLEN ~ would
    first = fresh_redis.command("XRANGE", "websocket-broadcast", "-", "+", "COUNT", "1")
    assert old.encode() not in first
    head = ids[-1]
    future = "99999999999999-0"
    # A welcome never carries a cursor the instance does not know: before the reset,
    # it names the head the reset goes to, not the client's gone cursor.
    for cursor in (old, future):
        async with WSClient(server.ws_url, last_event_id=cursor) as ws:
            await wait_for(lambda w=ws: w.seen.resets, 10, "a reset frame")
            assert ws.seen.resets == [head] and ws.seen.ids == []
            assert ws.seen.welcome is not None and ws.seen.welcome["last_id"] == head
    async with WSClient(server.ws_url, last_event_id=old) as ws:
        await wait_for(lambda: ws.seen.resets, 10, "a reset frame")
        live = xadd(fresh_redis, "live", 1)
        await wait_for(lambda: ws.seen.ids == [live], 10)
    head = live
    for cursor in (old, future):
        async with SSEClient(server.url, last_event_id=cursor) as sse:
            await wait_for(lambda s=sse: s.seen.resets, 10, "an SSE reset event")
            assert sse.seen.ids == [] and sse.seen.resets == [head]
            assert sse.seen.welcome is not None and sse.seen.welcome["last_id"] == head
        async with httpx.AsyncClient(base_url=server.url) as http:
            body = (await http.get("/api/events", params={"after": cursor, "timeout": 0})).json()
            assert body["reset"] is True and body["events"] == [] and body["last_id"] >= head
    async with httpx.AsyncClient(base_url=server.url) as http:
        for path, key in (("/api/sse", "last_event_id"), ("/api/events", "after")):
            bad = await http.get(path, params={key: "yesterday"})
            assert bad.status_code == 400 and bad.json()["error"] == "bad_cursor"
    # from the oldest retained: no reset, everything retained in order
    async with httpx.AsyncClient(base_url=server.url) as http:
        body = (await http.get("/api/events", params={"after": "0", "timeout": 0})).json()
    assert body["reset"] is False and body["events"] and body["events"][0]["id"] != old


async def test_zero_replays_a_stream_longer_than_the_replay_cap_without_a_reset(
    fresh_redis: RedisProcess, dualcast: object, transport: Transport,
) -> None:
    """`0` is everything retained, never a reset. Producers trim with `MAXLEN ~ 100`, and
    Redis keeps whole nodes, so the stream holds more than 100 entries: with
    DUALCAST_REPLAY_MAX at 100 (equal to MAXLEN, as the docs once advised) a WebSocket or SSE
    client asking for `0` got `reset` and none of them."""
    server = dualcast(fresh_redis.url,  # type: ignore[operator]
                      env={"DUALCAST_MAXLEN": "100", "DUALCAST_REPLAY_MAX": "100"})
    for n in range(350):
        fresh_redis.command("XADD", "websocket-broadcast", "MAXLEN", "~", "100", "*",
                            "data", json.dumps({"event": "tick", "data": n}))
    retained = fresh_redis.command("XRANGE", "websocket-broadcast", "-", "+").decode()
    ids = re.findall(r"\d+-\d+", retained)
    assert len(ids) > 100
    client = await subscribe(transport, server.url, after="0")
    try:
        await wait_for(lambda: len(client.seen.ids) >= len(ids) or client.seen.resets, 10,
                       "the retained events")
        assert client.seen.resets == [] and client.seen.ids == ids
    finally:
        await client.close()


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_a_cursor_at_the_oldest_retained_entry_replays_without_a_reset_by_default(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess], transport: Transport,
) -> None:
    """At the defaults the replay cap and MAXLEN were both 10,000, and `MAXLEN ~ 10000`
    keeps a little more than 10,000 entries: a client whose cursor was the oldest
    retained entry replayed more than 10,000 events and was told `reset`, though nothing
    after its cursor was gone."""
    import redis

    server = dualcast(fresh_redis.url)  # the default maxlen and replay cap
    maxlen = 10_000
    with redis.Redis.from_url(fresh_redis.url) as r:
        def add(n: int) -> None:
            pipe = r.pipeline(transaction=False)
            for i in range(n):
                pipe.xadd("websocket-broadcast", {"data": json.dumps({"event": "tick", "data": i})},
                          maxlen=maxlen, approximate=True)
            pipe.execute()

        add(maxlen)
        first = r.xinfo_stream("websocket-broadcast")["first-entry"][0]
        # on until Redis has trimmed (a window, not the whole history) and keeps more
        # than MAXLEN by a few
        while r.xinfo_stream("websocket-broadcast")["first-entry"][0] == first or (
                r.xlen("websocket-broadcast") < maxlen + 10):
            add(5)
        ids = [i.decode() for i, _ in r.xrange("websocket-broadcast")]
    assert ids[0] != first.decode() and len(ids) > maxlen + 1
    client = await subscribe(transport, server.url, after=ids[0])
    try:
        await wait_for(lambda: len(client.seen.ids) >= len(ids) - 1 or client.seen.resets, 30,
                       "the retained events")
        assert client.seen.resets == []
        assert client.seen.ids == ids[1:]
    finally:
        await client.close()


async def test_a_cursor_from_before_a_memory_engine_restart_gets_reset(
    dualcast: Callable[..., DualcastProcess],
) -> None:
    """The memory engine loses its events on a restart. A client resuming from a cursor
    it kept from before was taken for one with nothing after it: once anything was
    published it went on from there, and what it missed across the restart was lost
    without a word. Such a cursor is older than anything the new log holds: `reset`."""
    auth = {"Authorization": f"Bearer {token('p', publish=True)}"}

    async def publish(server: DualcastProcess, name: str) -> str:
        async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=10) as http:
            answer = await http.post("/api/publish", json={"event": name, "data": {}})
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])

    first = dualcast()
    kept = await publish(first, "before")
    first.stop()
    second = dualcast(port=first.port)
    after = await publish(second, "after")
    for transport in ("ws", "sse"):
        client = (WSClient(second.ws_url, last_event_id=kept) if transport == "ws"
                  else SSEClient(second.url, last_event_id=kept))
        async with client:
            await wait_for(lambda c=client: c.seen.resets, 10, f"a reset on {transport}")
            assert client.seen.resets == [after], transport
            assert client.seen.welcome is not None
            assert client.seen.welcome["last_id"] == after, transport
    async with httpx.AsyncClient(base_url=second.url, timeout=10) as http:
        body = (await http.get("/api/events", params={"after": kept, "timeout": 0})).json()
        assert body["reset"] is True and body["last_id"] == after
        everything = (await http.get("/api/events", params={"after": "0", "timeout": 0})).json()
        assert everything["reset"] is False and [e["id"] for e in everything["events"]] == [after]


async def test_each_transport_takes_the_others_name_for_the_cursor(cluster: Cluster) -> None:
    """A poll given `last_event_id` (the streams' name) went live from now without a word:
    what the client meant to resume from never came. Each name now works on each."""
    ids = [cluster.xadd("named", {"n": n}) for n in range(3)]
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.get(f"{cluster.a.url}/api/events",
                                params={"last_event_id": ids[0], "timeout": "0"})
        assert answer.status_code == 200, answer.text
        assert [e["id"] for e in answer.json()["events"]] == ids[1:]
        # the documented name wins when both are given
        answer = await http.get(f"{cluster.a.url}/api/events",
                                params={"after": ids[1], "last_event_id": ids[0], "timeout": "0"})
        assert [e["id"] for e in answer.json()["events"]] == ids[2:]
        bad = await http.get(f"{cluster.a.url}/api/events",
                             params={"last_event_id": "yesterday", "timeout": "0"})
        assert bad.status_code == 400 and "last_event_id" in bad.json()["message"], bad.text
        async with http.stream("GET", f"{cluster.a.url}/api/sse",
                               params={"after": ids[0]}) as stream:
            seen: list[str] = []
            async with asyncio.timeout(10):
                async for line in stream.aiter_lines():
                    if line.startswith("id: "):
                        seen.append(line[4:])
                    if len(seen) == 2:
                        break
        assert seen == ids[1:]


async def test_replay_past_the_cap_is_a_reset(cluster: Cluster) -> None:
    start = cluster.xadd("cap-start", None)
    for n in range(400):  # DUALCAST_REPLAY_MAX is 300 here
        cluster.xadd("bulk", n)
    async with WSClient(cluster.a.ws_url, last_event_id=start) as ws:
        await wait_for(lambda: ws.seen.resets, 10, "a reset after the replay cap")
        assert len(ws.seen.ids) <= 300
        after = cluster.xadd("after-cap", None)
        await wait_for(lambda: ws.seen.ids and ws.seen.ids[-1] == after, 10)


async def test_a_replay_of_many_events_fits_a_client_with_the_usual_1_mib_limit(
    cluster: Cluster,
) -> None:
    """A replay page (40 here) of 30 KB events coalesced into one 1.2 MB `batch` frame, and
    a client with websockets' default limit (1 MiB) closed the connection with 1009,
    though each event was 30 KB: batches now stay within 1 MiB."""
    import websockets

    start = cluster.xadd("big-start", None)
    ids = [cluster.xadd("big", "y" * 30_000) for _ in range(60)]
    got: list[str] = []
    async with websockets.connect(cluster.a.ws_url + f"/api/ws?last_event_id={start}",
                                  max_size=1 << 20) as ws:
        async with asyncio.timeout(20):
            while len(got) < len(ids):
                frame = json.loads(await ws.recv())
                assert len(json.dumps(frame)) <= 1 << 20
                if frame["type"] in ("event", "batch"):
                    got += [e["id"] for e in (frame["events"] if frame["type"] == "batch"
                                              else [frame])]
    assert got == ids


async def test_slow_ws_client_is_cut_off_while_a_fast_one_keeps_receiving(cluster: Cluster) -> None:
    import websockets

    fast = WSClient(cluster.a.ws_url)
    await fast.connect()
    # A client that never reads, with tiny buffers, so the server's queue (50) fills.
    slow = await websockets.connect(cluster.a.ws_url + "/api/ws", max_queue=1)
    slow.transport.pause_reading()  # type: ignore[attr-defined]
    payload = "x" * 8000
    try:
        # Published from a thread, paced, so the fast client reads as a healthy one would;
        # 16 MB in all, more than loopback socket buffers hold for the stuck client.
        def produce() -> list[str]:
            out = []
            for _ in range(2000):
                out.append(cluster.xadd("big", payload))
                time.sleep(0.0005)
            return out

        ids = await asyncio.to_thread(produce)
        await wait_for(lambda: len(fast.seen.ids) == 2000, 60, "the fast client's events")
        assert fast.seen.ids == ids and fast.seen.closed is None
        await wait_for(lambda: _counter(cluster.a, "dualcast_drops_total") >= 1, 20, "a cut-off")
        slow.transport.resume_reading()  # type: ignore[attr-defined]
        code = None
        async with asyncio.timeout(20):
            try:
                while True:
                    await slow.recv()
            except websockets.ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd else None
        assert code == 1013
    finally:
        await fast.close()
        await slow.close()


async def test_sse_headers_and_a_gone_client_is_freed(cluster: Cluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.b.url, timeout=10) as http:
        async with http.stream("GET", "/api/sse") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-accel-buffering"] == "no"
            assert "no-cache" in response.headers["cache-control"]
            lines = response.aiter_lines()
            assert await anext(lines) == "retry: 3000"
            assert await anext(lines) == "event: welcome"
            await wait_for(lambda: _gauge(cluster.b, "sse") >= 1, 5)
        await wait_for(lambda: _gauge(cluster.b, "sse") == 0, 10, "the SSE subscriber freed")


def _counter(server: DualcastProcess, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else -1


def _gauge(server: DualcastProcess, transport: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    match = re.search(rf'dualcast_connections\{{transport="{transport}"\}} (\S+)', text)
    return float(match.group(1)) if match else -1


def test_curl_streams_sse(cluster: Cluster) -> None:
    curl = require_tool("curl", "the SSE streaming test runs the real curl -N")
    proc = subprocess.Popen([curl, "-sN", cluster.a.url + "/api/sse"], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        lines = iter(proc.stdout.readline, "")
        assert next(lines).strip() == "retry: 3000"
        assert next(lines).strip() == "event: welcome"
        entry_id = cluster.xadd("curl", {"hello": "world"})
        got = [next(lines).strip() for _ in range(6)]
        assert f"id: {entry_id}" in got and "event: curl" in got
        assert 'data: {"hello":"world"}' in got
    finally:
        proc.kill()
        proc.wait(5)


async def test_overview_folds_retained_events_the_caller_may_see(
    fresh_redis: RedisProcess, dualcast: object
) -> None:
    a = dualcast(fresh_redis.url)  # type: ignore[operator]
    b = dualcast(fresh_redis.url)  # type: ignore[operator]
    x = lambda *args: xadd(fresh_redis, *args)  # noqa: E731
    x("session_created", {"sessionId": "s1", "userId": "456", "providerId": "openai"}, ["admin"])
    x("session_created", {"sessionId": "s2", "userId": "456", "providerId": "openai"}, ["admin"])
    x("session_ended", {"sessionId": "s1", "userId": "456", "costUsd": 0.1}, ["admin"])
    x("provider_status_change", {"providerId": "openai", "status": "degraded",
                                 "circuitState": "half-open", "failureCount": 3}, ["admin"])
    x("metrics_update", {"activeSessions": 1, "totalRequests": 10, "totalCost": 1.5}, ["admin"])
    x("usage_log_added", {"sessionId": "s2", "userId": "456", "costUsd": 0.01}, ["user-456"])
    admin = {"Authorization": f"Bearer {token('1', admin=True)}"}
    answers = [httpx.get(s.url + "/api/overview", headers=admin, timeout=10).json() for s in (a, b)]
    assert answers[0] == answers[1]  # the same on every instance
    state = answers[0]
    assert list(state["sessions"]) == ["s2"]
    assert state["providers"]["openai"]["circuitState"] == "half-open"
    assert state["metrics"]["totalRequests"] == 10
    assert state["usage"] == []  # usage went to user-456, which admin did not join by default
    user = httpx.get(a.url + "/api/overview", timeout=10,
                     headers={"Authorization": f"Bearer {token('456')}"}).json()
    assert user["sessions"] == {} and user["metrics"] == {}
    assert [u["sessionId"] for u in user["usage"]] == ["s2"]
    assert user["requests_per_minute"] and user["requests_per_minute"][0][1] == 1


async def test_publish_validates_limits_and_fails_open(
    fresh_redis: RedisProcess, dualcast: object
) -> None:
    server = dualcast(fresh_redis.url, env={"DUALCAST_MAX_BODY_BYTES": "1024",  # type: ignore[operator]
                                            "DUALCAST_REDIS_TIMEOUT": "1"})
    auth = {"Authorization": f"Bearer {token('p', publish=True)}"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=10) as http:
        ok = await http.post("/api/publish", json={"event": "e", "data": [1], "rooms": ["admin"]})
        assert ok.status_code == 202 and re.match(r"^\d+-\d+$", ok.json()["id"])
        bad = await http.post("/api/publish", json={"event": "bad name!", "data": 1})
        assert bad.status_code == 422 and bad.json()["field"] == "event"
        bad = await http.post("/api/publish", json={"data": 1})
        assert bad.status_code == 422 and bad.json()["field"] == "event"
        bad = await http.post("/api/publish", json={"event": "e", "rooms": "admin"})
        assert bad.status_code == 422 and bad.json()["field"] == "rooms"
        big = await http.post("/api/publish", json={"event": "e", "data": "x" * 2000})
        assert big.status_code == 413
        junk = await http.post("/api/publish", content=b"{not json",
                               headers={"Content-Type": "application/json"})
        assert junk.status_code == 422 and junk.json()["error"] == "bad_json"
        fresh_redis.stop()
        loop = asyncio.get_running_loop()
        started = loop.time()
        down = await http.post("/api/publish", json={"event": "e", "data": 1})
        assert down.status_code == 503 and "unreachable" in down.json()["message"]
        assert loop.time() - started < 5  # nothing hangs
        fresh_redis.start()


def test_readme_run_command_serves_healthz_with_no_redis(dualcast: object) -> None:
    server = dualcast(None, env={"DUALCAST_SECRET": ""})  # type: ignore[operator]
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz").json()
    assert ready["engine"] == "memory"
    assert "dashboard as admin: http://" in server.log()


def _ignore(_: object) -> None:
    return None


_ = (json, Path, _ignore)


def _sse_start(port: int, extra: bytes = b"") -> tuple[list[bytes], bytes]:
    """The head lines and the first chunk of a raw GET /api/sse."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /api/sse HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not re.search(rb"\r\n\r\n[0-9a-f]+\r\n", data):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        size_line, _, body = rest.partition(b"\r\n")
        size = int(size_line, 16)
        while len(body) < size + 2:
            chunk = sock.recv(65536)
            assert chunk, data
            body += chunk
    assert body[size:size + 2] == b"\r\n"
    return head.split(b"\r\n"), body[:size]


@pytest.mark.parametrize("close", [False, True])
def test_sse_head_and_welcome_are_uvicorns_bytes(cluster: Cluster, close: bool) -> None:
    """The head and the welcome (written together, server/direct.py start_chunked) are the
    lines uvicorn's own start and first chunk would write, in its order."""
    lines, welcome = _sse_start(cluster.a.port, b"Connection: close\r\n" if close else b"")
    assert lines[0] == b"HTTP/1.1 200 OK"
    names = [line.partition(b": ")[0] for line in lines[1:]]
    assert names == [b"date", b"server", b"content-type", b"cache-control", b"x-accel-buffering",
                     *([b"connection"] if close else []), b"transfer-encoding"]
    assert lines[3:6] == [b"content-type: text/event-stream; charset=utf-8",
                          b"cache-control: no-cache, no-transform", b"x-accel-buffering: no"]
    assert lines[-1] == b"transfer-encoding: chunked"
    assert welcome.startswith(b"retry: 3000\nevent: welcome\n") and welcome.endswith(b"\n\n")
