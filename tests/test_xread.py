"""The consumer's raw XREAD line (dualcast.log.xread): every reply shape, every failure.

Replies are parsed by hiredis from the bytes Redis would send; the line is driven
against a scripted server (one reply per command, or a reply in pieces, garbage,
silence, a closed connection) and against a real Redis in RESP2 and RESP3.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import hiredis
import pytest
import redis

from dualcast.config import load_settings
from dualcast.log.base import LogUnavailable
from dualcast.log.redis import RedisLog
from dualcast.log.xread import XReadLine, entries_of, xread_command, xread_prefix
from tests.harness.procs import RedisProcess

pytestmark = pytest.mark.timeout(60)

ENTRY_A = b"*2\r\n$3\r\n1-1\r\n*2\r\n$4\r\ndata\r\n$2\r\n{}\r\n"
ENTRY_B = b"*2\r\n$3\r\n1-2\r\n*4\r\n$4\r\ndata\r\n$1\r\n1\r\n$9\r\ntimestamp\r\n$1\r\n7\r\n"
TWO_RESP2 = b"*1\r\n*2\r\n$1\r\ns\r\n*2\r\n" + ENTRY_A + ENTRY_B
TWO_RESP3 = b"%1\r\n$1\r\ns\r\n*2\r\n" + ENTRY_A + ENTRY_B
TWO = [("1-1", {b"data": b"{}"}), ("1-2", {b"data": b"1", b"timestamp": b"7"})]


def parsed(raw: bytes) -> Any:
    reader = hiredis.Reader()
    reader.feed(raw)
    return reader.gets()


def test_the_command_is_packed_as_redis_py_packs_it() -> None:
    command = xread_command(xread_prefix("websocket-broadcast", 500, 2000), "1700000000000-12")
    words = ("XREAD", "COUNT", "500", "BLOCK", "2000", "STREAMS", "websocket-broadcast",
             "1700000000000-12")
    assert command == hiredis.pack_command(cast(Any, words))


@pytest.mark.parametrize(("raw", "expected"), [
    (b"*-1\r\n", []),  # RESP2 nil: the block ran out
    (b"_\r\n", []),  # RESP3 null
    (b"*0\r\n", []),
    (b"%0\r\n", []),
    (TWO_RESP2, TWO),
    (TWO_RESP3, TWO),
    # nil fields: an empty map, which decode_entry counts as malformed
    (b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-3\r\n*-1\r\n", [("1-3", {})]),
    # fields that are no valid event still reach decode_entry as they are
    (b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-4\r\n*2\r\n$1\r\nx\r\n$2\r\n\xff\xfe\r\n",
     [("1-4", {b"x": b"\xff\xfe"})]),
])
def test_reply_shapes(raw: bytes, expected: list[Any]) -> None:
    assert entries_of(parsed(raw)) == expected


@pytest.mark.parametrize("raw", [
    b"-ERR something\r\n",
    b"-UNBLOCKED force unblock from blocking operation, instance state changed\r\n",
    b"+OK\r\n",
    b":1\r\n",
    b"*1\r\n*1\r\n$1\r\ns\r\n",  # a stream without entries
    b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*1\r\n$3\r\n1-1\r\n",  # an entry without fields
])
def test_other_replies_are_log_unavailable(raw: bytes) -> None:
    with pytest.raises(LogUnavailable):
        entries_of(parsed(raw))


Script = Callable[[int, list[bytes], asyncio.StreamWriter], Any]


class Scripted(XReadLine):
    """A line to a scripted server instead of a connection redis-py made."""

    def __init__(self, port: int, stall_after: float = 10.0) -> None:
        super().__init__(cast(Any, None), "s", stall_after)
        self.port = port

    async def connected_writer(self) -> asyncio.StreamWriter:
        _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        return writer


class Server:
    """Answers command n (counted over all connections) with `script(n, command, writer)`."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.commands: list[list[bytes]] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    self.commands.append(command)
                    await self.script(len(self.commands) - 1, command, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], Any]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> tuple[Server, Scripted]:
        server = Server(script)
        srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        servers.append(srv)
        return server, Scripted(srv.sockets[0].getsockname()[1])

    yield start
    for srv in servers:
        srv.close()


