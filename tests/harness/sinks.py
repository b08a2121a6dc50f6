"""Many SSE streams that read and discard, in a process of their own: load on a server
that costs this test's process nothing.

    python -m tests.harness.sinks http://127.0.0.1:8000 300 60

opens 300 streams of /api/sse, prints `connected 300` once all are open, reads until
60 s have passed, and reopens a stream the server ends (a drain or a shed sends
streams away to come back), as an EventSource would. Bounded in count and time.
"""

from __future__ import annotations

import asyncio
import sys
import time
from urllib.parse import urlsplit


async def _stream(host: str, port: int, opened: asyncio.Event, counter: list[int],
                  deadline: float) -> None:
    first = True
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.write(f"GET /api/sse HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     "Accept: text/event-stream\r\n\r\n".encode())
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if first and head.startswith(b"HTTP/1.1 200"):
                first = False
                counter[0] += 1
                if counter[0] == counter[1]:
                    opened.set()
            while time.monotonic() < deadline and await reader.read(65536):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


async def main(url: str, count: int, seconds: float) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    deadline = time.monotonic() + seconds
    opened = asyncio.Event()
    counter = [0, count]
    tasks = [asyncio.create_task(_stream(host, port, opened, counter, deadline))
             for _ in range(count)]
    await asyncio.wait_for(opened.wait(), max(1.0, deadline - time.monotonic()))
    print(f"connected {count}", flush=True)
    await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()) + 1)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
