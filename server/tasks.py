"""The background tasks an app owns: started by its lifespan, restarted if they die, awaited.

A task that raises is logged and started again after a capped, jittered
backoff, and counted (`dualcast_task_restarts_total{task}` in /metrics): a
consumer that died once must not leave a server that answers /healthz but
delivers nothing (the silent listener death broadcaster is known for). A task
that returns has finished its job and stays finished.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

log = logging.getLogger("dualcast.tasks")


class TaskName(StrEnum):
    CONSUMER = "consumer"
    STALL_WATCH = "stall-watch"
    DEMO = "demo"
    AUTH = "auth"  # the issuer key set's fetches, the auth hook's renewals


class TaskState(StrEnum):
    RUNNING = "running"
    BACKING_OFF = "backing-off"  # died; waiting to start again
    FINISHED = "finished"


@dataclass
class TaskRecord:
    name: str  # a TaskName, or a name an embedding application chose for its own task
    state: TaskState = TaskState.RUNNING
    restarts: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Tasks:
    """One app's supervised tasks (on its runtime; no module state)."""

    #: A run that lasted this long was healthy: the next death starts the backoff afresh.
    HEALTHY_RUN = 60.0

    def __init__(self, backoff_first: float = 0.5, backoff_max: float = 30.0) -> None:
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self.records: dict[str, TaskRecord] = {}

    def start(self, name: TaskName | str, run: Callable[[], Awaitable[None]]) -> TaskRecord:
        """Run `run()` as task `name` until it returns or `stop_all`; restart it if it raises."""
        if name in self.records and self.records[name].state != TaskState.FINISHED:
            raise RuntimeError(f"task {name} is already running")
        record = TaskRecord(str(name))
        record.task = asyncio.create_task(self._supervise(record, run), name=f"dualcast-{name}")
        self.records[name] = record
        return record

    async def _supervise(self, record: TaskRecord, run: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            record.state = TaskState.RUNNING
            began = loop.time()
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception:  # the outermost boundary of a background task
                if loop.time() - began >= self.HEALTHY_RUN:
                    failures = 0
                failures += 1
                delay = min(self.backoff_max, self.backoff_first * 2 ** (failures - 1))
                delay = random.uniform(delay / 2, delay)
                log.exception("background task %s died; restarting in %.1fs", record.name, delay)
                record.state = TaskState.BACKING_OFF
                await asyncio.sleep(delay)
                record.restarts += 1
                continue
            record.state = TaskState.FINISHED
            return

    async def stop_all(self) -> None:
        """Cancel every task and wait for each to end (in reverse order of start)."""
        for record in reversed(list(self.records.values())):
            if record.task is not None:
                await _cancel(record.task)
            record.state = TaskState.FINISHED


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel and await a task. A cancel can be swallowed by a library racing its own
    timeout (seen in redis-py's blocking read on Python 3.11), so cancel again until done.
    """
    for _ in range(20):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=0.25)
    if not task.done():
        log.error("background task %s did not stop", task.get_name())
        return
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())
