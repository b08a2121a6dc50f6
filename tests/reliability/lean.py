"""Moved to `tests.harness.follow` and `tests.harness.stream`; kept for existing imports."""

from __future__ import annotations

from tests.harness.follow import *  # noqa: F403
from tests.harness.stream import *  # noqa: F403
