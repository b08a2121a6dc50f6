"""Moved to `tests.harness.clients` (and `waits`, `stream`); kept for existing imports."""

from __future__ import annotations

from tests.harness.clients import Poller, Seen, SSEClient, WSClient, flatten
from tests.harness.stream import xadd
from tests.harness.waits import wait_for

__all__ = ["Poller", "SSEClient", "Seen", "WSClient", "flatten", "wait_for", "xadd"]
