"""The running event loop, found without a system call.

On Python 3.11 every `asyncio.get_running_loop()` makes a getpid() system call (to
notice a fork), and so does whatever calls it: `current_task()`, uvicorn's
`get_event_loop()` per protocol, the first wait of an Event. A connect looked five
to seven times; with 15,000 connections coming into each of two workers, getpid()
was 5.2 % (WebSocket) and 7.5 % (SSE) of the workers' samples (`py-spy record
--native` over `python -m bench fleet --clients 30000 --server-workers 2`,
2026-11-30). The loop a thread runs cannot change while it runs, so the last one
found is kept per thread and trusted while it is running; a fork clears it, which
is what the getpid() was for.
"""

from __future__ import annotations

import asyncio
import os
import threading


class _Found(threading.local):
    loop: asyncio.AbstractEventLoop | None = None


_found = _Found()


def running_loop() -> asyncio.AbstractEventLoop:
    """`asyncio.get_running_loop()`, which it calls only when the loop it found last in
    this thread is no longer running; RuntimeError where no loop runs."""
    loop = _found.loop
    if loop is None or not loop.is_running():
        loop = _found.loop = asyncio.get_running_loop()
    return loop


def _forget() -> None:
    _found.loop = None


os.register_at_fork(after_in_child=_forget)