async def test_replies_in_pieces_and_pushes_between_them(serve: Any) -> None:
    async def script(n: int, command: list[bytes], writer: asyncio.StreamWriter) -> None:
        if n == 0:
            writer.write(b"_\r\n")
        elif n == 1:  # one reply in three writes, each flushed on its own
            for piece in (TWO_RESP3[:5], TWO_RESP3[5:30], TWO_RESP3[30:]):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.01)
        else:  # an out-of-band push first, then the reply
            writer.write(b">2\r\n$7\r\nmessage\r\n$1\r\nx\r\n" + TWO_RESP2)

    server, line = await serve(script)
    async with asyncio.timeout(10):
        assert await line.read("0-0", 500, 2000) == []
        assert await line.read("0-0", 500, 2000) == TWO
        assert await line.read("1-2", 10, 100) == TWO
    assert [c[-1] for c in server.commands] == [b"0-0", b"0-0", b"1-2"]
    assert server.commands[2][:6] == [b"XREAD", b"COUNT", b"10", b"BLOCK", b"100", b"STREAMS"]
    assert server.connections == 1
    line.close()


@pytest.mark.parametrize("failure", [
    b"-UNBLOCKED force unblock from blocking operation\r\n",
    b"!garbage\r\n",  # no RESP type
    b"+OK\r\n",  # not an XREAD reply
    b"close",  # the server hangs up
])
async def test_a_failed_read_is_log_unavailable_and_the_next_one_reconnects(
    serve: Any, failure: bytes
) -> None:
    async def script(n: int, command: list[bytes], writer: asyncio.StreamWriter) -> None:
        if n == 0:
            if failure == b"close":
                writer.close()
            else:
                writer.write(failure)
        else:
            writer.write(TWO_RESP2)

    server, line = await serve(script)
    async with asyncio.timeout(10):
        with pytest.raises(LogUnavailable):
            await line.read("0-0", 500, 2000)
        assert await line.read("0-0", 500, 2000) == TWO
    assert server.connections == 2
    line.close()


async def test_a_silent_server_is_noticed_within_the_stall_bound(serve: Any) -> None:
    async def script(n: int, command: list[bytes], writer: asyncio.StreamWriter) -> None:
        if n > 0:
            writer.write(TWO_RESP2)  # command 0 is never answered

    server, line = await serve(script)
    line.stall_after = 0.2
    async with asyncio.timeout(10):
        with pytest.raises(LogUnavailable, match="no XREAD reply within"):
            await line.read("0-0", 500, 100)
        assert await line.read("0-0", 500, 100) == TWO
    assert server.connections == 2
    line.close()


