"""Scenario 7: hostile input at volume against one real server.

Hypothesis throws junk at every door (WS frames, query strings, headers, publish
bodies, raw stream entries); then 2,000 connections are opened and dropped
abruptly while a healthy client keeps receiving. The server must answer every
refusal with a clear 4xx / error frame / 1008-1009 close, never a 5xx, keep
serving the healthy client without loss, return to its baseline of file
descriptors and connections, and never log a traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from tests.conftest import SECRET, token
from tests.harness.follow import Follower, start_followers
from tests.harness.probes import fd_count, log_problems, metric
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.sampled import SampledDualcast
from tests.harness.stream import Producer, check_exact, stream_ids, xadd
from tests.harness.waits import wait_for, wait_until

FUZZ = settings(max_examples=int(os.environ.get("RELIABILITY_FUZZ_EXAMPLES", "60")),
                deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
ABRUPT = int(os.environ.get("RELIABILITY_ABRUPT_CONNECTIONS", "2000"))


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisProcess,
                                                                        SampledDualcast]]:
    redis = RedisProcess(tmp_path_factory.mktemp("hostile-redis")).start()
    # A child that samples the asyncio tasks inside its app.
    dc = SampledDualcast(
        tmp_path_factory.mktemp("hostile-dc"), redis.url,
        env={"DUALCAST_SECRET": SECRET, "DUALCAST_POLL_TIMEOUT_MAX": "1",
             "DUALCAST_PING_INTERVAL": "5", "DUALCAST_BLOCK_MS": "500",
             "DUALCAST_REDIS_TIMEOUT": "1"},
    ).start()
    yield redis, dc
    dc.stop()
    redis.stop()
    # The log of the whole module: no exception escaped as a traceback.
    problems = log_problems(dc)
    assert problems == [], problems[:5]


def still_serves(redis: RedisProcess, dc: DualcastProcess) -> None:
    """A fresh client gets a fresh event: the server keeps serving everyone."""
    with ws_connect(f"{dc.ws_url}/api/ws?token={token('healthy')}", open_timeout=5) as ws:
        assert json.loads(ws.recv(5))["type"] == "welcome"
        entry_id = xadd(redis, "probe", {"ok": True})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            frame = json.loads(ws.recv(5))
            items = frame["events"] if frame["type"] == "batch" else [frame]
            if any(i.get("id") == entry_id for i in items):
                return
    raise AssertionError("a healthy client did not get a fresh event")


# ------------------------------------------------------------------ strategies
BIG = "<a frame over the 64 KiB limit>"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                  max_size=4),
    max_leaves=12,
)
frame_types = st.sampled_from(["join", "leave", "ping", "auth", "nope", "", None, 7])
ws_frames = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=100),
    st.builds(lambda t, r, extra: json.dumps({"type": t, "room": r, **extra}),
              frame_types, st.one_of(st.text(max_size=80), json_values),
              st.dictionaries(st.text(max_size=8), json_values, max_size=3)),
    st.just(BIG),  # over the 64 KiB frame limit: close 1009
)
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200)
query_values = st.one_of(
    header_text, st.sampled_from(["0", "0-0", "$", "-1", "1-2-3", "99999999999999999999-0",
                                  "admin", "a,b,,c", "user-1", "ops" * 40, "nan", "1e9"]),
)


@FUZZ
@given(frames=st.lists(ws_frames, min_size=1, max_size=12))
def test_fuzzed_websocket_frames_get_errors_or_policy_closes(
    target: tuple[RedisProcess, DualcastProcess], frames: list[Any]
) -> None:
    _, dc = target
    with ws_connect(f"{dc.ws_url}/api/ws?token={token('fuzz')}", open_timeout=5,
                    max_size=2**22) as ws:
        assert json.loads(ws.recv(5))["type"] == "welcome"
        try:
            for frame in frames:
                ws.send("x" * 70_000 if frame == BIG else frame)
            ws.send(json.dumps({"type": "ping"}))
            while True:
                reply = json.loads(ws.recv(5))
                if reply["type"] == "pong":
                    break
                assert reply["type"] in ("error", "joined", "left", "event", "batch"), reply
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd is not None else None
            # After an oversized frame the server sends 1009 and closes while our
            # later frames are unread, so the kernel may reset the connection
            # before the close frame is read: no code is then seen.
            allowed = (1008, 1009, None) if BIG in frames else (1008, 1009)
            assert code in allowed, f"closed with {code}"


@FUZZ
@given(path=st.sampled_from(["/api/sse", "/api/events", "/api/overview", "/api/me", "/readyz"]),
       params=st.dictionaries(st.sampled_from(["token", "rooms", "last_event_id", "after",
                                               "timeout", "x"]), query_values, max_size=5),
       headers=st.dictionaries(st.sampled_from(["Authorization", "Last-Event-ID", "Origin",
                                                "Cookie", "Accept", "X-Forwarded-For"]),
                               header_text.map(str.strip), max_size=4))
def test_fuzzed_queries_and_headers_never_fail_the_server(
    target: tuple[RedisProcess, DualcastProcess], path: str, params: dict[str, str],
    headers: dict[str, str]
) -> None:
    _, dc = target
    with httpx.Client(timeout=10) as client, client.stream(
        "GET", dc.url + path, params=params, headers=headers
    ) as response:
        assert response.status_code < 500 or (
            path == "/readyz" and response.status_code == 503
        ), f"{response.status_code} for {path} {params} {headers}"


@FUZZ
@given(body=st.one_of(json_values.map(json.dumps), st.binary(max_size=300),
                      st.builds(lambda e, d, r: json.dumps({"event": e, "data": d, "rooms": r}),
                                st.one_of(st.text(max_size=70), json_values), json_values,
                                st.one_of(st.lists(st.text(max_size=70), max_size=60),
                                          json_values))),
       content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_fuzzed_publish_bodies_are_refused_cleanly(
    target: tuple[RedisProcess, DualcastProcess], body: str | bytes, content_type: str
) -> None:
    _, dc = target
    headers = {"Authorization": f"Bearer {token('producer', publish=True)}"}
    if content_type:
        headers["Content-Type"] = content_type
    response = httpx.post(dc.url + "/api/publish", content=body, headers=headers, timeout=10)
    assert response.status_code in (202, 400, 413, 415, 422), (response.status_code, body)
    if response.status_code != 202:
        assert "error" in response.json() or "detail" in response.json()


@FUZZ
@given(fields=st.dictionaries(
    st.sampled_from(["data", "timestamp", "event", "x"]) | st.text(min_size=1, max_size=10),
    st.one_of(header_text, json_values.map(json.dumps),
              st.builds(lambda e, d, r: json.dumps({"event": e, "data": d, "rooms": r}),
                        json_values, json_values, json_values)),
    min_size=1, max_size=4))
def test_fuzzed_stream_entries_are_skipped(
    target: tuple[RedisProcess, DualcastProcess], fields: dict[str, str]
) -> None:
    redis, _ = target
    args: list[str] = []
    for key, value in fields.items():
        args += [key, value]
    reply = redis.command("XADD", "websocket-broadcast", "*", *args)
    assert not reply.startswith(b"-"), reply


def test_server_still_serves_after_the_fuzz(target: tuple[RedisProcess, DualcastProcess]) -> None:
    redis, dc = target
    still_serves(redis, dc)
    assert dc.proc is not None and dc.proc.poll() is None
    wait_until(dc.ready, 5, what="readyz after the fuzz")


# ------------------------------------------------------------------ abrupt connections
def _rst(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a crashed client or a dropped NAT flow."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _abrupt(port: int, i: int, tok: str) -> str:
    """One hostile connection; returns what kind it was."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    kind = i % 6
    ws_req = (f"GET /api/ws?token={tok} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
              "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    sse_req = f"GET /api/sse?token={tok} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        if kind == 0:  # connect, reset at once
            pass
        elif kind == 1:  # half a request line, then reset
            await loop.sock_sendall(sock, b"GET /api/ws?tok")
        elif kind == 2:  # a full upgrade, reset before reading the answer
            await loop.sock_sendall(sock, ws_req)
        elif kind == 3:  # upgraded and welcomed, then reset
            await loop.sock_sendall(sock, ws_req)
            await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
        elif kind == 4:  # an SSE stream that got its first bytes, then reset
            await loop.sock_sendall(sock, sse_req)
            await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
        else:  # garbage bytes, then a plain close
            await loop.sock_sendall(sock, os.urandom(random.randint(1, 64)))
            sock.close()
            return "garbage"
    except (OSError, TimeoutError):
        pass
    _rst(sock)
    return ("reset", "half-request", "upgrade-reset", "ws-reset", "sse-reset")[kind]


async def test_2000_abrupt_connections_leave_no_trace(
    target: tuple[RedisProcess, SampledDualcast]
) -> None:
    redis, dc = target
    assert dc.proc is not None
    pid = dc.proc.pid
    tok = token("abrupt")
    healthy = Follower("ws", "127.0.0.1", dc.port, token=token("healthy"), reconnect=False)
    await start_followers([healthy])
    start = healthy.record.last_id
    baseline_fds = fd_count(pid)
    await asyncio.sleep(1.1)  # the sampler writes once a second: a fresh baseline
    baseline_tasks = dc.tasks()
    baseline_conns = await metric(dc, "dualcast_connections")
    producer = Producer(redis.url, rate=100).start()

    sem = asyncio.Semaphore(100)

    async def one(i: int) -> str:
        async with sem:
            return await _abrupt(dc.port, i, tok)

    t0 = time.monotonic()
    kinds = await asyncio.gather(*(one(i) for i in range(ABRUPT)))
    took = time.monotonic() - t0
    peak_fds = fd_count(pid)
    n = len(producer.acked)
    await wait_for(lambda: len(producer.acked) >= n + 50, 10, what="events after the storm")
    await producer.stop()

    expected = await stream_ids(redis.url, after=start)
    await wait_for(lambda: len(healthy.ids) >= len(expected), 15, what="the healthy client")
    assert check_exact(healthy.ids, expected) is None
    assert healthy.record.closes == []

    async def settled() -> bool:
        return (fd_count(pid) <= baseline_fds + 2 and dc.tasks() <= baseline_tasks
                and await metric(dc, "dualcast_connections") == baseline_conns)

    deadline = time.monotonic() + 20
    while not await settled():
        assert time.monotonic() < deadline, (
            f"fds {fd_count(pid)} (baseline {baseline_fds}), tasks {dc.tasks()} (baseline "
            f"{baseline_tasks}: {dc.task_chains()[:2]}), connections "
            f"{await metric(dc, 'dualcast_connections')} (baseline {baseline_conns})")
        await asyncio.sleep(0.2)
    await healthy.stop()
    print(f"\nabrupt: {len(kinds)} connections in {took:.1f}s "
          f"({', '.join(f'{k} {kinds.count(k)}' for k in sorted(set(kinds)))}); fds "
          f"{baseline_fds} -> peak {peak_fds} -> {fd_count(pid)}; tasks {baseline_tasks} -> "
          f"{dc.tasks()}; healthy client got "
          f"{len(expected)} events, none lost or twice")
