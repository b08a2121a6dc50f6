"""Moved to `tests.harness.procs` (and `tests.harness.waits`); kept for existing imports."""

from __future__ import annotations

from tests.harness.procs import ROOT, DualcastProcess, RedisProcess, free_port, redis_binary
from tests.harness.waits import wait_until

__all__ = ["ROOT", "DualcastProcess", "RedisProcess", "free_port", "redis_binary", "wait_until"]
