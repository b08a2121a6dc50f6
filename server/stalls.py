"""Writers stuck in one send, found by a sweep once a second instead of a timer per frame.

A client that stops reading fills the socket buffers, and then a write to it
waits forever (closing the transport waits for the buffer to drain, too).
Bounding every send with `asyncio.timeout` armed and cancelled a timer per
frame: 15 % of the server's CPU at 100 clients x 100 events/s (py-spy, issue 8).
Instead each send runs inside `with writer:`, which notes when it began; one task
per process cancels the writers whose send has lasted longer than the limit, and
the `with` turns that cancellation (and only that one) into `Stalled`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType

from dualcast.loops import running_loop

log = logging.getLogger("dualcast.stalls")


class Stalled(Exception):
    """The watch gave up on a send: the client stopped reading."""


class Writer:
    """One connection's sending task and the moment its current send began (0: idle).

    `with writer: await send(...)` marks one send; a plain class, not a generator
    context manager, because it wraps every frame of the fan-out.
    """

    __slots__ = ("sending_since", "stalled", "task")

    def __init__(self, task: asyncio.Task[object] | None) -> None:
        self.task = task
        self.sending_since = 0.0
        self.stalled = False

    def __enter__(self) -> Writer:
        self.sending_since = time.monotonic()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.sending_since = 0.0
        # The watch's cancel becomes Stalled (and is taken back), unless somebody else
        # (a shutdown) also asked this task to stop: that one goes on as it is.
        if (exc_type is not None and issubclass(exc_type, asyncio.CancelledError)
                and self.stalled and self.task is not None and self.task.uncancel() == 0):
            raise Stalled from None


class Watching:
    """The registration of one writer for the length of a `with` block: a plain class,
    not a generator context manager, which kept a suspended generator frame alive
    for every connection's whole life."""

    __slots__ = ("writer", "writers")

    def __init__(self, writers: set[Writer], writer: Writer) -> None:
        self.writers = writers
        self.writer = writer

    def __enter__(self) -> Writer:
        self.writers.add(self.writer)
        return self.writer

    def __exit__(self, *exc: object) -> None:
        self.writers.discard(self.writer)


class StallWatch:
    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.writers: set[Writer] = set()
        #: clients dropped so far (for /metrics: the log line alone was no alert)
        self.dropped = 0

    def writer(self) -> Watching:
        """`with watch.writer() as writer:` watches the current task's sends in the block."""
        return Watching(self.writers, Writer(asyncio.current_task(running_loop())))

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
            self.dropped += cut
            log.info("dropped %d clients that stopped reading for %.0f s", cut, self.limit)
        return cut

    async def run(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.limit / 4))
            self.sweep(time.monotonic())
