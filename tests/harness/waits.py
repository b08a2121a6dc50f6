"""Waiting for a condition with a deadline: the only way tests and bench synchronise.

A fixed sleep either wastes time or flakes on a busy machine; these poll a
condition until it holds and fail with what was awaited when it never does.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not hold in time; an AssertionError so pytest reports it as a failure."""


def wait_until(
    condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll `condition` until it returns something truthy (returned), or fail after `timeout`.

    Exceptions from the condition count as "not yet" (a process that is starting
    refuses connections for a while); the last one is in the failure message.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the condition may fail while a process starts
            last_error = exc
        time.sleep(interval)
    raise WaitTimeout(f"timed out after {timeout}s waiting for {what or condition}: {last_error!r}")


async def wait_for(condition: Callable[[], object | Awaitable[object]], timeout: float = 10.0,
                   what: str = "", interval: float = 0.01) -> Any:
    """Await `condition` (a no-argument callable) becoming truthy, with a deadline.

    The condition may be a coroutine function (a request to the server); its first
    truthy value is returned. The event loop keeps running between checks, so
    clients in this process go on receiving while the test waits for them.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(interval)


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel a client's background task and wait until it has finished.

    Whatever the task raised on its way out is dropped: the caller is tearing down
    and has already recorded what it needs.
    """
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


@contextlib.asynccontextmanager
async def lines_of(response: Any) -> AsyncIterator[list[str]]:
    """The lines of a streaming httpx response, appended to the list yielded as they
    arrive (a task reads them meanwhile, cancelled on the way out)."""
    seen: list[str] = []

    async def read() -> None:
        async for line in response.aiter_lines():
            seen.append(line)

    reading = asyncio.create_task(read())
    try:
        yield seen
    finally:
        await cancel(reading)
