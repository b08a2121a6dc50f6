"""Moved to `tests.harness.follow` and `tests.harness.stream`; kept for existing imports."""

from __future__ import annotations

from tests.harness.follow import Close, Follower, Record, Stuck, start_followers
from tests.harness.stream import (
    STREAM,
    Producer,
    check_exact,
    id_key,
    stream_entries,
    stream_ids,
    visible,
)

__all__ = ["STREAM", "Close", "Follower", "Producer", "Record", "Stuck", "check_exact", "id_key",
           "start_followers", "stream_entries", "stream_ids", "visible"]
