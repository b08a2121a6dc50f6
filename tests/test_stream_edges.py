"""The stream's edges as producers make them, against a real redis-server and real servers.

Entries are written with raw XADDs (any producer, any language); what the clients
of every transport see is the contract: each event once, in order, or a `reset`
where events were lost, never silence.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable

import httpx
import pytest
import redis

from tests.conftest import token
from tests.harness.clients import Poller, WSClient, subscribe
from tests.harness.probes import metric
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.stream import xadd
from tests.harness.tcpproxy import TCPProxy
from tests.harness.waits import wait_for, wait_until

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
            answered = await waiting
            assert answered.status_code == 200, (answered.text, server.log_tail())
            answer = answered.json()
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


async def test_the_entry_delivered_last_deleted_while_away_is_no_reset(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess],
) -> None:
    """While the server could not reach Redis, an operator XDELed the entry it had
    delivered last (a bad event) and a producer appended one more. Nothing the clients
    had not seen was lost, and the stream records the deletion (max-deleted-entry-id),
    yet every client was told `reset` (the consumer took the missing entry for Redis
    losing data) and reloaded its state for nothing."""
    with TCPProxy(fresh_redis.port) as proxy:
        server = dualcast(f"redis://127.0.0.1:{proxy.port}/0", env={
            "DUALCAST_REDIS_TIMEOUT": "1", "DUALCAST_BACKOFF_MAX": "0.5",
        })
        clients = [await subscribe(kind, server.url) for kind in ("ws", "sse", "poll")]
        try:
            before = [xadd(fresh_redis, "before", n) for n in range(2)]
            for client in clients:
                await wait_for(lambda c=client: before[-1] in c.seen.ids, 10, "the events")
            proxy.refuse()
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                await wait_for(lambda: _unready(http), 15, "the server to notice Redis is gone")
            fresh_redis.command("XDEL", "websocket-broadcast", before[-1])
            after = xadd(fresh_redis, "after", 2)
            proxy.restore()
            for client in clients:
                await wait_for(lambda c=client: after in c.seen.ids, 20, "the event after")
                assert client.seen.resets == [], (type(client).__name__, client.seen.resets)
                assert client.seen.ids == [*before, after]
            assert await metric(server, "dualcast_resets") == 0
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


async def test_refused_publishes_are_counted_as_refusals(
    redis_server: RedisProcess, dualcast: Callable[..., DualcastProcess],
) -> None:
    """A producer whose token had expired (401), had no `publish` (403) or sent what
    cannot be published (415) was refused on every call and no metric moved: not
    dualcast_published, not dualcast_publish_failures (the 503s), not
    dualcast_refusals, which counted the subscribers' refusals alone."""
    server = dualcast(redis_server.url, env={"DUALCAST_STREAM": "refused-publishes"})
    expired = token("producer", publish=True, ttl=-60)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        before = await metric(server, "dualcast_refusals")
        answers = [
            await http.post("/api/publish", json={"event": "x"},
                            headers={"Authorization": f"Bearer {expired}"}),
            await http.post("/api/publish", json={"event": "x"},
                            headers={"Authorization": f"Bearer {token('reader')}"}),
            await http.post("/api/publish", content=b"event=x", headers={
                "Authorization": f"Bearer {token('producer', publish=True)}",
                "Content-Type": "application/x-www-form-urlencoded"}),
            await http.get("/api/me", headers={"Authorization": f"Bearer {expired}"}),
        ]
    assert [a.status_code for a in answers] == [401, 403, 415, 401], [a.text for a in answers]
    assert await metric(server, "dualcast_refusals") - before == 4
    assert await metric(server, "dualcast_published") == 0
    assert await metric(server, "dualcast_publish_failures") == 0


async def test_publishes_failing_through_an_outage_are_not_a_line_each(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess],
) -> None:
    """Each POST /api/publish answered 503 while Redis was away wrote its own WARNING: a
    producer's whole rate went into the log (100 publishes a second, 100 lines a
    second). The first failure is logged, then one line per 30 s with the count; the
    metric counts every one."""
    with TCPProxy(fresh_redis.port) as proxy:
        server = dualcast(f"redis://127.0.0.1:{proxy.port}/0",
                          env={"DUALCAST_REDIS_TIMEOUT": "1"})
        auth = {"Authorization": f"Bearer {token('producer', publish=True)}"}
        proxy.refuse()
        async with httpx.AsyncClient(base_url=server.url, timeout=10, headers=auth) as http:
            for n in range(40):
                failed = await http.post("/api/publish", json={"event": "lost", "data": n})
                assert failed.status_code == 503, failed.text
        assert await metric(server, "dualcast_publish_failures") == 40
    lines = [line for line in server.log().splitlines() if "publish failed" in line]
    assert len(lines) == 1, lines
    assert "dualcast_publish_failures_total" in lines[0], lines


