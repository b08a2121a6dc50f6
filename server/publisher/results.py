"""What a publish ends in: one outcome per event, counted in the publisher's stats."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum


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


def describe(exc: BaseException) -> str:
    """`exc` in one line for `PublishResult.error`: its type and message (a timeout has
    none of its own)."""
    text = str(exc) or ("no answer in time" if isinstance(exc, TimeoutError) else "")
    if text.startswith(_NO_PASSWORD):
        text = ("this Redis requires a password and the URL has none: "
                "redis://:PASSWORD@host:port/db (or USER:PASSWORD@ for an ACL user)")
    elif text.startswith(_NOT_REDIS):
        text += (": what answers at that address does not speak Redis (an HTTP server, "
                 "dualcast's own port?): check the URL's port (Redis's is usually 6379)")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
