"""The stall watch cancels only a send that has lasted too long, and only that cancel
becomes Stalled: a shutdown's cancel goes on as a cancel."""

from __future__ import annotations

import asyncio
import time

import pytest

from dualcast.stalls import Stalled, StallWatch

pytestmark = pytest.mark.timeout(10)


async def test_a_send_that_never_returns_is_stalled() -> None:
    watch = StallWatch(limit=0.1)
    never = asyncio.get_running_loop().create_future()

    async def writer() -> str:
        with watch.writer() as w:
            try:
                with w:
                    await never
            except Stalled:
                return "stalled"
        return "sent"

    task = asyncio.create_task(writer())
    await asyncio.sleep(0)
    assert watch.sweep(time.monotonic()) == 0  # not yet over the limit
    assert watch.sweep(time.monotonic() + 1) == 1
    assert await task == "stalled"
    assert watch.writers == set()  # unregistered when its block ends


async def test_an_idle_writer_is_never_stalled() -> None:
    watch = StallWatch(limit=0.1)
    with watch.writer() as w:
        with w:
            pass  # a send that finished
        assert watch.sweep(time.monotonic() + 60) == 0


async def test_a_shutdown_cancel_is_not_taken_for_a_stall() -> None:
    watch = StallWatch(limit=0.1)
    never = asyncio.get_running_loop().create_future()

    async def writer() -> None:
        with watch.writer() as w, w:
            await never

    task = asyncio.create_task(writer())
    await asyncio.sleep(0)
    task.cancel()  # someone else (a shutdown) asks first
    watch.sweep(time.monotonic() + 1)
    with pytest.raises(asyncio.CancelledError):
        await task