async def test_a_read_cancelled_midway_never_answers_the_next_one(serve: Any) -> None:
    release = asyncio.Event()

    async def script(n: int, command: list[bytes], writer: asyncio.StreamWriter) -> None:
        if n == 0:
            await release.wait()  # the answer to the cancelled read comes late
            writer.write(b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n" + ENTRY_A)
        else:
            writer.write(b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n" + ENTRY_B)

    server, line = await serve(script)
    async with asyncio.timeout(10):
        first = asyncio.create_task(line.read("0-0", 500, 2000))
        while not server.commands:
            await asyncio.sleep(0.01)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        release.set()
        assert await line.read("1-1", 500, 2000) == TWO[1:]
    assert server.connections == 2
    line.close()


@pytest.mark.parametrize("protocol", [2, 3])
async def test_real_redis_reads_entries_nil_and_survives_a_killed_connection(
    redis_server: RedisProcess, protocol: int
) -> None:
    stream = f"xread-{uuid.uuid4().hex[:8]}"
    url = f"{redis_server.url}?protocol={protocol}"
    log = RedisLog(load_settings(redis_url=url, stream=stream, block_ms=100))
    admin = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await log.connect()
        async with asyncio.timeout(20):
            assert await log.read_blocking("0-0", 10, 100) == []  # nil: the block ran out
            ids = [str(admin.xadd(stream, {"data": f'{{"n": {i}}}'})) for i in range(3)]
            entries = await log.read_blocking("0-0", 10, 100)
            assert [i for i, _ in entries] == ids
            assert entries[0][1] == {b"data": b'{"n": 0}'}
            assert [i for i, _ in await log.read_blocking(ids[0], 1, 100)] == ids[1:2]
            # The reader's connection is killed: one read fails, the next reconnects.
            admin.client_kill_filter(_type="normal", skipme=True)
            with pytest.raises(LogUnavailable):
                await log.read_blocking(ids[2], 10, 100)
            later = str(admin.xadd(stream, {"data": "{}"}))
            assert [i for i, _ in await log.read_blocking(ids[2], 10, 100)] == [later]
    finally:
        await log.close()
        admin.close()


def one_entry(entry_id: bytes) -> bytes:
    """An XREAD reply (RESP2) holding one entry with the given id."""
    return (b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$%d\r\n%s\r\n*2\r\n$4\r\ndata\r\n$2\r\n{}\r\n"
            % (len(entry_id), entry_id))


async def test_follow_takes_every_batch_until_it_declines_one(serve: Any) -> None:
    """Batches taken in the reply's callback, each next read after the last id taken; the
    read returns the first batch declined, then the block running out ends a read."""
    async def script(n: int, command: list[bytes], writer: asyncio.StreamWriter) -> None:
        writer.write(one_entry(b"1-%d" % (n + 1)) if n < 4 else b"*-1\r\n")

    taken: list[str] = []

    def follow(entries: list[Any]) -> str | None:
        if entries[0][0] == "1-3":
            return None  # declined: the read completes with it
        taken.extend(i for i, _ in entries)
        return str(entries[-1][0])

    server, line = await serve(script)
    async with asyncio.timeout(10):
        assert await line.read("0-0", 500, 2000, follow) == [("1-3", {b"data": b"{}"})]
        assert await line.read("1-3", 500, 2000, follow) == []  # 1-4 taken, then nil
    assert taken == ["1-1", "1-2", "1-4"]
    assert [c[-1] for c in server.commands] == [b"0-0", b"1-1", b"1-2", b"1-3", b"1-4"]
    assert server.connections == 1
    line.close()


@pytest.mark.parametrize("failure", [b"-UNBLOCKED force unblock\r\n", b"close"])
async def test_a_failure_while_following_is_log_unavailable(serve: Any, failure: bytes) -> None:
    async def script(n: int, command: list[bytes], writer: asyncio.StreamWriter) -> None:
        if n == 1:
            if failure == b"close":
                writer.close()
            else:
                writer.write(failure)
        else:
            writer.write(one_entry(b"1-%d" % (n + 1)))

    taken: list[str] = []

    def follow(entries: list[Any]) -> str | None:
        taken.extend(i for i, _ in entries)
        return str(entries[-1][0]) if len(taken) < 2 else None

    server, line = await serve(script)
    async with asyncio.timeout(10):
        with pytest.raises(LogUnavailable):
            await line.read("0-0", 500, 2000, follow)
        assert taken == ["1-1"]
        assert await line.read("1-1", 500, 2000, follow) == [("1-3", {b"data": b"{}"})]
    assert taken == ["1-1", "1-3"]
    assert server.connections == 2
    line.close()


async def test_an_error_in_follow_is_raised_by_the_read_and_the_line_reopens(
    serve: Any,
) -> None:
    async def script(n: int, command: list[bytes], writer: asyncio.StreamWriter) -> None:
        writer.write(one_entry(b"1-%d" % (n + 1)))

    def broken(entries: list[Any]) -> str | None:
        raise RuntimeError("the consumer's own bug")

    server, line = await serve(script)
    async with asyncio.timeout(10):
        with pytest.raises(RuntimeError, match="own bug"):
            await line.read("0-0", 500, 2000, broken)
        assert await line.read("1-1", 500, 2000) == [("1-2", {b"data": b"{}"})]
    assert server.connections == 2
    line.close()
