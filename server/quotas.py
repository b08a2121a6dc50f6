"""Connection caps: per subject, per anonymous client address, and per process.

One token (or one address without a token) could otherwise hold thousands of
streams: each costs memory and a share of every fan-out. A cap is checked when a
subscriber is admitted and its lease is given back when the subscription ends,
whatever the transport. The address is the one uvicorn reports, which is the
`X-Forwarded-For` client only behind a proxy listed in DUALCAST_FORWARDED_ALLOW_IPS.

The process cap (DUALCAST_MAX_CONNECTIONS) keeps a process below its open-file
limit: past that limit accept() fails with EMFILE and the loop stops accepting for
a second at a time, while a refusal under the cap is one clean 503 that clients
retry (on another worker or instance). `dualcast serve` checks the limit against
it at start (`fdlimit.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Lease:
    """One held connection; `release()` may be called more than once."""

    __slots__ = ("_key", "_quotas")

    def __init__(self, quotas: ConnectionQuotas | None, key: str) -> None:
        self._quotas = quotas
        self._key = key

    def release(self) -> None:
        quotas, self._quotas = self._quotas, None
        if quotas is not None:
            quotas.give_back(self._key)


#: A lease for callers nothing counts.
FREE = Lease(None, "")


@dataclass
class ConnectionQuotas:
    per_subject: int
    per_address: int
    per_process: int = 0  # 0: no cap
    #: connections held in this process (every lease, capped per caller or not)
    total: int = 0
    _counts: dict[str, int] = field(default_factory=dict)

    def full(self) -> bool:
        """This process holds its cap of connections (checked before `acquire`)."""
        return 0 < self.per_process <= self.total

    def acquire(self, subject: str | None, address: str | None) -> Lease | None:
        """A lease, or None when the caller already holds its cap (0: no cap)."""
        if subject is not None:
            key, cap = "s:" + subject, self.per_subject
        else:
            key, cap = "a:" + (address or "?"), self.per_address
        if cap <= 0:
            key = ""  # counted in the total only
        else:
            held = self._counts.get(key, 0)
            if held >= cap:
                return None
            self._counts[key] = held + 1
        self.total += 1
        return Lease(self, key)

    def give_back(self, key: str) -> None:
        """A lease ended (called once per lease, by `Lease.release`)."""
        self.total -= 1
        if not key:
            return
        left = self._counts[key] - 1
        if left:
            self._counts[key] = left
        else:
            del self._counts[key]

    def held(self) -> int:
        return self.total
