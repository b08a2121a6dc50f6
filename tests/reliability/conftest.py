"""Settings shared by the reliability scenarios (real processes on loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.probes import BAD_LOG, fd_count, log_problems, metric, readyz, rss_mb
from tests.harness.procs import raise_nofile
from tests.harness.redis_ha import SentinelSet
from tests.harness.tools import require_tool

__all__ = ["BAD_LOG", "FAST", "fd_count", "log_problems", "metric", "readyz", "rss_mb"]

# 2,000 abrupt connections and hundreds of clients need more than 1,024 fds; the
# dualcast children inherit the raised limit.
raise_nofile()

#: Small timeouts so faults are noticed in seconds (the XREAD block well below the socket timeout).
FAST = {
    "DUALCAST_BLOCK_MS": "300",
    "DUALCAST_REDIS_TIMEOUT": "1",
    "DUALCAST_STALL_SECONDS": "2",
    "DUALCAST_BACKOFF_MAX": "0.5",
    "DUALCAST_LOG_LEVEL": "info",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    """A primary, a replica and Sentinels watching them, on free loopback ports."""
    require_tool("redis-server", "the Sentinel tests run it as primary, replica and Sentinel")
    ha = SentinelSet(tmp_path / "sentinel")
    try:
        yield ha.start()
    finally:
        ha.stop()
