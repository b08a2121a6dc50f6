"""Event-log engines: where events are appended and read back in id order."""

from __future__ import annotations

from dualcast.config import Settings
from dualcast.log.base import (
    EventLog,
    LogInfo,
    LogNoAnswer,
    LogRefused,
    LogUnavailable,
    RawEntry,
)


def create_log(settings: Settings) -> EventLog:
    """The engine the settings name: Redis Streams when a URL is set, else in-process memory."""
    if settings.redis_url is None:
        from dualcast.log.memory import MemoryLog

        return MemoryLog(maxlen=settings.maxlen)
    from dualcast.log.redis import RedisLog

    return RedisLog(settings)


__all__ = ["EventLog", "LogInfo", "LogNoAnswer", "LogRefused", "LogUnavailable", "RawEntry",
           "create_log"]
