"""Fixtures and checks shared by the reliability scenarios (real processes on loopback)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from bench.procs import raise_nofile
from tests.support.procs import DualcastProcess

# 2,000 abrupt connections and hundreds of clients need more than 1,024 fds; the
# dualcast children inherit the raised limit.
raise_nofile()

#: Small timeouts so faults are noticed in seconds (DESIGN: block well below socket timeout).
FAST = {
    "DUALCAST_BLOCK_MS": "300",
    "DUALCAST_REDIS_TIMEOUT": "1",
    "DUALCAST_STALL_SECONDS": "2",
    "DUALCAST_BACKOFF_MAX": "0.5",
    "DUALCAST_LOG_LEVEL": "info",
}

BAD_LOG = re.compile(r"Traceback|Task was destroyed|Exception in ASGI|was never awaited|"
                     r"Unclosed|ERROR")


def log_problems(proc: DualcastProcess) -> list[str]:
    """Lines of a dualcast log that show an escaped exception or a leaked task."""
    return [line for line in proc.log().splitlines() if BAD_LOG.search(line)]


async def readyz(proc: DualcastProcess) -> int:
    async with httpx.AsyncClient(timeout=2) as client:
        try:
            return (await client.get(proc.url + "/readyz")).status_code
        except httpx.HTTPError:
            return 0


async def metric(proc: DualcastProcess, name: str) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(proc.url + "/metrics")).text
    total = 0.0
    found = False
    for line in text.splitlines():
        metric_name = line.split("{", 1)[0].split(" ", 1)[0]
        if metric_name in (name, name + "_total"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise KeyError(f"{name} not in /metrics")
    return total


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
