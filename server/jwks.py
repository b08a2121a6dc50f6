"""An issuer's published key set (JWKS), fetched over HTTP and kept in memory.

Fetched at start, again when a token names a key we do not hold or, naming none, is
checked by none we hold (the issuer rotated its only key; such fetches at most once
per `min_interval`, and one request however many tokens ask at once),
and on a slow timer so a removed key stops working. A failed fetch keeps the last good
set: an issuer that is down must not log everyone out.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization

from dualcast.keys import ALGORITHMS, Family, PublicKey, family_of, key_fits
from dualcast.logs import redact_url, redirected_to

log = logging.getLogger("dualcast.auth")

#: A JWKS larger than this is not a key set (Google's is ~2 KB).
MAX_BYTES = 512 * 1024


@dataclass
class JwksStats:
    fetches: int = 0
    failures: int = 0
    cache_hits: int = 0


@dataclass(frozen=True)
class Jwk:
    key: PublicKey
    kid: str | None
    alg: str | None  # when the issuer pins the key to one algorithm

    def fits(self, algorithm: str) -> bool:
        return (self.alg is None or self.alg == algorithm) and key_fits(self.key, algorithm)


class JwksError(Exception):
    """A fetch or a document that gave no key set; the message is for the log."""


def parse_jwks(document: Any) -> list[Jwk]:
    """The usable signing keys of a JWKS document. Symmetric (`oct`) keys are never taken
    from a key set: a published secret is no secret. Keys we cannot use are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError("not a JWKS document (no 'keys' list)")
    found: list[Jwk] = []
    for raw in document["keys"]:
        if not isinstance(raw, dict) or raw.get("kty") == "oct":
            continue
        if raw.get("use", "sig") != "sig":
            continue
        alg = raw.get("alg")
        if alg is not None and (alg not in ALGORITHMS or ALGORITHMS[alg] is Family.HMAC):
            continue
        try:
            key = jwt.PyJWK(raw).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError) as exc:
            log.warning("JWKS: skipping key %r: %s", raw.get("kid"), exc)
            continue
        if family_of(key) is None or hasattr(key, "private_bytes"):
            continue
        kid = raw.get("kid")
        found.append(Jwk(key, kid if isinstance(kid, str) else None, alg))
    return found


class KeySet:
    """The keys of one JWKS URL, refreshed as described above."""

    def __init__(
        self, url: str, client: httpx.AsyncClient, min_interval: float = 60.0,
        refresh_every: float = 600.0,
    ) -> None:
        self.url = url
        #: the URL as logs show it: credentials in it (`https://user:PASSWORD@...`,
        #: which httpx sends as basic auth) masked
        self.shown = redact_url(url)
        self.client = client
        self.min_interval = min_interval
        self.refresh_every = refresh_every
        self.stats = JwksStats()
        self.keys: list[Jwk] = []
        #: Bumped whenever the set changes, so verified-token caches can be dropped.
        self.version = 0
        #: When a token last made a fetch (`ask`): the limit counts only those. The fetch at
        #: start and the routine ones do not count: counted, a key the issuer added just
        #: after them was refused for up to `min_interval` (the first minute after every
        #: start, whatever the key set said by then).
        self._last_asked: float | None = None
        self._inflight: asyncio.Future[None] | None = None

    def find(self, kid: str | None, algorithm: str) -> Jwk | None:
        """The key for a token's `kid` (or, with no kid, the only key that fits)."""
        if kid is None:
            fitting = [k for k in self.keys if k.fits(algorithm)]
            return fitting[0] if len(fitting) == 1 else None
        for jwk in self.keys:
            if jwk.kid == kid:
                return jwk if jwk.fits(algorithm) else None
        return None

    def knows(self, kid: str | None) -> bool:
        return kid is None or any(k.kid == kid for k in self.keys)

    async def key_for(self, kid: str | None, algorithm: str) -> Jwk | None:
        """As `find`, fetching the set again first when it lacks `kid` (within the budget
        of `ask`: a storm of unknown kids makes one request)."""
        if self.knows(kid):
            self.stats.cache_hits += 1
            return self.find(kid, algorithm)
        await self.ask()
        return self.find(kid, algorithm)

    async def ask(self) -> bool:
        """Fetch the set again because a token suggests it changed (a kid we lack, or a
        token without kid that no key we hold checks): at most once per `min_interval`
        for all such tokens together, so bad tokens cannot make us fetch more often.
        True when a fetch ran (or one already on its way was joined), so the set is as
        fresh as it gets; False when the budget was spent and nothing was fetched."""
        if self._inflight is not None:
            await self.refresh()  # (the one on its way answers this token too)
            return True
        now = asyncio.get_running_loop().time()
        if self._last_asked is not None and now - self._last_asked < self.min_interval:
            return False
        self._last_asked = now
        await self.refresh()
        return True

    async def refresh(self) -> None:
        """Fetch the set once for every concurrent caller; errors are logged and counted."""
        fetch = self._inflight
        if fetch is None:
            fetch = self._inflight = asyncio.ensure_future(self._fetch())
        await asyncio.shield(fetch)

    async def _fetch(self) -> None:
        try:
            self.stats.fetches += 1
            try:
                keys = parse_jwks(await self._download())
            except JwksError as exc:
                self.stats.failures += 1
                kept = f"keeping the last {len(self.keys)} keys" if self.keys else "no keys yet"
                log.warning("JWKS fetch from %s failed: %s (%s)", self.shown,
                            str(exc).replace(self.url, self.shown), kept)
                return
            if [(k.kid, k.alg, public_id(k.key)) for k in keys] != [
                (k.kid, k.alg, public_id(k.key)) for k in self.keys
            ]:
                self.keys = keys
                self.version += 1
                log.info("JWKS from %s: %d keys (%s)", self.shown, len(keys),
                         ", ".join(str(k.kid) for k in keys))
        finally:
            self._inflight = None

    async def _download(self) -> Any:
        try:
            response = await self.client.get(self.url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise JwksError(f"{type(exc).__name__}: {exc}") from None
        if response.is_redirect:
            # (said as a bare "HTTP 301": an http:// URL its issuer moves to https://)
            raise JwksError(f"HTTP {response.status_code}, a redirect to "
                            f"{redirected_to(response)}, not followed: set DUALCAST_JWKS_URL "
                            "to the URL it names")
        if response.status_code != 200:
            raise JwksError(f"HTTP {response.status_code}")
        if len(response.content) > MAX_BYTES:
            raise JwksError(f"answer over {MAX_BYTES} bytes")
        try:
            return response.json()
        except ValueError:
            raise JwksError("answer is not JSON") from None

    async def run(self) -> None:
        """The first fetch at start, then one every `refresh_every` seconds (0 = never)."""
        await self.refresh()
        while self.refresh_every > 0:
            await asyncio.sleep(self.refresh_every)
            await self.refresh()


def public_id(key: PublicKey) -> bytes:
    """Bytes that identify a public key, to tell whether a refreshed set changed."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
