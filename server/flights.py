"""One call in flight per key, its result shared by every caller that asks meanwhile.

Long-pollers come in crowds: thousands ask for the log's window, or for the same page
of it, within a few milliseconds. Each asking Redis for itself queued thousands of
identical commands on the pool's connections (and the ones that waited longer than the
Redis timeout were answered 503); a lock would hand over to one waiter per loop
iteration. Callers share the call in flight instead.

Only for callers that can use a result the call fetched a moment before they asked:
a shared read may have been sent before the caller looked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Flights(Generic[K, V]):
    __slots__ = ("_flying",)

    def __init__(self) -> None:
        self._flying: dict[K, asyncio.Future[V]] = {}

    async def run(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        """`call()`'s result, or that of the same key's call already in flight."""
        flight = self._flying.get(key)
        if flight is None:
            flight = self._flying[key] = asyncio.ensure_future(call())
            flight.add_done_callback(partial(self._landed, key))
        # shield: one caller's cancellation must not cancel the call the others await
        return await asyncio.shield(flight)

    def _landed(self, key: K, flight: asyncio.Future[V]) -> None:
        if self._flying.get(key) is flight:
            del self._flying[key]
        if not flight.cancelled():
            flight.exception()  # retrieved: with no caller left it is not "never retrieved"
