"""Writers stuck in one send, found by a sweep once a second instead of a timer per frame.

A client that stops reading fills the socket buffers, and then a write to it
waits forever (closing the transport waits for the buffer to drain, too).
Bounding every send with `asyncio.timeout` armed and cancelled a timer per
frame: 15 % of the server's CPU at 100 clients x 100 events/s (py-spy, issue 8).
Instead each writer notes when its current send began, and one task per process
cancels the writers whose send has lasted longer than the limit; the writer
tells that cancellation from any other by its `stalled` flag.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("dualcast.stalls")


class Writer:
    """One connection's sending task and the moment its current send began (0: idle)."""

    __slots__ = ("sending_since", "stalled", "task")

    def __init__(self, task: asyncio.Task[object] | None) -> None:
        self.task = task
        self.sending_since = 0.0
        self.stalled = False

    def cancelled_by_us(self) -> bool:
        """In an `except CancelledError`: True (and the cancel is taken back) when the
        watch cancelled a stalled send and nobody else also asked this task to stop."""
        if not self.stalled or self.task is None:
            return False
        return self.task.uncancel() == 0


class StallWatch:
    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.writers: set[Writer] = set()

    @contextmanager
    def writer(self) -> Iterator[Writer]:
        """Watch the current task's sends while the block runs."""
        writer = Writer(asyncio.current_task())
        self.writers.add(writer)
        try:
            yield writer
        finally:
            self.writers.discard(writer)

    def sweep(self, now: float) -> int:
        """Cancel every writer whose send began more than `limit` seconds before `now`."""
        cut = 0
        for writer in self.writers:
            since = writer.sending_since
            if since and not writer.stalled and now - since > self.limit and writer.task:
                writer.stalled = True
                writer.task.cancel()
                cut += 1
        if cut:
            log.info("dropped %d clients that stopped reading for %.0f s", cut, self.limit)
        return cut

    async def run(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.limit / 4))
            self.sweep(time.monotonic())
