"""A WebSocket that sits idle holds no reader task and none of uvicorn's asyncio queues.

`dualcast.ws_protocol` swaps uvicorn's receive `Queue` and `writable` Event for
two-field stand-ins and drops the upgrade request once answered; a session then
starts a reader only when the client sent something. What must not change: every
frame a client sends is answered, in order, however long the connection sat idle
in between, and a client that leaves while idle ends its session.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from dualcast.ws_protocol import Gate, Inbox
from tests.conftest import SECRET, token
from tests.harness.clients import WSClient
from tests.harness.lean import WSConn
from tests.harness.probes import metric, rss_mb
from tests.harness.procs import DualcastProcess, RedisProcess, raise_nofile
from tests.harness.waits import wait_for
from tests.harness.wire import mask_frame

pytestmark = pytest.mark.timeout(120)


# the stand-ins, in-process ------------------------------------------------------------

def received(n: int) -> Any:
    return {"type": "websocket.receive", "text": str(n)}


async def test_inbox_hands_messages_over_in_order_to_a_waiting_reader() -> None:
    inbox = Inbox()
    reader = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)  # let it start waiting
    assert not reader.done()
    inbox.put_nowait(received(1))
    inbox.put_nowait(received(2))
    assert await asyncio.wait_for(reader, 1) == received(1)
    assert await asyncio.wait_for(inbox.get(), 1) == received(2)
    assert inbox.empty()


async def test_inbox_keeps_a_message_a_cancelled_reader_did_not_take() -> None:
    inbox = Inbox()
    reader = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    inbox.put_nowait(received(1))
    assert await asyncio.wait_for(inbox.get(), 1) == received(1)


async def test_inbox_refuses_a_second_reader_instead_of_starving_one() -> None:
    inbox = Inbox()
    first = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(inbox.get(), 1)
    inbox.put_nowait(received(1))
    assert await asyncio.wait_for(first, 1) == received(1)


async def test_inbox_listener_hears_of_messages_nobody_waits_for() -> None:
    inbox = Inbox()
    inbox.put_nowait(received(1))
    calls: list[int] = []
    inbox.listen(lambda: calls.append(inbox.qsize()))
    assert calls == [1]  # a message was already waiting
    inbox.put_nowait(received(2))
    assert calls == [1, 2]
    assert await inbox.get() == received(1)
    assert await inbox.get() == received(2)
    reader = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait(received(3))  # a reader waits: it gets it, the listener is not called
    assert await asyncio.wait_for(reader, 1) == received(3)
    assert calls == [1, 2]
    inbox.listen(None)
    inbox.put_nowait(received(4))
    assert calls == [1, 2]


async def test_gate_holds_senders_while_closed_and_releases_them_all() -> None:
    gate = Gate()
    assert gate.is_set()
    assert await asyncio.wait_for(gate.wait(), 1)
    gate.clear()
    assert not gate.is_set()
    waiters = [asyncio.create_task(gate.wait()) for _ in range(3)]
    quitter = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, True, True]


# a real server ---------------------------------------------------------------------------

@pytest.fixture
def server(redis_server: RedisProcess, tmp_path: Any) -> Iterator[DualcastProcess]:
    # 2,000 anonymous clients from one address: the per-address cap is lifted.
    proc = DualcastProcess(tmp_path / "dc", redis_server.url, env={
        "DUALCAST_SECRET": SECRET, "DUALCAST_STREAM": f"ws-idle-{tmp_path.name}",
        "DUALCAST_MAX_CONNECTIONS_PER_ADDRESS": "0",
    }).start()
    yield proc
    proc.stop(10)


def frames_of(client: WSClient, kind: str) -> list[dict[str, Any]]:
    return [f for f in client.seen.frames if f.get("type") == kind]


async def test_each_message_after_a_quiet_spell_is_answered(server: DualcastProcess) -> None:
    """Each round waits for its answer, so the reader of the round before has ended and
    the next message must start another one; a burst is answered frame for frame."""
    rooms = [f"room-{n}" for n in range(5)]
    async with WSClient(server.url, token=token("idle", rooms=rooms)) as client:
        for n in range(5):
            await client.send({"type": "ping"})
            await wait_for(lambda n=n: len(frames_of(client, "pong")) == n + 1, 10,
                           f"pong {n + 1}")
            room = f"room-{n}"
            await client.send({"type": "join", "room": room})
            await wait_for(lambda room=room: {"type": "joined", "room": room}
                           in client.seen.frames, 10, f"joined {room}")
        assert client.conn is not None
        client.conn.transport.write(  # type: ignore[union-attr]
            b"".join(mask_frame(0x1, json.dumps({"type": "ping"}).encode())
                     for _ in range(30)))
        await wait_for(lambda: len(frames_of(client, "pong")) == 35, 10, "35 pongs")
        await client.send({"type": "leave", "room": "room-0"})
        await wait_for(lambda: {"type": "left", "room": "room-0"} in client.seen.frames,
                       10, "left room-0")
        assert client.seen.errors == []
        assert client.seen.closed is None


async def test_a_client_that_leaves_while_idle_is_let_go(server: DualcastProcess) -> None:
    """No reader waits on an idle connection: the close must still end the session."""
    clients = [WSClient(server.url) for _ in range(20)]
    for client in clients:
        await client.connect()
    for client in clients[:10]:
        await client.close()
    for client in clients[10:]:
        assert client.conn is not None
        client.conn.abort()
    async with WSClient(server.url) as probe:
        await probe.send({"type": "ping"})
        await wait_for(lambda: frames_of(probe, "pong") != [], 10, "pong")
    # Every session ended and left the hub (a session nobody woke would stay counted).
    async def none_open() -> bool:
        return await metric(server, "dualcast_connections") == 0

    await wait_for(none_open, 20, "every session ended")


async def test_two_thousand_idle_websockets_cost_under_18_kb_each(
    server: DualcastProcess,
) -> None:
    """The bench measures 14.8 KB at 10,000 (24.5 KB before); 18 KB is the line a
    return of uvicorn's queues (3.2 KB) or the kept upgrade request (1.9 KB) crosses."""
    n = 2000
    raise_nofile()
    loop = asyncio.get_running_loop()
    before = rss_mb(server.pid)
    conns: list[WSConn] = []

    class Idle(WSConn):
        def on_message(self, payload: bytes) -> None:
            if b'"welcome"' in payload:
                self.set_ready()

    try:
        for start in range(0, n, 100):
            batch = await asyncio.gather(*(
                loop.create_connection(lambda: Idle("127.0.0.1", server.port, "/api/ws"),
                                       "127.0.0.1", server.port)
                for _ in range(start, min(n, start + 100))))
            conns += [conn for _, conn in batch]
            await asyncio.wait_for(asyncio.gather(*(c.ready for _, c in batch)), 30)
        assert sum(1 for c in conns if not c.closed) == n
        per_conn_kb = (rss_mb(server.pid) - before) * 1024 / n
        assert per_conn_kb < 18, f"{per_conn_kb:.1f} KB per idle WebSocket"
    finally:
        for conn in conns:
            conn.abort()