def test_a_replay_the_stream_trims_ahead_of_says_reset(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess],
) -> None:
    """A client resumes from its cursor and reads slowly; while the server waits to send
    it the replay's first pages, producers go on and MAXLEN trims the entries the replay
    has not read yet. The replay's next page then began at the oldest retained entry:
    events 10 to 39 were skipped without a reset (the window was checked only once,
    before the first page)."""
    import fcntl
    import socket
    import termios

    raw = redis.Redis(port=fresh_redis.port)
    start = raw.xadd("websocket-broadcast", {"data": json.dumps({"event": "start"})}).decode()
    big = "x" * (1 << 20)  # 5 per page: a page more than the sockets can hold unread
    for n in range(20):
        raw.xadd("websocket-broadcast", {"data": json.dumps({"event": "big", "data": [n, big]})})
    # (the server's own MAXLEN left high: its consumer, which also sees the trim, then
    # looks for a gap only in reads of 500, so the reset here is the replay's own)
    server = dualcast(fresh_redis.url, env={"DUALCAST_REPLAY_PAGE": "5"})
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(f"GET /api/sse?token={token('u', admin=True)} HTTP/1.1\r\nHost: t\r\n"
                     f"Last-Event-ID: {start}\r\n\r\n".encode())

        def queued() -> int:
            return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]

        wait_until(lambda: queued() >= 8192, 10, what="the replay to fill the socket")
        for n in range(20, 60):  # MAXLEN 20, exact: every entry after the first pages goes
            raw.xadd("websocket-broadcast", {"data": json.dumps({"event": "big", "data": [n]})},
                     maxlen=20, approximate=False)
        sock.settimeout(10)
        body = b""
        while b"event: reset" not in body and b"[59]" not in body:
            chunk = sock.recv(1 << 20)
            assert chunk, body[-300:]
            body += chunk
    before, reset, _ = body.partition(b"event: reset")
    # (the reply that brought the reset may bring what follows it too: the stream goes on
    # after the head it jumped to, so only what came before it must be in order)
    got = [json.loads(line[6:])[0] for line in before.split(b"\n")
           if line.startswith(b"data: [")]
    assert reset, got  # not 0..9 and then 40..59 as if nothing was lost
    assert got == list(range(len(got))), got  # what came before the reset came in order


async def test_a_publish_whose_reply_came_too_late_does_not_ask_to_be_retried(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess],
) -> None:
    """POST /api/publish answered "the event log is unreachable; retry soon" when Redis
    had appended the event and only its reply was late: a producer that did as told
    published it twice. It now says the event may have been appended."""
    with TCPProxy(fresh_redis.port) as proxy:
        server = dualcast(f"redis://127.0.0.1:{proxy.port}/0",
                          env={"DUALCAST_REDIS_TIMEOUT": "0.5"})
        auth = {"Authorization": f"Bearer {token('producer', publish=True)}"}
        async with httpx.AsyncClient(base_url=server.url, timeout=10, headers=auth) as http:
            assert (await http.post("/api/publish", json={"event": "warm"})).status_code == 202
            proxy.delay_replies(1.5)
            late = await http.post("/api/publish", json={"event": "late", "data": 1})
            proxy.delay_replies(0)
            assert late.status_code == 503, late.text
            body = late.json()
            assert body["maybe_appended"] is True and "retry soon" not in body["message"], body
            proxy.refuse()  # unreachable: that one is safe to retry, and says so
            gone = (await http.post("/api/publish", json={"event": "gone"})).json()
            assert "retry soon" in gone["message"] and "maybe_appended" not in gone, gone
    raw = redis.Redis(port=fresh_redis.port)
    wait_until(lambda: [json.loads(f[b"data"])["event"] for _, f in
                        raw.xrange("websocket-broadcast")] == ["warm", "late"], 10,
               what="the late publish to be in the stream")


async def test_a_publish_whose_connection_broke_after_sending_is_not_called_unreachable(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess],
) -> None:
    """A primary that dies after it appended an event and before it answered (a crash, the
    kill that starts a failover) cuts the connection mid-command. POST /api/publish said
    "the event log is unreachable; retry soon" though the event was in the stream: a
    producer that did as told published it twice. It now says it may have been appended."""
    with TCPProxy(fresh_redis.port) as proxy:
        server = dualcast(f"redis://127.0.0.1:{proxy.port}/0",
                          env={"DUALCAST_REDIS_TIMEOUT": "5"})
        auth = {"Authorization": f"Bearer {token('producer', publish=True)}"}
        raw = redis.Redis(port=fresh_redis.port)
        async with httpx.AsyncClient(base_url=server.url, timeout=10, headers=auth) as http:
            assert (await http.post("/api/publish", json={"event": "warm"})).status_code == 202
            proxy.delay_replies(30)
            cut = asyncio.create_task(http.post("/api/publish", json={"event": "cut"}))
            await wait_for(lambda: raw.xlen("websocket-broadcast") == 2, 4,
                           what="the XADD to reach Redis")
            proxy.drop()  # the reply never comes: the connection is reset under it
            answer = await asyncio.wait_for(cut, 10)
            proxy.delay_replies(0)
        assert answer.status_code == 503, answer.text
        body = answer.json()
        assert body.get("maybe_appended") is True and "retry soon" not in body["message"], body


async def test_a_publish_redis_refuses_says_why_instead_of_retry_soon(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess],
) -> None:
    """An XADD that Redis answers with an error (here NOPERM: the ACL user may not append;
    WRONGTYPE and OOM alike) was answered "the event log is unreachable; retry soon": the
    producer retried an append that could never succeed and nobody saw why."""
    raw = redis.Redis(port=fresh_redis.port)
    raw.acl_setuser("reader", enabled=True, passwords=["+reader-pw"], keys=["*"],
                    commands=["+@all", "-xadd"])
    server = dualcast(f"redis://reader:reader-pw@127.0.0.1:{fresh_redis.port}/0")
    auth = {"Authorization": f"Bearer {token('producer', publish=True)}"}
    async with httpx.AsyncClient(base_url=server.url, timeout=10, headers=auth) as http:
        refused = await http.post("/api/publish", json={"event": "never", "data": 1})
    assert refused.status_code == 503, refused.text
    body = refused.json()
    assert body["error"] == "log_unavailable", body
    assert "no permissions" in body["message"] and "retry soon" not in body["message"], body
    assert "maybe_appended" not in body, body
    assert raw.xlen("websocket-broadcast") == 0
