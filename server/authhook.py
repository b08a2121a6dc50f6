"""The auth hook: ask the application who a caller is, from the caller's own cookie.

For a request that carries no dualcast token, dualcast sends `GET <url>` with
the client's `Cookie` and `Authorization` headers. A 200 JSON answer
`{"sub", "rooms", "admin", "publish", "exp"}` is the identity; 401/403 refuse;
anything else (a timeout, a 5xx, an answer we cannot read) refuses too, as
unavailable: without the application's word nobody gets in (fail closed).

Answers are cached per credential until their `exp` and at most `max_age`
seconds, and concurrent requests with one credential make one call: a page
reload that opens several streams, or a thousand long-pollers behind one
session, cost the application one request. An answer counts for no longer
than that on live subscriptions either: they are asked for again within
`max_age` seconds whatever `exp` the application gave.

Live subscriptions follow a `Lease` on their credential's answer. Shortly
before the lease ends the renewal loop asks again; the same identity extends
it (and every subscription that follows it), a refusal or a changed identity
lets it run out, and the connection then ends exactly as one whose token
expired (the client reconnects and is asked anew).
An answer without `exp`, or with one further away, is good for `max_age`
seconds and renewed like any other, so a session ended in the application ends
its live streams within a minute.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from dualcast.logs import Repeats, redact_url, redirected_to

log = logging.getLogger("dualcast.auth")

#: At most this many credentials are cached; beyond it the oldest entries go first.
CACHE_MAX = 10_000
#: Seconds between looks for leases about to end.
TICK = 0.5
#: A lease nothing follows is forgotten after this long (the cache still has its answer).
IDLE = 10.0


class HookRefused(Exception):
    """The application said no (401/403), or its answer has already expired."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HookUnavailable(Exception):
    """No usable answer (timeout, connection refused, 5xx, unreadable JSON)."""


@dataclass(frozen=True)
class Answer:
    sub: str
    rooms: frozenset[str]
    admin: bool
    publish: bool
    #: When this answer stops counting: the application's `exp`, at most asked + max_age.
    exp: float
    asked_at: float

    def same_identity(self, other: Answer) -> bool:
        return (self.sub, self.rooms, self.admin, self.publish) == (
            other.sub, other.rooms, other.admin, other.publish
        )

    def renew_ahead(self) -> float:
        """How long before `exp` to ask again: half the answer's life, at most 30 s."""
        return min(30.0, max(self.exp - self.asked_at, 0.0) / 2)


class Follower(Protocol):
    """What a live subscription offers its lease: a new end time (a Feed does)."""

    def extend(self, expires: float | None) -> None: ...


class Lease:
    """One credential's identity as live connections see it: `exp` moves when renewed,
    and the subscriptions that follow the lease are told."""

    __slots__ = (
        "__weakref__", "answer", "ended", "exp", "followers", "headers", "key", "made_at",
        "retry_at",
    )

    def __init__(self, key: bytes, headers: dict[str, str], answer: Answer) -> None:
        self.key = key
        self.headers = headers  # kept to ask again; never logged
        self.answer = answer
        self.exp = answer.exp
        self.ended = False
        self.retry_at = 0.0
        self.made_at = time.time()
        self.followers: weakref.WeakSet[Follower] = weakref.WeakSet()

    def follow(self, follower: Follower) -> None:
        self.followers.add(follower)

    def due(self, now: float) -> bool:
        return not self.ended and now >= self.retry_at and (
            self.exp - now <= self.answer.renew_ahead()
        )

    def renewed(self, answer: Answer) -> None:
        """The application vouched again: the same identity with a later end extends the
        lease (and its subscriptions); a changed identity, or no later end, lets it run out
        (the client reconnects and gets its new rights)."""
        if not answer.same_identity(self.answer) or answer.exp <= self.exp:
            self.ended = True
            return
        self.answer, self.exp = answer, answer.exp
        for follower in list(self.followers):
            follower.extend(self.exp)

    def forgotten(self, now: float) -> bool:
        """Nothing follows it any more (a poll's lease, a closed stream's)."""
        return not self.followers and (now - self.made_at > IDLE or now >= self.exp)


@dataclass
class HookStats:
    calls: int = 0
    failures: int = 0
    refusals: int = 0
    cache_hits: int = 0


def parse_answer(body: Any, asked_at: float, max_age: float) -> Answer:
    """The identity in a 200 answer; HookUnavailable when it is not one (the app's bug)."""
    if not isinstance(body, dict):
        raise HookUnavailable("the answer is not a JSON object")
    sub = body.get("sub")
    if not isinstance(sub, str) or not sub:
        raise HookUnavailable("the answer's 'sub' must be a non-empty string")
    rooms = body.get("rooms") or []
    if not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
        raise HookUnavailable("the answer's 'rooms' must be a list of strings")
    flags: dict[str, bool] = {}
    for name in ("admin", "publish"):
        value = body.get(name, False)
        if not isinstance(value, bool):
            raise HookUnavailable(f"the answer's {name!r} must be true or false")
        flags[name] = value
    exp = body.get("exp")
    if exp is None:
        end = asked_at + max_age
    elif isinstance(exp, bool) or not isinstance(exp, int | float):
        raise HookUnavailable("the answer's 'exp' must be a number (epoch seconds)")
    else:
        try:
            end = float(exp)
        except OverflowError:  # an integer past any float
            raise HookUnavailable("the answer's 'exp' is out of range") from None
        if end <= time.time():
            raise HookRefused(401, "the application's session has expired")
        # Counted for `max_age` at most, live streams too: taken as given, an `exp` hours
        # away kept a stream open that long without asking again, so a session the
        # application had ended went on streaming (the docs promise within a minute).
        end = min(end, asked_at + max_age)
    return Answer(sub, frozenset(rooms), flags["admin"], flags["publish"], end, asked_at)


