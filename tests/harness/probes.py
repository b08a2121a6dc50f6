"""What a running dualcast shows from outside: its log, /readyz, /metrics, fds, memory."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx

from tests.harness.procs import Child, DualcastProcess

BAD_LOG = re.compile(r"Traceback|Task was destroyed|Exception in ASGI|was never awaited|"
                     r"Unclosed|ERROR")


def log_problems(proc: Child) -> list[str]:
    """Lines of a dualcast log that show an escaped exception or a leaked task."""
    return [line for line in proc.log().splitlines() if BAD_LOG.search(line)]


async def readyz(proc: DualcastProcess) -> int:
    """The /readyz status, 0 when the server does not answer."""
    async with httpx.AsyncClient(timeout=2) as client:
        try:
            return (await client.get(proc.url + "/readyz")).status_code
        except httpx.HTTPError:
            return 0


async def metric(proc: DualcastProcess, name: str) -> float:
    """The sum of every series of `name` (or `name_total`) in /metrics; KeyError if absent."""
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
