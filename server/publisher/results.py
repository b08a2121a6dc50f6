"""What a publish ends in: one outcome per event, counted in the publisher's stats."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from enum import StrEnum

import redis


class Outcome(StrEnum):
    """Where one event went."""

    PUBLISHED = "published"  # appended to the Redis Stream
    FALLBACK = "fallback"  # handed to the local fallback (this process's hub only)
    DROPPED = "dropped"  # lost: Redis away or refused it, and no fallback took it (or no
    # reply in time: then ``error`` ends "(Redis may still have appended it)")
    HELD = "held"  # throttled: held for the end of the interval (or replaced by a newer value)


@dataclass(frozen=True, slots=True)
class PublishResult:
    """The outcome of one event, and what `WAIT` said when replicas were asked for.

    ``replicas`` is the number of replicas that acknowledged the write within
    ``wait_timeout_ms`` (``None`` when no replicas were asked for, or the event
    was not appended); ``wanted`` is the ``wait_replicas`` asked for. ``error`` says
    why Redis did not take an event that went to the fallback or was dropped (the
    exception or Redis's refusal, in one line without a password), so that a caller
    can report the cause; None when Redis took it or was not asked.
    """

    id: str | None
    outcome: Outcome
    replicas: int | None = None
    wanted: int = 0
    error: str | None = None

    @property
    def replicated(self) -> bool:
        """Appended, and acknowledged by as many replicas as were asked for."""
        if self.outcome is not Outcome.PUBLISHED:
            return False
        return self.wanted == 0 or (self.replicas or 0) >= self.wanted


@dataclass
class PublisherStats:
    """Counters of one publisher; every event offered ends in exactly one outcome counter.

    The outcomes are ``published``, ``fallback``, ``dropped`` and ``conflated``;
    ``failed``, ``short_circuited`` and ``overloaded`` say why an event missed
    Redis (it then ends as fallback or dropped).
    """

    #: appended to Redis
    published: int = 0
    #: handed to the local fallback
    fallback: int = 0
    #: lost: the call returned None
    dropped: int = 0
    #: a throttled value replaced by a newer one before it was due
    conflated: int = 0
    #: the Redis call errored or timed out, or Redis refused the XADD
    failed: int = 0
    #: refused at once while the breaker was open
    short_circuited: int = 0
    #: waited the whole timeout for a connection behind this process's own publishes
    overloaded: int = 0
    #: times the breaker opened
    outages: int = 0
    #: published, but fewer replicas than ``wait_replicas`` acknowledged it in time
    under_replicated: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


#: Redis's answers to a client that sent no password where one is required: to the
#: RESP3 handshake redis-py opens with, a sentence about HELLO nobody called.
_NO_PASSWORD = ("HELLO must be called with the client already authenticated",
                "Authentication required")


#: redis-py's words for a reply that is no Redis reply ("got "H" as reply type byte": an
#: HTTP server's "HTTP/1.1 ...").
_NOT_REDIS = "Protocol error, got"


#: How redis-py names each Sentinel it could not ask, in a MasterNotFoundError: the whole
#: repr of a client, pool and connection (3 KB for three Sentinels), its address within.
_SENTINEL_REPR = re.compile(r"<redis\.[\w.]+\(.*?,host=([^,]+),port=(\d+),.*?\)>\)>\)> - "
                            r"(?:network:)?(\w+)")


def describe(exc: BaseException) -> str:
    """`exc` in one line for `PublishResult.error`: its type and message (a timeout has
    none of its own)."""
    text = str(exc) or ("no answer in time" if isinstance(exc, TimeoutError) else "")
    if text.startswith("No master found"):  # MasterNotFoundError, async or not
        text = _SENTINEL_REPR.sub(r"Sentinel \1:\2 (\3)", text)
    if text.startswith(_NO_PASSWORD):
        text = ("this Redis requires a password and the URL has none: "
                "redis://:PASSWORD@host:port/db (or USER:PASSWORD@ for an ACL user)")
    elif text.startswith(_NOT_REDIS):
        text += (": what answers at that address does not speak Redis (an HTTP server, "
                 "dualcast's own port?): check the URL's port (Redis's is usually 6379)")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: redis-py's words for a connection that failed once the command was on its way: on
#: the write, or waiting for the reply (the peer closed or reset it, or said nothing).
_AFTER_SENDING = ("while writing to socket", "Timeout writing to socket", "Timeout reading from",
                  "while reading from", "Connection closed by server")
#: redis-py's functions that set a connection up or check it before any command is written
#: on it: a failure inside them never sent the caller's command.
_BEFORE_SENDING = frozenset({"connect", "connect_check_health", "_connect", "on_connect",
                             "on_connect_check_health", "check_health", "get_connection",
                             "get_master_address"})


def unanswered(exc: BaseException) -> bool:
    """Whether a failed call may have been carried out by Redis: its command went out and
    no reply came, in time or at all (a slow Redis, or a primary that appended and died
    before it answered), as opposed to never reaching Redis (refused, no primary known,
    a connection that failed its check before the command was written)."""
    if isinstance(exc, (redis.TimeoutError, redis.ConnectionError)):
        if "connecting" in str(exc):  # redis-py: "Timeout connecting", "Error 111 connecting"
            return False
        frames = []
        tb = exc.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        if any(f.f_code.co_name in _BEFORE_SENDING and f.f_globals.get("__name__", "")
               .startswith("redis.") for f in frames):
            return False
        return isinstance(exc, redis.TimeoutError) or any(
            words in str(exc) for words in _AFTER_SENDING)
    if not isinstance(exc, TimeoutError):
        return False
    # The call's own bound may cut in while redis-py is still failing to connect (a loaded
    # loop runs both timers at once): a redis-py failure behind the timeout that never
    # sent the command means nothing was sent either.
    seen: set[int] = set()
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (redis.TimeoutError, redis.ConnectionError)):
            return unanswered(cause)
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return True
