"""Connection caps per subject and per anonymous client address.

One token (or one address without a token) could otherwise hold thousands of
streams: each costs memory and a share of every fan-out. A cap is checked when a
subscriber is admitted and its lease is given back when the subscription ends,
whatever the transport. The address is the one uvicorn reports, which is the
`X-Forwarded-For` client only behind a proxy listed in DUALCAST_FORWARDED_ALLOW_IPS.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Lease:
    """One held connection; `release()` may be called more than once."""

    __slots__ = ("_counts", "_key")

    def __init__(self, counts: dict[str, int] | None, key: str) -> None:
        self._counts = counts
        self._key = key

    def release(self) -> None:
        counts, self._counts = self._counts, None
        if counts is None:
            return
        left = counts[self._key] - 1
        if left:
            counts[self._key] = left
        else:
            del counts[self._key]


#: A lease for callers nothing counts (caps off).
FREE = Lease(None, "")


@dataclass
class ConnectionQuotas:
    per_subject: int
    per_address: int
    _counts: dict[str, int] = field(default_factory=dict)

    def acquire(self, subject: str | None, address: str | None) -> Lease | None:
        """A lease, or None when the caller already holds its cap (0: no cap)."""
        if subject is not None:
            key, cap = "s:" + subject, self.per_subject
        else:
            key, cap = "a:" + (address or "?"), self.per_address
        if cap <= 0:
            return FREE
        held = self._counts.get(key, 0)
        if held >= cap:
            return None
        self._counts[key] = held + 1
        return Lease(self._counts, key)

    def held(self) -> int:
        return sum(self._counts.values())
