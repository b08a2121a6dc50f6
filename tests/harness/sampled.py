"""A dualcast child that also reports how many asyncio tasks it runs (leak checks).

Tasks are counted without exposing anything new in the server: the child runs
`python -m tests.harness.sampled <file> serve ...`, which wraps `create_app` so
the app's own lifespan runs a sampler task writing `len(asyncio.all_tasks())`
to <file> every second, the most common task kinds to <file>.kinds and where
the most common kind waits to <file>.chains.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tests.harness.procs import DualcastProcess


def await_chain(task: asyncio.Task[Any]) -> str:
    """`a:line > b:line > ...`: what a task is awaiting, innermost last (diagnostics)."""
    parts: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None and len(parts) < 20:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            parts.append(type(coro).__name__)
            break
        parts.append(f"{coro.__qualname__}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return " > ".join(parts)


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)


async def _sample(sample_path: str) -> None:
    while True:
        tasks = asyncio.all_tasks()
        _write(sample_path, str(len(tasks)))
        kinds = Counter(getattr(t.get_coro(), "__qualname__", "?") for t in tasks)
        _write(sample_path + ".kinds", json.dumps(kinds.most_common(12)))
        # Where the most common kind waits: the chain of awaits of one of them.
        common = kinds.most_common(1)[0][0] if kinds else ""
        chains = Counter(await_chain(t) for t in tasks
                         if getattr(t.get_coro(), "__qualname__", "") == common)
        _write(sample_path + ".chains", json.dumps(chains.most_common(3)))
        await asyncio.sleep(1)


def serve_sampled(sample_path: str, argv: list[str]) -> int:
    """Run `dualcast serve` with a task sampler inside its app (the child's entry point)."""
    import dualcast.app as app_module
    from dualcast.cli import main

    original = app_module.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)
        runtime = app.state.dualcast
        previous = runtime.start

        async def start() -> None:
            await previous()
            runtime.tasks.start("soak-task-sampler", lambda: _sample(sample_path))

        runtime.start = start
        return app

    app_module.create_app = create_app  # type: ignore[assignment]
    return main(argv)


class SampledDualcast(DualcastProcess):
    """A DualcastProcess whose task count can be read (`tasks()`, `task_kinds()`)."""

    def __init__(self, workdir: Path, redis_url: str, env: dict[str, str]) -> None:
        self.sample_path = str(workdir / "tasks")
        super().__init__(workdir, redis_url=redis_url,
                         env={"DUALCAST_LOG_LEVEL": "warning", **env},
                         entry=["-m", "tests.harness.sampled", self.sample_path])

    def _read(self, suffix: str) -> Any:
        try:
            return json.loads(Path(self.sample_path + suffix).read_text())
        except (OSError, ValueError):
            return None

    def task_kinds(self) -> list[Any]:
        return list(self._read(".kinds") or [])

    def task_chains(self) -> list[Any]:
        return list(self._read(".chains") or [])

    def tasks(self) -> int:
        value = self._read("")
        return int(value) if isinstance(value, int) else -1


if __name__ == "__main__":
    raise SystemExit(serve_sampled(sys.argv[1], sys.argv[2:]))
