"""Spare workers: under `--workers N` the first worker serves alone until it is busy.

Why: every worker that serves reads and decodes the whole stream and wakes for every
event, whatever its own subscribers need. At a dashboard's load (100 clients, 100
events/s) one worker spends 640-1,040 µs of CPU per event and a second one added
190-260 µs (1.12-1.41x over a day's runs of `python -m bench workers`): 173 µs of it
is what a worker with no subscriber pays per event (`python -m bench.readcost`), and
49 µs of that is only the wake-up of an idle process (`python -m bench.wakefloor`), so
no cheaper read brings a second reader under a tenth of the first. A spare worker is
started (imported, ready) but neither listens nor reads the log until it is woken, so
while one process carries the load, N workers cost what one does.

The first worker is busy when it has spent half a core over the last second, or holds
more connections than `crowd`: a thousand, or cap / 2N when that is less (with
SO_REUSEPORT the kernel then spreads new connects evenly, so the first stays that far
ahead of the others: it reaches its cap when the server holds ~1 - 1/2N of all the
workers' caps together, not earlier; past that its share of connects is refused, 503,
and retried, landing on another worker). Then every
spare wakes, and from then on all of them serve, as they would from the start with
DUALCAST_WORKERS_WAKE=start: connections last, and are not moved back to one process
when the load falls. When the CPU woke them (the load grew on connections the first
worker already held), the first sends 1 - 1/N of its subscribers away to reconnect,
once the spares listen (WS 1001, SSE the usual `retry:`; each resumes from its
cursor, nothing is lost): the kernel spreads them over all N. One that dies wakes the spares too, so
the port keeps a listener while it is replaced.

The supervisor watches the first worker from /proc (its CPU time and its number of open
files); where there is no /proc to read, every worker serves from the start.
"""

from __future__ import annotations

import logging
import os
from collections import deque

log = logging.getLogger("dualcast.serve")

#: The share of one core the first worker spends, over `WINDOW` seconds, that wakes the spares.
BUSY_CPU = 0.5
WINDOW = 1.0
#: The most connections the first worker holds alone (fewer when its cap is low: `crowd`).
CROWD = 1000

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def crowd(cap: int, workers: int) -> int:
    """The connections past which the first worker wakes the spares: `CROWD`, or
    cap / 2N when that is less (a cap of 0 is no cap)."""
    if cap <= 0:
        return CROWD
    return max(1, min(CROWD, cap // (2 * workers)))


def cpu_seconds(pid: int) -> float | None:
    """A process's CPU time (user and system) from /proc; None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rpartition(b")")[2].split()  # (the command name may hold spaces)
    try:
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (IndexError, ValueError):
        return None


def open_files(pid: int) -> int | None:
    """How many files a process holds open: the size Linux (6.2 on) gives /proc/PID/fd,
    else a count of its entries; None where neither can be read."""
    path = f"/proc/{pid}/fd"
    try:
        size = os.stat(path).st_size
        return size if size > 0 else len(os.listdir(path))
    except OSError:
        return None


class FirstWorker:
    """What the supervisor knows of the first worker's load, one look per tick."""

    def __init__(self, crowd: int) -> None:
        self.crowd = crowd
        self.pid: int | None = None
        self.baseline = 0  # its open files before its first connection: Redis, epoll, logs
        self.samples: deque[tuple[float, float]] = deque()

    def follow(self, pid: int) -> None:
        """Watch a (new) first worker from now on."""
        self.pid, self.samples = pid, deque()
        self.baseline = 0

    def readable(self) -> bool:
        return cpu_seconds(os.getpid()) is not None and open_files(os.getpid()) is not None

    def listening(self, baseline: int) -> None:
        """The first worker listens now, holding `baseline` open files (Redis, epoll,
        logs, its socket) that are not connections. It counts them itself as it begins to
        listen: counted here, at the supervisor's next look up to 0.2 s later, they took
        in the connections made meanwhile (30 and more in a test that connects at once),
        and the crowd bound was then never passed."""
        self.baseline = baseline

    def crowded(self) -> str | None:
        """Why the spares should wake, if the first worker holds too many connections."""
        files = open_files(self.pid) if self.pid is not None else None
        if files is None:
            return None
        if not self.baseline:  # (its count could not be read when it began to listen)
            self.baseline = files
        if files - self.baseline > self.crowd:
            return f"it holds about {files - self.baseline} connections (more than {self.crowd})"
        return None

    def busy(self, now: float) -> str | None:
        """Why the spares should wake, if the first worker spends `BUSY_CPU` or more."""
        cpu = cpu_seconds(self.pid) if self.pid is not None else None
        if cpu is None:
            return None  # (not started, or exiting: the supervisor sees that on its own)
        self.samples.append((now, cpu))
        while len(self.samples) > 1 and now - self.samples[1][0] >= WINDOW:
            self.samples.popleft()
        first_at, first_cpu = self.samples[0]
        span = now - first_at
        if span >= WINDOW and (cpu - first_cpu) / span >= BUSY_CPU:
            return f"it spent {100 * (cpu - first_cpu) / span:.0f}% of a core over {span:.1f}s"
        return None