def credential_key(headers: dict[str, str]) -> bytes:
    """The cache key of a credential: a digest, so the cache holds no cookie in clear."""
    return hashlib.sha256(
        headers.get("cookie", "").encode() + b"\0" + headers.get("authorization", "").encode()
    ).digest()


class AuthHook:
    def __init__(self, url: str, client: httpx.AsyncClient, max_age: float = 60.0) -> None:
        self.url = url
        self.shown = redact_url(url)  # for logs: a password in the URL masked
        #: One line per call that failed was one per client while the application was
        #: down (1,000 clients reconnecting: 1,000 lines); now one per 30 s with a count.
        self._failing = Repeats()
        self.client = client
        self.max_age = max_age
        self.stats = HookStats()
        self._cache: dict[bytes, Answer] = {}
        self._inflight: dict[bytes, asyncio.Future[Answer]] = {}
        self._leases: dict[bytes, Lease] = {}

    def _fresh(self, answer: Answer, now: float) -> bool:
        return now - answer.asked_at < self.max_age and answer.exp - now > answer.renew_ahead()

    async def lease_for(self, headers: dict[str, str]) -> Lease:
        """The caller's identity: cached, or asked of the application (once per credential
        for all concurrent callers). Raises HookRefused or HookUnavailable."""
        key = credential_key(headers)
        answer = self._cache.get(key)
        if answer is not None and self._fresh(answer, time.time()):
            self.stats.cache_hits += 1
        else:
            answer = await self._ask(key, headers)
        lease = self._leases.get(key)
        if lease is not None and not lease.ended and lease.answer.same_identity(answer):
            if answer.exp > lease.exp:
                lease.renewed(answer)
            return lease
        lease = self._leases[key] = Lease(key, headers, answer)
        return lease

    def _failed(self, level: int, why: str) -> None:
        """Log a call with no usable answer (its caller got 503), not one line per call."""
        count = self._failing.due()
        if count is not None:
            more = f" ({count} failed calls since the last such line)" if count > 1 else ""
            log.log(level, "auth hook %s: %s%s; said at most every %gs, "
                    "dualcast_auth_hook_failures_total counts each", self.shown, why, more,
                    self._failing.every)

    async def _ask(self, key: bytes, headers: dict[str, str]) -> Answer:
        call = self._inflight.get(key)
        if call is None:
            call = self._inflight[key] = asyncio.ensure_future(self._call(key, headers))
            # (its error reaches whoever awaits; none left is not "never retrieved")
            call.add_done_callback(lambda f: f.cancelled() or f.exception())
        else:
            self.stats.cache_hits += 1  # answered by a call already on its way
        # shield: one caller giving up must not cancel the call the others await
        return await asyncio.shield(call)

    async def _call(self, key: bytes, headers: dict[str, str]) -> Answer:
        try:
            self.stats.calls += 1
            asked_at = time.time()
            try:
                response = await self.client.get(self.url, headers={
                    **headers, "accept": "application/json"
                })
            except httpx.HTTPError as exc:
                self.stats.failures += 1
                self._failed(logging.WARNING, type(exc).__name__)
                raise HookUnavailable(f"the application did not answer ({type(exc).__name__})") \
                    from None
            if response.status_code in (401, 403):
                self.stats.refusals += 1
                self._cache.pop(key, None)
                raise HookRefused(response.status_code, "the application refused this session")
            if response.status_code != 200:
                self.stats.failures += 1
                # (a bare "HTTP 302" for the redirect to its login page that a web app's
                # view answers a caller without a session: not followed, and not a 401)
                hint = (f", a redirect to {redirected_to(response)}, not followed: answer "
                        "401 for a caller without a session, or set DUALCAST_AUTH_URL to "
                        "the URL it names" if response.is_redirect else "")
                self._failed(logging.WARNING, f"answered HTTP {response.status_code}{hint}")
                raise HookUnavailable(f"the application answered HTTP {response.status_code}")
            try:
                answer = parse_answer(response.json(), asked_at, self.max_age)
            except ValueError:
                self.stats.failures += 1
                self._failed(logging.ERROR, "the answer is not JSON")
                raise HookUnavailable("the application's answer is not JSON") from None
            except HookUnavailable as exc:
                self.stats.failures += 1
                self._failed(logging.ERROR, str(exc))
                raise
            except HookRefused:
                self.stats.refusals += 1
                raise
            if len(self._cache) >= CACHE_MAX:
                del self._cache[next(iter(self._cache))]
            self._cache[key] = answer
            return answer
        finally:
            self._inflight.pop(key, None)

    # renewal of live connections ----------------------------------------------

    async def run(self) -> None:
        """Ask again for leases about to end (one call per credential); forget the rest."""
        while True:
            await asyncio.sleep(TICK)
            now = time.time()
            due: list[Lease] = []
            for key, lease in list(self._leases.items()):
                if lease.forgotten(now) or (lease.ended and not lease.followers):
                    del self._leases[key]
                elif lease.followers and lease.due(now):
                    due.append(lease)
            if due:
                await asyncio.gather(*(self._renew(lease) for lease in due))

    async def _renew(self, lease: Lease) -> None:
        cached = self._cache.get(lease.key)
        try:
            if cached is not None and cached is not lease.answer and self._fresh(
                cached, time.time()
            ):
                answer = cached  # another request asked already
            else:
                answer = await self._ask(lease.key, lease.headers)
        except HookRefused:
            lease.ended = True  # its subscriptions end when it runs out
            return
        except HookUnavailable:
            lease.retry_at = time.time() + 1.0  # until it runs out: fail closed
            return
        lease.renewed(answer)
