"""The stream's edges as producers make them, against a real redis-server and real servers.

Entries are written with raw XADDs (any producer, any language); what the clients
of every transport see is the contract: each event once, in order, or a `reset`
where events were lost, never silence.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import token
from tests.harness.clients import Poller, WSClient, subscribe
from tests.harness.probes import metric
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.stream import xadd
from tests.harness.tcpproxy import TCPProxy
from tests.harness.waits import wait_for

pytestmark = pytest.mark.timeout(90)


async def test_a_stream_trimmed_past_the_consumer_resets_its_live_subscribers(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess],
) -> None:
    """While the server could not reach Redis, producers went on and MAXLEN trimmed
    entries it never read. XREAD just resumes at the oldest retained entry, so live
    subscribers once received what came after the gap without a word (and pollers,
    answered from memory, likewise). Every one of them must be told `reset`."""
    with TCPProxy(fresh_redis.port) as proxy:
        server = dualcast(f"redis://127.0.0.1:{proxy.port}/0", env={
            "DUALCAST_MAXLEN": "10", "DUALCAST_REDIS_TIMEOUT": "1", "DUALCAST_BACKOFF_MAX": "0.5",
        })
        clients = [await subscribe(kind, server.url) for kind in ("ws", "sse", "poll")]
        try:
            before = xadd(fresh_redis, "before", 0)
            for client in clients:
                await wait_for(lambda c=client: before in c.seen.ids, 10, "the first event")
            proxy.refuse()  # the server loses Redis; producers do not
            http = httpx.AsyncClient(base_url=server.url, timeout=30)
            await wait_for(lambda: _unready(http), 15, "the server to notice Redis is gone")
            # a long-poll that waits through it all (it once read on across the gap)
            waiting = asyncio.create_task(http.get("/api/events", params={
                "after": before, "timeout": "20"}))
            await wait_for(lambda: _connections(server, 4), 10, "the long-poll to wait")
            for n in range(50):  # MAXLEN 10, exact: 40 entries the server never read go
                fresh_redis.command("XADD", "websocket-broadcast", "MAXLEN", "10", "*",
                                    "data", json.dumps({"event": "tick", "data": n}))
            proxy.restore()
            answer = (await waiting).json()
            await http.aclose()
            assert answer["reset"] is True and answer["events"] == [], answer
            after = xadd(fresh_redis, "after", 1)
            for client in clients:
                await wait_for(lambda c=client: c.seen.resets, 20,
                               f"a reset on {type(client).__name__}")
            for client in clients:
                if not isinstance(client, Poller):  # (a poller resets to the head)
                    await wait_for(lambda c=client: after in c.seen.ids, 10, "the event after")
                    ticks = [e["data"] for e in client.seen.events if e["event"] == "tick"]
                    assert ticks == list(range(40, 50)), ticks  # what the stream retained
            ws = clients[0]
            assert isinstance(ws, WSClient)
            kinds = [f["type"] for f in ws.seen.frames if f["type"] in ("event", "reset")]
            assert kinds == ["event", "reset"] + ["event"] * 11, kinds  # the reset comes first
            assert await metric(server, "dualcast_resets") == 1
        finally:
            for client in clients:
                await client.close()


async def _connections(server: DualcastProcess, n: int) -> bool:
    """Whether `n` subscribers are connected (waiting long-polls included)."""
    return await metric(server, "dualcast_connections") >= n


async def _unready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 503



async def test_metrics_count_what_the_publish_api_appended_and_failed(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess],
) -> None:
    """The server counted POST /api/publish's 503s but /metrics never showed them (nor
    what the API appended), so an outage of the publish path could not be alerted on."""
    with TCPProxy(fresh_redis.port) as proxy:
        server = dualcast(f"redis://127.0.0.1:{proxy.port}/0",
                          env={"DUALCAST_REDIS_TIMEOUT": "1"})
        auth = {"Authorization": f"Bearer {token('producer', publish=True)}"}
        async with httpx.AsyncClient(base_url=server.url, timeout=10, headers=auth) as http:
            for n in range(2):
                sent = await http.post("/api/publish", json={"event": "ok", "data": n})
                assert sent.status_code == 202, sent.text
            proxy.refuse()
            failed = await http.post("/api/publish", json={"event": "lost", "data": 0})
            assert failed.status_code == 503, failed.text
        assert await metric(server, "dualcast_published") == 2
        assert await metric(server, "dualcast_publish_failures") == 1
